#!/usr/bin/env python3
"""Build-time checks of the qwen-serve wheel and image environments (stdlib only).

The Dockerfile runs these in each stage, and tests/test_deploy.py runs ``wheel`` on a
wheel built from the work tree, so the image build and the test suite check the same things:

``check_image.py wheel PATH``
    PATH (a wheel, or a directory holding one) contains the generated protobuf/gRPC
    stubs and registers the config fix as a ``vllm.general_plugins`` entry point.
``check_image.py router-env``
    this interpreter has the router's modules and no torch, vLLM or transformers.
``check_image.py worker-env``
    this interpreter has the worker's modules and sees the plugin entry point.
"""

from __future__ import annotations

import argparse
import configparser
import importlib
import importlib.util
import sys
import zipfile
from importlib.metadata import entry_points
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
WORKER_MODULES = ("worker.__main__", "worker.probe", "worker.config_fix")
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


def check_worker_env() -> list[str]:
    """The worker's modules import and vLLM will find the plugin."""
    plugins = {ep.name: ep.value for ep in entry_points(group=PLUGIN_GROUP)}
    problems = []
    if plugins.get(PLUGIN_NAME) != PLUGIN_TARGET:
        problems.append(f"{PLUGIN_GROUP} entry point not registered: {plugins}")
    return problems + check_imports(WORKER_MODULES)


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
