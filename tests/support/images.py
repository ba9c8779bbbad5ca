"""Images for requests: one solid-colour builder, in any format Pillow writes."""

from __future__ import annotations

import base64
import io

from PIL import Image

RED = (200, 30, 40)


def encode(
    fmt: str = "PNG",
    size: tuple[int, int] = (64, 48),
    color: object = None,
    mode: str = "RGB",
) -> bytes:
    """A solid-colour image of ``size`` in ``fmt`` (PNG, JPEG, WEBP, GIF, ...); the
    colour defaults to red (1 in a one-channel ``mode``)."""
    if color is None:
        color = RED if mode in ("RGB", "RGBA") else 1
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)  # type: ignore[arg-type]
    return buffer.getvalue()


def png(size: int = 64, color: tuple[int, int, int] = RED) -> bytes:
    """A square solid-colour PNG."""
    return encode("PNG", (size, size), color=color)


def png_data_url(size: tuple[int, int] = (64, 48)) -> str:
    """A small PNG as a data: URL."""
    return "data:image/png;base64," + base64.b64encode(encode("PNG", size)).decode()
