"""AUTOMATIC1111 prompt syntax: attention weights, BREAK, LoRA tags and prompts of any length.

Stable Diffusion's CLIP text encoder sees 77 tokens. diffusers silently truncates longer prompts;
AUTOMATIC1111 instead splits the prompt into 75-token chunks, encodes each chunk on its own as
``[BOS] chunk [EOS/padding]`` and concatenates the results along the sequence axis (the UNet's
cross-attention accepts any sequence length). Each token's hidden state is then scaled by its
attention weight and the chunk is rescaled to keep its mean ("emphasis: Original").

The parser, the chunking and the encoding here are written to give A1111's results on the same
prompt, so that prompts written for A1111 behave the same in DAN.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

import ftfy
import torch
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from dan.errors import EngineError

CHUNK_LENGTH = 75  # prompt tokens per chunk; with BOS and EOS a chunk is 77 ids
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1  # A1111 multiplies by this rather than dividing: same floats as A1111
BREAK_FRAGMENT: tuple[str, float] = ("BREAK", -1.0)  # how A1111 (and we) list a BREAK

# One syntactic unit of a prompt, tried in this order at each position (A1111's tokens).
_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                   # an escaped bracket or backslash: literal
    | \\                             # any other backslash: dropped
    | \( | \[                        # openers
    | :\s*([+-]?[.\d]+)\s*\)         # ":1.3)" closes a round bracket with an explicit weight
    | \) | \]                        # closers
    | [^\\()\[\]:]+                  # plain text
    | :                              # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_WHITESPACE = re.compile(r"\s+")


@dataclass
class _Fragment:
    """A run of prompt text with its attention weight, or a BREAK (mutable while parsing)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


@dataclass(frozen=True)
class PromptChunk:
    """77 token ids (``[BOS]``, 75 prompt or padding ids, ``[EOS]``) and one weight per id.

    BOS, EOS and padding always weigh 1.0.
    """

    input_ids: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class PromptEmbeds:
    """A request's encoded prompts, as diffusers' pipelines take them.

    SDXL adds the pooled text embeddings (the second text encoder's projection of its end
    token), which its UNet takes with the size conditioning; SD1.x has none.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline arguments: the pooled embeddings only where there are some."""
        kwargs = {
            "prompt_embeds": self.prompt_embeds,
            "negative_prompt_embeds": self.negative_prompt_embeds,
        }
        if self.pooled_prompt_embeds is not None:
            kwargs["pooled_prompt_embeds"] = self.pooled_prompt_embeds
        if self.negative_pooled_prompt_embeds is not None:
            kwargs["negative_pooled_prompt_embeds"] = self.negative_pooled_prompt_embeds
        return kwargs


# --- Attention syntax -------------------------------------------------------------------------


def _scale_from(fragments: list[_Fragment], start: int, multiplier: float) -> None:
    """Multiply the weight of every text fragment from ``start`` on (a bracket just closed)."""
    for fragment in fragments[start:]:
        if not fragment.is_break:
            fragment.weight *= multiplier


def _append_text(fragments: list[_Fragment], text: str) -> None:
    """Append plain text, turning each ``BREAK`` keyword (and the spaces around it) into a BREAK."""
    for index, part in enumerate(_BREAK.split(text)):
        if index > 0:
            fragments.append(_Fragment("BREAK", is_break=True))
        fragments.append(_Fragment(part))


def _explicit_weight(match: re.Match[str]) -> float | None:
    """The number of a ``:1.3)`` token; None for other tokens and non-numbers such as "1.2.3"."""
    number = match.group(1)
    if number is None:
        return None
    try:
        return float(number)
    except ValueError:  # A1111 crashes here; we keep the text literally instead
        return None


def _merge_equal_weights(fragments: list[_Fragment]) -> list[_Fragment]:
    """Join neighbouring text fragments of equal weight; BREAKs are never joined."""
    merged: list[_Fragment] = []
    for fragment in fragments:
        last = merged[-1] if merged else None
        if last and not (last.is_break or fragment.is_break) and last.weight == fragment.weight:
            last.text += fragment.text
        else:
            merged.append(fragment)
    return merged


def _parse_fragments(text: str) -> list[_Fragment]:
    """The prompt as weighted fragments and BREAKs, merged (see :func:`parse_prompt_attention`)."""
    fragments: list[_Fragment] = []
    open_round: list[int] = []  # index of the first fragment inside each open "("
    open_square: list[int] = []
    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), _explicit_weight(match)
        if token.startswith("\\"):
            fragments.append(_Fragment(token[1:]))
        elif token in ("(", "["):
            (open_round if token == "(" else open_square).append(len(fragments))
        elif weight is not None and open_round:
            _scale_from(fragments, open_round.pop(), weight)
        elif token == ")" and open_round:
            _scale_from(fragments, open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            _scale_from(fragments, open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, and closers or weights with nothing to close
            _append_text(fragments, token)
    # Brackets never closed apply to the rest of the prompt, as in A1111.
    for start in open_round:
        _scale_from(fragments, start, ROUND_MULTIPLIER)
    for start in open_square:
        _scale_from(fragments, start, SQUARE_MULTIPLIER)
    return _merge_equal_weights(fragments or [_Fragment("")])


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into ``(text, weight)`` runs.

    ``(x)`` multiplies x's weight by 1.1, ``[x]`` divides it by 1.1, ``(x:1.3)`` multiplies it by
    1.3; brackets nest and multiply. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal
    characters; any other backslash is dropped. A closer with nothing to close is literal text;
    an opener never closed applies to the rest of the prompt. The keyword ``BREAK`` is listed as
    :data:`BREAK_FRAGMENT` (``("BREAK", -1.0)``), the way A1111 lists it. Neighbouring runs of
    equal weight are merged; an empty prompt gives ``[("", 1.0)]``. Never raises.
    """
    return [
        BREAK_FRAGMENT if fragment.is_break else (fragment.text, fragment.weight)
        for fragment in _parse_fragments(text)
    ]


# --- Tokens and chunks ------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """Text cleaned the way OpenAI's CLIP tokenizer cleans it before BPE.

    transformers' CLIPTokenizer (the ``tokenizers`` backend) only normalises NFC, whitespace and
    case; the original also repairs mojibake with ftfy and unescapes HTML twice.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE.sub(" ", text).strip()


class _ChunkBuilder:
    """Packs weighted tokens into chunks of 75 the way A1111 does.

    When a chunk is full and a comma is among its last ``COMMA_BACKTRACK`` tokens, the tokens
    after that comma move on to the next chunk so that a phrase is not cut in two.
    """

    def __init__(self, bos: int, eos: int, comma: int | None) -> None:
        self._bos, self._eos, self._comma = bos, eos, comma
        self._ids: list[int] = []
        self._weights: list[float] = []
        self._last_comma = -1  # position of the last comma in the open chunk
        self.chunks: list[PromptChunk] = []

    def add(self, token: int, weight: float) -> None:
        """Append one prompt token, closing the chunk first when it is full."""
        if token == self._comma:
            self._last_comma = len(self._ids)
        elif self._is_full() and self._has_comma_near_end():
            self._move_tail_after_comma()
        if self._is_full():
            self.close()
        self._ids.append(token)
        self._weights.append(weight)

    def close(self) -> None:
        """End the open chunk (even an empty one: that is what BREAK does): pad it to 77."""
        padding = CHUNK_LENGTH - len(self._ids)
        ids = [self._bos, *self._ids, *[self._eos] * padding, self._eos]
        weights = [1.0, *self._weights, *[1.0] * padding, 1.0]
        self.chunks.append(PromptChunk(tuple(ids), tuple(weights)))
        self._ids, self._weights, self._last_comma = [], [], -1

    def finish(self) -> list[PromptChunk]:
        """Close the last chunk if it holds tokens; a prompt always has at least one chunk."""
        if self._ids or not self.chunks:
            self.close()
        return self.chunks

    def _is_full(self) -> bool:
        return len(self._ids) == CHUNK_LENGTH

    def _has_comma_near_end(self) -> bool:
        return self._last_comma != -1 and CHUNK_LENGTH - self._last_comma <= COMMA_BACKTRACK

    def _move_tail_after_comma(self) -> None:
        cut = self._last_comma + 1
        ids, weights = self._ids[cut:], self._weights[cut:]
        del self._ids[cut:], self._weights[cut:]
        self.close()
        self._ids, self._weights = ids, weights


def _comma_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id of the "," word token, or None when the vocabulary has none."""
    token_id = tokenizer.convert_tokens_to_ids(",</w>")
    return token_id if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else None


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """BPE ids of each text, without BOS/EOS and without truncation."""
    if not texts:
        return []
    cleaned = [clean_text(text) for text in texts]
    ids: list[list[int]] = tokenizer(cleaned, add_special_tokens=False, truncation=False)[
        "input_ids"
    ]
    return ids


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[PromptChunk]:
    """The prompt's chunks, at least one; every token of the prompt is in exactly one chunk.

    ``tokenizer`` is SD1's CLIP tokenizer (BOS 49406, EOS = padding 49407). A BREAK closes the
    open chunk, even an empty one, as in A1111.
    """
    fragments = _parse_fragments(prompt)
    texts = [fragment.text for fragment in fragments if not fragment.is_break]
    token_lists = iter(_token_ids(tokenizer, texts))
    builder = _ChunkBuilder(tokenizer.bos_token_id, tokenizer.eos_token_id, _comma_id(tokenizer))
    for fragment in fragments:
        if fragment.is_break:
            builder.close()
            continue
        for token in next(token_lists):
            builder.add(token, fragment.weight)
    return builder.finish()


def empty_chunk(tokenizer: PreTrainedTokenizerBase) -> PromptChunk:
    """The chunk of the empty prompt: ``[BOS]`` then EOS/padding, all of weight 1.0."""
    return tokenize_prompt(tokenizer, "")[0]


# --- Encoding ---------------------------------------------------------------------------------


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's hidden state by its weight, then restore each chunk's mean.

    ``hidden`` is (chunks, 77, width), ``weights`` (chunks, 77). A1111's "Original" emphasis:
    all weights 1.0 return ``hidden`` unchanged.
    """
    original_mean = hidden.mean(dim=(1, 2), keepdim=True)
    weighted = hidden * weights.unsqueeze(-1)
    weighted_mean = weighted.mean(dim=(1, 2), keepdim=True)
    # A chunk whose weighted mean is 0 keeps its scale: 0 / 0 would turn the picture black.
    # (A random-weight CLIP's hidden states can average to exactly 0 in float32.)
    unchanged = torch.ones_like(weighted_mean)
    scale = torch.where(weighted_mean == 0, unchanged, original_mean / weighted_mean)
    return weighted * scale


def encode_chunks(
    text_encoder: CLIPTextModel, chunks: list[PromptChunk], clip_skip: int = 1
) -> torch.Tensor:
    """Hidden states of ``chunks``, weighted: a float32 tensor (len(chunks), 77, width).

    All chunks go through the encoder in one batch; each is encoded on its own (CLIP's causal
    attention does not look across the batch), like A1111's one call per chunk. ``clip_skip``
    k > 1 takes the output of the k-th layer from the end through the final layer norm, as
    A1111's "Clip skip" does; EngineError if the encoder has fewer than k layers.
    """
    device = text_encoder.device
    input_ids = torch.tensor([chunk.input_ids for chunk in chunks], device=device)
    weights = torch.tensor([chunk.weights for chunk in chunks], device=device)
    with torch.no_grad():  # no_grad, not inference_mode: callers may update the result in place
        hidden = _hidden_states(text_encoder, input_ids, clip_skip)
        # Weighting in float32: the chunk means of fp16 hidden states lose digits.
        return apply_emphasis(hidden.float(), weights.float())


def _hidden_states(text_encoder: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int) -> Any:
    if clip_skip == 1:
        return text_encoder(input_ids=input_ids).last_hidden_state
    layers = text_encoder.config.num_hidden_layers
    if clip_skip > layers:
        raise EngineError(
            f"clip_skip {clip_skip} is more than the {layers} layers of this checkpoint's text "
            f"encoder; use at most {layers}"
        )
    output = text_encoder(input_ids=input_ids, output_hidden_states=True)
    # transformers >= 5.6 dropped the ``text_model`` level of CLIPTextModel.
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return norm(output.hidden_states[-clip_skip])


def _pad_chunks(chunks: list[PromptChunk], count: int, padding: PromptChunk) -> list[PromptChunk]:
    return chunks + [padding] * (count - len(chunks))


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: CLIPTextModel,
    prompt: str,
    negative_prompt: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    clip_skip: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, negative_prompt_embeds)`` for diffusers' Stable Diffusion pipelines.

    Both are (1, 77 * k, width) on ``device`` in ``dtype``, where k is the larger chunk count of
    the two prompts; the shorter one is padded with chunks of the empty prompt (A1111's
    "pad_cond_uncond"). The prompts use A1111 syntax (see :func:`parse_prompt_attention`); LoRA
    tags must have been removed first (:func:`dan.prompt_tags.extract_lora_tags`). ``clip_skip``
    as in :func:`encode_chunks`. No gradients are tracked.
    """
    positive = tokenize_prompt(tokenizer, prompt)
    negative = tokenize_prompt(tokenizer, negative_prompt)
    count = max(len(positive), len(negative))
    padding = empty_chunk(tokenizer)
    chunks = _pad_chunks(positive, count, padding) + _pad_chunks(negative, count, padding)
    hidden = encode_chunks(text_encoder, chunks, clip_skip)
    # Chunk-major rows: the first `count` rows, laid end to end, are the prompt's sequence.
    embeds = hidden.reshape(2, count * hidden.shape[1], hidden.shape[2])
    embeds = embeds.to(device=device, dtype=dtype)
    return embeds[:1], embeds[1:]
