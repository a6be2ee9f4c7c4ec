"""Pickled model files that declare more than they hold.

torch allocates what a pickled file declares before it reads the bytes: a zip entry's inflated
size, a legacy file's storages. So a file of a few kB can ask for many GB and get the worker
killed. :func:`check_pickle` refuses such a file, naming it and what is wrong, from its pickles
alone; sound files in both of torch's formats pass.

Files are written in the real formats (see :mod:`tests.fixtures.torch_files`), or by
``torch.save`` itself where it can write them.
"""

from __future__ import annotations

import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dan.engine.loading.shapes import check_pickle, load_pickle
from dan.errors import EngineError
from tests.fixtures.tiny_clip import write_torchscript
from tests.fixtures.torch_files import (
    Storage,
    Tensor,
    declare_entry_size,
    tar_system,
    write_archive,
    write_legacy,
)

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
