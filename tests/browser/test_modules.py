"""The page's own parsers, imported as the page imports them, in the real browser: the
server-sent events parser (fed in awkward pieces) and the PNG text chunk and infotext reader
(on PNGs that PIL writes: tEXt, and iTXt compressed or not)."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from tests.browser.conftest import Tab

pytestmark = [pytest.mark.browser, pytest.mark.slow]

STREAM = (
    ": keep-alive\r\n\r\n"
    "event: state\r\n"
    'data: {"taskId": "t1", "status": 0, "queuePosition": 2}\r\n\r\n'
    "id: 7\n"
    "event: state\n"
    'data: {"status": 1,\n'
    'data: "progress": 0.5}\n\n'
    "data: no event name\r\r"
    "event: done\n"
    'data: {"status": 2, "images": ["abc"]}\n\n'
    "event: state\n"
    "data: an event the stream never finishes"
)


def parse_events(tab: Tab, pieces: list[str]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = tab.page.evaluate(
        """async (pieces) => {
        const { SseParser } = await import('/js/sse.js');
        const events = [];
        const parser = new SseParser((e) => events.push(e));
        for (const piece of pieces) parser.push(piece);
        return events;
    }""",
        pieces,
    )
    return events


def test_the_event_stream_parser_reads_events_however_the_text_is_split(tab: Tab) -> None:
    tab.open()
    whole = parse_events(tab, [STREAM])
    assert whole == [
        {"event": "state", "data": '{"taskId": "t1", "status": 0, "queuePosition": 2}', "id": ""},
        {"event": "state", "data": '{"status": 1,\n"progress": 0.5}', "id": "7"},
        {"event": "message", "data": "no event name", "id": "7"},
        {"event": "done", "data": '{"status": 2, "images": ["abc"]}', "id": "7"},
    ]
    for size in (1, 2, 3, 7):  # every "\r\n" split somewhere, some between "\r" and "\n"
        pieces = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
        assert parse_events(tab, pieces) == whole, size


def png_with(parameters: str, **text_options: Any) -> str:
    info = PngImagePlugin.PngInfo()
    if text_options:
        info.add_itxt("parameters", parameters, **text_options)
    else:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


INFOTEXT = (
    "a (red:1.2) fox, 夕焼け\n"
    "second line\n"
    "Negative prompt: blurry,\n"
    "lowres\n"
    "Steps: 12, Sampler: DPM++ SDE Karras, CFG scale: 6.5, Seed: 42, Size: 64x96, "
    "Model hash: abcdef0123, Model: tiny-sd15, Denoising strength: 0.4, Hires upscale: 1.5, "
    'Hires upscaler: Latent (bicubic), Lora hashes: "one: 0123456789, two: 9876543210", '
    'Lora weights: "one: 0.75", Version: DAN 0.1.0'
)


@pytest.mark.parametrize(
    ("sampler", "schedule", "settings"),
    [
        ("DPM++ 2M", "Karras", ["DPM++ 2M", "Karras"]),
        ("DPM++ 2M", "Uniform", ["DPM++ 2M", "Automatic"]),  # A1111's name of DAN's Automatic
        ("Euler a", "Automatic", ["Euler a", "Automatic"]),
        ("DPM++ 2M SDE Exponential", None, ["DPM++ 2M SDE", "Exponential"]),
        ("LMS", None, ["LMS", "Automatic"]),
    ],
)
def test_sampler_and_schedule_type_are_read_in_dans_names(
    tab: Tab, sampler: str, schedule: str | None, settings: list[str]
) -> None:
    tab.open()
    read = tab.page.evaluate(
        """async ([sampler, schedule]) => {
        const { samplerOf } = await import('/js/png.js');
        return samplerOf(sampler, schedule ?? undefined);
    }""",
        [sampler, schedule],
    )
    assert read == settings


@pytest.mark.parametrize(
    "options", [{}, {"zip": False}, {"zip": True}], ids=["tEXt", "iTXt", "iTXt-zip"]
)
def test_settings_are_read_back_from_a_png(tab: Tab, options: dict[str, Any]) -> None:
    tab.open()
    text = INFOTEXT if options else INFOTEXT.replace("夕焼け", "sunset")  # tEXt is Latin-1
    settings = tab.page.evaluate(
        """async (encoded) => {
        const { settingsOfPng } = await import('/js/png.js');
        const { base64ToBytes } = await import('/js/dom.js');
        return settingsOfPng(base64ToBytes(encoded));
    }""",
        png_with(text, **options),
    )
    assert settings == {
        "prompt": text.split("\nNegative")[0],
        "negativePrompt": "blurry,\nlowres",
        "steps": 12,
        # The old combined name, read as A1111 1.9+ writes it.
        "sampler": "DPM++ SDE",
        "scheduler": "Karras",
        "cfgScale": 6.5,
        "seed": 42,
        "width": 64,
        "height": 96,
        "modelHash": "abcdef0123",
        "modelName": "tiny-sd15",
        "denoisingStrength": 0.4,
        "hiresScale": 1.5,
        "hiresUpscaler": "Latent (bicubic)",
        "loras": [["one", "0123456789", 0.75], ["two", "9876543210", 1]],  # 1: not said
    }


def test_sizes_follow_the_family_until_someone_sets_one(tab: Tab) -> None:
    """Choosing an SDXL checkpoint turns the untouched 512 into 1024 and back; a size that
    someone set stays; an unknown family changes nothing."""
    tab.open()
    sides = tab.page.evaluate(
        """async () => {
        const { sideFor } = await import('/js/sizes.js');
        return [
          sideFor(512, 'sdxl'), sideFor(1024, 'sd15'), sideFor(768, 'sdxl'),
          sideFor(512, undefined), sideFor(undefined, 'sdxl'),
        ];
    }"""
    )
    assert sides == [1024, 512, 768, 512, None]
