"""ControlNet cost: the per-step time of a txt2img request with one ControlNet vs the same
request without it.

    .venv/bin/python bench/controlnet_cost.py                       # tiny random-weight models
    .venv/bin/python bench/controlnet_cost.py --architecture sd15   # full-size SD1.5 + ControlNet
    .venv/bin/python bench/controlnet_cost.py --checkpoint model.safetensors \\
        --controlnet control_sd15_canny.pth --device cuda

The ControlNet has random weights (the tiny test one, or the shipped SD1.5 config) unless
``--controlnet`` names a file. Each request's step times come from ``callback_on_step_end``
timestamps, so prompt encoding and the VAE decode are left out; the median step interval of each
request is taken, then the median over runs. Plain and ControlNet requests alternate, so that
drifts in machine load cancel out. Printed: both per-step medians and their ratio (the published
figure for SD1.5 is about 1.3-1.4x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers
from diffusers import ControlNetModel, StableDiffusionPipeline

from bench.overhead import PROMPT, make_checkpoint
from dan.domain import GenerationRequest, ModelRef
from dan.engine.control.controlnet import load_controlnet
from dan.engine.control.layout import base_controlnet_config
from dan.engine.control.runs import ControlUnit, controlled_txt2img
from dan.engine.generation.prompts import encode_prompts
from dan.engine.generation.samplers import make_scheduler
from dan.engine.loading.checkpoint import load_sd_pipeline
from dan.engine.loading.device import pick_device, pick_dtype
from tests.fixtures.tiny_controlnet import build_tiny_controlnet


def make_controlnet(args: argparse.Namespace, pipeline: Any, device: torch.device) -> Any:
    if args.controlnet:
        return load_controlnet(args.controlnet, dtype=pipeline.unet.dtype, device=device)
    torch.manual_seed(0)
    if args.architecture == "tiny" and not args.checkpoint:
        model = build_tiny_controlnet(pipeline.unet)
    else:
        model = ControlNetModel.from_config(base_controlnet_config())
    if pipeline.unet.dtype != torch.float32:  # diffusers warns on every dtype cast
        model = model.to(dtype=pipeline.unet.dtype)
    return model.to(device).eval().requires_grad_(False)


def canny_like(size: int) -> Image.Image:
    """White rings on black: what an edge map looks like."""
    y, x = np.ogrid[:size, :size]
    radius = np.hypot(x - size / 2, y - size / 2).astype(int)
    return Image.fromarray(np.where(radius % 24 < 2, 255, 0).astype(np.uint8)).convert("RGB")


class StepClock:
    """A callback_on_step_end that records when each step ended."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return kwargs

    def per_step(self) -> float:
        return statistics.median(b - a for a, b in zip(self.times, self.times[1:], strict=False))


def run_bench(checkpoint: Path, args: argparse.Namespace, root: Path) -> dict[str, float]:
    device = pick_device(args.device)
    base, _ = load_sd_pipeline(
        checkpoint,
        cache_dir=root / "cache",
        dtype=pick_dtype(args.dtype, device),
        device=device,
        allow_ckpt=False,
    )
    unit = ControlUnit(make_controlnet(args, base, device), canny_like(args.size), weight=1.0)
    request = GenerationRequest(
        PROMPT, "", 0, "Euler a", args.steps, 7.0, args.size, args.size, ModelRef("0" * 64, "b")
    )
    with torch.inference_mode():
        embeds, negative = encode_prompts(
            base.tokenizer, base.text_encoder, PROMPT, "", device=device, dtype=base.unet.dtype
        )

    def common(clock: StepClock) -> dict[str, Any]:
        return {
            "scheduler": make_scheduler("Euler a", base.scheduler.config, seed=0),
            "prompt_embeds": embeds,
            "negative_prompt_embeds": negative,
            "generator": [torch.Generator("cpu").manual_seed(0)],
            "callback_on_step_end": clock,
        }

    def plain() -> float:
        clock = StepClock()
        kwargs = common(clock)
        components = {**base.components, "scheduler": kwargs.pop("scheduler")}
        pipeline = StableDiffusionPipeline(**components, requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            pipeline(width=args.size, height=args.size, num_inference_steps=args.steps, **kwargs)
        return clock.per_step()

    def controlled() -> float:
        clock = StepClock()
        controlled_txt2img(base, request, unit, **common(clock))
        return clock.per_step()

    plain(), controlled()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "controlnet": []}
    for run in range(args.runs):
        order = [("plain", plain), ("controlnet", controlled)][:: 1 if run % 2 else -1]
        for name, action in order:
            times[name].append(action())
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="a real SD1.x .safetensors file")
    parser.add_argument("--controlnet", type=Path, help="a real ControlNet file")
    parser.add_argument("--architecture", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    diffusers.utils.logging.set_verbosity_error()  # the safety-checker notice on every pipeline
    warnings.filterwarnings("ignore", category=FutureWarning)  # steps_offset of random configs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = args.checkpoint or make_checkpoint(root, args.architecture)
        result = run_bench(checkpoint.resolve(), args, root)
    what = args.checkpoint.name if args.checkpoint else f"{args.architecture} (random weights)"
    print(
        f"checkpoint {what}, {args.size}x{args.size}, {args.steps} steps, Euler a, "
        f"device {args.device}, dtype {args.dtype}, {torch.get_num_threads()} threads"
    )
    print(f"per step without ControlNet : {1000 * result['plain']:8.1f} ms (median of {args.runs})")
    print(f"per step with ControlNet    : {1000 * result['controlnet']:8.1f} ms")
    print(f"ratio with / without        : {result['controlnet'] / result['plain']:8.3f}")


if __name__ == "__main__":
    main()
