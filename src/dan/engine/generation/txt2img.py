"""txt2img: one batch's denoising run, and what every pass of a batch shares.

:class:`Conditioning` holds a request's loaded checkpoint, family, encoded prompts and progress;
the engine builds one per request (LoRAs, VAE and embeddings applied), and each of its
:meth:`~Conditioning.batches` gets fresh schedulers and generators, so passes never share
sampler state and each image's noise is that of a single request with its seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL.Image import Image

from dan.domain import GenerationRequest, PreviewSink, ProgressCallback
from dan.engine.families import Family
from dan.engine.generation.preview import LatentPreviewer, LatentsSink, step_callback
from dan.engine.generation.prompts import PromptEmbeds
from dan.engine.generation.samplers import make_scheduler


@dataclass(frozen=True)
class Conditioning:
    """What every denoising pass of one batch shares (see :meth:`batches`)."""

    base: Any  # the loaded checkpoint's pipeline, only read
    family: Family
    embeds: PromptEmbeds
    request: GenerationRequest
    progress: ProgressCallback
    seeds: tuple[int, ...]  # the batch's seeds, one per image
    on_latents: LatentsSink | None = None  # step previews, when someone wants them
    # A batch of several requests (dan.engine.generation.batching) stacks their embeddings,
    # one row per image, and passes its per-row CfgScales; None: the request's own scale.
    guidance_scale: float | None = None

    def batches(self) -> Iterator[Conditioning]:
        """The request's ``n_iter`` batches, in order: batch k has the seeds
        ``seed + k * batch_size + j`` and reports its steps as its share of the whole run.
        Call it on the request's conditioning (the one the engine builds per request)."""
        count = self.request.n_iter
        for k in range(count):
            yield replace(
                self,
                seeds=self.request.batch_seeds(k),
                progress=share(self.progress, k, count),
            )

    def scheduler(self) -> Any:
        """A new scheduler for one pass: passes never share sampler state."""
        config = self.base.scheduler.config
        request = self.request
        return make_scheduler(
            request.sampler_name, config, seed=self.seeds, schedule_type=request.scheduler
        )

    def generators(self) -> list[torch.Generator]:
        """One CPU generator per image, seeded with its seed: each image's noise is the noise
        a single request with that seed gets, on any device."""
        return [torch.Generator("cpu").manual_seed(seed) for seed in self.seeds]


def run_txt2img(c: Conditioning) -> list[Image]:
    """The images of one batch of a plain txt2img request (no hires fix, no ControlNet)."""
    arguments = denoising_arguments(c)
    pipeline = c.family.pipeline("txt2img", c.base, arguments.pop("scheduler"))
    output = pipeline(
        width=c.request.width,
        height=c.request.height,
        num_inference_steps=c.request.steps,
        guidance_scale=c.request.cfg_scale if c.guidance_scale is None else c.guidance_scale,
        num_images_per_prompt=len(c.seeds) // len(c.embeds.prompt_embeds),
        **arguments,
    )
    return list(output.images)


def denoising_arguments(c: Conditioning) -> dict[str, Any]:
    """The per-pass arguments every denoising run of a batch takes (one generator per image:
    the batch has as many images as generators)."""
    return {
        "scheduler": c.scheduler(),
        **c.embeds.call_kwargs(),
        "generator": c.generators(),
        "callback_on_step_end": step_callback(c.progress, on_latents=c.on_latents),
    }


def share(progress: ProgressCallback, index: int, count: int) -> ProgressCallback:
    """Progress of the ``index``-th of ``count`` equal runs, reported as part of all of them."""
    if count == 1:
        return progress
    return lambda done, total: progress(index * total + done, count * total)


def previews(previewer: LatentPreviewer, sink: PreviewSink) -> LatentsSink:
    """Latents offered to ``sink`` as a picture it may ask ``previewer`` to draw."""

    def on_latents(latents: torch.Tensor) -> None:
        sink(lambda: previewer(latents))

    return on_latents
