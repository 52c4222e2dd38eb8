"""The continuous and the discrete backbone side by side on a finished demo: train the quantising tokenizer
(tokenizer-fsq) and the discrete kNN generator with the demo generator's budget (steps x batch), then score
both with the evaluate stage (attribute accuracy, Fréchet distance, CLIP score, seconds per image).

    .venv/bin/python bench/backbones.py --demo demo_out      # writes demo_out/bench_backbones/

Prints the evaluate table and the difference on "all attributes" (the issue's target: the discrete backbone
within 10 points of the continuous one).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # bench/ holds modules named like the toolkit's (train.py, samplers.py)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", required=True, help="a finished `knn-diffusion demo` output folder")
    p.add_argument("--output", default=None, help="default: <demo>/bench_backbones")
    p.add_argument("--steps", type=int, default=None, help="generator steps (default: the demo's)")
    p.add_argument("--tokenizer-steps", type=int, default=None, help="default: the demo tokenizer's")
    p.add_argument("--num-prompts", type=int, default=None, help="default: the demo's evaluate.num_prompts")
    p.add_argument(
        "--truncation", type=float, default=None, help="the discrete sampler's truncation r (default: 0.9)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:

    from diffusion.config import TrainConfig, model_config
    from diffusion.evaluate import EvaluateConfig, evaluate
    from diffusion.tokenizer import tokenizer_config, train_tokenizer
    from diffusion.train import train
    from pipelines.run import procedural_attributes, read_finished
    from retrieval.database import DatabaseInfo

    args = parse_args(argv)
    config, heldout = read_finished(args.demo)
    out = os.path.abspath(args.output or os.path.join(args.demo, "bench_backbones"))
    db = os.path.abspath(os.path.join(args.demo, "db", "main"))
    t = config.tokenizer.train_fields()
    if args.tokenizer_steps:
        t["steps"] = args.tokenizer_steps
    tokenizer = train_tokenizer(
        tokenizer_config(
            "tokenizer-fsq",
            db=db,
            neighbours=os.path.join(db, "neighbours"),
            output=os.path.join(out, "tokenizer-fsq"),
            exclude_parts=heldout,
            **t,
        ),
        ray_address=config.ray_address,
    )
    g = dataclasses.replace(config.generator, backbone="discrete")
    training = g.train_fields()  # num_timesteps: VQ-Diffusion's T
    if args.steps:
        training["steps"] = args.steps
    model = model_config(
        g.preset, **{**g.model, "cond_dim": DatabaseInfo.read(db).dim, "backbone": "discrete"}
    )
    run = os.path.join(out, "discrete")
    train(
        TrainConfig(
            db=db,
            neighbours=os.path.join(db, "neighbours"),
            output=run,
            model=model,
            exclude_parts=heldout,
            tokenizer=tokenizer["tokenizer"],
            **training,
        ),
        ray_address=config.ray_address,
    )
    e = config.evaluate
    record = evaluate(
        EvaluateConfig(
            checkpoints={"continuous": os.path.join(args.demo, "run"), "discrete": run},
            database=db,
            heldout_parts=heldout,
            output=os.path.join(out, "evaluation"),
            classifier=os.path.join(args.demo, "evaluation", "classifier.pt"),
            num_prompts=args.num_prompts or e.num_prompts,
            sampler=e.sampler,
            steps=e.steps,
            guidance=e.guidance,
            truncation=args.truncation,
        ),
        attributes=procedural_attributes() if config.data.source == "procedural" else None,
    )
    models = record["models"]
    if all("attribute_accuracy" in m for m in models.values()):
        gap = (
            models["continuous"]["attribute_accuracy"]["all"]
            - models["discrete"]["attribute_accuracy"]["all"]
        )
        print(
            f"backbones: discrete {models['discrete']['attribute_accuracy']['all']:.2f} vs continuous "
            f"{models['continuous']['attribute_accuracy']['all']:.2f} on all attributes ({gap * 100:+.0f} points "
            f"behind; target <= 10), {models['discrete']['seconds_per_image'] * 1000:.0f} vs "
            f"{models['continuous']['seconds_per_image'] * 1000:.0f} ms per image; tokenizer codebook "
            f"{tokenizer['figures'].get('codebook_usage', float('nan')):.0%} used, perplexity "
            f"{tokenizer['figures'].get('perplexity', float('nan')):.0f} -> {out}",
            flush=True,
        )
    return record


if __name__ == "__main__":
    main()
