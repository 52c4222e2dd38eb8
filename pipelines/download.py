"""Download stage: URL list (parquet/csv/tsv/txt/jsonl) -> webdataset shards + per-shard status parquet.

img2dataset does the work (reading, sharding, fetching, resizing, writing); this module schedules its
shards as Ray tasks and adds what it lacks: guarded fetching (see safe_fetch), a header-based
decompression-bomb check, and atomic shards. Each shard is written into ``_tmp/staging_<shard>/`` and
moved into place, ``<shard>_stats.json`` last, so a shard exists for later stages exactly when its
stats file does; a rerun skips those shards.

Output folder::

    00000.tar            webdataset: <key>.jpg, <key>.txt (caption), <key>.json (metadata)
    00000.parquet        one row per input URL: key, url, caption, extra columns, status, error_message
    00000_stats.json     img2dataset's counters; written last
    _download.json       the settings that decide shard contents and keys; written before the first shard

A rerun into the same folder must use the same settings (a different --number-sample-per-shard would give
shards other URLs and images other keys, so URLs would be skipped or ids reused): it is refused, naming
them. A folder that already holds anything without a ``_download.json`` is not ours and is refused too,
so nothing a user keeps there is overwritten or deleted.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import os
import time
from collections import Counter
from typing import Any

import fsspec
import pyarrow.parquet as pq
from img2dataset.downloader import Downloader
from img2dataset.reader import Reader
from img2dataset.resizer import Resizer
from img2dataset.writer import WebDatasetSampleWriter
from PIL import Image
from tqdm.auto import tqdm

from retrieval.safe_fetch import DEFAULT_MAX_BYTES, FetchPolicy, use_opener
from retrieval.storage import check_settings

log = logging.getLogger(__name__)

INPUT_FORMATS = ("parquet", "csv", "tsv", "txt", "jsonl", "json")
CAPTION_COLUMNS = ("caption", "text", "TEXT", "alt")
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
# PIL's own default decompression-bomb threshold.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


@dataclasses.dataclass
class DownloadConfig:
    """Configuration of the download stage (img2dataset options plus our safety limits).

    caption_col: None picks the first of CAPTION_COLUMNS present in the input; "" disables captions.
    extra_cols: input columns to keep in the output (json + parquet); None keeps every other column.
    """

    url_list: str
    output_folder: str
    input_format: str | None = None
    url_col: str = "url"
    caption_col: str | None = None
    extra_cols: list[str] | None = None
    image_size: int = 256
    resize_mode: str = "center_crop"
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = float("inf")
    number_sample_per_shard: int = 10_000
    thread_count: int = 64
    timeout: float = 10.0
    url_deadline: float = 60.0
    retries: int = 0
    max_shard_retry: int = 1
    allow_private_network: bool = False
    allow_network: list[str] | None = None
    max_image_bytes: int = DEFAULT_MAX_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    user_agent_token: str | None = None

    def __post_init__(self) -> None:
        if self.input_format is None:
            self.input_format = infer_input_format(self.url_list)
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(
                f"unknown input format {self.input_format!r} for {self.url_list}; "
                f"pass --input-format, one of {', '.join(INPUT_FORMATS)}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}"
            )
        for name in (
            "image_size",
            "number_sample_per_shard",
            "thread_count",
            "max_image_bytes",
            "max_image_pixels",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("timeout", "url_deadline"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        self.policy()  # validates --allow-network now, not in a worker

    def policy(self) -> FetchPolicy:
        return FetchPolicy(
            allow_private_network=self.allow_private_network,
            allowed_networks=tuple(self.allow_network or ()),
            max_bytes=self.max_image_bytes,
            deadline_seconds=self.url_deadline,
        )


@dataclasses.dataclass
class DownloadSummary:
    """Counts over every shard in the output folder (including those done by earlier runs)."""

    num_shards: int
    num_shards_skipped: int
    count: int
    successes: int
    failed_to_download: int
    failed_to_resize: int
    top_errors: list[tuple[str, int]]
    seconds: float
    # shards given up on; a rerun retries them
    failed_shards: list[int] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        errors = "; ".join(f"{n}x {msg[:80]}" for msg, n in self.top_errors[:3])
        return (
            f"download: {self.count} urls in {self.num_shards} shards ({self.num_shards_skipped} already done): "
            f"{self.successes} success, {self.failed_to_download} failed_to_download, "
            f"{self.failed_to_resize} failed_to_resize in {self.seconds:.1f}s"
            + (f" | top errors: {errors}" if errors else "")
        )


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers have other working directories); URIs unchanged."""
    return path if "://" in path else os.path.abspath(path)


def infer_input_format(url_list: str) -> str:
    name = url_list.rstrip("/").rsplit("/", 1)[-1].lower()
    for ext in INPUT_FORMATS:
        if name.endswith("." + ext) or name.endswith("." + ext + ".gz"):
            return ext + (".gz" if name.endswith(".gz") else "")
    raise ValueError(
        f"cannot tell the format of {url_list} from its extension; pass --input-format ({', '.join(INPUT_FORMATS)})"
    )


def _input_columns(url_list: str, input_format: str) -> list[str]:
    """Column names of the URL list, read from its header only."""
    fs, path = fsspec.core.url_to_fs(url_list)
    if not fs.exists(path):
        raise FileNotFoundError(f"--url-list {url_list} does not exist")
    base = input_format.removesuffix(".gz")
    compression = "gzip" if input_format.endswith(".gz") else None
    if base == "txt":
        return ["url"]
    if base == "parquet":
        with fs.open(path, "rb") as f:
            return pq.read_schema(f).names
    with fs.open(path, "rt", compression=compression, encoding="utf-8") as f:
        first = f.readline()
    if base in ("csv", "tsv"):
        return [c.strip().strip('"') for c in first.rstrip("\r\n").split("," if base == "csv" else "\t")]
    if base == "jsonl":
        return list(json.loads(first).keys()) if first.strip() else []
    import pandas as pd  # json: a whole-array file, small enough to read for its columns

    with fs.open(path, "rt", compression=compression, encoding="utf-8") as f:
        return list(pd.read_json(f).columns)


def resolve_columns(config: DownloadConfig) -> tuple[str | None, list[str]]:
    """Check the URL/caption columns exist; return (caption column or None, extra columns to keep)."""
    assert config.input_format is not None
    columns = _input_columns(config.url_list, config.input_format)
    if config.url_col not in columns:
        raise ValueError(
            f"{config.url_list} has no column {config.url_col!r} (columns: {columns}); pass --url-col"
        )
    if config.caption_col:
        if config.caption_col not in columns:
            raise ValueError(
                f"{config.url_list} has no column {config.caption_col!r} (columns: {columns}); fix --caption-col"
            )
        caption = config.caption_col
    elif config.caption_col is None:
        caption = next((c for c in CAPTION_COLUMNS if c in columns), None)
    else:
        caption = None
    if config.extra_cols is None:
        extra = [c for c in columns if c not in (config.url_col, caption)]
    else:
        missing = [c for c in config.extra_cols if c not in columns]
        if missing:
            raise ValueError(
                f"{config.url_list} has no columns {missing} (columns: {columns}); fix --extra-cols"
            )
        extra = list(config.extra_cols)
    return caption, extra


class GuardedResizer(Resizer):
    """img2dataset's Resizer, refusing images whose header declares more than max_pixels before decoding."""

    def __init__(self, *args: Any, max_pixels: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_pixels = max_pixels

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
        img_stream.seek(0)
        try:
            with Image.open(img_stream) as probe:  # reads the header only
                width, height = probe.size
        except Image.DecompressionBombError as err:  # PIL's own limit (2x its MAX_IMAGE_PIXELS) tripped first
            return (None, None, None, None, None, f"decompression bomb refused: {err}")
        except Exception:  # not a format PIL knows: OpenCV decides (with OPENCV_IO_MAX_IMAGE_PIXELS set)
            width = height = 0
        if width * height > self.max_pixels:
            return (
                None,
                None,
                None,
                None,
                None,
                (
                    f"decompression bomb refused: {width}x{height} pixels > limit {self.max_pixels} "
                    "(--max-image-pixels)"
                ),
            )
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


class GuardedDownloader(Downloader):
    """img2dataset's Downloader with the fetch policy applied and each shard moved into place atomically."""

    def __init__(self, *args: Any, policy: FetchPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy

    def __call__(self, row: tuple[int, str]) -> dict[str, Any]:
        shard_id, _ = row
        final = self.output_folder
        staging = f"{final}/_tmp/staging_{shard_id}"
        fs, staging_path = fsspec.core.url_to_fs(staging)
        if fs.exists(staging_path):
            fs.rm(staging_path, recursive=True)
        fs.makedirs(staging_path, exist_ok=True)
        worker = copy.copy(self)
        worker.output_folder = staging
        with use_opener(self.policy):
            ok, _ = Downloader.__call__(worker, row)
        if not ok:
            return {"shard_id": shard_id, "ok": False, "stats": None}
        name = f"{shard_id:0{self.oom_shard_count}d}"
        _, final_path = fsspec.core.url_to_fs(final)
        for suffix in (".tar", ".parquet", "_stats.json"):  # stats last: it marks the shard done
            fs.mv(f"{staging_path}/{name}{suffix}", f"{final_path}/{name}{suffix}")
        fs.rm(staging_path, recursive=True)
        stats = read_stats(fs, f"{final_path}/{name}_stats.json")
        return {"shard_id": shard_id, "ok": True, "stats": stats}


SETTINGS_FILE = "_download.json"
# What decides which URLs a shard holds, the keys (image ids) they get and how images are stored.
SHARD_SETTINGS = (
    "input_format",
    "url_col",
    "number_sample_per_shard",
    "image_size",
    "resize_mode",
    "resize_only_if_bigger",
    "encode_format",
    "encode_quality",
    "min_image_size",
    "max_aspect_ratio",
)


def shard_settings(config: DownloadConfig, caption_col: str | None, extra_cols: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {"url_list": absolute(config.url_list)}
    settings.update({name: getattr(config, name) for name in SHARD_SETTINGS})
    settings["max_aspect_ratio"] = str(settings["max_aspect_ratio"])  # inf is not JSON
    settings.update(caption_col=caption_col, extra_cols=list(extra_cols))
    return settings


def claim_output_folder(output_folder: str, settings: dict[str, Any]) -> None:
    """Make output_folder ours (or check it already is, with the same settings); refuse otherwise."""
    fs, path = fsspec.core.url_to_fs(output_folder)
    if not fs.exists(f"{path}/{SETTINGS_FILE}") and fs.exists(path):
        found = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        if found:
            raise ValueError(
                f"--output-folder {output_folder} already holds files that no download wrote "
                f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}; no {SETTINGS_FILE}); "
                "use a new or empty folder"
            )
    check_settings(
        f"{output_folder}/{SETTINGS_FILE}",
        settings,
        f"--output-folder {output_folder} holds shards",
        "rerun with the same settings to resume, or use another --output-folder",
    )


def read_stats(fs: Any, path: str) -> dict[str, Any]:
    """A shard's <NNNNN>_stats.json; a damaged one is an error that names it and says how to redo the shard."""
    try:
        with fs.open(path) as f:
            stats = json.load(f)
        int(stats["successes"]), int(stats["count"])
        return stats
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a download stage's stats file ({type(err).__name__}: {err}); delete it and the shard's "
            ".tar and .parquet beside it, then rerun `knn-diffusion download` with the same settings to redo the shard"
        ) from err


def check_tar_header(fs: Any, path: str) -> None:
    """Refuse a shard whose .tar does not start with a tar header (damaged or not ours), naming it."""
    import tarfile

    with fs.open(path, "rb") as f:
        block = f.read(tarfile.BLOCKSIZE)
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as err:
        raise ValueError(
            f"{path} is not a readable tar ({err}); delete it and its _stats.json, then rerun "
            "`knn-diffusion download` with the same settings to redo the shard"
        ) from err


def done_shards(output_folder: str) -> set[int]:
    """Shard ids whose stats file exists (the mark of a finished shard)."""
    fs, path = fsspec.core.url_to_fs(output_folder)
    if not fs.exists(path):
        return set()
    return {int(p.rsplit("/", 1)[-1].split("_")[0]) for p in fs.glob(f"{path}/*_stats.json")}


def summarize(output_folder: str, num_skipped: int, seconds: float) -> DownloadSummary:
    fs, path = fsspec.core.url_to_fs(output_folder)
    totals: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    files = sorted(fs.glob(f"{path}/*_stats.json"))
    for p in files:
        stats = read_stats(fs, p)
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += stats[k]
        errors.update({k: v for k, v in stats.get("status_dict", {}).items() if k != "success"})
    return DownloadSummary(
        num_shards=len(files),
        num_shards_skipped=num_skipped,
        count=totals["count"],
        successes=totals["successes"],
        failed_to_download=totals["failed_to_download"],
        failed_to_resize=totals["failed_to_resize"],
        top_errors=errors.most_common(5),
        seconds=seconds,
    )


def _run_shard(downloader: GuardedDownloader, row: tuple[int, str]) -> dict[str, Any]:
    return downloader(row)


def download(config: DownloadConfig, ray_address: str | None = None) -> DownloadSummary:
    """Run the download stage on Ray; returns (and logs) the counts by status over the whole output."""
    import ray

    from retrieval.ray_env import init_ray

    start = time.time()
    caption_col, extra_cols = resolve_columns(config)
    output_folder = absolute(config.output_folder)
    fs, out_path = fsspec.core.url_to_fs(output_folder)
    claim_output_folder(output_folder, shard_settings(config, caption_col, extra_cols))
    skip = done_shards(output_folder)
    tmp_path = f"{output_folder}/_tmp"
    fs.makedirs(f"{out_path}/_tmp", exist_ok=True)
    reader = Reader(
        absolute(config.url_list),
        config.input_format,
        config.url_col,
        caption_col,
        None,
        None,
        extra_cols or None,
        config.number_sample_per_shard,
        skip,
        tmp_path,
        0,
    )
    resizer = GuardedResizer(
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        upscale_interpolation="lanczos",
        downscale_interpolation="area",
        encode_quality=config.encode_quality,
        encode_format=config.encode_format,
        skip_reencode=False,
        disable_all_reencoding=False,
        min_image_size=config.min_image_size,
        max_image_area=float("inf"),
        max_aspect_ratio=config.max_aspect_ratio,
        blurrer=None,
        max_pixels=config.max_image_pixels,
    )
    downloader = GuardedDownloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=config.thread_count,
        save_caption=caption_col is not None,
        extract_exif=False,
        output_folder=output_folder,
        column_list=reader.column_list,
        timeout=config.timeout,
        number_sample_per_shard=config.number_sample_per_shard,
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=config.encode_format,
        retries=config.retries,
        user_agent_token=config.user_agent_token,
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
        policy=config.policy(),
    )

    init_ray(ray_address)
    run_shard = ray.remote(num_cpus=1, max_retries=config.max_shard_retry, retry_exceptions=False)(
        _run_shard
    ).options(
        # OpenCV's own decoder limit backs up GuardedResizer for formats PIL cannot read.
        runtime_env={"env_vars": {"OPENCV_IO_MAX_IMAGE_PIXELS": str(config.max_image_pixels)}}
    )
    downloader_ref = ray.put(downloader)
    rows = list(reader)  # shards the input into feather files under _tmp; skips done shards
    pending = {run_shard.remote(downloader_ref, row): (row, 0) for row in rows}
    failed: list[int] = []
    with tqdm(total=len(rows), desc="download shards", unit="shard") as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            row, attempt = pending.pop(ready[0])
            result = ray.get(ready[0])
            if not result["ok"]:
                if attempt < config.max_shard_retry:
                    pending[run_shard.remote(downloader_ref, row)] = (row, attempt + 1)
                    continue
                failed.append(row[0])
            else:
                bar.set_postfix(success=result["stats"]["successes"], refresh=False)
            bar.update(1)
    if failed:
        log.error(
            "shards %s failed after %d retries; rerun the same command to retry them",
            failed,
            config.max_shard_retry,
        )
    else:
        fs.rm(f"{out_path}/_tmp", recursive=True)
    summary = summarize(output_folder, num_skipped=len(skip), seconds=time.time() - start)
    summary.failed_shards = sorted(failed)
    print(summary.line(), flush=True)
    return summary
