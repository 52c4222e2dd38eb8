"""Atomic writes through fsspec: write to a temporary name beside the target, then rename into place."""

from __future__ import annotations

import os
import uuid
from typing import Any


def atomic_write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one, never a part."""
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.rsplit('/', 1)[-1]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)
