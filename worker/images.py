"""API images -> decoded RGB images for vLLM's renderer, checked before they reach the engine.

An image arrives as bytes, as a ``data:`` URL or, only for hosts on the worker's
allow-list, as an http(s) URL that the worker fetches with a size and time limit. The
router has checked its source and declared MIME type (``qwen_serve.request_rules``,
whose source and data: URL functions this module uses to read it); the bytes decide
the format. Each image must be PNG, JPEG, WebP or GIF (first frame), at most
``ImagePolicy.max_bytes`` encoded and ``ImagePolicy.max_pixels`` decoded (the
decompression-bomb cap, checked from the header before any pixel is decoded), no more
than 200 times longer than wide or the other way round (Qwen's vision processor refuses
that), and must decode completely. Anything else is INVALID_ARGUMENT naming the part, e.g.
``messages[0].content[1].image``; nothing reaches the engine. Decoding runs in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import aiohttp
from PIL import Image as PILImage

from qwen_serve import request_rules as rules
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import invalid, readable
from qwen_serve.image_types import ACCEPTED, IMAGE_FORMATS
from qwen_serve.settings import WorkerSettings

logger = logging.getLogger(__name__)

_DEFAULTS = WorkerSettings.model_fields
DEFAULT_MAX_BYTES: Final[int] = _DEFAULTS["max_image_bytes"].default
DEFAULT_MAX_PIXELS: Final[int] = _DEFAULTS["max_image_pixels"].default
DEFAULT_FETCH_TIMEOUT_S: Final[float] = _DEFAULTS["image_fetch_timeout_s"].default
"""The image limits by default, as the worker settings declare them."""
MAX_ASPECT_RATIO: Final = 200.0
"""Longest side over shortest side that Qwen's vision processor accepts (``smart_resize``)."""
_CHUNK: Final = 64 * 1024
_SNIFF: Final = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


@dataclass(frozen=True)
class ImagePolicy:
    """Limits on images a worker accepts (from ``WorkerSettings``)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    """Largest encoded image, after base64 decoding."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest width x height (8K UHD by default); larger images are refused unread."""
    url_hosts: frozenset[str] = frozenset()
    """Hosts whose http(s) URLs are fetched; ``*.example.com`` also matches subdomains."""
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    """Time limit of one remote fetch, connection to last byte."""

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> ImagePolicy:
        """The policy the worker settings give."""
        hosts = settings.image_url_hosts
        return cls(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            url_hosts=frozenset(h.strip().lower() for h in hosts if h.strip()),
            fetch_timeout_s=settings.image_fetch_timeout_s,
        )

    def allows_host(self, host: str) -> bool:
        """Whether images may be fetched from ``host``."""
        host = host.lower().rstrip(".")
        return any(
            host == entry or (entry.startswith("*.") and host.endswith(entry[1:]))
            for entry in self.url_hosts
        )


def sniff_mime(data: bytes) -> str | None:
    """MIME type of encoded image bytes from their magic number, if known."""
    for magic, mime in _SNIFF:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


# ------------------------------------------------------------------ decoding


def _to_rgb(img: PILImage.Image) -> PILImage.Image:
    """RGB pixels; transparency is composited onto white (as vLLM and transformers do)."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode(data: bytes, field: str, policy: ImagePolicy) -> PILImage.Image:
    """Checked, fully decoded RGB image (GIF: first frame) of encoded ``data``.

    The bytes decide the format (the declared type is the router's to check).
    """
    if not data:
        raise rules.empty_image(field)
    if len(data) > policy.max_bytes:
        raise invalid(field, f"image has {len(data)} bytes; at most {policy.max_bytes} allowed")
    actual = sniff_mime(data)
    if actual is None:
        raise invalid(field, f"not a {ACCEPTED} image")
    try:
        with PILImage.open(io.BytesIO(data), formats=[IMAGE_FORMATS[actual]]) as img:
            _check_size(*img.size, field, policy)
            img.load()
            return _to_rgb(img)
    except PILImage.DecompressionBombError as exc:
        raise invalid(field, f"image exceeds {policy.max_pixels} pixels: {readable(exc)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise invalid(field, f"not a decodable {actual} image: {readable(exc)}") from None


def _check_size(width: int, height: int, field: str, policy: ImagePolicy) -> None:
    """The header's dimensions against the pixel cap and the model's aspect-ratio limit."""
    if width * height > policy.max_pixels:
        raise invalid(
            field,
            f"image is {width}x{height} = {width * height} pixels; "
            f"at most {policy.max_pixels} allowed",
        )
    if min(width, height) < 1:
        raise invalid(field, f"image is {width}x{height}; both sides must be at least 1 pixel")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise invalid(
            field,
            f"image is {width}x{height}, an aspect ratio of {ratio:.0f}:1; the model's vision "
            f"encoder takes at most {MAX_ASPECT_RATIO:.0f}:1 (pad or crop the image)",
        )


def _data_url_bytes(url: str, field: str, policy: ImagePolicy) -> bytes:
    _, payload = rules.split_data_url(url, field)
    if len(payload) * 3 // 4 > policy.max_bytes + 2:
        raise invalid(field, f"image has more than {policy.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "data: URL payload is not valid base64") from None


# ------------------------------------------------------------------ remote URLs


async def fetch(url: str, field: str, policy: ImagePolicy) -> bytes:
    """The body of an http(s) image URL whose host is allowed, within the size and time limits.

    Redirects are not followed (their target host would escape the allow-list).
    """
    if not policy.url_hosts:
        raise invalid(field, "remote image URLs are not allowed here; send the bytes")
    host = urllib.parse.urlsplit(url).hostname or ""
    if not policy.allows_host(host):
        raise invalid(field, f"host {host!r} is not on this server's image host allow-list")
    timeout = aiohttp.ClientTimeout(total=policy.fetch_timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise invalid(field, f"fetching the image failed: HTTP {response.status}")
            declared = response.content_length
            if declared is not None and declared > policy.max_bytes:
                raise invalid(field, f"image has {declared} bytes; at most {policy.max_bytes}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(_CHUNK):
                body += chunk
                if len(body) > policy.max_bytes:
                    raise invalid(field, f"image has more than {policy.max_bytes} bytes")
            return bytes(body)
    except TimeoutError:
        raise invalid(
            field, f"fetching the image took longer than {policy.fetch_timeout_s:g} s"
        ) from None
    except (aiohttp.ClientError, ValueError) as exc:
        raise invalid(field, f"fetching the image failed: {readable(exc)}") from None


async def image_bytes(image: pb.Image, field: str, policy: ImagePolicy) -> bytes:
    """The encoded bytes of an API image; fetches allowed remote URLs."""
    source = rules.image_source(image, field)
    if source == "data":
        return image.data
    if source == "data_url":
        return _data_url_bytes(image.url.strip(), f"{field}.url", policy)
    return await fetch(image.url.strip(), f"{field}.url", policy)


async def load_image(image: pb.Image, field: str, policy: ImagePolicy) -> PILImage.Image:
    """One API image, fetched if needed, checked and decoded (in a thread)."""
    data = await image_bytes(image, field, policy)
    return await asyncio.to_thread(decode, data, field, policy)


async def load_images(
    refs: Iterable[tuple[str, pb.Image]], policy: ImagePolicy
) -> dict[str, PILImage.Image]:
    """Decoded images by field name; the first bad one (in request order) raises RequestError."""
    refs = list(refs)
    loaded = await asyncio.gather(
        *(load_image(image, field, policy) for field, image in refs), return_exceptions=True
    )
    out: dict[str, PILImage.Image] = {}
    for (field, _), result in zip(refs, loaded, strict=True):
        if isinstance(result, BaseException):
            raise result
        out[field] = result
    return out
