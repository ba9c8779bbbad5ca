"""Messages and images: small builders for the conversation of a ChatRequest.

::

    messages = [
        system("You are concise."),
        user("What is in this picture?", image("cat.jpg")),
    ]
    # after the model called a tool:
    messages += [result.message(), tool_result(call, {"temperature_c": 21})]
"""

from __future__ import annotations

import io
import json
import mimetypes
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeAlias, runtime_checkable

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve_client.events import ToolCall

MAX_IMAGE_BYTES = 20 * 1024 * 1024
"""Client-side cap on one encoded image (the router also caps whole messages)."""

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


@runtime_checkable
class PILImageLike(Protocol):
    """What is used of ``PIL.Image.Image`` (Pillow is not a dependency of the client)."""

    mode: str

    def save(self, fp: Any, format: str | None = None) -> None:
        """Encode into ``fp``."""


ImageSource: TypeAlias = "pb.Image | Path | bytes | PILImageLike | str"
"""A path (``Path``, or ``str`` naming an existing file), encoded bytes, a PIL image,
a ``data:``/``http(s):`` URL string, or a ready ``pb.Image``."""

Part: TypeAlias = "str | pb.ContentPart | pb.Image | Path | bytes | PILImageLike"
"""A content part: ``str`` is text; everything else is an image."""

MessageLike: TypeAlias = "pb.Message | str"
"""A message, or a plain string for one user message."""


def sniff_mime_type(data: bytes) -> str:
    """The MIME type of encoded image bytes by their magic number ("" when unknown)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return ""


def image_from_bytes(data: bytes, mime_type: str = "") -> pb.Image:
    """An image from encoded bytes (PNG, JPEG, WebP, GIF); the type is sniffed if not given."""
    if not data:
        raise ValueError("image data is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image is {len(data)} bytes; at most {MAX_IMAGE_BYTES}")
    return pb.Image(data=data, mime_type=mime_type or sniff_mime_type(data))


def image_from_path(path: str | Path) -> pb.Image:
    """An image read from a file."""
    data = Path(path).read_bytes()
    guessed = mimetypes.guess_type(str(path))[0] or ""
    return image_from_bytes(data, sniff_mime_type(data) or guessed)


def image_from_pil(img: PILImageLike, format: str = "PNG") -> pb.Image:
    """An image from a PIL image, encoded as PNG (or ``format``, e.g. "JPEG")."""
    buffer = io.BytesIO()
    img.save(buffer, format=format)
    return image_from_bytes(buffer.getvalue(), f"image/{format.lower()}")


def image_from_url(url: str) -> pb.Image:
    """An image by ``data:`` URL, or an http(s) URL the server is configured to fetch."""
    if not url.startswith(("data:", "http://", "https://")):
        raise ValueError(f"not a data:, http: or https: URL: {url[:40]!r}")
    return pb.Image(url=url)


def image(source: ImageSource) -> pb.Image:
    """An image from any :data:`ImageSource`."""
    if isinstance(source, pb.Image):
        return source
    if isinstance(source, bytes | bytearray | memoryview):
        return image_from_bytes(bytes(source))
    if isinstance(source, Path):
        return image_from_path(source)
    if isinstance(source, str):
        if source.startswith(("data:", "http://", "https://")):
            return image_from_url(source)
        return image_from_path(source)
    if isinstance(source, PILImageLike):
        return image_from_pil(source)
    raise TypeError(f"cannot make an image of {type(source).__name__}")


def part(value: Part) -> pb.ContentPart:
    """A content part: ``str`` is text, anything else is an image."""
    if isinstance(value, pb.ContentPart):
        return value
    if isinstance(value, str):
        return pb.ContentPart(text=value)
    return pb.ContentPart(image=image(value))


def system(text: str) -> pb.Message:
    """A system message."""
    return pb.Message(role=pb.ROLE_SYSTEM, content=[pb.ContentPart(text=text)])


def user(*parts: Part) -> pb.Message:
    """A user message of text and images, in order: ``user("What is this?", Path("a.png"))``."""
    if not parts:
        raise ValueError("a user message needs at least one part")
    return pb.Message(role=pb.ROLE_USER, content=[part(p) for p in parts])


def assistant(
    content: str = "", tool_calls: Iterable[ToolCall | pb.ToolCall] = (), reasoning: str = ""
) -> pb.Message:
    """An earlier assistant turn (its text, reasoning and tool calls)."""
    calls = [c.to_proto() if isinstance(c, ToolCall) else c for c in tool_calls]
    parts = [pb.ContentPart(text=content)] if content else []
    return pb.Message(role=pb.ROLE_ASSISTANT, content=parts, tool_calls=calls, reasoning=reasoning)


def tool_result(call: ToolCall | pb.ToolCall | str, result: Any) -> pb.Message:
    """The answer to a tool call: ``result`` as text (str) or as JSON (anything else).

    ``call`` is the call (or its id) the result answers.
    """
    call_id = call if isinstance(call, str) else call.id
    if not call_id:
        raise ValueError("the tool call has no id")
    text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
    return pb.Message(role=pb.ROLE_TOOL, tool_call_id=call_id, content=[pb.ContentPart(text=text)])


def messages_of(messages: MessageLike | Sequence[MessageLike]) -> list[pb.Message]:
    """A conversation from a string (one user turn), a message, or a list of either."""
    if isinstance(messages, str | pb.Message):
        messages = [messages]
    out = [user(m) if isinstance(m, str) else m for m in messages]
    if not out:
        raise ValueError("at least one message is required")
    return out
