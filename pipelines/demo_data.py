"""Procedural captioned images (coloured shapes on noisy backgrounds) and a 127.0.0.1 HTTP server for them.

The embedded default that the README's main command runs: no internet needed, and the images enter the
toolkit through the real download stage, as a user's URL list would.
"""

from __future__ import annotations

import functools
import io
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "bar")


def caption_for(index: int) -> str:
    colour = list(COLOURS)[index % len(COLOURS)]
    shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
    return f"a {colour} {shape} number {index}"


def make_image(index: int, size: int = 64) -> bytes:
    """A deterministic JPEG: a coloured shape on a noisy background, different for every index."""
    rng = np.random.default_rng(index)
    arr = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    colour = COLOURS[list(COLOURS)[index % len(COLOURS)]]
    shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
    lo, hi = size // 4 + index % 7, 3 * size // 4 - index % 5
    yy, xx = np.mgrid[0:size, 0:size]
    if shape == "square":
        mask = (yy >= lo) & (yy < hi) & (xx >= lo) & (xx < hi)
    elif shape == "circle":
        mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < ((hi - lo) / 2) ** 2
    else:
        mask = (xx >= lo) & (xx < lo + size // 6)
    arr[mask] = colour
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_images(folder: str, num_images: int, size: int = 64) -> list[str]:
    """Write img_<i>.jpg files (skipping existing ones); returns their file names."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(num_images):
        name = f"img_{i}.jpg"
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            with open(path + ".tmp", "wb") as f:
                f.write(make_image(i, size))
            os.replace(path + ".tmp", path)
        names.append(name)
    return names


class LocalServer:
    """An HTTP server on 127.0.0.1 (ephemeral port) run from a background thread; use as a context manager."""

    def __init__(self, handler: Any) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FolderServer(LocalServer):
    """Serve a folder's files."""

    def __init__(self, folder: str) -> None:
        class QuietHandler(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

        super().__init__(functools.partial(QuietHandler, directory=folder))
