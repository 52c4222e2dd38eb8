"""Open a retrieval database folder (index + embeddings + metadata [+ aesthetic bands]) and search it.

A database is the folder the embed and index stages write (docs/architecture.md). Results are global
image ids (int64), never faiss row numbers, so they stay valid for every later stage. An aesthetic band
(bands/<name>/, written by `knn-diffusion aesthetic subindex`) is a smaller index over the images whose
score lies in [lower, upper); search(..., band=...) uses it and still answers in global ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from functools import cached_property

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@dataclasses.dataclass(frozen=True)
class DatabaseInfo:
    """<db>/database.json, written by the embed stage when all its parts are done.

    clip_model: the clip-retrieval name of the model that made the embeddings. dim: their width.
    num_images, num_parts: totals. has_text: caption embeddings exist. shards: the image shards they came from.
    On disk, paths (the shards, a checkpoint or config JSON inside clip_model) are stored relative to the
    database folder where they can be, so a database moved or copied together with them still opens; read()
    gives them back absolute.
    """

    clip_model: str
    dim: int = 0
    num_images: int = 0
    num_parts: int = 0
    has_text: bool = False
    shards: str | None = None

    FILE = "database.json"

    @classmethod
    def read(cls, db: str, flag: str = "--db") -> DatabaseInfo:
        import fsspec

        path = f"{db.rstrip('/')}/{cls.FILE}"
        fs, local = fsspec.core.url_to_fs(path)
        if not fs.exists(local):
            raise FileNotFoundError(f"{flag} {db} has no {cls.FILE}; run `knn-diffusion embed` first")
        with fs.open(local) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path} is not valid JSON ({err}); rerun `knn-diffusion embed` to rewrite it"
                ) from err
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            info = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise ValueError(f"{path} is not a database description ({err})") from err
        base = db if "://" in db else os.path.abspath(db)
        return dataclasses.replace(
            info,
            clip_model=_clip_paths(info.clip_model, lambda p: _absolute(p, base)),
            shards=_absolute(info.shards, base),
        )

    def write(self, db: str) -> None:
        from retrieval.storage import json_bytes, write_atomic

        base = db if "://" in db else os.path.abspath(db)
        on_disk = dataclasses.replace(
            self,
            clip_model=_clip_paths(self.clip_model, lambda p: _relative(p, base)),
            shards=_relative(self.shards, base),
        )
        write_atomic(os.path.join(db, self.FILE), json_bytes(dataclasses.asdict(on_disk)))


def _relative(path: str | None, base: str) -> str | None:
    if not path or "://" in path or not os.path.isabs(path) or "://" in base:
        return path
    return os.path.relpath(path, base)


def _absolute(path: str | None, base: str) -> str | None:
    if not path or "://" in path or os.path.isabs(path) or "://" in base:
        return path
    return os.path.normpath(os.path.join(base, path))


def _clip_paths(name: str, convert) -> str:  # type: ignore[no-untyped-def]
    """name with the local paths inside it (config JSON, checkpoint) passed through convert."""
    from retrieval.clip_model import ClipSpec

    try:
        spec = ClipSpec.parse(name)
    except ValueError:
        return name
    config = convert(spec.config) if spec.config.endswith(".json") else spec.config
    weights = convert(spec.pretrained) if os.sep in spec.pretrained else spec.pretrained
    return f"open_clip:{config}/{weights}"


@dataclasses.dataclass
class SearchResult:
    """ids [Q, k] int64 global image ids (-1 where fewer than k results); scores [Q, k] float32 cosine."""

    ids: np.ndarray
    scores: np.ndarray


def read_index(path: str, mmap: bool = True) -> faiss.Index:
    """A faiss index, memory-mapped read-only where the index type allows it."""
    if mmap:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # some index types cannot be memory-mapped
            pass
    return faiss.read_index(path)


def map_rows(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """faiss rows [Q, k] (-1 = no result) -> image ids [Q, k] (-1 kept)."""
    return np.where(rows >= 0, ids[np.clip(rows, 0, None)], -1)


@dataclasses.dataclass
class Band:
    """One aesthetic band: images whose score s satisfies lower <= s < upper (None = unbounded)."""

    name: str
    lower: float | None
    upper: float | None
    count: int

    def contains(self, scores: np.ndarray) -> np.ndarray:
        lo = -np.inf if self.lower is None else self.lower
        hi = np.inf if self.upper is None else self.upper
        return (scores >= lo) & (scores < hi)


def normalize(queries: np.ndarray) -> np.ndarray:
    """[Q, D] float32, L2-normalised (a single [D] vector becomes [1, D])."""
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)


class NpyRows:
    """Rows of a 2-D .npy file read with positioned reads: what a search gathers stays in this process's
    memory only as long as it is used. A memory map would instead keep every page it touched (and the kernel's
    read-ahead around it) resident in the process, so a long run of random lookups would grow towards the
    size of the whole database's embeddings."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{path} is not a 2-D C-ordered array; rerun `knn-diffusion embed`")
        self.shape, self.dtype = shape, dtype
        self.row_bytes = dtype.itemsize * shape[1]

    def __len__(self) -> int:
        return int(self.shape[0])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), D] in the file's dtype; consecutive rows are read together."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.empty((0, self.shape[1]), self.dtype)
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"rows outside 0..{self.shape[0] - 1} of {self.path}")
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        starts = np.flatnonzero(np.diff(sorted_rows, prepend=-2) != 1)  # runs of consecutive rows
        ends = np.append(starts[1:], len(rows))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for lo, hi in zip(starts, ends, strict=True):
                first, count = int(sorted_rows[lo]), int(sorted_rows[hi - 1] - sorted_rows[lo] + 1)
                data = os.pread(fd, count * self.row_bytes, self.offset + first * self.row_bytes)
                block = np.frombuffer(data, self.dtype).reshape(count, self.shape[1])
                out[order[lo:hi]] = block[sorted_rows[lo:hi] - first]
        finally:
            os.close(fd)
        return out


ROW_IDS = "image_ids.npy"  # [N] int64: the image id of every row, parts in order (faiss row order)
PARTS = "parts.json"  # {"names": [...], "sizes": [...]}: each part's name and row count


def read_row_ids(path: str, names: list[str]) -> tuple[np.ndarray, list[int]]:
    """(image id of every row, memory-mapped; rows per part) of a database whose parts are `names`.

    A database written before image_ids.npy existed has its ids read from every metadata part instead (all
    in memory); rerunning `knn-diffusion embed` on it writes the file.
    """
    ids_path, parts_path = os.path.join(path, ROW_IDS), os.path.join(path, PARTS)
    if not os.path.exists(ids_path) or not os.path.exists(parts_path):
        part_ids = [
            pq.read_table(os.path.join(path, "metadata", f"metadata_{n}.parquet"), columns=["image_id"])[
                "image_id"
            ].to_numpy()
            for n in names
        ]
        ids = np.concatenate(part_ids) if part_ids else np.zeros(0, np.int64)
        return ids.astype(np.int64), [len(x) for x in part_ids]
    with open(parts_path) as f:
        parts = json.load(f)
    if parts["names"] != names:
        raise ValueError(
            f"{parts_path} lists other parts than {path}/metadata holds; rerun `knn-diffusion embed` "
            "on this database to rewrite it"
        )
    ids = np.load(ids_path, mmap_mode="r")
    if ids.dtype != np.int64 or ids.ndim != 1 or len(ids) != sum(parts["sizes"]):
        raise ValueError(
            f"{ids_path} is not one int64 id per row of {parts_path}; rerun `knn-diffusion embed` to rewrite it"
        )
    return ids, [int(n) for n in parts["sizes"]]


class Database:
    """A local database folder. Open with Database.open(path); see search() and search_text()."""

    def __init__(self, path: str, index: faiss.Index, ids: np.ndarray, info: DatabaseInfo) -> None:
        self.path = path
        self.index = index
        self.ids = ids
        self.info = info
        self.dim = info.dim
        self.mmap = True
        self.part_names: list[str] = []
        self.part_ends = np.zeros(0, np.int64)
        self._band_indexes: dict[str, tuple[faiss.Index | None, np.ndarray]] = {}

    @classmethod
    def open(cls, path: str, modality: str = "image", mmap: bool = True) -> Database:
        """Load <path>/<modality>.index (memory-mapped when possible) and the image id of every row.

        The row ids come from <path>/image_ids.npy, memory-mapped, so opening costs the same at any size and
        every process on a node shares one copy in the page cache; parts.json gives each part's row count.
        """
        from retrieval.storage import list_parts

        info = DatabaseInfo.read(path, "database")
        index_path = os.path.join(path, f"{modality}.index")
        if not os.path.exists(index_path):
            raise FileNotFoundError(
                f"{index_path} does not exist; run `knn-diffusion index --db {path}` first"
            )
        index = read_index(index_path, mmap)
        names = list_parts(os.path.join(path, "metadata"), "metadata_", ".parquet")
        ids, sizes = read_row_ids(path, names)
        if len(ids) != index.ntotal:
            raise ValueError(
                f"{path}: the index holds {index.ntotal} vectors but the metadata {len(ids)} rows; "
                f"rebuild it with `knn-diffusion index --db {path}`"
            )
        db = cls(path, index, ids, info)
        db.mmap = mmap
        db.part_names = names
        db.part_ends = np.cumsum(sizes, dtype=np.int64)
        return db

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, band: str | int | None = None) -> SearchResult:
        """k nearest images of each query embedding ([Q, D] or [D]; normalised here) by cosine similarity.

        band: an aesthetic band's name or position in `bands` (0 = lowest scores); None searches everything.
        """
        q = normalize(queries)
        if q.shape[1] != self.dim:
            raise ValueError(
                f"query dimension {q.shape[1]} does not match the database's {self.dim} ({self.path})"
            )
        index, ids = self.index_and_ids(band)
        if index is None:  # an empty band
            return SearchResult(np.full((len(q), k), -1, np.int64), np.full((len(q), k), -np.inf, np.float32))
        scores, rows = index.search(q, k)
        return SearchResult(ids=map_rows(rows, ids), scores=scores.astype(np.float32))

    @cached_property
    def bands(self) -> list[Band]:
        """The aesthetic bands, lowest scores first ([] when none were built)."""
        path = os.path.join(self.path, "bands", "bands.json")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [
                Band(**{k: b[k] for k in ("name", "lower", "upper", "count")}) for b in json.load(f)["bands"]
            ]

    def band(self, band: str | int) -> Band:
        bands = self.bands
        if not bands:
            raise ValueError(
                f"{self.path} has no aesthetic bands; run `knn-diffusion aesthetic subindex --db {self.path}`"
            )
        names = [b.name for b in bands]
        if isinstance(band, str) and band in names:
            return bands[names.index(band)]
        if (isinstance(band, (int, np.integer)) or band.isdigit()) and 0 <= int(band) < len(
            bands
        ):  # `--band 4`
            return bands[int(band)]
        raise ValueError(
            f"{self.path} has no band {band!r}; its bands are {names} (or positions 0..{len(bands) - 1})"
        )

    def index_and_ids(self, band: str | int | None = None) -> tuple[faiss.Index | None, np.ndarray]:
        """(faiss index, image id of each of its rows) of the whole database or of a band (None if empty)."""
        if band is None:
            return self.index, self.ids
        name = self.band(band).name
        if name not in self._band_indexes:
            folder = os.path.join(self.path, "bands", name)
            ids = np.load(os.path.join(folder, "ids.npy"))
            index = read_index(os.path.join(folder, "image.index"), self.mmap) if len(ids) else None
            self._band_indexes[name] = (index, ids)
        return self._band_indexes[name]

    def aesthetic_part(self, part: int) -> np.ndarray:
        """[rows of the part] float32 aesthetic scores of one part, checked row for row against its ids."""
        name = self.part_names[part]
        path = os.path.join(self.path, "aesthetic", f"aesthetic_{name}.parquet")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} does not exist: {self.path} has no aesthetic scores for part {name}; "
                f"run `knn-diffusion aesthetic score --db {self.path}`"
            )
        table = pq.read_table(path, columns=["image_id", "aesthetic"])
        ids = self.ids[self.part_rows(part)]
        if len(table) != len(ids) or not (table["image_id"].to_numpy() == ids).all():
            raise ValueError(
                f"{path} does not cover part {name}'s images; rerun `knn-diffusion aesthetic score`"
            )
        return table["aesthetic"].to_numpy().astype(np.float32)

    def aesthetic_scores(self, image_ids: np.ndarray) -> np.ndarray:
        """[n] float32 aesthetic scores of the given ids (read from the parts they are in, one at a time)."""
        rows = self.rows_of(image_ids)
        out = np.empty(len(rows), np.float32)
        for part, sel, local in self.rows_by_part(rows):
            out[sel] = self.aesthetic_part(part)[local]
        return out

    def part_rows(self, part: int) -> slice:
        """The faiss/metadata rows of one part (by its position in part_names)."""
        return slice(int(self.part_ends[part - 1]) if part else 0, int(self.part_ends[part]))

    def rows_by_part(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(part index, positions in `rows`, rows within the part) for each part that `rows` touch."""
        part_of = np.searchsorted(self.part_ends, rows, side="right")
        starts = np.concatenate([[0], self.part_ends[:-1]])
        for part in np.unique(part_of):
            sel = np.flatnonzero(part_of == part)
            yield int(part), sel, rows[sel] - starts[part]

    def search_text(self, texts: list[str], k: int) -> SearchResult:
        """Embed texts with the database's own CLIP model, then search()."""
        from retrieval.clip_model import cached_encoder

        return self.search(cached_encoder(self.info.clip_model).encode_texts(texts).numpy(), k)

    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Row positions of image ids (ids are sorted within and across parts)."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        rows = np.searchsorted(self.ids, image_ids)
        if (rows >= len(self.ids)).any() or (
            self.ids[np.minimum(rows, len(self.ids) - 1)] != image_ids
        ).any():
            raise KeyError(
                f"image ids not in {self.path}: "
                f"{image_ids[self.ids[np.minimum(rows, len(self.ids) - 1)] != image_ids][:5]}"
            )
        return rows

    @cached_property
    def _embedding_files(self) -> list[NpyRows]:
        """One row reader per img_emb part: rows are read on demand, never mapped or concatenated."""
        return [
            NpyRows(os.path.join(self.path, "img_emb", f"img_emb_{name}.npy")) for name in self.part_names
        ]

    def embeddings_at_rows(self, rows: np.ndarray) -> np.ndarray:
        """[n, D] float32 embeddings of faiss/metadata rows, read part by part from the files."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        for part, sel, local in self.rows_by_part(rows):
            out[sel] = self._embedding_files[part].take(local)
        return out

    def embeddings(self, image_ids: np.ndarray) -> np.ndarray:
        """[n, D] float32 image embeddings of the given ids."""
        return self.embeddings_at_rows(self.rows_of(image_ids))

    def images(self, image_ids: np.ndarray) -> dict[int, bytes]:
        """The encoded images (as downloaded into the shards) of the given ids, read from the shards' tars."""
        import fsspec

        from retrieval.storage import IMAGE_EXTENSIONS, tar_samples

        shards = self.info.shards
        if not shards:
            raise FileNotFoundError(
                f"{self.path}/database.json records no shards, so its images cannot be shown"
            )
        image_ids = np.asarray(image_ids, dtype=np.int64)
        rows = self.rows_of(image_ids)
        keys = self.metadata_at_rows(rows)["key"].to_numpy()
        wanted: dict[str, dict[str, int]] = {}
        for part, sel, _ in self.rows_by_part(rows):
            wanted[self.part_names[part]] = {str(keys[i]): int(image_ids[i]) for i in sel}
        found: dict[int, bytes] = {}
        for part, by_key in wanted.items():
            tar = f"{shards.rstrip('/')}/{part}.tar"
            with fsspec.open(tar, "rb") as f:
                for key, sample in tar_samples(f, tar):
                    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                    if key in by_key and ext:
                        found[by_key[key]] = sample[ext]
        return found

    def metadata(self, image_ids: np.ndarray) -> pd.DataFrame:
        """Metadata rows (url, caption, ...) of the given ids, in the given order."""
        return self.metadata_at_rows(self.rows_of(image_ids))

    def metadata_at_rows(self, rows: np.ndarray) -> pd.DataFrame:
        """Metadata of faiss/metadata rows, in the given order. Only the parts holding the rows are read, one at
        a time, so memory follows the request, not the database."""
        rows = np.asarray(rows, dtype=np.int64)
        pieces, order = [], []
        for part, sel, local in self.rows_by_part(rows):
            path = os.path.join(self.path, "metadata", f"metadata_{self.part_names[part]}.parquet")
            pieces.append(pq.read_table(path).take(pa.array(local)).to_pandas())
            order.append(sel)
        if not pieces:
            return (
                pq.read_schema(os.path.join(self.path, "metadata", f"metadata_{self.part_names[0]}.parquet"))
                .empty_table()
                .to_pandas()
            )
        frame = pd.concat(pieces, ignore_index=True)
        return frame.iloc[np.argsort(np.concatenate(order), kind="stable")].reset_index(drop=True)


def read_neighbour_table(path: str) -> dict[str, np.ndarray]:
    """A neighbours folder (or one shard) -> image_id [N], neighbour_ids [N, k], neighbour_scores [N, k]
    (+ neighbour_emb [N, k, D] float16 when stored)."""
    from retrieval.storage import list_parts

    if os.path.isdir(path):
        files = [
            os.path.join(path, f"neighbours_{p}.parquet") for p in list_parts(path, "neighbours_", ".parquet")
        ]
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"{path} holds no neighbours_*.parquet; run `knn-diffusion neighbours` first")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    n = len(table)
    out = {"image_id": table["image_id"].to_numpy()}
    for name in ("neighbour_ids", "neighbour_scores"):
        col = table[name].combine_chunks()
        out[name] = col.flatten().to_numpy().reshape(n, col.type.list_size)
    if "neighbour_emb" in table.column_names:
        col = table["neighbour_emb"].combine_chunks()
        k, dim = col.type.list_size, col.type.value_type.list_size
        out["neighbour_emb"] = col.flatten().flatten().to_numpy(zero_copy_only=False).reshape(n, k, dim)
    return out
