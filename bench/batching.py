"""Batching across requests: throughput of compatible txt2img requests run one at a time vs
as one UNet batch (DiffusersEngine.txt2img vs txt2img_batch), on this machine.

    .venv/bin/python bench/batching.py                          # full-size SD1.5, random weights
    .venv/bin/python bench/batching.py --architecture tiny      # the test suite's tiny model
    .venv/bin/python bench/batching.py --batches 2 4 --rounds 3 --dtype float32

``--requests`` requests (different prompts, seeds and CFG scales, one batch key) run each
round in every mode: one at a time, and in batches of each size of ``--batches``; the modes
alternate within a round, so a machine shared with other work slows them alike. Printed:
images/s of each mode (median over rounds) and its ratio to one at a time. The first round
warms up and is not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import make_checkpoint

from dan.config import Settings
from dan.domain import GenerationRequest, InstalledModel, ModelKind, ModelRef
from dan.engine.diffusers_engine import DiffusersEngine

SHA = "b" * 64
PROMPTS = ["a lighthouse at dawn", "a red fox in snow", "a bowl of ramen", "a city at night"]


def requests(args: argparse.Namespace) -> list[GenerationRequest]:
    ref = ModelRef(SHA, "bench")
    return [
        GenerationRequest(
            PROMPTS[i % len(PROMPTS)],
            "blurry",
            100 + i,
            args.sampler,
            args.steps,
            5.0 + i,
            args.size,
            args.size,
            ref,
        )
        for i in range(args.requests)
    ]


def quiet(done: int, total: int) -> None:
    pass


def run(
    engine: DiffusersEngine, files: dict[str, InstalledModel], batch: int, args: argparse.Namespace
) -> float:
    """Seconds to make every request's image, ``batch`` requests per UNet batch."""
    todo = requests(args)
    start = time.perf_counter()
    for i in range(0, len(todo), batch):
        chunk = todo[i : i + batch]
        if batch == 1:
            engine.txt2img(chunk[0], files, quiet)
        else:
            engine.txt2img_batch(chunk, files, [quiet] * len(chunk), [None] * len(chunk))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--rounds", type=int, default=2, help="counted rounds (after 1 warm-up)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        path = make_checkpoint(Path(root), args.architecture)
        files = {SHA: InstalledModel(ModelKind.CHECKPOINT, "bench", SHA, path, path.stat().st_size)}
        settings = Settings(  # type: ignore[call-arg]
            data_dir=Path(root),
            device="cpu",
            dtype=args.dtype,
            fast_path="off",
            cpu_threads=args.threads,
        )
        engine = DiffusersEngine(settings)
        modes = [1, *args.batches]
        times: dict[int, list[float]] = {mode: [] for mode in modes}
        for round_ in range(args.rounds + 1):
            for mode in modes:
                seconds = run(engine, files, mode, args)
                if round_:
                    times[mode].append(seconds)
                print(f"round {round_} batch {mode}: {seconds:.1f} s", flush=True)
    shape = f"{args.size}x{args.size}, {args.steps} steps, {args.requests} requests"
    print(f"{args.architecture} {shape}, {engine.dtype}, {engine.describe()['device_name']}")
    single = args.requests / statistics.median(times[1])
    for mode in modes:
        rate = args.requests / statistics.median(times[mode])
        label = "one at a time" if mode == 1 else f"batches of {mode}"
        print(f"{label:>15}: {rate:.3f} images/s  x{rate / single:.2f}")


if __name__ == "__main__":
    main()
