"""The worker's vLLM engine: the only place in the project that runs vLLM.

:class:`Engine` wraps ``vllm.v1.engine.async_llm.AsyncLLM`` (``vllm.AsyncLLMEngine``);
what it needs of vLLM's internals, and every difference between the supported vLLM
versions, comes through ``worker.vllm_boundary``.
For each queued job it has the job rendered (``worker.prepare``: vLLM's renderer,
``SamplingParams``, vLLM's qwen3 / qwen3_coder parsers), streams
``AsyncLLM.generate`` with DELTA outputs and turns them into API events
(``worker.events``). Invalid input raises
:class:`~qwen_serve.errors.RequestError` before the first event; a dead engine
raises :class:`~qwen_serve.errors.EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable
from pathlib import Path
from typing import Any

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import (
    INTERNAL,
    RESOURCE_EXHAUSTED,
    EngineDeadError,
    RequestError,
)
from qwen_serve.queue.v1 import queue_pb2
from qwen_serve.settings import WorkerSettings
from worker import continuation, observability
from worker import vllm_boundary as vb
from worker.images import ImagePolicy
from worker.prepare import Prepared, Preparer, input_error
from worker.profiles import CPU_TINY, EngineProfile, Overrides, ResolvedProfile, resolve

logger = logging.getLogger(__name__)

STRUCTURED_WORDS = ("grammar", "regex", "schema", "json", "choice", "structured", "xgrammar")


class Engine:
    """One vLLM engine with the model's chat parsers."""

    def __init__(
        self,
        llm: Any,
        resolved: ResolvedProfile,
        parser_cls: Any,
        image_policy: ImagePolicy | None = None,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        self._llm = llm
        self.resolved = resolved
        self._parser_cls = parser_cls
        self.engine_args_json = _json(engine_args or dict(resolved.engine_args))
        self.preparer = Preparer(llm, resolved, parser_cls, image_policy or ImagePolicy())
        self._running: set[str] = set()
        self._aborted: set[str] = set()
        """Ids of running requests an abort was asked for: vLLM ignores an abort that
        arrives before the request is registered, so run() repeats it once it is."""

    # -------------------------------------------------------------- lifecycle

    @classmethod
    async def start(
        cls, profile: EngineProfile | str | WorkerSettings, overrides: Overrides | None = None
    ) -> Engine:
        """Set the profile's environment, start vLLM (~25 s on CPU) and its parsers.

        Given worker settings, their engine overrides and image limits apply. Engine
        settings a deployment set are checked against vLLM's ``AsyncEngineArgs`` first:
        :class:`worker.vllm_boundary.EngineArgError` names a bad one.
        """
        resolved = _resolve(profile, overrides)
        policy = ImagePolicy.from_settings(profile) if isinstance(profile, WorkerSettings) else None
        vb.check_version()
        engine_args = {**resolved.engine_args, **observability.engine_args()}
        engine_args.update(vb.validate_engine_args(resolved.deployment_args))
        engine_args = vb.platform_fixups(engine_args)
        logger.info(
            "engine profile %s on vLLM %s: %s", resolved.name, vb.VERSION, _json(engine_args)
        )
        await _ensure_model(resolved)
        for key, value in resolved.env.items():
            os.environ[key] = value
            logger.info("set %s=%s for the engine", key, value)
        started = time.monotonic()
        llm = vb.start_engine(engine_args, observability.stat_loggers())
        logger.info("engine %s started in %.1f s", resolved.name, time.monotonic() - started)
        parser_cls = vb.parser_class(
            resolved.tool_parser,
            resolved.reasoning_parser,
            resolved.enable_auto_tool_choice,
            llm.model_config.model,
            llm.renderer.tokenizer,
        )
        return cls(llm, resolved, parser_cls, policy, engine_args)

    @property
    def capacity(self) -> int:
        """Sequences the engine runs at once (its max_num_seqs)."""
        return int(self._llm.vllm_config.scheduler_config.max_num_seqs)

    def model_info(self) -> pb.ModelInfo:
        """The served model, its limits and capabilities."""
        cls = self._parser_cls
        return pb.ModelInfo(
            served_model_name=self.resolved.served_model_name,
            model_path=self.resolved.model,
            max_context_tokens=self.preparer.max_context,
            max_images_per_prompt=self.resolved.max_images_per_prompt,
            supports_vision=bool(self._llm.model_config.is_multimodal_model),
            supports_tools=cls is not None and cls.tool_parser_cls is not None,
            supports_reasoning=cls is not None and cls.reasoning_parser_cls is not None,
            supports_structured_output=True,
            reasoning_parser=self.resolved.reasoning_parser,
            tool_call_parser=self.resolved.tool_parser,
            vocab_size=self.preparer.vocab_size,
            engine_version=vb.VERSION,
            engine_profile=self.resolved.name,
            engine_args_json=self.engine_args_json,
            supports_seed=self.preparer.seed_supported,
        )

    async def abort(self, request_id: str) -> None:
        """Abort a request (idempotent: unknown or finished ids are ignored).

        An abort of a request that run() holds but vLLM has not registered yet is not
        lost: run() does not start it, or repeats the abort at its first output.
        """
        if request_id in self._running:
            self._aborted.add(request_id)
        try:
            await self._llm.abort(request_id)
        except Exception:
            logger.exception("abort of %s failed", request_id)

    def num_unfinished(self) -> int:
        """Sequences in the engine now (a request with n choices counts n)."""
        return vb.unfinished_requests(self._llm)

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine has died."""
        try:
            await self._llm.check_health()
        except vb.EngineDeadError as exc:
            raise EngineDeadError() from exc

    def shutdown(self) -> None:
        """Stop the engine processes."""
        self._llm.shutdown()

    # -------------------------------------------------------------- requests

    async def run(
        self, request_id: str, job: queue_pb2.Job, wanted: Awaitable[bool]
    ) -> AsyncGenerator[pb.ChatEvent, None]:
        """Stream the events of one job: Deltas, a Finished per choice, then Usage.

        Raises RequestError before the first event when the input is invalid, and
        EngineDeadError whenever the engine dies. Closing the iterator aborts the request.
        Yields nothing if ``wanted``, awaited once the prompt is rendered, is false
        (the caller reads it from the queue meanwhile).
        """
        self._running.add(request_id)
        try:
            prepared = await self.preparer.prepare(job)
            observability.stage("prepare")
            if not await wanted or request_id in self._aborted:
                return
            observability.stage("lease")
            async with contextlib.aclosing(self._generate(request_id, job, prepared)) as events:
                async for event in events:
                    yield event
        finally:
            self._running.discard(request_id)
            self._aborted.discard(request_id)

    async def _generate(
        self, request_id: str, job: queue_pb2.Job, prepared: Prepared
    ) -> AsyncGenerator[pb.ChatEvent, None]:
        if prepared.exhausted:
            for event in continuation.finish_exhausted(prepared.prompt, prepared.stream):
                yield event
            return
        stream = self._llm.generate(
            prepared.prompt,
            prepared.params,
            request_id,
            trace_headers=observability.engine_trace_headers(job),
            priority=prepared.priority,
            **prepared.generate_kwargs,
        )
        async with contextlib.aclosing(stream):
            started = reaborted = False
            while True:
                try:
                    output = await anext(stream)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    raise _translate(exc, prepared, started) from exc
                if request_id in self._aborted and not reaborted and not output.finished:
                    reaborted = True  # the abort may have come before vLLM knew the id
                    await self._llm.abort(request_id)
                for event in prepared.stream.feed(output):
                    started = True
                    yield event
        for event in prepared.stream.close():
            yield event


# ------------------------------------------------------------------ helpers


def _resolve(
    profile: EngineProfile | str | WorkerSettings, overrides: Overrides | None
) -> ResolvedProfile:
    if isinstance(profile, EngineProfile | str):
        return resolve(profile, overrides)
    return resolve(profile.profile, overrides or Overrides.from_settings(profile))


def _json(args: dict[str, Any]) -> str:
    """Engine arguments as a JSON object (config objects by their text)."""
    return json.dumps(args, sort_keys=True, default=str)


async def _ensure_model(resolved: ResolvedProfile) -> None:
    """Build the tiny checkpoint for cpu-tiny when its directory holds none yet."""
    path = Path(resolved.model)
    if resolved.name != CPU_TINY or (path / "config.json").is_file():
        return
    from worker.tiny_model import build_tiny_model

    logger.info("no checkpoint in %s: building the tiny model", path)
    await asyncio.to_thread(build_tiny_model, path)


def _translate(exc: BaseException, prepared: Prepared, started: bool) -> BaseException:
    """The API error for an exception out of ``AsyncLLM.generate``."""
    if isinstance(exc, vb.EngineDeadError | EngineDeadError):
        return EngineDeadError()
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, vb.OVERLOAD_ERRORS):
        message = str(getattr(exc, "message", exc))
        return RequestError(RESOURCE_EXHAUSTED, "", message, retryable=True)
    cause = exc.__cause__ if isinstance(exc, vb.EngineGenerateError) else exc
    if not started and isinstance(cause, vb.VLLMValidationError | ValueError | TypeError):
        text = str(cause).lower()
        structured = prepared.structured_field
        if structured and any(word in text for word in STRUCTURED_WORDS):
            return input_error(cause, structured)
        return input_error(cause, prepared.prompt_field)
    logger.error("generation failed: %r", exc)
    return RequestError(INTERNAL, "", f"generation failed: {exc}", retryable=True)
