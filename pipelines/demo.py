"""The embedded default: the pipeline of pipelines.run with its default config (procedural images served on
127.0.0.1 -> download -> fitted CLIP -> embed -> index -> aesthetic bands -> neighbours -> generator ->
samples -> report.html). Runs offline on a fresh machine; --quick is the 2-3 minute smoke version.
"""

from __future__ import annotations

import os
from typing import Any

from pipelines.run import QUICK, PipelineConfig, run_pipeline, with_overrides
from retrieval.storage import torch_bytes, write_atomic


def demo_config(
    output: str = "demo_out", quick: bool = False, ray_address: str | None = None
) -> PipelineConfig:
    config = PipelineConfig(output=output, ray_address=ray_address)
    return with_overrides(config, QUICK) if quick else config


def run_demo(output: str = "demo_out", quick: bool = False, ray_address: str | None = None) -> dict[str, Any]:
    return run_pipeline(demo_config(output, quick, ray_address))


def random_init_checkpoint(path: str, config: str = "ViT-S-32") -> str:
    """Save a seeded random-init open_clip model (once) and return its clip-retrieval name (benchmarks use
    it where only the shapes and speed of a real architecture matter, not what the embeddings mean)."""
    import open_clip
    import torch

    if not os.path.exists(path):
        torch.manual_seed(0)
        write_atomic(path, torch_bytes(open_clip.create_model(config).state_dict()))
    return f"open_clip:{config}/{os.path.abspath(path)}"
