#!/usr/bin/env bash
# Run every check: lint (ruff), types (mypy) and the tests (pytest), which start
# their own redis-server, worker (real vLLM CPU engine, tiny model) and router.
# Extra arguments go to pytest, e.g. scripts/test.sh -k bad_input.
#
# Then the end-to-end chat tests and the vLLM boundary tests run again on vLLM 0.23,
# the production image's version, from a second cached environment
# (requirements/cpu-vllm023.lock); QS_SKIP_VLLM023=1 skips that pass.
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
$py -m mypy qwen_serve qwen_serve_dev router worker qwen_serve_client bench loadtest
echo "[test] pytest (vLLM 0.32)" >&2
status=0
$py -m pytest -p no:cacheprovider "$@" || status=$?
if [[ "${QS_SKIP_VLLM023:-0}" != 1 ]]; then
    echo "[test] pytest (vLLM 0.23): boundary and end-to-end chat tests" >&2
    bash scripts/bootstrap.sh requirements/cpu-vllm023.lock .venv-vllm023
    # The 0.23 install regenerated the stubs with its grpcio-tools (the same pin).
    .venv-vllm023/bin/python -m pytest -p no:cacheprovider -v \
        tests/unit/test_vllm_boundary.py tests/unit/test_vllm_fixes.py tests/e2e/test_e2e_chat.py \
        tests/e2e/test_e2e_features.py \
        || status=$?
fi
exit $status
