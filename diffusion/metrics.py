"""Sample-quality metrics as torchmetrics objects, fed batch by batch: uint8 images [B, 3, H, W] (and their
prompts or attribute labels) in, numbers out. The feature extractor is an argument, never a download.

- Fréchet distance and KID (Heusel et al. 2017; Binkowski et al. 2018) through torchmetrics'
  FrechetInceptionDistance / KernelInceptionDistance, either in a CLIP image tower's feature space
  (ImageFeatures: available offline, e.g. the toolkit's fitted CLIP) or with the real Inception network when
  the user gives its weights file (inception_fid).
- CLIP score (Hessel et al. 2021): 100 x max(cos(text embedding, image embedding), 0), averaged.
- Attribute accuracy: the share of samples whose classified attribute equals the one the prompt names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric


class ImageFeatures(nn.Module):
    """A CLIP encoder's image tower as a feature extractor: uint8 [B, 3, H, W] -> L2-normalised [B, D] float32.

    Images are resized (bilinear, antialiased) to the encoder's input size and normalised with its mean/std,
    as its own preprocessing would do for a decoded image of that size."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        from torchvision import transforms as T

        self.encoder = encoder
        size = int(np.atleast_1d(encoder.model.visual.image_size)[0])
        norm = next(t for t in encoder.preprocess.transforms if isinstance(t, T.Normalize))
        self.size = size
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1), persistent=False)
        self.num_features = int(encoder.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        return self.encoder.encode_images((x - self.mean) / self.std).float()


def frechet_distance(features: nn.Module) -> Any:
    """torchmetrics' FrechetInceptionDistance in the space of `features` (update(images uint8, real=bool))."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=features, reset_real_features=False, normalize=False)


def kernel_distance(features: nn.Module, subset_size: int) -> Any:
    """torchmetrics' KernelInceptionDistance (polynomial kernel, subsets of subset_size) in that space."""
    from torchmetrics.image.kid import KernelInceptionDistance

    return KernelInceptionDistance(
        feature=features, subset_size=subset_size, reset_real_features=False, normalize=False
    )


def inception_fid(weights_path: str) -> Any:
    """The real Inception-v3 FID (2048-d pool features, torch-fidelity's network) from a local weights file,
    e.g. pt_inception-2015-12-05-6726825d.pth as torch-fidelity publishes it. Nothing is downloaded; the file
    is checked to load as plain tensors (weights_only) before torchmetrics reads it."""
    import os

    from torchmetrics.image.fid import FrechetInceptionDistance

    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"--inception-weights {weights_path} does not exist")
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--inception-weights {weights_path} is not a state dict of tensors")
    return FrechetInceptionDistance(
        feature=2048, reset_real_features=False, feature_extractor_weights_path=weights_path
    )


class ClipScore(Metric):
    """100 x max(cos(text, image), 0) averaged over samples (Hessel et al. 2021, eq. 1 with w = 100, as
    torchmetrics' CLIPScore), with any toolkit CLIP encoder: update(images uint8 [B, 3, H, W], texts [B])."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, encoder: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.features = ImageFeatures(encoder)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, texts: list[str]) -> None:
        if len(texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        img = self.features(images)
        txt = self.features.encoder.encode_texts(texts).float()
        score = 100 * (img * txt).sum(-1).clamp(min=0)
        self.total += score.double().sum()
        self.count += len(images)

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class AttributeAccuracy(Metric):
    """Per attribute, the share of samples whose classified value equals the prompt's; "all" is the share with
    every attribute right. update(images uint8 [B, 3, H, W], targets {attribute: value index [B]}); a target of
    -1 means the prompt does not name that attribute (left out of that attribute's count and of "all"'s
    requirement)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, classifier: Any, attributes: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classifier = classifier.eval()
        self.attributes = list(attributes or classifier.vocabulary)
        for a in [*self.attributes, "all"]:
            self.add_state(f"correct_{a}", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"count_{a}", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            logits = self.classifier(images)
        all_ok = torch.ones(len(images), dtype=torch.bool)
        for a in self.attributes:
            target = torch.as_tensor(targets[a])
            named = target >= 0
            ok = logits[a].argmax(-1) == target
            setattr(self, f"correct_{a}", getattr(self, f"correct_{a}") + (ok & named).sum())
            setattr(self, f"count_{a}", getattr(self, f"count_{a}") + named.sum())
            all_ok &= ok | ~named
        self.correct_all += all_ok.sum()
        self.count_all += len(images)

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            a: getattr(self, f"correct_{a}").float() / getattr(self, f"count_{a}").clamp(min=1)
            for a in [*self.attributes, "all"]
        }
