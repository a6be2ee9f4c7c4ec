"""Upscale, interrogate and the ControlNet preview in a real browser against the real server
on the tiny checkpoint (which has no interrogator weights: the API's message is shown)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from tests.browser.conftest import Tab
from tests.fixtures.browser import Playground

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def square_png(path: Path, size: int = 64) -> Path:
    """A white square on black: edges a canny preprocessor finds."""
    image = Image.new("RGB", (size, size))
    image.paste((255, 255, 255), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    image.save(path)
    return path


def test_upscale_makes_a_bigger_picture(tab: Tab, tmp_path: Path) -> None:
    page = tab.open("tools")
    page.set_input_files("#upscale-image", str(square_png(tmp_path / "in.png")))
    page.wait_for_selector("#upscale-source:visible")
    page.fill("#upscale-rate", "2")
    page.select_option("#upscale-upscaler", "Lanczos")
    page.click("#upscale-form button[type=submit]")
    result = page.locator("#upscale-task .result img")
    result.wait_for()
    assert result.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [128, 128]


def test_interrogate_captions_and_the_caption_becomes_the_prompt(
    tab: Tab, playground: Playground, tmp_path: Path
) -> None:
    source = square_png(tmp_path / "in.png")
    page = tab.open("tools")
    page.set_input_files("#interrogate-image", str(source))
    page.select_option("#interrogate-model", "deepdanbooru")
    page.click("#interrogate-form button[type=submit]")
    page.wait_for_selector("#caption-box:visible")
    image = base64.b64encode(source.read_bytes()).decode()
    expected = playground.server.client.post(
        "/api/sd/interrogate",
        json={"image": image, "model": "deepdanbooru"},
        headers={"Authorization": f"Bearer {playground.user_key}"},
    ).json()["data"]["caption"]
    assert page.input_value("#caption") == expected
    page.click("#caption-use")
    page.wait_for_function("() => location.hash === '#/create'")
    assert page.input_value("#prompt") == expected


def test_interrogate_without_its_files_shows_the_apis_message(
    tab: Tab, playground: Playground, tmp_path: Path
) -> None:
    source = square_png(tmp_path / "in.png")
    page = tab.open("tools")
    page.set_input_files("#interrogate-image", str(source))
    page.select_option("#interrogate-model", "clip")  # its BLIP and CLIP files are missing
    page.click("#interrogate-form button[type=submit]")
    error = page.locator("#interrogate-task .error")
    error.wait_for()
    image = base64.b64encode(source.read_bytes()).decode()
    reply = playground.server.client.post(
        "/api/sd/interrogate/async",
        json={"image": image, "model": "clip"},
        headers={"Authorization": f"Bearer {playground.user_key}"},
    ).json()
    assert reply["code"] != 200 and error.inner_text() == reply["message"]
    assert page.locator("#caption-box").is_hidden()


def test_controlnet_preview_shows_the_control_image(tab: Tab, tmp_path: Path) -> None:
    page = tab.open("create")
    page.check("#cn-on")
    page.set_input_files("#cn-image", str(square_png(tmp_path / "control.png")))
    page.wait_for_selector("#cn-source:visible")
    page.click("#cn-detect")
    preview = page.locator("#cn-preview")
    preview.wait_for()
    src = preview.get_attribute("src") or ""
    edges = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("L")
    assert edges.size == (64, 64)
    assert max(edges.getpixel((x, 32)) for x in range(13, 19)) > 128  # the square's left edge
    assert edges.getpixel((32, 32)) < 128 and edges.getpixel((4, 4)) < 128  # no edge inside
