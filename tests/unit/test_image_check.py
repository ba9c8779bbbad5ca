"""scripts/check_image.py's worker-env check: what the image build runs on the base image."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_deploy import check_image

ROOT = Path(__file__).resolve().parents[2]


def test_worker_env_passes_here() -> None:
    assert check_image.check_worker_env() == []


def test_every_worker_module_is_imported() -> None:
    modules = check_image.worker_modules()
    assert {"worker.__main__", "worker.engine", "worker.vllm_boundary", "worker.service"} <= set(
        modules
    )
    assert "worker.tiny_model" not in modules  # a development tool


def test_an_old_protobuf_in_the_base_image_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    real = check_image.version
    monkeypatch.setattr(
        check_image, "version", lambda name: "5.29.6" if name == "protobuf" else real(name)
    )
    (problem,) = check_image.check_stub_runtimes()
    needed = check_image.stub_requirements()["protobuf"]
    assert problem.startswith(f"protobuf 5.29.6 is older than {needed}")


def test_an_unsupported_vllm_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import vllm_boundary

    monkeypatch.setattr(vllm_boundary, "version_tuple", lambda version="": (0, 15))
    (problem,) = check_image.check_vllm_range()
    assert "outside the supported" in problem


def test_dependency_floors_are_the_stub_generators_versions() -> None:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([a-z-]+)>=([0-9.]+)", requirement.split(";")[0].strip())
        if match:
            floors[match.group(1)] = match.group(2)
    for package, needed in check_image.stub_requirements().items():
        assert floors[package] == needed, f"{package}: floor {floors[package]}, stubs {needed}"
    assert "vllm>=0.23,<0.33" in project["optional-dependencies"]["worker"]
