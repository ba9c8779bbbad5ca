"""Tests for worker.config_fix (and its config_fix_* pieces), the rope-validation list-vs-set
fix (a vLLM general plugin).

The pinned transformers (5.19) is already fixed, so the historical bug is reproduced two
ways: with a small config class of the old shape, and by putting the old transformers code
back in place of the fixed functions (monkeypatched, restored after every test).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker import config_fix, config_fix_hooks, config_fix_keys, config_fix_probe

LlamaConfig = pytest.importorskip("transformers").LlamaConfig
RotaryEmbeddingConfigMixin = pytest.importorskip(
    "transformers.modeling_rope_utils"
).RotaryEmbeddingConfigMixin

DIST_NAME = "qwen-serve"
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "qwen_serve_config_fix"
PLUGIN_VALUE = "worker.config_fix:register"
LIST_SET_ERROR = r"unsupported operand type\(s\) for (-=?|\|=?): '(set|list)' and '(list|set)'"
IGNORE_KEYS = ["mrope_section", "mrope_interleaved"]
ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------
# The old code, mirrored
# --------------------------------------------------------------------------------------


def old_check_received_keys(
    rope_type: str,
    received_keys: set[str],
    required_keys: set[str],
    optional_keys: set[str] | None = None,
    ignore_keys: Any = None,
) -> None:
    """transformers <= 5.4 ``_check_received_keys``: ``-=`` without coercion."""
    if "type" in received_keys:
        received_keys -= {"type"}
        required_keys.add("rope_type")
    if ignore_keys is not None:
        received_keys -= ignore_keys
    missing_keys = required_keys - received_keys
    if missing_keys:
        raise KeyError(f"Missing required keys for 'rope_type'='{rope_type}': {missing_keys}")
    unused_keys = received_keys - required_keys - (optional_keys or set())
    if unused_keys:
        logging.getLogger(__name__).warning("Unrecognized keys: %s", unused_keys)


class OldShapeTextConfig:
    """Text config of the old shape: ignore keys stored as given, validated with ``-=``.

    Mirrors vLLM's bundled ``Qwen3_5MoeTextConfig`` (which passed a list) on transformers
    5.0-5.4 (which did ``received_keys -= ignore_keys``).
    """

    def __init__(self, rope_parameters: dict[str, Any], **kwargs: Any) -> None:
        self.rope_parameters = rope_parameters
        self.ignore_keys_at_rope_validation = kwargs.pop("ignore_keys_at_rope_validation", None)

    def validate_rope(self) -> None:
        """Old validation for ``rope_type="default"``."""
        old_check_received_keys(
            self.rope_parameters["rope_type"],
            set(self.rope_parameters),
            {"rope_type"},
            optional_keys={"rope_theta", "partial_rotary_factor"},
            ignore_keys=self.ignore_keys_at_rope_validation,
        )


class OldShapeConfig:
    """Composite config holding text and vision sub-configs."""

    def __init__(self, text_config: OldShapeTextConfig, vision_config: Any) -> None:
        self.text_config = text_config
        self.vision_config = vision_config


def qwen_rope() -> dict[str, Any]:
    """Qwen3.5-35B-A3B's ``rope_parameters`` (M-RoPE keys included)."""
    return {
        "rope_type": "default",
        "rope_theta": 10_000_000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    }


def old_text_config() -> OldShapeTextConfig:
    """An old-shape text config with the list, as vLLM built it."""
    return OldShapeTextConfig(qwen_rope(), ignore_keys_at_rope_validation=list(IGNORE_KEYS))


_Real = Callable[..., dict[str, Any]]


def old_union_on_attribute(real: _Real) -> Callable[..., dict[str, Any]]:
    """transformers 5.4-5.9 ``convert_rope_params_to_dict``: ``self.<attr> | {...}``."""

    def convert(self: Any, **kwargs: Any) -> dict[str, Any]:
        if kwargs.get("partial_rotary_factor") is not None:
            self.ignore_keys_at_rope_validation = self.ignore_keys_at_rope_validation | {
                "partial_rotary_factor"
            }
        return real(self, **kwargs)

    return convert


def old_union_on_keyword(real: _Real) -> Callable[..., dict[str, Any]]:
    """transformers 5.0-5.3 ``convert_rope_params_to_dict(self, ignore_keys_at_rope_...)``."""

    def convert(
        self: Any, ignore_keys_at_rope_validation: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        ignore = set() if ignore_keys_at_rope_validation is None else ignore_keys_at_rope_validation
        if kwargs.get("partial_rotary_factor") is not None:
            ignore = ignore | {"partial_rotary_factor"}
        kwargs = real(self, **kwargs)
        self.ignore_keys_at_rope_validation = ignore
        return kwargs

    return convert


def install_old_transformers(monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    """Put one historical implementation back into the installed transformers."""
    mixin = RotaryEmbeddingConfigMixin
    if shape == "check_received_keys":
        monkeypatch.setattr(mixin, "_check_received_keys", staticmethod(old_check_received_keys))
        return
    real = vars(mixin)["convert_rope_params_to_dict"]
    wrap = old_union_on_attribute if shape == "union_on_attribute" else old_union_on_keyword
    monkeypatch.setattr(mixin, "convert_rope_params_to_dict", wrap(real))


def probe_config() -> Any:
    """A config built, validated and reconverted the way the bug was hit."""
    config = LlamaConfig(
        partial_rotary_factor=0.5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 2]},
        ignore_keys_at_rope_validation=list(IGNORE_KEYS),
    )
    config.validate_rope()
    config.convert_rope_params_to_dict(partial_rotary_factor=0.5)
    return config


def target_snapshot() -> dict[str, object]:
    """Current objects at every hook target, by name."""
    return {
        f"{owner!r}.{name}": vars(owner).get(name)
        for owner, name, _, _ in config_fix_hooks.hook_targets()
    }


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Forget register()'s outcome and restore every hook target after the test."""
    monkeypatch.setattr(config_fix, "_status", None)
    for owner, name, _, _ in config_fix_hooks.hook_targets():
        monkeypatch.setattr(owner, name, vars(owner)[name])
    yield


# --------------------------------------------------------------------------------------
# Pure normalisation
# --------------------------------------------------------------------------------------


def test_old_shape_reproduces_the_type_error() -> None:
    """The historical failure: a list where ``set -= ...`` needs a set."""
    with pytest.raises(TypeError, match=LIST_SET_ERROR):
        old_text_config().validate_rope()


def test_normalize_fixes_old_shape_object_in_place() -> None:
    """The list becomes a set on the same object, and the old validation passes."""
    config = old_text_config()
    assert config_fix_keys.normalize_rope_ignore_keys(config) is config
    assert config.ignore_keys_at_rope_validation == set(IGNORE_KEYS)
    config.validate_rope()


def test_normalize_recurses_into_sub_config_objects() -> None:
    """text_config and vision_config are fixed too, a dict sub-config by replacement."""
    vision = {"ignore_keys_at_rope_validation": ("mrope_section",)}
    config = OldShapeConfig(old_text_config(), vision)
    config_fix_keys.normalize_rope_ignore_keys(config)
    assert config.text_config.ignore_keys_at_rope_validation == set(IGNORE_KEYS)
    assert config.vision_config == {"ignore_keys_at_rope_validation": {"mrope_section"}}
    assert vision == {"ignore_keys_at_rope_validation": ("mrope_section",)}
    config.text_config.validate_rope()


def test_normalize_dict_returns_a_fixed_copy() -> None:
    """A config.json dict is copied, fixed at every level, and left untouched itself."""
    raw: dict[str, Any] = {
        "model_type": "qwen3_5_moe",
        "ignore_keys_at_rope_validation": ["a"],
        "text_config": {"ignore_keys_at_rope_validation": list(IGNORE_KEYS), "x": [1]},
        "vision_config": {"ignore_keys_at_rope_validation": ("mrope_section",)},
    }
    before = repr(raw)
    fixed = config_fix_keys.normalize_rope_ignore_keys(raw)
    assert repr(raw) == before
    assert fixed["ignore_keys_at_rope_validation"] == {"a"}
    assert fixed["text_config"] == {"ignore_keys_at_rope_validation": set(IGNORE_KEYS), "x": [1]}
    assert fixed["vision_config"]["ignore_keys_at_rope_validation"] == {"mrope_section"}
    assert config_fix_keys.normalize_rope_ignore_keys(fixed) == fixed


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["a", "b"], {"a", "b"}),
        (("a",), {"a"}),
        ({"a"}, {"a"}),
        (frozenset({"a"}), frozenset({"a"})),
        (None, None),
        ("ab", "ab"),
        ([["unhashable"]], [["unhashable"]]),
    ],
)
def test_as_key_set(value: object, expected: object) -> None:
    """Only lists and tuples of hashable keys change."""
    assert config_fix_keys.as_key_set(value) == expected


def test_is_list_set_type_error_follows_the_chain() -> None:
    """The strict-dataclass wrapper exception is recognised through its cause."""
    try:
        try:
            _ = {"a"} - ["a"]  # type: ignore[operator]
        except TypeError as inner:
            raise ValueError("Class validation error for validator 'validate_rope'") from inner
    except ValueError as outer:
        assert config_fix_probe.is_list_set_type_error(outer)
    assert not config_fix_probe.is_list_set_type_error(TypeError("unsupported operand: 'int'"))


# --------------------------------------------------------------------------------------
# Hooks against the old transformers code
# --------------------------------------------------------------------------------------

OLD_SHAPES = ["check_received_keys", "union_on_attribute", "union_on_keyword"]


@pytest.mark.parametrize("shape", OLD_SHAPES)
def test_register_fixes_old_transformers(monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    """With an old implementation in place the probe fails; register() hooks and fixes it."""
    install_old_transformers(monkeypatch, shape)
    assert config_fix_probe.reproduces_bug()
    with pytest.raises(Exception, match=LIST_SET_ERROR):
        probe_config()

    config_fix.register()

    assert config_fix.fix_status() == "applied"
    assert not config_fix_probe.reproduces_bug()
    assert isinstance(probe_config().ignore_keys_at_rope_validation, set)


def test_register_is_idempotent(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two calls wrap once and log once; a reset module state still does not re-wrap."""
    install_old_transformers(monkeypatch, "check_received_keys")
    caplog.set_level(logging.INFO, logger=config_fix.__name__)

    config_fix.register()
    wrapped = vars(RotaryEmbeddingConfigMixin)["_check_received_keys"]
    config_fix.register()

    assert vars(RotaryEmbeddingConfigMixin)["_check_received_keys"] is wrapped
    assert isinstance(wrapped, staticmethod)
    assert config_fix_hooks.is_patched(wrapped)
    assert getattr(wrapped.__func__, "__wrapped__", None) is old_check_received_keys
    applied = [r for r in caplog.records if "Rope config fix applied" in r.getMessage()]
    assert len(applied) == 1

    monkeypatch.setattr(config_fix, "_status", None)  # as after a module reload
    config_fix.register()
    assert vars(RotaryEmbeddingConfigMixin)["_check_received_keys"] is wrapped
    assert config_fix.fix_status() == "applied"
    assert config_fix_hooks.install_hooks() == []


def test_register_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error becomes a warning and status "unavailable"."""

    def boom() -> bool:
        raise RuntimeError("boom")

    monkeypatch.setattr(config_fix_probe, "reproduces_bug", boom)
    config_fix.register()
    assert config_fix.fix_status() == "unavailable"
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_register_warns_when_target_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Bug present but nothing to hook: a warning, status "unavailable", no exception."""
    monkeypatch.setattr(config_fix_probe, "reproduces_bug", lambda: True)
    monkeypatch.setattr(config_fix_hooks, "hook_targets", list)
    config_fix.register()
    assert config_fix.fix_status() == "unavailable"
    assert any("no hook target" in r.getMessage() for r in caplog.records)


def test_register_reports_missing_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers not importable: status "unavailable"."""

    def no_transformers() -> bool:
        raise ImportError("No module named 'transformers'")

    monkeypatch.setattr(config_fix_probe, "reproduces_bug", no_transformers)
    config_fix.register()
    assert config_fix.fix_status() == "unavailable"


def test_fix_status_before_register() -> None:
    """Nothing has run in this process yet."""
    assert config_fix.fix_status() == "not-registered"


# --------------------------------------------------------------------------------------
# Pinned versions: nothing to do
# --------------------------------------------------------------------------------------


def qwen35_moe_config_dict() -> dict[str, Any]:
    """Qwen3.5-35B-A3B's config.json (abridged), with the key serialised as a JSON list."""
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "hidden_size": 2048,
            "num_hidden_layers": 40,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "head_dim": 256,
            "num_experts": 256,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 512,
            "shared_expert_intermediate_size": 512,
            "max_position_embeddings": 262144,
            "full_attention_interval": 4,
            "rope_parameters": qwen_rope(),
            "ignore_keys_at_rope_validation": list(IGNORE_KEYS),
        },
        "vision_config": {"model_type": "qwen3_5_moe", "depth": 27, "hidden_size": 1152},
    }


def build_and_validate() -> dict[str, Any]:
    """Build the real transformers config, run vLLM's rope patching, return its dict."""
    from transformers import Qwen3_5MoeConfig
    from vllm.transformers_utils.config import patch_rope_parameters

    config = Qwen3_5MoeConfig.from_dict(qwen35_moe_config_dict())
    text = config.get_text_config()
    patch_rope_parameters(config)
    patch_rope_parameters(text)
    text.validate_rope()
    text.convert_rope_params_to_dict(partial_rotary_factor=0.25)
    result: dict[str, Any] = config.to_dict()
    return result


def test_not_needed_on_pinned_versions() -> None:
    """On the pinned transformers register() detects the fix and wraps nothing."""
    before = target_snapshot()
    config_fix.register()
    assert config_fix.fix_status() == "not-needed"
    assert target_snapshot() == before
    assert not config_fix_hooks.hooks_present()


def test_hooks_do_not_change_real_qwen35_config() -> None:
    """The real Qwen3.5 MoE config validates and serialises identically with the hooks."""
    without = build_and_validate()
    assert config_fix_hooks.install_hooks()
    assert config_fix_hooks.hooks_present()
    with_hooks = build_and_validate()
    assert with_hooks == without
    assert with_hooks["text_config"]["rope_parameters"]["mrope_section"] == [11, 11, 10]


# --------------------------------------------------------------------------------------
# Plugin wiring
# --------------------------------------------------------------------------------------


def dist_installed() -> bool:
    """Whether the qwen-serve distribution (and so its entry points) is installed."""
    try:
        importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def our_entry_points() -> list[importlib.metadata.EntryPoint]:
    """Entry points of the vLLM general-plugin group that are ours."""
    found = importlib.metadata.entry_points(group=PLUGIN_GROUP)
    return [ep for ep in found if ep.name == PLUGIN_NAME]


def test_entry_point_resolves() -> None:
    """pyproject's entry point is installed and loads register()."""
    target = importlib.import_module("worker.config_fix").register
    assert callable(target)
    if not dist_installed():
        pytest.skip(f"distribution {DIST_NAME!r} not installed (run `pip install -e .`)")
    entry_points = our_entry_points()
    assert [ep.value for ep in entry_points] == [PLUGIN_VALUE]
    assert entry_points[0].load() is config_fix.register


def add_plugin_dist(directory: Path) -> None:
    """Write a minimal dist-info that declares our entry point (package not installed)."""
    dist_info = directory / "qwen_serve_plugin_test-0.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: qwen-serve-plugin-test\nVersion: 0.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        f"[{PLUGIN_GROUP}]\n{PLUGIN_NAME} = {PLUGIN_VALUE}\n"
    )


def test_vllm_loader_calls_register(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """vLLM's own load_general_plugins() finds the entry point and calls register()."""
    vllm_plugins = pytest.importorskip("vllm.plugins")
    import vllm.envs

    if not dist_installed():
        add_plugin_dist(tmp_path)
        monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("VLLM_PLUGINS", PLUGIN_NAME)
    monkeypatch.setattr(vllm.envs, "VLLM_PLUGINS", [PLUGIN_NAME], raising=False)
    monkeypatch.setattr(vllm_plugins, "plugins_loaded", False)

    calls: list[str] = []
    real_register = config_fix.register

    def spy() -> None:
        calls.append("register")
        real_register()

    monkeypatch.setattr(config_fix, "register", spy)
    vllm_plugins.load_general_plugins()
    vllm_plugins.load_general_plugins()  # vLLM's own once-per-process guard

    assert calls == ["register"]
    assert config_fix.fix_status() == "not-needed"


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter of this venv from the repo root; return stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={"VLLM_PLUGINS": PLUGIN_NAME, "PATH": "/usr/bin:/bin"},
    )
    return result.stdout.strip().splitlines()[-1]


def test_plugin_runs_in_a_fresh_process() -> None:
    """A new process (like vLLM's engine core) gets the fix from the entry point alone."""
    if not dist_installed():
        pytest.skip(f"distribution {DIST_NAME!r} not installed (run `pip install -e .`)")
    pytest.importorskip("vllm.plugins")
    status = run_python(
        """
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from worker.config_fix import fix_status
        print(fix_status())
        """
    )
    assert status == "not-needed"


def test_import_is_light() -> None:
    """Importing the module loads neither torch, transformers nor vLLM."""
    loaded = run_python(
        """
        import sys
        import worker
        before = set(sys.modules)
        import worker.config_fix
        heavy = ("torch", "transformers", "vllm")
        print(sorted(m for m in set(sys.modules) - before if m.split(".")[0] in heavy))
        """
    )
    assert loaded == "[]"
