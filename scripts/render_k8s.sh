#!/usr/bin/env bash
# Render every Kustomize target under k8s/ into OUT_DIR (default build/k8s), validate the
# output strictly (kubernetes-validate --strict for Kubernetes kinds, k8s/schemas for
# KEDA's), check the deployment rules, and lint sources and output with yamllint.
# Needs kubectl (or kustomize) on PATH and the dev tools in .venv (docs/deploy.md).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$root/build/k8s}
py=${PYTHON:-$root/.venv/bin/python}
"$py" "$root/scripts/k8s_check.py" --out "$out"
"$py" -m yamllint --strict -c "$root/k8s/.yamllint.yaml" "$root/k8s" "$out"
echo "rendered into $out"
