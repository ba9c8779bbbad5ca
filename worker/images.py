"""API images -> what vLLM's renderer takes: data: URLs or decoded PIL images.

Images arrive as bytes (with or without a MIME type) or as ``data:`` URLs. Each is
checked to be PNG, JPEG, WebP or GIF and to decode before it reaches vLLM, so a
corrupt image is an INVALID_ARGUMENT naming its field. Remote http(s) URLs are
refused: the server fetches nothing on a client's behalf (an allow-list may come later).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from typing import Final

from PIL import Image as PILImage

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import invalid

logger = logging.getLogger(__name__)

IMAGE_MIME_TYPES: Final = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})
_SNIFF: Final = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def sniff_mime(data: bytes) -> str | None:
    """MIME type of encoded image bytes from their magic number, if known."""
    for magic, mime in _SNIFF:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _check_image(data: bytes, field: str) -> None:
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as exc:
        raise invalid(field, f"not a decodable image: {exc}") from None


def _data_url_bytes(url: str, field: str) -> tuple[str, bytes]:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise invalid(field, "expected a data:<mime>;base64,<data> URL")
    mime = header[len("data:") : -len(";base64")].lower()
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "data: URL payload is not valid base64") from None
    return mime, data


def image_bytes(image: pb.Image, field: str) -> tuple[str, bytes]:
    """(MIME type, encoded bytes) of an API image, checked to decode.

    Remote http(s) URLs are refused: the server fetches nothing on a client's behalf.
    """
    source = image.WhichOneof("source")
    if source is None:
        raise invalid(field, "image has neither data nor url")
    if source == "url":
        url = image.url.strip()
        if url.lower().startswith(("http://", "https://")):
            raise invalid(f"{field}.url", "remote image URLs are not allowed; send the bytes")
        mime, data = _data_url_bytes(url, f"{field}.url")
    else:
        data = image.data
        mime = image.mime_type.lower() or sniff_mime(data) or ""
    if not data:
        raise invalid(field, "image is empty")
    if mime not in IMAGE_MIME_TYPES:
        raise invalid(field, f"unsupported image type {mime or 'unknown'!r}")
    _check_image(data, field)
    return mime, data


def image_data_url(image: pb.Image, field: str) -> str:
    """A ``data:`` URL of the image's original bytes (vLLM decodes it itself)."""
    mime, data = image_bytes(image, field)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def decode_image(image: pb.Image, field: str) -> PILImage.Image:
    """The image decoded to RGB (first frame of a GIF)."""
    _, data = image_bytes(image, field)
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception as exc:
        raise invalid(field, f"not a decodable image: {exc}") from None
