"""The CPU fast path (dan.engine.generation.compiled, .packages): plain requests take the UNet
compiled by AOTInductor with frozen weights once a child process has built the package of their
shape, other requests running meanwhile; images stay within rounding of the plain path; LoRA
requests never take it; a restart loads the kept package. The routing rules are tested on the
tiny UNet with stand-in builders (the seam ``Builder``), the real build through the engine."""

from __future__ import annotations

import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from dan.config import Settings
from dan.domain import GenerationRequest, InstalledModel, LoraSpec, ModelKind
from dan.engine.diffusers_engine import DiffusersEngine
from dan.engine.generation.compiled import Compiler, FastUNet, UNetCall
from dan.engine.loading.cache import LoadedCheckpoint, PipelineCache
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


class StandIn:
    """A stand-in Builder (the real one, packages.Packages, is tested below): the eager UNet
    itself, ``offset`` added to it (a wrong graph) or ``error`` raised; it records what it
    built and kept. ``kept_keys``: forms an earlier run kept."""

    def __init__(
        self,
        unet: torch.nn.Module,
        *,
        offset: float = 0.0,
        error: Exception | None = None,
        kept_keys: tuple[str, ...] = (),
    ) -> None:
        self.unet, self.offset, self.error = unet, offset, error
        self.kept_keys = list(kept_keys)
        self.built: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.closed = False

    def form(self) -> Any:
        def run(c: UNetCall) -> torch.Tensor:
            out = self.unet(c.sample, c.timestep, encoder_hidden_states=c.encoder_hidden_states)
            return out[0] + self.offset

        return run

    def kept(self) -> list[tuple[str, Any]]:
        return [(key, self.form) for key in self.kept_keys]

    def build(self, call: UNetCall) -> Any:
        self.built.append(call.key)
        self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.form()

    def keep(self, call: UNetCall) -> None:
        self.kept_keys.append(call.key)

    def close(self) -> None:
        self.closed = True


def key_of(sample: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> str:
    call = UNetCall.of(sample, t, {"encoder_hidden_states": hidden})
    assert call is not None
    return call.key


# --- routing, with stand-in compilers ---------------------------------------------------------


def test_a_shape_is_served_eager_until_its_compiled_form_is_ready() -> None:
    unet = tiny_unet()
    builder = StandIn(unet)
    fast = FastUNet(unet, Compiler(builder, max_shapes=2))
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
    assert builder.kept_keys == [key_of(sample, t, hidden)]  # checked: kept for later runs


def test_calls_a_compiled_form_cannot_take_stay_eager_and_compile_nothing() -> None:
    unet = tiny_unet()
    fast = FastUNet(unet, Compiler(StandIn(unet), max_shapes=2))
    sample, t, hidden = unet_inputs()
    with torch.inference_mode():
        fast(sample, t, encoder_hidden_states=hidden, cross_attention_kwargs={"scale": 0.5})
        fast.compiler.idle()
        fast(sample, t, encoder_hidden_states=hidden, cross_attention_kwargs={"scale": 0.5})
    assert fast.compiled_calls == 0
    assert fast.compiler.ready(key_of(sample, t, hidden)) is None


def test_a_compiled_form_that_disagrees_with_eager_is_never_used_nor_kept() -> None:
    unet = tiny_unet()
    builder = StandIn(unet, offset=1.0)
    fast = FastUNet(unet, Compiler(builder, max_shapes=2))
    sample, t, hidden = unet_inputs()
    with torch.inference_mode():
        fast(sample, t, encoder_hidden_states=hidden)
        fast.compiler.idle()
        fast(sample, t, encoder_hidden_states=hidden)
    assert fast.compiled_calls == 0
    assert builder.built and not builder.kept_keys


def test_at_most_max_shapes_are_compiled() -> None:
    unet = tiny_unet()
    builder = StandIn(unet)
    fast = FastUNet(unet, Compiler(builder, max_shapes=2))
    with torch.inference_mode():
        for size in (8, 16, 24, 8):
            sample, t, hidden = unet_inputs(size=size)
            fast(sample, t, encoder_hidden_states=hidden)
        fast.compiler.idle()
    assert builder.built == [key_of(*unet_inputs(size=8)), key_of(*unet_inputs(size=16))]


def test_a_compile_that_fails_leaves_the_shape_eager() -> None:
    unet = tiny_unet()
    fast = FastUNet(unet, Compiler(StandIn(unet, error=RuntimeError("inductor")), max_shapes=2))
    sample, t, hidden = unet_inputs()
    with torch.inference_mode():
        fast(sample, t, encoder_hidden_states=hidden)
        fast.compiler.idle()
        out = fast(sample, t, encoder_hidden_states=hidden).sample
    assert fast.compiled_calls == 0
    assert out.shape == sample.shape


def test_calls_run_eager_while_their_shape_compiles() -> None:
    unet = tiny_unet()
    builder = StandIn(unet)
    builder.gate.clear()  # the compile is under way until the gate opens
    fast = FastUNet(unet, Compiler(builder, max_shapes=1))
    sample, t, hidden = unet_inputs()
    with torch.inference_mode():
        fast(sample, t, encoder_hidden_states=hidden)
        second = fast(sample, t, encoder_hidden_states=hidden).sample
        assert builder.built == [key_of(sample, t, hidden)] and fast.compiled_calls == 0
        builder.gate.set()
        fast.compiler.idle()
        fast(sample, t, encoder_hidden_states=hidden)
    assert fast.compiled_calls == 1
    torch.testing.assert_close(second, unet(sample, t, encoder_hidden_states=hidden).sample)


def test_forms_kept_by_an_earlier_run_serve_from_the_first_call() -> None:
    unet = tiny_unet()
    sample, t, hidden = unet_inputs()
    builder = StandIn(unet, kept_keys=(key_of(sample, t, hidden),))
    fast = FastUNet(unet, Compiler(builder, max_shapes=2, weight_bytes=100))
    fast.compiler.idle()  # loaded in the background at start
    with torch.inference_mode():
        fast(sample, t, encoder_hidden_states=hidden)
    assert fast.compiled_calls == 1 and builder.built == []
    assert fast.compiler.held_bytes == 100


def test_closing_frees_the_compiled_forms_and_stops_compiling() -> None:
    unet = tiny_unet()
    builder = StandIn(unet)
    fast = FastUNet(unet, Compiler(builder, max_shapes=2, weight_bytes=100))
    sample, t, hidden = unet_inputs()
    with torch.inference_mode():
        fast(sample, t, encoder_hidden_states=hidden)
        fast.compiler.idle()
        assert fast.compiler.held_bytes == 100
        fast.compiler.close()
        fast(sample, t, encoder_hidden_states=hidden)
        fast(*unet_inputs(size=16)[:2], encoder_hidden_states=unet_inputs(size=16)[2])
    assert fast.compiler.held_bytes == 0 and builder.closed
    assert fast.compiled_calls == 0 and len(builder.built) == 1


def test_an_evicted_checkpoint_frees_its_compiled_forms(tmp_path: Path) -> None:
    # The cache's budget counts compiled forms; eviction closes them.
    unet = tiny_unet()
    loaded: dict[str, LoadedCheckpoint] = {}

    def load(model: InstalledModel) -> LoadedCheckpoint:
        builder = StandIn(unet, kept_keys=(key_of(*unet_inputs()),))
        fast = FastUNet(unet, Compiler(builder, max_shapes=2, weight_bytes=60))
        fast.compiler.idle()
        entry = LoadedCheckpoint(None, None, 50, None, None, fast)  # type: ignore[arg-type]
        loaded[model.sha256] = entry
        return entry

    cache = PipelineCache(150, load)
    first, second = (installed_at(tmp_path, sha) for sha in ("a" * 64, "b" * 64))
    cache.get(first)
    assert loaded["a" * 64].size_bytes == 110  # its models and one compiled form
    cache.get(second)  # 220 > 150: the first goes
    assert cache.loaded() == ["b" * 64]
    assert loaded["a" * 64].size_bytes == 50
    assert loaded["a" * 64].fast_unet.compiler.ready(key_of(*unet_inputs())) is None


def installed_at(directory: Path, sha: str) -> InstalledModel:
    path = directory / f"{sha[:4]}.safetensors"
    path.write_bytes(b"")
    return installed(path, sha, ModelKind.CHECKPOINT)


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

    plain = run(request(checkpoint))  # eager; a child process compiles its shape
    fast = engine.pipelines.get(checkpoint).fast_unet
    assert isinstance(fast, FastUNet)
    lora_before = run(with_lora)  # runs while the child compiles (it takes many seconds)
    assert fast.compiler.held_bytes == 0, "the compile was done before the LoRA request"
    fast.compiler.idle()
    compiled = run(request(checkpoint))
    assert fast.compiled_calls == 3  # every step
    lora_after = run(with_lora)
    assert fast.compiled_calls == 3
    np.testing.assert_array_equal(lora_before, lora_after)
    assert not np.array_equal(plain, lora_before)
    difference = np.abs(compiled - plain)
    assert difference.max() <= 1, difference.max()
    packages = list((settings.cache_dir / "fastpath" / CHECKPOINT).glob("*.pt2"))
    assert len(packages) == 1, packages
    # Frozen: its convolutions are oneDNN's, on weights prepacked at compile time (inductor
    # freezes only with gradients off; unfrozen, the package ran 1.3x plain, not 1.7x).
    with zipfile.ZipFile(packages[0]) as package:
        wrapper = next(n for n in package.namelist() if n.endswith("wrapper.cpp"))
        assert "mkldnn__convolution_pointwise" in package.read(wrapper).decode()

    # A restart loads the kept package with the checkpoint: compiled from the first request.
    again = DiffusersEngine(settings)
    again.pipelines.get(checkpoint).fast_unet.compiler.idle()
    restarted = pixels(again.txt2img(request(checkpoint), files, lambda done, total: None))
    assert again.pipelines.get(checkpoint).fast_unet.compiled_calls == 3
    np.testing.assert_array_equal(restarted, compiled)
