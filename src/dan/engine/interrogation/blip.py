"""The BLIP captioner behind the ``clip`` interrogator, loaded from Salesforce's original file.

AUTOMATIC1111's "Interrogate CLIP" starts from a caption written by BLIP's
``model_base_caption_capfilt_large.pth``: Salesforce's own checkpoint, not a Hugging Face export.
It holds ``{"model": state_dict}`` of BLIP's ``BLIP_Decoder``: a timm-style ViT
(``visual_encoder.*``) and a BERT decoder with cross-attention (``text_decoder.bert.*``,
``text_decoder.cls.*``). transformers' ``BlipForConditionalGeneration`` is the same network; its
text decoder already uses BLIP's names, so only the ViT's keys are renamed. Every size is read
from tensor shapes and the model is built from a config object (never from the hub), so a tiny
random file in the same layout loads through the same code.

Captions are made as A1111 makes them: the image resized to the model's side (bicubic) and
normalised with CLIP's mean and std, the prompt ``"a picture of "``, greedy decoding
(``num_beams=1``, no sampling) with ``min_length=24`` and ``max_length=48`` tokens counting the
prompt, and the prompt's characters cut off the decoded text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from PIL.Image import Image
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

from dan.engine.loading.pickles import load_pickle
from dan.engine.loading.shapes import Limits, check_tensors
from dan.errors import EngineError

StateDict = dict[str, torch.Tensor]

PROMPT = "a picture of "
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
NUM_BEAMS, MIN_LENGTH, MAX_LENGTH = 1, 24, 48  # A1111's interrogate_clip_* defaults

HEAD_DIM = 64  # BLIP's ViT-B/16 and its BERT-base decoder both use 64-wide attention heads
VISION_LAYER_NORM_EPS = 1e-6  # BLIP's ViT; transformers' BlipVisionConfig default is 1e-5
TEXT_LAYER_NORM_EPS = 1e-12  # BERT's
DECODER_BOS, ENCODER_TOKEN = "[DEC]", "[ENC]"  # the tokens BLIP's init_tokenizer adds, in order

# A ViT and a BERT: at most 4-d (the patch embedding), no side near the bound.
BLIP_LIMITS = Limits("a BLIP checkpoint", max_rank=4, max_side=1 << 17)
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Keys BLIP's checkpoint carries that the captioner does not load: BERT's position_ids buffer,
# which transformers rebuilds (non-persistent) instead of reading it.
UNUSED_KEYS = frozenset({"text_decoder.bert.embeddings.position_ids"})

# BLIP ties its LM head to the word embeddings and the head's bias, so torch saves each tensor
# under both names; a file that kept only one name of a pair is still complete.
LM_HEAD = "text_decoder.cls.predictions."
TIED_KEYS = {
    LM_HEAD + "decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    LM_HEAD + "decoder.bias": LM_HEAD + "bias",
}

# (BLIP name, transformers name) of the ViT's tensors; ``{n}`` is a block number. A name ending
# in "." is a prefix, any other a whole key. The text decoder's names are the same on both sides.
VISION_KEYS = (
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.norm.", "vision_model.post_layernorm."),
    ("visual_encoder.blocks.{n}.norm1.", "vision_model.encoder.layers.{n}.layer_norm1."),
    ("visual_encoder.blocks.{n}.norm2.", "vision_model.encoder.layers.{n}.layer_norm2."),
    ("visual_encoder.blocks.{n}.attn.qkv.", "vision_model.encoder.layers.{n}.self_attn.qkv."),
    (
        "visual_encoder.blocks.{n}.attn.proj.",
        "vision_model.encoder.layers.{n}.self_attn.projection.",
    ),
    ("visual_encoder.blocks.{n}.mlp.", "vision_model.encoder.layers.{n}.mlp."),
)


# --- key names -------------------------------------------------------------------------------


def _translate(key: str, *, reverse: bool) -> str:
    """``key`` renamed by the first VISION_KEYS rule that matches it; unchanged if none does."""
    for blip, transformers in VISION_KEYS:
        source, target = (transformers, blip) if reverse else (blip, transformers)
        pattern = "^" + re.escape(source).replace(r"\{n\}", r"(\d+)")
        match = re.match(pattern if source.endswith(".") else pattern + "$", key)
        if match is not None:
            block = match.group(1) if match.groups() else ""
            return target.replace("{n}", block) + key[match.end() :]
    return key


def to_transformers_key(key: str) -> str:
    """The name transformers' BLIP gives the tensor BLIP's checkpoint calls ``key``."""
    return _translate(key, reverse=False)


def to_blip_key(key: str) -> str:
    """The name BLIP's checkpoint gives the tensor transformers' BLIP calls ``key``."""
    return _translate(key, reverse=True)


# --- files -----------------------------------------------------------------------------------


def _summary(exc: Exception, limit: int = 200) -> str:
    """The exception's type and message on one line, cut to about ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_blip_state(path: Path) -> StateDict:
    """The ``model`` state dict of an original BLIP checkpoint, on the CPU.

    Read with ``weights_only=True``: tensors and plain containers only, no code runs. Raises
    EngineError naming the file when it cannot be read, declares more than it holds (see
    :mod:`dan.engine.loading.pickles`), is not a dict whose ``model`` entry maps names to
    tensors, or has shapes no BLIP model has.
    """
    # Salesforce's file should need nothing more: at 896,081,425 bytes it is the ~224M fp32
    # weights alone (no optimizer state). Not checked against the real file: it is not offline.
    try:
        checkpoint = load_pickle(path, EngineError)
    except EngineError:
        raise
    except Exception as exc:  # missing, truncated, not a pickle, or pickled objects: one verdict
        raise EngineError(f"cannot read BLIP checkpoint {path.name}: {_summary(exc)}") from exc
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise EngineError(
            f"{path.name} is not an original BLIP checkpoint: expected a dict whose 'model' "
            "entry is a state dict of tensors"
        )
    check_tensors(path.name, state, BLIP_LIMITS, EngineError)
    return state


def read_vocabulary(path: Path) -> dict[str, int]:
    """BERT's ``vocab.txt`` as token -> id (the line number), read the way BERT reads it.

    Raises EngineError naming the file when it cannot be read or lacks a BERT special token.
    """
    try:
        with path.open(encoding="utf-8") as lines:
            tokens = [line.rstrip("\n") for line in lines]
    except (OSError, UnicodeDecodeError) as exc:
        raise EngineError(f"cannot read BLIP vocabulary {path.name}: {_summary(exc)}") from exc
    vocabulary = {token: index for index, token in enumerate(tokens)}
    absent = [token for token in BERT_SPECIAL_TOKENS if token not in vocabulary]
    if absent:
        raise EngineError(f"{path.name} is not a BERT vocabulary: it lacks {', '.join(absent)}")
    return vocabulary


def build_tokenizer(vocab: Path) -> Any:
    """bert-base-uncased's tokenizer from ``vocab`` plus BLIP's ``[DEC]`` (bos) and ``[ENC]``.

    The two added tokens take the ids after the vocabulary, in that order, as in BLIP's
    ``init_tokenizer``. Raises EngineError naming the file when it is not a BERT vocabulary.
    """
    tokenizer = BertTokenizer(vocab=read_vocabulary(vocab), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": DECODER_BOS})
    tokenizer.add_special_tokens({"additional_special_tokens": [ENCODER_TOKEN]})
    return tokenizer


# --- sizes from shapes -----------------------------------------------------------------------


def _shape(state: Mapping[str, torch.Tensor], key: str, name: str) -> tuple[int, ...]:
    tensor = state.get(key)
    if tensor is None:
        raise EngineError(f"{name} is not a BLIP captioning checkpoint: it has no {key}")
    return tuple(tensor.shape)


def _layer_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered layers ``prefix<i>.`` the state dict has (highest number + 1)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    numbers = [int(m.group(1)) for key in state if (m := pattern.match(key)) is not None]
    return max(numbers, default=-1) + 1


def _heads(width: int, part: str, name: str) -> int:
    if width % HEAD_DIM != 0:
        raise EngineError(
            f"{name}: the {part} is {width} wide, not a multiple of BLIP's {HEAD_DIM}-wide "
            "attention heads"
        )
    return width // HEAD_DIM


def vision_config(state: Mapping[str, torch.Tensor], name: str) -> dict[str, Any]:
    """The ViT's BlipVisionConfig arguments, read from BLIP-named tensor shapes."""
    width = _shape(state, "visual_encoder.cls_token", name)[-1]
    patch = _shape(state, "visual_encoder.patch_embed.proj.weight", name)[-1]
    patches = _shape(state, "visual_encoder.pos_embed", name)[1] - 1  # minus the class token
    side = math.isqrt(max(patches, 0))
    if patches < 1 or side * side != patches:
        raise EngineError(f"{name}: {patches} position embeddings do not form a square image")
    return {
        "hidden_size": width,
        "intermediate_size": _shape(state, "visual_encoder.blocks.0.mlp.fc1.weight", name)[0],
        "num_hidden_layers": _layer_count(state, "visual_encoder.blocks."),
        "num_attention_heads": _heads(width, "vision transformer", name),
        "image_size": side * patch,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": VISION_LAYER_NORM_EPS,
    }


def text_config(state: Mapping[str, torch.Tensor], tokenizer: Any, name: str) -> dict[str, Any]:
    """The decoder's BlipTextConfig arguments, read from shapes and the tokenizer's ids.

    Raises EngineError when the checkpoint's vocabulary size differs from the tokenizer's.
    """
    layer = "text_decoder.bert.encoder.layer."
    vocab_size, width = _shape(state, "text_decoder.bert.embeddings.word_embeddings.weight", name)
    if vocab_size != len(tokenizer):
        raise EngineError(
            f"{name} has {vocab_size} tokens, but the vocabulary with BLIP's {DECODER_BOS} and "
            f"{ENCODER_TOKEN} has {len(tokenizer)}: they do not belong together"
        )
    return {
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": _shape(state, layer + "0.intermediate.dense.weight", name)[0],
        "num_hidden_layers": _layer_count(state, layer),
        "num_attention_heads": _heads(width, "text decoder", name),
        "max_position_embeddings": _shape(
            state, "text_decoder.bert.embeddings.position_embeddings.weight", name
        )[0],
        "hidden_act": "gelu",
        "layer_norm_eps": TEXT_LAYER_NORM_EPS,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,  # BLIP ends a caption with [SEP]
        # The head's weights are loaded as stored rather than tied: the file says what they are.
        "tie_word_embeddings": False,
    }


def build_config(state: Mapping[str, torch.Tensor], tokenizer: Any, name: str) -> Any:
    """The BlipConfig of a BLIP-named state dict. Raises EngineError for an unknown layout."""
    return BlipConfig(
        vision_config=vision_config(state, name),
        text_config=text_config(state, tokenizer, name),
        tie_word_embeddings=False,
    )


# --- the model -------------------------------------------------------------------------------


def convert_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    """BLIP's state dict under transformers' names, tied pairs completed, UNUSED_KEYS dropped."""
    complete = dict(state)
    for key, source in TIED_KEYS.items():
        if key not in complete and source in complete:
            complete[key] = complete[source]
    return {to_transformers_key(k): v for k, v in complete.items() if k not in UNUSED_KEYS}


def _key_report(name: str, missing: list[str], unexpected: list[str], shown: int = 3) -> str:
    """Which keys are wrong, a few of each, in the checkpoint's own (BLIP) names."""
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
            parts.append(f"{label} {', '.join(to_blip_key(k) for k in keys[:shown])}{more}")
    return f"{name} does not fit BLIP's captioning model: {'; '.join(parts)}"


def build_model(state: StateDict, config: Any, name: str) -> Any:
    """BlipForConditionalGeneration of ``config`` holding ``state`` (transformers names), eval.

    The load is strict. Raises EngineError naming missing or unexpected keys, or a tensor whose
    shape does not fit the sizes read from the others.
    """
    model = BlipForConditionalGeneration(config)
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise EngineError(_key_report(name, missing, unexpected))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # size mismatches
        raise EngineError(f"{name} is a damaged BLIP checkpoint: {_summary(exc, 300)}") from exc
    return model.eval()


def pixel_values(image: Image, size: int) -> torch.Tensor:
    """(1, 3, size, size) fp32: RGB, bicubic resize, normalised as BLIP's captioner expects."""
    rgb = image.convert("RGB").resize((size, size), PILImage.Resampling.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    pixels = torch.from_numpy(array).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


class BlipCaptioner:
    """A BLIP captioning model and its tokenizer, loaded on one device.

    ``caption`` is deterministic: the same image gives the same caption (greedy decoding).
    """

    def __init__(
        self, model: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.image_size: int = model.config.vision_config.image_size

    @classmethod
    def load(
        cls, weights: Path, vocab: Path, device: torch.device, dtype: torch.dtype
    ) -> BlipCaptioner:
        """The captioner of an original BLIP checkpoint and bert-base-uncased's ``vocab.txt``.

        Runs in ``dtype`` on GPUs and in fp32 on CPUs. Raises EngineError naming the file that is
        unreadable or does not have BLIP's captioning layout.
        """
        tokenizer = build_tokenizer(vocab)
        state = read_blip_state(weights)
        config = build_config(state, tokenizer, weights.name)
        model = build_model(convert_state(state), config, weights.name)
        run_dtype = torch.float32 if device.type == "cpu" else dtype
        return cls(model.to(device=device, dtype=run_dtype), tokenizer, device, run_dtype)

    def caption(self, image: Image) -> str:
        """What BLIP says ``image`` shows, without the ``"a picture of "`` prompt."""
        pixels = pixel_values(image, self.image_size).to(self.device, self.dtype)
        prompt = self.tokenizer(PROMPT, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            # BLIP's generate swaps the leading [CLS] for [DEC] and drops the trailing [SEP].
            ids = self.model.generate(
                pixel_values=pixels,
                input_ids=prompt.input_ids,
                attention_mask=prompt.attention_mask,
                num_beams=NUM_BEAMS,
                do_sample=False,
                min_length=MIN_LENGTH,
                max_length=MAX_LENGTH,
            )
        text: str = self.tokenizer.decode(
            ids[0], skip_special_tokens=True, clean_up_tokenization_spaces=True
        )
        return text[len(PROMPT) :]  # as BLIP does: the decoded text starts with the prompt
