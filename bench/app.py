"""App load benchmark: the same generate requests sent one at a time, then all at once (serve.batch batches them).

Starts ``knn-diffusion app`` in-process (Ray Serve on 127.0.0.1) on a demo's output (its run/ and db/main),
sends --requests requests sequentially and then concurrently, and prints requests/s of both and their ratio.

Run from the repository root, after a demo::

    .venv/bin/python bench/app.py --demo demo_out --requests 32
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="demo_out", help="a demo's output folder (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=32, help="requests per arm (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=20, help="sampling steps per request (default: %(default)s)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=32, help="serve.batch size (default: %(default)s)"
    )
    parser.add_argument("--json-out", default=None, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.steps < 1:
        parser.error("--requests and --steps must be >= 1")
    return args


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from ray import serve

    from diffusion.app import AppConfig, run_app

    run, db = os.path.join(args.demo, "run"), os.path.join(args.demo, "db", "main")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = run_app(
        AppConfig(checkpoint=run, databases=[db], port=port, max_batch_size=args.max_batch_size),
        blocking=False,
    )
    prompts = [
        "a large red circle in the centre on a plain blue background",
        "a small green star at the top left on a striped yellow background",
        "a medium purple square at the bottom right on a dotted orange background",
        "a large yellow triangle in the centre on a checkered green background",
    ]
    bodies = [
        {"prompt": prompts[i % len(prompts)], "steps": args.steps, "seed": i} for i in range(args.requests)
    ]
    post(url + "generate", bodies[0])  # warm-up: first-call costs are no part of either arm
    start = time.perf_counter()
    sequential = [post(url + "generate", b) for b in bodies]
    seq_s = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        concurrent = list(pool.map(lambda b: post(url + "generate", b), bodies))
    conc_s = time.perf_counter() - start
    serve.shutdown()
    ok = sum(len(r["images"]) == 1 for r in concurrent)
    batches = sorted({r["batch_requests"] for r in concurrent})
    result = {
        "requests": args.requests,
        "steps": args.steps,
        "sequential_seconds": seq_s,
        "concurrent_seconds": conc_s,
        "sequential_rps": args.requests / seq_s,
        "concurrent_rps": args.requests / conc_s,
        "ratio": seq_s / conc_s,
        "concurrent_ok": ok,
        "batch_sizes_seen": batches,
        "sequential_batch_sizes_seen": sorted({r["batch_requests"] for r in sequential}),
    }
    print(
        f"app bench: {args.requests} requests x {args.steps} steps; one at a time {result['sequential_rps']:.2f} "
        f"req/s ({seq_s:.1f}s), all at once {result['concurrent_rps']:.2f} req/s ({conc_s:.1f}s, batches of "
        f"{batches}), {ok}/{args.requests} succeeded; batching gives {result['ratio']:.2f}x",
        flush=True,
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
