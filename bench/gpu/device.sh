#!/usr/bin/env bash
# On the GPU machine, from a copy of the checkout holding .gpu/ (bench/gpu/prepare.sh):
#
#   bench/gpu/device.sh receive           # append the payload parts this copy carries
#   bench/gpu/device.sh e2e|perf|real ... # set up once, then run a phase (bench/gpu/run.py)
#
# The payload's parts may arrive over several transfers (one per call where a transfer
# is capped): each run appends the parts it finds that are not in yet, in order, and the
# last one checks the archive's sha256 and unpacks it. Results go to $OUT (default
# /tmp/qs-gpu/out). Long-lived processes run in their own sessions and are stopped by
# the phase that started them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
state=${QS_GPU_STATE:-/tmp/qs-gpu}
out=${OUT:-$state/out}
mkdir -p "$state" "$out"
log() { printf '[gpu] %s\n' "$*" >&2; }

receive() {
    local part name
    for part in .gpu/payload/c*/part.*; do
        [[ -f "$part" ]] || continue
        name=$(basename "$part")
        [[ -f "$state/$name.in" ]] && continue
        cat "$part" >> "$state/site.tar.xz"
        touch "$state/$name.in"
        log "received $name ($(du -h "$state/site.tar.xz" | cut -f1) so far)"
    done
    if [[ -d "$state/site/vllm" || ! -f .gpu/payload/site.sha256 ]]; then
        return
    fi
    (cd "$state" && sha256sum -c --quiet "$OLDPWD/.gpu/payload/site.sha256") \
        || { log "payload checksum mismatch: resend every part"; rm -f "$state"/site.tar.xz "$state"/*.in; exit 3; }
    log "unpacking vLLM 0.23"
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="fully_trusted")' \
        "$state/site.tar.xz" "$state"
    rm -f "$state/site.tar.xz"
}

install_bundle() {
    local bundle=.gpu/bundle
    [[ -d "$bundle" ]] || { log "no .gpu/bundle here: run bench/gpu/prepare.sh first"; exit 3; }
    cp -r "$bundle/stubs/qwen_serve" .
    mkdir -p "$state/bin" "$state/tools"
    if [[ ! -x "$state/bin/redis-server" ]]; then
        cp "$bundle/bin/redis-server" "$state/redis-server.bin"
        cp -r "$bundle/lib" "$state/lib"
        printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/lib exec %s/redis-server.bin "$@"\n' "$state" "$state" \
            > "$state/bin/redis-server"
        chmod +x "$state/bin/redis-server"
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$state/tools" \
            "$bundle"/whl/*.whl
    fi
}

receive
[[ "${1:-receive}" == receive ]] && exit 0
[[ -d "$state/site/vllm" ]] || { log "vLLM is not unpacked yet: every payload part must arrive first"; exit 3; }
install_bundle
export PATH="$state/bin:$state/tools/bin:$PATH"
export PYTHONPATH="$state/site:$state/tools:$PWD/.gpu/bundle/site:$PWD"
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
export QS_CACHE_DIR="$state/cache" OUT="$out"
log "vLLM $(python3 -c 'import vllm; print(vllm.__version__)' 2>/dev/null), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
exec python3 -m bench.gpu.run "$@"
