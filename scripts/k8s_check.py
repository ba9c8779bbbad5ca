#!/usr/bin/env python3
"""Render the Kustomize targets under k8s/ and check them offline.

    python scripts/k8s_check.py                  # every target, report only
    python scripts/k8s_check.py --out build/k8s  # also write one YAML file per target

Rendering uses ``kubectl kustomize`` (or a ``kustomize`` binary). Every rendered object is
validated strictly (unknown fields are errors): Kubernetes kinds with ``kubernetes-validate``
against each version in :data:`K8S_VERSIONS`; custom kinds (KEDA, Prometheus Operator)
against the JSON Schemas in ``k8s/schemas``. Then the deployment rules of
:func:`policy_problems` are checked. Exit 1 on any problem. ``tests/unit/test_deploy.py``
imports this module.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import referencing
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
SCHEMAS = K8S / "schemas"
TARGETS = ("overlays/rocm-prod", "overlays/nvidia", "overlays/cpu-dev", "jobs/model-download")
# The oldest Kubernetes release we support (native gRPC probes are GA since 1.27) and the
# newest that kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
# Seconds a draining process needs after its drain grace to stop (close Redis, shut the
# engine down): terminationGracePeriodSeconds >= QS_DRAIN_GRACE_S + this, or SIGKILL
# cuts the end of a full drain short.
SHUTDOWN_MARGIN_S = 10
ALLOWED_VOLUMES = {
    "configMap",
    "secret",
    "emptyDir",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
    "ephemeral",
    "csi",
}

Doc = dict[str, Any]


# ----------------------------------------------------------------------------- rendering


def kustomize_command() -> list[str]:
    """``kubectl kustomize`` if kubectl is on PATH, else ``kustomize build``."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    raise FileNotFoundError("neither kubectl nor kustomize is on PATH")


def render_text(target: Path) -> str:
    """The YAML stream that Kustomize builds from the directory ``target``."""
    result = subprocess.run(
        [*kustomize_command(), str(target)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kustomize {target} failed:\n{result.stderr}")
    return result.stdout


def render(target: Path) -> list[Doc]:
    """The objects Kustomize builds from ``target``."""
    return [doc for doc in yaml.safe_load_all(render_text(target)) if doc]


# ----------------------------------------------------------------------------- validation


@cache
def _schema_registry() -> referencing.Registry[Any]:
    """Every schema under k8s/schemas, addressable by its ``$id``."""
    resources = []
    for path in sorted(SCHEMAS.rglob("*.json")):
        contents = json.loads(path.read_text())
        resources.append((contents["$id"], referencing.Resource.from_contents(contents)))
    registry: referencing.Registry[Any] = referencing.Registry()
    return registry.with_resources(resources)


def custom_schema_path(doc: Doc) -> Path:
    """Where the schema of a custom resource lives: k8s/schemas/<group>/<kind>_<version>.json."""
    group, _, version = str(doc["apiVersion"]).rpartition("/")
    return SCHEMAS / group / f"{str(doc['kind']).lower()}_{version}.json"


def validate_custom(doc: Doc) -> list[str]:
    """Problems of a custom resource against its schema in k8s/schemas."""
    path = custom_schema_path(doc)
    if not path.is_file():
        return [f"{name_of(doc)}: no schema for {doc['apiVersion']} {doc['kind']} ({path})"]
    schema = json.loads(path.read_text())
    validator = jsonschema.Draft202012Validator(schema, registry=_schema_registry())
    return [
        f"{name_of(doc)}: {'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in validator.iter_errors(doc)
    ]


def validate_builtin(doc: Doc, version: str) -> list[str]:
    """Problems of a Kubernetes object with strict validation against ``version``."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(map(str, exc.path)) or "(root)"
        return [f"{name_of(doc)} (k8s {exc.version}): {where}: {exc.message}"]
    return []


def is_builtin(doc: Doc) -> bool:
    """Whether kubernetes-validate has a schema for the object's kind."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=False)
    except kubernetes_validate.utils.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        return True
    return True


def validate(docs: list[Doc]) -> list[str]:
    """Strict schema problems of every object (Kubernetes kinds and custom resources)."""
    problems: list[str] = []
    for doc in docs:
        if is_builtin(doc):
            for version in K8S_VERSIONS:
                problems += validate_builtin(doc, version)
        else:
            problems += validate_custom(doc)
    return problems


# ----------------------------------------------------------------------------- policy


def name_of(doc: Doc) -> str:
    """``Kind/name`` of an object."""
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def pod_spec(doc: Doc) -> Doc | None:
    """The pod template's spec of a workload object, None for other kinds."""
    if doc.get("kind") not in POD_KINDS:
        return None
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def containers(spec: Doc) -> Iterator[Doc]:
    """Init and app containers of a pod spec."""
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def env_value(container: Doc, name: str) -> str | None:
    """The literal value of environment variable ``name`` in ``container``, if set."""
    for var in container.get("env", []):
        if var["name"] == name:
            value = var.get("value")
            return None if value is None else str(value)
    return None


def container_problems(where: str, container: Doc) -> list[str]:
    """Resources and security context of one container."""
    problems = []
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(kind, {}):
                problems.append(f"{where}: no {resource} in resources.{kind}")
    context = container.get("securityContext", {})
    if context.get("privileged"):
        problems.append(f"{where}: privileged")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if context.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append(f"{where}: capabilities.drop is not [ALL]")
    if context.get("capabilities", {}).get("add"):
        problems.append(f"{where}: adds capabilities")
    return problems


def pod_problems(doc: Doc, spec: Doc) -> list[str]:
    """Pod-level rules: no host access, non-root, only ordinary volume types."""
    where = name_of(doc)
    problems = [
        f"{where}: {key} is set" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)
    ]
    context = spec.get("securityContext", {})
    if context.get("runAsNonRoot") is not True:
        problems.append(f"{where}: runAsNonRoot is not true")
    if context.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{where}: seccompProfile is not RuntimeDefault")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            problems.append(f"{where}: volume {volume['name']} is {sorted(kinds)}")
    for container in containers(spec):
        problems += container_problems(f"{where}/{container['name']}", container)
    return problems


def grace_problems(doc: Doc, spec: Doc) -> list[str]:
    """terminationGracePeriodSeconds covers the drain grace plus the shutdown margin."""
    problems = []
    for container in spec.get("containers", []):
        drain = env_value(container, "QS_DRAIN_GRACE_S")
        if drain is None:
            continue
        grace = spec.get("terminationGracePeriodSeconds")
        if grace is None or float(grace) < float(drain) + SHUTDOWN_MARGIN_S:
            problems.append(
                f"{name_of(doc)}: terminationGracePeriodSeconds {grace} < QS_DRAIN_GRACE_S "
                f"{drain} + {SHUTDOWN_MARGIN_S} s shutdown margin"
            )
    return problems


def probe_problems(doc: Doc, spec: Doc) -> list[str]:
    """Long-running containers have liveness and readiness probes."""
    if doc["kind"] == "Job":
        return []
    return [
        f"{name_of(doc)}/{container['name']}: no {probe}"
        for container in spec.get("containers", [])
        for probe in ("livenessProbe", "readinessProbe")
        if probe not in container
    ]


def policy_problems(docs: list[Doc]) -> list[str]:
    """Deployment rules every rendered target must keep (see docs/deploy.md)."""
    problems: list[str] = []
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        problems += pod_problems(doc, spec)
        problems += grace_problems(doc, spec)
        problems += probe_problems(doc, spec)
    return problems


# ----------------------------------------------------------------------------- CLI


def check_target(target: str, out: Path | None) -> list[str]:
    """Render one target, optionally write it, and return its problems."""
    text = render_text(K8S / target)
    if out is not None:
        path = out / f"{target.replace('/', '_')}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    problems = validate(docs) + policy_problems(docs)
    print(f"{target}: {len(docs)} objects, {len(problems)} problems")
    return [f"{target}: {problem}" for problem in problems]


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", default=list(TARGETS), help="dirs under k8s/")
    parser.add_argument("--out", type=Path, help="write the rendered YAML here")
    args = parser.parse_args(argv)
    problems = [p for target in args.targets for p in check_target(target, args.out)]
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
