"""The DeepDanbooru tagger behind the ``deepdanbooru`` interrogator, as AUTOMATIC1111 runs it.

The network is DeepDanbooru's ``resnet_custom_v3``: a bottleneck ResNet without normalisation
layers whose 179 convolutions are named ``n_Conv_0`` ... ``n_Conv_178`` in the order the ONNX
export of the original Keras model visited them. The names, shapes and paddings match
A1111's PyTorch port, so the published ``model-resnet_custom_v3.pt`` (a plain state dict plus a
``tags`` entry with the 9,176 tag names) loads unchanged.

The network is built from a short description of its stages rather than spelled out layer by
layer. Every width is a multiple of the stem's 64 channels, so the same description builds a
narrow copy for tests: the layer names stay the same, only the channel counts shrink.

:class:`DeepDanbooru` reads such a file and tags an image: :meth:`~DeepDanbooru.predict` gives
every tag's probability, :meth:`~DeepDanbooru.caption` the comma-separated tag list A1111's
interrogate returns with its default settings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dan.domain import ResizeMode
from dan.engine.generation.masks import fit_image
from dan.engine.loading.pickles import load_pickle
from dan.engine.loading.shapes import Limits, check_tensors
from dan.errors import EngineError

INPUT_SIZE = 512  # A1111 fits every image into 512 x 512 before tagging
TAGS_KEY = "tags"
STEM_WIDTH = 64  # the real file's first convolution: 64 output channels
RATING_PREFIX = "rating:"  # A1111 never puts rating tags into a caption
# A ResNet: 4-d convolutions, a last layer as wide as the tag list (9,176 in the real file).
TAGGER_LIMITS = Limits("a DeepDanbooru tagger", max_rank=4, max_side=1 << 17)
_SPECIAL = re.compile(r"([\\()])")  # what A1111 escapes so prompts read them as literal text


class UnsupportedTagger(EngineError):
    """This file is not a DeepDanbooru tagger DAN can load."""


# --- the network -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stage:
    """Bottleneck blocks sharing one width; widths are multiples of the stem width."""

    mid: int  # width of the 1x1-3x3 part of each block
    out: int  # width between blocks
    blocks: int
    stride: int  # of the stage's first block (the later ones keep the resolution)
    # Where the first block's projection shortcut is numbered: before its bottleneck
    # convolutions, except in the second 1024-wide stage (n_Conv_97..99, then n_Conv_100).
    projection: Literal["first", "last"] = "first"


_STAGES = (
    _Stage(mid=1, out=4, blocks=3, stride=1),
    _Stage(mid=2, out=8, blocks=8, stride=2),
    _Stage(mid=4, out=16, blocks=20, stride=2),
    _Stage(mid=4, out=16, blocks=20, stride=2, projection="last"),
    _Stage(mid=8, out=32, blocks=3, stride=2),
    _Stage(mid=16, out=64, blocks=3, stride=2),
)
# The stem, three convolutions a block plus one projection a stage, then the tag scores.
HEAD_KEY = f"n_Conv_{1 + sum(3 * stage.blocks + 1 for stage in _STAGES)}.weight"


@dataclass(frozen=True)
class _Block:
    """Convolution numbers of one residual block: ``branch`` is 1x1 -> 3x3 -> 1x1."""

    branch: tuple[int, int, int]
    shortcut: int | None  # a 1x1 projection, or None for the identity
    stride: int


class DeepDanbooruNet(nn.Module):
    """``resnet_custom_v3`` with ``tag_count`` outputs and a stem ``base_width`` wide.

    ``base_width`` 64 is the published model; a smaller one builds a narrow copy with the same
    parameter names (every width scales with it). ``forward`` takes (N, 3, H, W) RGB in [0, 1]
    and returns (N, tag_count) sigmoid probabilities.
    """

    def __init__(self, tag_count: int, base_width: int = STEM_WIDTH) -> None:
        super().__init__()
        if tag_count < 1 or base_width < 1:
            raise ValueError(
                f"tag_count and base_width must be >= 1, got {tag_count}, {base_width}"
            )
        self.base_width = base_width
        self._convs: list[nn.Conv2d] = []
        self._blocks: list[_Block] = []
        self._add_conv(3, base_width, kernel_size=7, stride=2)
        channels = base_width
        for stage in _STAGES:
            for number in range(stage.blocks):
                self._blocks.append(self._add_block(channels, stage, first=number == 0))
                channels = stage.out * base_width
        self._add_conv(channels, tag_count, kernel_size=1, bias=False)

    def _add_conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = True,
    ) -> int:
        number = len(self._convs)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        self.add_module(f"n_Conv_{number}", conv)
        self._convs.append(conv)
        return number

    def _add_block(self, in_channels: int, stage: _Stage, first: bool) -> _Block:
        mid, out = stage.mid * self.base_width, stage.out * self.base_width
        stride = stage.stride if first else 1
        shortcut = None
        if first and stage.projection == "first":
            shortcut = self._add_conv(in_channels, out, 1, stride)
        branch = (
            self._add_conv(in_channels, mid, 1),
            self._add_conv(mid, mid, 3, stride),
            self._add_conv(mid, out, 1),
        )
        if first and stage.projection == "last":
            shortcut = self._add_conv(in_channels, out, 1, stride)
        return _Block(branch, shortcut, stride)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # The Keras original pads "same"; for even sizes that is 2 before and 3 after a 7x7/2
        # convolution, and only after (right and bottom) for the stride-2 pool and 3x3s.
        x = F.relu(self._convs[0](F.pad(pixels, (2, 3, 2, 3))))
        x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), kernel_size=3, stride=2)
        for block in self._blocks:
            x = self._run_block(block, x)
        logits = self._convs[-1](x).mean(dim=(2, 3))
        return torch.sigmoid(logits)

    def _run_block(self, block: _Block, x: torch.Tensor) -> torch.Tensor:
        reduce, middle, expand = (self._convs[n] for n in block.branch)
        padding = (1, 1, 1, 1) if block.stride == 1 else (0, 1, 0, 1)
        h = F.relu(reduce(x))
        h = F.relu(middle(F.pad(h, padding)))
        skip = x if block.shortcut is None else self._convs[block.shortcut](x)
        return F.relu(expand(h) + skip)


def build_network(
    tag_count: int, base_width: int = STEM_WIDTH, device: torch.device | str = "cpu"
) -> DeepDanbooruNet:
    """A randomly initialised network on ``device`` ("meta": shapes only, no memory)."""
    with torch.device(device):
        return DeepDanbooruNet(tag_count, base_width)


# --- reading the file ------------------------------------------------------------------------


def read_tagger_file(path: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The tensors and the tag names of a ``model-resnet_custom_v3.pt``-style file.

    Read with ``weights_only=True`` (tensors and plain containers, no code runs). Raises
    UnsupportedTagger, naming the file, when it cannot be read, declares more than it holds (see
    :mod:`dan.engine.loading.pickles`), is not a state dict, has no ``tags`` list of strings,
    or has shapes no tagger has.
    """
    try:
        state = load_pickle(path, UnsupportedTagger)
    except UnsupportedTagger:
        raise
    except Exception as exc:  # missing, truncated, not a torch file: all mean the same here
        raise UnsupportedTagger(
            f"cannot read tagger file {path.name}: it is not a readable torch state dict "
            f"({type(exc).__name__})"
        ) from exc
    if not isinstance(state, Mapping):
        raise UnsupportedTagger(f"{path.name} holds a {type(state).__name__}, not a state dict")
    tags = state.get(TAGS_KEY)
    if not isinstance(tags, list | tuple) or not all(isinstance(tag, str) for tag in tags):
        raise UnsupportedTagger(
            f"{path.name} has no {TAGS_KEY!r} entry listing the tag names: it is not a "
            "DeepDanbooru tagger file"
        )
    tensors = {key: value for key, value in state.items() if key != TAGS_KEY}
    others = [str(key) for key, value in tensors.items() if not isinstance(value, torch.Tensor)]
    if others:
        raise UnsupportedTagger(f"{path.name} has entries that are not tensors: {_few(others)}")
    check_tensors(path.name, tensors, TAGGER_LIMITS, UnsupportedTagger)
    return tensors, tuple(tags)


def _shape_of(state: Mapping[str, object], key: str, name: str) -> tuple[int, ...]:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise UnsupportedTagger(f"{name} is not a DeepDanbooru tagger: it has no {key}")
    return tuple(value.shape)


def _network_for(
    state: Mapping[str, torch.Tensor], tags: tuple[str, ...], name: str
) -> DeepDanbooruNet:
    """An empty (meta) network shaped like ``state``: width from the stem, outputs from the head."""
    stem = _shape_of(state, "n_Conv_0.weight", name)
    if len(stem) != 4 or stem[1:] != (3, 7, 7):
        raise UnsupportedTagger(f"{name}: n_Conv_0.weight has shape {stem}, not (width, 3, 7, 7)")
    head = _shape_of(state, HEAD_KEY, name)
    if len(head) != 4:
        raise UnsupportedTagger(f"{name}: {HEAD_KEY} has shape {head}, not (tags, width, 1, 1)")
    tag_count = head[0]
    if tag_count != len(tags):
        raise UnsupportedTagger(
            f"{name} lists {len(tags)} tags but its last layer scores {tag_count}"
        )
    return build_network(tag_count, stem[0], device="meta")


def _few(keys: Iterable[str], limit: int = 3) -> str:
    ordered = sorted(keys, key=_natural)
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more


def _natural(key: str) -> tuple[int, str]:
    """n_Conv_2 before n_Conv_10."""
    digits = re.search(r"\d+", key)
    return (int(digits.group()) if digits else -1, key)


def check_layout(network: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Raise UnsupportedTagger unless ``state`` has exactly ``network``'s keys and shapes."""
    expected = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    if missing or unexpected:
        problems = [f"missing {_few(missing)}"] if missing else []
        problems += [f"unexpected {_few(unexpected)}"] if unexpected else []
        raise UnsupportedTagger(
            f"{name} is not a resnet_custom_v3 DeepDanbooru model: {'; '.join(problems)}"
        )
    wrong = [key for key in expected if tuple(state[key].shape) != expected[key]]
    if wrong:
        key = sorted(wrong, key=_natural)[0]
        raise UnsupportedTagger(
            f"{name} has layers of the wrong shape ({_few(wrong)}): {key} is "
            f"{tuple(state[key].shape)}, the architecture needs {expected[key]}"
        )


# --- tagging ---------------------------------------------------------------------------------


def image_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, 512, 512) fp32 in [0, 1]: A1111's ``resize_image(2, image.convert("RGB"), 512, 512)``.

    Mode 2 is "resize and fill": scaled to fit, centred, the bands repeating the edge pixels.
    Transparency is dropped, not composited, as A1111's plain ``convert("RGB")`` does.
    """
    fitted = fit_image(image.convert("RGB"), INPUT_SIZE, INPUT_SIZE, ResizeMode.RESIZE_AND_FILL)
    array = np.asarray(fitted, dtype=np.float32) / 255.0
    # A1111 feeds NHWC and its model permutes; we permute here and the network takes NCHW.
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def format_tag(tag: str) -> str:
    """A tag as A1111 writes it into a prompt: spaces for underscores, ``\\ ( )`` escaped."""
    return _SPECIAL.sub(r"\\\1", tag.replace("_", " "))


def format_caption(
    probabilities: Iterable[tuple[str, float]], threshold: float, *, sort_alpha: bool = True
) -> str:
    """A1111's ``tag_multi`` with its default options (no ranks, no filter list).

    Tags scoring at least ``threshold`` (A1111 drops only those below it), except ``rating:*``
    tags; ordered alphabetically by raw tag name (``sort_alpha``, A1111's default) or else by
    descending probability (ties keep tag order); formatted by :func:`format_tag`; joined
    with ", ".
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    kept = {
        tag: probability
        for tag, probability in probabilities
        if probability >= threshold and not tag.startswith(RATING_PREFIX)
    }
    ordered = sorted(kept) if sort_alpha else sorted(kept, key=lambda tag: -kept[tag])
    return ", ".join(format_tag(tag) for tag in ordered)


class DeepDanbooru:
    """A loaded DeepDanbooru tagger on one device. Use :meth:`load`."""

    def __init__(
        self,
        network: DeepDanbooruNet,
        tags: tuple[str, ...],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.network = network
        self.device = device
        self.dtype = dtype
        self._tags = tags

    @classmethod
    def load(cls, weights: Path, device: torch.device, dtype: torch.dtype) -> DeepDanbooru:
        """The tagger in ``weights`` on ``device`` in ``dtype``, in eval mode.

        The width and the number of tags are read from the file, so a narrowed copy loads the
        same way as the published model. Raises UnsupportedTagger (an EngineError) naming the
        file when it cannot be read, has no ``tags``, or its layers do not form the network.
        """
        state, tags = read_tagger_file(weights)
        network = _network_for(state, tags, weights.name)
        check_layout(network, state, weights.name)
        try:
            network.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:  # check_layout covers keys and shapes; this is a backstop
            raise UnsupportedTagger(f"{weights.name} does not load: {exc}") from exc
        network.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(network, tags, device, dtype)

    @property
    def tags(self) -> tuple[str, ...]:
        """The tag names, in the order of the network's outputs."""
        return self._tags

    def predict(self, image: Image.Image) -> list[tuple[str, float]]:
        """Every tag with its probability in [0, 1], in tag order."""
        pixels = image_tensor(image).to(self.device, self.dtype)
        with torch.inference_mode():
            scores = self.network(pixels)[0].float().cpu().tolist()
        return list(zip(self._tags, scores, strict=True))

    def caption(
        self, image: Image.Image, threshold: float = 0.5, *, sort_alpha: bool = True
    ) -> str:
        """The tags of ``image`` scoring at least ``threshold``, written by :func:`format_caption`.

        Defaults are A1111's: threshold 0.5, alphabetical order (``sort_alpha=False``: most
        confident first). Raises ValueError for a threshold outside [0, 1].
        """
        return format_caption(self.predict(image), threshold, sort_alpha=sort_alpha)
