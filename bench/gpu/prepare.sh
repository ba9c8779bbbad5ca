#!/usr/bin/env bash
# Prepare a GPU run: everything an NVIDIA machine with Python 3.12 and torch 2.11 (no
# vLLM, no Redis, no package registry) needs to run this checkout on vLLM 0.23.0, the
# version of the production ROCm image.
#
#   bench/gpu/prepare.sh            # from the repo root; about 5 minutes the first time
#
# Writes .gpu/ (ignored by git; keep it out of commits):
#   .gpu/payload/c1 c2 c3   vLLM 0.23.0 + its pinned dependencies (bench/gpu/wheels.txt) for
#                           Python 3.12, xz-compressed, split in three parts under 60 MiB
#                           (one per transfer), with site.sha256. Rebuilt only when
#                           wheels.txt changes.
#   .gpu/bundle             the gRPC stubs, the project's entry points (vLLM finds the
#                           config-fix plugin through them), redis-server with its
#                           libraries, and py-spy.
# On the GPU machine, from a copy of the checkout holding .gpu/: bench/gpu/device.sh.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
out=.gpu
here=bench/gpu
py=${PYTHON:-.venv/bin/python}
log() { printf '\033[1m[gpu-prepare]\033[0m %s\n' "$*" >&2; }
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude

plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
for n in 17 24 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

build_payload() {
    local work stamp
    stamp=$(sha256sum "$here/wheels.txt" | cut -c1-16)
    if [[ -f "$out/payload/stamp" && $(cat "$out/payload/stamp") == "$stamp" ]]; then
        log "payload up to date ($stamp)"
        return
    fi
    work=$(mktemp -d)
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install -q --isolated -U pip
    local pip="$work/venv/bin/pip"
    log "downloading vllm 0.23.0 and $(grep -c . "$here/wheels.txt") dependency wheels"
    $pip download -q --isolated --no-deps "${plat[@]}" -d "$work/whl" vllm==0.23.0 \
        -r "$here/wheels.txt"
    log "staging"
    $pip install -q --isolated --no-deps --no-compile "${plat[@]}" --target "$work/site" \
        "$work"/whl/*.whl
    # Hopper runs FlashAttention 3; vllm-rs is the Rust front end; deep_gemm ships one
    # build per Python: only 3.12's is kept.
    rm -rf "$work/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$work/site/vllm/vllm-rs" \
        "$work/site/bin" "$work/site/pycountry/locales"
    find "$work/site/vllm/third_party/deep_gemm" -name '_C.cpython-31[0134]-*.so' -delete \
        2>/dev/null || true
    find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
    log "compressing $(du -sh "$work/site" | cut -f1)"
    (cd "$work" && tar cf - site | xz -T2 -6 > site.tar.xz)
    rm -rf "$out/payload"
    mkdir -p "$out/payload"
    (cd "$work" && split -b 60M -d -a 1 site.tar.xz part.)
    local i=1
    for part in "$work"/part.*; do
        mkdir -p "$out/payload/c$i"
        mv "$part" "$out/payload/c$i/"
        i=$((i + 1))
    done
    (cd "$work" && sha256sum site.tar.xz) > "$out/payload/site.sha256"
    echo "$stamp" > "$out/payload/stamp"
    rm -rf "$work"
}

build_bundle() {
    local bundle="$out/bundle" dist
    rm -rf "$bundle"
    mkdir -p "$bundle/stubs" "$bundle/bin" "$bundle/lib" "$bundle/whl"
    log "gRPC stubs and entry points"
    (cd "$root" && find qwen_serve -name '*_pb2*.py' -print0 | xargs -0 tar cf - | tar xf - -C "$bundle/stubs")
    dist="$bundle/site/qwen_serve-0.0.0.dist-info"
    mkdir -p "$dist"
    printf 'Metadata-Version: 2.1\nName: qwen-serve\nVersion: 0.0.0\n' > "$dist/METADATA"
    "$py" - "$dist/entry_points.txt" <<'EOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
with open(sys.argv[1], "w") as out:
    for group, entries in project.get("entry-points", {}).items():
        out.write(f"[{group}]\n")
        out.writelines(f"{name} = {target}\n" for name, target in entries.items())
EOF
    # The rest of redis-server's libraries (libssl, libsystemd, ...) are in every
    # distribution's base image; these three are not.
    log "redis-server and its libraries"
    cp "$(command -v redis-server)" "$bundle/bin/"
    ldd "$(command -v redis-server)" | awk '/=> \//{print $3}' \
        | grep -E '/(liblzf|libjemalloc|libatomic)\.so' \
        | xargs -r -I{} cp -L {} "$bundle/lib/"
    # py-spy for profiles; pytest for the end-to-end tests; httpx for bench.http_load;
    # psutil for the CPU figures. The versions are the development lock's.
    log "py-spy, pytest, httpx, psutil"
    local tools=(py-spy==0.4.1)
    for name in pytest pluggy iniconfig pytest-asyncio pytest-timeout packaging \
        httpx httpcore h11 certifi idna psutil; do
        tools+=("$(grep -i "^$name==" requirements/cpu-dev.lock)")
    done
    python3 -m pip download -q --isolated --no-deps "${plat[@]}" -d "$bundle/whl" "${tools[@]}"
    log "bundle: $(du -sh "$bundle" | cut -f1)"
}

build_payload
build_bundle
ls -la "$out"/payload/c*/ "$out"/bundle
