"""Build hook: generate the protobuf and gRPC stubs from protos/ at build time.

The generated modules are not kept in git. `pip install .` and
`pip install -e .` both run this; `python setup.py gen_protos` runs it alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from setuptools import Command, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_stubs() -> None:
    """Run grpc_tools.protoc over every .proto under protos/ into the source tree."""
    from grpc_tools import protoc  # imported here: a build-time dependency only

    include = str(Path(protoc.__file__).parent / "_proto")
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    args = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


class GenProtos(Command):
    """`python setup.py gen_protos`: regenerate the stubs."""

    user_options: ClassVar[list[tuple[str, str | None, str]]] = []

    def initialize_options(self) -> None:
        """No options."""

    def finalize_options(self) -> None:
        """No options."""

    def run(self) -> None:
        """Generate."""
        generate_stubs()


class BuildPyWithProtos(build_py):
    """build_py that generates the stubs first."""

    def run(self) -> None:
        """Generate, then build as usual."""
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos, "gen_protos": GenProtos})
