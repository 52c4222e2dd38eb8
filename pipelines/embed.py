"""Embed stage: webdataset shards -> CLIP image/text embeddings + metadata, in clip-retrieval's layout.

Ray Data reads the finished shards (those with a ``_stats.json``); a task stage decodes, resizes and crops
images to uint8 and tokenizes captions; an actor pool holds the CLIP model, normalises the pixels and embeds
batches, so decoding overlaps inference. Each actor writes its batches' embeddings as pieces beside the
output (<db>/_pieces/<shard>/); the driver only counts rows, and when a shard's rows are all in, a Ray task
merges its pieces into the shard's part, atomically::

    <db>/img_emb/img_emb_<shard>.npy       [n, D] float32, L2-normalised, rows sorted by image_id
    <db>/text_emb/text_emb_<shard>.npy     [n, D] float32, L2-normalised (when captions exist)
    <db>/metadata/metadata_<shard>.parquet image_id, key, url, caption, width, height, ... (same row order)
    <db>/_parts/<shard>.json               written last: marks the part done (a rerun skips it)
    <db>/database.json                     the model, dimension and totals; written when all parts are done

``image_id`` is int(img2dataset key) = shard_id * 10**digits + row in the URL list shard: stable across
reruns and unique, so every later stage (index, neighbours, training) refers to images by it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import time
from collections import defaultdict
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from retrieval.clip_model import PRECISIONS, ClipSpec, SplitTransform, load_transforms
from retrieval.database import DatabaseInfo
from retrieval.storage import IMAGE_EXTENSIONS, atomic_write_bytes

log = logging.getLogger(__name__)

# img2dataset json fields that describe the download, not the image.
DROPPED_FIELDS = ("status", "error_message", "exif")


@dataclasses.dataclass
class EmbedConfig:
    """Configuration of the embed stage.

    batch_size: images per model call. num_actors: model replicas (default: one per GPU, else one).
    torch_threads: intra-op threads per CPU actor (default: all cores of the node).
    """

    shards: str
    output: str
    clip_model: str = "open_clip:ViT-B-32/openai"
    batch_size: int = 64
    num_actors: int | None = None
    precision: str = "auto"
    torch_threads: int | None = None
    enable_text: bool = True

    def __post_init__(self) -> None:
        ClipSpec.parse(self.clip_model)  # fails early with the flag's name
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")


@dataclasses.dataclass
class EmbedSummary:
    num_parts: int
    num_parts_skipped: int
    num_images: int
    num_failed: int
    dim: int
    seconds: float
    images_per_second: float

    def line(self) -> str:
        return (
            f"embed: {self.num_images} images in {self.num_parts} parts ({self.num_parts_skipped} already done), "
            f"{self.num_failed} undecodable, dim {self.dim}, {self.seconds:.1f}s "
            f"({self.images_per_second:.1f} images/s this run)"
        )


def finished_shards(shards: str) -> dict[int, tuple[str, int]]:
    """shard id -> (tar path, number of images) for every shard whose stats file exists."""
    fs, path = fsspec.core.url_to_fs(shards)
    if not fs.exists(path):
        raise FileNotFoundError(f"--shards {shards} does not exist; run `knn-diffusion download` first")
    from pipelines.download import check_tar_header, read_stats

    found = {}
    for stats_path in fs.glob(f"{path}/*_stats.json"):
        name = stats_path.rsplit("/", 1)[-1].removesuffix("_stats.json")
        if not name.isdigit():
            continue
        successes = int(read_stats(fs, stats_path)["successes"])
        tar = f"{path}/{name}.tar"
        if successes and fs.exists(tar):
            check_tar_header(fs, tar)
            found[int(name)] = (fs.unstrip_protocol(tar) if "://" in shards else tar, successes)
    if not found:
        raise FileNotFoundError(f"--shards {shards} holds no finished shard with images (no *_stats.json)")
    return found


def done_parts(output: str, clip_model: str) -> set[int]:
    """Parts already written; refuses an output holding another model's embeddings (a rerun would mix them)."""
    fs, path = fsspec.core.url_to_fs(output)
    done = set()
    for p in fs.glob(f"{path}/_parts/*.json"):
        with fs.open(p) as f:
            marker = json.load(f)
        if marker.get("clip_model") != clip_model:
            raise ValueError(
                f"--output {output} holds embeddings made with {marker.get('clip_model')!r}, not {clip_model!r}; "
                "choose another --output (or delete it) to embed with a different --clip-model"
            )
        done.add(int(marker["shard"]))
    return done


@functools.lru_cache(maxsize=2)
def _transform(clip_model: str) -> Any:
    return load_transforms(clip_model)[0]


def preprocess(
    batch: dict[str, np.ndarray], clip_model: str, enable_text: bool, split: SplitTransform | None = None
) -> dict[str, Any]:
    """Ray Data task stage: raw webdataset samples -> pixels [B,3,H,W] and captions. A plain function, not an
    actor, so it never holds a CPU the read tasks need.

    With split (SplitTransform.of the model's transform, made once by the driver), pixels are uint8, resized and
    cropped; the actor normalises them. That keeps the queue in front of the actor 4x smaller than float32, and
    this task never imports open_clip (10-16 s per worker process on a 2-core VM). Without it, the whole
    transform runs here (float32). Captions are tokenized by the actor, which holds the tokenizer anyway."""
    from PIL import Image

    # both convert to RGB first (geometry itself; the whole transform here)
    transform = split.geometry if split else (lambda im: _transform(clip_model)(im.convert("RGB")).numpy())
    n = len(batch["__key__"])
    pixels: list[np.ndarray | None] = []
    ok = np.zeros(n, dtype=bool)
    shape, dtype = (3, 1, 1), np.uint8 if split else np.float32
    exts = [e for e in IMAGE_EXTENSIONS if e in batch]  # the download stage writes jpg, png or webp
    for i in range(n):
        raw = next((batch[e][i] for e in exts if batch[e][i] is not None), None)
        try:
            if raw is None:
                raise ValueError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) in the sample")
            with Image.open(io.BytesIO(raw)) as im:
                px = transform(im)
            shape = px.shape
            pixels.append(px)
            ok[i] = True
        except Exception as err:  # a corrupt sample is reported, not fatal
            log.warning("cannot decode %s: %s", batch["__key__"][i], err)
            pixels.append(None)
    metas = [json.loads(m) for m in batch["json"]]
    out: dict[str, Any] = {
        "key": np.asarray(batch["__key__"]),
        "shard": np.asarray([int(os.path.basename(str(p)).split(".")[0]) for p in batch["path"]]),
        "pixels": np.stack([p if p is not None else np.zeros(shape, dtype) for p in pixels]),
        "ok": ok,
        "meta": np.asarray([json.dumps(m) for m in metas]),
    }
    if enable_text:
        out["caption"] = np.asarray([str(m.get("caption") or "") for m in metas])
    return out


class Embedder:
    """Ray Data actor stage: holds the CLIP model; pixels/tokens -> L2-normalised embeddings, written where
    they are computed as pieces under <output>/_pieces/<shard>/. Only (shard, rows) goes back to the driver."""

    def __init__(self, clip_model: str, precision: str, torch_threads: int | None, output: str) -> None:
        import torch

        from retrieval.clip_model import ClipEncoder, SplitTransform

        torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        self.encoder = ClipEncoder(clip_model, precision=precision)
        self.split = SplitTransform.of(self.encoder.preprocess)
        self.output = output

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        cols = {k: batch[k] for k in ("key", "ok", "meta")}
        pixels = torch.from_numpy(batch["pixels"])
        if pixels.dtype == torch.uint8:
            if self.split is None:
                raise TypeError(f"uint8 pixels, but {self.encoder.name}'s transform does not split")
            pixels = self.split.to_float(pixels)
        cols["img_emb"] = self.encoder.encode_images(pixels).numpy()
        if "caption" in batch:
            tokens = self.encoder.tokenizer([str(c) for c in batch["caption"]])
            cols["text_emb"] = self.encoder.encode_tokens(tokens).numpy()
        shards, counts = np.unique(batch["shard"], return_counts=True)
        for shard in shards:
            rows = batch["shard"] == shard
            write_piece(self.output, int(shard), {k: v[rows] for k, v in cols.items()})
        return {"shard": shards, "rows": counts}


def _pieces_dir(output: str, shard_id: int) -> str:
    return f"{output.rstrip('/')}/_pieces/{shard_id:05d}"


def write_piece(output: str, shard_id: int, cols: dict[str, np.ndarray]) -> None:
    """One batch's rows of one shard -> <output>/_pieces/<shard>/<uuid>.npz (no pickled objects inside)."""
    import uuid

    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=str) if v.dtype == object else v for k, v in cols.items()})
    fs, _ = fsspec.core.url_to_fs(output)
    atomic_write_bytes(fs, f"{_pieces_dir(output, shard_id)}/{uuid.uuid4().hex}.npz", buf.getvalue())


def merge_part(output: str, shard_id: int, clip_model: str) -> dict[str, Any]:
    """Ray task: a finished shard's pieces -> its part files (write_part), then the pieces are removed."""
    fs, _ = fsspec.core.url_to_fs(output)
    folder = _pieces_dir(output, shard_id)
    pieces = []
    for path in sorted(fs.ls(folder, detail=False)):
        if path.endswith(".npz") and not path.rsplit("/", 1)[-1].startswith(".tmp-"):
            with fs.open(path, "rb") as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
                pieces.append({k: z[k] for k in z.files})
    cols = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    marker = write_part(output, shard_id, cols, clip_model)
    fs.rm(folder, recursive=True)
    return marker


def _part_names(shard_id: int) -> dict[str, str]:
    name = f"{shard_id:05d}"
    return {
        "img": f"img_emb/img_emb_{name}.npy",
        "text": f"text_emb/text_emb_{name}.npy",
        "meta": f"metadata/metadata_{name}.parquet",
        "done": f"_parts/{name}.json",
    }


def write_part(output: str, shard_id: int, cols: dict[str, np.ndarray], clip_model: str) -> dict[str, Any]:
    """Write one shard's embeddings and metadata, sorted by image_id; the done marker goes last.

    cols: key, ok, meta (JSON strings), img_emb [n, D] and optionally text_emb [n, D], row for row.
    """
    fs, root = fsspec.core.url_to_fs(output)
    good = np.flatnonzero(cols["ok"])
    good = good[np.argsort([int(k) for k in cols["key"][good]], kind="stable")]
    names = _part_names(shard_id)
    if len(good):
        metas = []
        for i in good:
            meta = {k: v for k, v in json.loads(str(cols["meta"][i])).items() if k not in DROPPED_FIELDS}
            meta["image_id"] = int(cols["key"][i])
            metas.append(meta)
        table = pa.Table.from_pylist(metas)
        table = table.select(["image_id"] + [c for c in table.column_names if c != "image_id"])
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(fs, f"{root}/{names['meta']}", buf.getvalue())
        atomic_write_bytes(fs, f"{root}/{names['img']}", _npy_bytes(cols["img_emb"][good].astype(np.float32)))
        if "text_emb" in cols:
            text = cols["text_emb"][good].astype(np.float32)
            atomic_write_bytes(fs, f"{root}/{names['text']}", _npy_bytes(text))
    marker = {
        "shard": shard_id,
        "num_images": len(good),
        "num_failed": len(cols["ok"]) - len(good),
        "dim": int(cols["img_emb"].shape[1]) if len(good) else None,
        "clip_model": clip_model,
    }
    atomic_write_bytes(fs, f"{root}/{names['done']}", json.dumps(marker).encode())
    return marker


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def embed(config: EmbedConfig, ray_address: str | None = None) -> EmbedSummary:
    """Run the embed stage on Ray; returns (and prints) a summary over the whole database."""
    import ray

    from retrieval.ray_env import init_ray

    start = time.time()
    shards = finished_shards(config.shards)
    skip = done_parts(config.output, config.clip_model) & set(shards)
    todo = {s: v for s, v in sorted(shards.items()) if s not in skip}
    fs, root = fsspec.core.url_to_fs(config.output)
    for sub in ("img_emb", "text_emb", "metadata", "_parts"):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    for shard in todo:  # pieces a killed run left behind: the shard is embedded again from the start
        if fs.exists(_pieces_dir(root, shard)):
            fs.rm(_pieces_dir(root, shard), recursive=True)

    num_new = 0
    if todo:
        init_ray(ray_address)
        use_gpu = bool(ray.cluster_resources().get("GPU", 0))
        if use_gpu and config.precision == "int8":
            raise ValueError(
                "--precision int8 is the CPU path (onnxruntime int8 kernels) and this Ray cluster has GPUs; "
                "use --precision auto (bf16/fp16 on the GPUs)"
            )
        num_actors = config.num_actors or (int(ray.cluster_resources().get("GPU", 1)) if use_gpu else 1)
        ds = ray.data.read_webdataset([p for p, _ in todo.values()], decoder=None, include_paths=True)
        # The model actor takes one CPU (half on a 1-CPU node, so readers still run). Preprocessing asks for
        # half as much: more decoders fit beside the actor, and the differing requests keep Ray Data from
        # fusing preprocessing into the actor, which would serialise decoding with inference.
        embed_cpus = 1.0 if ray.cluster_resources().get("CPU", 1) >= 2 else 0.5
        ds = ds.map_batches(
            preprocess,
            fn_kwargs={
                "clip_model": config.clip_model,
                "enable_text": config.enable_text,
                "split": SplitTransform.of(load_transforms(config.clip_model)[0]),
            },
            batch_size=config.batch_size,
            num_cpus=embed_cpus / 2,
        )
        ds = ds.map_batches(
            Embedder,
            fn_constructor_kwargs={
                "clip_model": config.clip_model,
                "precision": config.precision,
                "torch_threads": config.torch_threads,
                "output": config.output,
            },
            batch_size=config.batch_size,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=embed_cpus,
        )
        merge = ray.remote(num_cpus=0)(merge_part)
        expected = {s: n for s, (_, n) in todo.items()}
        arrived: dict[int, int] = defaultdict(int)
        merging = []
        with tqdm(total=sum(expected.values()), desc="embed images", unit="img") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for shard, rows in zip(batch["shard"].tolist(), batch["rows"].tolist(), strict=True):
                    arrived[shard] += rows
                    if arrived[shard] == expected[shard]:
                        merging.append(merge.remote(config.output, shard, config.clip_model))
                    num_new += rows
                    bar.update(rows)
        ray.get(merging)
        short = sorted(s for s in todo if arrived[s] != expected[s])
        if short:
            raise RuntimeError(f"shards {short} yielded fewer samples than their stats files say")

    summary = finalize(config, num_skipped=len(skip), seconds=time.time() - start, num_new=num_new)
    print(summary.line(), flush=True)
    return summary


def write_row_ids(db: str) -> int:
    """<db>/image_ids.npy (every row's image id, parts in order) and <db>/parts.json (each part's row count),
    streamed part by part, so Database.open memory-maps ids instead of reading every metadata part."""
    from retrieval.database import PARTS, ROW_IDS
    from retrieval.storage import atomic_open, list_parts

    fs, root = fsspec.core.url_to_fs(db)
    names = list_parts(f"{db.rstrip('/')}/metadata", "metadata_", ".parquet")
    paths = [f"{root}/metadata/metadata_{n}.parquet" for n in names]
    sizes = [pq.ParquetFile(fs.open(p)).metadata.num_rows for p in paths]
    with atomic_open(fs, f"{root}/{ROW_IDS}") as f:
        header = {"descr": "<i8", "fortran_order": False, "shape": (sum(sizes),)}
        np.lib.format.write_array_header_1_0(f, header)
        for p, n in zip(paths, sizes, strict=True):
            ids = pq.read_table(fs.open(p), columns=["image_id"])["image_id"].to_numpy().astype("<i8")
            if len(ids) != n:
                raise ValueError(f"{p} changed while it was read; rerun `knn-diffusion embed`")
            f.write(ids.tobytes())
    atomic_write_bytes(fs, f"{root}/{PARTS}", json.dumps({"names": names, "sizes": sizes}).encode())
    return sum(sizes)


def finalize(config: EmbedConfig, num_skipped: int, seconds: float, num_new: int) -> EmbedSummary:
    """Count the parts and write database.json (atomically), which the index stage reads."""
    fs, root = fsspec.core.url_to_fs(config.output)
    num_images = num_failed = dim = 0
    parts = sorted(fs.glob(f"{root}/_parts/*.json"))
    for p in parts:
        with fs.open(p) as f:
            marker = json.load(f)
        num_images += marker["num_images"]
        num_failed += marker["num_failed"]
        dim = marker["dim"] or dim
    write_row_ids(config.output)
    DatabaseInfo(
        clip_model=config.clip_model,
        dim=dim,
        num_images=num_images,
        num_parts=len(parts),
        has_text=bool(fs.glob(f"{root}/text_emb/*.npy")),
        shards=config.shards,
    ).write(config.output)
    return EmbedSummary(
        len(parts), num_skipped, num_images, num_failed, dim, seconds, num_new / max(seconds, 1e-9)
    )
