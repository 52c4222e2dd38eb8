"""A local HTTP server (127.0.0.1 only) serving generated images and every kind of bad response a crawler meets."""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import threading
import time
import zlib
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


class ImageServer(LocalServer):
    """Routes: /img/<i>.jpg, /missing (404), /slow (sleeps), /corrupt.jpg, /page.html, /huge (chunk-less, no
    Content-Length), /huge-declared (large Content-Length), /bomb.png, /bomb-header.png (20000 x 20000 declared), /redirect?to=<url>, /drip (one byte every
    drip_seconds, each well within any socket timeout).
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
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes, ctype: str, length: bool = True) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # the client may give up first (timeouts, size caps): expected here
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                path = parts.path
                with server._lock:
                    server.hits[path] = server.hits.get(path, 0) + 1
                if path.startswith("/img/"):
                    if "delay" in query:
                        time.sleep(float(query["delay"][0]))
                    self._send(200, make_image(int(path[5:].split(".")[0])), "image/jpeg")
                elif path == "/slow":
                    time.sleep(server.slow_seconds)
                    self._send(200, make_image(0), "image/jpeg")
                elif path == "/corrupt.jpg":
                    self._send(200, b"\xff\xd8\xff\xe0" + hashlib.sha256(b"x").digest() * 20, "image/jpeg")
                elif path == "/page.html":
                    self._send(200, b"<html><body>not an image</body></html>", "text/html")
                elif path == "/huge":
                    self._send(200, b"\x00" * server.huge_bytes, "image/jpeg", length=False)
                elif path == "/huge-declared":
                    self.send_response(200)
                    self.send_header("Content-Length", str(server.huge_bytes))
                    self.end_headers()
                    self.wfile.write(b"\x00" * 1024)
                elif path == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        for _ in range(1000):
                            self.wfile.write(b"\x00")
                            self.wfile.flush()
                            time.sleep(server.drip_seconds)
                elif path == "/bomb-header.png":
                    self._send(200, png_header(20_000, 20_000), "image/png")
                elif path == "/bomb.png":
                    self._send(200, server.bomb, "image/png")
                elif path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", query["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._send(404, b"not found", "text/plain")

        super().__init__(Handler)

    def image_url(self, index: int, delay: float | None = None) -> str:
        return f"{self.base}/img/{index}.jpg" + (f"?delay={delay}" if delay else "")
