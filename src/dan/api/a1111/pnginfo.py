"""``POST /sdapi/v1/png-info``: a PNG's ``parameters`` text (A1111's infotext), read back.

The infotext is the prompt, an optional ``Negative prompt: ...`` line, and a last line of
``Key: value`` pairs separated by commas, where a value holding commas is quoted
(``Lora hashes: "a: 1, b: 2"``). Parsed, it becomes ``{"Prompt", "Negative prompt", key:
value, ...}`` with string values, and ``WxH`` values split into ``Key-1``/``Key-2``, as A1111
clients expect.
"""

from __future__ import annotations

import json
import re
from typing import Any

from PIL.Image import Image

from dan.imaging import decode_image

NEGATIVE = "Negative prompt:"
# One ``Key: value`` pair of the last line; a value is quoted (with \" escapes) or runs to
# the next comma.
PAIR = re.compile(r'\s*(?P<key>[\w\-/ ]+):\s*(?P<value>"(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)x(\d+)$")


def png_info(data: str) -> dict[str, Any]:
    """``{info, items, parameters}`` of a base64 image: its infotext, its other text chunks,
    and the infotext parsed (empty when the image carries none). InvalidArgument naming
    ``image`` if it is not a PNG, JPEG or WebP image."""
    image = decode_image(data, "image")
    info, items = text_chunks(image)
    return {"info": info, "items": items, "parameters": parse_infotext(info)}


def text_chunks(image: Image) -> tuple[str, dict[str, str]]:
    """The ``parameters`` text and the other text chunks of ``image``."""
    items = {str(key): value for key, value in image.info.items() if isinstance(value, str)}
    return items.pop("parameters", ""), items


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's infotext as a dict (see the module docstring); {} for an empty text."""
    lines = text.strip().splitlines()
    if not lines:
        return {}
    settings = lines.pop() if PAIR.match(lines[-1]) and len(pairs(lines[-1])) >= 3 else ""
    prompt, negative = split_prompts(lines)
    parsed: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in pairs(settings):
        size = SIZE.match(value)
        if size:
            parsed[f"{key}-1"], parsed[f"{key}-2"] = size.group(1), size.group(2)
        else:
            parsed[key] = value
    return parsed


def split_prompts(lines: list[str]) -> tuple[str, str]:
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith(NEGATIVE) and not negative:
            negative.append(line[len(NEGATIVE) :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip()


def pairs(line: str) -> list[tuple[str, str]]:
    return [(m["key"].strip(), unquote(m["value"].strip())) for m in PAIR.finditer(line)]


def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            unquoted = json.loads(value)
        except json.JSONDecodeError:
            return value[1:-1]
        return unquoted if isinstance(unquoted, str) else value[1:-1]
    return value
