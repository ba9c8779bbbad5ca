"""Image checks (worker/images.py): formats, limits, data: URLs and the remote-URL allow-list.

What needs no decoding (the source, a data: URL's form, the declared type) is the
router's rule (router/validation.py), in the same words; those cases go through it too.

Remote fetching is tested against a real HTTP server on 127.0.0.1 (``http.server`` in a
thread): an allowed host is fetched, any other host is refused without a connection,
too-large bodies, redirects, errors and slow servers are refused.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image as PILImage

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import INVALID_ARGUMENT, RequestError
from qwen_serve.settings import WorkerSettings
from router import validation
from tests.support import images
from worker import chat_input
from worker.images import ImagePolicy, decode, load_images, sniff_mime

RED, BLUE = images.RED, (20, 40, 220)


encode = functools.partial(images.encode, size=(40, 30))
"""A small image of one colour (red unless told), encoded as the format given."""


def animated_gif() -> bytes:
    """A two-frame GIF: red, then blue."""
    frames = [PILImage.new("RGB", (16, 16), c) for c in (RED, BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def data_url(data: bytes, mime: str = "image/png") -> str:
    """A base64 data: URL."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def load(image: pb.Image, policy: ImagePolicy | None = None) -> PILImage.Image:
    """One image through the worker's loader, as field ``images[0]``."""
    decoded = asyncio.run(load_images([("images[0]", image)], policy or ImagePolicy()))
    return decoded["images[0]"]


def rejected(image: pb.Image, policy: ImagePolicy | None = None) -> RequestError:
    """The RequestError the loader raises for ``image``."""
    with pytest.raises(RequestError) as excinfo:
        load(image, policy)
    assert excinfo.value.code == INVALID_ARGUMENT
    return excinfo.value


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_each_format_decodes_to_rgb_with_or_without_a_mime_type(fmt: str) -> None:
    data = encode(fmt)
    mime = f"image/{fmt.lower()}"
    assert sniff_mime(data) == mime
    for image in (pb.Image(data=data), pb.Image(data=data, mime_type=mime)):
        img = load(image)
        assert (img.mode, img.size) == ("RGB", (40, 30))
    assert load(pb.Image(url=data_url(data, mime))).size == (40, 30)


def test_gif_gives_its_first_frame() -> None:
    img = load(pb.Image(data=animated_gif(), mime_type="image/gif"))
    red = img.getpixel((8, 8))
    assert isinstance(red, tuple) and red[0] > 150 and red[2] < 100


def test_transparency_is_composited_onto_white() -> None:
    clear = encode("PNG", color=(0, 0, 0, 0), mode="RGBA")
    assert load(pb.Image(data=clear)).getpixel((0, 0)) == (255, 255, 255)


def test_jpg_alias_is_accepted() -> None:
    assert load(pb.Image(data=encode("JPEG"), mime_type="image/jpg")).size == (40, 30)


# ------------------------------------------------------------------ bad images


def _bad_cases() -> dict[str, tuple[pb.Image, str, str]]:
    png = encode("PNG", size=(64, 64), color=RED)
    jpeg = encode("JPEG", size=(64, 64))
    return {
        "no source": (pb.Image(), "images[0]", "neither data nor url"),
        "empty bytes": (pb.Image(data=b"", mime_type="image/png"), "images[0]", "empty"),
        "truncated PNG": (pb.Image(data=png[: len(png) // 2]), "images[0]", "not a decodable"),
        "truncated JPEG": (pb.Image(data=jpeg[: len(jpeg) // 2]), "images[0]", "not a decodable"),
        "corrupt PNG": (
            pb.Image(data=png[:40] + b"\x00" * (len(png) - 40)),
            "images[0]",
            "not a decodable",
        ),
        "unsupported declared type": (
            pb.Image(data=encode("BMP"), mime_type="image/bmp"),
            "images[0]",
            "unsupported image type 'image/bmp'",
        ),
        "unsupported sniffed type": (
            pb.Image(data=encode("BMP")),
            "images[0]",
            "not a PNG, JPEG, WebP or GIF",
        ),
        "unsupported data: URL type": (
            pb.Image(url=data_url(encode("BMP"), "image/bmp")),
            "images[0]",
            "unsupported image type 'image/bmp'",
        ),
        "text with a text MIME type": (
            pb.Image(data=b"hello", mime_type="text/plain"),
            "images[0]",
            "unsupported image type",
        ),
        "decompression bomb (our cap)": (
            pb.Image(data=png_header(10_000, 10_000)),
            "images[0]",
            "10000x10000 = 100000000 pixels; at most 33177600",
        ),
        "decompression bomb (PIL's cap)": (
            pb.Image(data=png_header(30_000, 30_000)),
            "images[0]",
            "exceeds 33177600 pixels",
        ),
        "bad base64": (pb.Image(url="data:image/png;base64,!!!"), "images[0].url", "base64"),
        "data URL without base64": (
            pb.Image(url="data:image/png,rawdata"),
            "images[0].url",
            "data:<mime>;base64",
        ),
        "other URL scheme": (pb.Image(url="file:///etc/passwd"), "images[0].url", "data: URL"),
        "remote URL by default": (
            pb.Image(url="https://example.com/cat.png"),
            "images[0].url",
            "remote image URLs are not allowed",
        ),
    }


ROUTER_ONLY = {
    "unsupported declared type",
    "unsupported data: URL type",
    "text with a text MIME type",
}
"""Cases the worker no longer sees: the router refuses a declared type it does not take."""
ROUTER_TOO = {"no source", "empty bytes", "data URL without base64", "other URL scheme"}
"""Cases both refuse through the same function (the worker must read the source to load it)."""


@pytest.mark.parametrize("case", sorted(set(_bad_cases()) - ROUTER_ONLY))
def test_bad_images_name_the_part(case: str) -> None:
    image, field, text = _bad_cases()[case]
    error = rejected(image)
    assert error.field == field
    assert text in error.message


@pytest.mark.parametrize("case", sorted(ROUTER_ONLY | ROUTER_TOO))
def test_what_needs_no_decoding_is_refused_by_the_router(case: str) -> None:
    image, field, text = _bad_cases()[case]
    with pytest.raises(RequestError) as excinfo:
        validation.check_generate(pb.GenerateRequest(text="x", images=[image]))
    error = excinfo.value
    assert (error.code, error.field) == (INVALID_ARGUMENT, field)
    assert text in error.message


def test_size_limit_on_bytes_and_data_urls() -> None:
    data = encode("PNG", size=(64, 64))
    policy = ImagePolicy(max_bytes=len(data) - 1)
    assert "at most" in rejected(pb.Image(data=data), policy).message
    assert rejected(pb.Image(url=data_url(data)), policy).field == "images[0].url"
    assert load(pb.Image(data=data), ImagePolicy(max_bytes=len(data))).size == (64, 64)


def test_pixel_cap_is_configurable() -> None:
    data = encode("PNG", size=(64, 64))
    error = rejected(pb.Image(data=data), ImagePolicy(max_pixels=64 * 64 - 1))
    assert "64x64" in error.message
    assert decode(data, "x", ImagePolicy(max_pixels=64 * 64)).size == (64, 64)


def test_the_first_bad_image_in_request_order_is_reported() -> None:
    good = pb.Image(data=encode("PNG"))
    req = pb.ChatRequest(
        messages=[
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="a")]),
            pb.Message(
                role=pb.ROLE_USER,
                content=[
                    pb.ContentPart(image=good),
                    pb.ContentPart(image=pb.Image(data=b"\x89PNG\r\n\x1a\nbad")),
                    pb.ContentPart(image=pb.Image(url="http://example.com/x.png")),
                ],
            ),
        ]
    )
    with pytest.raises(RequestError) as excinfo:
        asyncio.run(load_images(chat_input.image_refs(req), ImagePolicy()))
    assert excinfo.value.field == "messages[1].content[1].image"


# ------------------------------------------------------------------ policy


def test_policy_from_worker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    default = ImagePolicy.from_settings(WorkerSettings())
    assert default == ImagePolicy()
    assert not default.url_hosts
    monkeypatch.setenv("QS_IMAGE_URL_HOSTS", "images.example.com, *.cdn.example.org")
    monkeypatch.setenv("QS_MAX_IMAGE_BYTES", "1000")
    policy = ImagePolicy.from_settings(WorkerSettings())
    assert policy.url_hosts == {"images.example.com", "*.cdn.example.org"}
    assert policy.max_bytes == 1000
    flags = WorkerSettings(image_url_hosts=["A.example.com"], image_fetch_timeout_s=2.5)
    assert ImagePolicy.from_settings(flags).url_hosts == {"a.example.com"}
    assert ImagePolicy.from_settings(flags).fetch_timeout_s == 2.5


def test_allowed_hosts() -> None:
    policy = ImagePolicy(url_hosts=frozenset({"images.example.com", "*.cdn.example.org"}))
    assert policy.allows_host("images.example.com")
    assert policy.allows_host("IMAGES.example.com.")
    assert policy.allows_host("eu.cdn.example.org")
    assert not policy.allows_host("cdn.example.org")
    assert not policy.allows_host("evil-images.example.com")
    assert not policy.allows_host("images.example.com.evil.net")
    assert not ImagePolicy().allows_host("images.example.com")


# ------------------------------------------------------------------ remote URLs


PNG_BODY = encode("PNG", size=(24, 12))
BIG_BODY = PNG_BODY + b"\x00" * 4096


class _Handler(BaseHTTPRequestHandler):
    """Serves the test images; ``/slow.png`` answers after the client's time limit."""

    def do_GET(self) -> None:
        if self.path == "/cat.png":
            self._send(PNG_BODY)
        elif self.path == "/big.png":
            self._send(BIG_BODY)
        elif self.path == "/big-unsized.png":
            self._send(BIG_BODY, sized=False)
        elif self.path == "/moved.png":
            self.send_response(302)
            self.send_header("Location", "http://example.com/cat.png")
            self.end_headers()
        elif self.path == "/slow.png":
            self.server.release.wait(10)  # type: ignore[attr-defined]
            self._send(PNG_BODY)
        else:
            self.send_error(404)

    def _send(self, body: bytes, sized: bool = True) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if sized:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@dataclass
class ImageServer:
    """A local HTTP server with its port."""

    port: int
    requests: list[str]

    def url(self, host: str, path: str) -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def image_server() -> Iterator[ImageServer]:
    seen: list[str] = []

    class Handler(_Handler):
        def do_GET(self) -> None:
            seen.append(self.path)
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.release = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ImageServer(server.server_address[1], seen)
    finally:
        server.release.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()


ALLOW_LOCAL = ImagePolicy(max_bytes=len(PNG_BODY) + 100, url_hosts=frozenset({"127.0.0.1"}))


def test_allowed_host_is_fetched(image_server: ImageServer) -> None:
    img = load(pb.Image(url=image_server.url("127.0.0.1", "/cat.png")), ALLOW_LOCAL)
    assert (img.mode, img.size) == ("RGB", (24, 12))
    assert "/cat.png" in image_server.requests


def test_other_host_is_refused_without_a_request(image_server: ImageServer) -> None:
    before = len(image_server.requests)
    error = rejected(pb.Image(url=image_server.url("localhost", "/cat.png")), ALLOW_LOCAL)
    assert error.field == "images[0].url"
    assert "'localhost' is not on this server's image host allow-list" in error.message
    assert len(image_server.requests) == before


@pytest.mark.parametrize("path", ["/big.png", "/big-unsized.png"])
def test_too_large_remote_image_is_refused(image_server: ImageServer, path: str) -> None:
    error = rejected(pb.Image(url=image_server.url("127.0.0.1", path)), ALLOW_LOCAL)
    assert error.field == "images[0].url"
    assert f"{ALLOW_LOCAL.max_bytes}" in error.message


@pytest.mark.parametrize(("path", "text"), [("/moved.png", "HTTP 302"), ("/none", "HTTP 404")])
def test_redirects_and_errors_are_refused(image_server: ImageServer, path: str, text: str) -> None:
    error = rejected(pb.Image(url=image_server.url("127.0.0.1", path)), ALLOW_LOCAL)
    assert text in error.message


def test_slow_remote_image_is_refused(image_server: ImageServer) -> None:
    policy = ImagePolicy(url_hosts=frozenset({"127.0.0.1"}), fetch_timeout_s=0.2)
    error = rejected(pb.Image(url=image_server.url("127.0.0.1", "/slow.png")), policy)
    assert "took longer than 0.2 s" in error.message


def test_unreachable_allowed_host_is_refused() -> None:
    from qwen_serve_dev.devstack import free_port

    url = f"http://127.0.0.1:{free_port()}/cat.png"
    assert "fetching the image failed" in rejected(pb.Image(url=url), ALLOW_LOCAL).message
