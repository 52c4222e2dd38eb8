"""Attribute classifier: labelled images [N, H, W, 3] uint8 + a vocabulary -> a small CNN that names each
attribute of an image (e.g. shape, colour, background), its checkpoint and its held-out accuracy.

The evaluation stage applies it to generated images whose prompts name known attributes: the share of
samples whose attribute matches the prompt is the attribute accuracy (diffusion.metrics.AttributeAccuracy).
It is trained on real images only, at the generator's resolution, with light pixel noise so that it reads
the attribute rather than the texture of real photographs. Nothing here knows the generator.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Vocabulary = dict[str, tuple[str, ...]]  # attribute -> its values, e.g. {"shape": ("circle", "square", ...)}


class AttributeClassifier(nn.Module):
    """uint8 images [B, 3, S, S] (S = image_size, a multiple of 8) -> {attribute: logits [B, num_values]}.

    Three conv stages halve the image to S/8; the heads read the flattened map, not a global pool, so that
    where a thing is (an attribute like position) is kept."""

    def __init__(self, vocabulary: Vocabulary, image_size: int = 32, width: int = 32) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"the attribute classifier needs image_size a multiple of 8, got {image_size}")
        self.vocabulary = {k: tuple(v) for k, v in vocabulary.items()}
        self.image_size = image_size
        layers: list[nn.Module] = []
        c = 3
        for i in range(3):
            w = width * 2**i
            layers += [
                nn.Conv2d(c, w, 3, padding=1),
                nn.BatchNorm2d(w),
                nn.ReLU(),
                nn.Conv2d(w, w, 3, padding=1),
                nn.BatchNorm2d(w),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c = w
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Dropout(0.2))
        flat = c * (image_size // 8) ** 2
        self.heads = nn.ModuleDict({k: nn.Linear(flat, len(v)) for k, v in self.vocabulary.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 127.5 - 1
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """[N, H, W, 3] uint8 -> {attribute: value index [N]}."""
        self.eval()
        out: dict[str, list[np.ndarray]] = {k: [] for k in self.vocabulary}
        for lo in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[lo : lo + batch_size])).permute(0, 3, 1, 2)
            for k, logits in self(x).items():
                out[k].append(logits.argmax(-1).numpy())
        return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()}


@dataclasses.dataclass
class ClassifierFit:
    """What fit_classifier made: the model and its accuracy on held-out real images, per attribute."""

    model: AttributeClassifier
    heldout_accuracy: dict[str, float]
    num_train: int
    num_heldout: int
    seconds: float


def fit_classifier(
    vocabulary: Vocabulary,
    train_images: np.ndarray,
    train_labels: dict[str, np.ndarray],
    heldout_images: np.ndarray,
    heldout_labels: dict[str, np.ndarray],
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    noise_sd: float = 0.06,
    hflip: dict[str, dict[str, str]] | None = None,
    seed: int = 0,
) -> ClassifierFit:
    """Train on [N, S, S, 3] uint8 images with {attribute: value index [N]} labels (AdamW, one-cycle lr, cross
    entropy summed over attributes; Gaussian pixel noise of noise_sd in [-1, 1] units), then measure accuracy
    on the held-out images. hflip: how a horizontal mirror changes the labels ({attribute: {value: mirrored
    value}}, e.g. position left <-> right); given, half of each batch is mirrored, doubling the data."""
    from tqdm import tqdm

    missing = set(vocabulary) - set(train_labels)
    if missing:
        raise ValueError(f"labels are missing for attributes {sorted(missing)}")
    if len(train_images) == 0 or len(heldout_images) == 0:
        raise ValueError(
            f"the classifier needs training and held-out images, got {len(train_images)} and {len(heldout_images)}"
        )
    start = time.time()
    torch.manual_seed(seed)
    model = AttributeClassifier(vocabulary, image_size=train_images.shape[1])
    x_all = torch.from_numpy(np.ascontiguousarray(train_images)).permute(0, 3, 1, 2)
    y_all = {k: torch.from_numpy(np.asarray(train_labels[k], np.int64)) for k in vocabulary}
    steps_per_epoch = max(1, len(x_all) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    flip_index = {
        k: torch.tensor([vocabulary[k].index((hflip or {}).get(k, {}).get(v, v)) for v in vocabulary[k]])
        for k in vocabulary
    }
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="attribute classifier", unit="epoch", leave=False):
        model.train()
        order = torch.randperm(len(x_all), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * batch_size : (s + 1) * batch_size]
            x = (
                x_all[idx].float()
                + torch.randn(len(idx), 3, *x_all.shape[2:], generator=gen) * noise_sd * 127.5
            )
            y = {k: y_all[k][idx] for k in vocabulary}
            if hflip is not None:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                y = {k: torch.where(flip, flip_index[k][v], v) for k, v in y.items()}
            logits = model(x.clamp(0, 255))
            loss = sum(F.cross_entropy(logits[k], y[k]) for k in vocabulary)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
    pred = model.predict(heldout_images)
    acc = {k: float(np.mean(pred[k] == np.asarray(heldout_labels[k]))) for k in vocabulary}
    return ClassifierFit(model.eval(), acc, len(train_images), len(heldout_images), time.time() - start)


def save_classifier(fit: ClassifierFit, path: str) -> None:
    """<path> (state dict, weights_only-safe) and <path>.json (vocabulary, image size, held-out accuracy)."""
    from retrieval.storage import json_bytes, torch_bytes, write_atomic

    write_atomic(path, torch_bytes(fit.model.state_dict()))
    meta = {
        "vocabulary": {k: list(v) for k, v in fit.model.vocabulary.items()},
        "image_size": fit.model.image_size,
        "heldout_accuracy": fit.heldout_accuracy,
        "num_train": fit.num_train,
        "num_heldout": fit.num_heldout,
        "seconds": fit.seconds,
    }
    write_atomic(path + ".json", json_bytes(meta))  # last: marks the classifier complete


def load_classifier(path: str) -> tuple[AttributeClassifier, dict[str, Any]]:
    """(model in eval mode, its .json) from save_classifier's files."""
    if not os.path.exists(path + ".json"):
        raise FileNotFoundError(f"{path}.json is missing: the classifier at {path} was not saved completely")
    with open(path + ".json") as f:
        meta = json.load(f)
    model = AttributeClassifier({k: tuple(v) for k, v in meta["vocabulary"].items()}, meta["image_size"])
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval(), meta
