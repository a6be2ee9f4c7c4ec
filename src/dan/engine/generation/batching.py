"""Batching across requests: several plain txt2img requests of one batch key run as one UNet
batch, each image the one its request gets alone.

Requests of one key (dan.tasks.needs.batch_key) share everything but their prompts, seeds and
CFG scales. Each request's prompts are encoded on their own and stacked along the batch axis
(a request of ``batch_size`` b gives b rows); each row keeps the CPU generator of its seed and
the scheduler is made with every row's seed, so each row draws the noise (Brownian noise of
the SDE samplers included) of its request run alone. A1111's prompt chunking gives a long
prompt more tokens, and rows of one UNet call must have one sequence length: requests are
grouped by the shape of their embeddings and each group is one run.

Per-row CFG: diffusers' pipelines combine the two halves as ``uncond + self.guidance_scale *
(text - uncond)`` with one number. :class:`CfgScales` is that number: a float equal to the
largest scale, so the pipeline's ``guidance_scale > 1`` checks hold, whose product with a
tensor multiplies row i by its own scale: the very operation a single request does with its
own scale, so no extra rounding. (Grouping by CFG would split the batches users vary most; a
UNet wrapper rescaling the conditional half would add a multiplication and a division per
step and need to know the pipeline's layout.) A guidance-embedded UNet (LCM-distilled, whose
``time_cond_proj_dim`` turns the scale into an embedding) takes one scale: there requests are
grouped by CFG too. Pipelines that use ``guidance_rescale`` would see the largest scale only;
DAN never sets it.

Progress and cancellation stay per request: every step reports to each request still in the
batch; a request whose progress callback raises TaskCancelled leaves it (its rows are still
computed until the run ends, its images are dropped) and the others go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL.Image import Image

from dan.domain import GenerationRequest, ProgressCallback
from dan.engine.families import Family
from dan.engine.generation.preview import LatentsSink
from dan.engine.generation.prompts import PromptEmbeds
from dan.engine.generation.txt2img import Conditioning, run_txt2img
from dan.errors import TaskCancelled


class CfgScales(float):
    """A guidance scale per row of a batch, passed where diffusers takes one: as a float it is
    the largest of them; multiplied with a (rows, ...) tensor it scales row i by ``scales[i]``."""

    scales: tuple[float, ...]

    def __new__(cls, scales: Sequence[float]) -> CfgScales:
        value = super().__new__(cls, max(scales))
        value.scales = tuple(scales)
        return value

    def __mul__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor):
            # In float32, then back: a single request multiplies by the Python float, and a
            # scale rounded to bf16 or fp16 (7.3 -> 7.3125) would change the image.
            scales = torch.tensor(self.scales, dtype=torch.float32, device=other.device)
            shaped = scales.view(-1, *([1] * (other.dim() - 1)))
            return (other.float() * shaped).to(other.dtype)
        return float(self) * other

    __rmul__ = __mul__


@dataclass
class Member:
    """One request of a batch: its encoded prompts, its progress and preview, and whether it
    has left the batch (cancelled)."""

    request: GenerationRequest
    embeds: PromptEmbeds
    progress: ProgressCallback
    on_latents: LatentsSink | None = None
    left: bool = field(default=False, init=False)

    @property
    def rows(self) -> int:
        return self.request.batch_size

    def report(self, done: int, total: int) -> None:
        """Pass a step on; a TaskCancelled from the request's callback makes it leave."""
        if self.left:
            return
        try:
            self.progress(done, total)
        except TaskCancelled:
            self.left = True


def run_batch(base: Any, family: Family, members: Sequence[Member]) -> list[list[Image] | None]:
    """The images of each member (None for one that left), its groups run one after another.
    Raises TaskCancelled when every member has left; what the pipeline raises otherwise."""
    images: dict[int, list[Image]] = {}
    by_cfg = base.unet.config.get("time_cond_proj_dim") is not None
    for group in _groups(members, by_cfg):
        if all(member.left for member in group):
            continue
        try:
            made = _run_group(base, family, group)
        except TaskCancelled:
            continue  # every member of the group left during it
        for member, member_images in zip(group, made, strict=True):
            images[id(member)] = member_images
    if all(member.left for member in members):
        raise TaskCancelled("every task of the batch was cancelled")
    return [None if m.left else images[id(m)] for m in members]


def _groups(members: Sequence[Member], by_cfg: bool) -> list[list[Member]]:
    """Members whose rows can share UNet calls: equal embedding shapes (and CFG, if asked)."""
    groups: dict[tuple[Any, ...], list[Member]] = {}
    for member in members:
        shape = tuple(member.embeds.prompt_embeds.shape[1:])
        key = (shape, member.request.cfg_scale if by_cfg else None)
        groups.setdefault(key, []).append(member)
    return list(groups.values())


def _run_group(base: Any, family: Family, group: list[Member]) -> list[list[Image]]:
    """One UNet batch of ``group``: each member's images, in order."""
    first = group[0].request
    seeds = tuple(seed for member in group for seed in member.request.batch_seeds(0))
    conditioning = Conditioning(
        base,
        family,
        stacked([member.embeds for member in group], [member.rows for member in group]),
        first,
        _reporter(group),
        seeds,
        _previewer(group),
        guidance_scale=CfgScales([m.request.cfg_scale for m in group for _ in range(m.rows)]),
    )
    made = run_txt2img(conditioning)
    starts = _starts(group)
    return [made[start : start + member.rows] for start, member in zip(starts, group, strict=True)]


def stacked(embeds: Sequence[PromptEmbeds], rows: Sequence[int]) -> PromptEmbeds:
    """The requests' embeddings one after another along the batch axis, each repeated for its
    rows (as a pipeline repeats a request's for ``num_images_per_prompt``)."""

    def cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.repeat_interleave(n, dim=0) for t, n in zip(parts, rows, strict=True)])

    def pooled(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
        present = [t for t in parts if t is not None]
        return cat(present) if present else None  # SDXL's, on all of them; SD 1.x: none

    return PromptEmbeds(
        cat([e.prompt_embeds for e in embeds]),
        cat([e.negative_prompt_embeds for e in embeds]),
        pooled([e.pooled_prompt_embeds for e in embeds]),
        pooled([e.negative_pooled_prompt_embeds for e in embeds]),
    )


def _starts(group: Sequence[Member]) -> list[int]:
    """The first row of each member."""
    starts, row = [], 0
    for member in group:
        starts.append(row)
        row += member.rows
    return starts


def _reporter(group: list[Member]) -> ProgressCallback:
    """A step to every member; TaskCancelled (ending the run) once every member has left."""

    def report(done: int, total: int) -> None:
        for member in group:
            member.report(done, total)
        if all(member.left for member in group):
            raise TaskCancelled("every task of the batch was cancelled")

    return report


def _previewer(group: list[Member]) -> LatentsSink | None:
    """Each member still there offered the latents of its own first row."""
    wanted = [(m, start) for m, start in zip(group, _starts(group), strict=True) if m.on_latents]
    if not wanted:
        return None

    def on_latents(latents: torch.Tensor) -> None:
        for member, start in wanted:
            sink: Callable[[torch.Tensor], None] | None = member.on_latents
            if sink is not None and not member.left:
                sink(latents[start : start + 1])

    return on_latents
