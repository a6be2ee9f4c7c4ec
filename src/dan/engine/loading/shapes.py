"""What a tensor file declares, checked before its tensors are loaded.

Checkpoints and embeddings are downloaded from anywhere. A broken or hostile file can declare
shapes that make a loader allocate terabytes (a huge shape over a few bytes, or an empty tensor
whose one long side becomes a config value such as the number of positions), or that make torch
and diffusers fail with errors that name neither the file nor the tensor (a 0-d tensor where a
matrix belongs). So what a file declares is checked first:

- :func:`safetensors_shapes` reads a ``.safetensors`` header only: every tensor's shape times
  its element size must be exactly the bytes its offsets span, inside the file (Python integers,
  so no product overflows). Loading such a file then allocates no more than the file holds.
  A pickled file's storages are held to what it holds by :mod:`dan.engine.loading.pickles`.
- :func:`check_shapes` holds shapes to what files of a kind ever have: at most so many
  dimensions, no side longer than a limit. It runs on a header's shapes before loading, and on
  an unpickled file's tensors (whose storages torch has sized by the file's records) before any
  of them is copied.
- :func:`check_tensors` does so for loaded tensors, and refuses one with more elements than its
  storage holds (a broadcast view: one stored float passing for a billion, until something
  copies it).

Every refusal raises the caller's error type (UnsupportedCheckpoint, EngineError: the worker
fails the task with its message) naming the file and the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch

from dan.errors import EngineError
from dan.models.families import safetensors_header

# Bytes per element of safetensors' dtypes; a dtype not listed (newer sub-byte formats) is left
# to safetensors' own check.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Limits:
    """What the tensors of one kind of file ever look like."""

    what: str  # the kind of file, for messages: "a Stable Diffusion checkpoint"
    max_rank: int
    max_side: int


def safetensors_shapes(path: Path, error: type[EngineError]) -> dict[str, Shape]:
    """Each tensor's shape as ``path``'s header declares it, every one backed by exactly its
    bytes in the file. Reads the header only. Raises ``error`` naming the file (and the tensor)
    for a file that is not safetensors, cannot be read, or declares what it does not hold."""
    try:
        header, data_start = safetensors_header(path)
        data_bytes = path.stat().st_size - data_start
        return {
            name: _declared_shape(name, entry, data_bytes)
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except (ValueError, OSError) as exc:
        raise error(
            f"{path.name} cannot be read as safetensors (truncated or corrupt?): {exc}"
        ) from exc


def _declared_shape(name: str, entry: Any, data_bytes: int) -> Shape:
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {name!r} is described by a {type(entry).__name__}")
    shape, offsets, dtype = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
    if not _sizes(shape):
        raise ValueError(f"tensor {name!r} has no valid shape ({shape!r})")
    if not (_sizes(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1] <= data_bytes):
        raise ValueError(
            f"tensor {name!r} has data offsets {offsets!r} outside the file's {data_bytes} "
            "data bytes"
        )
    size = DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else None
    span = offsets[1] - offsets[0]
    if size is not None and math.prod(shape) * size != span:
        raise ValueError(
            f"tensor {name!r} declares shape {shape} of {dtype} ({math.prod(shape) * size} "
            f"bytes) but the file holds {span} bytes for it"
        )
    return tuple(shape)


def _sizes(value: object) -> TypeGuard[list[int]]:
    """Whether ``value`` is a list of non-negative integers (JSON's, so no bools)."""
    return isinstance(value, list) and all(type(item) is int and item >= 0 for item in value)


def check_shapes(
    file_name: str,
    shapes: Mapping[str, Sequence[int]],
    limits: Limits,
    error: type[EngineError],
) -> None:
    """Raise ``error`` naming the file and the tensor for the first shape with more dimensions
    or a longer side than ``limits`` allow."""
    for name, shape in shapes.items():
        if len(shape) > limits.max_rank:
            raise error(
                f"{file_name}: tensor {name!r} has {len(shape)} dimensions {list(shape)}; no "
                f"tensor of {limits.what} has more than {limits.max_rank}"
            )
        if shape and max(shape) > limits.max_side:
            raise error(
                f"{file_name}: tensor {name!r} has shape {list(shape)}; no tensor of "
                f"{limits.what} has a side longer than {limits.max_side}"
            )


def check_tensors(
    file_name: str,
    tensors: Mapping[str, torch.Tensor],
    limits: Limits,
    error: type[EngineError],
) -> None:
    """:func:`check_shapes` on loaded ``tensors``, and refuse one that has more elements than
    its storage holds: a view that repeats stored values (a stride of 0) costs nothing until it
    is copied, and then as much as its shape says. Raises ``error`` naming the file and the
    tensor."""
    check_shapes(file_name, {name: tuple(t.shape) for name, t in tensors.items()}, limits, error)
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > tensor.untyped_storage().nbytes():
            raise error(
                f"{file_name}: tensor {name!r} of shape {list(tensor.shape)} is a view of "
                f"{tensor.untyped_storage().nbytes()} stored bytes passing for {nbytes}; no "
                f"tensor of {limits.what} repeats its values"
            )


def named_tensors(loaded: object) -> dict[str, torch.Tensor]:
    """Every tensor in what ``torch.load`` returned, by its path through the dicts, lists and
    tuples that hold it (``params_ema.conv_first.weight``)."""
    found: dict[str, torch.Tensor] = {}
    pending: list[tuple[str, object]] = [("", loaded)]
    seen: set[int] = set()  # a pickle may nest a container in itself
    while pending:
        path, value = pending.pop()
        if isinstance(value, torch.Tensor):
            found[path] = value
            continue
        if isinstance(value, Mapping):
            items: Iterable[tuple[object, object]] = value.items()
        elif isinstance(value, list | tuple):
            items = enumerate(value)
        else:
            continue
        if id(value) not in seen:
            seen.add(id(value))
            pending.extend((f"{path}.{key}" if path else str(key), item) for key, item in items)
    return found
