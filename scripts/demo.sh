#!/usr/bin/env bash
# Set everything up and show the service working: installs the environment,
# builds the tiny CPU model, starts redis-server when REDIS_URL is unset,
# runs a worker and a router, and streams a sample chat to the terminal.
# Pass --keep to keep the stack serving afterwards (Ctrl-C stops it).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if [[ -z "${REDIS_URL:-}" ]]; then bash scripts/ensure_redis.sh; fi
bash scripts/bootstrap.sh
exec .venv/bin/python -m qwen_serve_dev.devstack demo "$@"
