"""Aesthetic heads: CLIP image embedding [N, D] (L2-normalised) -> aesthetic score [N] (LAION's 0-10 scale).

Published heads (LAION aesthetic predictor v1 linear heads and the improved v2 MLP) are fetched from their
public homes on first use into a cache and checked against their sha256; KNN_DIFFUSION_AESTHETIC_DIR (or
the --head-dir flag) points at a folder that already holds them, for offline machines. Heads fitted with
`knn-diffusion aesthetic fit` are a .pt state dict plus a .json beside it naming the model they belong to.
Every head is loaded with weights_only and refuses embeddings of another model or dimension.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import torch
from torch import nn

from retrieval.clip_model import ClipSpec

HEAD_DIR_ENV = "KNN_DIFFUSION_AESTHETIC_DIR"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "knn_diffusion", "aesthetic")
MAX_HEAD_BYTES = 64 * 1024 * 1024

_V1 = "https://github.com/LAION-AI/aesthetic-predictor/raw/main/"
_V2 = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"


@dataclasses.dataclass(frozen=True)
class PublishedHead:
    """A head LAION published: its file, where it lives, its sha256, shape, and the CLIP it was trained on."""

    file: str
    url: str
    sha256: str
    kind: str  # "linear" or "mlp"
    dim: int
    clip_model: str


PUBLISHED: dict[str, PublishedHead] = {
    "laion-v1:ViT-B-32": PublishedHead(
        "sa_0_4_vit_b_32_linear.pth",
        _V1 + "sa_0_4_vit_b_32_linear.pth",
        "c7b14cead230694acc7b9447974d3cad78003c72da032e402a303b6c2429e85f",
        "linear",
        512,
        "open_clip:ViT-B-32/openai",
    ),
    "laion-v1:ViT-B-16": PublishedHead(
        "sa_0_4_vit_b_16_linear.pth",
        _V1 + "sa_0_4_vit_b_16_linear.pth",
        "8ad3923d7ecf019df20ecd2ab5542a3075fbba0278d239c0371345f3d7fcbde0",
        "linear",
        512,
        "open_clip:ViT-B-16/openai",
    ),
    "laion-v1:ViT-L-14": PublishedHead(
        "sa_0_4_vit_l_14_linear.pth",
        _V1 + "sa_0_4_vit_l_14_linear.pth",
        "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba",
        "linear",
        768,
        "open_clip:ViT-L-14/openai",
    ),
    "laion-v2:ViT-L-14": PublishedHead(
        "sac+logos+ava1-l14-linearMSE.pth",
        _V2 + "sac+logos+ava1-l14-linearMSE.pth",
        "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
        "mlp",
        768,
        "open_clip:ViT-L-14/openai",
    ),
}


class AestheticMLP(nn.Module):
    """The improved predictor's shape (D-1024-128-64-16-1, dropout between, no activations: v2's own choice)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)


def make_head(kind: str, dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, 1)
    if kind == "mlp":
        return AestheticMLP(dim)
    raise ValueError(f"head kind must be 'linear' or 'mlp', got {kind!r}")


@dataclasses.dataclass
class AestheticHead:
    """A loaded head. score(emb [N, D]) -> [N] float32; emb is L2-normalised first, as LAION's heads expect."""

    name: str
    kind: str
    dim: int
    clip_model: str
    module: nn.Module
    sha256: str = ""

    @torch.inference_mode()
    def score(self, emb: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        emb = np.atleast_2d(np.asarray(emb, dtype=np.float32))
        if emb.shape[1] != self.dim:
            raise ValueError(
                f"aesthetic head {self.name} takes {self.dim}-d embeddings ({self.clip_model}); got {emb.shape[1]}-d"
            )
        out = []
        for start in range(0, len(emb), batch_size):
            x = torch.tensor(emb[start : start + batch_size])
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
            out.append(self.module(x)[:, 0].numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def check_model(self, clip_model: str, dim: int, allow_other_weights: bool = False) -> None:
        """Refuse a database embedded by another model: a head's scores mean nothing on foreign embeddings."""
        ours, theirs = ClipSpec.parse(self.clip_model), ClipSpec.parse(clip_model)
        hint = "fit a head for it with `knn-diffusion aesthetic fit`"
        same_arch = ours.config.removesuffix("-quickgelu") == theirs.config.removesuffix("-quickgelu")
        if dim != self.dim or not same_arch:
            raise ValueError(
                f"aesthetic head {self.name} is for {self.clip_model} ({self.dim}-d), but the database was embedded "
                f"with {clip_model} ({dim}-d): {hint}"
            )
        if ours.pretrained != theirs.pretrained and not allow_other_weights:
            raise ValueError(
                f"aesthetic head {self.name} was trained on {self.clip_model} embeddings, but the database uses "
                f"{clip_model} (same architecture, other weights); pass --allow-other-weights if those are the "
                f"same weights under another name, else {hint}"
            )


def head_for(head: str, clip_model: str) -> str:
    """Resolve 'laion-v1' / 'laion-v2' to the published head for the database's model; pass other names through."""
    if head in ("laion-v1", "laion-v2"):
        config = ClipSpec.parse(clip_model).config.removesuffix("-quickgelu")
        name = f"{head}:{config}"
        if name not in PUBLISHED:
            have = ", ".join(n for n in PUBLISHED if n.startswith(head))
            raise ValueError(
                f"LAION published no {head} head for {config} (only {have}); "
                "fit one with `knn-diffusion aesthetic fit` and pass its path as --head"
            )
        return name
    return head


def fetch_published(
    name: str,
    head_dir: str | None = None,
    cache: str | None = None,
    url: str | None = None,
    allow_network: tuple[str, ...] = (),
) -> str:
    """Local path of a published head: from head_dir / $KNN_DIFFUSION_AESTHETIC_DIR, else the cache, where it
    is fetched once (public addresses only, unless allow_network; size-capped; sha256-checked before caching).
    url overrides the public home (a mirror)."""
    spec = PUBLISHED[name]
    folder = head_dir or os.environ.get(HEAD_DIR_ENV)
    if folder:
        path = os.path.join(folder, spec.file)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} does not exist (--head-dir / ${HEAD_DIR_ENV} = {folder}); download {spec.url} there"
            )
        return _verified(path, spec)
    path = os.path.join(cache or DEFAULT_CACHE, spec.file)
    if not os.path.exists(path):
        import fsspec

        from retrieval.safe_fetch import FetchPolicy, guarded_opener
        from retrieval.storage import atomic_write_bytes

        policy = FetchPolicy(max_bytes=MAX_HEAD_BYTES, allowed_networks=allow_network)
        try:
            with guarded_opener(policy).open(url or spec.url, timeout=60) as r:
                data = r.read()
        except OSError as err:  # offline, 404, timeout
            raise ValueError(
                f"could not download the aesthetic head {name} from {url or spec.url} ({err}); on a machine "
                f"without internet, put {spec.file} in a folder and pass --head-dir (or set ${HEAD_DIR_ENV})"
            ) from err
        if hashlib.sha256(data).hexdigest() != spec.sha256:
            raise ValueError(
                f"{url or spec.url} does not have the published sha256 {spec.sha256}; not cached"
            )
        atomic_write_bytes(fsspec.filesystem("file"), path, data)
    return _verified(path, spec)


def _verified(path: str, spec: PublishedHead) -> str:
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != spec.sha256:
        raise ValueError(
            f"{path}: sha256 {digest} is not the published {spec.sha256} of {spec.file}; delete it to download it again"
        )
    return path


def _load_state(path: str, module: nn.Module) -> nn.Module:
    try:
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # not plain weights, or weights of another shape
        raise ValueError(f"{path} is not a {type(module).__name__} head's weights: {err}") from err
    return module.eval()


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_head(head: str, clip_model: str, head_dir: str | None = None) -> AestheticHead:
    """A published head by name (laion-v1, laion-v2, or laion-v1:ViT-B-32 ...) or a fitted head's .pt path."""
    name = head_for(head, clip_model)
    if name in PUBLISHED:
        spec = PUBLISHED[name]
        module = _load_state(fetch_published(name, head_dir), make_head(spec.kind, spec.dim))
        return AestheticHead(name, spec.kind, spec.dim, spec.clip_model, module, spec.sha256)
    if not os.path.exists(name):
        raise FileNotFoundError(
            f"--head {name!r} is neither a published head ({', '.join(PUBLISHED)}, laion-v1, laion-v2) "
            "nor an existing file written by `knn-diffusion aesthetic fit`"
        )
    sidecar = os.path.splitext(name)[0] + ".json"
    if not os.path.exists(sidecar):
        raise FileNotFoundError(
            f"{sidecar} is missing: a fitted head needs the .json that `aesthetic fit` writes"
        )
    with open(sidecar) as f:
        try:
            meta = json.load(f)
            kind, dim, clip_model = meta["kind"], int(meta["dim"]), meta["clip_model"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{sidecar} is not the .json `aesthetic fit` writes (kind, dim, clip_model): {err}"
            ) from err
    module = _load_state(name, make_head(kind, dim))
    return AestheticHead(os.path.abspath(name), kind, dim, clip_model, module, _sha256(name))
