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
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dan.domain import InstalledModel
from dan.errors import EngineError

# Which vectors of a file go to which text encoder: (vectors key, pipeline attribute).
ENCODERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
Rewrite = Callable[[str], str]


def read_embedding(model: InstalledModel) -> dict[str, torch.Tensor]:
    """The file's vectors (count, width) by encoder key (``clip_l``, and ``clip_g`` for SDXL);
    EngineError naming the file when it is not an embedding."""
    data = _read(model)
    if "clip_l" in data and "clip_g" in data:
        vectors = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    elif isinstance(data.get("emb_params"), torch.Tensor):
        vectors = {"clip_l": data["emb_params"]}
    elif isinstance(data.get("string_to_param"), dict) and "*" in data["string_to_param"]:
        vectors = {"clip_l": data["string_to_param"]["*"]}
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vectors = {"clip_l": next(iter(data.values()))}
    else:
        raise EngineError(
            f"embedding {model.path.name} holds none of emb_params, string_to_param, or "
            f"clip_l and clip_g (it has {sorted(data)[:5]})"
        )
    return {
        key: value.detach().float().reshape(-1, value.shape[-1]) for key, value in vectors.items()
    }


def _read(model: InstalledModel) -> dict[str, Any]:
    try:
        if model.path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(model.path, device="cpu"))
        data = torch.load(model.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and torch raise many kinds
        raise EngineError(f"embedding {model.path.name} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise EngineError(f"embedding {model.path.name} is not a dict of tensors")
    return data


@contextlib.contextmanager
def embeddings_applied(pipeline: Any, models: list[InstalledModel]) -> Iterator[Rewrite]:
    """``pipeline`` able to encode ``models``' placeholders; yields the function that rewrites
    a prompt's uses of their names into placeholders. The own tokenizer and token tables are
    back afterwards, whatever happens. EngineError names a file that does not fit."""
    if not models:
        yield lambda prompt: prompt
        return
    files = [(model, read_embedding(model)) for model in models]
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
        if key not in vectors:
            raise EngineError(
                f"embedding {model.path.name} has no {key} vectors: it is for another model "
                "family than this checkpoint"
            )
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
