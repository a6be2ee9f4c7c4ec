"""Textual-inversion embeddings, used by their names in a prompt as in AUTOMATIC1111.

An embedding file holds vectors for the text encoder's token embedding table, in A1111's
formats: ``emb_params`` (``.safetensors``), ``string_to_param["*"]`` (a ``.pt`` dict, read with
``weights_only``), or SDXL's ``clip_l`` and ``clip_g`` (one set per text encoder); a diffusers
file with one tensor works too. For one request each vector gets a placeholder token of its own
(diffusers' ``load_textual_inversion`` on a copy of the tokenizer, and a text encoder whose
token table is grown), and every whole-word use of the embedding's name in a prompt is replaced
by its placeholders, so that attention weights apply to it like to any word. Afterwards the
checkpoint's own tokenizer and token tables are put back, untouched.

One difference from A1111: its chunking never splits an embedding's vectors between two
75-token chunks; here a long prompt may split them like any other words.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from dan.domain import InstalledModel
from dan.engine.loading.pickles import load_pickle
from dan.engine.loading.shapes import safetensors_shapes
from dan.errors import EngineError

# Which vectors of a file go to which text encoder: (vectors key, pipeline attribute).
ENCODERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
Rewrite = Callable[[str], str]
# A1111 trains embeddings of 1 to 75 vectors (one 75-token prompt chunk); a file that declares
# more is broken or hostile (a million placeholder tokens would take the worker down).
MAX_VECTORS = 75


def read_embedding(model: InstalledModel, widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The file's vectors (count, width) for each text encoder key in ``widths`` (``clip_l``,
    and ``clip_g`` for SDXL), whose value is that encoder's width.

    Shapes are checked before any vector is copied: a ``.safetensors`` file's in its header
    (only the vectors are then loaded), a ``.pt`` file's once torch has unpickled it (after
    its storages were held to what the file holds: see
    :func:`dan.engine.loading.pickles.check_pickle`). Raises EngineError naming the file when it
    declares more than it holds, is not an embedding, has no vectors for one of the encoders
    (another family's), or declares vectors no embedding has: not 1-d or 2-d, more than
    :data:`MAX_VECTORS`, another width than the encoder's, or different counts per encoder.
    """
    if model.path.suffix.lower() == ".safetensors":
        shapes = safetensors_shapes(model.path, EngineError)
        names = _picked(model, {name: name for name in shapes}, widths)
        _check_vectors(model, {key: shapes[name] for key, name in names.items()}, widths)
        tensors = _load_safetensors(model, names.values())
        vectors = {key: tensors[name] for key, name in names.items()}
    else:
        picked = _picked(model, _read_pickle(model), widths)
        vectors = {key: _tensor(model, key, value) for key, value in picked.items()}
        _check_vectors(model, {k: tuple(v.shape) for k, v in vectors.items()}, widths)
    return {key: v.detach().float().reshape(-1, v.shape[-1]) for key, v in vectors.items()}


def _picked(
    model: InstalledModel, data: Mapping[str, Any], widths: Mapping[str, int]
) -> dict[str, Any]:
    """The entries of ``data`` holding the vectors of each encoder of ``widths``, in A1111's
    formats: ``clip_l`` and ``clip_g``, ``emb_params``, ``string_to_param["*"]``, or a file of
    one entry."""
    if "clip_l" in data and "clip_g" in data:
        found = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    elif "emb_params" in data:
        found = {"clip_l": data["emb_params"]}
    elif isinstance(data.get("string_to_param"), dict) and "*" in data["string_to_param"]:
        found = {"clip_l": data["string_to_param"]["*"]}
    elif len(data) == 1:
        found = {"clip_l": next(iter(data.values()))}
    else:
        raise EngineError(
            f"embedding {model.path.name} holds none of emb_params, string_to_param, or "
            f"clip_l and clip_g (it has {sorted(data)[:5]})"
        )
    missing = next((key for key in widths if key not in found), None)
    if missing is not None:
        raise EngineError(
            f"embedding {model.path.name} has no {missing} vectors: it is for another model "
            "family than this checkpoint"
        )
    return {key: found[key] for key in widths}


def _check_vectors(
    model: InstalledModel, shapes: Mapping[str, tuple[int, ...]], widths: Mapping[str, int]
) -> None:
    name = model.path.name
    for key, shape in shapes.items():
        if len(shape) not in (1, 2):
            raise EngineError(
                f"embedding {name}: its {key} vectors have shape {list(shape)}; an embedding "
                "holds a (vectors, width) matrix or one vector"
            )
        count = shape[0] if len(shape) == 2 else 1
        if not 1 <= count <= MAX_VECTORS:
            raise EngineError(
                f"embedding {name} has {count} {key} vectors; an embedding has 1 to "
                f"{MAX_VECTORS} (one prompt chunk)"
            )
        if shape[-1] != widths[key]:
            raise EngineError(
                f"embedding {name} has {key} vectors {shape[-1]} wide but this checkpoint's "
                f"text encoder takes {widths[key]}: it is for another model"
            )
    counts = {key: shape[0] if len(shape) == 2 else 1 for key, shape in shapes.items()}
    if len(set(counts.values())) > 1:
        raise EngineError(f"embedding {name} has different vector counts per encoder: {counts}")


def _tensor(model: InstalledModel, key: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise EngineError(
            f"embedding {model.path.name}: its {key} vectors are a {type(value).__name__}, "
            "not a tensor"
        )
    return value


def _load_safetensors(model: InstalledModel, names: Iterable[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(model.path, framework="pt", device="cpu") as file:
            return {name: file.get_tensor(name) for name in names}
    except Exception as exc:  # safetensors raises its own error and OSError
        raise EngineError(f"embedding {model.path.name} cannot be read: {exc}") from exc


def _read_pickle(model: InstalledModel) -> dict[str, Any]:
    name = model.path.name
    try:
        data = load_pickle(model.path, EngineError)
    except EngineError as exc:
        raise EngineError(f"embedding {exc.message}") from exc
    except Exception as exc:  # pickle and torch raise many kinds
        raise EngineError(f"embedding {name} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise EngineError(f"embedding {name} is not a dict of tensors")
    return data


@contextlib.contextmanager
def embeddings_applied(pipeline: Any, models: list[InstalledModel]) -> Iterator[Rewrite]:
    """``pipeline`` able to encode ``models``' placeholders; yields the function that rewrites
    a prompt's uses of their names into placeholders. The own tokenizer and token tables are
    back afterwards, whatever happens. EngineError names a file that does not fit."""
    if not models:
        yield lambda prompt: prompt
        return
    widths = {
        key: int(getattr(pipeline, attr).get_input_embeddings().weight.shape[-1])
        for key, attr in ENCODERS.items()
        if hasattr(pipeline, attr)
    }
    files = [(model, read_embedding(model, widths)) for model in models]
    tokens = [_placeholders(i, vectors["clip_l"]) for i, (_, vectors) in enumerate(files)]
    own_tokenizer = pipeline.tokenizer
    tables = [_TokenTable(getattr(pipeline, attr)) for attr in _encoders(pipeline)]
    try:
        loaded = {
            key: _load(pipeline, key, attr, files, tokens, own_tokenizer)
            for key, attr in ENCODERS.items()
            if hasattr(pipeline, attr)
        }
        pipeline.tokenizer = loaded["clip_l"]  # the one whose ids both encoders read
        yield lambda prompt: _rewritten(prompt, files, tokens)
    finally:
        pipeline.tokenizer = own_tokenizer
        for table in tables:
            table.restore()


def _encoders(pipeline: Any) -> list[str]:
    return [attr for attr in ENCODERS.values() if hasattr(pipeline, attr)]


def _load(
    pipeline: Any,
    key: str,
    attr: str,
    files: list[tuple[InstalledModel, dict[str, torch.Tensor]]],
    tokens: list[list[str]],
    own_tokenizer: Any,
) -> Any:
    """A copy of the own tokenizer with every placeholder, and ``attr``'s text encoder holding
    the ``key`` vectors under the same ids (both SDXL encoders read the first tokenizer's ids)."""
    tokenizer = copy.deepcopy(own_tokenizer)
    encoder = getattr(pipeline, attr)
    for (model, vectors), names in zip(files, tokens, strict=True):
        try:
            pipeline.load_textual_inversion(
                vectors[key], token=names, tokenizer=tokenizer, text_encoder=encoder
            )
        except ValueError as exc:  # diffusers' word for a width that does not fit
            raise EngineError(f"embedding {model.path.name} does not fit: {exc}") from exc
    return tokenizer


def _placeholders(index: int, vectors: torch.Tensor) -> list[str]:
    return [f"<dan-ti-{index}-{j}>" for j in range(vectors.shape[0])]


def _rewritten(
    prompt: str, files: list[tuple[InstalledModel, Any]], tokens: list[list[str]]
) -> str:
    for (model, _), names in zip(files, tokens, strict=True):
        pattern = rf"(?<![\w-]){re.escape(model.name)}(?![\w-])"
        # A function, not a template: the placeholders are taken as they are.
        prompt = re.sub(pattern, functools.partial(_joined, names), prompt, flags=re.IGNORECASE)
    return prompt


def _joined(names: list[str], _: re.Match[str]) -> str:
    return " ".join(names)


class _TokenTable:
    """A text encoder's token embedding module and vocabulary size, to put back."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self._embeddings = encoder.get_input_embeddings()
        self._vocab_size = encoder.config.vocab_size

    def restore(self) -> None:
        self._encoder.set_input_embeddings(self._embeddings)
        self._encoder.config.vocab_size = self._vocab_size
