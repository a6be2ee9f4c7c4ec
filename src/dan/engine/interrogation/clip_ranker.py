"""The CLIP half of the ``clip`` interrogator: rank term lists against an image, as A1111 does.

AUTOMATIC1111's "Interrogate CLIP" (``modules/interrogate.py``) captions the image with BLIP
(not here) and then, for each category of terms, appends the terms whose CLIP text embedding is
closest to the image embedding. This module reproduces that second half:

- categories are clip-interrogator's ``artists``, ``flavors``, ``mediums`` and ``movements``
  lists, in that order (the files A1111 downloads into its ``interrogate`` folder); none has a
  ``.topN.`` in its name, so A1111 takes the best **1** term of each;
- A1111 ranks only the first ``interrogate_clip_dict_limit`` (default 1500) lines of each file,
  so :func:`packaged_term_lists` truncates to that by default (``limit=None`` keeps them all);
- artists are ranked and shown as ``"by <name>"``, as A1111's built-in artist ranking did;
- a term's score is ``softmax(100 * cos(image, term))`` over its list (A1111 shows it as
  ``(term:0.123)`` only with "include ranks", which DAN does not);
- the description is ``caption + ", " + term`` for each chosen term, category by category.

The model is OpenAI's CLIP (``ViT-L-14.pt``, a TorchScript archive; a plain state-dict file works
too) rebuilt by open_clip from the state dict's shapes, so no network is touched. Text embeddings
are computed once per (weights, dtype, term list), normalised, kept in memory and cached on disk
as safetensors; the weights are identified by the sha256 of their content, the identity DAN's
model registry uses, which stays valid when the file moves.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import open_clip  # type: ignore[import-untyped]
import torch
from open_clip.model import (  # type: ignore[import-untyped]
    build_model_from_openai_state_dict,
    convert_weights_to_lp,
)
from PIL.Image import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.functional import normalize

from dan.engine.loading.pickles import check_pickle
from dan.engine.loading.shapes import Limits, check_tensors
from dan.errors import EngineError

log = logging.getLogger(__name__)

A1111_DICT_LIMIT = 1500  # A1111's interrogate_clip_dict_limit: lines ranked per category
TEXT_BATCH_SIZE = 256  # texts encoded per forward pass
LOGIT_SCALE = 100.0  # A1111 (and OpenAI's zero-shot recipe) scale cosines by 100, not logit_scale
_CACHE_FORMAT = 1  # bump when the cached embeddings change meaning
_EMBEDDINGS_KEY = "embeddings"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A ViT and a text transformer: at most 4-d (the patch embedding), no side near the bound.
CLIP_LIMITS = Limits("an OpenAI CLIP model", max_rank=4, max_side=1 << 17)
# (file stem, top count, prefix) of each category, in A1111's order.
_PACKAGED = (("artists", 1, "by "), ("flavors", 1, ""), ("mediums", 1, ""), ("movements", 1, ""))


@dataclass(frozen=True)
class TermList:
    """A category of terms. Each term is ranked (and shown) as ``prefix + term``;
    :meth:`ClipRanker.describe` appends the best ``top_count`` of them."""

    name: str
    terms: tuple[str, ...]
    top_count: int
    prefix: str = ""

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError(f"term list {self.name!r} is empty; give it at least one term")
        if self.top_count < 1:
            raise ValueError(f"top_count of {self.name!r} must be at least 1, got {self.top_count}")

    # Computed once per list (cached_property writes past the frozen __setattr__): describe
    # looks them up on every call, and the full flavor list has 100,969 terms.
    @cached_property
    def texts(self) -> tuple[str, ...]:
        """The strings that are encoded and returned: each term with the prefix."""
        return tuple(self.prefix + term for term in self.terms)

    @cached_property
    def digest(self) -> str:
        """sha256 of :attr:`texts`: the identity of the list's embeddings for one model."""
        return hashlib.sha256(json.dumps(self.texts).encode()).hexdigest()


def _term_data_dir() -> Path:
    """clip-interrogator's ``data`` folder, found without importing the package (its import
    pulls in transformers, open_clip and requests, and takes seconds)."""
    spec = importlib.util.find_spec("clip_interrogator")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            "clip-interrogator is not installed; it provides the CLIP term lists "
            "(pip install --no-deps clip-interrogator==0.6.0)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def read_terms(path: Path, limit: int | None = None) -> tuple[str, ...]:
    """The stripped, non-blank lines of ``path`` (UTF-8), the first ``limit`` of them if given."""
    try:
        # split("\n"), not splitlines(): A1111 reads lines, and terms may hold U+2028 or U+0085.
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise EngineError(f"cannot read the term list {path}: {exc}") from exc
    terms = tuple(line.strip() for line in lines if line.strip())
    return terms if limit is None else terms[:limit]


def packaged_term_lists(limit: int | None = A1111_DICT_LIMIT) -> tuple[TermList, ...]:
    """A1111's categories from clip-interrogator's data files, in A1111's order, each truncated
    to its first ``limit`` terms (A1111's default 1500; ``None`` keeps all 100,969 flavors).
    Raises :class:`EngineError` if clip-interrogator is missing or a file is unreadable."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for no limit), got {limit}")
    data = _term_data_dir()
    return tuple(
        TermList(name, read_terms(data / f"{name}.txt", limit), top_count, prefix)
        for name, top_count, prefix in _PACKAGED
    )


# --- weights ---------------------------------------------------------------------------------


def read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of an OpenAI CLIP file: a TorchScript archive (what OpenAI publishes) or a
    plain state dict read with ``weights_only=True``, either once what it declares is checked.
    Raises :class:`EngineError` naming the file if it is missing or neither, declares more than
    it holds (see :mod:`dan.engine.loading.pickles`), or has shapes no CLIP model has."""
    if not weights.is_file():
        raise EngineError(f"CLIP weights not found: {weights}")
    tensors = _tensors(_read(weights), weights)
    check_tensors(weights.name, tensors, CLIP_LIMITS, EngineError)
    return tensors


def _read(weights: Path) -> object:
    try:
        check_pickle(weights, EngineError)  # a TorchScript archive's records too
        archive = _torchscript(weights)
        if archive is not None:
            return dict(archive.state_dict())
        return torch.load(weights, map_location="cpu", weights_only=True)
    except EngineError:
        raise
    except Exception as exc:  # torch raises a zoo of types for a bad file; all mean "unreadable"
        raise EngineError(f"cannot read CLIP weights {weights}: {exc}") from exc


def _torchscript(weights: Path) -> Any | None:
    """The TorchScript archive in ``weights``, or None for a file that is not one."""
    try:
        with warnings.catch_warnings():
            # torch deprecates TorchScript, yet OpenAI ships its CLIP weights only as archives.
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(weights), map_location="cpu")  # type: ignore[no-untyped-call]
    except RuntimeError:
        return None  # not a TorchScript archive: a plain state dict, perhaps


def _tensors(loaded: Any, weights: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``loaded``, unwrapped from a training checkpoint's ``state_dict``."""
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = {k.removeprefix("module."): v for k, v in loaded["state_dict"].items()}
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise EngineError(f"CLIP weights {weights} are not a state dict of tensors")
    return loaded


def build_clip(
    state_dict: dict[str, torch.Tensor], weights: Path, device: torch.device, dtype: torch.dtype
) -> Any:
    """An open_clip ``CLIP`` in eval mode on ``device``, sized from the state dict's shapes.

    As open_clip's own OpenAI loader does, float16 and bfloat16 convert the matmul weights only
    (layer norms stay float32). Raises :class:`EngineError` naming the file if the state dict is
    not in OpenAI's layout."""
    cast_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else None
    try:
        # The builder converts to float16 itself: OpenAI's files are stored that way.
        model = build_model_from_openai_state_dict(state_dict, cast_dtype=cast_dtype)
    except (KeyError, RuntimeError, AssertionError, IndexError, ValueError) as exc:
        raise EngineError(f"{weights} is not an OpenAI CLIP state dict: {exc}") from exc
    model = model.to(device)
    if dtype != torch.float16:
        model.float()
        if dtype == torch.bfloat16:
            convert_weights_to_lp(model, dtype=torch.bfloat16)
    return model.eval()


def file_sha256(path: Path) -> str:
    """Lower-case hex sha256 of the file's content."""
    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as exc:
        raise EngineError(f"cannot read CLIP weights {path}: {exc}") from exc


# --- the embedding cache ---------------------------------------------------------------------


def _cache_path(cache_dir: Path, terms: TermList, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", terms.name)[:40]
    return cache_dir / f"clip-terms-{slug}-{key[:32]}.safetensors"


def _read_cache(path: Path, count: int) -> torch.Tensor | None:
    """The cached embeddings at ``path``, or ``None`` if absent, unreadable or of another size
    (then they are recomputed and the file rewritten)."""
    if not path.is_file():
        return None
    try:
        embeddings: torch.Tensor = load_file(path)[_EMBEDDINGS_KEY]
    except (OSError, KeyError, SafetensorError) as exc:
        log.warning("ignoring unreadable CLIP term cache %s: %s", path, exc)
        return None
    if embeddings.ndim != 2 or embeddings.shape[0] != count:
        log.warning("ignoring CLIP term cache %s: shape %s", path, tuple(embeddings.shape))
        return None
    # A fresh (aligned) copy: tensors in the file's buffer can be misaligned, which makes CPU
    # matmuls take another kernel and the scores differ in their last bits from a fresh encode.
    return embeddings.clone()


def _write_cache(path: Path, embeddings: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write atomically (temp file, ``os.replace``) so a concurrent reader never sees half a
    file; a failure only costs a re-encode next time, so it is logged, not raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=".clip-terms-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file({_EMBEDDINGS_KEY: embeddings.contiguous().cpu()}, staging, metadata=metadata)
        os.replace(staging, path)
    except OSError as exc:
        log.warning("could not cache CLIP term embeddings in %s: %s", path, exc)


# --- the ranker ------------------------------------------------------------------------------


class ClipModel(Protocol):
    """The part of open_clip's ``CLIP`` the ranker uses."""

    def encode_text(self, text: torch.Tensor) -> torch.Tensor: ...

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...


class ClipRanker:
    """Ranks term lists against images with one CLIP model. Not thread-safe: one worker thread
    owns it. Build it with :meth:`load`."""

    def __init__(
        self,
        model: ClipModel,
        *,
        device: torch.device,
        dtype: torch.dtype,
        image_size: int,
        context_length: int,
        cache_dir: Path,
        weights_sha256: str,
    ) -> None:
        self._model = model
        self._device = device
        self._dtype = dtype
        self._preprocess: Callable[[Image], torch.Tensor] = open_clip.image_transform(
            image_size,
            is_train=False,
            mean=open_clip.OPENAI_DATASET_MEAN,
            std=open_clip.OPENAI_DATASET_STD,
        )
        self._context_length = context_length
        self._cache_dir = cache_dir
        self._weights_sha256 = weights_sha256
        self._embeddings: dict[str, torch.Tensor] = {}
        self.term_lists: tuple[TermList, ...] = ()
        self.encoded_lists = 0  # lists encoded by the model rather than read from a cache

    @classmethod
    def load(
        cls,
        weights: Path,
        cache_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        term_lists: Sequence[TermList] | None = None,
        *,
        weights_sha256: str | None = None,
    ) -> ClipRanker:
        """Load OpenAI CLIP weights and prepare the embeddings of ``term_lists`` (default:
        :func:`packaged_term_lists`), from ``cache_dir`` when cached there, else encoded and
        cached. ``weights_sha256``, when the caller knows it, saves hashing the file.

        Raises :class:`EngineError` naming the file if the weights are missing, unreadable or
        not an OpenAI CLIP, and :class:`ValueError` for a dtype other than float32, float16 or
        bfloat16."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        model = build_clip(read_state_dict(weights), weights, device, dtype)
        ranker = cls(
            model,
            device=device,
            dtype=dtype,
            image_size=_image_size(model),
            context_length=int(model.context_length),
            cache_dir=cache_dir,
            weights_sha256=weights_sha256 or file_sha256(weights),
        )
        ranker.term_lists = tuple(packaged_term_lists() if term_lists is None else term_lists)
        for terms in ranker.term_lists:
            ranker._term_embeddings(terms)
        return ranker

    def rank(self, image: Image, terms: TermList) -> list[tuple[str, float]]:
        """Every ``prefix + term`` of ``terms`` with its score (softmax over the list of 100 x
        the cosine similarity to the image, so scores sum to 1), best first; ties keep the
        list's order. A list not given to :meth:`load` is encoded (and cached) now."""
        return self._ranked(self._image_features(image), terms, len(terms.terms))

    def describe(self, image: Image, caption: str) -> str:
        """``caption`` followed by ``", " + term`` for the best ``top_count`` terms of each loaded
        list, in list order: A1111's "Interrogate CLIP" text without ranks."""
        features = self._image_features(image)
        chosen = [
            text
            for terms in self.term_lists
            for text, _ in self._ranked(features, terms, terms.top_count)
        ]
        return caption + "".join(f", {text}" for text in chosen)

    def _ranked(
        self, features: torch.Tensor, terms: TermList, count: int
    ) -> list[tuple[str, float]]:
        embeddings = self._term_embeddings(terms)
        scores = (LOGIT_SCALE * features @ embeddings.T).softmax(dim=-1)[0].cpu()
        order = torch.sort(scores, descending=True, stable=True).indices[:count]
        texts = terms.texts
        return [(texts[i], float(scores[i])) for i in order.tolist()]

    @torch.no_grad()
    def _image_features(self, image: Image) -> torch.Tensor:
        """The normalised float32 embedding of ``image``, shape (1, embed_dim)."""
        pixels = self._preprocess(image).unsqueeze(0).to(self._device, self._dtype)
        return normalize(self._model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised float32 text embeddings, shape (len(texts), embed_dim), in batches of
        :data:`TEXT_BATCH_SIZE`; texts longer than the context are truncated as OpenAI's
        ``tokenize(truncate=True)`` does."""
        chunks = []
        for start in range(0, len(texts), TEXT_BATCH_SIZE):
            batch = list(texts[start : start + TEXT_BATCH_SIZE])
            tokens = open_clip.tokenize(batch, context_length=self._context_length)
            features = self._model.encode_text(tokens.to(self._device)).float()
            chunks.append(normalize(features, dim=-1))
        return torch.cat(chunks)

    def _term_embeddings(self, terms: TermList) -> torch.Tensor:
        """The list's embeddings from memory, else the disk cache, else encoded and cached."""
        key = self._cache_key(terms)
        if key not in self._embeddings:
            path = _cache_path(self._cache_dir, terms, key)
            embeddings = _read_cache(path, len(terms.terms))
            if embeddings is None:
                embeddings = self.encode_texts(terms.texts)
                self.encoded_lists += 1
                _write_cache(path, embeddings, self._cache_metadata(terms))
            self._embeddings[key] = embeddings.to(self._device, torch.float32)
        return self._embeddings[key]

    def _cache_key(self, terms: TermList) -> str:
        """What the embeddings depend on: the weights, the dtype they ran in, the texts."""
        parts = (_CACHE_FORMAT, self._weights_sha256, str(self._dtype), terms.digest)
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def _cache_metadata(self, terms: TermList) -> dict[str, str]:
        return {
            "format": str(_CACHE_FORMAT),
            "weights_sha256": self._weights_sha256,
            "dtype": str(self._dtype),
            "terms_sha256": terms.digest,
            "name": terms.name,
            "count": str(len(terms.terms)),
        }


def _image_size(model: Any) -> int:
    """The square input size of the model's image tower."""
    size = model.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)
