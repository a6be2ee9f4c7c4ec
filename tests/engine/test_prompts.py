"""A1111 prompt syntax, chunking with the real CLIP tokenizer, and weighted encoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dan.engine.generation.prompts import (
    BREAK_FRAGMENT,
    PromptChunk,
    apply_emphasis,
    clean_text,
    encode_prompts,
    parse_prompt_attention,
    tokenize_prompt,
)
from dan.engine.loading.tokenizer import ensure_tokenizer
from dan.errors import InvalidArgument
from dan.prompt_tags import extract_lora_tags

BOS, EOS, COMMA = 49406, 49407, 267
A_ID = 320  # "a</w>": one token per word, handy for counting


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    folder: Path = ensure_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def text_encoder() -> CLIPTextModel:
    """A 2-layer CLIP text model with SD1's vocabulary and 77 positions, fixed seed."""
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPTextModel(config).eval()
        # A fresh final LayerNorm (weight 1, bias 0) makes every token's hidden state average 0,
        # so the chunk mean that emphasis restores would be noise. Trained CLIP has a real bias.
        with torch.no_grad():
            model.final_layer_norm.bias.normal_(mean=0.5, std=0.5)
    return model


def prompt_ids(chunks: list[PromptChunk]) -> list[int]:
    """The prompt tokens of ``chunks``: BOS, EOS and padding left out."""
    return [i for chunk in chunks for i in chunk.input_ids if i not in (BOS, EOS)]


# --- parse_prompt_attention -------------------------------------------------------------------

# The examples of A1111's own docstring, with its outputs.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_EXAMPLES)
def test_parser_reproduces_a1111_examples(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\(a\\) \\[b\\] c\\\\d", [("(a) [b] c\\d", 1.0)]),
        ("a\\b", [("ab", 1.0)]),  # a backslash before anything else is dropped
        ("\\((a)\\)", [("(", 1.0), ("a", 1.1), (")", 1.0)]),
        ("a) b] c:1.2)", [("a) b] c:1.2)", 1.0)]),  # closers with nothing to close are text
        ("", [("", 1.0)]),
    ],
)
def test_escapes_and_stray_closers_are_literal(
    text: str, expected: list[tuple[str, float]]
) -> None:
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "weight"),
    [
        ("((a))", 1.1 * 1.1),
        ("(((a)))", 1.1 * 1.1 * 1.1),
        ("[[a]]", 1 / 1.1 / 1.1),
        ("((a:1.5))", 1.5 * 1.1),
        ("[(a:2)]", 2 / 1.1),
        ("(a: 1.3 )", 1.3),  # spaces around the number are allowed
        ("(a:-1)", -1.0),
        ("(a:.5)", 0.5),
    ],
)
def test_nested_and_explicit_weights_multiply(text: str, weight: float) -> None:
    [(fragment, actual)] = parse_prompt_attention(text)
    assert fragment == "a"
    assert actual == pytest.approx(weight)


def test_unbalanced_openers_weight_the_rest_of_the_prompt() -> None:
    parsed = parse_prompt_attention("x (a [b")
    assert [text for text, _ in parsed] == ["x ", "a ", "b"]
    assert [w for _, w in parsed] == pytest.approx([1.0, 1.1, 1.0])


def test_a_weight_that_is_not_a_number_stays_text() -> None:
    # A1111 raises here; we keep the text, and the bracket stays open.
    assert parse_prompt_attention("(a:1.2.3) b") == [("a:1.2.3) b", 1.1)]


def test_break_is_listed_as_a1111_does() -> None:
    assert parse_prompt_attention("a cat BREAK a dog") == [
        ("a cat", 1.0),
        BREAK_FRAGMENT,
        ("a dog", 1.0),
    ]
    assert BREAK_FRAGMENT == ("BREAK", -1.0)
    # Only the whole word: "BREAKING" and "xBREAK" are text.
    assert parse_prompt_attention("BREAKING xBREAK") == [("BREAKING xBREAK", 1.0)]


def test_break_inside_brackets_keeps_its_marker() -> None:
    assert parse_prompt_attention("(a BREAK b:-1)") == [("a", -1.0), BREAK_FRAGMENT, ("b", -1.0)]


# --- extract_lora_tags ------------------------------------------------------------------------


def test_lora_tags_are_removed_and_listed_in_order() -> None:
    prompt, loras = extract_lora_tags("a cat <lora:film grain:0.6>, <lora:add_detail> <lyco:x:1>")
    assert prompt == "a cat ,  <lyco:x:1>"
    assert loras == [("film grain", 0.6), ("add_detail", 1.0)]


def test_lora_tag_weights_may_be_negative_and_spaced() -> None:
    assert extract_lora_tags("<lora:a: -0.5 >")[1] == [("a", -0.5)]
    assert extract_lora_tags("no tags") == ("no tags", [])


@pytest.mark.parametrize("tag", ["<lora:a:heavy>", "<lora:a:nan>", "<lora:a:0.8:0.5>", "<lora::1>"])
def test_malformed_lora_tags_are_refused(tag: str) -> None:
    with pytest.raises(InvalidArgument, match="lora"):
        extract_lora_tags(f"a cat {tag}")


# --- Chunking with the real tokenizer ---------------------------------------------------------


def test_clean_text_repairs_mojibake_and_html() -> None:
    assert clean_text("  caf\u00c3\u00a9 &amp;amp;  co\n") == "café & co"


def test_cleaning_applies_before_tokenizing(tokenizer: CLIPTokenizer) -> None:
    assert prompt_ids(tokenize_prompt(tokenizer, "caf\u00c3\u00a9 &amp; co")) == prompt_ids(
        tokenize_prompt(tokenizer, "café & co")
    )


def test_short_prompt_is_one_chunk_like_the_plain_tokenizer(tokenizer: CLIPTokenizer) -> None:
    [chunk] = tokenize_prompt(tokenizer, "a photo of a cat")
    expected = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert list(chunk.input_ids) == expected
    assert chunk.weights == (1.0,) * 77


def test_empty_prompt_is_one_padded_chunk(tokenizer: CLIPTokenizer) -> None:
    [chunk] = tokenize_prompt(tokenizer, "")
    assert chunk.input_ids == (BOS, *[EOS] * 76)


def test_75_tokens_fit_one_chunk(tokenizer: CLIPTokenizer) -> None:
    [chunk] = tokenize_prompt(tokenizer, "a " * 75)
    assert chunk.input_ids == (BOS, *[A_ID] * 75, EOS)


def test_76_tokens_take_two_chunks_and_drop_nothing(tokenizer: CLIPTokenizer) -> None:
    chunks = tokenize_prompt(tokenizer, "a " * 76)
    assert [len(chunk.input_ids) for chunk in chunks] == [77, 77]
    assert chunks[1].input_ids == (BOS, A_ID, *[EOS] * 75)
    assert prompt_ids(chunks) == [A_ID] * 76


def test_long_prompt_keeps_every_token(tokenizer: CLIPTokenizer) -> None:
    prompt = " ".join(f"word{i} and (thing{i}:1.2), [detail {i}]" for i in range(30))
    chunks = tokenize_prompt(tokenizer, prompt)
    plain = prompt.replace("(", "").replace(")", "").replace(":1.2", "")
    plain = plain.replace("[", "").replace("]", "")
    assert len(chunks) > 2
    assert prompt_ids(chunks) == tokenizer(plain, add_special_tokens=False).input_ids


def test_overflow_moves_the_words_after_a_near_comma(tokenizer: CLIPTokenizer) -> None:
    b_id = tokenizer("b", add_special_tokens=False).input_ids[0]
    first, second = tokenize_prompt(tokenizer, "a " * 70 + ", " + "b " * 10)
    # The four "b" that fitted after the comma moved on with the other six.
    assert first.input_ids == (BOS, *[A_ID] * 70, COMMA, *[EOS] * 5)
    assert second.input_ids == (BOS, *[b_id] * 10, *[EOS] * 66)


def test_overflow_ignores_a_comma_further_back(tokenizer: CLIPTokenizer) -> None:
    b_id = tokenizer("b", add_special_tokens=False).input_ids[0]
    first, second = tokenize_prompt(tokenizer, "a " * 40 + ", " + "b " * 40)
    assert first.input_ids == (BOS, *[A_ID] * 40, COMMA, *[b_id] * 34, EOS)
    assert second.input_ids[:8] == (BOS, *[b_id] * 6, EOS)


def test_break_starts_a_new_chunk(tokenizer: CLIPTokenizer) -> None:
    first, second = tokenize_prompt(tokenizer, "a cat BREAK a dog")
    cat, dog = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("cat", "dog"))
    assert first.input_ids[:4] == (BOS, A_ID, cat, EOS)
    assert second.input_ids[:4] == (BOS, A_ID, dog, EOS)


def test_chunk_weights_follow_the_tokens(tokenizer: CLIPTokenizer) -> None:
    [chunk] = tokenize_prompt(tokenizer, "a (cat:1.5) [sits]")
    assert chunk.weights[:5] == (1.0, 1.0, 1.5, pytest.approx(1 / 1.1), 1.0)
    assert set(chunk.weights[5:]) == {1.0}


# --- Encoding ---------------------------------------------------------------------------------


def encode(
    tokenizer: CLIPTokenizer, encoder: CLIPTextModel, prompt: str, negative: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_prompts(tokenizer, encoder, prompt, negative, device="cpu", dtype=torch.float32)


def test_short_prompts_give_one_chunk_each(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel
) -> None:
    positive, negative = encode(tokenizer, text_encoder, "a cat", "blurry")
    assert positive.shape == negative.shape == (1, 77, 32)


def test_long_prompt_is_concatenated_and_the_negative_padded(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel
) -> None:
    positive, negative = encode(tokenizer, text_encoder, "a " * 80, "blurry")
    assert positive.shape == negative.shape == (1, 154, 32)
    _, empty = encode(tokenizer, text_encoder, "a cat", "")
    # The negative's second chunk is the empty prompt's encoding; its first is "blurry" alone.
    torch.testing.assert_close(negative[:, 77:], empty)
    _, blurry = encode(tokenizer, text_encoder, "a cat", "blurry")
    torch.testing.assert_close(negative[:, :77], blurry)


def test_long_negative_pads_the_prompt(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel
) -> None:
    positive, negative = encode(tokenizer, text_encoder, "a cat", "a " * 160)
    assert positive.shape == negative.shape == (1, 231, 32)


def test_unweighted_prompt_matches_the_plain_encoder(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel
) -> None:
    prompt = "a photo of a cat, highly detailed"
    positive, _ = encode(tokenizer, text_encoder, prompt)
    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = text_encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(positive, plain)


def test_weight_changes_tokens_but_keeps_the_chunk_mean(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel
) -> None:
    plain, _ = encode(tokenizer, text_encoder, "a cat on a mat")
    weighted, _ = encode(tokenizer, text_encoder, "a (cat:1.5) on a mat")
    assert not torch.allclose(plain, weighted)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    # Relative to its neighbours, "cat" got heavier.
    ratio = weighted[0, :, :].norm(dim=-1) / plain[0, :, :].norm(dim=-1)
    assert ratio[2] > ratio[1] * 1.4


def test_embeddings_come_in_the_requested_dtype(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel
) -> None:
    positive, negative = encode_prompts(
        tokenizer, text_encoder, "(a cat)", "", device="cpu", dtype=torch.bfloat16
    )
    assert positive.dtype == negative.dtype == torch.bfloat16
    assert not positive.requires_grad


def test_encoding_is_deterministic(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
    first = encode(tokenizer, text_encoder, "a (cat:1.3) BREAK [dog]", "ugly")
    second = encode(tokenizer, text_encoder, "a (cat:1.3) BREAK [dog]", "ugly")
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_emphasis_of_hidden_states_that_average_to_zero_is_not_nan() -> None:
    # A random-weight CLIP (zero final LayerNorm bias) can give hidden states whose mean is 0.0
    # exactly in float32; the rescale by the mean must not divide 0 by 0 into a black picture.
    hidden = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])
    ones = torch.ones(1, 2)
    assert torch.equal(apply_emphasis(hidden, ones), hidden)
    weighted = apply_emphasis(hidden, torch.tensor([[1.5, 1.0]]))
    assert not weighted.isnan().any()
    assert torch.equal(weighted, hidden * torch.tensor([[[1.5], [1.0]]]))
