"""CLIP models by clip-retrieval name -> L2-normalised image/text embeddings, on the best device and precision found.

Names follow clip-retrieval: ``open_clip:<config>/<pretrained>``, where <pretrained> is an open_clip tag
(``open_clip:ViT-B-32/openai``, downloaded by open_clip on first use) or a local checkpoint path
(``open_clip:ViT-S-32//abs/path/model.pt``; loaded with weights_only). <config> may also be the path of
an open_clip model-config JSON for architectures open_clip does not ship.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """A parsed model name: open_clip config (name or JSON path) and pretrained tag or checkpoint path."""

    config: str
    pretrained: str

    @classmethod
    def parse(cls, name: str) -> ClipSpec:
        if not name.startswith("open_clip:"):
            raise ValueError(
                f"--clip-model {name!r}: only open_clip models are supported; use "
                "'open_clip:<config>/<pretrained tag or checkpoint path>', e.g. open_clip:ViT-B-32/openai"
            )
        rest = name[len("open_clip:") :]
        if ".json/" in rest:  # a config JSON path, then the checkpoint
            config, pretrained = rest.split(".json/", 1)
            config += ".json"
        else:
            config, _, pretrained = rest.partition("/")
        if not pretrained:
            raise ValueError(
                f"--clip-model {name!r} names no weights; add a pretrained tag or checkpoint path after a '/', "
                "e.g. open_clip:ViT-B-32/openai"
            )
        return cls(config, pretrained)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pick_device_and_precision(
    device: str | None = None, precision: str = "auto"
) -> tuple[torch.device, torch.dtype]:
    """CUDA if present; bf16/fp16 where the hardware computes them faster than fp32, else fp32.

    On CPUs, bf16 only pays with AMX (amx_bf16): with AVX-512 alone it measured 0.6x fp32 here, while
    fp16 with avx512_fp16 measured 1.18x. Decided from CPU flags so a run is reproducible.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision != "auto":
        return dev, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return dev, torch.bfloat16
    if "avx512_fp16" in flags:
        return dev, torch.float16
    return dev, torch.float32


def _register_json_config(path: str) -> str:
    import open_clip

    if not os.path.exists(path):
        raise FileNotFoundError(f"open_clip model config {path} does not exist")
    open_clip.add_model_config(path)
    return os.path.splitext(os.path.basename(path))[0]


def _config_name(spec: ClipSpec) -> str:
    return _register_json_config(spec.config) if spec.config.endswith(".json") else spec.config


def load_transforms(name: str) -> tuple[Any, Any]:
    """(image transform, tokenizer) of a model without loading its weights, as open_clip's factory derives them:
    PreprocessCfg defaults <- model config's preprocess_cfg <- pretrained tag's cfg <- vision image_size."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    spec = ClipSpec.parse(name)
    config = _config_name(spec)
    model_cfg = open_clip.get_model_config(config)
    if model_cfg is None:
        raise ValueError(f"--clip-model {name!r}: open_clip knows no model config {config!r}")
    cfg = dataclasses.asdict(PreprocessCfg())
    if "preprocess_cfg" in model_cfg:
        cfg = merge_preprocess_dict(cfg, model_cfg["preprocess_cfg"])
    pretrained_cfg = open_clip.get_pretrained_cfg(config, spec.pretrained)
    if pretrained_cfg:
        cfg = merge_preprocess_dict(cfg, pretrained_cfg)
    cfg = merge_preprocess_dict(cfg, {"size": model_cfg["vision_cfg"]["image_size"]})
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False), open_clip.get_tokenizer(config)


class ClipEncoder:
    """An open_clip model in eval mode with its preprocessing and tokenizer.

    encode_images(pixels [B,3,H,W] float, normalised) -> [B, D] float32, L2-normalised
    encode_texts(list of B strings) -> [B, D] float32, L2-normalised
    """

    def __init__(self, name: str, device: str | None = None, precision: str = "auto") -> None:
        import open_clip

        spec = ClipSpec.parse(name)
        config = _config_name(spec)
        if os.sep in spec.pretrained and not os.path.exists(spec.pretrained):
            raise FileNotFoundError(f"--clip-model {name!r}: checkpoint {spec.pretrained} does not exist")
        self.name = name
        self.device, self.dtype = pick_device_and_precision(device, precision)
        model, _, preprocess = open_clip.create_model_and_transforms(
            config, pretrained=spec.pretrained, device=self.device, load_weights_only=True
        )
        self.model = model.eval()
        if self.device.type == "cpu" and self.dtype != torch.float32:
            # On CPU, casting the weights once beats autocast, which re-casts them every call.
            self.model = self.model.to(self.dtype)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(config)
        self.dim = int(self.model.visual.output_dim)
        log.info("CLIP %s on %s in %s", name, self.device, self.dtype)

    def _autocast(self) -> Any:
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            pixels = pixels.to(self.dtype)
        with self._autocast():
            emb = self.model.encode_image(pixels)
        return F.normalize(emb.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        with self._autocast():
            emb = encode_text_trimmed(self.model, tokens)
        return F.normalize(emb.float(), dim=-1).cpu()

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenizer(list(texts)))


def encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text, run only up to the last end-of-text token of the batch.

    The text transformer is causal and pools at the end-of-text token (argmax of the token ids), so the
    padding after it cannot change the result: dropping it is exact and saves most of the compute for
    short captions (77 positions -> ~15 for typical alt-texts). Other text towers run unchanged.
    """
    import open_clip

    if not (
        type(model) is open_clip.CLIP
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
    ):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


@functools.lru_cache(maxsize=2)
def cached_encoder(name: str, device: str | None = None, precision: str = "auto") -> ClipEncoder:
    """One encoder per process and name (for query-time text embedding)."""
    return ClipEncoder(name, device=device, precision=precision)
