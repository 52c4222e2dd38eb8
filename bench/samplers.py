"""Sampler benchmark: one trained generator, the same held-out captions and seeds, sampled with DDPM over all
T = 1000 steps (the reference), DDIM at 50, DPM-Solver++(2M) (the ODE solver) and SDE-DPM-Solver++(2M) at 20
steps; Fréchet distance and KID against the held-out real images (diffusion.evaluate), seconds per image, and
each sampler's FD as a ratio of DDPM's. Target: DPM-Solver++ at 20 steps within 5% of DDPM at 1000 on the
Fréchet distance (at most 1.05x).

Runs on a finished demo output (knn-diffusion demo --output demo_out):

    .venv/bin/python bench/samplers.py --demo demo_out --num-prompts 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

SAMPLERS = (("ddpm", 1000), ("ddim", 50), ("dpmpp_2m", 20), ("dpmpp_2m_sde", 20))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="DDPM-1000 vs DDIM-50 vs DPM-Solver++(2M) ODE and SDE at 20 steps on FD."
    )
    p.add_argument("--demo", default="demo_out", help="a finished demo/run output folder (default: demo_out)")
    p.add_argument(
        "--run", default="run", help="the run folder inside it to sample (default: run, the kNN one)"
    )
    p.add_argument("--num-prompts", type=int, default=100, help="held-out captions, one sample each")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the run's evaluate stage's)",
    )
    p.add_argument("--output", default=None, help="where to write (default: <demo>/bench_samplers)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from diffusion.evaluate import EvaluateConfig, evaluate

    args = parse_args(argv)
    with open(os.path.join(args.demo, "manifests", "train.json")) as f:
        heldout = json.load(f)["settings"]["heldout"]
    out = args.output or os.path.join(args.demo, "bench_samplers")
    if args.guidance is None:
        with open(os.path.join(args.demo, "manifests", "evaluate.json")) as f:
            args.guidance = float(json.load(f)["settings"]["guidance"])
    rows = {}
    for sampler, steps in SAMPLERS:
        record = evaluate(
            EvaluateConfig(
                checkpoints={args.run: os.path.join(args.demo, args.run)},
                database=os.path.join(args.demo, "db", "main"),
                heldout_parts=heldout,
                output=os.path.join(out, f"{sampler}_{steps}"),
                num_prompts=args.num_prompts,
                sampler=sampler,
                steps=steps,
                guidance=args.guidance,
            )
        )
        rows[f"{sampler}-{steps}"] = record["models"][args.run]
    ref = rows["ddpm-1000"]["frechet_distance"]
    print(f"\n{args.num_prompts} held-out captions, guidance {args.guidance}, run {args.run}")
    print(f"{'sampler':14s} {'FD':>8s} {'FD / DDPM-1000':>15s} {'KID':>8s} {'s/image':>8s}")
    for name, row in rows.items():
        print(
            f"{name:14s} {row['frechet_distance']:8.4f} {row['frechet_distance'] / ref:15.3f} {row['kid']:8.4f} "
            f"{row['seconds_per_image']:8.3f}"
        )
    for name, label in (("dpmpp_2m-20", "DPM-Solver++(2M)"), ("dpmpp_2m_sde-20", "SDE-DPM-Solver++(2M)")):
        ratio = rows[name]["frechet_distance"] / ref
        print(f"{label} 20 steps: FD {ratio:.3f}x DDPM 1000 steps (target at most 1.05x: {ratio <= 1.05})")
    with open(os.path.join(out, "samplers.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
