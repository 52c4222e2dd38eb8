"""Training data: image shards + database embeddings + neighbour tables -> a streaming Ray Dataset of
rows {image uint8 [H, W, 3], query float32 [D], neighbours float16 [k, D], valid bool [k], image_id int64}.

Shard N, embedding part N and neighbour table N hold the same images (the pipelines keep them aligned by
part), so the join is done part by part inside a Ray Data task: nothing is materialised whole. The query
is the training image's own CLIP image embedding; the neighbours come from the table (self excluded),
inline when it stores them, else looked up in the database's memory-mapped embeddings.
"""

from __future__ import annotations

import functools
import io
import json
import os
import zlib
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from diffusion.config import TrainConfig


def part_items(config: TrainConfig) -> list[dict[str, str]]:
    """One work item per database part, with the paths of its shard, embeddings, metadata and neighbours."""
    from retrieval.database import DatabaseInfo
    from retrieval.storage import list_parts

    info = DatabaseInfo.read(config.db)
    if info.dim != config.model.cond_dim and config.model.arch != "autoencoder":
        raise ValueError(
            f"--db {config.db} holds {info.dim}-d embeddings ({info.clip_model}) but the model's cond_dim is "
            f"{config.model.cond_dim}; set model: cond_dim: {info.dim} in --config"
        )
    nb_settings = os.path.join(config.neighbours, "neighbours.json")
    if os.path.exists(nb_settings):
        with open(nb_settings) as f:
            table_k = int(json.load(f)["k"])
        if table_k < config.model.k:
            raise ValueError(
                f"--neighbours {config.neighbours} holds k={table_k} neighbours per image but the model needs "
                f"k={config.model.k}; recompute with `knn-diffusion neighbours --k {config.model.k}` or lower model: k"
            )
    shards = config.shards or info.shards
    if not shards:
        raise ValueError(f"--db {config.db} does not record its shards; pass --shards")
    emb_dir = os.path.join(config.db, "img_emb")
    parts = list_parts(emb_dir, "img_emb_", ".npy")
    unknown = sorted(set(config.exclude_parts) - set(parts))
    if unknown:
        raise ValueError(f"exclude_parts {unknown} are not parts of --db {config.db} (its parts: {parts})")
    parts = [p for p in parts if p not in config.exclude_parts]
    items = []
    for part in parts:
        item = {
            "tar": f"{shards.rstrip('/')}/{part}.tar",
            "emb": os.path.join(emb_dir, f"img_emb_{part}.npy"),
            "meta": os.path.join(config.db, "metadata", f"metadata_{part}.parquet"),
            "neighbours": os.path.join(config.neighbours, f"neighbours_{part}.parquet"),
        }
        for name, path in item.items():
            fs, p = fsspec.core.url_to_fs(path)
            if not fs.exists(p):
                hint = "run `knn-diffusion neighbours`" if name == "neighbours" else "check --shards / --db"
                raise FileNotFoundError(f"{path} is missing (part {part}): {hint}")
        items.append(item)
    if not items:
        raise FileNotFoundError(f"--db {config.db} has no embedding parts")
    return items


@functools.lru_cache(maxsize=2)
def _database(db: str) -> Any:
    from retrieval.database import Database

    return Database.open(db)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> [size, size, 3] uint8: centre-cropped to a square, resized (bicubic)."""
    from PIL import Image

    image = centre_square(Image.open(io.BytesIO(data)).convert("RGB"))
    return np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.uint8)


def centre_square(image: Any) -> Any:
    """The centre square of a PIL image (decode_image's crop before it resizes)."""
    w, h = image.size
    s = min(w, h)
    return image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def shard_images(tar: str) -> dict[int, bytes]:
    """{image id: encoded image} of one webdataset shard (its keys are the database's image ids)."""
    from retrieval.storage import IMAGE_EXTENSIONS, tar_samples

    images: dict[int, bytes] = {}
    with fsspec.open(tar, "rb") as f:
        for key, sample in tar_samples(f, tar):
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext:
                images[int(key)] = sample[ext]
    return images


def load_part(batch: dict[str, np.ndarray], db: str, image_size: int, k: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches function (batch of one work item) -> the part's training rows."""
    from retrieval.database import read_neighbour_table

    item = {key: str(batch[key][0]) for key in ("tar", "emb", "meta", "neighbours")}
    epoch = int(batch["epoch"][0]) if "epoch" in batch else 0
    images = shard_images(item["tar"])
    ids = pq.read_table(item["meta"], columns=["image_id"])["image_id"].to_numpy()
    emb = np.load(item["emb"])
    if k == 0:  # the no-kNN model and the tokenizer read no neighbour table
        table = {"image_id": ids, "neighbour_ids": np.zeros((len(ids), 0), np.int64)}
    else:
        table = read_neighbour_table(item["neighbours"])
    if not np.array_equal(table["image_id"], ids):
        raise ValueError(
            f"{item['neighbours']} is not row for row with {item['meta']}; recompute the neighbours"
        )
    nb_ids = table["neighbour_ids"]
    if nb_ids.shape[1] < k:
        raise ValueError(
            f"{item['neighbours']} holds {nb_ids.shape[1]} neighbours per image; the model needs k={k}"
        )
    nb_ids = nb_ids[:, :k]
    valid = nb_ids >= 0
    if "neighbour_emb" in table:
        nb_emb = table["neighbour_emb"][:, :k]
    else:
        nb_emb = np.zeros((len(ids), k, emb.shape[1]), np.float16)
        if valid.any():
            nb_emb[valid] = _database(db).embeddings(nb_ids[valid]).astype(np.float16)
    missing = [int(i) for i in ids if int(i) not in images]
    if missing:
        raise ValueError(f"{item['tar']} lacks images {missing[:5]} that the database lists; re-run embed")
    order = np.random.default_rng([zlib.crc32(item["tar"].encode()), epoch]).permutation(len(ids))
    return {
        "image": np.stack([decode_image(images[int(ids[i])], image_size) for i in order]),
        "query": emb[order].astype(np.float32),
        "neighbours": nb_emb[order].astype(np.float16),
        "valid": valid[order],
        "image_id": ids[order].astype(np.int64),
    }


def epoch_items(
    items: list[dict[str, str]], num_epochs: int, seed: int, first_epoch: int = 0
) -> list[dict[str, Any]]:
    """The work items of epochs first_epoch .. first_epoch + num_epochs - 1, one after the other, the parts in a
    new seeded order each epoch; each item carries its epoch, which seeds the row order inside its part."""
    out: list[dict[str, Any]] = []
    for epoch in range(first_epoch, first_epoch + num_epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(items))
        out.extend({**items[i], "epoch": epoch} for i in order)
    return out


def num_rows(items: list[dict[str, str]]) -> int:
    """Training rows in the parts (from the metadata parquet footers; no data read)."""
    total = 0
    for item in items:
        with fsspec.open(item["meta"], "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def make_dataset(config: TrainConfig, start_step: int = 0, items: list[dict[str, str]] | None = None) -> Any:
    """The streaming training dataset: every epoch the run still needs, as one stream (one Ray Data task per
    part and epoch; rows as load_part describes). One stream, not one dataset per epoch, so the pipeline
    starts once and keeps reading ahead across epoch boundaries. items: part_items(config), when the caller
    has them already."""
    import ray

    items = items if items is not None else part_items(config)
    rows = num_rows(items)
    per_epoch = max(1, rows // (config.batch_size_per_worker * config.num_workers))  # steps (drop_last)
    first_epoch = start_step // per_epoch
    num_epochs = (
        max(0, -(-(config.steps - start_step) // per_epoch)) + 1
    )  # +1: a split may run short of an epoch
    ds = ray.data.from_items(epoch_items(items, num_epochs, config.seed, first_epoch))
    # Two part-loading tasks per worker at a time: enough to stay ahead of training (data wait < 1%), where an
    # unbounded pool starts a process per task at once, each importing torch, and the start-up crowd slowed the
    # demo's first 20 steps from 10 s to 45 s of every run (19 s per run measured, the same speed after).
    tasks = 2 * config.num_workers
    # decoding a part takes ~0.1 s: several may run ahead within the data CPU budget
    fn, cpus = load_part, 0.1
    kwargs: dict[str, Any] = {"image_size": config.model.image_size, "k": config.model.k}
    if config.model.edit:  # an editing model trains on pairs built from each image and its nearest neighbour
        from diffusion.edit_pairs import load_edit_part

        fn, cpus = load_edit_part, 0.5  # a part's pairs take a CLIP pass and an ECC per image
        kwargs = {
            "image_size": config.model.image_size,
            "clip_model": config.clip_model,
            "area": tuple(config.edit_area),
            "motion": config.edit_motion,
            "seed": config.seed,
            "hue": config.edit_hue,
        }
    return ds.map_batches(
        fn,
        batch_size=1,
        fn_kwargs={"db": os.path.abspath(config.db), **kwargs},
        num_cpus=cpus,
        compute=ray.data.TaskPoolStrategy(size=tasks),
    )
