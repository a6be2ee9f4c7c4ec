"""Pickled model files that declare more than they hold.

torch allocates what a pickled file declares before it reads the bytes: a zip entry's inflated
size, a legacy file's storages. So a file of a few kB can ask for many GB and get the worker
killed. :func:`check_pickle` refuses such a file, naming it and what is wrong, from its pickles
alone; sound files in both of torch's formats pass. Every loader of ``.pth``/``.pt``/``.bin``/
``.ckpt`` files (ControlNets, upscalers, annotators, interrogators, embeddings, checkpoints and
LoRAs) refuses it so, with the engine's error type, before torch reads it (here ``torch.load``
and ``torch.jit.load`` are never reached), then holds the tensors it got to the shapes its kind
of file has.

Files are written in the real formats (see :mod:`tests.fixtures.torch_files`), or by
``torch.save`` itself where it can write them.
"""

from __future__ import annotations

import math
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dan.config import Settings
from dan.domain import ControlNetSpec, GenerationRequest, InstalledModel, ModelKind, ModelRef
from dan.engine.control.controlnet import ControlNetError, load_controlnet
from dan.engine.control.openpose_body import OpenPoseBody
from dan.engine.diffusers_engine import DiffusersEngine
from dan.engine.interrogation import clip_ranker
from dan.engine.interrogation.blip import read_blip_state
from dan.engine.interrogation.deepdanbooru import UnsupportedTagger, read_tagger_file
from dan.engine.loading.checkpoint import read_state_dict
from dan.engine.loading.embeddings import read_embedding
from dan.engine.loading.lora.files import LoraError, read_lora
from dan.engine.loading.pickles import check_pickle, load_pickle
from dan.engine.upscaling.upscale_models import UnsupportedUpscaler, load_upscaler
from dan.errors import EngineError, UnsupportedCheckpoint
from tests.fixtures.tiny_clip import write_torchscript
from tests.fixtures.torch_files import (
    Storage,
    Tensor,
    declare_entry_size,
    tar_system,
    write_archive,
    write_legacy,
)

CPU = torch.device("cpu")
GIB = 1 << 30

# --- the formats, as torch reads them ---------------------------------------------------------

FOUR = torch.arange(4, dtype=torch.float32)


def honest_state() -> dict[str, Tensor]:
    return {"weight": Tensor(Storage("0", 4), (2, 2))}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_the_written_formats_are_torch_s_own(tmp_path: Path, legacy: bool) -> None:
    """What the hostile files below are made of: honest, they load as torch.save's do."""
    path = tmp_path / "honest.pt"
    if legacy:
        write_legacy(path, honest_state(), {"0": (4, FOUR.numpy().tobytes())})
    else:
        write_archive(path, honest_state(), {"0": FOUR.numpy().tobytes()})
    loaded = load_pickle(path, EngineError)
    assert isinstance(loaded, dict) and torch.equal(loaded["weight"], FOUR.reshape(2, 2))


def saved_by_torch() -> dict[str, Any]:
    """What real files pickle besides plain tensors."""
    return {
        "state_dict": {
            "conv.weight": torch.randn(2, 3, 3, 3),
            "half": torch.randn(3, dtype=torch.float16),
            "bf16": torch.randn(3, dtype=torch.bfloat16),
            "slice": torch.arange(10.0)[2:7],  # a view of a larger storage
            "parameter": torch.nn.Parameter(torch.ones(2)),
            "steps": torch.tensor(7),
        },
        "epoch": 3,
        "names": ["a", "b"],
        "hparams": {"lr": 1e-4, "betas": (0.9, 0.99), "dtype": torch.float16},
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_files_torch_save_writes_pass(tmp_path: Path, legacy: bool) -> None:
    state = saved_by_torch()
    path = tmp_path / "saved.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    loaded = load_pickle(path, EngineError)
    assert isinstance(loaded, dict)
    for key, tensor in state["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], tensor), key


def test_newer_dtypes_and_torchscript_archives_pass(tmp_path: Path) -> None:
    # torch.save names the storage of a float8 or uint16 tensor UntypedStorage.
    newer = {
        "f8": torch.ones(3, dtype=torch.float8_e4m3fn),
        "u16": torch.ones(2, dtype=torch.uint16),
    }
    torch.save(newer, tmp_path / "newer.pt")
    loaded = load_pickle(tmp_path / "newer.pt", EngineError)
    assert isinstance(loaded, dict) and loaded["u16"].tolist() == [1, 1]
    # torch.jit.save compresses an archive's code, never its weights.
    tensors = {"visual.proj": torch.randn(4, 2), "logit_scale": torch.tensor(1.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated
        check_pickle(write_torchscript(tensors, tmp_path / "jit.pt"), EngineError)


def test_torch_allocates_what_an_archive_entry_declares(tmp_path: Path) -> None:
    """Why archives are checked: torch inflates an entry to the size it declares (here a MiB
    from a 2 kB file; a zip declares up to 16 EiB, and torch allocates before it inflates)."""
    count = (1 << 20) // 4
    state = {"weight": Tensor(Storage("0", count), (count,))}
    path = write_archive(tmp_path / "bomb.pt", state, {"0": bytes(1 << 20)}, deflated=True)
    assert path.stat().st_size < 4096
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["weight"].untyped_storage().nbytes() == 1 << 20
    with pytest.raises(EngineError, match=r"bomb\.pt: zip entry 'archive/data/0' is compressed"):
        check_pickle(path, EngineError)


# --- files that declare more than they hold -------------------------------------------------


def huge_archive(path: Path) -> Path:
    """A 600-byte archive whose storage record holds 16 bytes and is declared as 8 GiB."""
    state = {"weight": Tensor(Storage("0", 2 * GIB), (2, 2))}
    return write_archive(path, state, {"0": bytes(16)})


def inflating_archive(path: Path) -> Path:
    """An archive whose 16-byte record is deflated and declares 4 GiB once inflated."""
    state = {"weight": Tensor(Storage("0", GIB - 1), (2, 2))}
    write_archive(path, state, {"0": bytes(16)}, deflated=True)
    return declare_entry_size(path, "archive/data/0", 4 * GIB - 4)


def lying_archive(path: Path) -> Path:
    """A stored archive entry declared 2 GiB long in a file of a few hundred bytes."""
    write_archive(path, honest_state(), {"0": FOUR.numpy().tobytes()})
    return declare_entry_size(path, "archive/data/0", 2 * GIB)


def shadowed_archive(path: Path) -> Path:
    """A sound archive with a second, deflated record of the storage, its name differing in
    case only: torch's zip reader finds records whatever their case, so either may be read."""
    write_archive(path, honest_state(), {"0": FOUR.numpy().tobytes()})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("archive/DATA/0", bytes(1 << 20), compress_type=zipfile.ZIP_DEFLATED)
    return path


def huge_legacy(path: Path) -> Path:
    """A legacy file declaring an 8 GiB storage, followed by its 16 bytes."""
    state = {"weight": Tensor(Storage("0", 2 * GIB), (2, 2))}
    return write_legacy(path, state, {"0": (4, bytes(16))})


def unlisted_legacy(path: Path) -> Path:
    """A legacy file declaring a 4 GiB storage that is not in its list (torch allocates it,
    and never reads it)."""
    state = {**honest_state(), "bias": Tensor(Storage("1", GIB), (GIB,))}
    return write_legacy(path, state, {"0": (4, bytes(16))})


def tar_legacy(path: Path) -> Path:
    """A sound legacy file whose first block also reads as a tar header declaring an 8 GiB
    extended header (torch.load tries a tar archive first: tarfile would read it all)."""
    return write_legacy(path, honest_state(), {"0": (4, bytes(16))}, system=tar_system(8 * GIB - 1))


HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "huge-archive": (
        huge_archive,
        r": storage '0' declares 8589934592 bytes but the file holds 16 bytes for it",
    ),
    "inflating-archive": (
        inflating_archive,
        r": zip entry 'archive/data/0' is compressed \(\d+ bytes declaring 4294967292\)",
    ),
    "lying-archive": (lying_archive, r": its zip entries declare more bytes than the \d+-byte"),
    "shadowed-archive": (shadowed_archive, r": the zip archive holds 'archive/DATA/0' twice"),
    "huge-legacy": (
        huge_legacy,
        r": storage '0' declares 8589934592 bytes but the file holds 16 bytes for it",
    ),
    "unlisted-legacy": (unlisted_legacy, r": storage '1' is declared but not in the file"),
    "tar-legacy": (tar_legacy, r" is a tar archive \(torch's format before 0\.4"),
}


@pytest.mark.parametrize("hostile", list(HOSTILE))
def test_each_is_refused_from_its_pickles_alone(tmp_path: Path, hostile: str) -> None:
    write, message = HOSTILE[hostile]
    path = write(tmp_path / f"{hostile}.pt")
    tracemalloc.start()
    try:
        with pytest.raises(EngineError, match=rf"{hostile}\.pt{message}"):
            check_pickle(path, EngineError)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# --- every loader refuses them before torch reads them --------------------------------------


def installed(path: Path, kind: ModelKind, sha256: str = "e" * 64) -> InstalledModel:
    return InstalledModel(kind, path.stem, sha256, path, path.stat().st_size)


# Every loader of pickled files: how it is called, the error it raises, the suffix it reads.
LOADERS: dict[str, tuple[Callable[[Path], Any], type[EngineError], str]] = {
    "controlnet": (
        lambda p: load_controlnet(p, dtype=torch.float32, device=CPU),
        ControlNetError,
        ".pth",
    ),
    "upscaler": (lambda p: load_upscaler(p, CPU), UnsupportedUpscaler, ".pth"),
    "openpose body": (lambda p: OpenPoseBody.load(p, CPU, torch.float32), EngineError, ".pth"),
    "blip": (read_blip_state, EngineError, ".pth"),
    "clip ranker": (clip_ranker.read_state_dict, EngineError, ".pt"),
    "deepdanbooru": (read_tagger_file, UnsupportedTagger, ".pt"),
    "embedding": (
        lambda p: read_embedding(installed(p, ModelKind.EMBEDDING), {"clip_l": 4}),
        EngineError,
        ".pt",
    ),
    # Trusted with DAN_ALLOW_CKPT, yet still not allowed to declare what they do not hold.
    "checkpoint": (lambda p: read_state_dict(p, allow_ckpt=True), UnsupportedCheckpoint, ".ckpt"),
    "lora": (
        lambda p: read_lora(installed(p, ModelKind.LORA), allow_ckpt=True),
        LoraError,
        ".ckpt",
    ),
}


@pytest.fixture
def torch_never_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """The files torch.load and torch.jit.load were asked to read (each call fails)."""
    reached: list[Path] = []

    def load(path: Any, *args: object, **kwargs: object) -> Any:
        reached.append(Path(path))
        raise AssertionError("torch was asked to read the file")

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(torch.jit, "load", load)
    yield reached


@pytest.mark.parametrize("hostile", list(HOSTILE))
@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_file_declaring_more_than_it_holds_is_refused_before_torch_reads_it(
    tmp_path: Path, torch_never_loads: list[Path], loader: str, hostile: str
) -> None:
    load, error, suffix = LOADERS[loader]
    write, message = HOSTILE[hostile]
    path = write(tmp_path / f"{hostile}{suffix}")
    assert path.stat().st_size < 2048
    with pytest.raises(error, match=rf"{hostile}\{suffix}{message}"):
        load(path)
    assert torch_never_loads == []


def test_a_task_with_such_a_controlnet_fails_with_that_message(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """The worker fails a task with the message of the EngineError the engine raises."""
    controlnet = huge_archive(tmp_path / "control_hostile.pth")
    models = {
        "a" * 64: installed(tiny_checkpoint, ModelKind.CHECKPOINT, "a" * 64),
        "c" * 64: installed(controlnet, ModelKind.CONTROLNET, "c" * 64),
    }
    engine = DiffusersEngine(
        Settings(data_dir=tmp_path / "data", device="cpu", dtype="float32")  # type: ignore[call-arg]
    )
    spec = ControlNetSpec("ring", "none", ModelRef("c" * 64, "control_hostile"))
    request = GenerationRequest(
        "a fox", "", 1, "Euler", 2, 7.0, 64, 64, model=ModelRef("a" * 64, "tiny")
    )
    image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(ControlNetError, match=r"control_hostile\.pth: storage '0' declares"):
        engine.txt2img(replace(request, control_net=spec), models, lambda d, t: None, image)


# --- and holds what it loaded to its kind's shapes --------------------------------------------


def wrapped(loader: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``tensors`` in the layout the loader reads before it looks at shapes."""
    if loader == "blip":
        return {"model": tensors}
    if loader == "deepdanbooru":
        return {**tensors, "tags": ["a"]}
    return tensors


# Embeddings hold their vectors to their own bounds; a LoRA is read as a checkpoint is.
SHAPED = [name for name in LOADERS if name not in ("embedding", "lora")]
WHAT = {
    "controlnet": "a ControlNet",
    "upscaler": "an upscaler",
    "openpose body": "the OpenPose body model",
    "blip": "a BLIP checkpoint",
    "clip ranker": "an OpenAI CLIP model",
    "deepdanbooru": "a DeepDanbooru tagger",
    "checkpoint": r"an SD 1\.x or SDXL checkpoint, LoRA or VAE",
}


@pytest.mark.parametrize("loader", SHAPED)
def test_a_tensor_of_absurd_rank_is_refused(tmp_path: Path, loader: str) -> None:
    load, error, suffix = LOADERS[loader]
    path = tmp_path / f"deep{suffix}"
    torch.save(wrapped(loader, {"deep": torch.zeros((1,) * 9)}), path)
    with pytest.raises(
        error,
        match=rf"deep\{suffix}: tensor '.*deep' has 9 dimensions .*no "
        rf"tensor of {WHAT[loader]} has more than",
    ):
        load(path)


@pytest.mark.parametrize("loader", SHAPED)
def test_a_view_repeating_one_stored_value_is_refused(tmp_path: Path, loader: str) -> None:
    """One stored float passing for 4 GiB of them: torch.save keeps such a view as it is, and
    copying it (to the model's dtype or device) would allocate all of it."""
    load, error, suffix = LOADERS[loader]
    path = tmp_path / f"repeated{suffix}"
    view = torch.zeros(1).expand(1 << 15, 1 << 15)
    torch.save(wrapped(loader, {"repeated": view}), path)
    assert path.stat().st_size < 4096
    with pytest.raises(
        error,
        match=rf"repeated\{suffix}: tensor '.*repeated' of shape \[32768, "
        rf"32768\] is a view of 4 stored bytes passing for {math.prod(view.shape) * 4}",
    ):
        load(path)
