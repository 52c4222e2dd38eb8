"""Aesthetic stage: db/img_emb/*.npy -> db/aesthetic/aesthetic_N.parquet (score); scores -> db/bands/<band>/
faiss indexes (subindex); a ratings parquet -> a fitted head (fit).

Scoring is a matrix-vector product per part (a million embeddings take well under a second), so it runs
in this process, part by part; band indexes are built by autofaiss on Ray tasks like the index stage.
The score parquet sits beside metadata/, one per part, row for row; the embeddings are never rewritten.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import time
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipelines.index import IndexConfig
from retrieval.database import DatabaseInfo
from retrieval.storage import atomic_write_bytes, list_parts

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- score


@dataclasses.dataclass
class ScoreConfig:
    """head: laion-v1 / laion-v2 (the published head for the database's model), a name such as
    laion-v1:ViT-B-32, or the .pt of a head fitted by `aesthetic fit`.
    head_dir: folder holding the published .pth files (offline use); default: $KNN_DIFFUSION_AESTHETIC_DIR,
    else download into ~/.cache/knn_diffusion/aesthetic.
    """

    db: str
    head: str = "laion-v1"
    head_dir: str | None = None
    allow_other_weights: bool = False
    overwrite: bool = False


def score(config: ScoreConfig) -> dict[str, Any]:
    """Score every image of a database; parts already scored with the same head are skipped."""
    from retrieval.aesthetic import load_head

    start = time.time()
    info = DatabaseInfo.read(config.db)
    head = load_head(config.head, info.clip_model, config.head_dir)
    head.check_model(info.clip_model, info.dim, config.allow_other_weights)
    fs = fsspec.filesystem("file")
    out = os.path.join(config.db, "aesthetic")
    head_json = os.path.join(out, "head.json")
    record = {"head": head.name, "kind": head.kind, "clip_model": head.clip_model, "sha256": head.sha256}
    previous = None
    if os.path.exists(head_json):
        with open(head_json) as f:
            previous = json.load(f)
        if previous != record and not config.overwrite:
            raise ValueError(
                f"{out} holds scores from head {previous['head']}; pass --overwrite to replace them with "
                f"{head.name} (the aesthetic bands built from the old scores are removed)"
            )
    if config.overwrite or (previous is not None and previous != record):
        shutil.rmtree(out, ignore_errors=True)
        bands_json = os.path.join(config.db, "bands", "bands.json")
        if os.path.exists(bands_json):  # bands cut from other scores would silently mislead
            os.remove(bands_json)
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(fs, head_json, json.dumps(record).encode())
    parts = list_parts(os.path.join(config.db, "img_emb"), "img_emb_", ".npy")
    if not parts:
        raise FileNotFoundError(f"--db {config.db} has no img_emb/*.npy; run `knn-diffusion embed` first")
    all_scores, skipped = [], 0
    for part in tqdm(parts, desc="aesthetic score", unit="part"):
        emb_path = os.path.join(config.db, "img_emb", f"img_emb_{part}.npy")
        target = os.path.join(out, f"aesthetic_{part}.parquet")
        if os.path.exists(target):
            all_scores.append(pq.read_table(target, columns=["aesthetic"])["aesthetic"].to_numpy())
            skipped += 1
            continue
        ids = pq.read_table(
            os.path.join(config.db, "metadata", f"metadata_{part}.parquet"), columns=["image_id"]
        )
        scores = head.score(np.load(emb_path, mmap_mode="r")).astype(np.float32)
        if len(scores) != len(ids):
            raise ValueError(
                f"{emb_path} has {len(scores)} rows but its metadata {len(ids)}; re-embed this part"
            )
        buf = io.BytesIO()
        pq.write_table(pa.table({"image_id": ids["image_id"], "aesthetic": scores}), buf)
        atomic_write_bytes(fs, target, buf.getvalue())
        all_scores.append(scores)
    s = np.concatenate(all_scores)
    summary = {
        "head": head.name,
        "num_images": len(s),
        "parts_skipped": skipped,
        "mean": float(s.mean()) if len(s) else float("nan"),
        "min": float(s.min()) if len(s) else float("nan"),
        "max": float(s.max()) if len(s) else float("nan"),
    }
    print(
        f"aesthetic score: {len(s)} images with {head.name} (mean {summary['mean']:.3f}, min {summary['min']:.3f}, "
        f"max {summary['max']:.3f}; {skipped}/{len(parts)} parts already done) in {time.time() - start:.1f}s "
        f"-> {out}",
        flush=True,
    )
    return summary


# ------------------------------------------------------------------------------------------------ fit


@dataclasses.dataclass
class FitConfig:
    """ratings: parquet with a rating column and either image_id (embeddings read from --db) or embedding.
    output_head: the .pt to write (a .json with the model and held-out error is written beside it).
    """

    ratings: str
    output_head: str
    db: str | None = None
    clip_model: str | None = None
    head_kind: str = "linear"
    rating_col: str = "rating"
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    holdout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.head_kind not in ("linear", "mlp"):
            raise ValueError(f"--head-kind must be linear or mlp, got {self.head_kind!r}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"--holdout must be a fraction in (0, 1), got {self.holdout}")
        if self.db is None and self.clip_model is None:
            raise ValueError(
                "pass --db (ratings by image_id) or --clip-model (ratings with an embedding column)"
            )


def _ratings_and_embeddings(config: FitConfig) -> tuple[np.ndarray, np.ndarray, str]:
    if not os.path.exists(config.ratings):
        raise FileNotFoundError(f"--ratings {config.ratings} does not exist")
    df = pd.read_parquet(config.ratings)
    if config.rating_col not in df.columns:
        raise ValueError(
            f"--ratings {config.ratings} has no column {config.rating_col!r} (has {list(df.columns)})"
        )
    ratings = df[config.rating_col].to_numpy(np.float32)
    bad = np.flatnonzero(~np.isfinite(ratings))
    if len(bad):
        raise ValueError(
            f"--ratings {config.ratings}: rows {bad[:5].tolist()} have no finite {config.rating_col}"
        )
    if "embedding" in df.columns:
        emb = np.stack(df["embedding"].to_numpy()).astype(np.float32)
        clip_model = config.clip_model or DatabaseInfo.read(config.db).clip_model  # type: ignore[arg-type]
    elif "image_id" in df.columns and config.db:
        from retrieval.database import Database

        database = Database.open(config.db)
        try:
            emb = database.embeddings(df["image_id"].to_numpy())
        except KeyError as err:
            raise ValueError(f"--ratings {config.ratings}: {err.args[0]}") from err
        clip_model = database.info.clip_model
    else:
        raise ValueError(
            f"--ratings {config.ratings} needs an 'embedding' column, or an 'image_id' column together with --db"
        )
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb, ratings, clip_model


def fit(config: FitConfig) -> dict[str, Any]:
    """Train a head (MSE, AdamW, minibatches of 256) on 1 - holdout of the ratings; report held-out error."""
    import torch

    from retrieval.aesthetic import make_head

    start = time.time()
    emb, ratings, clip_model = _ratings_and_embeddings(config)
    n = len(ratings)
    if n < 10:
        raise ValueError(f"--ratings {config.ratings} has {n} rows; fitting a head needs at least 10")
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(n)
    num_holdout = min(max(1, int(round(n * config.holdout))), n - 1)
    test, train = order[:num_holdout], order[num_holdout:]
    torch.manual_seed(config.seed)
    head = make_head(config.head_kind, emb.shape[1])
    with torch.no_grad():  # start at the mean rating: the linear head then only learns the deviations
        last = head if isinstance(head, torch.nn.Linear) else head.layers[-1]
        last.bias.fill_(float(ratings[train].mean()))
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    x, y = torch.from_numpy(emb), torch.from_numpy(ratings)
    gen = torch.Generator().manual_seed(config.seed)
    train_t = torch.from_numpy(train)
    for _ in tqdm(range(config.epochs), desc="aesthetic fit", unit="epoch"):
        head.train()
        for batch in train_t[torch.randperm(len(train_t), generator=gen)].split(256):
            loss = torch.nn.functional.mse_loss(head(x[batch])[:, 0], y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        pred = head(x[torch.from_numpy(test)])[:, 0].numpy()
    err = pred - ratings[test]
    report = {
        "kind": config.head_kind,
        "dim": int(emb.shape[1]),
        "clip_model": clip_model,
        "rating_col": config.rating_col,
        "num_train": len(train),
        "num_holdout": len(test),
        "holdout_mse": float(np.mean(err**2)),
        "holdout_mae": float(np.mean(np.abs(err))),
        "holdout_mse_of_mean": float(np.mean((ratings[test] - ratings[train].mean()) ** 2)),
    }
    fs = fsspec.filesystem("file")
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    atomic_write_bytes(fs, os.path.abspath(config.output_head), buf.getvalue())
    sidecar = os.path.splitext(os.path.abspath(config.output_head))[0] + ".json"
    atomic_write_bytes(fs, sidecar, json.dumps(report, indent=2).encode())
    print(
        f"aesthetic fit: {config.head_kind} head on {len(train)} ratings; held-out MSE {report['holdout_mse']:.4f} "
        f"(MAE {report['holdout_mae']:.4f}; predicting the mean: {report['holdout_mse_of_mean']:.4f}) on "
        f"{len(test)} in {time.time() - start:.1f}s -> {config.output_head}",
        flush=True,
    )
    return report


# ------------------------------------------------------------------------------------------- subindex

_BAND = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*$")


def parse_bands(text: str) -> list[dict[str, Any]]:
    """'0-4.5,4.5-5.5,5.5-10' -> [{"name": "0-4.5", "lower": 0.0, "upper": 4.5}, ...]."""
    bands = []
    for item in text.split(","):
        m = _BAND.match(item)
        if not m:
            raise ValueError(f"--bands item {item!r} is not LOWER-UPPER (e.g. --bands 0-4.5,4.5-5.5,5.5-10)")
        lo, hi = float(m.group(1)), float(m.group(2))
        if not lo < hi:
            raise ValueError(f"--bands item {item!r}: the lower bound must be below the upper one")
        bands.append({"name": item.strip(), "lower": lo, "upper": hi})
    names = [b["name"] for b in bands]
    if len(set(names)) != len(names):
        raise ValueError(f"--bands {text!r} repeats a band")
    return bands


def quantile_bands(scores: np.ndarray, num_bins: int) -> list[dict[str, Any]]:
    """num_bins equal-count bands q0..q{n-1}: [-inf, t1), [t1, t2), ..., [t_{n-1}, inf) (paper, sec. 4)."""
    edges = np.quantile(scores.astype(np.float64), np.linspace(0, 1, num_bins + 1)[1:-1])
    lows: list[float | None] = [None, *(float(e) for e in edges)]
    highs: list[float | None] = [*(float(e) for e in edges), None]
    return [
        {"name": f"q{i}", "lower": lo, "upper": hi}
        for i, (lo, hi) in enumerate(zip(lows, highs, strict=True))
    ]


@dataclasses.dataclass
class SubindexConfig:
    """Either quantile_bins (N equal-count bands) or bands ("L-H,L-H,..."; [L, H) each)."""

    db: str
    quantile_bins: int | None = None
    bands: str | None = None
    catalogue: str | None = None
    name: str | None = None
    max_index_memory: str = "4G"
    current_memory_available: str = "16G"
    max_query_time_ms: float = 10.0
    index_key: str | None = None

    def __post_init__(self) -> None:
        if (self.quantile_bins is None) == (self.bands is None):
            raise ValueError("pass exactly one of --quantile-bins N or --bands L-H,L-H,...")
        if self.quantile_bins is not None and self.quantile_bins < 1:
            raise ValueError(f"--quantile-bins must be >= 1, got {self.quantile_bins}")


def _build_band(db: str, band: dict[str, Any], config: IndexConfig) -> dict[str, Any]:
    """Runs in a Ray task: select the band's images, build its index into bands/.tmp-<name>, rename into place.

    The band's embeddings are copied part by part into bands/.tmp-<name>/emb/ and autofaiss builds from that
    folder, as the index stage does from img_emb/, so memory stays at one part whatever the band's size; the
    copy is removed once the index is built.
    """
    from pipelines.index import build_faiss_index
    from retrieval.database import Band, Database

    database = Database.open(db)
    selector = Band(band["name"], band["lower"], band["upper"], 0)
    final = os.path.join(db, "bands", band["name"])
    tmp = os.path.join(db, "bands", f".tmp-{band['name']}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "emb"))
    ids = []
    for part, name in enumerate(database.part_names):
        local = np.flatnonzero(selector.contains(database.aesthetic_part(part)))
        if len(local):
            # read whole (not memory-mapped), so each part's pages are let go before the next one
            part_emb = np.load(os.path.join(db, "img_emb", f"img_emb_{name}.npy"))
            np.save(os.path.join(tmp, "emb", f"img_emb_{name}.npy"), part_emb[local])
            del part_emb
            ids.append(np.asarray(database.ids[database.part_rows(part)][local]))
    band_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    infos: dict[str, Any] = {}
    if len(band_ids):
        infos = build_faiss_index(os.path.join(tmp, "emb"), tmp, "image.index", "index_infos.json", config)
    shutil.rmtree(os.path.join(tmp, "emb"))
    np.save(os.path.join(tmp, "ids.npy"), band_ids)
    record = {**band, "count": int(len(band_ids)), "index_key": infos.get("index_key")}
    with open(os.path.join(tmp, "band.json"), "w") as f:
        json.dump(record, f)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return record


def subindex(config: SubindexConfig, ray_address: str | None = None) -> dict[str, Any]:
    """One faiss index per aesthetic band (ids map back to global image ids) + bands.json + catalogue entry."""
    import ray

    from retrieval import catalogue
    from retrieval.database import Database
    from retrieval.ray_env import init_ray

    start = time.time()
    database = Database.open(config.db)
    scores = database.aesthetic_scores(database.ids)
    with open(os.path.join(config.db, "aesthetic", "head.json")) as f:
        head = json.load(f)["head"]
    if config.quantile_bins is not None:
        bands, method = quantile_bands(scores, config.quantile_bins), f"quantile_bins={config.quantile_bins}"
    else:
        bands, method = parse_bands(config.bands), f"bands={config.bands}"  # type: ignore[arg-type]
    index_config = IndexConfig(
        db=config.db,
        max_index_memory=config.max_index_memory,
        current_memory_available=config.current_memory_available,
        max_query_time_ms=config.max_query_time_ms,
        index_key=config.index_key,
    )
    init_ray(ray_address)
    from retrieval.ray_env import node_cpus

    cores = max(node_cpus())  # each band is one task: it must fit on one node
    task = ray.remote(num_cpus=cores)(_build_band)
    index_config.nb_cores = cores
    bands_json_path = os.path.join(config.db, "bands", "bands.json")
    if os.path.exists(bands_json_path):  # until the new bands are all in place, there are no bands
        os.remove(bands_json_path)
    refs = [task.remote(os.path.abspath(config.db), band, index_config) for band in bands]
    records = [ray.get(r) for r in tqdm(refs, desc="aesthetic subindex", unit="band")]
    fs = fsspec.filesystem("file")
    bands_json = {"head": head, "method": method, "num_images": len(scores), "bands": records}
    atomic_write_bytes(
        fs, os.path.join(config.db, "bands", "bands.json"), json.dumps(bands_json, indent=2).encode()
    )
    cat_path = config.catalogue or catalogue.default_path()
    name = config.name or os.path.basename(os.path.abspath(config.db))
    catalogue.register(cat_path, name, catalogue.local_entry(config.db))
    counts = ", ".join(f"{r['name']}: {r['count']}" for r in records)
    print(
        f"aesthetic subindex: {len(records)} bands ({method}; {counts}) in {time.time() - start:.1f}s "
        f"-> {config.db}/bands; catalogue {cat_path} names it {name!r}",
        flush=True,
    )
    return bands_json
