"""What a queued task needs to run: which node can take it, and what it costs in the queue.

Cost is relative to a 512x512, 20-step SD 1.x txt2img with a first-order sampler (cost 1):
the UNet evaluations actually run (a second-order sampler such as Heun or DPM2 evaluates the UNet
twice per step, so costs twice as much) times the pixels they run on, times what a step costs
per pixel in the checkpoint's family (SDXL's UNet is larger: see :data:`PIXEL_STEP_COST` and
``bench/sdxl_step_cost.py``), for each image the task makes. The queue advances an account's
lane by cost / weight, so a big task waits longer than a small one, and an honoured account gets
more turns (see dan.tasks.store). The same cost measures the work a node did: its owner's task
honor is ``honor_per_task`` x cost (dan.nodes.runs), taken from the task as queued.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

from dan.domain import GenerationRequest, ModelFamily, hires_size
from dan.samplers import SAMPLER_INFO
from dan.tasks.base import Expected

BASE_PIXELS, BASE_STEPS = 512 * 512, 20  # a task of cost 1
MIN_COST = 0.05  # per image: nothing is free, a flood of tiny tasks still advances its lane
INTERROGATE_COST = 0.5
# What one UNet step costs per pixel, relative to SD 1.x. bench/sdxl_step_cost.py measures an
# SDXL step at 1024x1024 against an SD1.5 step at 512x512 (4x the pixels); the ratio per pixel
# is this figure: 1.72 in bf16 on a 2-core CPU (41.3 s against 6.0 s a step).
PIXEL_STEP_COST: dict[ModelFamily, float] = {ModelFamily.SD15: 1.0, ModelFamily.SDXL: 1.7}


@dataclass(frozen=True)
class Needs:
    """What running a task takes: the checkpoint it runs on (for node affinity), every model
    file (sha256) a node must have installed, its cost relative to a 512x512, 20-step
    txt2img (the queue's weighting), what its result must be, and the checkpoint's family
    (only nodes that run it are offered the task; None: any node), and what it may share a
    UNet batch with (:func:`batch_key`; None: nothing)."""

    checkpoint: str | None = None
    requires: tuple[str, ...] = ()
    cost: float = 1.0
    expects: Expected | None = None
    family: ModelFamily | None = None
    batch_key: str | None = None

    @property
    def images(self) -> int:
        """What the account's pending limit counts for it: the images it makes (at least 1:
        a caption counts as one)."""
        return max(1, self.expects.images if self.expects else 0)


def generation_needs(
    request: GenerationRequest,
    denoising_strength: float = 1.0,
    output_size: tuple[int, int] | None = None,
    family: ModelFamily = ModelFamily.SD15,
) -> Needs:
    """The checkpoint, every file, the cost (steps actually run x UNet evaluations per step x
    megapixels, hires pass included, for each of its images) and the result
    (``request.images`` images of ``output_size``, by default the request's size,
    hires-fixed) of a txt2img or img2img request on a checkpoint of ``family``."""
    files = [request.model.sha256, *(lora.model.sha256 for lora in request.loras)]
    files += [ref.sha256 for ref in (request.vae, *request.embeddings) if ref is not None]
    calls = SAMPLER_INFO[request.sampling[0]].unet_calls
    steps = request.steps * denoising_strength
    cost = steps * request.width * request.height
    if request.hires is not None:
        if request.hires.upscaler.model:
            files.append(request.hires.upscaler.model.sha256)
        scaled = request.width * request.height * request.hires.scale**2
        second = request.hires.second_pass_steps(request.steps)
        cost += second * request.hires.denoising_strength * scaled
    cost *= calls
    if request.control_net is not None:
        files.append(request.control_net.model.sha256)
        if request.control_net.pose_model:
            files.append(request.control_net.pose_model.sha256)
    # The floor is per image, so a task's cost (and its node's honor) is its images' times one.
    per_image = max(MIN_COST, cost * PIXEL_STEP_COST[family] / (BASE_STEPS * BASE_PIXELS))
    if output_size is None and request.hires is not None:
        output_size = hires_size(request.width, request.height, request.hires.scale)
    width, height = output_size or (request.width, request.height)
    return Needs(
        request.model.sha256,
        tuple(dict.fromkeys(files)),
        per_image * request.images,
        Expected(request.images, width, height),
        family,
    )


# Bumped whenever what batch_key compares changes, so old rows never batch with new ones.
BATCH_KEY_VERSION = 1


def batch_key(request: GenerationRequest) -> str | None:
    """What a txt2img request may share one UNet batch with: a short hash of everything but
    its prompts, seed and CFG scale (checkpoint, size, sampler, schedule, steps, LoRAs, VAE,
    embeddings, clip skip, batch_size), and of whether CFG is on at all (a scale of 1 or less
    runs without the negative half). None for what does not batch yet: hires fix, ControlNet
    and several batches per task (n_iter > 1).

    Two requests with one key are run together by a worker (dan.workers.loop), each image
    the one its request gets alone."""
    if request.hires is not None or request.control_net is not None or request.n_iter != 1:
        return None
    shared = replace(request, prompt="", negative_prompt="", seed=0, cfg_scale=0.0)
    fields = {"v": BATCH_KEY_VERSION, "guided": request.cfg_scale > 1, **shared.to_params()}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
