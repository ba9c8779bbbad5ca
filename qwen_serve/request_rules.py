"""Every request rule's field name, limit and wording, shared by router and worker.

Each rule is checked in one place. The router (``router/validation.py``) checks all
that needs no engine: ids, field shapes and ranges, tool definitions, JSON Schemas,
structured-output constraints, image sources and declared types, placeholders in
chat text. The worker checks only what needs its engine or the decoded input: the
image count and seeds its engine takes, token counts against the context, token ids
against the vocabulary, placeholders against the tokenizer, images once fetched and
decoded (``worker/images.py``), and what vLLM itself refuses.

Both build their errors here, so a condition reads the same wherever it is found.
The few checks the worker needs to convert a job safely (a role's name, an image's
source, a data: URL, the prompt, the image count) are functions here that the
router calls too. Image types live in ``qwen_serve.image_types`` and JSON parsing,
with its depth limit, in ``qwen_serve.jsontext``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from qwen_serve import jsontext
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import NOT_FOUND, RequestError, invalid

# ------------------------------------------------------------------ limits

CLIENT_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{8,64}")
TOOL_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_N: Final = 8
MAX_STOP: Final = 16
MAX_TOP_LOGPROBS: Final = 20
ROLES: Final[Mapping[int, str]] = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
}
"""API roles -> the role names of OpenAI-style messages (what chat templates read)."""
RESERVED_TEMPLATE_KWARGS: Final = frozenset(
    {"chat_template", "tools", "documents", "messages", "tokenize"}
    | {"add_generation_prompt", "continue_final_message"}
)
"""Chat template kwargs the server sets itself."""
BOOLEAN_TEMPLATE_KWARGS: Final = frozenset({"enable_thinking", "thinking"})
"""Template switches that vLLM's reasoning parsers read too: they must be booleans."""
DEFAULT_TOOL_SCHEMA: Final = '{"type": "object"}'
"""A tool's parameters when it declares none."""
IMAGE_PLACEHOLDER: Final = "<|image_pad|>"
VIDEO_PLACEHOLDER: Final = "<|video_pad|>"
PLACEHOLDERS: Final = (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
"""The model's media placeholder tokens: the server writes them, never the client."""

# ------------------------------------------------------------------ field names

MESSAGES: Final = "messages"
PROMPT: Final = "prompt"
"""A GenerateRequest's prompt: one of ``text`` and ``token_ids``."""
TEXT: Final = "text"
TOKEN_IDS: Final = "token_ids"
TOKEN_ID_LIST: Final = "token_ids.ids"
IMAGES: Final = "images"
TOOL_CHOICE: Final = "tool_choice"
TOOL_CHOICE_MODE: Final = "tool_choice.mode"
TOOL_CHOICE_FUNCTION: Final = "tool_choice.function_name"
TEMPLATE_KWARGS: Final = "chat_template_kwargs_json"
STRUCTURED: Final = "structured_output"


def message_field(i: int) -> str:
    """The field of the ``i``-th message."""
    return f"{MESSAGES}[{i}]"


def part_field(message: str, k: int) -> str:
    """The field of the ``k``-th content part of the message at ``message``."""
    return f"{message}.content[{k}]"


def image_part_field(message: str, k: int) -> str:
    """The field of the image of the ``k``-th content part of the message at ``message``."""
    return f"{part_field(message, k)}.image"


def tool_call_field(message: str, j: int) -> str:
    """The field of the ``j``-th tool call of the message at ``message``."""
    return f"{message}.tool_calls[{j}]"


def tool_field(j: int, name: str) -> str:
    """A field of the ``j``-th tool: ``name`` or ``parameters_json_schema``."""
    return f"tools[{j}].{name}"


def generate_image_field(i: int) -> str:
    """The field of the ``i``-th image of a GenerateRequest."""
    return f"{IMAGES}[{i}]"


def sampling_field(name: str) -> str:
    """The field of the sampling setting ``name``."""
    return f"sampling.{name}"


def structured_field(so: pb.StructuredOutput) -> str | None:
    """The field of the request's output constraint, if any."""
    kind = so.WhichOneof("kind")
    return None if kind is None else f"{STRUCTURED}.{kind}"


def prompt_field(req: pb.GenerateRequest) -> str:
    """The field of a GenerateRequest's prompt: ``text`` or ``token_ids``."""
    return TEXT if req.WhichOneof("prompt") == TEXT else TOKEN_IDS


# ------------------------------------------------------------------ any field, ids and model


def empty(field: str) -> RequestError:
    """A field that must be set and is not (message content, a name, a constraint, ...)."""
    return invalid(field, "must not be empty")


def bad_client_id() -> RequestError:
    return invalid("client_request_id", "must be 1-128 characters of [A-Za-z0-9._:-]")


def bad_request_id() -> RequestError:
    return invalid("request_id", "not a request id issued by this service")


def model_not_served(model: str, served: str) -> RequestError:
    return RequestError(NOT_FOUND, "model", f"{model!r} is not served here; use {served!r}")


def check_image_count(count: int, limit: int | None, field: str) -> None:
    """At most ``limit`` images per prompt (None: no known limit)."""
    if limit is not None and count > limit:
        raise invalid(field, f"{count} images; at most {limit} per prompt")


def seed_unsupported() -> RequestError:
    return invalid(
        sampling_field("seed"),
        "per-request seeds are not supported by this engine (CPU with chunked prefill)",
    )


# ------------------------------------------------------------------ token budget


def max_tokens_fill_context(max_tokens: int, context: int) -> RequestError:
    return invalid(
        sampling_field("max_tokens"),
        f"{max_tokens} leaves no room for the prompt in a context of {context} tokens",
    )


def prompt_fills_context(field: str, prompt_len: int, context: int) -> RequestError:
    return invalid(
        field,
        f"the prompt has {prompt_len} tokens, leaving no room for output in the "
        f"context of {context} tokens",
    )


def max_tokens_do_not_fit(max_tokens: int, prompt_len: int, context: int) -> RequestError:
    return invalid(
        sampling_field("max_tokens"),
        f"{max_tokens} output tokens do not fit: the prompt has {prompt_len} tokens "
        f"and the context holds {context}",
    )


def token_id_outside_vocab(field: str, token: int, vocab_size: int) -> RequestError:
    return invalid(field, f"token id {token} is not below {vocab_size}")


def prompt_too_short(field: str) -> RequestError:
    return invalid(field, "the CPU engine needs a prompt of at least 2 tokens")


# ------------------------------------------------------------------ prompts and messages


def check_prompt(req: pb.GenerateRequest) -> str:
    """The prompt's kind (``text`` or ``token_ids``), which must be set and not empty."""
    kind = req.WhichOneof("prompt")
    if kind is None or (kind == TEXT and not req.text):
        raise invalid(PROMPT if kind is None else TEXT, "a prompt (text or token_ids) is required")
    if kind == TOKEN_IDS and not req.token_ids.ids:
        raise empty(TOKEN_ID_LIST)
    return TEXT if kind == TEXT else TOKEN_IDS


def no_messages() -> RequestError:
    return invalid(MESSAGES, "at least one message is required")


def role_name(role: int, message: str) -> str:
    """The OpenAI role name of an API role; INVALID_ARGUMENT for an unset or unknown one."""
    name = ROLES.get(role)
    if name is None:
        raise invalid(f"{message}.role", "must be SYSTEM, USER, ASSISTANT or TOOL")
    return name


def empty_part(part: str) -> RequestError:
    return invalid(part, "part has neither text nor image")


def image_outside_user(image: str) -> RequestError:
    return invalid(image, "images are allowed in user messages")


def assistant_only(message: str, attribute: str, what: str) -> RequestError:
    """``what`` (``message.attribute``) is set on a message that is not the assistant's."""
    return invalid(f"{message}.{attribute}", f"only assistant messages carry {what}")


def no_tool_call_id(message: str) -> RequestError:
    return invalid(f"{message}.tool_call_id", "tool messages must name the call they answer")


def placeholder_in_text(field: str, token: str) -> RequestError:
    return invalid(
        field,
        f"contains {token}, a placeholder the server adds for each image part; "
        "send images as image parts",
    )


def video_in_prompt(field: str) -> RequestError:
    return invalid(field, f"the prompt holds {VIDEO_PLACEHOLDER}: video is not supported")


def placeholders_without_images(field: str, placeholders: int, images: int) -> RequestError:
    return invalid(
        field,
        f"the prompt holds {placeholders} {IMAGE_PLACEHOLDER} placeholders for {images} "
        "images: send exactly one image per placeholder",
    )


def images_without_placeholders(images: int, placeholders: int) -> RequestError:
    return invalid(
        IMAGES,
        f"{images} images for {placeholders} {IMAGE_PLACEHOLDER} placeholders in the prompt: "
        "put one placeholder per image in the prompt",
    )


# ------------------------------------------------------------------ images


def empty_image(field: str) -> RequestError:
    return invalid(field, "image is empty")


def image_source(image: pb.Image, field: str) -> str:
    """Where an image's bytes are: ``data``, ``data_url`` or ``http`` (an http(s) URL)."""
    source = image.WhichOneof("source")
    if source is None:
        raise invalid(field, "image has neither data nor url")
    if source == "data":
        if not image.data:
            raise empty_image(field)
        return "data"
    if image.url.startswith("data:"):
        return "data_url"
    if image.url.startswith(("http://", "https://")):
        return "http"
    raise invalid(f"{field}.url", "must be a data: URL or an http(s) URL")


def split_data_url(url: str, field: str) -> tuple[str, str]:
    """(declared MIME type, base64 payload) of a ``data:<mime>;base64,<data>`` URL."""
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:") or not header.endswith(";base64"):
        raise invalid(field, "expected a data:<mime>;base64,<data> URL")
    return header[len("data:") : -len(";base64")], payload


# ------------------------------------------------------------------ tools and JSON


def bad_tool_name(j: int) -> RequestError:
    return invalid(tool_field(j, "name"), "must be 1-64 characters of [A-Za-z0-9_-]")


def duplicate_tool(j: int, name: str) -> RequestError:
    return invalid(tool_field(j, "name"), f"duplicate tool {name!r}")


def tool_schema(tool: pb.Tool, j: int) -> dict[str, Any]:
    """A tool's parameter schema as a JSON object (``{"type": "object"}`` when unset)."""
    field = tool_field(j, "parameters_json_schema")
    return jsontext.load_object(tool.parameters_json_schema or DEFAULT_TOOL_SCHEMA, field)


def schema_unsatisfiable(field: str, reason: str) -> RequestError:
    return invalid(field, f"no value can match this schema: {reason}")


def schema_uri_not_string(field: str) -> RequestError:
    return invalid(field, '"$schema" must be a URI string')


def schema_invalid(field: str, reason: str) -> RequestError:
    return invalid(field, f"not a valid JSON Schema: {reason}")


def unknown_tool_choice(mode: int) -> RequestError:
    return invalid(TOOL_CHOICE_MODE, f"unknown mode {mode}")


def tool_choice_needs_tools(field: str, mode: str) -> RequestError:
    return invalid(field, f"{mode} needs at least one tool")


def unknown_tool_choice_function() -> RequestError:
    return invalid(TOOL_CHOICE_FUNCTION, "must name one of the tools")


def reserved_template_kwargs(names: list[str]) -> RequestError:
    return invalid(TEMPLATE_KWARGS, f"may not set {', '.join(names)}")


def template_switch_not_boolean(name: str) -> RequestError:
    return invalid(TEMPLATE_KWARGS, f"{name} must be true or false")


# ------------------------------------------------------------------ structured output


def bad_regex(field: str, reason: str) -> RequestError:
    return invalid(field, f"not a valid regex: {reason}")


def regex_too_deep(field: str) -> RequestError:
    return invalid(field, "groups nested too deeply")


def regex_unsatisfiable(field: str, reason: str) -> RequestError:
    return invalid(field, f"no string can match this regex: {reason}")


def bad_choices(field: str) -> RequestError:
    return invalid(field, "at least one choice is required, and none may be empty")


# ------------------------------------------------------------------ sampling


def not_finite(name: str) -> RequestError:
    return invalid(sampling_field(name), "must be a finite number")


def out_of_range(name: str, value: float, bound: str) -> RequestError:
    return invalid(sampling_field(name), f"{value} is out of range {bound}")


def sampling_rule(name: str, rule: str) -> RequestError:
    """A sampling setting that breaks ``rule`` (e.g. "must be in (0, 1]")."""
    return invalid(sampling_field(name), rule)


def bad_stop() -> RequestError:
    return invalid(sampling_field("stop"), f"at most {MAX_STOP} non-empty strings")
