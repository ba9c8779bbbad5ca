#!/usr/bin/env python3
"""Build-time checks of the qwen-serve wheel and image environments (stdlib only).

The Dockerfile runs these in each stage, and tests/unit/test_deploy.py runs ``wheel`` on a
wheel built from the work tree, so the image build and the test suite check the same things:

``check_image.py wheel PATH``
    PATH (a wheel, or a directory holding one) contains the generated protobuf/gRPC
    stubs and registers the config fix as a ``vllm.general_plugins`` entry point.
``check_image.py router-env``
    this interpreter has the router's modules and no torch, vLLM or transformers.
``check_image.py worker-env``
    this interpreter (the base image's vLLM, protobuf and grpcio) imports every worker
    module and the generated stubs, runs a vLLM in the supported range, and sees the
    plugin entry point. A mismatch names the package, the version found and the one
    needed.
"""

from __future__ import annotations

import argparse
import configparser
import importlib
import importlib.util
import pkgutil
import re
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "qwen_serve_config_fix"
PLUGIN_TARGET = "worker.config_fix:register"
STUBS = (
    "qwen_serve/api/v1/serve_pb2.py",
    "qwen_serve/api/v1/serve_pb2.pyi",
    "qwen_serve/api/v1/serve_pb2_grpc.py",
    "qwen_serve/queue/v1/queue_pb2.py",
)
ROUTER_MODULES = ("router.__main__", "router.server", "qwen_serve.api.v1.serve_pb2_grpc")
STUB_MODULES = ("qwen_serve.api.v1.serve_pb2", "qwen_serve.queue.v1.queue_pb2")
DEV_ONLY_WORKER_MODULES = (
    "worker.tiny_model",
    "worker.tiny_model_spec",
    "worker.tiny_model_tokenizer",
    "worker.tiny_model_weights",
)
"""Worker modules the production image does not need to import (development tools)."""
FORBIDDEN_IN_ROUTER = ("torch", "vllm", "transformers")


def find_wheel(path: Path) -> Path:
    """``path`` itself, or the one qwen_serve wheel inside the directory ``path``."""
    if path.is_file():
        return path
    wheels = sorted(path.glob("qwen_serve-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one qwen_serve wheel in {path}, found {wheels}")
    return wheels[0]


def wheel_entry_points(wheel: zipfile.ZipFile) -> dict[str, dict[str, str]]:
    """The wheel's ``entry_points.txt`` as {group: {name: target}}."""
    names = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    if len(names) != 1:
        raise SystemExit(f"wheel has {len(names)} entry_points.txt files")
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(wheel.read(names[0]).decode())
    return {group: dict(parser.items(group)) for group in parser.sections()}


def check_wheel(path: Path) -> list[str]:
    """Problems with the wheel at ``path`` (empty when it is fine)."""
    with zipfile.ZipFile(find_wheel(path)) as wheel:
        names = set(wheel.namelist())
        problems = [f"missing generated stub {stub}" for stub in STUBS if stub not in names]
        target = wheel_entry_points(wheel).get(PLUGIN_GROUP, {}).get(PLUGIN_NAME)
    if target != PLUGIN_TARGET:
        problems.append(f"{PLUGIN_GROUP}: {PLUGIN_NAME} is {target!r}, want {PLUGIN_TARGET!r}")
    return problems


def check_imports(modules: tuple[str, ...]) -> list[str]:
    """Modules of ``modules`` that fail to import, with the error."""
    problems = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # report every failure, not only ImportError
            problems.append(f"cannot import {name}: {exc!r}")
    return problems


def check_router_env() -> list[str]:
    """The router's modules import and the heavy engine packages are absent."""
    present = [m for m in FORBIDDEN_IN_ROUTER if importlib.util.find_spec(m) is not None]
    problems = [f"router image must not contain {m}" for m in present]
    return problems + check_imports(ROUTER_MODULES)


def worker_modules() -> tuple[str, ...]:
    """Every module of the installed worker package (development tools left out)."""
    import worker

    found = [m.name for m in pkgutil.walk_packages(worker.__path__, "worker.")]
    return tuple(m for m in sorted(found) if m not in DEV_ONLY_WORKER_MODULES)


def check_stub_runtimes() -> list[str]:
    """protobuf and grpcio at least as new as the versions that generated the stubs."""
    problems = []
    for package, needed in stub_requirements().items():
        try:
            found = version(package)
        except PackageNotFoundError:
            problems.append(f"{package} is not installed; the stubs need {package}>={needed}")
            continue
        if _numbers(found) < _numbers(needed):
            problems.append(
                f"{package} {found} is older than {needed}, which generated the stubs: "
                f"build the wheel with a grpcio-tools no newer than the base image allows"
            )
    return problems


def stub_requirements() -> dict[str, str]:
    """{package: version} the generated stubs check at import (their generator's)."""
    spec = importlib.util.find_spec("qwen_serve.api.v1.serve_pb2")
    grpc_spec = importlib.util.find_spec("qwen_serve.api.v1.serve_pb2_grpc")
    needs = {}
    if spec is not None and spec.origin:
        gencode = re.search(r"Protobuf Python Version: ([0-9.]+)", Path(spec.origin).read_text())
        if gencode:
            needs["protobuf"] = gencode.group(1)
    if grpc_spec is not None and grpc_spec.origin:
        generated = re.search(
            r"GRPC_GENERATED_VERSION = '([0-9.]+)'", Path(grpc_spec.origin).read_text()
        )
        if generated:
            needs["grpcio"] = generated.group(1)
    return needs


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def check_vllm_range() -> list[str]:
    """The base image's vLLM is one the worker's boundary module supports."""
    try:
        from worker import vllm_boundary
    except Exception as exc:  # reported by the import check too
        return [f"cannot import worker.vllm_boundary: {exc!r}"]
    low, high = vllm_boundary.SUPPORTED
    found = vllm_boundary.version_tuple()
    if not low <= found <= high:
        return [f"vLLM {vllm_boundary.VERSION} is outside the supported {low} to {high}"]
    return []


def check_worker_env() -> list[str]:
    """The worker's modules and stubs import, vLLM is supported and finds the plugin."""
    plugins = {ep.name: ep.value for ep in entry_points(group=PLUGIN_GROUP)}
    problems = []
    if plugins.get(PLUGIN_NAME) != PLUGIN_TARGET:
        problems.append(f"{PLUGIN_GROUP} entry point not registered: {plugins}")
    problems += check_stub_runtimes()
    problems += check_imports(STUB_MODULES + worker_modules())
    return problems + check_vllm_range()


def main(argv: list[str] | None = None) -> int:
    """CLI: print every problem; exit 1 if there was one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("wheel").add_argument("path", type=Path)
    sub.add_parser("router-env")
    sub.add_parser("worker-env")
    args = parser.parse_args(argv)
    if args.command == "wheel":
        problems = check_wheel(args.path)
    elif args.command == "router-env":
        problems = check_router_env()
    else:
        problems = check_worker_env()
    for problem in problems:
        print(f"check_image: {problem}", file=sys.stderr)
    print(f"check_image {args.command}: {'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
