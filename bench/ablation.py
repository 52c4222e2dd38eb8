"""kNN ablation: generators trained with equal budgets on a finished demo's data, with no kNN (the query alone)
and with k = 1, 5, 10, 20 neighbours, all judged by the evaluate stage on the same held-out captions: attribute
accuracy, Fréchet distance, KID and CLIP score. The paper (Sheynin et al. 2023) finds k = 10 best.

    .venv/bin/python bench/ablation.py --demo demo_out --steps 250
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="no-kNN vs k = 1, 5, 10, 20 with equal training budgets.")
    p.add_argument("--demo", default="demo_out", help="a finished demo/run output folder (default: demo_out)")
    p.add_argument("--ks", default="0,1,5,10,20", help="neighbour counts; 0 is the no-kNN model")
    p.add_argument("--steps", type=int, default=None, help="training steps each (default: the demo's)")
    p.add_argument("--num-prompts", type=int, default=250, help="held-out captions, one sample each")
    p.add_argument("--output", default=None, help="where to write (default: <demo>/bench_ablation)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:

    from diffusion.config import TrainConfig, model_config
    from diffusion.evaluate import EvaluateConfig, evaluate
    from diffusion.train import train
    from pipelines.neighbours import NeighboursConfig, compute
    from pipelines.run import procedural_attributes, read_finished
    from retrieval.database import DatabaseInfo

    args = parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    config, heldout = read_finished(args.demo)
    out = os.path.abspath(args.output or os.path.join(args.demo, "bench_ablation"))
    db = os.path.abspath(os.path.join(args.demo, "db", "main"))
    neighbours = os.path.join(out, "neighbours")
    compute(NeighboursConfig(db=db, output=neighbours, k=max(max(ks), 1)), ray_address=config.ray_address)
    dim = DatabaseInfo.read(db).dim
    g = config.generator
    training = g.train_fields()
    if args.steps:
        training["steps"] = args.steps
    tokenizer = os.path.join(args.demo, "tokenizer", "tokenizer.pt")  # the demo's, for a latent preset
    tokenizer = tokenizer if model_config(g.preset, **g.model).latent_channels else None
    runs = {}
    for k in ks:
        name = "no-knn" if k == 0 else f"k={k}"
        overrides = (
            {**g.model, "cond_dim": dim, "k": k} if k else {**g.model, "cond_dim": dim, "use_knn": False}
        )
        if not k:
            overrides["query_drop_prob"] = 0.0
        folder = os.path.join(out, name.replace("=", ""))
        train(
            TrainConfig(
                db=db,
                neighbours=neighbours,
                output=folder,
                model=model_config(g.preset, **overrides),
                exclude_parts=heldout,
                tokenizer=tokenizer,
                **training,
            ),
            ray_address=config.ray_address,
        )
        runs[name] = folder
    record = evaluate(
        EvaluateConfig(
            checkpoints=runs,
            database=db,
            heldout_parts=heldout,
            output=os.path.join(out, "evaluation"),
            classifier=os.path.join(args.demo, "evaluation", "classifier.pt"),
            num_prompts=args.num_prompts,
            sampler=config.evaluate.sampler,
            steps=config.evaluate.steps,
            guidance=config.evaluate.guidance,
        ),
        attributes=procedural_attributes() if config.data.source == "procedural" else None,
    )
    return record


if __name__ == "__main__":
    main()
