"""LoRA switching: a txt2img request alternating between two cached LoRAs vs the same request
without LoRA.

    .venv/bin/python bench/lora_switch.py                       # tiny random-weight checkpoint
    .venv/bin/python bench/lora_switch.py --architecture sd15   # full-size SD1.5, rank-32 LoRAs
    .venv/bin/python bench/lora_switch.py --checkpoint model.safetensors --device cuda

Two random kohya LoRAs (fp16, every attention layer of the UNet and the text encoder) are read
and applied once to warm up; then requests with LoRA A, LoRA B, A, B... (each through
``LoraStack.applied``) are interleaved with plain requests. Printed: the median of each, their
ratio, the cost of one switch alone (entering and leaving ``applied``) and of a LoRA's first use
(read from disk and loaded into the modules).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import EulerAncestralDiscreteScheduler

from bench.overhead import PROMPT, make_checkpoint
from dan.domain import InstalledModel, ModelKind
from dan.engine.loading.checkpoint import load_sd_pipeline
from dan.engine.loading.device import pick_device, pick_dtype
from dan.engine.loading.lora.files import LoraCache
from dan.engine.loading.lora.stack import LoraStack
from tests.fixtures.tiny_lora import LoraLayer, random_lora, write_lora

GiB = 2**30


def make_loras(folder: Path, pipeline: Any, rank: int) -> list[InstalledModel]:
    """Two random fp16 kohya LoRAs for the pipeline's UNet and text encoder."""
    loras = []
    for seed in (1, 2):
        layers = random_lora(pipeline.unet, pipeline.text_encoder, rank=rank, seed=seed)
        layers = {k: LoraLayer(down=v.down.half(), up=v.up.half()) for k, v in layers.items()}
        path = write_lora(
            folder / f"lora-{seed}.safetensors",
            layers,
            alpha=rank / 2,
            unet_config=pipeline.unet.config,
        )
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        loras.append(InstalledModel(ModelKind.LORA, path.stem, sha, path, path.stat().st_size))
    return loras


def timed(action: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    action()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_bench(checkpoint: Path, args: argparse.Namespace, root: Path) -> dict[str, float]:
    device = pick_device(args.device)
    pipeline, _ = load_sd_pipeline(
        checkpoint,
        cache_dir=root / "cache",
        dtype=pick_dtype(args.dtype, device),
        device=device,
        allow_ckpt=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = EulerAncestralDiscreteScheduler.from_config(
        pipeline.scheduler.config, timestep_spacing="linspace"
    )
    loras = make_loras(root, pipeline, args.rank)
    stack = LoraStack(LoraCache(GiB))

    def request(seed: int) -> None:
        pipeline(
            PROMPT,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            generator=torch.Generator("cpu").manual_seed(seed),
        )

    def with_lora(lora: InstalledModel, seed: int) -> None:
        with stack.applied(pipeline, [(lora, 0.8)]):
            request(seed)

    def switch(lora: InstalledModel) -> None:
        with stack.applied(pipeline, [(lora, 0.8)]):
            pass

    first_use = timed(partial(switch, loras[0]), device)
    switch(loras[1])
    request(0)  # warm-up
    plain, lora = [], []
    for run in range(args.runs):
        # Alternate which of the pair goes first, so that drifts in machine load cancel out.
        pair = [(plain, partial(request, run)), (lora, partial(with_lora, loras[run % 2], run))]
        for times, action in pair[:: 1 if run % 2 else -1]:
            times.append(timed(action, device))
    switches = [timed(partial(switch, loras[i % 2]), device) for i in range(20)]
    return {
        "plain": statistics.median(plain),
        "lora": statistics.median(lora),
        "switch": statistics.median(switches),
        "first_use": first_use,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="a real SD1.x .safetensors file")
    parser.add_argument("--architecture", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--rank", type=int, help="LoRA rank (default: 4 tiny, 32 otherwise)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    if args.rank is None:
        args.rank = 4 if args.architecture == "tiny" and not args.checkpoint else 32
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = args.checkpoint or make_checkpoint(root, args.architecture)
        result = run_bench(checkpoint.resolve(), args, root)
    what = args.checkpoint.name if args.checkpoint else f"{args.architecture} (random weights)"
    print(
        f"checkpoint {what}, {args.size}x{args.size}, {args.steps} steps, Euler a, "
        f"rank-{args.rank} LoRAs, device {args.device}, dtype {args.dtype}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"without LoRA                 : {result['plain']:8.3f} s (median of {args.runs})")
    print(f"switching LoRA A <-> B       : {result['lora']:8.3f} s (median of {args.runs})")
    print(f"ratio switching / without    : {result['lora'] / result['plain']:8.3f}")
    print(f"one switch alone (enter+exit): {1000 * result['switch']:8.1f} ms (median of 20)")
    print(f"first use of a LoRA          : {1000 * result['first_use']:8.1f} ms (read + load)")


if __name__ == "__main__":
    main()
