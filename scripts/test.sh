#!/usr/bin/env bash
# Run every check: lint (ruff), types (mypy) and the tests (pytest), which start
# their own redis-server, worker (real vLLM CPU engine, tiny model) and router.
# Extra arguments go to pytest, e.g. scripts/test.sh -k bad_input.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/ensure_redis.sh
bash scripts/bootstrap.sh
py=.venv/bin/python
echo "[test] ruff" >&2
$py -m ruff check .
$py -m ruff format --check .
echo "[test] mypy" >&2
$py -m mypy qwen_serve router worker qwen_serve_client bench loadtest
echo "[test] pytest" >&2
exec $py -m pytest -p no:cacheprovider "$@"
