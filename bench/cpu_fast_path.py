"""DAN's CPU fast path against plain diffusers bf16, side by side in one process.

    .venv/bin/python bench/cpu_fast_path.py                      # full-size SD1.5, random weights
    .venv/bin/python bench/cpu_fast_path.py --checkpoint model.safetensors --size 512

Both run the same checkpoint, prompt, seed, sampler (Euler a), steps and CFG, in bf16 on the
CPU, alternated round by round (the order reversed every other round) so that a machine whose
speed drifts treats both alike:

- plain: the diffusers ``StableDiffusionPipeline`` called directly (DAN's loader builds it);
- DAN: ``DiffusersEngine.txt2img`` with the fast path on (``fast_path=compile``), after its
  background compile of this shape has finished (its time and the memory it took are printed:
  that is the warm-up the README reports).

Also printed: the machine's own bf16 matrix-multiply rate (4096x4096, the better of a reading
before and after), the job's FLOPs counted
by torch's FlopCounterMode (UNet passes and VAE decode), the share of the matmul rate each
side reaches, and how far DAN's fast image is from its plain-path image (the first request,
before the compiled form was ready: the README's tolerance).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dan.config import Settings
from dan.domain import GenerationRequest, InstalledModel, ModelKind
from dan.engine.diffusers_engine import DiffusersEngine
from dan.engine.generation.compiled import FastUNet
from dan.engine.generation.samplers import make_scheduler
from dan.engine.loading.checkpoint import load_sd_pipeline

PROMPT = "a lighthouse on a cliff at dawn, dramatic sky"
SEED = 1234
SHA = "b" * 64


def matmul_tflops(size: int = 4096, repeats: int = 8) -> float:
    """The median bf16 matrix-multiply rate of this machine, in TFLOP/s."""
    a, b = (torch.randn(size, size, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


def job_tflop(pipeline: Any, args: argparse.Namespace) -> float:
    """TFLOP of one image: ``steps`` CFG UNet passes (batch 2) and one VAE decode."""
    latent = args.size // 8
    sample = torch.randn(2, 4, latent, latent, dtype=torch.bfloat16)
    hidden = torch.randn(2, 77, pipeline.unet.config.cross_attention_dim, dtype=torch.bfloat16)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        pipeline.unet(sample, torch.tensor(500.0), encoder_hidden_states=hidden)
    unet = counter.get_total_flops()
    with torch.inference_mode(), counter:
        pipeline.vae.decode(sample[:1])
    return float(unet * args.steps + counter.get_total_flops()) / 1e12


def plain_runner(checkpoint: Path, cache: Path, args: argparse.Namespace) -> Any:
    pipeline, _ = load_sd_pipeline(
        checkpoint, cache_dir=cache, dtype=torch.bfloat16, device="cpu", allow_ckpt=False
    )
    pipeline.set_progress_bar_config(disable=True)
    scheduler = make_scheduler("Euler a", pipeline.scheduler.config, seed=(SEED,))

    def run() -> np.ndarray[Any, Any]:
        pipeline.scheduler = scheduler
        image = pipeline(
            PROMPT,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.cfg,
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images[0]
        return np.asarray(image, dtype=int)

    return pipeline, run


def dan_runner(
    checkpoint: Path, data: Path, args: argparse.Namespace
) -> tuple[FastUNet, Any, np.ndarray[Any, Any]]:
    """DAN's engine on ``checkpoint`` with the fast path on: its FastUNet, a run, and the
    image of its first run (the plain path, unless a compiled package of its shape is kept
    in ``data`` already: its shape then starts compiling)."""
    engine = DiffusersEngine(dan_settings(data))
    model = installed(checkpoint)
    request = GenerationRequest(
        prompt=PROMPT,
        negative_prompt="",
        seed=SEED,
        sampler_name="Euler a",
        steps=args.steps,
        cfg_scale=args.cfg,
        width=args.size,
        height=args.size,
        model=model.ref,
    )

    def run() -> np.ndarray[Any, Any]:
        images = engine.txt2img(request, {SHA: model}, lambda done, total: None)
        return np.asarray(images[0], dtype=int)

    first = run()
    fast = engine.pipelines.get(model).fast_unet
    assert isinstance(fast, FastUNet)
    return fast, run, first


def dan_settings(data: Path) -> Settings:
    return Settings(data_dir=data, device="cpu", dtype="bfloat16", fast_path="compile")  # type: ignore[call-arg]


def installed(checkpoint: Path) -> InstalledModel:
    return InstalledModel(ModelKind.CHECKPOINT, checkpoint.stem, SHA, checkpoint, 0)


def restart_s(checkpoint: Path, data: Path) -> float:
    """Seconds a restarted engine takes from loading the checkpoint to its compiled shape
    being ready (the package the first engine built, loaded from the data dir)."""
    started = time.perf_counter()
    engine = DiffusersEngine(dan_settings(data))
    fast = engine.pipelines.get(installed(checkpoint)).fast_unet
    assert isinstance(fast, FastUNet)
    fast.compiler.idle()
    return time.perf_counter() - started


def rss_gb() -> float:
    """This process's resident memory now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="a real SD1.x .safetensors file")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.checkpoint is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from overhead import make_checkpoint

            checkpoint = make_checkpoint(root, "sd15")
        else:
            checkpoint = args.checkpoint.resolve()
        measure(checkpoint, root, args)


def measure(checkpoint: Path, root: Path, args: argparse.Namespace) -> None:
    rate = matmul_tflops()
    pipeline, plain = plain_runner(checkpoint, root / "plain-cache", args)
    tflop = job_tflop(pipeline, args)
    before = rss_gb()
    started = time.perf_counter()
    # Its first run takes the plain path while its shape compiles in the background.
    fast, dan, reference = dan_runner(checkpoint, root / "dan", args)
    fast.compiler.idle()
    warm_up = time.perf_counter() - started
    plain(), dan()  # each side's first run after warm-up is not timed
    times: dict[str, list[float]] = {"plain": [], "dan": []}
    images: dict[str, Any] = {}
    for round_ in range(args.rounds):
        order = ["plain", "dan"] if round_ % 2 == 0 else ["dan", "plain"]
        for name in order:
            start = time.perf_counter()
            images[name] = (plain if name == "plain" else dan)()
            times[name].append(time.perf_counter() - start)
    memory = rss_gb() - before
    rate = max(rate, matmul_tflops())  # the machine's speed drifts: its better reading
    restart = restart_s(checkpoint, root / "dan")
    report(args, rate, tflop, times, (warm_up, restart), memory, fast, images, reference)


def report(
    args: argparse.Namespace,
    rate: float,
    tflop: float,
    times: dict[str, list[float]],
    warm_up: tuple[float, float],
    memory_gb: float,
    fast: FastUNet,
    images: dict[str, Any],
    reference: Any,
) -> None:
    plain, dan = statistics.median(times["plain"]), statistics.median(times["dan"])
    print(
        f"SD1.5-size checkpoint, {args.size}x{args.size}, {args.steps} steps, Euler a, "
        f"CFG {args.cfg:g}, bf16, {torch.get_num_threads()} threads"
    )
    print(f"machine bf16 matmul   : {rate:6.2f} TFLOP/s; the job is {tflop:.2f} TFLOP")
    print(
        f"DAN warm-up           : {warm_up[0]:6.1f} s (load, first request on the plain path, "
        f"compile of its shape in a child process)"
    )
    print(f"DAN warm-up, restarted: {warm_up[1]:6.1f} s (load, the kept compiled package)")
    weights = sum(p.numel() * p.element_size() for p in fast.eager.parameters()) / 1024**3
    print(
        f"DAN memory            : RSS +{memory_gb:.1f} GB for the checkpoint and its compiled "
        f"shape (the UNet's weights: {weights:.1f} GB)"
    )
    for name, median in (("plain diffusers bf16", plain), ("DAN fast path", dan)):
        share = tflop / median / rate
        rounds = ", ".join(f"{t:.2f}" for t in times["plain" if "plain" in name else "dan"])
        print(f"{name:22}: {median:6.2f} s  ({rounds}); {100 * share:4.1f} % of the matmul rate")
    calls = fast.compiled_calls
    print(f"speed-up              : {plain / dan:6.2f}x  (compiled UNet calls: {calls})")
    for what, other in (("its plain path", reference), ("plain diffusers", images["plain"])):
        difference = np.abs(images["dan"] - other)
        psnr = 10 * np.log10(255**2 / max(float((difference**2).mean()), 1e-12))
        print(
            f"DAN fast vs {what:15}: max {difference.max()}, mean {difference.mean():.2f} "
            f"levels, PSNR {psnr:.1f} dB"
        )


if __name__ == "__main__":
    main()
