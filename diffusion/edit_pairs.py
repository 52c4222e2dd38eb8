"""Training pairs for mask-free text-driven editing, built from images and their nearest neighbours only.

KNN-Diffusion's manipulation method (Sheynin et al. 2023, sec. 3.3): take a training image I and a random local
area M; align I's nearest neighbour N to I with ECC (Evangelidis & Psarakis 2008, "Parametric Image Alignment
Using Enhanced Correlation Coefficient Maximization"; OpenCV's findTransformECC) and paste the aligned N's
pixels into M: I_manip. The editing model learns to recover I from I_manip, conditioned on I_manip and on the
CLIP embedding of I's local area, f_img(I restricted to M). No mask, text or edit annotation is needed. At
inference the user's image takes I_manip's place and the edit text's CLIP embedding the local area's.

load_edit_part is the Ray Data map function that streams the pairs into training (diffusion.data.make_dataset
uses it for a model with edit: true): one part at a time, nothing written to disk.
"""

from __future__ import annotations

import functools
import io
import zlib
from typing import Any

import cv2
import numpy as np

MOTIONS = {"euclidean": cv2.MOTION_EUCLIDEAN, "affine": cv2.MOTION_AFFINE}


def align_ecc(
    moving: np.ndarray,
    fixed: np.ndarray,
    motion: str = "affine",
    iterations: int = 50,
    eps: float = 1e-4,
    max_shift: float = 0.25,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Warp moving [H, W, 3] uint8 onto fixed (same shape) by ECC on their grey levels.

    Returns (the warped image, the 2 x 3 warp (fixed's pixel coordinates -> moving's), converged). When ECC does
    not converge (OpenCV raises), or converges to a warp that moves a corner by more than max_shift of the side
    (two unlike images), the fallback is the identity: moving unchanged, converged False."""
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {sorted(MOTIONS)}, got {motion!r}")
    if moving.shape != fixed.shape:
        raise ValueError(f"align_ecc: images of different shapes {moving.shape} and {fixed.shape}")
    h, w = fixed.shape[:2]
    identity = np.eye(2, 3, dtype=np.float32)

    def grey(image: np.ndarray) -> np.ndarray:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0

    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, eps)
    try:
        _, warp = cv2.findTransformECC(
            grey(fixed), grey(moving), identity.copy(), MOTIONS[motion], criteria, None, 3
        )
    except cv2.error:
        return moving.copy(), identity, False
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], np.float32)
    shift = np.abs(corners @ warp.T - corners[:, :2]).max()
    if not np.isfinite(shift) or shift > max_shift * max(h, w):
        return moving.copy(), identity, False
    warped = cv2.warpAffine(
        moving, warp, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT
    )
    return warped, warp, True


def random_area(rng: np.random.Generator, area: tuple[float, float]) -> tuple[float, float, float, float]:
    """A random rectangle (top, left, height, width) as fractions of the image side: each side uniform in
    [area[0], area[1]], placed uniformly inside the image."""
    h, w = rng.uniform(area[0], area[1], size=2)
    return float(rng.uniform(0, 1 - h)), float(rng.uniform(0, 1 - w)), float(h), float(w)


def area_pixels(box: tuple[float, float, float, float], size: int) -> tuple[slice, slice]:
    """The (rows, columns) slices of a fractional box in a size x size image (at least one pixel each way)."""
    top, left, h, w = box
    y0, x0 = int(round(top * size)), int(round(left * size))
    y1, x1 = max(y0 + 1, int(round((top + h) * size))), max(x0 + 1, int(round((left + w) * size)))
    return slice(y0, min(y1, size)), slice(x0, min(x1, size))


def manipulate(image: np.ndarray, donor: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """I_manip: image with the box's pixels replaced by the donor's (the aligned neighbour); outside the box it
    is the image, bit for bit."""
    out = image.copy()
    rows, cols = area_pixels(box, image.shape[0])
    out[rows, cols] = donor[rows, cols]
    return out


def crop_box(image: Any, box: tuple[float, float, float, float]) -> Any:
    """The box of a PIL image (at its own resolution), for the local area's CLIP embedding."""
    top, left, h, w = box
    W, H = image.size
    return image.crop(
        (
            int(left * W),
            int(top * H),
            max(int(left * W) + 1, int((left + w) * W)),
            max(int(top * H) + 1, int((top + h) * H)),
        )
    )


def rotate_hue(image: np.ndarray, degrees: float) -> np.ndarray:
    """image [H, W, 3] uint8 RGB with its hue turned by degrees (saturation and value kept)."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(degrees / 2))) % 180).astype(
        np.uint8
    )  # H: 0..179
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


@functools.lru_cache(maxsize=16)
def _tar_images(tar: str) -> dict[int, bytes]:
    """diffusion.data.shard_images, cached per process: a part's neighbours live in other parts, whose shards
    every part's task would otherwise parse again."""
    from diffusion.data import shard_images

    return shard_images(tar)


def _images(db: str, tar: str, ids: np.ndarray) -> dict[int, bytes]:
    """The encoded images of ids: the part's own shard (tar) and the shards of the database's other parts."""
    from diffusion.data import _database

    database = _database(db)
    found: dict[int, bytes] = {}
    base = tar.rsplit("/", 1)[0]
    for part, sel, _ in database.rows_by_part(database.rows_of(np.asarray(ids, np.int64))):
        shard = _tar_images(f"{base}/{database.part_names[part]}.tar")
        found.update({int(i): shard[int(i)] for i in np.asarray(ids)[sel] if int(i) in shard})
    return found


def load_edit_part(
    batch: dict[str, np.ndarray],
    db: str,
    image_size: int,
    clip_model: str,
    area: tuple[float, float],
    motion: str,
    seed: int,
    hue: float = 0.0,
) -> dict[str, np.ndarray]:
    """Ray Data map_batches function (batch of one work item, as diffusion.data.part_items) -> the part's
    editing pairs: image (I, uint8 [S, S, 3]), source (I_manip), query (f_img of I's area, float32 [D]),
    aligned (ECC converged for this pair's neighbour), image_id. hue: the probability that the aligned
    neighbour's hue is turned by a uniform random angle before it is pasted (colour jitter of the donor: where
    nearest neighbours share the image's colours, pairs would otherwise never teach a change of colour). An
    image whose table lists no neighbour gets its own pixels as donor and counts as not aligned."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from diffusion.data import centre_square, decode_image
    from retrieval.clip_model import cached_encoder
    from retrieval.database import read_neighbour_table

    item = {key: str(batch[key][0]) for key in ("tar", "meta", "neighbours")}
    epoch = int(batch["epoch"][0]) if "epoch" in batch else 0
    ids = pq.read_table(item["meta"], columns=["image_id"])["image_id"].to_numpy()
    table = read_neighbour_table(item["neighbours"])
    if not np.array_equal(table["image_id"], ids):
        raise ValueError(
            f"{item['neighbours']} is not row for row with {item['meta']}; recompute the neighbours"
        )
    encoded = _tar_images(item["tar"])
    missing = [int(i) for i in ids if int(i) not in encoded]
    if missing:
        raise ValueError(f"{item['tar']} lacks images {missing[:5]} that the database lists; re-run embed")
    nearest = table["neighbour_ids"][:, 0] if table["neighbour_ids"].shape[1] else np.full(len(ids), -1)
    donors = _images(db, item["tar"], np.unique(nearest[nearest >= 0]))
    torch.set_num_threads(1)  # one core per task: the training workers hold the rest
    encoder = cached_encoder(clip_model)
    rng = np.random.default_rng([zlib.crc32(item["tar"].encode()), epoch, seed])
    order = rng.permutation(len(ids))
    images, sources, crops, aligned = [], [], [], []
    for i in order:
        pil = Image.open(io.BytesIO(encoded[int(ids[i])])).convert("RGB")
        image = decode_image(encoded[int(ids[i])], image_size)
        donor, ok = image, False
        if int(nearest[i]) in donors:
            donor, _, ok = align_ecc(decode_image(donors[int(nearest[i])], image_size), image, motion)
        if rng.random() < hue:
            donor = rotate_hue(donor, rng.uniform(30, 330))
        box = random_area(rng, area)
        images.append(image)
        sources.append(manipulate(image, donor, box))
        crops.append(encoder.preprocess(crop_box(centre_square(pil), box)))
        aligned.append(ok)
    with torch.inference_mode():
        query = torch.cat(
            [encoder.encode_images(torch.stack(crops[j : j + 256])) for j in range(0, len(crops), 256)]
        )
    return {
        "image": np.stack(images),
        "source": np.stack(sources),
        "query": query.numpy().astype(np.float32),
        "aligned": np.asarray(aligned, bool),
        "image_id": ids[order].astype(np.int64),
    }
