"""Mask-free text-driven editing: an image + an edit text -> the image with the part the text talks about changed.

The editing model (model edit: true, preset small-edit) is trained on diffusion/edit_pairs.py's pairs: from
I_manip (an image with a random area replaced by its aligned nearest neighbour's) and the CLIP embedding of the
original area, recover the image. At inference (Sheynin et al. 2023, sec. 3.3) the user's image takes I_manip's
place and the CLIP text embedding of the edit text the area's: the model redraws what disagrees with the text
and copies the rest. No mask is given. The model redraws the whole image, so by default (keep) the original is
kept outside the area the edit itself changed most (keep_unchanged); the heat map of |after - before| shows where
the image changed.

`knn-diffusion edit` writes before.png, after.png, heatmap.png, mask.png (where the edit was taken), edit.png (before,
after and heat map side by side) and edit.json;
evaluate_edits scores edits of held-out images with the evaluate stage's attribute classifier.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from diffusion.config import EDIT_KEEP, EDIT_STRENGTH
from retrieval.storage import json_bytes, write_atomic

# (caption, rng) -> (edit text, {attribute: value the edit asks for}), or None when the caption cannot be edited
MakeEdit = Callable[[str, np.random.Generator], tuple[str, dict[str, str]] | None]
# (image [S, S, 3] uint8, caption) -> [S, S] bool: the pixels an edit of that caption may change
EditArea = Callable[[np.ndarray, str], np.ndarray]


@dataclasses.dataclass
class EditSpec:
    """How to make and judge edits of captioned images: make (an edit text and its target attribute values) and
    area (the pixels the edit is about, outside which the image should be kept)."""

    make: MakeEdit
    area: EditArea


@dataclasses.dataclass
class EditConfig:
    """checkpoint: an editing model's run folder or state.pt; image: the picture to edit (any size: centre-cropped
    and resized to the model's); text: what the edited part should show; output: folder for the results."""

    checkpoint: str
    image: str
    text: str
    output: str
    guidance: float = 3.0
    steps: int = 20
    strength: float = EDIT_STRENGTH
    keep: float = EDIT_KEEP
    sampler: str = "dpmpp_2m"
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        from diffusion.samplers import SAMPLERS

        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        if not self.text.strip():
            raise ValueError("--text is empty: say what the edited part should show")
        if self.steps < 1 or self.guidance < 0:
            raise ValueError(f"--steps must be >= 1 and --guidance >= 0, got {self.steps}, {self.guidance}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"--strength must be in (0, 1], got {self.strength}")
        if not 0 <= self.keep < 1:
            raise ValueError(f"--keep must be in [0, 1) (0: keep nothing of the original), got {self.keep}")


def load_edit_model(checkpoint: str, device: str | None = None) -> tuple[torch.nn.Module, Any]:
    """(the editing model on device, its training config); a generator trained without editing is refused."""
    from diffusion.sample import default_device, load_model

    model, config, _ = load_model(checkpoint)
    if not config.model.edit:
        raise ValueError(
            f"--checkpoint {checkpoint} is a generator trained without editing (model edit: false); edit needs an "
            "editing model: `knn-diffusion train --config configs/edit.yaml --tokenizer ...` or the pipeline's edit "
            "stage"
        )
    return model.to(device or default_device()), config


def edit_images(
    model: torch.nn.Module,
    config: Any,
    images: np.ndarray,
    text_emb: np.ndarray,
    guidance: float = 3.0,
    steps: int = 20,
    sampler: str = "dpmpp_2m",
    seed: int = 0,
    batch_size: int = 64,
    strength: float = EDIT_STRENGTH,
) -> np.ndarray:
    """Edited images [N, S, S, 3] uint8 of images [N, S, S, 3] uint8 (the model's size) and edit text
    embeddings [N, D]: sampled with the image (its latents, for a latent model) as the source and
    classifier-free guidance on the text embedding, from noise (strength 1) or from the source noised to
    strength * T (below 1: SDEdit's start, which keeps more of the image). The model's whole images: callers
    keep the original outside the changed area with keep_unchanged."""
    from diffusion.sample import generate

    size = config.model.image_size
    if images.shape[1:] != (size, size, 3):
        raise ValueError(f"the editing model edits {size} x {size} RGB images, got {images.shape[1:]}")
    device = next(model.parameters()).device
    x = (
        torch.tensor(images).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1
    )  # a copy: images may be read-only
    if config.tokenizer:
        from diffusion.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer).to(device)
        x = torch.cat([tokenizer.encode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    cond = {"query": torch.from_numpy(np.ascontiguousarray(text_emb, np.float32)), "source": x.cpu()}
    return generate(
        model, config, cond, sampler, steps, guidance, seed, batch_size, init=x.cpu(), strength=strength
    )


def keep_unchanged(
    before: np.ndarray, after: np.ndarray, keep: float = EDIT_KEEP
) -> tuple[np.ndarray, np.ndarray]:
    """(images, masks): each edit composited over its original, with the mask [N, S, S] float32 in [0, 1] of where
    the edit is taken. The mask is found from the edit alone, with no user mask (in the spirit of DiffEdit,
    Couairon et al. 2022, which infers it from the model's predictions): the pixels whose mean absolute change
    (smoothed 3x3) exceeds `keep` times the image's largest change (and 8 grey levels: an edit that changed
    nothing by more keeps the original), holes closed, grown by one pixel and feathered. The model redraws the
    whole image, so its background drifts (patterns, shades); this keeps the original wherever the edit did not
    really change it. keep 0: the edits unchanged, mask all ones."""
    import cv2

    if keep <= 0:
        return after, np.ones(after.shape[:3], np.float32)
    out, masks = np.empty_like(after), np.empty(after.shape[:3], np.float32)
    kernel = np.ones((3, 3), np.uint8)
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        change = cv2.GaussianBlur(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(-1), (3, 3), 0)
        hard = change > max(keep * change.max(), 8.0)
        hard = cv2.dilate(cv2.morphologyEx(hard.astype(np.uint8), cv2.MORPH_CLOSE, kernel), kernel).astype(
            np.float32
        )
        masks[i] = np.maximum(hard, cv2.GaussianBlur(hard, (3, 3), 0))  # 1 inside, a soft edge outside
        m = masks[i][..., None]
        out[i] = (m * a + (1 - m) * b).round().astype(np.uint8)
    return out, masks


def heat_map(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 colour map (inferno) of the mean absolute change per pixel, 0 to 128 grey levels."""
    import cv2

    change = np.abs(after.astype(np.float32) - before.astype(np.float32)).mean(-1)
    grey = np.clip(change * 2, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def side_by_side(rows: list[list[np.ndarray]], scale: int = 4) -> np.ndarray:
    """Rows of equally sized images, scaled up (nearest) and tiled with white gaps."""
    from diffusion.sample import grid

    big = [np.kron(im, np.ones((scale, scale, 1), np.uint8)) for row in rows for im in row]
    return grid(big, cols=len(rows[0]), pad=4)


def edit(config: EditConfig) -> dict[str, Any]:
    """Edit one image file by text; writes before.png, after.png, heatmap.png, edit.png and edit.json."""
    from diffusion.data import decode_image
    from diffusion.sample import save_png
    from retrieval.clip_model import cached_encoder

    start = time.time()
    if not os.path.exists(config.image):
        raise FileNotFoundError(f"--image {config.image} does not exist")
    model, train_config = load_edit_model(config.checkpoint, config.device)
    with open(config.image, "rb") as f:
        data = f.read()
    try:
        before = decode_image(data, train_config.model.image_size)
    except OSError as err:
        raise ValueError(f"--image {config.image} is not an image PIL can read ({err})") from err
    text_emb = cached_encoder(train_config.clip_model).encode_texts([config.text]).numpy()
    after = edit_images(
        model,
        train_config,
        before[None],
        text_emb,
        config.guidance,
        config.steps,
        config.sampler,
        config.seed,
        strength=config.strength,
    )
    after, mask = (x[0] for x in keep_unchanged(before[None], after, config.keep))
    heat = heat_map(before, after)
    os.makedirs(config.output, exist_ok=True)
    grey = np.repeat((mask * 255).round().astype(np.uint8)[..., None], 3, -1)
    for name, image in (("before", before), ("after", after), ("heatmap", heat), ("mask", grey)):
        save_png(image, os.path.join(config.output, f"{name}.png"))
    save_png(side_by_side([[before, after, heat]]), os.path.join(config.output, "edit.png"))
    changed = float((np.abs(after.astype(np.int16) - before).mean(-1) > 32).mean())
    record = {
        "image": os.path.abspath(config.image),
        "text": config.text,
        "checkpoint": os.path.abspath(config.checkpoint),
        "guidance": config.guidance,
        "steps": config.steps,
        "strength": config.strength,
        "keep": config.keep,
        "edited_area": float(mask.mean()),
        "sampler": config.sampler,
        "seed": config.seed,
        "changed_fraction": changed,
        "seconds": time.time() - start,
    }
    write_atomic(os.path.join(config.output, "edit.json"), json_bytes(record))
    print(
        f"edit: {config.image} by {config.text!r}: {changed:.0%} of the pixels changed (> 32 levels) in "
        f"{record['seconds']:.1f}s -> {config.output}/edit.png",
        flush=True,
    )
    return record


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR [dB] of two uint8 images over the mask's pixels (inf when they agree there, nan on an empty mask)."""
    if not mask.any():
        return float("nan")
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2)[mask].mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def evaluate_edits(
    checkpoint: str,
    database: str,
    heldout_parts: list[str],
    classifier: str,
    spec: EditSpec,
    output: str,
    num_trials: int = 64,
    guidance: float = 3.0,
    steps: int = 20,
    sampler: str = "dpmpp_2m",
    seed: int = 0,
    show: int = 8,
    strength: float = EDIT_STRENGTH,
    keep: float = EDIT_KEEP,
) -> dict[str, Any]:
    """Edit held-out images by spec.make's texts and judge them with the attribute classifier: the share whose
    edited attributes came out as asked, the share whose other attributes were kept, and the PSNR outside the
    edited area (spec.area). Writes edits.json and edits.png (before, after, heat map; `show` rows)."""
    from diffusion.attributes import load_classifier
    from diffusion.evaluate import part_images
    from diffusion.sample import save_png
    from retrieval.clip_model import cached_encoder
    from retrieval.database import Database

    start = time.time()
    model, config = load_edit_model(checkpoint)
    overlap = sorted(set(heldout_parts) - set(config.exclude_parts))
    if overlap:
        raise ValueError(f"the editing model {checkpoint} trained on the held-out parts {overlap}")
    db = Database.open(database)
    _, images, captions = part_images(db, heldout_parts, config.model.image_size)
    net, meta = load_classifier(classifier)
    vocabulary = meta["vocabulary"]
    rng = np.random.default_rng(seed)
    trials = []
    for i in rng.permutation(len(captions)):
        made = spec.make(captions[i], rng)
        if made is not None and all(a in vocabulary for a in made[1]):
            trials.append((int(i), *made))
        if len(trials) == num_trials:
            break
    if not trials:
        raise ValueError(f"none of the held-out captions of {database} can be edited by the edit spec")
    before = images[[i for i, _, _ in trials]]
    texts = [t for _, t, _ in trials]
    text_emb = cached_encoder(config.clip_model).encode_texts(texts).numpy()
    tic = time.time()
    edited = edit_images(model, config, before, text_emb, guidance, steps, sampler, seed, strength=strength)
    after = keep_unchanged(before, edited, keep)[0]
    per_edit = (time.time() - tic) / len(trials)
    pred_after, pred_before = net.predict(after), net.predict(before)
    asked, kept = [], {a: [] for a in vocabulary}
    psnrs = []
    for j, (i, _, target) in enumerate(trials):
        asked.append(all(vocabulary[a][pred_after[a][j]] == v for a, v in target.items()))
        for a in vocabulary:
            if a not in target:
                kept[a].append(pred_after[a][j] == pred_before[a][j])
        psnrs.append(psnr(before[j], after[j], ~spec.area(before[j], captions[i])))
    finite = [p for p in psnrs if np.isfinite(p)]
    record = {
        "checkpoint": os.path.abspath(checkpoint),
        "num_trials": len(trials),
        "asked_attributes": sorted({a for _, _, t in trials for a in t}),
        "edit_accuracy": float(np.mean(asked)),
        "kept": {a: float(np.mean(v)) for a, v in kept.items() if v},
        "psnr_outside_db": float(np.mean(finite)) if finite else float("nan"),
        "guidance": guidance,
        "steps": steps,
        "strength": strength,
        "keep": keep,
        "sampler": sampler,
        "seconds_per_edit": per_edit,
        "examples": [{"caption": captions[i], "text": t} for i, t, _ in trials[:show]],
    }
    os.makedirs(output, exist_ok=True)
    rows = [[before[j], after[j], heat_map(before[j], after[j])] for j in range(min(show, len(trials)))]
    save_png(side_by_side(rows), os.path.join(output, "edits.png"))
    write_atomic(os.path.join(output, "edits.json"), json_bytes(record))
    kept_text = ", ".join(f"{a} {v:.2f}" for a, v in record["kept"].items())
    print(
        f"edit: {len(trials)} edits of held-out images, asked attributes right {record['edit_accuracy']:.2f}, "
        f"kept {kept_text}, PSNR outside the edited area {record['psnr_outside_db']:.1f} dB, "
        f"{per_edit:.2f} s/edit in {time.time() - start:.0f}s -> {output}/edits.png",
        flush=True,
    )
    return record
