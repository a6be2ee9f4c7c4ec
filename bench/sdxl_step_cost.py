"""SDXL vs SD1.5: the per-step cost of a full-size UNet at each family's native size.

    .venv/bin/python bench/sdxl_step_cost.py                 # bf16 on this CPU, 2 timed steps
    .venv/bin/python bench/sdxl_step_cost.py --device cuda --dtype float16 --steps 10

Both UNets are built from the configs DAN ships (dan/engine/configs/sd15 and sdxl) with random
weights: nothing is downloaded. One step is one classifier-free-guidance UNet call (a batch of
two) on 77-token prompt embeddings: SD1.5 at 512x512 (64x64 latents, 768-wide context), SDXL at
1024x1024 (128x128 latents, 2048-wide context, pooled embedding and size conditioning). A warm-up
step runs first; the median of the timed steps is printed, with the ratio and the ratio per
pixel (the figure dan.tasks.needs uses to weigh an SDXL task in the queue).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from dan.engine.loading.architecture.sd15 import base_configs as sd15_configs
from dan.engine.loading.architecture.sdxl import base_configs as sdxl_configs


def step_seconds(
    unet: UNet2DConditionModel, side: int, extra: dict[str, object], steps: int
) -> float:
    config = unet.config
    dtype, device = unet.dtype, unet.device
    latents = torch.randn(2, 4, side // 8, side // 8, dtype=dtype, device=device)
    context = torch.randn(2, 77, config.cross_attention_dim, dtype=dtype, device=device)
    times = []
    with torch.inference_mode():
        for i in range(steps + 1):
            start = time.perf_counter()
            unet(latents, 500, encoder_hidden_states=context, added_cond_kwargs=extra)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def sdxl_conditioning(dtype: torch.dtype, device: str) -> dict[str, object]:
    pooled = torch.randn(2, 1280, dtype=dtype, device=device)
    sizes = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, dtype=dtype, device=device)
    return {"text_embeds": pooled, "time_ids": sizes}


def build(config: dict[str, object], dtype: torch.dtype, device: str) -> UNet2DConditionModel:
    unet: UNet2DConditionModel = UNet2DConditionModel.from_config(config)  # type: ignore[no-untyped-call]
    return unet.to(device=device, dtype=dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per UNet")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    sd15 = build(sd15_configs()["unet"], dtype, args.device)
    sd15_s = step_seconds(sd15, 512, {}, args.steps)
    del sd15
    sdxl = build(sdxl_configs()["unet"], dtype, args.device)
    sdxl_s = step_seconds(sdxl, 1024, sdxl_conditioning(dtype, args.device), args.steps)
    print(f"device {args.device}, {args.dtype}, median of {args.steps} steps (CFG batch of 2)")
    print(f"SD1.5 UNet at 512x512:   {sd15_s:8.2f} s/step")
    print(f"SDXL  UNet at 1024x1024: {sdxl_s:8.2f} s/step")
    print(f"SDXL / SD1.5 per step: {sdxl_s / sd15_s:.2f}x; per pixel: {sdxl_s / sd15_s / 4:.2f}x")


if __name__ == "__main__":
    main()
