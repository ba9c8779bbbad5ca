"""Turning a queued job into what ``AsyncLLM.generate`` takes: one call, ``Preparer.prepare``.

A chat is rendered with vLLM's renderer (the model's chat template, images, tools)
and gets vLLM's tool and reasoning parsers; a raw generation is tokenized as sent.
Both get ``SamplingParams`` (``worker.sampling``) and the event stream that turns
the engine's outputs into API events (``worker.events``); a continuation starts
after the tokens its client already has (``worker.continuation``). The router has
checked every rule that needs no engine; here the engine's own limits are checked
(image count, seeds, placeholders against the tokenizer, the context), and input
vLLM refuses raises :class:`~qwen_serve.errors.RequestError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jinja2

from qwen_serve import request_rules as rules
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import RequestError, clean, invalid, readable
from qwen_serve.queue.v1 import queue_pb2
from worker import chat_input, constraints, continuation, detokenize, placeholders, requests
from worker import vllm_boundary as vb
from worker.events import TOOL_CALL_END, RequestStream, request_stream
from worker.images import ImagePolicy, load_images
from worker.profiles import ResolvedProfile
from worker.sampling import sampling_params, vllm_field


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


class Preparer:
    """Renders jobs for one engine: its renderer, model limits, defaults and parsers."""

    def __init__(
        self, llm: Any, resolved: ResolvedProfile, parser_cls: Any, image_policy: ImagePolicy
    ) -> None:
        self._llm = llm
        self.resolved = resolved
        self._parser_cls = parser_cls
        self.image_policy = image_policy
        vocab = llm.renderer.tokenizer.get_vocab()
        self._call_end_id: int | None = vocab.get(TOOL_CALL_END) if parser_cls else None
        self._placeholder_ids = placeholders.token_ids(vocab)
        self._defaults: dict[str, Any] = llm.model_config.get_diff_sampling_param()
        self.max_context: int = llm.model_config.max_model_len
        self.vocab_size: int = llm.model_config.get_vocab_size()
        chunked = bool(llm.vllm_config.scheduler_config.enable_chunked_prefill)
        self.seed_supported = resolved.seed_supported or not chunked

    async def prepare(self, job: queue_pb2.Job) -> Prepared:
        """The job rendered, with its sampling parameters and event stream (RequestError
        naming the field if vLLM refuses its input)."""
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

    def _check_engine_limits(self, sampling: pb.SamplingParams, images: int, field: str) -> None:
        """What this engine takes: ``images`` images (in ``field``) and, maybe, a seed."""
        rules.check_image_count(images, self.resolved.max_images_per_prompt, field)
        if sampling.HasField("seed") and not self.seed_supported:
            raise rules.seed_unsupported()

    def _tok_params(self, sampling: pb.SamplingParams, *, chat: bool) -> Any:
        return vb.TokenizeParams(
            max_total_tokens=self.max_context,
            max_output_tokens=min(sampling.max_tokens, self.max_context),
            add_special_tokens=not chat,
            max_total_tokens_param="max_context_tokens",
            max_output_tokens_param=rules.sampling_field("max_tokens"),
        )

    async def _prepare_chat(self, req: pb.ChatRequest) -> Prepared:
        refs = chat_input.image_refs(req)
        self._check_engine_limits(req.sampling, len(refs), rules.MESSAGES)
        tool_dicts = chat_input.tools(req)
        template_kwargs = chat_input.chat_template_kwargs(req)
        messages = chat_input.chat_messages(req, await load_images(refs, self.image_policy))
        vreq = chat_input.vllm_chat_request(
            messages,
            tool_dicts,
            chat_input.tool_choice(req),
            template_kwargs,
            constraints.structured_outputs(req.structured_output),
        )
        kwargs_field = rules.TEMPLATE_KWARGS if req.chat_template_kwargs_json else "tools"
        parser, vreq = self._parser_for(vreq, template_kwargs, kwargs_field)
        prompt = await self._render_chat(messages, tool_dicts, template_kwargs, req.sampling)
        prompt_ids: list[int] = list(prompt["prompt_token_ids"])
        params = sampling_params(
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
        constraint = constraints.constraint_field(req)
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
            raise input_error(exc, rules.MESSAGES) from exc
        return prompt

    async def _prepare_generate(self, req: pb.GenerateRequest) -> Prepared:
        prompt_field = rules.prompt_field(req)
        self._check_engine_limits(req.sampling, len(req.images), rules.IMAGES)
        placeholders.check_generate(req, self._placeholder_ids)
        refs = [(rules.generate_image_field(i), image) for i, image in enumerate(req.images)]
        decoded = await load_images(refs, self.image_policy)
        raw = requests.generate_prompt(req, self.vocab_size, list(decoded.values()))
        try:
            (prompt,) = await self._llm.renderer.render_cmpl_async(
                [vb.parse_model_prompt(self._llm.model_config, raw)],
                self._tok_params(req.sampling, chat=False),
            )
        except (vb.VLLMValidationError, ValueError, TypeError, AssertionError) as exc:
            # AssertionError: vLLM's multimodal processor found no placeholder for an image.
            raise input_error(exc, rules.IMAGES if req.images else prompt_field) from exc
        if self.resolved.profile.device == "cpu" and len(prompt["prompt_token_ids"]) < 2:
            # vLLM 0.32's CPU causal-conv kernel kills the engine on a one-token prompt.
            raise rules.prompt_too_short(prompt_field)
        params = sampling_params(
            req.sampling,
            req.structured_output,
            self._defaults,
            self.max_context,
            len(prompt["prompt_token_ids"]),
            prompt_field=prompt_field,
        )
        constraint = constraints.constraint_field(req)
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


def input_error(exc: BaseException, field_name: str) -> RequestError:
    """INVALID_ARGUMENT for an input vLLM rejected, naming the most specific field known."""
    if isinstance(exc, vb.VLLMValidationError):
        field_name = vllm_field(exc.parameter or "", field_name)
        message = clean(str(exc.args[0]) if exc.args else str(exc))
    elif isinstance(exc, AssertionError):
        message = f"the prompt does not match its images: {exc}"
    else:
        message = readable(exc)
    return invalid(field_name, message)
