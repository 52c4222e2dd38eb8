"""A local HTTP server (127.0.0.1 only) serving generated images and every kind of bad response a crawler meets."""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from pipelines.demo_data import LocalServer, caption_for, make_image

__all__ = ["ImageServer", "caption_for", "make_image"]


def make_bomb_png(side: int) -> bytes:
    """A real PNG of side x side black pixels: tiny on the wire, side*side bytes once decoded."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG declaring width x height with no pixel data: PIL reads the size, and a decoder would allocate it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


class _Handler(BaseHTTPRequestHandler):
    """Answers GET from the routes of its ImageServer (set as the class attribute `server_state`)."""

    protocol_version = "HTTP/1.0"
    server_state: ImageServer

    def log_message(self, *args: object) -> None:
        pass

    def send(self, code: int, body: bytes, ctype: str = "image/jpeg", length: bool = True) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(
            BrokenPipeError, ConnectionResetError
        ):  # clients give up first (caps, timeouts)
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        state = self.server_state
        with state._lock:
            state.hits[parts.path] = state.hits.get(parts.path, 0) + 1
        route = state.routes.get("/img/" if parts.path.startswith("/img/") else parts.path)
        if route is None:
            self.send(404, b"not found", "text/plain")
        else:
            route(self, parts.path, parse_qs(parts.query))


class ImageServer(LocalServer):
    """Routes: /img/<i>.jpg, /missing (404), /slow (sleeps), /corrupt.jpg, /page.html, /huge (chunk-less, no
    Content-Length), /huge-declared (large Content-Length), /bomb.png, /bomb-header.png (20000 x 20000 declared),
    /redirect?to=<url>, /drip (one byte every drip_seconds, each well within any socket timeout).
    /img/<i>.jpg?delay=<s> answers after a delay (for interrupt tests)."""

    def __init__(
        self,
        slow_seconds: float = 4.0,
        huge_bytes: int = 3_000_000,
        bomb_side: int = 3000,
        drip_seconds: float = 0.25,
    ) -> None:
        self.slow_seconds = slow_seconds
        self.drip_seconds = drip_seconds
        self.huge_bytes = huge_bytes
        self.bomb = make_bomb_png(bomb_side)
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        self.routes: dict[str, Callable[[_Handler, str, dict[str, list[str]]], None]] = {
            "/img/": self._image,
            "/slow": self._slow,
            "/corrupt.jpg": lambda h, p, q: h.send(
                200, b"\xff\xd8\xff\xe0" + hashlib.sha256(b"x").digest() * 20
            ),
            "/page.html": lambda h, p, q: h.send(200, b"<html><body>not an image</body></html>", "text/html"),
            "/huge": lambda h, p, q: h.send(200, b"\x00" * self.huge_bytes, length=False),
            "/huge-declared": self._huge_declared,
            "/drip": self._drip,
            "/bomb-header.png": lambda h, p, q: h.send(200, png_header(20_000, 20_000), "image/png"),
            "/bomb.png": lambda h, p, q: h.send(200, self.bomb, "image/png"),
            "/redirect": self._redirect,
        }
        super().__init__(type("Handler", (_Handler,), {"server_state": self}))

    def _image(self, h: _Handler, path: str, query: dict[str, list[str]]) -> None:
        if "delay" in query:
            time.sleep(float(query["delay"][0]))
        h.send(200, make_image(int(path[5:].split(".")[0])))

    def _slow(self, h: _Handler, path: str, query: dict[str, list[str]]) -> None:
        time.sleep(self.slow_seconds)
        h.send(200, make_image(0))

    def _huge_declared(self, h: _Handler, path: str, query: dict[str, list[str]]) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(self.huge_bytes))
        h.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            h.wfile.write(b"\x00" * 1024)

    def _drip(self, h: _Handler, path: str, query: dict[str, list[str]]) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(1000):
                h.wfile.write(b"\x00")
                h.wfile.flush()
                time.sleep(self.drip_seconds)

    def _redirect(self, h: _Handler, path: str, query: dict[str, list[str]]) -> None:
        h.send_response(302)
        h.send_header("Location", query["to"][0])
        h.send_header("Content-Length", "0")
        h.end_headers()

    def image_url(self, index: int, delay: float | None = None) -> str:
        return f"{self.base}/img/{index}.jpg" + (f"?delay={delay}" if delay else "")
