"""API sampling settings -> ``vllm.SamplingParams``, with the output budget the prompt leaves.

The router has checked the settings' ranges (``router/validation.py``); what is left
needs the engine: the output budget against the prompt's token count and the
model's context, the model's generation-config defaults for unset fields, and
vLLM's own validation, whose errors become INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from qwen_serve import request_rules as rules
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import RequestError, clean, invalid
from worker.constraints import structured_outputs
from worker.vllm_boundary import RequestOutputKind, SamplingParams, VLLMValidationError

SAMPLING_DEFAULTS: Final[Mapping[str, float | int]] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}
"""vLLM's defaults for fields neither the request nor the generation config sets."""
SAMPLING_FIELDS: Final[Mapping[str, str]] = {
    "logprobs": rules.sampling_field("top_logprobs"),
    "max_tokens": rules.sampling_field("max_tokens"),
    "max_completion_tokens": rules.sampling_field("max_tokens"),
    "temperature": rules.sampling_field("temperature"),
    "top_p": rules.sampling_field("top_p"),
    "stop_token_ids": rules.sampling_field("stop_token_ids"),
    "n": rules.sampling_field("n"),
}
"""vLLM's parameter names -> the API fields they come from."""


def _round(value: float) -> float:
    """A proto float32 as the decimal the client most likely meant (0.7, not 0.69999)."""
    return float(f"{value:.7g}")


def _sampled(sampling: pb.SamplingParams, defaults: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fallback in SAMPLING_DEFAULTS.items():
        if sampling.HasField(name):
            value = getattr(sampling, name)
            out[name] = value if isinstance(value, int) else _round(value)
        else:
            out[name] = defaults.get(name, fallback)
    return out


def max_tokens(
    sampling: pb.SamplingParams,
    defaults: Mapping[str, Any],
    max_context: int,
    prompt_len: int | None,
    prompt_field: str = rules.MESSAGES,
) -> int | None:
    """Output budget: the request's, checked to fit, or whatever room the context leaves."""
    room = None
    if prompt_len is not None:
        room = max_context - prompt_len
        if room <= 0:
            raise rules.prompt_fills_context(prompt_field, prompt_len, max_context)
        if sampling.HasField("max_tokens") and sampling.max_tokens > room:
            raise rules.max_tokens_do_not_fit(sampling.max_tokens, prompt_len, max_context)
    if sampling.HasField("max_tokens"):
        return sampling.max_tokens
    default = defaults.get("max_tokens")
    candidates = [v for v in (room, default) if v is not None]
    return min(candidates) if candidates else None


def _stop_token_ids(sampling: pb.SamplingParams, defaults: Mapping[str, Any]) -> list[int]:
    ids = list(sampling.stop_token_ids)
    return list(dict.fromkeys([*ids, *(defaults.get("stop_token_ids") or ())]))


def sampling_params(
    sampling: pb.SamplingParams,
    structured: pb.StructuredOutput,
    defaults: Mapping[str, Any],
    max_context: int,
    prompt_len: int | None,
    *,
    skip_special_tokens: bool = True,
    prompt_field: str = rules.MESSAGES,
) -> SamplingParams:
    """vLLM ``SamplingParams`` (output kind DELTA) for the API sampling settings.

    Unset fields take ``defaults`` (the model's generation config, from
    ``ModelConfig.get_diff_sampling_param()``), then vLLM's defaults.
    """
    kwargs = _sampled(sampling, defaults)
    try:
        return SamplingParams(
            n=sampling.n if sampling.HasField("n") else 1,
            **kwargs,
            seed=sampling.seed if sampling.HasField("seed") else None,
            stop=list(sampling.stop),
            stop_token_ids=_stop_token_ids(sampling, defaults),
            include_stop_str_in_output=sampling.include_stop_str_in_output,
            ignore_eos=sampling.ignore_eos,
            max_tokens=max_tokens(sampling, defaults, max_context, prompt_len, prompt_field),
            min_tokens=sampling.min_tokens,
            logprobs=(sampling.top_logprobs if sampling.logprobs else None),
            skip_special_tokens=skip_special_tokens,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=structured_outputs(structured),
        )
    except VLLMValidationError as exc:
        raise from_validation_error(exc, "sampling") from None


def vllm_field(parameter: str, field: str) -> str:
    """The API field of a parameter vLLM named (``field`` when it maps to none)."""
    if parameter.startswith("sampling."):
        return parameter
    return SAMPLING_FIELDS.get(parameter, field)


def from_validation_error(exc: VLLMValidationError, field: str) -> RequestError:
    """INVALID_ARGUMENT for a vLLM validation error, naming the field where known."""
    message = exc.args[0] if exc.args else str(exc)
    return invalid(vllm_field(exc.parameter or "", field), clean(str(message)))
