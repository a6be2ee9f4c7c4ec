"""The CPU fast path: a checkpoint's UNet compiled with frozen weights, per shape.

Measured on these 2-core CPUs (``../shared/reference/cpu-speed-probe.md``, ``bench/
cpu_fast_path.py``): inductor with *freezing* (weights folded into the graph as constants,
convolutions and linears prepacked for oneDNN) runs a bf16 UNet step 1.6-2x faster than eager;
plain ``torch.compile`` without freezing is slower than eager. Freezing has three costs, and
this module is built around them:

- **Compiling takes minutes** on 2 cores, and again for every new input shape. So nothing is
  compiled inside a request: :class:`FastUNet` runs the eager UNet for any call it has no
  compiled form of, and hands such a call's inputs to a background thread (:class:`Compiler`),
  whose :class:`Builder` makes the compiled form (the real one,
  :class:`dan.engine.generation.packages.Packages`, in a child process: tracing in this one
  would stop every task meanwhile). Later calls of that shape take the compiled form. Built
  forms are kept on disk and loaded again at the checkpoint's next load.
- **Frozen weights are copies.** A compiled form keeps computing with the checkpoint's own
  weights, so only calls of plain requests (no LoRA, no ControlNet residuals, no attention
  scale) take it; the engine decides which requests are plain, and the call's own
  arguments are checked again.
- **Memory**: each compiled shape holds its prepacked weights (about the UNet's size: 1.7 GB for
  SD1.5 in bf16, 5 GB for SDXL), counted in the checkpoint's size for the cache's budget. At
  most ``max_shapes`` shapes are compiled per checkpoint; the rest run eager.

Every newly built form is checked once against the eager UNet on the call that asked for it;
one whose output differs by more than :data:`MAX_RELATIVE_ERROR` (bf16 rounding is far below)
is dropped and that shape stays eager.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

# Largest |compiled - eager| / max|eager| of a compiled form's first output (bf16 rounding of
# one UNet pass is about 1e-2 of the largest value; a wrong graph is off by order 1).
MAX_RELATIVE_ERROR = 0.05
# Keyword arguments of UNet2DConditionModel.forward that a compiled form takes; any other one
# given a value (ControlNet residuals, attention scale, T2I adapters) sends the call to eager.
_TAKEN = frozenset({"encoder_hidden_states", "added_cond_kwargs", "return_dict"})

ShapeKey = str
Compiled = Callable[["UNetCall"], torch.Tensor]


def use_inductor_cache(cache_dir: Path) -> None:
    """Keep inductor's compiled kernels under ``cache_dir`` (across restarts), unless the
    operator set ``TORCHINDUCTOR_CACHE_DIR`` already (compiling children inherit it)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))


@dataclass(frozen=True)
class UNetCall:
    """One UNet call's tensors, in the form a compiled UNet takes them."""

    sample: torch.Tensor
    timestep: torch.Tensor  # 0-d float32: schedulers give int64 or float32 time steps
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None

    @classmethod
    def of(cls, sample: Any, timestep: Any, kwargs: Mapping[str, Any]) -> UNetCall | None:
        """The call, or None when a compiled form cannot take it (see ``_TAKEN``)."""
        if any(v is not None and k not in _TAKEN for k, v in kwargs.items()):
            return None
        hidden = kwargs.get("encoder_hidden_states")
        added = kwargs.get("added_cond_kwargs")
        if not isinstance(hidden, torch.Tensor) or not isinstance(sample, torch.Tensor):
            return None
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim != 0:
            return None  # per-sample time steps: not what pipelines send
        return cls(sample, t.to(torch.float32), hidden, dict(added) if added else None)

    @property
    def key(self) -> ShapeKey:
        """What a compiled form is specialised on: shapes and dtypes of every input."""
        tensors = [("sample", self.sample), ("hidden", self.encoder_hidden_states)]
        tensors += sorted((self.added_cond_kwargs or {}).items())
        return ", ".join(f"{name} {_shape(value)}" for name, value in tensors)

    def detached(self) -> UNetCall:
        """A copy that outlives the call (the pipeline reuses its buffers)."""
        added = {k: v.clone() for k, v in (self.added_cond_kwargs or {}).items()} or None
        return UNetCall(
            self.sample.clone(), self.timestep.clone(), self.encoder_hidden_states.clone(), added
        )


def _shape(tensor: torch.Tensor) -> str:
    dims = "x".join(str(d) for d in tensor.shape)
    return f"{dims} {str(tensor.dtype).removeprefix('torch.')}"


class Builder(Protocol):
    """Makes the compiled forms of one UNet (the real one: packages.Packages)."""

    def kept(self) -> Iterable[tuple[ShapeKey, Callable[[], Compiled]]]:
        """Forms built and checked before (by an earlier run), with a loader of each."""
        ...

    def build(self, call: UNetCall) -> Compiled:
        """The compiled form of ``call``'s shapes (minutes); raises when it cannot be made."""
        ...

    def keep(self, call: UNetCall) -> None:
        """The form built for ``call`` agreed with the eager UNet: offer it to later runs."""
        ...

    def close(self) -> None:
        """Stop any build under way."""
        ...


@dataclass(frozen=True)
class _Build:
    call: UNetCall
    expected: torch.Tensor  # the eager UNet's output for ``call``


@dataclass(frozen=True)
class _Load:
    key: ShapeKey
    load: Callable[[], Compiled]


class Compiler:
    """Compiles shapes of one UNet in a background thread, one at a time, at most
    ``max_shapes`` of them; :meth:`ready` gives what has been compiled and checked. Forms kept
    by an earlier run are loaded first, in the same thread."""

    def __init__(
        self,
        builder: Builder,
        *,
        max_shapes: int,
        name: str = "unet",
        weight_bytes: int = 0,
    ) -> None:
        self._builder = builder
        self._max_shapes = max_shapes
        self._name = name
        self._weight_bytes = weight_bytes  # what one compiled form holds
        self._lock = threading.Lock()
        self._ready: dict[ShapeKey, Compiled] = {}
        self._asked: set[ShapeKey] = set()  # compiled, being compiled, or given up on
        self._closed = False
        # A daemon thread: a worker that stops mid-compile exits without waiting for it.
        self._jobs: queue.Queue[_Build | _Load | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"compile-{name}", daemon=True)
        for key, load in itertools.islice(builder.kept(), max_shapes):
            self._asked.add(key)
            self._jobs.put(_Load(key, load))
        if self._asked:
            self._thread.start()

    @property
    def held_bytes(self) -> int:
        """The memory the compiled forms hold, about."""
        with self._lock:
            return len(self._ready) * self._weight_bytes

    def ready(self, key: ShapeKey) -> Compiled | None:
        with self._lock:
            return self._ready.get(key)

    def drop(self, key: ShapeKey) -> None:
        """Stop using the compiled form of ``key`` (it stays counted: not compiled again)."""
        with self._lock:
            self._ready.pop(key, None)

    def offer(self, call: UNetCall, eager_output: torch.Tensor) -> bool:
        """Compile ``call``'s shape in the background if it is new and there is room (True)."""
        key = call.key
        with self._lock:
            if self._closed or key in self._asked or len(self._asked) >= self._max_shapes:
                return False
            self._asked.add(key)
            if not self._thread.is_alive():
                self._thread.start()
        self._jobs.put(_Build(call.detached(), eager_output.clone()))
        return True

    def idle(self) -> None:
        """Wait until every compile offered so far has finished."""
        self._jobs.join()

    def close(self) -> None:
        """Free the compiled forms and stop compiling (the checkpoint was unloaded)."""
        with self._lock:
            self._closed = True
            self._ready.clear()
        self._builder.close()
        self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if isinstance(job, _Load):
                    self._load(job)
                else:
                    self._build(job)
            finally:
                self._jobs.task_done()

    def _load(self, job: _Load) -> None:
        try:
            compiled = job.load()
        except Exception:
            log.exception(
                "loading the compiled %s for %s failed; it stays eager", self._name, job.key
            )
            return
        self._use(job.key, compiled)
        log.info("loaded the compiled %s for %s", self._name, job.key)

    def _build(self, job: _Build) -> None:
        started = time.monotonic()
        key = job.call.key
        try:
            compiled = self._builder.build(job.call)
            with torch.inference_mode():
                error = _relative_error(compiled(job.call), job.expected)
        except Exception:
            if not self._closed:
                log.exception("compiling %s for %s failed; it stays eager", self._name, key)
            return
        if error > MAX_RELATIVE_ERROR:
            log.error(
                "compiled %s for %s is off by %.3g of the eager output; that shape stays eager",
                self._name,
                key,
                error,
            )
            return
        self._builder.keep(job.call)
        self._use(key, compiled)
        log.info(
            "compiled %s for %s in %.0f s (off by %.2g of eager)",
            self._name,
            key,
            time.monotonic() - started,
            error,
        )

    def _use(self, key: ShapeKey, compiled: Compiled) -> None:
        with self._lock:
            if not self._closed:
                self._ready[key] = compiled


def _relative_error(output: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().float().clamp_min(1e-6)
    return float((output.float() - expected.float()).abs().max() / scale)


class FastUNet(torch.nn.Module):
    """Stands in for a UNet in the pipelines of plain requests: each call takes the compiled
    form of its shape when there is one, else runs ``unet`` and offers the shape to the
    compiler. Everything else (config, dtype, device, ...) is ``unet``'s."""

    def __init__(self, unet: torch.nn.Module, compiler: Compiler) -> None:
        super().__init__()
        # Not a submodule: its parameters stay counted once, in the pipeline's own UNet.
        object.__setattr__(self, "_eager", unet)
        object.__setattr__(self, "_compiler", compiler)
        self.compiled_calls = 0  # calls that took a compiled form

    @property
    def eager(self) -> torch.nn.Module:
        """The UNet this stands in for."""
        eager: torch.nn.Module = object.__getattribute__(self, "_eager")
        return eager

    @property
    def compiler(self) -> Compiler:
        compiler: Compiler = object.__getattribute__(self, "_compiler")
        return compiler

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_eager"), name)

    def forward(self, sample: Any, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        eager: torch.nn.Module = object.__getattribute__(self, "_eager")
        compiler: Compiler = object.__getattribute__(self, "_compiler")
        call = None if args else UNetCall.of(sample, timestep, kwargs)
        if call is None:
            return eager(sample, timestep, *args, **kwargs)
        compiled = compiler.ready(call.key)
        if compiled is not None:
            output = _run_compiled(compiled, call)
            if output is not None:
                self.compiled_calls += 1
                return _as_unet_output(output, kwargs)
            compiler.drop(call.key)
        result = eager(sample, timestep, **kwargs)
        compiler.offer(call, result.sample if kwargs.get("return_dict", True) else result[0])
        return result


def _run_compiled(compiled: Compiled, call: UNetCall) -> torch.Tensor | None:
    """The compiled form's output, or None if it failed."""
    try:
        return compiled(call)
    except Exception:
        log.exception("a compiled UNet refused a call of its shape; that shape goes eager")
        return None


def _as_unet_output(output: torch.Tensor, kwargs: Mapping[str, Any]) -> Any:
    if kwargs.get("return_dict", True):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=output)
    return (output,)
