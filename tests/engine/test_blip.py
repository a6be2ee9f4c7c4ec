"""The BLIP captioner on a tiny random BLIP in Salesforce's original checkpoint layout."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from PIL.Image import Image

from dan.engine.interrogation.blip import PROMPT, BlipCaptioner, text_config, vision_config
from dan.errors import EngineError
from tests.fixtures.tiny_blip import blip_state_dict, write_blip_checkpoint, write_vocabulary

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("blip")


@pytest.fixture(scope="module")
def vocab(blip_dir: Path) -> Path:
    return write_vocabulary(blip_dir / "vocab.txt")


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """The tiny BLIP's original state dict (seed 0). Do not modify it."""
    return blip_state_dict()


@pytest.fixture(scope="module")
def captioner(state: dict[str, torch.Tensor], blip_dir: Path, vocab: Path) -> BlipCaptioner:
    weights = write_blip_checkpoint(state, blip_dir / "tiny_blip.pth")
    return BlipCaptioner.load(weights, vocab, CPU, torch.float16)


@pytest.fixture
def image() -> Image:
    """A 48 x 40 RGBA noise image (seed 0): neither square nor the model's size, nor RGB."""
    rng = np.random.default_rng(0)
    return PILImage.fromarray(rng.integers(0, 256, (40, 48, 4), dtype=np.uint8), "RGBA")


def test_caption_is_deterministic_text_without_the_prompt(
    captioner: BlipCaptioner, image: Image
) -> None:
    caption = captioner.caption(image)
    assert isinstance(caption, str) and caption.strip()
    assert not caption.startswith(PROMPT.strip())
    assert captioner.caption(image) == caption


def test_sizes_come_from_the_file_and_weights_land_where_blip_had_them(
    captioner: BlipCaptioner, state: dict[str, torch.Tensor]
) -> None:
    model = captioner.model
    assert captioner.image_size == 32 and captioner.dtype == torch.float32  # fp32 on CPUs
    assert model.config.vision_config.num_attention_heads == 2
    assert model.config.text_config.num_hidden_layers == 2
    vision = model.vision_model
    block = vision.encoder.layers[1]
    pairs = {
        "visual_encoder.cls_token": vision.embeddings.class_embedding,
        "visual_encoder.blocks.1.attn.proj.weight": block.self_attn.projection.weight,
        "visual_encoder.norm.bias": vision.post_layernorm.bias,
        "text_decoder.cls.predictions.bias": model.text_decoder.cls.predictions.decoder.bias,
    }
    for key, parameter in pairs.items():
        assert torch.equal(parameter.detach(), state[key]), key


def test_legacy_serialisation_loads(
    state: dict[str, torch.Tensor], blip_dir: Path, vocab: Path
) -> None:
    """torch's pre-1.6 format reads with weights_only too (BLIP's file may predate the zip one)."""
    weights = write_blip_checkpoint(state, blip_dir / "legacy.pth", legacy=True)
    assert BlipCaptioner.load(weights, vocab, CPU, torch.float32).image_size == 32


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("drop", "visual_encoder.blocks.1.attn.proj.weight"),
        ("drop", "text_decoder.bert.encoder.layer.0.crossattention.self.key.bias"),
        ("add", "visual_encoder_m.cls_token"),
    ],
)
def test_wrong_keys_are_named(
    state: dict[str, torch.Tensor], tmp_path: Path, vocab: Path, change: str, named: str
) -> None:
    broken = dict(state)
    if change == "drop":
        del broken[named]
    else:
        broken[named] = torch.zeros(1)
    weights = write_blip_checkpoint(broken, tmp_path / "broken.pth")
    with pytest.raises(EngineError, match=r"broken\.pth.*" + re.escape(named)):
        BlipCaptioner.load(weights, vocab, CPU, torch.float32)


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path: Path, vocab: Path) -> None:
    weights = tmp_path / "notes.pth"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(EngineError, match=r"notes\.pth"):
        BlipCaptioner.load(weights, vocab, CPU, torch.float32)


def test_a_state_dict_without_the_model_wrapper_is_refused(
    state: dict[str, torch.Tensor], tmp_path: Path, vocab: Path
) -> None:
    weights = tmp_path / "bare.pth"
    torch.save(state, weights)
    with pytest.raises(EngineError, match=r"bare\.pth is not an original BLIP checkpoint"):
        BlipCaptioner.load(weights, vocab, CPU, torch.float32)


def test_a_vocabulary_of_another_size_is_refused(
    state: dict[str, torch.Tensor], blip_dir: Path, tmp_path: Path, vocab: Path
) -> None:
    weights = write_blip_checkpoint(state, blip_dir / "tiny_blip.pth")
    longer = tmp_path / "vocab.txt"
    longer.write_text(vocab.read_text(encoding="utf-8") + "extra\n", encoding="utf-8")
    with pytest.raises(EngineError, match=r"tiny_blip\.pth has \d+ tokens"):
        BlipCaptioner.load(weights, longer, CPU, torch.float32)


def test_tied_tensors_stored_once_and_no_position_ids_still_load(
    state: dict[str, torch.Tensor], tmp_path: Path, vocab: Path
) -> None:
    lean = dict(state)
    for key in (
        "text_decoder.cls.predictions.decoder.weight",
        "text_decoder.cls.predictions.decoder.bias",
        "text_decoder.bert.embeddings.position_ids",
    ):
        del lean[key]
    weights = write_blip_checkpoint(lean, tmp_path / "lean.pth")
    head = BlipCaptioner.load(weights, vocab, CPU, torch.float32).model.text_decoder.cls
    assert torch.equal(
        head.predictions.decoder.weight.detach(),
        state["text_decoder.bert.embeddings.word_embeddings.weight"],
    )


def test_the_real_checkpoints_sizes_are_read_from_its_shapes() -> None:
    """model_base_caption_capfilt_large.pth's shapes (as meta tensors): ViT-B/16 at 384 px."""
    shapes = {
        "visual_encoder.cls_token": (1, 1, 768),
        "visual_encoder.pos_embed": (1, 577, 768),
        "visual_encoder.patch_embed.proj.weight": (768, 3, 16, 16),
        "visual_encoder.blocks.11.mlp.fc1.weight": (3072, 768),
        "visual_encoder.blocks.0.mlp.fc1.weight": (3072, 768),
        "text_decoder.bert.embeddings.word_embeddings.weight": (30524, 768),
        "text_decoder.bert.embeddings.position_embeddings.weight": (512, 768),
        "text_decoder.bert.encoder.layer.0.intermediate.dense.weight": (3072, 768),
        "text_decoder.bert.encoder.layer.11.output.dense.weight": (768, 3072),
    }
    state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    vision = vision_config(state, "real.pth")
    text = text_config(state, _BertUncasedWithBlipTokens(), "real.pth")
    assert vision["image_size"] == 384 and vision["patch_size"] == 16
    assert vision["num_hidden_layers"] == text["num_hidden_layers"] == 12
    assert vision["num_attention_heads"] == text["num_attention_heads"] == 12
    assert text["bos_token_id"] == 30522 and text["eos_token_id"] == 102


class _BertUncasedWithBlipTokens:
    """What text_config reads of bert-base-uncased's tokenizer after BLIP adds [DEC] and [ENC]."""

    bos_token_id, pad_token_id, sep_token_id = 30522, 0, 102

    def __len__(self) -> int:
        return 30524
