"""On a CUDA GPU: plain diffusers fp16 it/s vs DAN's engine it/s, and batching across requests
(batches of 1, 2, 4, 8 compatible requests) in images/s, with a full-size SD1.5 checkpoint of
random weights (bench/overhead.py's make_checkpoint). One prepared run for the device tool:

    .venv/bin/python bench/gpu_batching.py                 # 512x512, 20 steps, Euler a
    .venv/bin/python bench/gpu_batching.py --size 768 --steps 30 --batches 1 2 4

Each figure is the median of ``--runs`` runs after one warm-up. Without CUDA it says so and
exits with status 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHA = "b" * 64
PROMPT = "a lighthouse on a cliff at dawn, dramatic sky"


def timed(action: Callable[[], object], runs: int) -> float:
    """Median seconds of ``action`` over ``runs`` runs, after one warm-up."""
    times = []
    for run in range(runs + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        action()
        torch.cuda.synchronize()
        if run:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_batching.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    from diffusers import EulerAncestralDiscreteScheduler
    from overhead import make_checkpoint

    from dan.config import Settings
    from dan.domain import GenerationRequest, InstalledModel, ModelKind, ModelRef
    from dan.engine.diffusers_engine import DiffusersEngine

    root = Path(tempfile.mkdtemp())
    path = make_checkpoint(root, "sd15")
    files = {SHA: InstalledModel(ModelKind.CHECKPOINT, "bench", SHA, path, path.stat().st_size)}
    engine = DiffusersEngine(Settings(data_dir=root, device="cuda", dtype="float16"))  # type: ignore[call-arg]

    def request(i: int) -> GenerationRequest:
        ref = ModelRef(SHA, "bench")
        return GenerationRequest(
            f"{PROMPT} {i}", "blurry", i, "Euler a", args.steps, 5.0 + i, args.size, args.size, ref
        )

    def quiet(done: int, total: int) -> None:
        pass

    engine.txt2img(request(0), files, quiet)  # loads the checkpoint
    pipeline = engine.pipelines.get(files[SHA]).pipeline
    plain = EulerAncestralDiscreteScheduler.from_config(
        pipeline.scheduler.config, timestep_spacing="linspace"
    )

    def direct() -> object:
        pipeline.scheduler = plain
        return pipeline(PROMPT, width=args.size, height=args.size, num_inference_steps=args.steps)

    card = torch.cuda.get_device_name()
    print(f"{card}, SD1.5 random weights fp16, {args.size}x{args.size}, {args.steps} steps")
    diffusers_s = timed(direct, args.runs)
    dan_s = timed(lambda: engine.txt2img(request(0), files, quiet), args.runs)
    print(f"plain diffusers: {args.steps / diffusers_s:.2f} it/s")
    print(f"DAN engine:      {args.steps / dan_s:.2f} it/s  (x{diffusers_s / dan_s:.2f})")
    single = 1 / dan_s
    for batch in args.batches:
        todo = [request(i) for i in range(batch)]
        progress, previews = [quiet] * batch, [None] * batch
        seconds = timed(lambda: engine.txt2img_batch(todo, files, progress, previews), args.runs)  # noqa: B023
        rate = batch / seconds
        memory = torch.cuda.max_memory_allocated() / 1024**3
        print(
            f"batch of {batch}: {rate:.2f} images/s  x{rate / single:.2f}  (peak {memory:.1f} GiB)"
        )


if __name__ == "__main__":
    main()
