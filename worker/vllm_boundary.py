"""The worker's one boundary to vLLM: every import from vLLM and every version difference.

Supported: vLLM 0.23 (the production ROCm image) through 0.32 (the development CPU
build). Everything the worker takes from vLLM beyond ``AsyncLLM`` and ``SamplingParams``
comes from here; no other module knows which version runs. Where the versions differ,
the behaviour is chosen once, at import, by what the installed vLLM offers:

- ``ParserManager.get_parser``: 0.32 takes ``tokenizer``; 0.23 has no such argument.
- Overload out of ``generate``: 0.32 raises ``vllm.exceptions.GracefulHTTPError``;
  0.23 has no such class.
- ``reasoning_ended`` for structured output: 0.32 has
  ``ChatCompletionRequest.resolve_reasoning_ended``; on 0.23 it is computed here as
  0.23's chat server does (its tool-parser grammar flag is ``_grammar_from_tool_parser``).
- The end of reasoning in the output: 0.32's reasoning parser has
  ``find_reasoning_end``; on 0.23 its streaming end check (``is_reasoning_end_streaming``)
  is asked token by token.
- Sequences in the engine: ``AsyncLLM.get_num_unfinished_requests`` on 0.32,
  ``AsyncLLM.output_processor.get_num_unfinished_requests`` on 0.23.

Usage counts reasoning tokens here, the same way on every version: every token before
the end of reasoning (``</think>``, or a ``<tool_call>`` opened inside the reasoning),
none when the prompt already ended it (thinking off). vLLM's own counts do not fit:
0.23's ``ReasoningParser.count_reasoning_tokens`` counts only tokens between a ``<think>``
and a ``</think>`` in the *output*, but Qwen3.5's template opens ``<think>`` in the prompt
(a chat that only reasoned reported 0); 0.32's parser-engine count leaves out tokens
that decode to no text yet (byte pieces, skipped special tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

import vllm
from vllm import AsyncEngineArgs, SamplingParams
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.exceptions import VLLMValidationError
from vllm.parser.parser_manager import ParserManager
from vllm.renderers import ChatParams, TokenizeParams, merge_kwargs
from vllm.renderers.inputs.preprocess import parse_model_prompt
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

logger = logging.getLogger(__name__)

__all__ = [
    "OVERLOAD_ERRORS",
    "VERSION",
    "AsyncLLM",
    "ChatCompletionRequest",
    "ChatParams",
    "EngineDeadError",
    "EngineGenerateError",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
    "TokenizeParams",
    "VLLMValidationError",
    "merge_kwargs",
    "parse_model_prompt",
]

VERSION: Final[str] = vllm.__version__
SUPPORTED: Final = ((0, 23), (0, 32))
"""Oldest and newest (major, minor) the worker is tested on."""


def _overload_errors() -> tuple[type[BaseException], ...]:
    import vllm.exceptions as exceptions

    graceful = getattr(exceptions, "GracefulHTTPError", None)  # 0.32; absent in 0.23
    return (graceful,) if isinstance(graceful, type) else ()


OVERLOAD_ERRORS: Final[tuple[type[BaseException], ...]] = _overload_errors()
"""Exceptions out of ``generate`` that mean "overloaded, retry" (they carry ``.message``)."""
_PARSER_TAKES_TOKENIZER: Final = (
    "tokenizer" in inspect.signature(ParserManager.get_parser).parameters
)


def version_tuple(version: str = VERSION) -> tuple[int, int]:
    """(major, minor) of a vLLM version string such as ``0.32.0+cpu``."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def check_version() -> None:
    """Warn once when the installed vLLM is outside the tested range."""
    low, high = SUPPORTED
    if not low <= version_tuple() <= high:
        logger.warning("vLLM %s is outside the tested range %d.%d-%d.%d", VERSION, *low, *high)


# ------------------------------------------------------------------ engine


def start_engine(engine_args: Mapping[str, Any], stat_loggers: Sequence[Any]) -> Any:
    """``AsyncLLM`` for keyword arguments of ``AsyncEngineArgs``."""
    args = dict(engine_args)
    structured = args.get("structured_outputs_config")
    if isinstance(structured, dict):
        from vllm.config import StructuredOutputsConfig

        args["structured_outputs_config"] = StructuredOutputsConfig(**structured)
    loggers = list(stat_loggers) or None
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=loggers)
    _cache_environment()
    return llm


def _cache_environment() -> None:
    """Freeze vLLM's environment settings now that the engine runs (as its engine core does).

    ``vllm.envs`` reads ``os.environ`` on every attribute access until
    ``enable_envs_cache``; 0.23's output processor reads one per request per step
    (``VLLM_COMPUTE_NANS_IN_LOGITS``): a fifth of the serving process's time on an H200.
    """
    import vllm.envs as envs

    enable = getattr(envs, "enable_envs_cache", None)
    if enable is not None:
        enable()


def platform_fixups(args: dict[str, Any]) -> dict[str, Any]:
    """Settings a vLLM version's platform code cannot run with.

    vLLM 0.23 on a CPU cannot cache prefixes of a linear-attention (hybrid) model:
    - with AMX tiles, its CPU platform turns prefix caching off after the Mamba block
      size was already derived from it, and then refuses its own config
      ("--mamba-block-size can only be set with --enable-prefix-caching");
    - without them, the first prefix hit copies the recurrent state with a Triton
      kernel (``mamba_utils.batch_memcpy``), and the CPU build has no Triton: the
      engine dies ("'function' object is not subscriptable").
    So prefix caching is off there (the CPU engine is for development and CI).
    """
    if version_tuple() != (0, 23) or not args.get("enable_prefix_caching", True):
        return args
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        logger.warning("vLLM 0.23 on a CPU: prefix caching off (hybrid model state copies)")
        args["enable_prefix_caching"] = False
    return args


def unfinished_requests(llm: Any) -> int:
    """Sequences in the engine now (a request with n choices counts n)."""
    counter = getattr(llm, "get_num_unfinished_requests", None)  # 0.32
    if counter is None:  # 0.23
        counter = llm.output_processor.get_num_unfinished_requests
    return int(counter())


# ------------------------------------------------------------------ parsers


def parser_class(
    tool_parser: str | None,
    reasoning_parser: str | None,
    enable_auto_tools: bool,
    model_name: str,
    tokenizer: Any,
) -> Any:
    """vLLM's combined reasoning + tool ``Parser`` class, or None when neither is named."""
    kwargs: dict[str, Any] = {
        "tool_parser_name": tool_parser or None,
        "reasoning_parser_name": reasoning_parser or None,
        "enable_auto_tools": enable_auto_tools,
        "model_name": model_name,
    }
    if _PARSER_TAKES_TOKENIZER:
        kwargs["tokenizer"] = tokenizer
    return ParserManager.get_parser(**kwargs)


def reasoning_ended(request: Any, parser: Any, prompt_ids: list[int]) -> bool | None:
    """``AsyncLLM.generate``'s ``reasoning_ended``: whether constraints apply from token one.

    True constrains from the first generated token; None lets the engine decide with
    its own reasoning parser (as vLLM's chat server does on each version).
    """
    resolve = getattr(request, "resolve_reasoning_ended", None)  # 0.32
    if resolve is not None:
        result: bool | None = resolve(parser, prompt_ids)
        return result
    if not request.include_reasoning or getattr(request, "_grammar_from_tool_parser", False):
        return True
    if parser is not None and parser.reasoning_parser is not None:
        return bool(parser.reasoning_parser.is_reasoning_end(prompt_ids))
    return None


class ReasoningCounter:
    """Reasoning tokens of one choice: every token before the end of reasoning.

    Fed the choice's new token ids in order (``feed``, with the prompt's ids). The
    prompt says whether the output starts in reasoning (vLLM's ``is_reasoning_end`` on
    it, as the parser itself decides); the end is the first ``</think>``, or a
    ``<tool_call>`` opened inside the reasoning, found by 0.32's ``find_reasoning_end``
    or 0.23's streaming end check.
    """

    def __init__(self, parser: Any) -> None:
        self._reasoning: Any = getattr(parser, "reasoning_parser", None)
        self._active: bool | None = None if self._reasoning is not None else False
        self._count = 0
        self._ids: list[int] = []

    def feed(self, new_ids: Sequence[int], prompt_ids: Sequence[int] | None = None) -> None:
        """Account for the next token ids of the choice."""
        if self._active is None:
            self._active = prompt_ids is None or not self._reasoning.is_reasoning_end(
                list(prompt_ids)
            )
        if not self._active:
            return
        end = self._end_offset(new_ids)
        if end is None:
            self._count += len(new_ids)
            return
        self._count += end
        self._active = False

    def _end_offset(self, new_ids: Sequence[int]) -> int | None:
        """Index in ``new_ids`` of the token that ends reasoning, None if none does."""
        find = getattr(self._reasoning, "find_reasoning_end", None)  # 0.32
        if find is not None:
            offset = int(find(list(new_ids)).offset)
            return offset if offset < len(new_ids) else None
        self._ids.extend(new_ids)  # 0.23
        for position in range(len(new_ids)):
            if self._reasoning.is_reasoning_end_streaming(self._ids, new_ids[: position + 1]):
                return position
        return None

    def count(self) -> int:
        """Reasoning tokens so far."""
        return self._count


# ------------------------------------------------------------------ engine arguments


class EngineArgError(ValueError):
    """An engine argument vLLM does not have, or a value it rejects."""


def engine_arg_names() -> frozenset[str]:
    """Every ``AsyncEngineArgs`` field name."""
    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def validate_engine_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` checked against ``AsyncEngineArgs``: names, types and choices.

    Values are converted the way vLLM's own command line converts them (``"4"`` to 4,
    a JSON object to a config dict). Raises :class:`EngineArgError` naming the key.
    """
    names = engine_arg_names()
    for key in args:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise EngineArgError(f"unknown engine argument {key!r}{hint}")
    parser = _cli_parser()
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    return {key: _convert(parser, actions.get(key), key, value) for key, value in args.items()}


def _cli_parser() -> argparse.ArgumentParser:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="engine-args", exit_on_error=False)
    return AsyncEngineArgs.add_cli_args(parser)  # type: ignore[no-any-return]


def _convert(parser: argparse.ArgumentParser, action: Any, key: str, value: Any) -> Any:
    if action is None:  # a field with no command-line flag: vLLM checks it at start
        return value
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise EngineArgError(f"engine argument {key!r} takes true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value
        if not value:
            return parser.get_default(key)
        argv = [action.option_strings[0]]
    elif isinstance(value, list) and action.nargs in ("+", "*"):
        argv = [action.option_strings[0], *(str(item) for item in value)]
    else:
        text = value if isinstance(value, str) else json.dumps(value)
        argv = [action.option_strings[0], text]
    try:
        namespace, rest = parser.parse_known_args(argv)
    except (argparse.ArgumentError, ValueError, TypeError) as exc:
        raise EngineArgError(f"engine argument {key!r}: {exc}") from None
    except SystemExit:
        raise EngineArgError(f"engine argument {key!r}: vLLM rejects {value!r}") from None
    if rest:
        raise EngineArgError(f"engine argument {key!r}: vLLM rejects {value!r}")
    return getattr(namespace, key)
