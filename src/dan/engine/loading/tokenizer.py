"""The CLIP tokenizer of Stable Diffusion 1.x, built offline from the vocabulary open-clip ships.

open-clip-torch carries OpenAI's BPE merge list (``bpe_simple_vocab_16e6.txt.gz``) inside its
wheel. OpenAI's tokenizer derives its vocabulary from that list: the 256 byte characters, the
same with ``</w>``, one entry per merge among the first 48,894, then the two special tokens
(49,408 entries). We write that table as ``vocab.json`` + ``merges.txt`` so that
``transformers.CLIPTokenizer`` loads it with no hub access. The module is located with
``find_spec`` and never imported (importing open_clip would import torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from dan.errors import EngineError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2  # OpenAI keeps this many merges
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def find_bpe_vocabulary() -> Path:
    """Path of the BPE file inside the installed open-clip-torch package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise EngineError(
            "open-clip-torch is not installed; it provides the CLIP vocabulary "
            "(pip install --no-deps open-clip-torch==3.3.0)"
        )
    path = Path(spec.origin).parent / VOCAB_FILE
    if not path.is_file():
        raise EngineError(f"open-clip-torch has no {VOCAB_FILE} at {path}")
    return path


@lru_cache(maxsize=1)
def _byte_characters() -> tuple[str, ...]:
    """OpenAI's reversible byte -> printable unicode character table, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # The vocabulary lists the printable bytes first, then the remapped ones, as OpenAI does.
    return tuple(table[b] for b in printable) + tuple(
        table[b] for b in range(256) if b not in printable
    )


def build_vocabulary(bpe_file: Path) -> tuple[dict[str, int], list[str]]:
    """The token -> id table and the merge lines, exactly as OpenAI's tokenizer builds them."""
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : MERGE_COUNT + 1]
    chars = list(_byte_characters())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer(directory: Path, pad_token: str = EOS) -> Path:
    """Write a CLIPTokenizer folder into ``directory`` (atomically) and return it.

    ``pad_token`` is OpenAI CLIP's end token by default; OpenCLIP's tokenizer (SDXL's second)
    pads with "!" instead."""
    vocab, merges = build_vocabulary(find_bpe_vocabulary())
    config = {
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=directory.parent))
    (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=1), "utf-8")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (staging / "special_tokens_map.json").write_text(json.dumps(special, indent=1), "utf-8")
    try:
        os.replace(staging, directory)
    except OSError:  # another process wrote it first
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()
    return directory


def ensure_tokenizer(cache_dir: Path, pad_token: str = EOS) -> Path:
    """The tokenizer folder under ``cache_dir`` padding with ``pad_token``, written on first
    use."""
    suffix = "" if pad_token == EOS else f"-pad{ord(pad_token[0])}"
    directory = cache_dir / f"clip-tokenizer{suffix}"
    if not (directory / "vocab.json").is_file():
        write_tokenizer(directory, pad_token)
    return directory
