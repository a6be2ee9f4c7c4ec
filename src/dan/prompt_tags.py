"""AUTOMATIC1111's extra-network tags in prompts (``<lora:name:weight>``); no torch here.

The service resolves the named LoRAs when a task is submitted, so an unknown name is a 400; the
engine removes the tags from the text it encodes.
"""

from __future__ import annotations

import math
import re

from dan.errors import InvalidArgument

_LORA_TAG = re.compile(r"<lora:([^>]+)>")


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove A1111 ``<lora:name>`` / ``<lora:name:weight>`` tags from ``prompt``.

    Returns the prompt without the tags (the text around them is kept as is, like A1111) and the
    ``(name, weight)`` pairs in order of appearance, duplicates included; the weight defaults to
    1.0. Other extra-network tags (``<lyco:...>``, ``<hypernet:...>``) are left in the text.
    Raises :class:`InvalidArgument` for a weight that is not a finite number and for tags with
    separate text-encoder/UNet weights (``<lora:name:0.8:0.5>``), which DAN does not support.
    """
    loras: list[tuple[str, float]] = []

    def take(match: re.Match[str]) -> str:
        loras.append(_lora_from_tag(match.group(0), match.group(1)))
        return ""

    return _LORA_TAG.sub(take, prompt), loras


def _lora_from_tag(tag: str, arguments: str) -> tuple[str, float]:
    """``(name, weight)`` of one tag; ``arguments`` is the text after ``lora:``."""
    name, *weights = arguments.split(":")
    if not name.strip() or len(weights) > 1:
        raise InvalidArgument(f"LoRA tags are written <lora:name> or <lora:name:weight>, got {tag}")
    if not weights:
        return name.strip(), 1.0
    try:
        weight = float(weights[0])
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise InvalidArgument(f"the weight in {tag} must be a number such as 0.8, got {weights[0]}")
    return name.strip(), weight
