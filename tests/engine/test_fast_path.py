"""The CPU fast path (dan.engine.generation.compiled): plain requests take the UNet compiled
by inductor with frozen weights once the background compile of their shape is done; images stay
within rounding of the plain path; LoRA requests never take it. The routing rules are tested on
the tiny UNet with stand-in compilers (the seam ``compile_fn``), the real compile once."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from torch._dynamo.utils import counters

from dan.config import Settings
from dan.domain import GenerationRequest, InstalledModel, LoraSpec, ModelKind
from dan.engine.diffusers_engine import DiffusersEngine
from dan.engine.generation.compiled import Compiler, FastUNet, UNetCall, compile_frozen
from tests.fixtures.tiny_lora import write_tiny_lora

CHECKPOINT, LORA = "f" * 64, "e" * 64


def installed(path: Path, sha: str, kind: ModelKind) -> InstalledModel:
    return InstalledModel(kind, path.stem, sha, path, path.stat().st_size)


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=16,
    ).eval()


def unet_inputs(batch: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, size, size, generator=generator)
    hidden = torch.randn(batch, 77, 32, generator=generator)
    return sample, torch.tensor(999, dtype=torch.int64), hidden


def exact(unet: torch.nn.Module, call: UNetCall) -> Any:
    """A stand-in compile: the eager UNet itself."""
    return lambda c: unet(c.sample, c.timestep, encoder_hidden_states=c.encoder_hidden_states)[0]


# --- routing, with stand-in compilers ---------------------------------------------------------


def test_a_shape_is_served_eager_until_its_compiled_form_is_ready() -> None:
    unet = tiny_unet()
    fast = FastUNet(unet, Compiler(max_shapes=2, compile_fn=exact))
    sample, t, hidden = unet_inputs()
    with torch.inference_mode():
        first = fast(sample, t, encoder_hidden_states=hidden).sample
        assert fast.compiled_calls == 0
        fast.compiler.idle()
        second = fast(sample, t, encoder_hidden_states=hidden, return_dict=False)[0]
        eager = unet(sample, t, encoder_hidden_states=hidden).sample
    assert fast.compiled_calls == 1
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(second, eager)


def test_calls_a_compiled_form_cannot_take_stay_eager_and_compile_nothing() -> None:
    unet = tiny_unet()
    fast = FastUNet(unet, Compiler(max_shapes=2, compile_fn=exact))
    sample, t, hidden = unet_inputs()
    with torch.inference_mode():
        fast(sample, t, encoder_hidden_states=hidden, cross_attention_kwargs={"scale": 0.5})
        fast.compiler.idle()
        fast(sample, t, encoder_hidden_states=hidden, cross_attention_kwargs={"scale": 0.5})
    assert fast.compiled_calls == 0
    call = UNetCall.of(sample, t, {"encoder_hidden_states": hidden})
    assert call is not None and fast.compiler.ready(call.key) is None


def test_a_compiled_form_that_disagrees_with_eager_is_never_used() -> None:
    def wrong(unet: torch.nn.Module, call: UNetCall) -> Any:
        return lambda c: exact(unet, call)(c) + 1.0

    fast = FastUNet(tiny_unet(), Compiler(max_shapes=2, compile_fn=wrong))
    sample, t, hidden = unet_inputs()
    with torch.inference_mode():
        fast(sample, t, encoder_hidden_states=hidden)
        fast.compiler.idle()
        fast(sample, t, encoder_hidden_states=hidden)
    assert fast.compiled_calls == 0


def test_at_most_max_shapes_are_compiled() -> None:
    compiled: list[tuple[int, ...]] = []

    def counting(unet: torch.nn.Module, call: UNetCall) -> Any:
        compiled.append(tuple(call.sample.shape))
        return exact(unet, call)

    fast = FastUNet(tiny_unet(), Compiler(max_shapes=2, compile_fn=counting))
    with torch.inference_mode():
        for size in (8, 16, 24, 8):
            sample, t, hidden = unet_inputs(size=size)
            fast(sample, t, encoder_hidden_states=hidden)
        fast.compiler.idle()
    assert compiled == [(2, 4, 8, 8), (2, 4, 16, 16)]


def test_a_compile_that_fails_leaves_the_shape_eager() -> None:
    def broken(unet: torch.nn.Module, call: UNetCall) -> Any:
        raise RuntimeError("inductor failed")

    fast = FastUNet(tiny_unet(), Compiler(max_shapes=2, compile_fn=broken))
    sample, t, hidden = unet_inputs()
    with torch.inference_mode():
        fast(sample, t, encoder_hidden_states=hidden)
        fast.compiler.idle()
        out = fast(sample, t, encoder_hidden_states=hidden).sample
    assert fast.compiled_calls == 0
    assert out.shape == sample.shape


def test_nothing_compiles_while_a_task_holds_the_engine() -> None:
    # PyTorch's tracers patch nn.Module for the whole process: a compile must not overlap a run.
    running, events = threading.RLock(), []

    def slow(unet: torch.nn.Module, call: UNetCall) -> Any:
        events.append("compiling")
        return exact(unet, call)

    fast = FastUNet(tiny_unet(), Compiler(max_shapes=1, compile_fn=slow, exclusive=running))
    sample, t, hidden = unet_inputs()
    with running, torch.inference_mode():  # a task runs: its call offers the shape
        fast(sample, t, encoder_hidden_states=hidden)
        time.sleep(0.2)
        assert events == []
    fast.compiler.idle()
    assert events == ["compiling"]


class Linear(torch.nn.Module):
    """The UNet's call signature around one linear layer: cheap to compile."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)

    def forward(self, sample: Any, t: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        return (self.layer(sample) + t,)


@pytest.mark.slow
def test_every_compile_gets_graphs_of_its_own_past_dynamos_recompile_limit() -> None:
    # Dynamo allows 8 graphs per code object; a ninth compile of a shared one ran eager.
    for _ in range(9):
        module = Linear()
        sample = torch.randn(2, 8)
        call = UNetCall(sample, torch.tensor(1.0), sample, None)
        graphs = counters["stats"]["unique_graphs"]
        compiled = compile_frozen(copy.deepcopy(module), call)
        assert counters["stats"]["unique_graphs"] > graphs, "it ran eager, uncompiled"
        with torch.inference_mode():
            torch.testing.assert_close(compiled(call), module(sample, call.timestep)[0])


# --- the real compile, through the engine -----------------------------------------------------


def request(checkpoint: InstalledModel, **fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "prompt": "a red fox",
        "negative_prompt": "",
        "seed": 7,
        "sampler_name": "Euler a",
        "steps": 3,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
        "model": checkpoint.ref,
    }
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def pixels(images: list[Any]) -> np.ndarray[Any, Any]:
    return np.stack([np.asarray(image, dtype=int) for image in images])


@pytest.mark.slow
def test_plain_requests_take_the_frozen_compiled_unet_and_lora_requests_do_not(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")  # the engine picks the data dir's cache
    # float32: the compiled graph must compute the eager UNet's function to float rounding
    # (in bf16 the tiny random model amplifies rounding; bench/cpu_fast_path.py measures bf16
    # on the full-size architecture).
    settings = Settings(data_dir=tmp_path, device="cpu", dtype="float32", fast_path="compile")  # type: ignore[call-arg]
    engine = DiffusersEngine(settings)
    checkpoint = installed(tiny_checkpoint, CHECKPOINT, ModelKind.CHECKPOINT)
    lora = installed(write_tiny_lora(tmp_path / "fox.safetensors"), LORA, ModelKind.LORA)
    files = {CHECKPOINT: checkpoint, LORA: lora}
    with_lora = request(checkpoint, loras=(LoraSpec(lora.ref, 1.0),))

    def run(r: GenerationRequest) -> Any:
        return pixels(engine.txt2img(r, files, lambda done, total: None))

    plain = run(request(checkpoint))  # eager; its shape is compiled in the background
    lora_before = run(with_lora)
    fast = engine.pipelines.get(checkpoint).fast_unet
    assert isinstance(fast, FastUNet)
    fast.compiler.idle()
    compiled = run(request(checkpoint))
    assert fast.compiled_calls == 3  # every step
    lora_after = run(with_lora)
    assert fast.compiled_calls == 3
    np.testing.assert_array_equal(lora_before, lora_after)
    assert not np.array_equal(plain, lora_before)
    difference = np.abs(compiled - plain)
    assert difference.max() <= 1, difference.max()
    kernels = settings.cache_dir / "inductor"
    assert any(path.is_file() for path in kernels.rglob("*")), "no kernel cached on disk"
