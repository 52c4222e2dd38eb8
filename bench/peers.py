"""Run reference tools (clip-retrieval) the way their users do, in a subprocess with a time limit.

clip-retrieval inference never exits after an error (its logger process is not stopped), hence the timeout.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd


def tar_pattern(shards: str) -> str:
    """clip-retrieval wants one brace pattern string, e.g. /x/{00000,00001}.tar."""
    names = sorted(os.path.basename(p)[:-4] for p in glob.glob(f"{shards}/*.tar"))
    return f"{shards}/{{{','.join(names)}}}.tar" if len(names) > 1 else f"{shards}/{names[0]}.tar"


def run_clip_retrieval_inference(
    shards: str, output: str, clip_model: str, batch_size: int = 64, timeout: float = 1800
) -> float:
    """`clip-retrieval inference` on webdataset shards (CPU, sequential, text + metadata); returns wall seconds
    measured inside the child, excluding interpreter start-up and imports."""
    code = textwrap.dedent(
        f"""
        import time
        from clip_retrieval.clip_inference.main import main
        if __name__ == "__main__":
            start = time.time()
            main(input_dataset={tar_pattern(shards)!r}, output_folder={output!r}, input_format="webdataset",
                 clip_model={clip_model!r}, enable_text=True, enable_image=True, enable_metadata=True,
                 batch_size={batch_size}, num_prepro_workers=0, use_jit=False, use_mclip=False,
                 distribution_strategy="sequential", output_partition_count=1, enable_wandb=False)
            print("SECONDS", time.time() - start)
        """
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0 or "SECONDS" not in proc.stdout:
        raise RuntimeError(f"clip-retrieval inference failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return float(proc.stdout.rsplit("SECONDS", 1)[1].split()[0])


def load_embedding_folder(output: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(image embeddings, text embeddings, metadata) of a folder in clip-retrieval's layout (theirs or our
    database), concatenated in file order, as float32."""

    def cat(kind: str) -> np.ndarray:
        return np.concatenate([np.load(p) for p in sorted(glob.glob(f"{output}/{kind}/*.npy"))]).astype(
            np.float32
        )

    meta = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(f"{output}/metadata/*.parquet"))])
    return cat("img_emb"), cat("text_emb"), meta
