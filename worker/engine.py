"""The worker's vLLM engine: the only place in the project that runs vLLM.

:class:`Engine` wraps ``vllm.v1.engine.async_llm.AsyncLLM`` (``vllm.AsyncLLMEngine``);
what it needs of vLLM's internals, and every difference between the supported vLLM
versions, comes through ``worker.vllm_boundary``.
For each queued job it renders the prompt with vLLM's renderer (the model's chat
template, images, tools), builds ``SamplingParams`` (``worker.requests``), streams
``AsyncLLM.generate`` with DELTA outputs and turns them into API events with vLLM's
qwen3 / qwen3_coder parsers (``worker.events``). Invalid input raises
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import (
    INTERNAL,
    RESOURCE_EXHAUSTED,
    EngineDeadError,
    RequestError,
    clean,
    invalid,
    readable,
)
from qwen_serve.queue.v1 import queue_pb2
from qwen_serve.settings import WorkerSettings
from worker import continuation, detokenize, observability, placeholders, requests
from worker import vllm_boundary as vb
from worker.events import TOOL_CALL_END, RequestStream, request_stream
from worker.images import ImagePolicy, load_images
from worker.profiles import CPU_TINY, EngineProfile, Overrides, ResolvedProfile, resolve

logger = logging.getLogger(__name__)

STRUCTURED_WORDS = ("grammar", "regex", "schema", "json", "choice", "structured", "xgrammar")


@dataclass
class Prepared:
    """A job rendered and ready for ``AsyncLLM.generate``."""

    prompt: Any
    params: Any
    priority: int
    stream: RequestStream
    prompt_field: str
    structured_field: str | None
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    exhausted: bool = False
    """A continuation whose earlier attempt delivered every token: nothing to generate."""


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
        self.image_policy = image_policy or ImagePolicy()
        self.engine_args_json = _json(engine_args or dict(resolved.engine_args))
        vocab = llm.renderer.tokenizer.get_vocab()
        self._call_end_id: int | None = vocab.get(TOOL_CALL_END) if parser_cls else None
        self._placeholder_ids = placeholders.token_ids(vocab)
        config = llm.vllm_config
        self._defaults: dict[str, Any] = llm.model_config.get_diff_sampling_param()
        self.max_context: int = llm.model_config.max_model_len
        self.vocab_size: int = llm.model_config.get_vocab_size()
        chunked = bool(config.scheduler_config.enable_chunked_prefill)
        self.seed_supported = resolved.seed_supported or not chunked
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
            max_context_tokens=self.max_context,
            max_images_per_prompt=self.resolved.max_images_per_prompt,
            supports_vision=bool(self._llm.model_config.is_multimodal_model),
            supports_tools=cls is not None and cls.tool_parser_cls is not None,
            supports_reasoning=cls is not None and cls.reasoning_parser_cls is not None,
            supports_structured_output=True,
            reasoning_parser=self.resolved.reasoning_parser,
            tool_call_parser=self.resolved.tool_parser,
            vocab_size=self.vocab_size,
            engine_version=vb.VERSION,
            engine_profile=self.resolved.name,
            engine_args_json=self.engine_args_json,
            supports_seed=self.seed_supported,
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
            prepared = await self._prepare(job)
            if not await wanted or request_id in self._aborted:
                return
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

    async def _prepare(self, job: queue_pb2.Job) -> Prepared:
        kind = job.WhichOneof("request")
        if kind == "chat":
            prepared = await self._prepare_chat(job.chat)
        elif kind == "generate":
            prepared = await self._prepare_generate(job.generate)
        else:
            raise invalid("request", "the job carries no request")
        if job.continuation_token_ids:
            prepared.exhausted = not continuation.apply(
                prepared.prompt,
                prepared.params,
                prepared.stream,
                list(job.continuation_token_ids),
                self._llm.renderer.tokenizer,
            )
        return prepared

    def _check_seed(self, sampling: pb.SamplingParams) -> None:
        if sampling.HasField("seed") and not self.seed_supported:
            raise invalid(
                "sampling.seed",
                "per-request seeds are not supported by this engine (CPU with chunked prefill)",
            )

    def _check_images(self, count: int, field_name: str) -> None:
        limit = self.resolved.max_images_per_prompt
        if count > limit:
            raise invalid(field_name, f"{count} images; at most {limit} per prompt")

    def _tok_params(self, sampling: pb.SamplingParams, *, chat: bool) -> Any:
        return vb.TokenizeParams(
            max_total_tokens=self.max_context,
            max_output_tokens=min(sampling.max_tokens, self.max_context),
            add_special_tokens=not chat,
            max_total_tokens_param="max_context_tokens",
            max_output_tokens_param="sampling.max_tokens",
        )

    async def _prepare_chat(self, req: pb.ChatRequest) -> Prepared:
        refs = requests.image_refs(req)
        self._check_images(len(refs), "messages")
        placeholders.check_chat(req)
        self._check_seed(req.sampling)
        tool_dicts = requests.tools(req)
        template_kwargs = requests.chat_template_kwargs(req)
        messages = requests.chat_messages(req, await load_images(refs, self.image_policy))
        vreq = requests.vllm_chat_request(
            messages,
            tool_dicts,
            requests.tool_choice(req),
            template_kwargs,
            requests.structured_outputs(req.structured_output),
        )
        kwargs_field = "chat_template_kwargs_json" if req.chat_template_kwargs_json else "tools"
        parser, vreq = self._parser_for(vreq, template_kwargs, kwargs_field)
        prompt = await self._render_chat(messages, tool_dicts, template_kwargs, req.sampling)
        prompt_ids: list[int] = list(prompt["prompt_token_ids"])
        params = requests.sampling_params(
            req.sampling,
            req.structured_output,
            self._defaults,
            self.max_context,
            len(prompt_ids),
            skip_special_tokens=vreq.skip_special_tokens,
        )
        params.structured_outputs = vreq.structured_outputs
        parsers = [parser] + [self._new_parser(vreq, template_kwargs) for _ in range(params.n - 1)]
        reasoning_kwargs = None
        if parser is not None and parser.reasoning_parser is not None:
            reasoning_kwargs = {"chat_template_kwargs": template_kwargs}
        constraint = requests.constraint_field(req)
        return Prepared(
            prompt=prompt,
            params=params,
            priority=requests.priority(req.priority),
            stream=request_stream(
                parsers,
                vreq,
                req.sampling,
                self._call_end_id,
                [vb.ReasoningCounter(p) if p is not None else None for p in parsers],
                constraint,
            ),
            prompt_field="messages",
            structured_field=constraint,
            generate_kwargs={
                "reasoning_ended": vb.reasoning_ended(vreq, parser, prompt_ids),
                "reasoning_parser_kwargs": reasoning_kwargs,
            },
        )

    def _parser_for(
        self, vreq: Any, template_kwargs: dict[str, Any], field_name: str
    ) -> tuple[Any, Any]:
        """A parser for ``vreq`` and the request as the parser adjusts it.

        The parsers read the template kwargs and tools: what they refuse is bad input.
        """
        try:
            parser = self._new_parser(vreq, template_kwargs)
            return parser, vreq if parser is None else parser.adjust_request(vreq)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise invalid(field_name, f"vLLM's parsers refused it: {readable(exc)}") from exc

    def _new_parser(self, vreq: Any, template_kwargs: dict[str, Any]) -> Any:
        if self._parser_cls is None:
            return None
        return self._parser_cls(
            self._llm.renderer.tokenizer,
            vreq.tools,
            chat_template_kwargs=template_kwargs,
            model_config=self._llm.model_config,
        )

    async def _render_chat(
        self,
        messages: list[dict[str, Any]],
        tool_dicts: list[dict[str, Any]] | None,
        template_kwargs: dict[str, Any],
        sampling: pb.SamplingParams,
    ) -> Any:
        mm_config = self._llm.model_config.multimodal_config
        chat_params = vb.ChatParams(
            chat_template_kwargs=vb.merge_kwargs(
                template_kwargs,
                {
                    "add_generation_prompt": True,
                    "continue_final_message": False,
                    "tools": tool_dicts,
                },
            ),
            media_io_kwargs=mm_config.media_io_kwargs if mm_config else None,
        )
        try:
            _, (prompt,) = await self._llm.renderer.render_chat_async(
                [messages], chat_params, self._tok_params(sampling, chat=True)
            )
        except (
            vb.VLLMValidationError,
            ValueError,
            TypeError,
            AssertionError,
            jinja2.TemplateError,
        ) as exc:
            raise _input_error(exc, "messages") from exc
        return prompt

    async def _prepare_generate(self, req: pb.GenerateRequest) -> Prepared:
        prompt_field = "text" if req.WhichOneof("prompt") == "text" else "token_ids"
        self._check_images(len(req.images), "images")
        placeholders.check_generate(req, self._placeholder_ids)
        self._check_seed(req.sampling)
        refs = [(f"images[{i}]", image) for i, image in enumerate(req.images)]
        decoded = await load_images(refs, self.image_policy)
        raw = requests.generate_prompt(req, self.vocab_size, list(decoded.values()))
        try:
            (prompt,) = await self._llm.renderer.render_cmpl_async(
                [vb.parse_model_prompt(self._llm.model_config, raw)],
                self._tok_params(req.sampling, chat=False),
            )
        except (vb.VLLMValidationError, ValueError, TypeError, AssertionError) as exc:
            # AssertionError: vLLM's multimodal processor found no placeholder for an image.
            raise _input_error(exc, "images" if req.images else prompt_field) from exc
        if self.resolved.profile.device == "cpu" and len(prompt["prompt_token_ids"]) < 2:
            # vLLM 0.32's CPU causal-conv kernel kills the engine on a one-token prompt.
            raise invalid(prompt_field, "the CPU engine needs a prompt of at least 2 tokens")
        params = requests.sampling_params(
            req.sampling,
            req.structured_output,
            self._defaults,
            self.max_context,
            len(prompt["prompt_token_ids"]),
            prompt_field=prompt_field,
        )
        constraint = requests.constraint_field(req)
        stream = request_stream([None] * params.n, None, req.sampling, None, constraint=constraint)
        detokenize.fix_prompt_echo(
            stream,
            self._llm.renderer.tokenizer,
            prompt["prompt_token_ids"],
            params.skip_special_tokens,
        )
        return Prepared(
            prompt=prompt,
            params=params,
            priority=requests.priority(req.priority),
            stream=stream,
            prompt_field=prompt_field,
            structured_field=constraint,
            # Raw completions have no reasoning phase: constrain from the first token.
            generate_kwargs={"reasoning_ended": True},
        )


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


def _input_error(exc: BaseException, field_name: str) -> RequestError:
    """INVALID_ARGUMENT for an input vLLM rejected, naming the most specific field known."""
    if isinstance(exc, vb.VLLMValidationError):
        parameter = exc.parameter or ""
        if parameter.startswith("sampling."):
            field_name = parameter
        elif parameter in requests.SAMPLING_FIELDS:
            field_name = requests.SAMPLING_FIELDS[parameter]
        message = clean(str(exc.args[0]) if exc.args else str(exc))
    elif isinstance(exc, AssertionError):
        message = f"the prompt does not match its images: {exc}"
    else:
        message = readable(exc)
    return invalid(field_name, message)


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
            return _input_error(cause, structured)
        return _input_error(cause, prepared.prompt_field)
    logger.error("generation failed: %r", exc)
    return RequestError(INTERNAL, "", f"generation failed: {exc}", retryable=True)
