"""Stable Diffusion 1.x single-file checkpoints (the AUTOMATIC1111 layout), loaded offline.

A checkpoint is read once. Its architecture is read from tensor shapes
(:mod:`dan.engine.loading.architecture.sd15`), so a fine-tune, an inpainting model and the tiny test
models all take the same path: read the architecture -> convert with diffusers' LDM converters ->
load into empty modules with a strict key check. The architecture's configs are also written as a
diffusers config folder (no weights) under ``cache_dir/configs/<digest>/``, from which the tokenizer
and scheduler load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dan.engine.loading.architecture.sd15 import (
    CONFIG_FILES,
    Sd1Architecture,
    clip_prefix,
    read_sd1_architecture,
)
from dan.engine.loading.pickles import check_pickle
from dan.engine.loading.shapes import Limits, check_shapes, check_tensors, safetensors_shapes
from dan.engine.loading.tokenizer import EOS, ensure_tokenizer
from dan.errors import EngineError, UnsupportedCheckpoint

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

# Sd1Architecture and read_sd1_architecture are re-exported: load_sd_pipeline returns the one and
# runs the other, so callers of this module need not know where architecture reading lives.
StateDict = dict[str, torch.Tensor]
PICKLE_SUFFIXES = (".ckpt", ".pt")
# No tensor of an SD 1.x or SDXL file that read_state_dict reads (checkpoints, LoRAs, VAEs) has
# more than 4 dimensions (convolutions) or a side longer than CLIP's 49408-token vocabulary; the
# bound leaves room for larger vocabularies and wider layers, and keeps a config read from
# shapes from asking for terabytes.
CHECKPOINT_LIMITS = Limits(
    "an SD 1.x or SDXL checkpoint, LoRA or VAE", max_rank=4, max_side=1 << 17
)

log = logging.getLogger(__name__)


# --- reading -------------------------------------------------------------------------------


def read_state_dict(path: Path, *, allow_ckpt: bool) -> StateDict:
    """The tensors of a ``.safetensors`` file, or of a pickled ``.ckpt``/``.pt`` if allowed.

    ``{"state_dict": ...}`` wrappers are unwrapped and non-tensor entries dropped. A
    ``.safetensors`` file's header is checked before any tensor is loaded (see
    :mod:`dan.engine.loading.shapes`), a pickled file's storages before it is unpickled (see
    :mod:`dan.engine.loading.pickles`), and its shapes before any tensor is copied. Raises
    UnsupportedCheckpoint, naming the file, for a pickled file when ``allow_ckpt`` is false, an
    unknown suffix, a file that cannot be read (truncated, corrupt, not a state dict) and one
    declaring more than it holds or shapes no Stable Diffusion checkpoint has.
    """
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        raw: object = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        if not allow_ckpt:
            raise UnsupportedCheckpoint(
                f"{path.name} is a pickled checkpoint and loading one runs code stored in it; "
                "convert it to .safetensors, or set DAN_ALLOW_CKPT=1 if you trust this file"
            )
        raw = _read_pickle(path)
    else:
        raise UnsupportedCheckpoint(
            f"{path.name}: unknown checkpoint format {suffix!r}; use .safetensors (or .ckpt)"
        )
    tensors = _tensors_of(raw, path)
    check_tensors(path.name, tensors, CHECKPOINT_LIMITS, UnsupportedCheckpoint)
    return tensors


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    shapes = safetensors_shapes(path, UnsupportedCheckpoint)
    check_shapes(path.name, shapes, CHECKPOINT_LIMITS, UnsupportedCheckpoint)
    try:
        tensors: StateDict = load_file(path, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise UnsupportedCheckpoint(
            f"{path.name} cannot be read as safetensors (truncated or corrupt?): {exc}"
        ) from exc
    return tensors


def _read_pickle(path: Path) -> object:
    """Unpickle, ``weights_only`` first; the caller has already chosen to trust the file, but
    not to let a broken one declare more than it holds (see :func:`check_pickle`)."""
    try:
        check_pickle(path, UnsupportedCheckpoint)
    except (ValueError, OSError) as exc:
        raise UnsupportedCheckpoint(
            f"{path.name} cannot be unpickled (truncated or corrupt?): {exc}"
        ) from exc
    error: Exception | None = None
    # Training checkpoints often pickle objects that weights_only refuses (Lightning callbacks,
    # numpy scalars), so its failure is not yet a verdict on the file.
    for weights_only in (True, False):
        if not weights_only:
            log.warning(
                "%s holds more than tensors (%s); unpickling it in full, as DAN_ALLOW_CKPT "
                "allows: this runs whatever code the file carries",
                path.name,
                error,
            )
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as exc:  # unpickling raises whatever the pickled code raises
            error = exc
    raise UnsupportedCheckpoint(
        f"{path.name} cannot be unpickled (truncated or corrupt?): {error}"
    ) from error


def _tensors_of(raw: object, path: Path) -> StateDict:
    while isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise UnsupportedCheckpoint(f"{path.name} holds a {type(raw).__name__}, not a state dict")
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise UnsupportedCheckpoint(f"{path.name} holds no tensors")
    return tensors


# --- config folder -------------------------------------------------------------------------


def write_config_folder(architecture: Sd1Architecture, cache_dir: Path) -> Path:
    """A diffusers config folder (configs + tokenizer, no weights) for ``architecture``.

    It lives at ``cache_dir/configs/<digest>/``, is written atomically (temp dir + rename) and
    reused when present. ``StableDiffusionPipeline.from_single_file(..., config=folder)``
    accepts it too. Raises EngineError when it cannot be written.
    """
    files = {CONFIG_FILES[name]: config for name, config in architecture.config_files().items()}
    return write_configs(architecture.digest, files, {"tokenizer": EOS}, cache_dir)


def write_configs(
    digest: str, files: Mapping[str, dict[str, Any]], tokenizers: Mapping[str, str], cache_dir: Path
) -> Path:
    """The config folder ``cache_dir/configs/<digest>/``: ``files`` (relative path -> config)
    written as JSON, and one CLIP tokenizer folder per entry of ``tokenizers`` (folder name ->
    padding token). Written atomically and reused when present; raises EngineError when it
    cannot be written."""
    target = cache_dir / "configs" / digest
    if target.is_dir():
        return target
    sources = {name: ensure_tokenizer(cache_dir, pad) for name, pad in tokenizers.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        for relative, config in files.items():
            file = staging / relative
            file.parent.mkdir(exist_ok=True)
            file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
        for name, source in sources.items():
            shutil.copytree(source, staging / name)
        os.replace(staging, target)
    except OSError as exc:
        if not target.is_dir():  # else another process wrote the same folder first
            raise EngineError(f"cannot write the config folder {target}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --- loading -------------------------------------------------------------------------------


def load_sd_pipeline(
    path: Path,
    *,
    cache_dir: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    allow_ckpt: bool,
) -> tuple[StableDiffusionPipeline, Sd1Architecture]:
    """A StableDiffusionPipeline for the SD1.x checkpoint at ``path``, and its architecture.

    The models are on ``device`` in ``dtype``, in eval mode, without gradients; there is no
    safety checker. For ``variant == "sd1-inpaint"`` the UNet takes 9 channels: wrap the
    components in StableDiffusionInpaintPipeline. Nothing is downloaded. Raises
    UnsupportedCheckpoint for anything wrong with the file, EngineError when the config folder
    cannot be written.
    """
    state_dict = read_state_dict(path, allow_ckpt=allow_ckpt)
    try:
        return sd_pipeline_of(state_dict, cache_dir=cache_dir, dtype=dtype, device=device)
    except UnsupportedCheckpoint as exc:
        raise UnsupportedCheckpoint(f"{path.name}: {exc.message}") from exc


def sd_pipeline_of(
    state_dict: StateDict, *, cache_dir: Path, dtype: torch.dtype, device: torch.device | str
) -> tuple[StableDiffusionPipeline, Sd1Architecture]:
    """:func:`load_sd_pipeline` on a state dict already read (errors do not name the file)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    architecture = read_sd1_architecture(state_dict)
    unet, vae, text_encoder = _load_models(state_dict, architecture, dtype, torch.device(device))
    folder = write_config_folder(architecture, cache_dir)
    pipeline: Any = StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet,
        scheduler=PNDMScheduler.from_pretrained(folder, subfolder="scheduler"),  # type: ignore[no-untyped-call]
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)  # progress is reported through callbacks
    return pipeline, architecture


def _load_models(
    state_dict: StateDict, architecture: Sd1Architecture, dtype: torch.dtype, device: torch.device
) -> tuple[Any, Any, Any]:
    """UNet, VAE and text encoder holding the checkpoint's tensors, in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    # diffusers ships types but leaves these functions unannotated, hence the ignores.
    with converting("UNet"):
        unet_weights = convert_ldm_unet_checkpoint(state_dict, architecture.unet)  # type: ignore[no-untyped-call]
    with converting("VAE"):
        vae_weights = convert_ldm_vae_checkpoint(state_dict, architecture.vae)  # type: ignore[no-untyped-call]
    text_config = CLIPTextConfig.from_dict(architecture.text_encoder)
    return (
        load_module(
            lambda: UNet2DConditionModel.from_config(architecture.unet),  # type: ignore[no-untyped-call]
            unet_weights,
            "UNet",
            dtype,
            device,
        ),
        load_module(
            lambda: AutoencoderKL.from_config(architecture.vae),  # type: ignore[no-untyped-call]
            vae_weights,
            "VAE",
            dtype,
            device,
        ),
        load_module(
            lambda: CLIPTextModel(text_config),
            _text_encoder_weights(state_dict),
            "text encoder",
            dtype,
            device,
        ),
    )


@contextlib.contextmanager
def converting(what: str) -> Iterator[None]:
    """Turn what diffusers' LDM converters raise for tensors of unexpected shapes (they index,
    reshape and split them) into UnsupportedCheckpoint naming ``what``."""
    try:
        yield
    except (IndexError, KeyError, RuntimeError, ValueError) as exc:
        raise UnsupportedCheckpoint(
            f"the {what} tensors cannot be converted to diffusers' layout "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _text_encoder_weights(state_dict: StateDict) -> StateDict:
    # transformers >= 5.6 names CLIPTextModel's tensors without the ``text_model.`` level, and
    # position_ids is a non-persistent buffer that old checkpoints still carry.
    prefix = clip_prefix(state_dict)
    return {
        k[len(prefix) :]: v
        for k, v in state_dict.items()
        if k.startswith(prefix) and not k.endswith("position_ids")
    }


def load_module(
    build: Callable[[], torch.nn.Module],
    weights: Mapping[str, Any],
    what: str,
    dtype: torch.dtype,
    device: torch.device | str,
    error: type[EngineError] = UnsupportedCheckpoint,
) -> torch.nn.Module:
    """The module ``build`` makes, holding ``weights`` in ``dtype`` on ``device``, in eval mode.

    ``build`` runs first on the meta device, where nothing is allocated, and ``weights`` must
    hold exactly that module's tensors with their shapes; otherwise ``error`` is raised, its
    message naming ``what`` and the missing, unexpected or misshapen tensors. Only then is the
    module built empty (accelerate's ``init_empty_weights``, which still allocates each
    parameter for a moment): a config read from a hostile file's shapes never gets to ask for
    terabytes, since every parameter it asks for is one the file holds.
    """
    from accelerate import init_empty_weights

    weights = {k: v for k, v in weights.items() if v is not None}  # converters .get() absent keys
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    except (ValueError, RuntimeError) as exc:  # e.g. a width no norm group count divides
        raise error(f"the {what} architecture read from the file cannot be built: {exc}") from exc
    _check_weights(expected, weights, what, error)
    with init_empty_weights():
        module = build()
    # Cast tensor by tensor: diffusers' Module.to(dtype) logs a spurious warning on every call.
    weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    try:
        module.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:  # what _check_weights let through (it should not)
        raise error(f"the {what} tensors do not fit: {exc}") from exc
    # Non-persistent buffers (CLIP's position_ids) were not in the file; move them too.
    return module.to(device).eval().requires_grad_(False)


def _check_weights(
    expected: Mapping[str, tuple[int, ...]],
    weights: Mapping[str, Any],
    what: str,
    error: type[EngineError],
) -> None:
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise error(
            f"the {what} tensors do not match the architecture read from the file "
            f"({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    misshapen = [k for k in sorted(expected) if not _fits(tuple(weights[k].shape), expected[k])]
    if misshapen:
        first = misshapen[0]
        raise error(
            f"the {what} tensors do not fit the architecture read from the file: {first} is "
            f"{list(weights[first].shape)} where the architecture has {list(expected[first])}"
            f" ({len(misshapen)} tensors of the wrong shape)"
        )


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    # torch loads a one-element 1-d tensor into a 0-d parameter (an old checkpoints' habit).
    return shape == expected or (expected == () and shape == (1,))
