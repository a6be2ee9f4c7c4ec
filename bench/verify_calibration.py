"""Calibrate ``verify_threshold``: how far apart honest re-runs of one task land, and how close
a picture made with another seed comes.

    .venv/bin/python bench/verify_calibration.py                 # tiny checkpoint, every sampler
    .venv/bin/python bench/verify_calibration.py --architecture sd15 --samplers "Euler a" --seeds 4
    .venv/bin/python bench/verify_calibration.py --checkpoint model.safetensors --devices cpu,cuda

On a quiet 2-core CPU the first takes about 2 minutes, the second about 10 (full-size SD1.5 at
256x256 costs 6-40 s a picture; every sampler with 6 seeds would take hours).

Method. One prompt, ``--seeds`` seeds and every sampler of ``dan.samplers.SAMPLERS`` (or
``--samplers``) run through the real DiffusersEngine under every condition: each device of
``--devices`` x each dtype of ``--dtypes`` that torch can run there x each CPU thread count of
``--threads`` (torch.set_num_threads; on a GPU one count is enough). Every image is encoded with
``encode_png`` and compared with ``picture_distance``, as verification compares them:

- honest distances: the same seed under two different conditions (every pair of conditions),
  which is what two honest nodes with other hardware, dtypes or thread counts return;
- another-seed distances: two different seeds under one condition, which is what a node that
  skipped the work (or handed back another task's picture) returns: plausible, but wrong.

The suggested threshold. With H the largest honest distance and A the smallest another-seed
distance (over every sampler and seed), the threshold is their geometric mean sqrt(H * A), H
floored at 1/255 (one 8-bit level) so that bit-identical runs do not pull it to 0. It leaves
the same factor of safety sqrt(A / H) on both sides: an honest pair may drift that many times
further than any pair seen here before it is rejected, and a wrong picture must come that many
times closer than any seen here before it passes. A ratio rather than a difference because
honest drift grows multiplicatively (with steps, size and the sampler's injected noise). If
H >= A for some sampler, no threshold separates the two; the output says so for that sampler
and again at the end.

Random weights (``--architecture``) make strange but structured pictures, not what a trained
model draws; a real checkpoint (``--checkpoint``) gives the numbers that matter.
"""

from __future__ import annotations

import argparse
import gc
import io
import itertools
import math
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers.utils import logging as diffusers_logging
from PIL import Image
from safetensors.torch import load_file, save_file

from bench.overhead import make_checkpoint
from dan.config import Settings
from dan.domain import GenerationRequest, InstalledModel, ModelKind, ModelRef
from dan.engine.diffusers_engine import DiffusersEngine
from dan.engine.loading.device import pick_dtype
from dan.imaging import encode_png, infotext, picture_distance
from dan.samplers import SAMPLERS
from tests.fixtures.tiny_sd import CLIP

PROMPT = "a lighthouse on a cliff at dawn, dramatic sky"
NEGATIVE_PROMPT = "blurry"
SHA = "c" * 64  # the request names the model by sha256; the engine maps it through ``files``
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
FLOOR = 1 / 255  # one 8-bit level: honest distances below it count as this much
RANDOM = "random weights: strange but structured pictures, not what a trained model draws"


@dataclass(frozen=True)
class Condition:
    """Where and how one run computes."""

    device: str
    dtype: str
    threads: int

    def __str__(self) -> str:
        where = f"{self.threads}t" if self.device == "cpu" else self.device
        return f"{SHORT[self.dtype]}/{where}"

    @property
    def numerics(self) -> str:
        """The condition but for its thread count."""
        return f"{SHORT[self.dtype]} {self.device}"


def difference(a: Condition, b: Condition) -> str:
    """What sets two conditions apart: the thread count alone, or device and dtype."""
    if a.numerics == b.numerics:
        return f"{a.numerics} {a.threads} vs {b.threads} threads"
    return f"{a.numerics} vs {b.numerics}"


@dataclass(frozen=True)
class Distance:
    """One measured distance; ``what`` names the two pictures compared, ``kind`` what differs."""

    sampler: str
    honest: bool
    what: str
    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.value:.4f}  ({self.sampler}, {self.what})"


Key = tuple[str, int, Condition]  # sampler, seed, condition
Images = dict[Key, bytes]  # PNGs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="a real SD1.x .safetensors file")
    parser.add_argument("--architecture", choices=["tiny", "sd15", "both"], default="tiny")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated")
    parser.add_argument("--seeds", type=int, default=6, help="how many seeds (1, 2, ...)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cfg-scale", type=float, default=7.0)
    parser.add_argument("--devices", default="cpu", help="comma-separated: cpu,cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated")
    parser.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts")
    parser.add_argument("--save", type=Path, help="also write every picture into this folder")
    args = parser.parse_args()
    args.samplers = [name.strip() for name in args.samplers.split(",")]
    unknown = sorted(set(args.samplers) - set(SAMPLERS))
    if unknown:
        parser.error(f"unknown samplers {unknown}; expected some of {list(SAMPLERS)}")
    unknown = sorted(set(args.dtypes.split(",")) - set(SHORT))
    if unknown:
        parser.error(f"unknown dtypes {unknown}; expected some of {list(SHORT)}")
    if args.seeds < 2:
        parser.error(f"--seeds must be at least 2 to compare seeds, got {args.seeds}")
    return args


# --- conditions and checkpoints ----------------------------------------------------------


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """True when torch can run the operations of a UNet step in ``dtype`` on ``device``."""
    try:
        x = torch.randn(1, 8, 16, 16).to(device, dtype)
        conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(device, dtype)
        y = torch.nn.functional.group_norm(torch.nn.functional.silu(conv(x)), 4).flatten(2)
        torch.softmax(y @ y.transpose(1, 2), dim=-1)
    except (RuntimeError, TypeError):
        return False
    return True


def make_conditions(args: argparse.Namespace) -> list[Condition]:
    """Every device x runnable dtype x thread count; dtypes torch cannot run are reported."""
    threads = [int(n) for n in args.threads.split(",")]
    conditions = []
    for device, dtype in itertools.product(args.devices.split(","), args.dtypes.split(",")):
        if not runs_on(torch.device(device), pick_dtype(dtype, torch.device(device))):
            print(f"note: torch cannot run {dtype} on {device} here; left out")
            continue
        counts = threads if device == "cpu" else [max(threads)]
        conditions += [Condition(device, dtype, n) for n in counts]
    return conditions


def make_checkpoints(folder: Path, args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(description, file) of every checkpoint to measure."""
    if args.checkpoint:
        return [(f"{args.checkpoint.name} (trained weights)", args.checkpoint.resolve())]
    names = ["tiny", "sd15"] if args.architecture == "both" else [args.architecture]
    return [(f"{name} ({RANDOM})", random_checkpoint(folder, name)) for name in names]


def random_checkpoint(folder: Path, architecture: str) -> Path:
    """bench/overhead.py's random checkpoint, with a non-zero bias in CLIP's last LayerNorm.

    With a zero bias (random init) the mean of a chunk's hidden states is ~1e-9 (in float32
    often exactly 0, which the engine now leaves unscaled), and A1111's emphasis rescaling
    divides by that mean: rounding noise, amplified, would pass for honest drift. A trained
    CLIP's bias is far from 0, and so is this copy's."""
    path = make_checkpoint(folder, architecture)
    state = load_file(path)
    key = CLIP + "final_layer_norm.bias"
    generator = torch.Generator().manual_seed(0)
    state[key] = (0.1 * torch.randn(state[key].shape, generator=generator)).to(state[key].dtype)
    save_file(state, path)
    return path


# --- generation --------------------------------------------------------------------------


def render(
    engine: DiffusersEngine,
    model: InstalledModel,
    sampler: str,
    seed: int,
    args: argparse.Namespace,
) -> bytes:
    """One txt2img result through the engine, as the PNG a node would upload."""
    request = GenerationRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        seed=seed,
        sampler_name=sampler,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        width=args.size,
        height=args.size,
        model=ModelRef(SHA, model.name),
    )
    [image] = engine.txt2img(request, {SHA: model}, lambda step, total: None)
    return encode_png(image, infotext(request, seed))


def generate(
    checkpoint: Path, conditions: list[Condition], args: argparse.Namespace, folder: Path
) -> Images:
    """Every (sampler, seed, condition) image. One engine per device and dtype, freed after
    use, so only one copy of the weights is loaded at a time."""
    model = InstalledModel(
        ModelKind.CHECKPOINT, checkpoint.stem, SHA, checkpoint, checkpoint.stat().st_size
    )
    seeds = range(1, args.seeds + 1)
    total = len(conditions) * len(args.samplers) * len(seeds)
    images: Images = {}
    for (device, dtype), group in itertools.groupby(conditions, lambda c: (c.device, c.dtype)):
        settings = Settings(data_dir=folder / "data", device=device, dtype=dtype)  # type: ignore[call-arg]
        engine = DiffusersEngine(settings)
        for condition in group:
            torch.set_num_threads(condition.threads)
            for sampler, seed in itertools.product(args.samplers, seeds):
                start = time.perf_counter()
                images[sampler, seed, condition] = render(engine, model, sampler, seed, args)
                took = time.perf_counter() - start
                print(
                    f"  [{len(images)}/{total}] {condition} {sampler} seed {seed}: {took:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
        del engine
        gc.collect()
    return images


def save(images: Images, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for (sampler, seed, condition), png in images.items():
        name = f"{sampler}-{seed}-{condition}".replace(" ", "_").replace("/", "-")
        (folder / f"{name}.png").write_bytes(png)


# --- distances ---------------------------------------------------------------------------


def flat_pictures(images: Images) -> list[Key]:
    """The pictures of one flat colour: NaN in the pipeline comes out black. Two such pictures
    are "the same" whatever the seed, so they would make the another-seed side meaningless."""
    flat = []
    for key, png in images.items():
        with Image.open(io.BytesIO(png)) as image:
            if image.getcolors(maxcolors=1) is not None:  # None: more colours than that
                flat.append(key)
    return flat


def measure(
    images: Images, args: argparse.Namespace, conditions: list[Condition]
) -> list[Distance]:
    """Honest distances (same seed, two conditions) and another-seed ones (same condition),
    leaving out flat pictures (reported by the caller)."""
    flat = set(flat_pictures(images))
    seeds = range(1, args.seeds + 1)
    found = []
    for sampler in args.samplers:
        for seed, (a, b) in itertools.product(seeds, itertools.combinations(conditions, 2)):
            for value in compare(images, flat, (sampler, seed, a), (sampler, seed, b)):
                found.append(Distance(sampler, True, f"{a} vs {b}", difference(a, b), value))
        for condition, (s, t) in itertools.product(conditions, itertools.combinations(seeds, 2)):
            for value in compare(images, flat, (sampler, s, condition), (sampler, t, condition)):
                found.append(Distance(sampler, False, f"seeds {s},{t} {condition}", "seed", value))
    return found


def compare(images: Images, flat: set[Key], first: Key, second: Key) -> list[float]:
    """The distance of two pictures, or none when either is flat."""
    if first in flat or second in flat:
        return []
    return [picture_distance(images[first], images[second])]


def values(distances: list[Distance], *, honest: bool) -> np.ndarray:
    return np.array([d.value for d in distances if d.honest == honest])


def suggest(largest_honest: float, smallest_other: float) -> float:
    """The geometric mean of the two (see the module docstring), the honest side floored."""
    return math.sqrt(max(largest_honest, FLOOR) * smallest_other)


# --- report ------------------------------------------------------------------------------


def report_samplers(distances: list[Distance]) -> list[str]:
    """Print one line per sampler; return the samplers whose ranges overlap."""
    print(
        f"  {'sampler':18} {'honest max':>10} {'p95':>7} {'n':>4}   "
        f"{'other-seed min':>14} {'p5':>7} {'n':>4}   {'min/max':>7}"
    )
    overlapping = []
    for sampler in dict.fromkeys(d.sampler for d in distances):
        mine = [d for d in distances if d.sampler == sampler]
        honest, other = values(mine, honest=True), values(mine, honest=False)
        if not (honest.size and other.size):
            print(f"  {sampler:18} too few usable pictures to compare")
            continue
        ratio = other.min() / max(honest.max(), FLOOR)
        flag = "   <-- OVERLAP" if honest.max() >= other.min() else ""
        if flag:
            overlapping.append(sampler)
        print(
            f"  {sampler:18} {honest.max():10.4f} {np.percentile(honest, 95):7.4f} "
            f"{honest.size:4}   {other.min():14.4f} {np.percentile(other, 5):7.4f} "
            f"{other.size:4}   {ratio:7.1f}{flag}"
        )
    return overlapping


def report_pairs(distances: list[Distance]) -> None:
    """What makes runs drift apart: the largest and median distance per kind of difference."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    for d in distances:
        if d.honest:
            by_kind[d.kind].append(d.value)
    print(f"  {'honest pairs differing in':32} {'max':>8} {'median':>8} {'n':>5}")
    for kind, found in by_kind.items():
        print(f"  {kind:32} {max(found):8.4f} {float(np.median(found)):8.4f} {len(found):5}")


def report_overall(distances: list[Distance], title: str) -> None:
    """The two extremes, their margin, and the suggested and current thresholds."""
    honest, other = values(distances, honest=True), values(distances, honest=False)
    if not (honest.size and other.size):
        print(f"overall, {title}: too few usable pictures to compare")
        return
    worst_honest = max((d for d in distances if d.honest), key=lambda d: d.value)
    closest_other = min((d for d in distances if not d.honest), key=lambda d: d.value)
    print(f"overall, {title}:")
    print(f"  largest honest distance      {worst_honest}")
    print(f"  smallest another-seed dist.  {closest_other}")
    print(f"  margin (difference)          {closest_other.value - worst_honest.value:+.4f}")
    if worst_honest.value >= closest_other.value:
        print("  !!! THE RANGES OVERLAP: no threshold tells honest runs from another seed !!!")
        return
    ratio = closest_other.value / max(worst_honest.value, FLOOR)
    print(f"  margin (ratio min/max)       {ratio:.1f}x")
    current = Settings.model_fields["verify_threshold"].default
    for name, threshold in [
        ("suggested (geometric mean)", suggest(worst_honest.value, closest_other.value)),
        ("current verify_threshold", current),
    ]:
        rejected, accepted = int((honest > threshold).sum()), int((other <= threshold).sum())
        print(
            f"  {name:28} {threshold:.4f}  honest rejected {rejected}/{honest.size}, "
            f"another seed accepted {accepted}/{other.size}"
        )


def report_flat(flat: list[Key], total: int) -> None:
    if flat:
        print(f"!!! {len(flat)} of {total} pictures are one flat colour (NaN in the pipeline?)")
        print("    and left out: " + ", ".join(f"{c} {s} seed {n}" for s, n, c in flat))


def report_checkpoint(name: str, distances: list[Distance]) -> list[str]:
    print(f"\ncheckpoint {name}")
    overlapping = report_samplers(distances)
    report_pairs(distances)
    report_overall(distances, name.split(" ")[0])
    return overlapping


def main() -> None:
    args = parse_args()
    warnings.simplefilter("ignore", FutureWarning)  # diffusers' steps_offset deprecation
    diffusers_logging.set_verbosity_error()
    conditions = make_conditions(args)
    print(
        f"{args.size}x{args.size}, {args.steps} steps, CFG {args.cfg_scale:g}, "
        f"seeds 1-{args.seeds}, prompt {PROMPT!r}; conditions: " + ", ".join(map(str, conditions))
    )
    everything: list[Distance] = []
    overlapping: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, checkpoint in make_checkpoints(Path(tmp), args):
            start = time.perf_counter()
            images = generate(checkpoint, conditions, args, Path(tmp))
            if args.save:
                save(images, args.save / checkpoint.stem)
            print(f"\n{len(images)} images of {name} in {time.perf_counter() - start:.0f} s")
            report_flat(flat_pictures(images), len(images))
            distances = measure(images, args, conditions)
            overlapping += report_checkpoint(name, distances)
            everything += distances
    if overlapping:
        print(f"\n!!! OVERLAP for {', '.join(dict.fromkeys(overlapping))}: see above !!!")
    if everything and args.architecture == "both":
        print()
        report_overall(everything, "every checkpoint")


if __name__ == "__main__":
    main()
