"""The CPU fast path: a checkpoint's UNet compiled by inductor with frozen weights, per shape.

Measured on these 2-core CPUs (``../shared/reference/cpu-speed-probe.md``, ``bench/
cpu_fast_path.py``): inductor with *freezing* (weights folded into the graph as constants,
convolutions and linears prepacked for oneDNN) runs a bf16 UNet step 1.6-2x faster than eager;
plain ``torch.compile`` without freezing is slower than eager. Freezing has three costs, and
this module is built around them:

- **Compiling takes minutes** on 2 cores, and again for every new input shape. So nothing is
  compiled inside a request: :class:`FastUNet` runs the eager UNet for any call it has no
  compiled form of, and hands such a call's inputs to a background thread (:class:`Compiler`),
  which compiles that shape once the request is over. Later calls of that shape take the
  compiled form. The compile holds the engine's ``exclusive`` lock, which every engine task
  holds too: PyTorch's tracers patch ``torch.nn.Module.__call__`` for the whole process while
  they trace, so a module run in another thread meanwhile fails. A task that arrives during a
  compile therefore waits for it (once per shape and process). Inductor's kernel cache lives
  under the data directory's cache (``TORCHINDUCTOR_CACHE_DIR``), so a restart compiles again
  but reuses the kernels (the probe: about 89 s cold, 53 s warm).
- **Frozen weights are copies.** A compiled form keeps computing with the weights it saw, so it
  is built from a private copy of the UNet taken while no LoRA was switched on (inductor then
  drops the copy's parameters: ``freezing_discard_parameters``). Only calls of plain requests
  (no LoRA, no ControlNet residuals, no attention scale) take it; the engine decides which
  requests are plain (:meth:`FastUNet.view`), and the call's own arguments are checked again.
- **Memory**: each compiled shape holds its prepacked weights (about the UNet's size: 1.7 GB for
  SD1.5 in bf16, 5 GB for SDXL). At most ``max_shapes`` shapes are compiled per checkpoint; the
  rest run eager.

Every compiled form is checked once against the eager UNet on the call that asked for it; one
whose output differs by more than :data:`MAX_RELATIVE_ERROR` (bf16 rounding is far below) is
dropped and that shape stays eager. A compiled form that would recompile (a guard failed: the
call differs in a way the shape key does not capture) raises instead of compiling on the
request (``fail_on_recompile``), and that shape goes back to eager.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

log = logging.getLogger(__name__)

# Largest |compiled - eager| / max|eager| of a compiled form's first output (bf16 rounding of
# one UNet pass is about 1e-2 of the largest value; a wrong graph is off by order 1).
MAX_RELATIVE_ERROR = 0.05
# Keyword arguments of UNet2DConditionModel.forward that a compiled form takes; any other one
# given a value (ControlNet residuals, attention scale, T2I adapters) sends the call to eager.
_TAKEN = frozenset({"encoder_hidden_states", "added_cond_kwargs", "return_dict"})

ShapeKey = tuple[Any, ...]
Compiled = Callable[..., torch.Tensor]


def use_inductor_cache(cache_dir: Path) -> None:
    """Keep inductor's compiled kernels under ``cache_dir`` (across restarts), unless the
    operator set ``TORCHINDUCTOR_CACHE_DIR`` already."""
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
        added = sorted((self.added_cond_kwargs or {}).items())
        shapes = tuple((name, tuple(v.shape), v.dtype) for name, v in added)
        return (
            tuple(self.sample.shape),
            self.sample.dtype,
            tuple(self.encoder_hidden_states.shape),
            self.encoder_hidden_states.dtype,
            shapes,
        )

    def detached(self) -> UNetCall:
        """A copy that outlives the call (the pipeline reuses its buffers)."""
        added = {k: v.clone() for k, v in (self.added_cond_kwargs or {}).items()} or None
        return UNetCall(
            self.sample.clone(), self.timestep.clone(), self.encoder_hidden_states.clone(), added
        )


def _forward(unet: torch.nn.Module, call: UNetCall) -> torch.Tensor:
    output: torch.Tensor = unet(
        call.sample,
        call.timestep,
        encoder_hidden_states=call.encoder_hidden_states,
        added_cond_kwargs=call.added_cond_kwargs,
        return_dict=False,
    )[0]
    return output


def compile_frozen(unet: torch.nn.Module, call: UNetCall) -> Compiled:
    """``unet`` (a private copy: its parameters are dropped) compiled for ``call``'s shapes by
    inductor with freezing, compiled now by running it once on ``call``."""
    unet.requires_grad_(False)

    def forward(c: UNetCall) -> torch.Tensor:
        return _forward(unet, c)

    # Dynamo keeps its compiled graphs on the code object, at most recompile_limit (8) per
    # code object: one shared by every compile would fall back to eager, silently, from the
    # ninth on. A code object of its own per compile, freed with it.
    forward.__code__ = forward.__code__.replace()
    graphs = counters["stats"]["unique_graphs"]
    compiled = torch.compile(forward, dynamic=False)
    with (
        torch._inductor.config.patch(freezing=True, freezing_discard_parameters=True),
        torch.inference_mode(),
    ):
        compiled(call)
    if counters["stats"]["unique_graphs"] == graphs:
        raise RuntimeError("dynamo compiled no graph of the UNet")
    return compiled


class Compiler:
    """Compiles shapes of one UNet in a background thread, one at a time, at most
    ``max_shapes`` of them; :meth:`ready` gives what has been compiled and checked."""

    def __init__(
        self,
        *,
        max_shapes: int,
        compile_fn: Callable[[torch.nn.Module, UNetCall], Compiled] = compile_frozen,
        name: str = "unet",
        exclusive: threading.RLock | None = None,
    ) -> None:
        self._max_shapes = max_shapes
        self._exclusive = exclusive or threading.RLock()
        self._compile_fn = compile_fn
        self._name = name
        self._lock = threading.Lock()
        self._ready: dict[ShapeKey, Compiled] = {}
        self._asked: set[ShapeKey] = set()  # compiled, being compiled, or given up on
        # A daemon thread: a worker that stops mid-compile exits without waiting for it.
        self._jobs: queue.Queue[tuple[torch.nn.Module, UNetCall, torch.Tensor]] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"compile-{name}", daemon=True)

    def ready(self, key: ShapeKey) -> Compiled | None:
        with self._lock:
            return self._ready.get(key)

    def drop(self, key: ShapeKey) -> None:
        """Stop using the compiled form of ``key`` (it stays counted: not compiled again)."""
        with self._lock:
            self._ready.pop(key, None)

    def offer(self, unet: torch.nn.Module, call: UNetCall, eager_output: torch.Tensor) -> bool:
        """Compile ``call``'s shape in the background if it is new and there is room (True);
        the UNet is copied now (the caller guarantees no LoRA is switched on during its call)."""
        key = call.key
        with self._lock:
            if key in self._asked or len(self._asked) >= self._max_shapes:
                return False
            self._asked.add(key)
            if not self._thread.is_alive():
                self._thread.start()
        self._jobs.put((copy.deepcopy(unet), call.detached(), eager_output.clone()))
        return True

    def idle(self) -> None:
        """Wait until every compile offered so far has finished."""
        self._jobs.join()

    def _work(self) -> None:
        while True:
            unet, call, expected = self._jobs.get()
            try:
                self._build(unet, call, expected)
            finally:
                del unet
                self._jobs.task_done()

    def _build(self, unet: torch.nn.Module, call: UNetCall, expected: torch.Tensor) -> None:
        started = time.monotonic()
        try:
            with self._exclusive:  # no module may run while a tracer patches them all
                compiled = self._compile_fn(unet, call)
                with torch.inference_mode():
                    error = _relative_error(compiled(call), expected)
        except Exception:
            log.exception("compiling %s for %s failed; it stays eager", self._name, call.key)
            return
        if error > MAX_RELATIVE_ERROR:
            log.error(
                "compiled %s for %s is off by %.3g of the eager output; that shape stays eager",
                self._name,
                call.key,
                error,
            )
            return
        with self._lock:
            self._ready[call.key] = compiled
        log.info(
            "compiled %s for %s in %.0f s (off by %.2g of eager)",
            self._name,
            call.key[0],
            time.monotonic() - started,
            error,
        )


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
        compiler.offer(eager, call, result.sample if kwargs.get("return_dict", True) else result[0])
        return result


def _run_compiled(compiled: Compiled, call: UNetCall) -> torch.Tensor | None:
    """The compiled form's output, or None if it would have to compile again."""
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            return compiled(call)
    except Exception:
        log.exception("a compiled UNet refused a call of its shape; that shape goes eager")
        return None


def _as_unet_output(output: torch.Tensor, kwargs: Mapping[str, Any]) -> Any:
    if kwargs.get("return_dict", True):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=output)
    return (output,)
