"""Take the README's screenshot of the playground: the real `dan serve` on the tiny checkpoint,
the Create view after a generation, in headless Chromium.

    python -m tests.browser.screenshot [docs/playground.png]

(The tiny checkpoint has random weights, so the picture is colourful noise.)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from tests.fixtures.browser import CHROMIUM_ARGS, chromium_executable, start_playground

DEFAULT_OUT = Path("docs/playground.png")


def take(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as root, sync_playwright() as playwright:
        playground = start_playground(Path(root))
        try:
            browser = playwright.chromium.launch(
                executable_path=chromium_executable(), args=CHROMIUM_ARGS
            )
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            context.add_init_script(
                f"localStorage.setItem('dan.apiKey', {json.dumps(playground.user_key)})"
            )
            page = context.new_page()
            page.goto(f"{playground.url}/#/create")
            page.wait_for_selector("html[data-ready]", state="attached")
            page.fill("#prompt", "a lighthouse at dawn, (film grain:1.2), volumetric light")
            page.fill("#negative-prompt", "blurry, lowres")
            page.fill("#steps", "20")
            page.fill("#width", "384")
            page.fill("#height", "384")
            page.fill("#seed", "20261205")
            page.click("#generate")
            page.wait_for_selector("#create-task .result img", timeout=120_000)
            page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
        finally:
            playground.server.stop()
    print(out)


if __name__ == "__main__":
    take(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
