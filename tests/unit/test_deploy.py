"""Deployment artefacts, checked offline: Dockerfile, build context, wheel, k8s manifests.

Docker cannot run here, so the images are not built; everything around them is checked:
hadolint, the build context that `.dockerignore` leaves, the entry points the images run,
and the wheel every image installs (generated stubs, the vLLM plugin entry point). Every
Kustomize target is rendered with `kubectl kustomize` and validated strictly
(scripts/k8s_check.py), then its deployment rules are asserted one by one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
PYTHON = sys.executable
BIN = Path(PYTHON).parent

Doc = dict[str, Any]


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tool(name: str) -> str:
    """Path of a command-line tool from the venv or PATH; skip with the reason if absent."""
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (see docs/deploy.md, 'Checking offline')")
    return str(path)


k8s_check = load_script("k8s_check")
check_image = load_script("check_image")
kv_sizing = load_script("kv_sizing")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    """Every Kustomize target, rendered once."""
    tool("kubectl")
    return {target: k8s_check.render(K8S / target) for target in k8s_check.TARGETS}


@pytest.fixture(scope="module")
def prod(rendered: dict[str, list[Doc]]) -> list[Doc]:
    """The rocm-prod overlay."""
    return rendered["overlays/rocm-prod"]


@pytest.fixture(scope="module")
def dev(rendered: dict[str, list[Doc]]) -> list[Doc]:
    """The cpu-dev overlay."""
    return rendered["overlays/cpu-dev"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel every image installs, built as the Dockerfile does: from the build context.

    Only the files `.dockerignore` lets through are copied (no generated stubs), so the
    stubs in the wheel prove the build generates them; the work tree is left untouched.
    """
    src = tmp_path_factory.mktemp("context")
    for rel in build_context():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return check_image.find_wheel(out)  # type: ignore[no-any-return]


def name_of(doc: Doc) -> str:
    """``Kind/name``."""
    return f"{doc['kind']}/{doc['metadata']['name']}"


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    """The object of ``kind`` called ``name``."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(docs: list[Doc], deployment: str) -> Doc:
    """The first app container of a Deployment."""
    spec = one(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    return spec["containers"][0]  # type: ignore[no-any-return]


def pod_spec(docs: list[Doc], kind: str, name: str) -> Doc:
    """The pod template spec of a workload."""
    return one(docs, kind, name)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def config_data(docs: list[Doc], prefix: str) -> dict[str, str]:
    """Data of the (hash-suffixed) ConfigMap whose name starts with ``prefix``."""
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"][:-11] == prefix]
    assert len(maps) == 1, prefix
    return maps[0]["data"]  # type: ignore[no-any-return]


def literal_env(docs: list[Doc], deployment: str) -> dict[str, str]:
    """The container's environment from envFrom ConfigMaps and literal env values."""
    box = container(docs, deployment)
    env: dict[str, str] = {}
    for source in box.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(next(d["data"] for d in docs if d["metadata"]["name"] == name))
    env.update({v["name"]: v["value"] for v in box.get("env", []) if "value" in v})
    return env


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """Whether a matchLabels selector selects an object with ``labels``."""
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pod_labels(docs: list[Doc], kind: str, name: str) -> dict[str, str]:
    """Labels of a workload's pods."""
    return one(docs, kind, name)["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]


def named_ports(box: Doc) -> dict[str, int]:
    """A container's ports by name."""
    return {p["name"]: p["containerPort"] for p in box.get("ports", []) if "name" in p}


def ingress_rules(docs: list[Doc], labels: dict[str, str]) -> list[Doc]:
    """Ingress rules of the NetworkPolicies selecting pods with ``labels`` (deny-all aside)."""
    return [
        rule
        for policy in docs
        if policy["kind"] == "NetworkPolicy"
        and policy["spec"]["podSelector"]
        and selects(policy["spec"]["podSelector"], labels)
        for rule in policy["spec"].get("ingress", [])
    ]


def rule_ports(rule: Doc) -> set[int]:
    """TCP ports a NetworkPolicy rule opens."""
    return {p["port"] for p in rule["ports"] if p.get("protocol", "TCP") == "TCP"}


def component_overlay(tmp_path: Path, components: list[str], name: str = "overlay") -> Path:
    """An overlay of the base with ``components`` (k8s/components/<name>), in its namespace."""
    overlay = tmp_path / name
    overlay.mkdir()
    rel = os.path.relpath(K8S, overlay)
    listed = ", ".join(f"{rel}/components/{c}" for c in components)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"namespace: qwen-serve-test\nresources: [{rel}/base]\ncomponents: [{listed}]\n"
    )
    tool("kubectl")
    return overlay


def seconds(duration: str) -> float:
    """A Prometheus duration (1m30s, 500ms...) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|[smhdwy])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


# Seconds a process needs after its drain grace to stop: the router closes Redis and
# exits; the worker aborts leftovers, flushes replies, leaves Redis and shuts the engine
# down (engine core and tensor-parallel processes).
SHUTDOWN_MARGIN_S = {"qwen-serve-router": 10, "qwen-serve-worker": 30}
METRICS_PORT = 9400
HTTP_PORT = 8000
PROMETHEUS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}


# ----------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("target", k8s_check.TARGETS)
def test_every_target_validates_strictly(rendered: dict[str, list[Doc]], target: str) -> None:
    """kubernetes-validate --strict (two versions) and our custom-kind schemas: no problem."""
    docs = rendered[target]
    assert docs
    assert k8s_check.validate(docs) == []


@pytest.mark.parametrize("target", k8s_check.TARGETS)
def test_every_target_keeps_the_deployment_rules(
    rendered: dict[str, list[Doc]], target: str
) -> None:
    """Requests and limits everywhere, no privileged/host access, probes, grace > drain."""
    assert k8s_check.policy_problems(rendered[target]) == []


def test_policy_check_catches_violations(prod: list[Doc]) -> None:
    """The rule checker is not vacuous: break each rule once and see it reported."""
    broken = json.loads(json.dumps(prod))
    spec = pod_spec(broken, "Deployment", "qwen-serve-worker")
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    spec["containers"][0]["securityContext"]["privileged"] = True
    spec["terminationGracePeriodSeconds"] = 30
    del spec["containers"][0]["resources"]["limits"]["memory"]
    router = pod_spec(broken, "Deployment", "qwen-serve-router")
    router["terminationGracePeriodSeconds"] = 30  # == its drain grace: no shutdown margin
    problems = "\n".join(k8s_check.policy_problems(broken))
    for expected in ("hostPath", "privileged", "QS_DRAIN_GRACE_S", "no memory in resources.limits"):
        assert expected in problems
    assert "qwen-serve-router: terminationGracePeriodSeconds 30 < QS_DRAIN_GRACE_S 30" in problems


def test_keda_schema_rejects_unknown_fields(prod: list[Doc]) -> None:
    """The KEDA ScaledObject is checked by a schema, and that schema is strict."""
    scaled = one(prod, "ScaledObject", "qwen-serve-worker")
    assert k8s_check.validate_custom(scaled) == []
    typo = json.loads(json.dumps(scaled))
    typo["spec"]["triggers"][0]["metadata"]["lagcount"] = "3"
    assert "lagcount" in "".join(k8s_check.validate_custom(typo))
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert "no schema" in "".join(k8s_check.validate([unknown]))


def test_worker_gets_four_gpus_shm_and_the_weights_volume(prod: list[Doc]) -> None:
    """TP 4: four AMD GPUs, memory-backed /dev/shm, weights read-only from the PVC."""
    spec = pod_spec(prod, "Deployment", "qwen-serve-worker")
    box = spec["containers"][0]
    assert box["resources"]["limits"]["amd.com/gpu"] == 4
    assert box["resources"]["requests"]["amd.com/gpu"] == 4
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in box["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    models = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert mounts["/models"]["readOnly"] is True
    one(prod, "PersistentVolumeClaim", models)
    assert box["args"][:2] == ["--profile", "rocm-tp4"]
    assert literal_env(prod, "qwen-serve-worker")["HF_HUB_OFFLINE"] == "1"
    assert spec["securityContext"]["supplementalGroups"], "GPU device groups (video, render)"


def test_worker_manifest_resolves_to_the_model_card_settings(
    prod: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's flags and environment give the rocm-tp4 engine arguments."""
    from qwen_serve.settings import WorkerSettings
    from worker.__main__ import parse_args
    from worker.profiles import Overrides, resolve

    for key, value in literal_env(prod, "qwen-serve-worker").items():
        monkeypatch.setenv(key, value)
    settings = parse_args(container(prod, "qwen-serve-worker")["args"])
    args = resolve(settings.profile, Overrides.from_settings(settings)).engine_args
    assert isinstance(settings, WorkerSettings)
    assert args["tensor_parallel_size"] == 4
    assert args["dtype"] == "float16"
    assert args["gpu_memory_utilization"] == 0.95
    assert args["max_model_len"] == 256000
    assert args["limit_mm_per_prompt"] == {"image": 2}
    assert args["skip_mm_profiling"] is True
    assert args["model"] == "/models/Qwen3.5-35B-A3B-GPTQ-8bit"
    assert args["max_num_seqs"] == settings.capacity == 128
    assert settings.drain_grace_s == 300


@pytest.mark.parametrize("deployment", ["qwen-serve-router", "qwen-serve-worker"])
def test_every_qs_variable_is_a_setting(prod: list[Doc], deployment: str) -> None:
    """QS_* names in the manifests are real settings (pydantic ignores unknown ones)."""
    from qwen_serve.settings import RouterSettings, WorkerSettings

    model = RouterSettings if deployment.endswith("router") else WorkerSettings
    # Read elsewhere: QS_LOG_LEVEL by qwen_serve/telemetry.py; QS_REDIS_ADDRESS by the
    # manifests themselves (REDIS_URL) and KEDA.
    outside = {"QS_LOG_LEVEL", "QS_REDIS_ADDRESS"}
    fields = {f"QS_{name.upper()}" for name in model.model_fields} | outside
    names = {n for n in literal_env(prod, deployment) if n.startswith("QS_")}
    assert names and names <= fields, names - fields


def test_worker_probes_run_worker_probe(prod: list[Doc]) -> None:
    """Exec probes call `python -m worker.probe live|ready`; start-up allows a 40 GB load."""
    box = container(prod, "qwen-serve-worker")
    assert box["startupProbe"]["exec"]["command"] == ["python3", "-m", "worker.probe", "live"]
    assert box["livenessProbe"]["exec"]["command"] == ["python3", "-m", "worker.probe", "live"]
    assert box["readinessProbe"]["exec"]["command"] == ["python3", "-m", "worker.probe", "ready"]
    startup = box["startupProbe"]["periodSeconds"] * box["startupProbe"]["failureThreshold"]
    read_40gb_at_100mb_s = 40e9 / 100e6
    warm_up = 10 * 60
    assert startup >= read_40gb_at_100mb_s + warm_up


def test_worker_probe_command_reads_the_status_file(tmp_path: Path) -> None:
    """The probe command of the manifests works: live vs ready on a real status file."""
    from worker.probe import write_status

    status = tmp_path / "status.json"
    env = {**os.environ, "QS_STATUS_FILE": str(status)}
    write_status(str(status), engine_ok=True, redis_ok=False, draining=False)

    def probe(kind: str) -> int:
        command = [PYTHON, "-m", "worker.probe", kind]
        return subprocess.run(command, env=env, capture_output=True, cwd=ROOT).returncode

    started = time.monotonic()
    assert probe("live") == 0
    assert time.monotonic() - started < 5
    assert probe("ready") == 1


def test_workers_on_one_host_write_separate_status_files(tmp_path: Path) -> None:
    """The default status file is per worker, and the probe finds the right one."""
    from qwen_serve.settings import WorkerSettings
    from worker.probe import status_path, write_status

    env = {k: v for k, v in os.environ.items() if not k.startswith("QS_")}
    env["TMPDIR"] = str(tmp_path)  # tempfile.gettempdir() of the probe

    def probe(kind: str, **extra: str) -> int:
        command = [PYTHON, "-m", "worker.probe", kind]
        return subprocess.run(
            command, env={**env, **extra}, capture_output=True, cwd=ROOT
        ).returncode

    assert probe("live") == 1  # no worker wrote a status yet
    paths = {
        wid: status_path(WorkerSettings(worker_id=wid)).name for wid in ("worker-a", "worker-b")
    }
    assert len(set(paths.values())) == 2
    directory = tmp_path / "qwen-serve-workers"
    write_status(directory / paths["worker-a"], engine_ok=True, redis_ok=True, draining=False)
    write_status(directory / paths["worker-b"], engine_ok=True, redis_ok=True, draining=True)
    assert probe("ready", QS_WORKER_ID="worker-a") == 0
    assert probe("ready", QS_WORKER_ID="worker-b") == 1
    assert probe("live", QS_WORKER_ID="worker-b") == 0
    assert probe("ready") == 1  # the freshest file: worker-b's (one worker per container)


def test_router_probes_use_the_health_services(prod: list[Doc]) -> None:
    """Native gRPC probes: liveness on `liveness`, readiness on the Inference service."""
    from router.health import INFERENCE, LIVENESS

    box = container(prod, "qwen-serve-router")
    assert box["livenessProbe"]["grpc"] == {"port": 50051, "service": LIVENESS}
    assert box["startupProbe"]["grpc"] == {"port": 50051, "service": LIVENESS}
    assert box["readinessProbe"]["grpc"] == {"port": 50051, "service": INFERENCE}
    assert literal_env(prod, "qwen-serve-router")["QS_LISTEN"].endswith(":50051")


def test_router_serves_the_openai_http_api(prod: list[Doc]) -> None:
    """QS_HTTP_LISTEN binds the container's `http` port; the policy lets clients reach it."""
    from qwen_serve.settings import RouterSettings
    from router.openai.server import split_listen

    listen = literal_env(prod, "qwen-serve-router")["QS_HTTP_LISTEN"]
    setting = RouterSettings.model_validate({"http_listen": listen}).http_listen
    assert setting is not None and split_listen(setting) == (None, HTTP_PORT)
    assert named_ports(container(prod, "qwen-serve-router"))["http"] == HTTP_PORT
    router = ingress_rules(prod, pod_labels(prod, "Deployment", "qwen-serve-router"))
    assert any(HTTP_PORT in rule_ports(r) for r in router if "from" not in r)


def test_router_service_hpa_and_pdbs(prod: list[Doc]) -> None:
    """Service speaks gRPC to the router pods; HPA and PDBs select the right pods."""
    router = pod_labels(prod, "Deployment", "qwen-serve-router")
    worker = pod_labels(prod, "Deployment", "qwen-serve-worker")
    for name in ("qwen-serve-router", "qwen-serve-router-headless"):
        service = one(prod, "Service", name)
        assert service["spec"]["ports"][0]["appProtocol"] == "grpc"
        assert service["spec"]["ports"][0]["port"] == 50051
        http = {p["name"]: p for p in service["spec"]["ports"]}["http"]
        assert (http["port"], http["targetPort"], http["appProtocol"]) == (8000, "http", "http")
        assert selects({"matchLabels": service["spec"]["selector"]}, router)
    hpa = one(prod, "HorizontalPodAutoscaler", "qwen-serve-router")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "qwen-serve-router"
    assert hpa["spec"]["minReplicas"] >= 2
    router_pdb = one(prod, "PodDisruptionBudget", "qwen-serve-router")["spec"]["selector"]
    worker_pdb = one(prod, "PodDisruptionBudget", "qwen-serve-worker")["spec"]["selector"]
    assert selects(router_pdb, router) and not selects(router_pdb, worker)
    assert selects(worker_pdb, worker) and not selects(worker_pdb, router)
    for name in ("qwen-serve-router", "qwen-serve-worker"):
        assert "replicas" not in one(prod, "Deployment", name)["spec"], "autoscaled"


@pytest.mark.parametrize("overlay", ["overlays/rocm-prod", "overlays/nvidia", "overlays/cpu-dev"])
def test_grace_period_covers_drain_and_shutdown(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    """terminationGracePeriodSeconds >= QS_DRAIN_GRACE_S + the process's shutdown margin.

    A full drain uses the whole drain grace; what the process does after it (the worker
    shuts a tensor-parallel engine down) must fit before the kubelet's SIGKILL.
    """
    docs = rendered[overlay]
    for name, margin in SHUTDOWN_MARGIN_S.items():
        grace = pod_spec(docs, "Deployment", name)["terminationGracePeriodSeconds"]
        drain = float(literal_env(docs, name)["QS_DRAIN_GRACE_S"])
        assert drain > 0 and grace >= drain + margin, (name, grace, drain)
    assert min(SHUTDOWN_MARGIN_S.values()) >= k8s_check.SHUTDOWN_MARGIN_S


def test_only_routers_workers_and_keda_reach_redis(prod: list[Doc]) -> None:
    """Default-deny ingress; Redis ingress only from router and worker pods (and KEDA)."""
    redis = pod_labels(prod, "StatefulSet", "qwen-serve-redis")
    allowed = [pod_labels(prod, "Deployment", f"qwen-serve-{n}") for n in ("router", "worker")]
    others = [pod_labels(prod, "Deployment", "qwen-serve-otel-collector")]
    policies = [d for d in prod if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"]
    peers = [
        peer
        for policy in policies
        if policy["spec"]["podSelector"] and selects(policy["spec"]["podSelector"], redis)
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
    ]
    same_namespace = [p["podSelector"] for p in peers if "namespaceSelector" not in p]
    assert all(any(selects(s, labels) for s in same_namespace) for labels in allowed)
    assert not any(selects(s, labels) for s in same_namespace for labels in others)
    keda = [p for p in peers if "namespaceSelector" in p]
    assert [p["namespaceSelector"]["matchLabels"] for p in keda] == [
        {"kubernetes.io/metadata.name": "keda"}
    ]


def test_keda_scales_workers_on_the_jobs_stream(prod: list[Doc]) -> None:
    """ScaledObject: worker Deployment, group `workers`, the lag of every job stream
    (one per priority) + in-flight."""
    from qwen_serve.queue.keys import WORKER_GROUP, Keys

    scaled = one(prod, "ScaledObject", "qwen-serve-worker")["spec"]
    env = literal_env(prod, "qwen-serve-worker")
    assert scaled["scaleTargetRef"]["name"] == "qwen-serve-worker"
    assert scaled["minReplicaCount"] >= 1
    triggers = {t["name"]: t for t in scaled["triggers"]}
    assert set(triggers) == {"queue-lag", "queue-lag-high", "queue-lag-low", "in-flight"}
    keys = Keys(env["QS_KEY_PREFIX"])
    lagged = {t["metadata"]["stream"] for n, t in triggers.items() if n.startswith("queue-lag")}
    assert lagged == set(keys.job_streams)
    for trigger in triggers.values():
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["stream"] in keys.job_streams
        assert meta["consumerGroup"] == WORKER_GROUP
        assert env[meta["addressFromEnv"]] == "qwen-serve-redis:6379"
        auth = one(prod, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert auth["spec"]["secretTargetRef"][0]["name"] == "qwen-serve-redis"
    assert int(triggers["queue-lag"]["metadata"]["lagCount"]) > 0
    in_flight = int(triggers["in-flight"]["metadata"]["pendingEntriesCount"])
    assert 0 < in_flight < int(env["QS_CAPACITY"])


def test_redis_persists_and_authenticates(prod: list[Doc]) -> None:
    """StatefulSet with a PVC, password from the Secret, AOF and no eviction."""
    redis = one(prod, "StatefulSet", "qwen-serve-redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    box = redis["spec"]["template"]["spec"]["containers"][0]
    secret = {v["name"]: v["valueFrom"]["secretKeyRef"]["name"] for v in box["env"]}
    assert secret["REDIS_PASSWORD"] == "qwen-serve-redis"
    assert '--requirepass "$REDIS_PASSWORD"' in box["command"][-1]
    conf = config_data(prod, "qwen-serve-redis-config")["redis.conf"]
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)
    for name in ("qwen-serve-router", "qwen-serve-worker"):
        env = {v["name"]: v for v in container(prod, name)["env"]}
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "qwen-serve-redis"
        assert env["REDIS_URL"]["value"].startswith("redis://:$(REDIS_PASSWORD)@")


def test_cpu_dev_runs_the_tiny_model_without_gpus(dev: list[Doc]) -> None:
    """cpu-dev: tiny model built by an init container, cpu-tiny profile, no GPU, no KEDA."""
    resources = [
        box["resources"]
        for doc in dev
        if (spec := k8s_check.pod_spec(doc))
        for box in k8s_check.containers(spec)
    ]
    assert resources and "amd.com/gpu" not in json.dumps(resources)
    spec = pod_spec(dev, "Deployment", "qwen-serve-worker")
    init = spec["initContainers"][0]
    assert init["command"] == ["python", "-m", "worker.tiny_model", "--out", "/models/tiny"]
    assert spec["containers"][0]["args"] == ["--profile", "cpu-tiny", "--model", "/models/tiny"]
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    assert set(models) == {"name", "emptyDir"}
    kinds = {d["kind"] for d in dev}
    assert not kinds & {"ScaledObject", "TriggerAuthentication", "PersistentVolumeClaim"}
    assert one(dev, "Secret", "qwen-serve-redis")["type"] == "Opaque"


def test_external_redis_component(tmp_path: Path) -> None:
    """The external-redis component drops the in-cluster Redis; REDIS_URL comes from the Secret."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(K8S, overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{rel}/base]\n"
        f"components: [{rel}/components/keda, {rel}/components/external-redis]\n"
    )
    tool("kubectl")
    docs = k8s_check.render(overlay)
    assert k8s_check.validate(docs) == []
    assert k8s_check.policy_problems(docs) == []
    redis = {name_of(d) for d in docs if "redis" in d["metadata"]["name"]}
    assert redis == {"TriggerAuthentication/qwen-serve-redis"}
    from_secret = {"secretKeyRef": {"key": "url", "name": "qwen-serve-redis"}}
    for name in ("qwen-serve-router", "qwen-serve-worker"):
        url = next(v for v in container(docs, name)["env"] if v["name"] == "REDIS_URL")
        assert url == {"name": "REDIS_URL", "valueFrom": from_secret}


def test_redis_sentinel_component(tmp_path: Path) -> None:
    """Three Redis pods with a Sentinel each; routers, workers and KEDA go through the
    Sentinels with a Sentinel URL our settings parse; no Service spreads clients over
    primary and replicas."""
    from qwen_serve.queue.connection import parse_sentinel_url

    docs = k8s_check.render(component_overlay(tmp_path, ["keda", "redis-sentinel"]))
    assert k8s_check.validate(docs) == []
    assert k8s_check.policy_problems(docs) == []
    redis = one(docs, "StatefulSet", "qwen-serve-redis")
    assert redis["spec"]["replicas"] == 3
    boxes = {c["name"]: c for c in redis["spec"]["template"]["spec"]["containers"]}
    assert set(boxes) == {"redis", "sentinel"}
    assert boxes["sentinel"]["ports"] == [
        {"name": "sentinel", "containerPort": 26379, "protocol": "TCP"}
    ]
    services = {name_of(d) for d in docs if d["kind"] == "Service"}
    assert "Service/qwen-serve-redis" not in services
    assert one(docs, "Service", "qwen-serve-redis-headless")["spec"]["publishNotReadyAddresses"]
    config = next(
        d["data"] for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("qwen-serve-config")
    )  # fmt: skip
    for name in ("qwen-serve-router", "qwen-serve-worker"):
        env = {v["name"]: v for v in container(docs, name)["env"]}
        url = env["REDIS_URL"]["value"]
        for var, value in (("REDIS_PASSWORD", "0f" * 16), *config.items()):
            url = url.replace(f"$({var})", value)
        parsed = parse_sentinel_url(url)
        assert len(parsed.sentinels) == 3 and parsed.service == "qwen-serve"
        assert env["QS_REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    scaled = one(docs, "ScaledObject", "qwen-serve-worker")
    assert {t["type"] for t in scaled["spec"]["triggers"]} == {"redis-sentinel-streams"}
    assert one(docs, "PodDisruptionBudget", "qwen-serve-redis")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", ["overlays/rocm-prod", "overlays/nvidia", "overlays/cpu-dev"])
def test_routers_and_workers_serve_metrics(rendered: dict[str, list[Doc]], overlay: str) -> None:
    """QS_METRICS_PORT is set and is the container port `metrics` of router and worker."""
    from qwen_serve.settings import RouterSettings, WorkerSettings

    docs = rendered[overlay]
    for name, model in (
        ("qwen-serve-router", RouterSettings),
        ("qwen-serve-worker", WorkerSettings),
    ):
        value = literal_env(docs, name)["QS_METRICS_PORT"]
        assert model.model_validate({"metrics_port": value}).metrics_port == METRICS_PORT
        ports = named_ports(container(docs, name))
        assert ports["metrics"] == METRICS_PORT
        assert len(set(ports.values())) == len(ports), ports


def test_only_prometheus_reaches_the_metrics_port(prod: list[Doc]) -> None:
    """Ingress to 9400 only from Prometheus (namespace monitoring); workers take nothing else."""
    router = ingress_rules(prod, pod_labels(prod, "Deployment", "qwen-serve-router"))
    worker = ingress_rules(prod, pod_labels(prod, "Deployment", "qwen-serve-worker"))
    for rules in (router, worker):
        to_metrics = [r for r in rules if METRICS_PORT in rule_ports(r)]
        assert to_metrics and all(r["from"] == [PROMETHEUS] for r in to_metrics), to_metrics
    assert worker == [{"from": [PROMETHEUS], "ports": [{"port": METRICS_PORT, "protocol": "TCP"}]}]
    assert [rule_ports(r) for r in router if "from" not in r] == [{50051, HTTP_PORT}]
    others = [pod_labels(prod, "StatefulSet", "qwen-serve-redis")]
    others.append(pod_labels(prod, "Deployment", "qwen-serve-otel-collector"))
    for labels in others:
        assert all(PROMETHEUS not in r.get("from", []) for r in ingress_rules(prod, labels))


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """The base with the keda and prometheus components."""
    overlay = component_overlay(tmp_path_factory.mktemp("monitored"), ["keda", "prometheus"])
    docs: list[Doc] = k8s_check.render(overlay)
    return docs


def test_prometheus_component_scrapes_routers_and_workers(monitored: list[Doc]) -> None:
    """PodMonitors select each kind's pods and scrape its `metrics` port; all validates."""
    assert k8s_check.validate(monitored) == []
    assert k8s_check.policy_problems(monitored) == []
    kinds = ("router", "worker")
    for kind, other in (kinds, kinds[::-1]):
        name = f"qwen-serve-{kind}"
        monitor = one(monitored, "PodMonitor", name)
        deployment = one(monitored, "Deployment", name)
        spec = monitor["spec"]
        assert selects(spec["selector"], pod_labels(monitored, "Deployment", name))
        assert not selects(
            spec["selector"], pod_labels(monitored, "Deployment", f"qwen-serve-{other}")
        )
        # No namespaceSelector: the pods are looked for in the PodMonitor's own namespace.
        assert "namespaceSelector" not in spec
        assert monitor["metadata"]["namespace"] == deployment["metadata"]["namespace"]
        [endpoint] = spec["podMetricsEndpoints"]
        port = named_ports(container(monitored, name))[endpoint["port"]]
        assert port == int(literal_env(monitored, name)["QS_METRICS_PORT"]) == METRICS_PORT
        assert endpoint["path"] == "/metrics"
        assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])


def test_prometheus_component_ships_the_dashboard(monitored: list[Doc]) -> None:
    """The dashboard ConfigMap: fixed name, the sidecar's label, the one JSON file verbatim."""
    source = K8S / "dashboards" / "qwen-serve.json"
    dashboard = one(monitored, "ConfigMap", "qwen-serve-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "qwen-serve-test"
    assert dashboard["data"] == {"qwen-serve.json": source.read_text()}
    assert json.loads(dashboard["data"]["qwen-serve.json"])["uid"] == "qwen-serve"
    copies = [p for p in K8S.rglob("*.json") if '"schemaVersion"' in p.read_text()]
    assert copies == [source], "one source of the dashboard"


def test_podmonitor_schema_rejects_unknown_fields(monitored: list[Doc]) -> None:
    """The PodMonitor is checked by a schema in k8s/schemas, and that schema is strict."""
    monitor = one(monitored, "PodMonitor", "qwen-serve-worker")
    assert k8s_check.custom_schema_path(monitor).is_file()
    assert k8s_check.validate_custom(monitor) == []
    for path, key, value in (
        ((), "podMetricEndpoints", []),
        (("podMetricsEndpoints", 0), "interval", "15 seconds"),
        (("podMetricsEndpoints", 0), "scheme", "tcp"),
        (("podMetricsEndpoints", 0), "metricsPath", "/metrics"),
        (("selector",), "matchLabel", {}),
    ):
        broken = json.loads(json.dumps(monitor))
        node = broken["spec"]
        for step in path:
            node = node[step]
        node[key] = value
        assert k8s_check.validate_custom(broken), (path, key)
    del broken["spec"]["selector"]
    assert "selector" in "".join(k8s_check.validate_custom(broken))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """The base with the tls component."""
    docs: list[Doc] = k8s_check.render(component_overlay(tmp_path_factory.mktemp("tls"), ["tls"]))
    return docs


def test_tls_component_probes_the_plaintext_health_port(tls: list[Doc]) -> None:
    """TLS from the Secret; probes on QS_HEALTH_LISTEN's port with the base's services."""
    from qwen_serve.settings import RouterSettings
    from router.health import INFERENCE, LIVENESS

    assert k8s_check.validate(tls) == []
    assert k8s_check.policy_problems(tls) == []
    box = container(tls, "qwen-serve-router")
    env = literal_env(tls, "qwen-serve-router")
    ports = named_ports(box)
    health = int(env["QS_HEALTH_LISTEN"].rsplit(":", 1)[1])
    assert ports["health"] == health != ports["grpc"] == 50051
    assert env["QS_LISTEN"].endswith(f":{ports['grpc']}")
    assert box["startupProbe"]["grpc"] == {"port": health, "service": LIVENESS}
    assert box["livenessProbe"]["grpc"] == {"port": health, "service": LIVENESS}
    assert box["readinessProbe"]["grpc"] == {"port": health, "service": INFERENCE}
    # The certificate and key are the kubernetes.io/tls keys of the mounted Secret.
    volumes = {v["name"]: v for v in pod_spec(tls, "Deployment", "qwen-serve-router")["volumes"]}
    mounts = {m["name"]: m for m in box["volumeMounts"]}
    assert volumes["tls"]["secret"]["secretName"] == "qwen-serve-router-tls"
    assert mounts["tls"]["readOnly"] is True
    assert env["QS_TLS_CERT_FILE"] == f"{mounts['tls']['mountPath']}/tls.crt"
    assert env["QS_TLS_KEY_FILE"] == f"{mounts['tls']['mountPath']}/tls.key"
    assert volumes["tls"]["secret"]["defaultMode"] == 0o440
    # Nothing else changes: the Service still speaks to the gRPC port, metrics stay.
    service = one(tls, "Service", "qwen-serve-router")
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"
    assert ports["metrics"] == METRICS_PORT
    names = {n for n in env if n.startswith("QS_")}
    assert names <= {f"QS_{f.upper()}" for f in RouterSettings.model_fields} | {
        "QS_LOG_LEVEL",
        "QS_REDIS_ADDRESS",
    }


def test_tls_component_lets_the_kubelet_reach_the_health_port(tls: list[Doc]) -> None:
    """Probes come from the node: the health port is open to every source, like 50051."""
    health = named_ports(container(tls, "qwen-serve-router"))["health"]
    rules = ingress_rules(tls, pod_labels(tls, "Deployment", "qwen-serve-router"))
    assert [r for r in rules if "from" not in r and health in rule_ports(r)]
    # The worker's and Redis's policies are unchanged by it.
    worker = ingress_rules(tls, pod_labels(tls, "Deployment", "qwen-serve-worker"))
    assert all(rule_ports(r) == {METRICS_PORT} for r in worker)


def test_tls_and_mtls_settings_load_the_mounted_files(tmp_path: Path) -> None:
    """The router's own credentials code accepts the env of the manifests on Secret files."""
    from qwen_serve.settings import RouterSettings
    from router import security
    from tests.security_support import make_pki

    overlay = component_overlay(tmp_path, ["tls", "mtls"])
    docs = k8s_check.render(overlay)
    assert k8s_check.validate(docs) == []
    box = container(docs, "qwen-serve-router")
    pki = make_pki(tmp_path)
    volumes = {
        v["name"]: v["secret"]
        for v in pod_spec(docs, "Deployment", "qwen-serve-router")["volumes"]
        if "secret" in v
    }
    assert volumes["client-ca"]["secretName"] == "qwen-serve-router-client-ca"
    # Lay the Secrets out as the kubelet mounts them: one file per key under the mountPath.
    contents = {
        "tls": {"tls.crt": "server.crt", "tls.key": "server.key"},
        "client-ca": {"ca.crt": "ca.crt"},
    }
    root = tmp_path / "mounts"
    for mount in box["volumeMounts"]:
        if mount["name"] in contents:
            where = root / mount["mountPath"].lstrip("/")
            where.mkdir(parents=True)
            for key, source in contents[mount["name"]].items():
                (where / key).write_bytes(pki.pem(source))
    env = {
        k: str(root / v.lstrip("/")) if k.endswith("_FILE") else v
        for k, v in literal_env(docs, "qwen-serve-router").items()
        if k.startswith("QS_TLS_")
    }
    assert set(env) == {"QS_TLS_CERT_FILE", "QS_TLS_KEY_FILE", "QS_TLS_CLIENT_CA_FILE"}
    settings = RouterSettings.model_validate(
        {k.removeprefix("QS_").lower(): v for k, v in env.items()}
    )
    assert security.server_credentials(settings) is not None
    without_ca = settings.model_copy(update={"tls_client_ca_file": None})
    assert security.server_credentials(without_ca) is not None


def test_all_components_together(tmp_path: Path) -> None:
    """Every component on the base at once: valid, rules kept, yamllint clean."""
    overlay = component_overlay(
        tmp_path, ["keda", "prometheus", "tls", "mtls", "external-redis"], "everything"
    )
    docs = k8s_check.render(overlay)
    assert k8s_check.validate(docs) == []
    assert k8s_check.policy_problems(docs) == []
    assert {"PodMonitor", "ScaledObject", "TriggerAuthentication"} <= {d["kind"] for d in docs}
    # Lint as rendered, except the dashboard's ConfigMap: its data is the JSON file, whose
    # PromQL strings make lines longer than yamllint's limit.
    rendered = k8s_check.render_text(overlay).split("\n---\n")
    kept = [text for text in rendered if "name: qwen-serve-dashboard\n" not in text]
    assert len(kept) == len(rendered) - 1
    out = tmp_path / "everything.yaml"
    out.write_text("\n---\n".join(kept))
    yamllint = tool("yamllint")
    config = str(K8S / ".yamllint.yaml")
    result = subprocess.run(
        [yamllint, "--strict", "-c", config, str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_otel_collector_config_is_consistent(prod: list[Doc]) -> None:
    """Every pipeline names defined components; apps export to the collector's port."""
    config = yaml.safe_load(config_data(prod, "qwen-serve-otel-collector-config")["config.yaml"])
    pipelines = config["service"]["pipelines"]
    assert {"traces", "metrics", "logs"} <= set(pipelines)
    for pipeline in pipelines.values():
        for section in ("receivers", "processors", "exporters"):
            assert set(pipeline[section]) <= set(config[section])
    assert config["service"]["extensions"] == ["health_check"]
    endpoint = literal_env(prod, "qwen-serve-router")["OTEL_EXPORTER_OTLP_ENDPOINT"]
    service = one(prod, "Service", "qwen-serve-otel-collector")
    ports = {p["port"] for p in service["spec"]["ports"]}
    assert endpoint == f"http://qwen-serve-otel-collector:{4317}" and 4317 in ports
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")


def test_yamllint(rendered: dict[str, list[Doc]], tmp_path: Path) -> None:
    """The k8s/ sources and every rendered target pass yamllint."""
    yamllint = tool("yamllint")
    for target in k8s_check.TARGETS:
        out = tmp_path / f"{target.replace('/', '_')}.yaml"
        out.write_text(k8s_check.render_text(K8S / target))
    config = str(K8S / ".yamllint.yaml")
    result = subprocess.run(
        [yamllint, "--strict", "-c", config, str(K8S), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


# ----------------------------------------------------------------------------- Docker


def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions of each named stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I):
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def test_hadolint() -> None:
    """hadolint reports nothing, not even style notes."""
    hadolint = tool("hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout


def test_dockerfile_targets_are_pinned_non_root_labelled_and_checked() -> None:
    """router, worker, worker-cpu: non-root, HEALTHCHECK, OCI labels, pinned worker base."""
    stages = dockerfile_stages()
    assert {"router", "worker", "worker-cpu"} <= set(stages)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M))
    rocm = args["VLLM_ROCM_IMAGE"]
    assert ":" in rocm and not rocm.endswith(":latest") and "vllm" in rocm.split(":")[1]
    assert stages["worker"][0].startswith("FROM ${VLLM_ROCM_IMAGE}")
    for name in ("router", "worker", "worker-cpu"):
        text = "\n".join(stages[name])
        assert re.search(r"^USER 10001", text, re.M), name
        assert "HEALTHCHECK" in text and "org.opencontainers.image.version" in text, name
    router = "\n".join(stages["router"] + stages["router-venv"])
    assert "qs-check-image router-env" in router
    assert "worker.probe" in "\n".join(stages["worker"])
    assert "qs-check-image worker-env" in "\n".join(stages["worker"])


@pytest.mark.parametrize("module", ["router", "worker", "worker.probe", "worker.tiny_model"])
def test_image_entrypoints_start(module: str) -> None:
    """The modules the images and probes run import and parse their flags."""
    result = subprocess.run([PYTHON, "-m", module, "--help"], capture_output=True, cwd=ROOT)
    assert result.returncode in (0, 2) and b"usage" in (result.stdout + result.stderr).lower()


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker's pattern matcher reads it (`**`, `*`, `?`, `[]`)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            close = pattern.index("]", i)
            out, i = out + pattern[i : close + 1], close + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(f"^{out}$")


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = dockerignore_regex(raw.lstrip("!").strip("/"))
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def work_tree_files() -> Iterator[str]:
    """Every file under the repository (tracked or not), relative, including .git/.venv."""
    for dirpath, dirnames, filenames in os.walk(ROOT, followlinks=False):
        rel = os.path.relpath(dirpath, ROOT)
        if rel in (".git", ".venv") or rel.startswith((".git/", ".venv/")):
            dirnames[:] = []
            yield f"{rel}/x"
            continue
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            yield os.path.normpath(os.path.join(rel, name))


def dockerignore_patterns() -> list[str]:
    """The patterns of .dockerignore, in order."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def build_context() -> set[str]:
    """Files of the work tree that `docker build .` sends."""
    patterns = dockerignore_patterns()
    return {f for f in work_tree_files() if not dockerignore_excludes(patterns, f)}


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore leaves every COPY source in and .git, .venv, tests, stubs out."""
    patterns = dockerignore_patterns()
    context = build_context()
    sources = {
        src
        for stage in dockerfile_stages().values()
        for line in stage
        if line.startswith("COPY ") and "--from=" not in line
        for src in line.split()[1:-1]
    }
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(f == source or f.startswith(f"{source}/") for f in context), source
    assert "protos/qwen_serve/api/v1/serve.proto" in context
    assert "worker/assets/chat_template.jinja" in context
    for path in (
        ".git/x",
        ".venv/x",
        "tests/unit/test_deploy.py",
        "docs/deploy.md",
        "k8s/README.md",
    ):
        assert dockerignore_excludes(patterns, path), path
    assert not [f for f in context if "_pb2" in f or "__pycache__" in f]


def test_wheel_has_stubs_and_plugin_entry_point(wheel: Path) -> None:
    """The built wheel holds the generated stubs (not in git) and the vLLM plugin."""
    assert check_image.check_wheel(wheel) == []
    with zipfile.ZipFile(wheel) as archive:
        points = check_image.wheel_entry_points(archive)
    assert points["vllm.general_plugins"] == {
        "qwen_serve_config_fix": "worker.config_fix:register",
        "qwen_serve_vllm_fixes": "worker.vllm_fixes:register",
    }
    assert points["console_scripts"]["qwen-serve-worker"] == "worker.__main__:main"
    tracked = subprocess.run(
        ["git", "ls-files", "*_pb2*"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert tracked.stdout == ""


# ----------------------------------------------------------------------------- sizing


def test_sizing_uses_the_published_config() -> None:
    """The sizing's model shape equals transformers' Qwen3.5-MoE text config defaults."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3_5MoeTextConfig()
    shape = kv_sizing.ModelShape.from_config(config.to_dict())
    assert shape == kv_sizing.ModelShape()
    assert (shape.full_attention_layers, shape.linear_attention_layers) == (10, 30)


def test_sizing_numbers_are_the_ones_in_the_docs() -> None:
    """docs/deploy.md quotes scripts/kv_sizing.py's output verbatim."""
    report = kv_sizing.report(kv_sizing.ModelShape(), kv_sizing.Deployment())
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert report in docs
    shape, plan = kv_sizing.ModelShape(), kv_sizing.Deployment()
    assert kv_sizing.kv_bytes_per_token_model(shape) == 10 * 2 * 2 * 256 * 2
    assert kv_sizing.state_bytes_per_layer(shape, 1) == (8192 * 3 + 32 * 128 * 128) * 2
    assert kv_sizing.sequences_that_fit(shape, kv_sizing.GPUS[0], plan) == 68
    assert kv_sizing.sequences_that_fit(shape, kv_sizing.GPUS[1], plan) == 18
