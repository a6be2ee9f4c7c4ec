"""API overhead: the same txt2img request as a direct diffusers call and through `dan serve`.

    .venv/bin/python bench/overhead.py                       # tiny random-weight checkpoint
    .venv/bin/python bench/overhead.py --architecture sd15   # full-size SD1.5, random weights
    .venv/bin/python bench/overhead.py --checkpoint model.safetensors --device cuda

The direct run loads the checkpoint with DAN's loader and calls the diffusers pipeline with a
plain prompt; the API run sends the same request to a real server (uvicorn, queue, worker
process, PNG encoding, base64) on loopback. Both use the same device, dtype and thread count.
Printed: the median of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import EulerAncestralDiscreteScheduler

from dan.engine.loading.architecture.sd15 import base_configs
from dan.engine.loading.checkpoint import load_sd_pipeline
from dan.engine.loading.device import pick_device, pick_dtype
from tests.fixtures.server import start_server
from tests.fixtures.tiny_sd import a1111_state_dict, build_models, write_checkpoint

PROMPT = "a lighthouse on a cliff at dawn, dramatic sky"


def make_checkpoint(folder: Path, architecture: str) -> Path:
    from tests.fixtures.tiny_sd import write_tiny_checkpoint

    path = folder / f"bench-{architecture}.safetensors"
    if architecture == "tiny":
        return write_tiny_checkpoint(path)
    torch.manual_seed(0)
    unet, vae, text_encoder = build_models(base_configs())
    state = {k: v.half() for k, v in a1111_state_dict(unet, vae, text_encoder).items()}
    return write_checkpoint(state, path, fmt="safetensors")


def time_direct(checkpoint: Path, args: argparse.Namespace, cache: Path) -> list[float]:
    device, dtype = pick_device(args.device), pick_dtype(args.dtype, pick_device(args.device))
    pipeline, _ = load_sd_pipeline(
        checkpoint, cache_dir=cache, dtype=dtype, device=device, allow_ckpt=False
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = EulerAncestralDiscreteScheduler.from_config(
        pipeline.scheduler.config, timestep_spacing="linspace"
    )
    times = []
    for run in range(args.runs + 1):
        start = time.perf_counter()
        pipeline(
            PROMPT,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            generator=torch.Generator("cpu").manual_seed(run),
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        if run:  # the first run warms up
            times.append(time.perf_counter() - start)
    return times


def time_api(checkpoint: Path, args: argparse.Namespace, root: Path) -> list[float]:
    models = root / "models" / "checkpoints"
    models.mkdir(parents=True)
    (models / checkpoint.name).symlink_to(checkpoint)
    server = start_server(
        root,
        DAN_DEVICE=args.device,
        DAN_DTYPE=args.dtype,
        DAN_CPU_THREADS=str(torch.get_num_threads()),
        DAN_SYNC_TIMEOUT_S="3600",
    )
    body = {"prompt": PROMPT, "width": args.size, "height": args.size, "steps": args.steps}
    times = []
    try:
        for run in range(args.runs + 1):
            start = time.perf_counter()
            reply = server.post("/api/sd/txt2img", {**body, "seed": run})
            assert reply.json()["code"] == 200, reply.text
            if run:
                times.append(time.perf_counter() - start)
    finally:
        server.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="a real SD1.x .safetensors file")
    parser.add_argument("--architecture", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = args.checkpoint or make_checkpoint(root, args.architecture)
        direct = statistics.median(time_direct(checkpoint.resolve(), args, root / "cache"))
        api = statistics.median(time_api(checkpoint.resolve(), args, root / "server"))
    what = args.checkpoint.name if args.checkpoint else f"{args.architecture} (random weights)"
    print(
        f"checkpoint {what}, {args.size}x{args.size}, {args.steps} steps, Euler a, "
        f"device {args.device}, dtype {args.dtype}, {torch.get_num_threads()} threads"
    )
    print(f"direct diffusers call : {direct:8.3f} s (median of {args.runs})")
    print(f"through the HTTP API  : {api:8.3f} s (median of {args.runs})")
    print(
        f"ratio API / direct    : {api / direct:8.3f}  (overhead {100 * (api / direct - 1):+.1f} %)"
    )


if __name__ == "__main__":
    main()
