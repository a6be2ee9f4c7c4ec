"""What a pickled torch file declares, checked before torch allocates it.

``torch.load`` sizes memory by what a file declares before it reads a byte of it: a zip
archive's entry (``torch.save`` since torch 1.6) is read into memory of the inflated size its
headers declare, a legacy (pre-1.6) file's storages are allocated at the element counts its
pickle declares, and any file that is not a zip archive is first tried as a tar archive, whose
extended headers are read at the size they declare. So a file of a few kB could ask for many GB
and get the worker killed. :func:`check_pickle` reads a file's pickles only, with an unpickler
that imports and builds nothing, and refuses such a file; :func:`load_pickle` is
``torch.load(weights_only=True)`` behind it. What the loaded tensors may look like is each
kind's :class:`dan.engine.loading.shapes.Limits`.

Every refusal raises the caller's error type (ControlNetError, UnsupportedCheckpoint,
EngineError: the worker fails the task with its message) naming the file and the storage.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from dan.errors import EngineError

ZIP_MAGIC = b"PK\x03\x04"  # what torch.load looks for: a file that starts so is a zip archive
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch.save's legacy format
# What the compressed entries of an archive may inflate to: torch.jit.save compresses the code
# of a TorchScript archive (a few hundred kB for OpenAI's CLIP), never its weights.
MAX_INFLATED = 64 << 20
# Bytes per element of the storage classes torch.save names in its pickles.
STORAGE_BYTES = {
    "UntypedStorage": 1,
    "BoolStorage": 1,
    "ByteStorage": 1,
    "CharStorage": 1,
    "QInt8Storage": 1,
    "QUInt8Storage": 1,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
    "ShortStorage": 2,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "IntStorage": 4,
    "FloatStorage": 4,
    "QInt32Storage": 4,
    "LongStorage": 8,
    "DoubleStorage": 8,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
}


def load_pickle(path: Path, error: type[EngineError]) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, once :func:`check_pickle` has found
    nothing in the file that would make torch allocate more than the file holds. Raises
    ``error`` naming the file for such a file; what makes a file unreadable (missing, not a
    torch file, truncated, holding objects ``weights_only`` refuses) propagates as the
    exception it is, for the caller to word."""
    check_pickle(path, error)
    return torch.load(path, map_location="cpu", weights_only=True)


def check_pickle(path: Path, error: type[EngineError]) -> None:
    """Refuse a pickled torch file that declares storages the file does not hold, reading
    only its pickles (with an unpickler that builds nothing and imports nothing).

    A zip archive (``torch.save`` since torch 1.6, and TorchScript archives) must hold its
    entries inside the file and its weights stored as they are (torch allocates an entry's
    declared inflated size before inflating it), and each storage its pickles declare must fit
    its entry. A legacy file's storages, which torch allocates as its pickle declares them,
    must each be followed in the file by as many bytes, and the file must not pass for a tar
    archive (torch tries that format first). Raises ``error`` naming the file and
    the storage; OSError for a file that cannot be read, ValueError for one that is neither
    format or is broken (a truncated archive, a pickle that does not parse).
    """
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        zipped = file.read(len(ZIP_MAGIC)) == ZIP_MAGIC
        file.seek(0)
        try:
            if zipped:
                _check_archive(path.name, zipfile.ZipFile(file), size, error)
            else:
                _check_legacy(path.name, _Bounded(file, size), size, error)
        except (EngineError, OSError, ValueError):
            raise
        except Exception as exc:  # zipfile's and pickle's many errors: all mean "broken"
            raise ValueError(f"{type(exc).__name__}: {exc}") from exc


def _check_archive(
    name: str, archive: zipfile.ZipFile, size: int, error: type[EngineError]
) -> None:
    entries = archive.infolist()
    if not entries:
        raise ValueError("an empty zip archive")
    _check_entries(name, entries, size, error)
    by_name = {entry.filename.lower(): entry for entry in entries}  # torch's lookups ignore case
    folder = _folder(entries)
    # data.pkl's storages are records in data/, a TorchScript archive's constants' in constants/.
    for records in ("data", "constants"):
        pickled = by_name.get(f"{folder}/{records}.pkl")
        if pickled is None:
            continue
        for key, (nbytes, _) in _declared_storages(io.BytesIO(archive.read(pickled))).items():
            record = by_name.get(f"{folder}/{records}/{key}".lower())
            held = 0 if record is None else record.file_size
            if nbytes > held:
                raise error(
                    f"{name}: storage {key!r} declares {nbytes} bytes but the file holds "
                    f"{held} bytes for it"
                )


def _check_entries(
    name: str, entries: list[zipfile.ZipInfo], size: int, error: type[EngineError]
) -> None:
    """Refuse an archive whose entries would make torch allocate more than the file holds: torch
    allocates an entry's declared (inflated) size before it reads the entry."""
    folder = _folder(entries)
    weights = (f"{folder}/data", f"{folder}/constants")  # the pickles and their storages
    seen: set[str] = set()
    for entry in entries:
        # Which of two entries torch would read (its lookups ignore case) is not ours to guess.
        if entry.filename.lower() in seen:
            raise error(f"{name}: the zip archive holds {entry.filename!r} twice")
        seen.add(entry.filename.lower())
        stored = entry.compress_type == zipfile.ZIP_STORED
        if not stored and entry.filename.lower().startswith(weights):
            raise error(
                f"{name}: zip entry {entry.filename!r} is compressed ({entry.compress_size} "
                f"bytes declaring {entry.file_size}); torch.save stores weights as they are, "
                "and torch allocates the declared size before inflating it: save the file "
                "again with torch.save, or convert it to .safetensors"
            )
    spans = sum(entry.compress_size for entry in entries)
    stored_sizes = sum(e.file_size for e in entries if e.compress_type == zipfile.ZIP_STORED)
    if max(spans, stored_sizes) > size or any(
        e.header_offset + e.compress_size > size for e in entries
    ):
        raise error(
            f"{name}: its zip entries declare more bytes than the {size}-byte file holds "
            "(truncated, or lying about its sizes)"
        )
    inflated = sum(e.file_size for e in entries if e.compress_type != zipfile.ZIP_STORED)
    if inflated > MAX_INFLATED:
        raise error(
            f"{name}: its compressed zip entries declare {inflated} bytes once inflated; a "
            f"torch file compresses only TorchScript code, at most {MAX_INFLATED} bytes"
        )


def _folder(entries: list[zipfile.ZipInfo]) -> str:
    """The folder torch reads every record from (the first entry's), in lower case."""
    return entries[0].filename.split("/", 1)[0].lower()


def _check_legacy(name: str, file: _Bounded, size: int, error: type[EngineError]) -> None:
    # torch.load first tries any other file as a tar archive (its pre-0.4 format), and tarfile
    # reads an extended header at the size the first block declares.
    if _is_tar_header(file.read(tarfile.BLOCKSIZE)):
        raise error(f"{name} is a tar archive (torch's format before 0.4, which DAN does not read)")
    file.seek(0)
    try:
        magic = _Declarations(file).load()
    except Exception as exc:  # whatever the first bytes are, they are no torch file
        raise ValueError(f"not a PyTorch file ({exc})") from exc
    if magic != LEGACY_MAGIC:
        raise ValueError("not a PyTorch file (neither a zip archive nor a legacy torch.save)")
    _Declarations(file).load()  # the format's version
    _Declarations(file).load()  # the saving system's sizes and byte order
    storages = _declared_storages(file)
    keys = _Declarations(file).load()
    if not isinstance(keys, list):
        raise ValueError(f"its storage list is a {type(keys).__name__}")
    offset = file.tell()
    for key in keys:
        if key not in storages:
            raise error(f"{name}: storage {key!r} is listed (again?) but not declared")
        # torch reads each storage in turn: an 8-byte element count, then the elements.
        nbytes, item = storages.pop(key)
        file.seek(offset)
        count = int.from_bytes(file.read(8), "little", signed=True)
        held = max(0, min(count * item, size - offset - 8))
        if nbytes != count * item or nbytes > held:
            raise error(
                f"{name}: storage {key!r} declares {nbytes} bytes but the file holds {held} "
                "bytes for it"
            )
        offset += 8 + nbytes
    if storages:
        raise error(f"{name}: storage {next(iter(storages))!r} is declared but not in the file")


def _is_tar_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _declared_storages(file: IO[bytes] | _Bounded) -> dict[str, tuple[int, int]]:
    """Each storage a torch pickle declares: key -> (bytes, bytes per element), the largest
    of the key's declarations (torch allocates the first; a sound file declares one size)."""
    unpickler = _Declarations(file)
    unpickler.load()
    return unpickler.storages


class _Declarations(pickle.Unpickler):
    """Unpickles a torch pickle into inert stand-ins, recording the storages it declares.

    Every global is :class:`_Inert` (nothing is imported, no code runs) but storage classes,
    which become their names; persistent ids are torch's storage references."""

    def __init__(self, file: IO[bytes] | _Bounded) -> None:
        super().__init__(file, encoding="utf-8")  # torch.load's encoding
        self.storages: dict[str, tuple[int, int]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch", "torch.storage") and name in STORAGE_BYTES:
            return _StorageClass(name)
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        # ("storage", class, key, location, numel) in a zip archive, (..., view) in a legacy file.
        if not (
            isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")
        ):
            return _Inert()  # a legacy file's module sources; torch refuses anything else
        storage, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage, _StorageClass):
            raise ValueError(f"storage {key!r} is of no storage class torch knows ({storage!r})")
        if not (type(key) is str and type(numel) is int and numel >= 0):
            raise ValueError(f"a storage reference is malformed: {pid[1:]!r}")
        item = STORAGE_BYTES[storage.name]
        declared = self.storages.get(key, (0, item))
        self.storages[key] = max(declared, (numel * item, item))
        return _Inert()


@dataclass(frozen=True)
class _StorageClass:
    name: str


class _Inert:
    """Whatever a torch pickle builds (tensors, parameters, dicts of them): taken and dropped."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass


class _Bounded:
    """A file whose reads stop at its end: a pickle's declared length must not make the
    unpickler allocate more than the file holds before it finds the data short."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self._file = file
        self._size = size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._size - self._file.tell())
        return self._file.read(left if n < 0 else min(n, left))

    def readline(self, limit: int = -1) -> bytes:
        left = max(0, self._size - self._file.tell())
        return self._file.readline(left if limit < 0 else min(limit, left))

    def seek(self, offset: int) -> None:
        self._file.seek(offset)

    def tell(self) -> int:
        return self._file.tell()
