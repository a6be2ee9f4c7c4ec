"""The page at phone width (360 px), with a label on every control, nothing loaded from
another machine, and the keyboard alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.browser.conftest import Tab
from tests.fixtures.browser import Playground

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROUTES = ["", "tools", "history", "donors", "account", "create"]

# Visible controls without an accessible name: no <label>, aria-label(ledby) or text.
UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea, button, canvas')]
    .filter(e => e.offsetParent !== null && e.type !== 'hidden')
    .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                 && !e.getAttribute('aria-labelledby')
                 && !(e.tagName === 'BUTTON' && e.textContent.trim()))
    .map(e => e.outerHTML.slice(0, 120))"""


def test_every_view_fits_a_phone_and_labels_every_control(
    open_tab: Callable[..., Tab], playground: Playground
) -> None:
    tab = open_tab(key=playground.user_key, viewport={"width": 360, "height": 740})
    page = tab.open()
    for route in ROUTES:
        tab.open(route)
        assert page.evaluate("document.documentElement.scrollWidth") <= 360, route
        assert page.evaluate(UNLABELLED) == [], route
    page.check("#hires-on")  # every part of the Create form open
    page.check("#cn-on")
    page.click("#lora-add") if page.is_visible("#lora-add") else None
    assert page.evaluate(UNLABELLED) == []
    page.check("input[name=mode][value=inpaint]")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    assert page.evaluate(UNLABELLED) == []
    assert tab.external == []  # nothing from a CDN: the page works offline


def test_generate_with_the_keyboard_alone(tab: Tab) -> None:
    page = tab.open("create")
    page.focus("#prompt")
    page.keyboard.type("a keyboard fox")
    for field, value in [("#width", "64"), ("#height", "64"), ("#steps", "2")]:
        page.focus(field)
        page.keyboard.press("ControlOrMeta+a")
        page.keyboard.type(value)
    for _ in range(60):  # Tab on to the Generate button
        if page.evaluate("document.activeElement.id") == "generate":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "generate"
    page.keyboard.press("Enter")
    page.wait_for_selector("#create-task .result img")
    page.keyboard.press("Alt+ArrowLeft")  # nothing to go back to: stays usable
    page.focus("a[data-route=donors]")
    page.keyboard.press("Enter")
    # The hash changes before the hashchange handler runs: wait for the focus to move.
    page.wait_for_function("() => document.activeElement.id === 'donors-title'")
    assert page.evaluate("location.hash") == "#/donors"
