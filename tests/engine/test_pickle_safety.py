"""A pickled model file is data: no loader of the engine may run code stored in it.

Each loader of ``.pth``/``.pt``/``.ckpt``/``.bin`` files gets an otherwise plausible state dict
that carries a ``__reduce__`` payload (``os.system`` creating a marker file), pickled the way
``torch.save`` writes files and as a bare pickle. The loader must refuse the file with the
engine's error (an EngineError, never the FatalEngineError that ends a worker) and the marker
must never appear. Pickled SD checkpoints and LoRAs load only when the operator sets
``allow_ckpt`` (DAN_ALLOW_CKPT), a documented decision to trust them: without it they are
refused before they are read; with it, a payload in them runs (checkpoint._read_pickle falls
back to ``weights_only=False`` when the safe load refuses the file).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dan.domain import InstalledModel, ModelKind
from dan.engine.control.controlnet import load_controlnet
from dan.engine.control.openpose_body import OpenPoseBody
from dan.engine.interrogation import clip_ranker
from dan.engine.interrogation.blip import read_blip_state
from dan.engine.interrogation.deepdanbooru import read_tagger_file
from dan.engine.loading.checkpoint import load_sd_pipeline, read_state_dict
from dan.engine.loading.lora.files import read_lora
from dan.engine.upscaling.upscale_models import load_upscaler
from dan.errors import EngineError, FatalEngineError

CPU = torch.device("cpu")


class Payload:
    """Unpickling this runs ``touch marker`` in a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_malicious(path: Path, marker: Path, how: str) -> Path:
    """A state dict with one real tensor and the payload beside it."""
    state = {"state_dict": {"weight": torch.zeros(2), "bias": Payload(marker)}}
    if how == "torch.save":
        torch.save(state, path)
    else:
        with path.open("wb") as file:
            pickle.dump(state, file, protocol=2)
    return path


def lora(path: Path) -> Any:
    model = InstalledModel(ModelKind.LORA, path.stem, "e" * 64, path, path.stat().st_size)
    return read_lora(model, allow_ckpt=False)


# Every loader that reads pickles, with the suffixes it takes as pickles.
LOADERS: dict[str, tuple[Callable[[Path], Any], tuple[str, ...]]] = {
    "checkpoint": (lambda p: read_state_dict(p, allow_ckpt=False), (".ckpt", ".pt")),
    "checkpoint pipeline": (
        lambda p: load_sd_pipeline(
            p, cache_dir=p.parent / "cache", dtype=torch.float32, device=CPU, allow_ckpt=False
        ),
        (".ckpt", ".pt"),
    ),
    "lora": (lora, (".ckpt", ".pt")),
    "controlnet": (
        lambda p: load_controlnet(p, dtype=torch.float32, device=CPU),
        (".pth", ".pt", ".ckpt", ".bin"),
    ),
    "upscaler": (lambda p: load_upscaler(p, CPU), (".pth", ".pt", ".ckpt")),
    "blip": (read_blip_state, (".pth",)),
    "clip ranker": (clip_ranker.read_state_dict, (".pt",)),
    "deepdanbooru": (read_tagger_file, (".pt",)),
    "openpose body": (lambda p: OpenPoseBody.load(p, CPU, torch.float32), (".pth",)),
}
CASES = [
    pytest.param(name, suffix, how, id=f"{name}-{suffix}-{how}")
    for name, (_, suffixes) in LOADERS.items()
    for suffix in suffixes
    for how in ("torch.save", "pickle")
]


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_the_payload_runs_when_unpickled_without_restrictions(tmp_path: Path, how: str) -> None:
    # What the loaders are protecting against: without weights_only, the file runs code.
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "model.pt", marker, how)
    with contextlib.suppress(RuntimeError):  # a bare pickle is no torch file, once it has run
        torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(("loader", "suffix", "how"), CASES)
def test_a_malicious_pickle_is_refused_and_never_runs(
    tmp_path: Path, loader: str, suffix: str, how: str
) -> None:
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / f"model{suffix}", marker, how)
    load, _ = LOADERS[loader]
    with pytest.raises(EngineError) as refused:
        load(path)
    assert not isinstance(refused.value, FatalEngineError)  # fails the task, not the worker
    assert path.name in refused.value.message
    assert not marker.exists()


class TrainerState:
    """A harmless object of the kind training checkpoints pickle (callbacks, loop state)."""

    def __init__(self) -> None:
        self.epoch = 3


def test_allow_ckpt_loads_a_trusted_training_checkpoint(tmp_path: Path) -> None:
    # What allow_ckpt promises: a trusted .ckpt loads even when it pickles objects beyond
    # tensors, which weights_only refuses (and which is how code runs: see the module doc).
    path = tmp_path / "trained.ckpt"
    torch.save({"state_dict": {"weight": torch.ones(2)}, "loops": TrainerState()}, path)
    with pytest.raises(EngineError, match="DAN_ALLOW_CKPT"):
        read_state_dict(path, allow_ckpt=False)
    tensors = read_state_dict(path, allow_ckpt=True)
    assert list(tensors) == ["weight"] and torch.equal(tensors["weight"], torch.ones(2))
