#!/usr/bin/env bash
# Make sure redis-server is installed (tests and the demo start their own).
set -euo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
    echo "[setup] installing redis-server from the distribution's packages" >&2
    if [[ $(id -u) -eq 0 ]]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi
