"""Files every layer writes and reads, one helper each.

- Atomic writes through fsspec: write to a temporary name beside the target, then rename into place, so
  readers see the old file or the whole new one, never a part (write_atomic, and the encoders for what
  we write: json_bytes, image_bytes, torch_bytes, parquet_bytes); atomic_open streams a large file the same way.
- The "settings changed, refuse" check of every stage that can resume (check_settings).
- Part listing: the NNNNN ids of a database's parts (list_parts).
- Shard reading: the samples of a webdataset tar grouped by key (tar_samples).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # what the download stage's --encode-format can write


def atomic_write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one, never a part."""
    with atomic_open(fs, path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_open(fs: Any, path: str) -> Iterator[Any]:
    """A binary file to write `path` through, streamed under a temporary name beside it and renamed into place
    when the block ends; if the block raises, the temporary file is removed and `path` is left as it was."""
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.rsplit('/', 1)[-1]}"
    try:
        with fs.open(tmp, "wb") as f:
            yield f
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    fs.mv(tmp, path)


def write_atomic(path: str, data: bytes) -> None:
    """atomic_write_bytes for a local path or a URI."""
    fs, root = fsspec.core.url_to_fs(path if "://" in path else os.path.abspath(path))
    atomic_write_bytes(fs, root, data)


def json_bytes(obj: Any, indent: int | None = 2) -> bytes:
    return json.dumps(obj, indent=indent).encode()


def image_bytes(image: Any, **save_options: Any) -> bytes:
    """A PIL image (or a uint8 array [H, W, 3]) encoded as PNG (or another format via save_options)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, **({"format": "PNG"} | save_options))
    return buf.getvalue()


def torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def parquet_bytes(frame: Any) -> bytes:
    """A pandas DataFrame as parquet (no index)."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def setting_changes(before: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """ "key: old -> new" for every setting that differs (compared as JSON, so a tuple equals a list)."""
    before, now = json.loads(json.dumps(before)), json.loads(json.dumps(now))
    keys = sorted((set(before) | set(now)) - set(ignore))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def check_settings(
    path: str, settings: dict[str, Any], what: str, remedy: str, ignore: tuple[str, ...] = ()
) -> None:
    """Record `settings` at path (JSON) the first time; later, refuse settings that differ, naming each change.

    what names the thing the settings belong to (e.g. "--output runs/a holds a run"); remedy says what to do.
    ignore: settings that may change between runs (the file is rewritten with their new values).
    """
    fs, root = fsspec.core.url_to_fs(path if "://" in path else os.path.abspath(path))
    if fs.exists(root):
        with fs.open(root) as f:
            try:
                before = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}); was it edited? {remedy}") from err
        changed = setting_changes(before, settings, ignore)
        if changed:
            raise ValueError(f"{what} made with other settings ({'; '.join(changed)}); {remedy}")
        if not ignore:
            return
    atomic_write_bytes(fs, root, json_bytes(settings))


def list_parts(folder: str, prefix: str, suffix: str) -> list[str]:
    """The NNNNN ids of <folder>/<prefix>NNNNN<suffix>, sorted by number (not as strings, so 100000 follows 99999).

    Only names whose middle is all digits count: a leftover .tmp-* from a killed writer is never a part.
    """
    fs, root = fsspec.core.url_to_fs(folder)
    if not fs.exists(root):
        return []
    names = (p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    ids = [
        n[len(prefix) : len(n) - len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix)
    ]
    return sorted((i for i in ids if i.isdigit()), key=int)


def tar_samples(fileobj: Any, where: str = "") -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a webdataset tar stream, in the order they are stored.

    A tar that cannot be read is a ValueError naming `where` (the shard's path).
    """
    key, sample = None, {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                stem, _, ext = member.name.rpartition("/")[-1].partition(".")
                if stem != key and sample:
                    yield key, sample  # type: ignore[misc]
                    sample = {}
                key = stem
                sample[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except tarfile.TarError as err:
        raise ValueError(
            f"{where or 'a shard'} is not a readable tar ({err}); redo the shard with `download`"
        ) from err
    if sample:
        yield key, sample  # type: ignore[misc]
