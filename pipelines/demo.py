"""The embedded default: generated captioned images, served on 127.0.0.1 -> download -> embed -> index -> a query.

Runs offline on a fresh machine. Until a CLIP is trained on the data (the full demo), the default encoder
is a random-init ViT-S-32 checkpoint made locally: the pipeline is real, the embeddings carry no meaning.
"""

from __future__ import annotations

import os
import time

import pandas as pd

from pipelines.demo_data import FolderServer, caption_for, write_images
from pipelines.download import DownloadConfig, download
from pipelines.embed import EmbedConfig, embed
from pipelines.index import IndexConfig, build


def random_init_checkpoint(path: str, config: str = "ViT-S-32") -> str:
    """Save a seeded random-init open_clip model (once) and return its clip-retrieval name."""
    import open_clip
    import torch

    if not os.path.exists(path):
        torch.manual_seed(0)
        torch.save(open_clip.create_model(config).state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
    return f"open_clip:{config}/{os.path.abspath(path)}"


def run_demo(
    output: str, num_images: int = 512, clip_model: str | None = None, ray_address: str | None = None
) -> None:
    start = time.time()
    os.makedirs(output, exist_ok=True)
    names = write_images(os.path.join(output, "images"), num_images)
    clip_model = clip_model or random_init_checkpoint(os.path.join(output, "clip_random_vit_s_32.pt"))
    with FolderServer(os.path.join(output, "images")) as server:
        urls = pd.DataFrame(
            {
                "url": [f"{server.base}/{n}" for n in names],
                "caption": [caption_for(i) for i in range(num_images)],
            }
        )
        urls.to_parquet(os.path.join(output, "urls.parquet"))
        # The port changes every run; a rerun still skips finished shards (they are keyed by shard id).
        download(
            DownloadConfig(
                url_list=os.path.join(output, "urls.parquet"),
                output_folder=os.path.join(output, "shards"),
                image_size=64,
                number_sample_per_shard=128,
                thread_count=16,
                allow_network=["127.0.0.1/32"],
            ),
            ray_address=ray_address,
        )
    db = os.path.join(output, "db")
    embed(
        EmbedConfig(shards=os.path.join(output, "shards"), output=db, clip_model=clip_model),
        ray_address=ray_address,
    )
    build(IndexConfig(db=db, max_index_memory="1G", current_memory_available="4G"), ray_address=ray_address)

    from retrieval.database import Database

    database = Database.open(db)
    result = database.search_text([caption_for(0)], k=5)
    meta = database.metadata(result.ids[0])
    print(f"query {caption_for(0)!r} -> top 5: {list(meta.caption)}")
    print(
        f"demo: {len(database)} images downloaded, embedded and indexed in {time.time() - start:.1f}s -> {output}"
    )
