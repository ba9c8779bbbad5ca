"""The image types a request may carry: one list for the router's checks and the
worker's decoding, and the words both use to refuse another."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

IMAGE_FORMATS: Final[Mapping[str, str]] = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
}
"""Accepted MIME types -> the Pillow format allowed to decode them."""
MIME_ALIASES: Final[Mapping[str, str]] = {"image/jpg": "image/jpeg"}
ACCEPTED: Final = "PNG, JPEG, WebP or GIF"
"""The accepted types, as messages name them."""


def canonical_mime(mime: str) -> str:
    """``mime`` lower-cased, aliases resolved ("" stays "")."""
    lowered = mime.lower()
    return MIME_ALIASES.get(lowered, lowered)


def unsupported(mime: str) -> str | None:
    """Why a declared MIME type is refused, or None if it is accepted (or not given)."""
    declared = canonical_mime(mime)
    if declared and declared not in IMAGE_FORMATS:
        return f"unsupported image type {declared!r}; send {ACCEPTED}"
    return None
