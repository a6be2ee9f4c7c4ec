"""A1111's options, which DAN keeps per caller (dan.accounts.options): what a
``POST /sdapi/v1/options`` body chooses, what a request with
``override_settings_restore_afterwards`` false keeps, and what ``GET /sdapi/v1/options``
answers. DAN acts on three options: the checkpoint, the clip skip and the VAE."""

from __future__ import annotations

from typing import Any

from dan.accounts.options import VAE_WORDS, ChosenOptions
from dan.api.a1111 import answers
from dan.api.a1111.errors import invalid
from dan.api.a1111.schemas import GenerationRequest
from dan.api.a1111.translate import (
    CHECKPOINT,
    CLIP_SKIP,
    VAE,
    check_override_settings,
    checkpoint_reference,
)
from dan.domain import InstalledModel, ModelKind, TaskRecord
from dan.errors import DanError, ModelNotFound
from dan.tasks.order_models import ModelLookup


def chosen_options(body: dict[str, Any], models: ModelLookup) -> ChosenOptions:
    """What ``body`` chooses among the options DAN acts on (it accepts and ignores others),
    every value checked before any is kept. InvalidArgument naming the option."""
    try:
        check_override_settings(body)
    except DanError as exc:  # named as an option here, not as an override
        raise type(exc)(exc.message.replace("override_settings.", "")) from exc
    title, clip_skip = body.get(CHECKPOINT), body.get(CLIP_SKIP)
    return ChosenOptions(
        checkpoint=None if title is None else chosen_checkpoint(title, models).sha256,
        clip_skip=None if clip_skip is None else int(clip_skip),
        vae=None if body.get(VAE) is None else chosen_vae(body[VAE], models),
    )


def chosen_checkpoint(title: str, models: ModelLookup) -> InstalledModel:
    try:
        return models.resolve(ModelKind.CHECKPOINT, checkpoint_reference(title))
    except ModelNotFound as exc:
        raise invalid(CHECKPOINT, exc.message) from exc


def chosen_vae(name: str, models: ModelLookup) -> str:
    """The VAE option ``name`` chooses, as kept: one of A1111's words for the checkpoint's own
    (any case), else an installed VAE's sha256. InvalidArgument naming sd_vae otherwise."""
    word = next((w for w in VAE_WORDS if w.casefold() == name.strip().casefold()), None)
    if word is not None:
        return word
    try:
        return models.resolve(ModelKind.VAE, name).sha256
    except ModelNotFound as exc:
        files = ", ".join(m.path.name for m in models.list(ModelKind.VAE))
        installed = files or "none is installed: put VAE .safetensors files into models/vaes"
        raise invalid(
            VAE, f"must be Automatic, None or an installed VAE ({installed}); got {name!r}"
        ) from exc


def kept_overrides(body: GenerationRequest, record: TaskRecord) -> ChosenOptions | None:
    """With ``override_settings_restore_afterwards`` false, the options the request overrode,
    as its task runs them: A1111 keeps them for later requests (for everyone; DAN for the
    caller). None when there is nothing to keep."""
    if body.override_settings_restore_afterwards:
        return None
    overrides = body.override_settings
    generation = record.params.get("generation", record.params)
    kept = ChosenOptions(
        checkpoint=generation["model"]["sha256"] if overrides.get(CHECKPOINT) else None,
        clip_skip=generation["clip_skip"] if overrides.get(CLIP_SKIP) is not None else None,
        vae=_vae_run(generation, overrides.get(VAE)),
    )
    return None if kept == ChosenOptions() else kept


def _vae_run(generation: dict[str, Any], override: str | None) -> str | None:
    """The VAE option a task ran with, as kept; None when the request did not override it."""
    if override is None:
        return None
    if generation.get("vae"):
        return str(generation["vae"]["sha256"])
    return "None" if override.strip().casefold() == "none" else "Automatic"


def current_options(
    models: ModelLookup, chosen: ChosenOptions, default_model: str | None
) -> dict[str, Any]:
    """``GET /options``: the caller's choices where it made them and they still hold, else
    the defaults (the server's checkpoint, clip skip 1, Automatic)."""
    checkpoint = current_checkpoint(models, chosen.checkpoint, default_model)
    return answers.options(checkpoint, chosen.clip_skip or 1, current_vae(models, chosen.vae))


def current_checkpoint(
    models: ModelLookup, chosen: str | None, default_model: str | None
) -> InstalledModel | None:
    """The checkpoint the caller's requests use when they name none: its own choice while it
    is still available, else the server's default (None when nothing is installed)."""
    if chosen is not None:
        try:
            return models.resolve(ModelKind.CHECKPOINT, chosen)
        except ModelNotFound:
            pass
    try:
        return models.default_checkpoint(default_model)
    except ModelNotFound:
        return None


def current_vae(models: ModelLookup, chosen: str | None) -> str:
    """The VAE option as A1111 answers it: a word, or the chosen VAE's file name (Automatic
    once that file is gone)."""
    if chosen is None or chosen in VAE_WORDS:
        return chosen or VAE_WORDS[0]
    try:
        return models.resolve(ModelKind.VAE, chosen).path.name
    except ModelNotFound:
        return VAE_WORDS[0]
