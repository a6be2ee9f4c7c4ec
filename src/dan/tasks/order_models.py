"""The models an order names, resolved to installed files: the request builder's lookups.

Every model an order names (checkpoint, VAE, LoRAs, also those a prompt's ``<lora:...>`` tags
name, embeddings its prompts use, the ControlNet for its checkpoint's family, model upscalers,
the files of an interrogator or the OpenPose body model) is resolved to the sha256 of an
installed file when the order is submitted. A name that resolves to nothing is refused there,
naming the field and what to install (or the command that installs it), and never becomes a
failed task.
"""

from __future__ import annotations

from typing import Protocol

from dan.config import Settings
from dan.domain import (
    IMAGE_UPSCALERS,
    LATENT_UPSCALERS,
    OPENPOSE_BODY_MODEL,
    GenerationRequest,
    InstalledModel,
    ModelFamily,
    ModelKind,
    ModelRef,
    UpscalerChoice,
    family_of,
)
from dan.errors import InvalidArgument, ModelNotFound, ResourceUnavailable
from dan.prompt_tags import extract_lora_tags
from dan.tasks.order_checks import Lora, check_controlnet_family, pull_name, uses_word
from dan.tasks.orders import GenerationOrder

CHECKPOINT_VAE = ("", "automatic", "none")  # A1111's sd_vae values for the checkpoint's own


class ModelLookup(Protocol):
    """What orders need of the model registry."""

    def resolve(self, kind: ModelKind, ref: str) -> InstalledModel: ...

    def default_checkpoint(self, preferred: str | None) -> InstalledModel | None: ...

    def list(self, kind: ModelKind) -> list[InstalledModel]: ...


class OrderModels(ModelLookup, Protocol):
    """What building orders needs beyond lookups: the models installed on this server."""

    def installed_here(self, kind: ModelKind) -> list[InstalledModel]:
        """The models of ``kind`` in this server's own models folder (none a node reports)."""
        ...


class ModelResolution:
    """The model lookups of RequestBuilder (see the module docstring)."""

    _models: OrderModels
    _settings: Settings

    def _interrogator_file(self, model: str, name: str) -> ModelRef:
        try:
            return self._models.resolve(ModelKind.INTERROGATOR, name).ref
        except ModelNotFound as exc:
            raise ResourceUnavailable(
                f"the {model} interrogator needs {name}, which is not installed on this server; "
                f"an administrator can download it with `dan models pull {name}`"
            ) from exc

    def _vae(self, name: str | None) -> ModelRef | None:
        """The VAE file ``name`` names; None for the checkpoint's own (A1111's "Automatic"
        and "None" included)."""
        if name is None or name.strip().lower() in CHECKPOINT_VAE:
            return None
        try:
            return self._models.resolve(ModelKind.VAE, name).ref
        except ModelNotFound as exc:
            raise ModelNotFound(
                f"Invalid vae: {exc.message}; put VAE .safetensors files into models/vaes, or "
                "leave vae out for the checkpoint's own"
            ) from exc

    def _embeddings(self, order: GenerationOrder, family: ModelFamily) -> tuple[ModelRef, ...]:
        """The embeddings installed here, of the checkpoint's family, whose names either
        prompt uses as a word (A1111 matches embedding names in the prompt; case does not
        matter). Never one only a node reports: a node naming its file "cat" would otherwise
        make every prompt with that word need its file, so that only its own nodes could run
        them."""
        text = f"{order.prompt}\n{order.negative_prompt}".casefold()
        return tuple(
            model.ref
            for model in self._models.installed_here(ModelKind.EMBEDDING)
            if family_of(model) == family
            and model.name.casefold() in text  # cheap before the word match
            and uses_word(text, model.name)
        )

    def _family(self, request: GenerationRequest) -> ModelFamily:
        """The family of the request's checkpoint (resolved already: a lookup by sha256)."""
        checkpoint = self._models.resolve(ModelKind.CHECKPOINT, request.model.sha256)
        return family_of(checkpoint)

    def _pose_model(self, preprocess: str) -> ModelRef | None:
        """The OpenPose body model for an openpose preprocess, when installed (the worker
        falls back to mediapipe's bundled pose model without it)."""
        if preprocess != "openpose":
            return None
        try:
            return self._models.resolve(ModelKind.ANNOTATOR, OPENPOSE_BODY_MODEL).ref
        except ModelNotFound:
            return None

    def _controlnet_file(self, name: str, checkpoint: InstalledModel) -> InstalledModel:
        """The file serving the API ControlNet ``name`` on ``checkpoint``: the ControlNet of
        ``name``'s kind (canny, openpose) for the checkpoint's family, the catalog's file (alias
        ``<family>_<kind>``) else a file named ``control_<family>_<kind>.*`` (fine-tuned or
        converted files). Raises ModelNotFound when none is installed, InvalidArgument when the
        file found is of another family than the checkpoint's."""
        family = family_of(checkpoint)
        wanted = f"{family.value}_{name.partition('_')[2]}"  # sd15_canny, sdxl_canny, ...
        for ref in (wanted, f"control_{wanted}"):
            try:
                model = self._models.resolve(ModelKind.CONTROLNET, ref)
            except ModelNotFound:
                continue
            check_controlnet_family(model, checkpoint, wanted)
            return model
        raise ModelNotFound(
            f"Invalid control_net.0.model: no ControlNet file serves {name} on {checkpoint.name}"
            f", an {family.value} checkpoint; it needs the {wanted} ControlNet: put "
            f"control_{wanted}.safetensors into models/controlnet, or run "
            f"`dan models pull {pull_name(wanted)}`"
        )

    def _checkpoint(self, ref: str | None) -> InstalledModel:
        if ref is not None:
            try:
                return self._models.resolve(ModelKind.CHECKPOINT, ref)
            except ModelNotFound as exc:
                raise ModelNotFound(f"Invalid model: {exc.message}") from exc
        model = self._models.default_checkpoint(self._settings.default_model)
        if model is None:
            raise ResourceUnavailable(
                "no checkpoint is installed and no online node has a catalog checkpoint; name "
                "one with `model` (see /api/sd/supportedModelInfo), put a .safetensors file in "
                "the models/checkpoints folder, run `dan models pull chillout_mix`, or set "
                "DAN_DEFAULT_MODEL to a checkpoint's sha256"
            )
        return model

    def _loras(self, pairs: tuple[tuple[str, float], ...]) -> tuple[Lora, ...]:
        specs = []
        for index, (ref, weight) in enumerate(pairs):
            try:
                model = self._models.resolve(ModelKind.LORA, ref)
            except ModelNotFound as exc:
                raise ModelNotFound(f"Invalid loras: entry {index}: {exc.message}") from exc
            specs.append((model, weight))
        return tuple(specs)

    def _prompt_loras(self, prompt: str) -> tuple[Lora, ...]:
        try:
            _, tags = extract_lora_tags(prompt)
        except InvalidArgument as exc:
            raise InvalidArgument(f"Invalid prompt: {exc.message}") from exc
        specs = []
        for name, weight in tags:
            try:
                model = self._models.resolve(ModelKind.LORA, name)
            except ModelNotFound as exc:
                raise ModelNotFound(f"Invalid prompt: <lora:{name}>: {exc.message}") from exc
            specs.append((model, weight))
        return tuple(specs)

    def _upscaler(self, name: str, field: str, *, latent: bool) -> UpscalerChoice:
        builtin = IMAGE_UPSCALERS + (LATENT_UPSCALERS if latent else ())
        match = next((b for b in builtin if b.lower() == name.lower()), None)
        if match is not None:
            return UpscalerChoice(match)
        try:
            return UpscalerChoice(name, self._models.resolve(ModelKind.UPSCALER, name).ref)
        except ModelNotFound as exc:
            installed = [m.name for m in self._models.list(ModelKind.UPSCALER)]
            valid = ", ".join(builtin + tuple(installed))
            raise InvalidArgument(
                f"Invalid {field}: {name!r} is not available; use one of {valid}"
            ) from exc
