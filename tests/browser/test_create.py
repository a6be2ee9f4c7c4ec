"""The Create view in a real browser against the real server on the tiny models: generate and
watch the task (progress, ETA, a step preview), download the PNG, read its settings back into
the form, LoRAs and hires fix, paint a mask and inpaint, the mask tools, a queue position and
a cancel, a broken event stream opened again, and the history after a reload."""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from dan.imaging import read_parameters
from tests.browser.conftest import Tab
from tests.fixtures.browser import Playground

if TYPE_CHECKING:
    from playwright.sync_api import Route

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def fill_form(tab: Tab, **fields: str) -> None:
    """Fill the Create form's inputs and selects by id (``negative_prompt``: #negative-prompt)."""
    page = tab.page
    for name, value in fields.items():
        selector = "#" + name.replace("_", "-")
        if page.locator(selector).evaluate("e => e.tagName") == "SELECT":
            page.select_option(selector, value)
        else:
            page.fill(selector, value)


def start_recording_progress(tab: Tab) -> None:
    """Remember, in the page, every progress value, status and ETA text the panel shows, and
    whether a step preview appeared."""
    tab.page.evaluate(
        """() => {
        const seen = (window.seen = {progress: [], status: [], eta: [], preview: false});
        const root = document.querySelector('#create-task');
        new MutationObserver(() => {
            const bar = root.querySelector('progress');
            const task = root.querySelector('.task');
            if (task && !task.hidden) {
                seen.progress.push(bar.value);
                seen.status.push(root.querySelector('.task-status').textContent);
                seen.eta.push(root.querySelector('.eta').textContent);
            }
            const preview = root.querySelector('.preview');
            if (preview && !preview.hidden && preview.src) seen.preview = true;
        }).observe(root, {subtree: true, attributes: true, childList: true, characterData: true});
    }"""
    )


def result_png(tab: Tab, index: int = 0) -> bytes:
    """The PNG behind the n-th result image, as the page holds it."""
    encoded = tab.page.evaluate(
        """async (index) => {
        const img = document.querySelectorAll('#create-task .result img')[index];
        const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
        let text = '';
        for (const byte of bytes) text += String.fromCharCode(byte);
        return btoa(text);
    }""",
        index,
    )
    return base64.b64decode(encoded)


def test_generate_shows_progress_then_the_image_and_downloads_the_png(tab: Tab) -> None:
    page = tab.open("create")
    fill_form(tab, prompt="a red fox", width="256", height="256", steps="60", seed="1234")
    start_recording_progress(tab)
    page.click("#generate")
    page.wait_for_function(
        "() => { const b = document.querySelector('#create-task progress');"
        " return b && b.offsetParent !== null && b.value > 0; }"
    )
    page.wait_for_selector("#create-task .result img")
    seen = page.evaluate("window.seen")
    assert any(0 < value < 1 for value in seen["progress"]), seen
    assert any(text.startswith("Running:") for text in seen["status"]), seen
    assert any(text.startswith("about ") for text in seen["eta"]), seen
    assert seen["preview"], "no step preview was shown"
    assert page.locator("#create-task .result img").evaluate("i => i.naturalWidth") == 256
    assert page.locator("#create-task .result-seed").inner_text() == "Seed 1234"
    assert page.locator("#create-task progress").is_hidden()  # the finished task's bar is gone

    with page.expect_download() as download:
        page.click("#create-task >> text=Download PNG")
    saved = Path(download.value.path()).read_bytes()
    assert saved == result_png(tab)  # the PNG as the API returned it
    parameters = read_parameters(saved)
    assert parameters is not None
    assert parameters.startswith("a red fox\n") and "Seed: 1234, Size: 256x256" in parameters
    assert download.value.suggested_filename.endswith(".png")


def test_use_these_settings_again_fills_the_form_from_the_png(
    tab: Tab, playground: Playground
) -> None:
    page = tab.open("create")
    settings = {
        "prompt": "(a lighthouse:1.2), dawn\nsecond line",
        "negative_prompt": "blurry, [lowres]",
        "sampler": "DPM++ 2M",
        "scheduler": "Karras",  # offered once DPM++ 2M is chosen
        "steps": "3",
        "cfg": "6.5",
        "width": "64",
        "height": "72",
        "seed": "777",
    }
    fill_form(tab, **settings)
    page.click("#generate")
    page.wait_for_selector("#create-task .result img")
    fill_form(
        tab,
        prompt="",
        negative_prompt="",
        sampler="Euler a",
        scheduler="SGM Uniform",
        steps="20",
        cfg="7",
        width="512",
        height="512",
        seed="-1",
    )
    page.click("#create-task >> text=Use these settings again")
    page.wait_for_function("() => document.querySelector('#seed').value === '777'")
    for name, value in settings.items():
        assert page.input_value("#" + name.replace("_", "-")) == value, name
    assert page.input_value("#model") == playground.checkpoint
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "777"


def pattern_png(path: Path, size: int = 64) -> Path:
    """A picture with different pixels everywhere, so that any change shows."""
    rng = random.Random(7)
    image = Image.new("RGB", (size, size))
    image.putdata([(x * 4, y * 4, rng.randrange(256)) for y in range(size) for x in range(size)])
    image.save(path)
    return path


def test_paint_a_mask_and_inpaint_keeps_the_unpainted_pixels(tab: Tab, tmp_path: Path) -> None:
    source = pattern_png(tmp_path / "source.png")
    page = tab.open("create")
    page.check("input[name=mode][value=inpaint]")
    page.set_input_files("#init-image", str(source))
    page.wait_for_selector("#mask-canvas:visible")
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"
    fill_form(tab, prompt="a red fox", steps="4", seed="5", denoise="1", mask_blur="0")

    # Two drags in the left quarter of the picture (brush 4 px, the default for 64 px).
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    assert box is not None

    def at(fx: float, fy: float) -> tuple[float, float]:
        return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

    for start, end in [((0.1, 0.1), (0.1, 0.9)), ((0.2, 0.9), (0.2, 0.1))]:
        page.mouse.move(*at(*start))
        page.mouse.down()
        page.mouse.move(*at(*end), steps=8)
        page.mouse.up()

    with page.expect_request("**/api/sd/img2img/async") as sent:
        page.click("#generate")
    page.wait_for_selector("#create-task .result img")
    body: dict[str, Any] = json.loads(sent.value.post_data or "{}")

    # The mask sent: the picture's size, white where painted (left), black elsewhere.
    mask = Image.open(io.BytesIO(base64.b64decode(body["inpaint"]["mask"].split(",")[1])))
    assert mask.size == (64, 64)
    gray = mask.convert("L")
    white = [(x, y) for y in range(64) for x in range(64) if gray.getpixel((x, y)) == 255]
    assert white and max(x for x, _ in white) < 20 and min(x for x, _ in white) >= 2
    assert all(gray.getpixel((x, y)) in (0, 255) for y in range(64) for x in range(64))

    original = Image.open(source).convert("RGB")
    result = Image.open(io.BytesIO(result_png(tab))).convert("RGB")
    assert result.size == original.size
    kept = [(x, y) for y in range(64) for x in range(64) if gray.getpixel((x, y)) == 0]
    assert all(result.getpixel(p) == original.getpixel(p) for p in kept)
    assert sum(result.getpixel(p) != original.getpixel(p) for p in white) > len(white) // 2


def test_history_survives_a_reload(tab: Tab) -> None:
    page = tab.open("create")
    fill_form(tab, prompt="a remembered fox", steps="2", width="64", height="64", seed="31")
    page.click("#generate")
    page.wait_for_selector("#create-task .result img")
    page.reload()
    tab.open("history")
    entry = page.locator("#history-list .entry", has_text="a remembered fox").first
    entry.wait_for()
    assert "seed 31" in entry.inner_text()
    entry.locator("text=Show").click()
    page.wait_for_selector("#history-task .result img")
    entry.locator("text=Use these settings").click()
    page.wait_for_function("() => location.hash === '#/create'")
    assert page.input_value("#prompt") == "a remembered fox"
    assert page.input_value("#seed") == "31"


def test_loras_and_hires_fix_are_sent_and_read_back(tab: Tab, playground: Playground) -> None:
    page = tab.open("create")
    fill_form(tab, prompt="a styled fox", steps="2", width="64", height="64", seed="9")
    page.click("#lora-add")
    assert page.input_value("#lora-1") == playground.lora
    assert page.locator("#lora-1 option").inner_text() == f"style-a [{playground.lora[:10]}]"
    page.fill("#lora-1-weight", "0.8")
    page.check("#hires-on")
    fill_form(tab, hires_scale="1.5", hires_denoise="0.6", hires_upscaler="Latent (bicubic)")
    with page.expect_request("**/api/sd/txt2img/async") as sent:
        page.click("#generate")
    body = json.loads(sent.value.post_data or "{}")
    assert body["loras"] == [[playground.lora, 0.8]]
    assert body["upscale"] == {
        "scale": 1.5,
        "denoising_strength": 0.6,
        "upscaler": "Latent (bicubic)",
    }
    result = page.locator("#create-task .result img")
    result.wait_for()
    assert result.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [96, 96]

    page.click("#loras button")  # remove the LoRA row, switch hires off
    page.uncheck("#hires-on")
    page.click("#create-task >> text=Use these settings again")
    page.wait_for_selector("#lora-1")
    assert page.input_value("#lora-1") == playground.lora
    assert page.input_value("#lora-1-weight") == "0.8"  # from the PNG's "Lora weights"
    assert page.is_checked("#hires-on")
    assert page.input_value("#hires-scale") == "1.5"
    assert page.input_value("#hires-denoise") == "0.6"
    assert page.input_value("#hires-upscaler") == "Latent (bicubic)"


def test_mask_tools_paint_erase_invert_and_clear(tab: Tab, tmp_path: Path) -> None:
    page = tab.open("create")
    page.check("input[name=mode][value=inpaint]")
    page.set_input_files("#init-image", str(pattern_png(tmp_path / "source.png")))
    page.wait_for_selector("#mask-canvas:visible")
    painted = "() => window.maskPixels()"
    page.evaluate(
        """() => { window.maskPixels = () => {
            const c = document.querySelector('#mask-canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] >= 128) n++; return n; }; }"""
    )

    def drag(y: float, x0: float, x1: float) -> None:
        canvas = page.locator("#mask-canvas")
        canvas.scroll_into_view_if_needed()  # clicking a tool may have scrolled the page
        box = canvas.bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y * box["height"], steps=6)
        page.mouse.up()

    page.evaluate(
        "() => { const r = document.querySelector('#brush-size');"
        " r.value = 8; r.dispatchEvent(new Event('input')); }"
    )
    assert page.locator("#brush-size-value").inner_text() == "8"
    drag(0.5, 0.1, 0.9)
    stroke = page.evaluate(painted)
    assert 8 * 40 < stroke < 8 * 64
    page.check("input[name=brush][value=erase]")
    drag(0.5, 0.4, 0.6)
    erased = page.evaluate(painted)
    assert erased < stroke - 8 * 8
    page.click("#mask-invert")
    assert page.evaluate(painted) == 64 * 64 - erased
    page.click("#mask-clear")
    assert page.evaluate(painted) == 0
    page.click("#generate")  # nothing painted: the page says so instead of sending
    assert "Paint the part" in page.locator("#create-error").inner_text()


def test_a_waiting_task_shows_its_queue_position_and_a_running_one_cancels(
    open_tab: Callable[..., Tab], playground: Playground
) -> None:
    first = open_tab(key=playground.user_key)
    page = first.open("create")
    fill_form(first, prompt="a long task", steps="150", width="256", height="256")
    page.click("#generate")
    page.wait_for_function(
        "() => { const b = document.querySelector('#create-task progress');"
        " return b && b.offsetParent !== null && b.value > 0; }"
    )

    second = open_tab(key=playground.user_key)
    other = second.open("create")
    fill_form(second, prompt="next in line", steps="2", width="64", height="64")
    other.click("#generate")
    status = other.locator("#create-task .task-status")
    other.wait_for_function(
        "() => document.querySelector('#create-task .task-status').textContent"
        " === 'Waiting in the queue: position 1'"
    )

    page.click("#create-task >> text=Cancel")
    error = page.locator("#create-task .error")
    error.wait_for()
    assert error.inner_text() == "cancelled by the user"  # the API's own message
    assert page.locator("#create-task .result").count() == 0
    assert page.locator("#generate").is_enabled()
    other.wait_for_selector("#create-task .result img")  # the next one ran
    assert status.is_hidden()


def test_a_broken_event_stream_is_opened_again(tab: Tab) -> None:
    page = tab.open("create")
    opened: list[str] = []

    def first_fails(route: Route) -> None:
        opened.append(route.request.url)
        if len(opened) == 1:
            route.abort("connectionreset")  # as a proxy or a restarting replica would
        else:
            route.continue_()

    page.route("**/api/sd/task/events?*", first_fails)
    fill_form(tab, prompt="a persistent fox", steps="2", width="64", height="64")
    page.click("#generate")
    page.wait_for_selector("#create-task .result img")
    assert len(opened) == 2
    assert page.locator("#create-task .error").is_hidden()
