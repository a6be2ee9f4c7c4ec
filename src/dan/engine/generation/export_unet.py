"""The child process that compiles a checkpoint's UNet for one call's shapes (see
:mod:`dan.engine.generation.packages`): ``python -m dan.engine.generation.export_unet JOB``,
``JOB`` a JSON object naming the checkpoint, how to load it, the saved example call and the
package to write.

It loads the checkpoint from its file with the worker's own loader (the same weights the
worker's plain path runs), exports the UNet with ``torch.export`` for the example call's shapes,
compiles it with AOTInductor, weights frozen into the graph (convolutions and linears prepacked
for oneDNN), and writes the ``.pt2`` package atomically. It runs at a lower CPU priority, so
the worker's tasks keep the cores first, and exits as soon as the worker that started it is
gone (nobody would load its package; a stopped server leaves no compile running).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

NICENESS = 10
PARENT_POLL_S = 1.0


class UNetForward(torch.nn.Module):
    """The UNet call the package computes: the noise prediction of one call."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        output: torch.Tensor = self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
        return output


def call_arguments(inputs: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """The positional and keyword arguments of a saved call, as export and the package take
    them (SD1.x calls have no ``added_cond_kwargs``)."""
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    added = inputs.get("added_cond_kwargs")
    return args, ({"added_cond_kwargs": added} if added else {})


def export(job: dict[str, Any]) -> None:
    from dan.engine.families import load_checkpoint

    pipeline, _, _ = load_checkpoint(
        Path(job["checkpoint"]),
        cache_dir=Path(job["cache_dir"]),
        dtype=getattr(torch, job["dtype"]),
        device="cpu",
        allow_ckpt=bool(job["allow_ckpt"]),
    )
    unet = pipeline.unet.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    del pipeline  # the text encoders and the VAE
    inputs = torch.load(job["inputs"], weights_only=True)
    args, kwargs = call_arguments(inputs)
    program = torch.export.export(UNetForward(unet), args, kwargs, strict=False)
    out = Path(job["out"])
    partial = out.with_name(f"{out.stem}.{os.getpid()}.partial.pt2")
    try:
        # Inductor freezes (folds and prepacks the weights) only with gradients off.
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(partial), inductor_configs={"freezing": True}
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def exit_with_parent(parent: int) -> None:
    """Exit (at once, from any phase of the compile) when ``parent``, the worker that started
    this compile, is no longer this process's parent (it may be gone before this runs)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    job = json.loads(sys.argv[1])
    exit_with_parent(int(job["parent"]))
    os.nice(NICENESS)
    export(job)


if __name__ == "__main__":
    main()
