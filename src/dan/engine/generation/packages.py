"""Compiled UNets as AOTInductor packages on disk, each built by a child process.

Why a child process: PyTorch's tracers (dynamo, export) patch ``torch.nn.Module.__call__`` for
the whole process while they trace, so a compile inside the worker would stop every task for
the minute or two it takes. The child (:mod:`dan.engine.generation.export_unet`) loads the
checkpoint from its file itself, compiles the UNet for one call's shapes and writes a ``.pt2``
package; the worker only loads packages (no tracing) and runs them, its tasks running on the
plain path meanwhile.

Packages live under ``<cache dir>/fastpath/<checkpoint sha256>/``, named by everything a package
is specialised on: the call's shapes and dtypes, the torch version, and the CPU's instruction
set (code compiled for AMX does not run on a CPU without it). A package is written atomically;
once it agreed with the eager UNet the worker writes a ``.json`` beside it (:meth:`keep`), and
kept packages of a checkpoint are loaded when it is next loaded, so a restart serves compiled
at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dan.engine.generation.compiled import Compiled, ShapeKey, UNetCall
from dan.engine.generation.export_unet import call_arguments
from dan.pids import alive

log = logging.getLogger(__name__)

FORMAT = 2  # of the packages and their notes: bumped when either changes meaning
BUILD_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class UNetSource:
    """The checkpoint file a child loads the UNet from, as the worker loaded it."""

    path: Path
    sha256: str
    dtype: torch.dtype
    allow_ckpt: bool
    cache_dir: Path  # the loader's config folders


def fingerprint() -> str:
    """What a package compiled here depends on besides its checkpoint and shapes: the vector
    instruction set inductor compiles its kernels for (``avx512 avx512_vnni amx_tile`` on an
    AMX Xeon; torch's own ``get_cpu_capability`` says ``AVX512`` there and on CPUs without AMX,
    where such a package would die on an illegal instruction)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return f"format {FORMAT}, torch {torch.__version__}, cpu {pick_vec_isa()}"


class Packages:
    """The compiled UNet packages of one checkpoint: built by child processes, kept on disk."""

    def __init__(self, source: UNetSource, directory: Path, timeout_s: float = BUILD_TIMEOUT_S):
        self._source = source
        self._directory = directory / source.sha256
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._closed = False

    def kept(self) -> Iterator[tuple[ShapeKey, Callable[[], Compiled]]]:
        """The shapes compiled and checked by an earlier run on this machine, with a loader
        of each one's package."""
        if self._directory.is_dir():
            _remove_abandoned(self._directory)
        here = fingerprint()
        for note_path in sorted(self._directory.glob("*.json")):
            try:
                note = json.loads(note_path.read_text())
            except (OSError, ValueError):
                continue
            package = note_path.with_suffix(".pt2")
            if note.get("fingerprint") == here and package.is_file():
                yield note["key"], _loader(package)

    def build(self, call: UNetCall) -> Compiled:
        """The compiled form of ``call``'s shapes: its package from an earlier build, or one
        built now by a child process (minutes). Raises RuntimeError when the child fails."""
        package = self._package(call.key)
        if not package.is_file():
            self._run_child(call, package)
        return _loader(package)()

    def keep(self, call: UNetCall) -> None:
        """The package of ``call``'s shapes agreed with the eager UNet: load it on later runs."""
        note = {"key": call.key, "fingerprint": fingerprint(), "checkpoint": self._source.path.name}
        self._package(call.key).with_suffix(".json").write_text(json.dumps(note, indent=1))

    def close(self) -> None:
        """Stop the child building now, if any; no other starts."""
        with self._lock:
            self._closed = True
            if self._child is not None:
                self._child.kill()

    def _package(self, key: ShapeKey) -> Path:
        digest = hashlib.sha256(f"{key} | {fingerprint()}".encode()).hexdigest()[:24]
        return self._directory / f"{digest}.pt2"

    def _run_child(self, call: UNetCall, package: Path) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(self._directory)
        with tempfile.TemporaryDirectory(dir=self._directory) as tmp:
            inputs = Path(tmp) / "call.pt"
            torch.save(_saved(call), inputs)
            source = self._source
            job = {
                "checkpoint": str(source.path),
                "dtype": str(source.dtype).removeprefix("torch."),
                "allow_ckpt": source.allow_ckpt,
                "cache_dir": str(source.cache_dir),
                "inputs": str(inputs),
                "out": str(package),
                "parent": os.getpid(),
            }
            command = [sys.executable, "-m", "dan.engine.generation.export_unet", json.dumps(job)]
            with self._lock:
                if self._closed:
                    raise RuntimeError("closed")
                child = self._child = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
            try:
                _, errors = child.communicate(timeout=self._timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                raise RuntimeError(f"compiling took over {self._timeout_s:.0f} s") from None
            finally:
                with self._lock:
                    self._child = None
            if child.returncode != 0:
                tail = errors.decode(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"the compile exited {child.returncode}: " + " / ".join(tail))


def _remove_abandoned(directory: Path) -> None:
    """Delete partial packages whose compiling process is gone (killed as it wrote them)."""
    for partial in directory.glob("*.partial.pt2"):
        pid = partial.name.split(".")[-3]
        if pid.isdigit() and not alive(int(pid)):
            partial.unlink(missing_ok=True)


def _saved(call: UNetCall) -> dict[str, object]:
    return {
        "sample": call.sample,
        "timestep": call.timestep,
        "encoder_hidden_states": call.encoder_hidden_states,
        "added_cond_kwargs": call.added_cond_kwargs,
    }


def _loader(package: Path) -> Callable[[], Compiled]:
    def load() -> Compiled:
        model = torch._inductor.aoti_load_package(str(package))

        def run(call: UNetCall) -> torch.Tensor:
            # A package computes on the memory layout it was exported with.
            contiguous = UNetCall(
                call.sample.contiguous(),
                call.timestep,
                call.encoder_hidden_states.contiguous(),
                call.added_cond_kwargs,
            )
            args, kwargs = call_arguments(_saved(contiguous))
            output: torch.Tensor = model(*args, **kwargs)
            return output

        return run

    return load
