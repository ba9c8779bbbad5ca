"""Engine settings in the deployment: the nvidia overlay, the rocm-single-gpu component, the
patches docs/deploy.md shows, and what each resolves to in the worker.

Every variant is rendered with Kustomize and validated like the targets of test_deploy
(strict schemas, the deployment rules, yamllint); then the worker's own flag and settings
parsing turns its container into engine arguments, which are compared with the profile's
and checked against the installed vLLM's ``AsyncEngineArgs`` as the worker checks them at
start. No engine is started.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_deploy import (
    K8S,
    ROOT,
    Doc,
    container,
    k8s_check,
    literal_env,
    pod_spec,
    tool,
)

WORKER = "qwen-serve-worker"
ROUTER = "qwen-serve-router"
GPU_KEYS = ("amd.com/gpu", "nvidia.com/gpu")
# A patch in docs/deploy.md whose first line names the overlay file it is meant to be:
#   ```yaml
#   # k8s/overlays/rocm-prod/worker-engine.yaml (...)
DOC_PATCH = re.compile(r"```yaml\n# k8s/(overlays/[\w-]+)/([\w.-]+\.yaml)[^\n]*\n(.*?)```", re.S)


# ----------------------------------------------------------------------------- helpers


def overlay_on(tmp: Path, resource: str, components: list[str], patches: dict[str, str]) -> Path:
    """A kustomization in ``tmp`` of ``k8s/<resource>`` with components and patch files."""
    tmp.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(K8S, tmp)
    lines = [
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        f"resources: [{rel}/{resource}]",
    ]
    if components:
        lines.append(f"components: [{', '.join(f'{rel}/components/{c}' for c in components)}]")
    if patches:
        lines.append("patches:")
        for name, text in patches.items():
            (tmp / name).write_text(text)
            lines.append(f"  - path: {name}")
    (tmp / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return tmp


def doc_patches() -> list[tuple[str, str, str]]:
    """(overlay, file name, YAML) of every overlay patch docs/deploy.md shows."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    return [
        (m[1], m[2], m[0].split("\n", 1)[1].rsplit("```", 1)[0]) for m in DOC_PATCH.finditer(text)
    ]


def render_checked(target: Path) -> list[Doc]:
    """Render ``target``; it must validate, keep the rules and pass yamllint."""
    tool("kubectl")
    docs: list[Doc] = k8s_check.render(target)
    assert k8s_check.validate(docs) == []
    assert k8s_check.policy_problems(docs) == []
    out = target / "rendered.out.yaml"
    out.write_text(k8s_check.render_text(target))
    lint = subprocess.run(
        [tool("yamllint"), "--strict", "-c", str(K8S / ".yamllint.yaml"), str(out)],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout
    return docs


def worker_settings(docs: list[Doc], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The WorkerSettings the worker container parses: its args over its environment."""
    from worker.__main__ import parse_args

    with monkeypatch.context() as env:
        for key in [k for k in os.environ if k.startswith("QS_")]:
            env.delenv(key)
        for key, value in literal_env(docs, WORKER).items():
            env.setenv(key, value)
        return parse_args(container(docs, WORKER)["args"])


def resolved_worker(docs: list[Doc], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The worker's ResolvedProfile: profile, overrides and extra engine arguments."""
    from worker.profiles import Overrides, resolve

    settings = worker_settings(docs, monkeypatch)
    return resolve(settings.profile, Overrides.from_settings(settings))


def gpus(docs: list[Doc]) -> dict[str, tuple[int, int]]:
    """GPU resources of the worker container: name -> (request, limit)."""
    resources = container(docs, WORKER)["resources"]
    names = set(resources["requests"]) | set(resources["limits"])
    return {
        name: (resources["requests"].get(name), resources["limits"].get(name))
        for name in names
        if name.endswith("/gpu")
    }


def qs_names_are_settings(docs: list[Doc]) -> None:
    """QS_* names of router and worker are fields of their settings models."""
    from qwen_serve.settings import RouterSettings, WorkerSettings

    outside = {"QS_LOG_LEVEL", "QS_REDIS_ADDRESS"}  # telemetry.py; REDIS_URL and KEDA
    for name, model in ((ROUTER, RouterSettings), (WORKER, WorkerSettings)):
        fields = {f"QS_{field.upper()}" for field in model.model_fields} | outside
        names = {n for n in literal_env(docs, name) if n.startswith("QS_")}
        assert names and names <= fields, (name, names - fields)


@pytest.fixture
def flashinfer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """Pretend the flashinfer package is installed (param True) or missing (False)."""
    present: bool = request.param
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        if name == "flashinfer":
            return ModuleSpec("flashinfer", None) if present else None
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    yield present


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def nvidia() -> list[Doc]:
    """The nvidia overlay."""
    tool("kubectl")
    docs: list[Doc] = k8s_check.render(K8S / "overlays" / "nvidia")
    return docs


@pytest.fixture(scope="module")
def prod() -> list[Doc]:
    """The rocm-prod overlay."""
    tool("kubectl")
    docs: list[Doc] = k8s_check.render(K8S / "overlays" / "rocm-prod")
    return docs


@pytest.fixture(scope="module")
def single_gpu(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """rocm-prod with the rocm-single-gpu component, as its kustomization comments show."""
    tmp = tmp_path_factory.mktemp("single-gpu") / "overlay"
    return render_checked(overlay_on(tmp, "overlays/rocm-prod", ["rocm-single-gpu"], {}))


@pytest.fixture(scope="module")
def documented(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, list[Doc]]]:
    """Each patch of docs/deploy.md applied to its overlay: (patch file, rendered)."""
    out = []
    for index, (overlay, name, text) in enumerate(doc_patches()):
        tmp = tmp_path_factory.mktemp("documented") / f"patch{index}"
        out.append((name, render_checked(overlay_on(tmp, overlay, [], {name: text}))))
    return out


# ----------------------------------------------------------------------------- tests


def test_nvidia_overlay_is_listed_and_checked() -> None:
    """The overlay is one of the targets every check of test_deploy runs on."""
    assert "overlays/nvidia" in k8s_check.TARGETS


def test_nvidia_worker_gets_one_gpu_tolerations_and_the_weights(nvidia: list[Doc]) -> None:
    """One nvidia.com/gpu (no AMD GPU or device groups), its taint tolerated, weights PVC."""
    spec = pod_spec(nvidia, "Deployment", WORKER)
    box = spec["containers"][0]
    assert gpus(nvidia) == {"nvidia.com/gpu": (1, 1)}
    assert [t["key"] for t in spec["tolerations"]] == ["nvidia.com/gpu"]
    assert "supplementalGroups" not in spec["securityContext"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in box["volumeMounts"]}
    claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == "qwen-serve-models" and mounts["/models"]["readOnly"] is True
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    env = literal_env(nvidia, WORKER)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert not [name for name in env if name.startswith("MIOPEN_")]
    assert box["args"][:2] == ["--profile", "nvidia"]


@pytest.mark.parametrize("flashinfer", [False, True], indirect=True)
def test_nvidia_overlay_resolves_to_the_nvidia_profile(
    nvidia: list[Doc], monkeypatch: pytest.MonkeyPatch, flashinfer: bool
) -> None:
    """Every engine argument of the nvidia profile, plus the overlay's own settings.

    Without flashinfer the profile's Triton fallback (argument and sampler variable) is
    kept: the overlay's QS_ENGINE_ARGS adds to the profile, it does not replace it.
    """
    from worker.profiles import NVIDIA, engine_args

    resolved = resolved_worker(nvidia, monkeypatch)
    args = dict(resolved.engine_args)
    own = {"model", "max_num_seqs", "max_num_batched_tokens"}
    profile = engine_args(NVIDIA)
    assert resolved.name == NVIDIA
    assert {k: v for k, v in args.items() if k not in own} == {
        k: v for k, v in profile.items() if k != "model"
    }
    assert args["tensor_parallel_size"] == 1
    assert args["dtype"] == "float16"
    assert args["gpu_memory_utilization"] == 0.90
    assert args["max_model_len"] == 256000
    assert args["model"] == "/models/Qwen3.5-35B-A3B-GPTQ-8bit"
    assert args["max_num_seqs"] == 128
    assert args["max_num_batched_tokens"] == 8192
    fallback = not flashinfer
    assert (args.get("gdn_prefill_backend") == "triton") is fallback
    assert (resolved.env.get("VLLM_USE_FLASHINFER_SAMPLER") == "0") is fallback


@pytest.mark.parametrize("variant", ["rocm-prod", "nvidia", "rocm-single-gpu"])
def test_gpus_per_worker_equal_its_tensor_parallelism(
    variant: str,
    prod: list[Doc],
    nvidia: list[Doc],
    single_gpu: list[Doc],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPUs a worker asks for (request = limit) are the GPUs its engine spans."""
    docs = {"rocm-prod": prod, "nvidia": nvidia, "rocm-single-gpu": single_gpu}[variant]
    expected = {"rocm-prod": 4, "nvidia": 1, "rocm-single-gpu": 1}[variant]
    tp = resolved_worker(docs, monkeypatch).engine_args["tensor_parallel_size"]
    [(name, (request, limit))] = gpus(docs).items()
    assert name in GPU_KEYS
    assert request == limit == tp == expected


def test_rocm_single_gpu_keeps_the_model_card_settings(
    prod: list[Doc], single_gpu: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only tensor parallelism changes; the pod keeps rocm-prod's GPU groups and weights."""
    four = dict(resolved_worker(prod, monkeypatch).engine_args)
    one = dict(resolved_worker(single_gpu, monkeypatch).engine_args)
    assert four.pop("tensor_parallel_size") == 4
    assert one.pop("tensor_parallel_size") == 1
    assert one == four
    assert four["gpu_memory_utilization"] == 0.95 and four["dtype"] == "float16"
    spec = pod_spec(single_gpu, "Deployment", WORKER)
    assert spec["securityContext"]["supplementalGroups"] == [44, 110]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "qwen-serve-models"


def test_qs_variables_are_settings(nvidia: list[Doc], single_gpu: list[Doc]) -> None:
    """QS_* names of the new variants are real settings (pydantic ignores unknown ones)."""
    qs_names_are_settings(nvidia)
    qs_names_are_settings(single_gpu)


def test_docs_patches_render_and_take_effect(
    documented: list[tuple[str, list[Doc]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker patches docs/deploy.md shows render onto their overlay and set the engine."""
    assert documented, "docs/deploy.md shows an engine settings patch"
    for _name, docs in documented:
        qs_names_are_settings(docs)
        settings = worker_settings(docs, monkeypatch)
        args = resolved_worker(docs, monkeypatch).engine_args
        assert settings.engine_args, "the patch shows QS_ENGINE_ARGS"
        for key, value in settings.engine_args.items():
            assert args[key] == value, key


def test_manifests_pass_the_workers_start_check(
    prod: list[Doc],
    nvidia: list[Doc],
    single_gpu: list[Doc],
    documented: list[tuple[str, list[Doc]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine settings each variant sets pass the check the worker runs at start
    (names and values against the installed vLLM's AsyncEngineArgs)."""
    vb = pytest.importorskip("worker.vllm_boundary")
    variants = [prod, nvidia, single_gpu, *(docs for _name, docs in documented)]
    for docs in variants:
        resolved = resolved_worker(docs, monkeypatch)
        checked = vb.validate_engine_args(resolved.deployment_args)
        assert set(checked) == set(resolved.deployment_args)
    assert "max_num_batched_tokens" in resolved_worker(nvidia, monkeypatch).deployment_args


def test_docs_and_manifests_name_no_machine_paths() -> None:
    """k8s/, docs/ and the README name paths in the repo or in the images, not this
    machine's (a home directory, the workspace, a sibling checkout)."""
    machine = re.compile(r"(?<![\w.~])/(root|work|Users)/|\.\./shared\b|/home/(?!app\b)")
    files = [ROOT / "README.md", *(p for p in (ROOT / "docs").rglob("*") if p.is_file())]
    files += [p for p in K8S.rglob("*") if p.is_file()]
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in files
        if path.suffix in {".md", ".json", ".yaml", ".yml", ".conf", ".csv", ".txt"}
        for match in machine.finditer(path.read_text(errors="replace"))
    ]
    assert found == []


@pytest.mark.parametrize(("tp", "gpus_set", "utilization"), [(1, "amd", 0.95), (1, "nvidia", 0.90)])
def test_single_gpu_sizing_is_the_one_in_the_docs(
    tp: int, gpus_set: str, utilization: float
) -> None:
    """docs/deploy.md quotes scripts/kv_sizing.py's TP 1 tables verbatim."""
    from tests.unit.test_deploy import kv_sizing

    plan = kv_sizing.Deployment.for_tp(tp, utilization=utilization)
    report = kv_sizing.report(kv_sizing.ModelShape(), plan, kv_sizing.GPU_SETS[gpus_set])
    docs = (ROOT / "docs" / "deploy.md").read_text()
    lines, table = report.split("\n\n")
    assert lines in docs and table in docs
    assert kv_sizing.Deployment.for_tp(4) == kv_sizing.Deployment()
    fits = {
        g.name: kv_sizing.sequences_that_fit(kv_sizing.ModelShape(), g, plan)
        for g in kv_sizing.GPU_SETS[gpus_set]
    }
    assert fits == (
        {"MI300X": 27, "MI250 (one GCD)": 3} if gpus_set == "amd" else {"H100 80GB": 5, "H200": 16}
    )
