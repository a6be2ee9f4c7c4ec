"""Browser tests: the playground page in headless Chromium (Playwright for Python) against a
real `dan serve` on the tiny checkpoint. One server and one browser serve this package (and
are gone before the rest of the suite runs); each test gets a fresh browser context (its own
localStorage).

Where Playwright or Chromium is missing or cannot start, these tests skip and say why; with
DAN_REQUIRE_BROWSER=1 (CI) such a skip fails instead (tests/conftest.py). When a test fails,
a screenshot and the page's console log are saved in its tmp dir and their paths are printed
with the failure.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from tests.fixtures.browser import CHROMIUM_ARGS, Playground, chromium_executable, start_playground

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Response, Route

LAUNCH_TIMEOUT_MS = 60_000
LOCAL_HOSTS = {"127.0.0.1", "localhost", None}  # None: about:blank, data: URLs
STEP_TIMEOUT_MS = 60_000  # the longest a single wait for the page may take


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (./run test installs it)")
    executable = chromium_executable()
    if executable is None:
        pytest.skip(
            "no Chromium to drive: install it (apt-get install -y chromium) or set "
            "DAN_CHROMIUM to a Chromium binary"
        )
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(
                executable_path=executable, args=CHROMIUM_ARGS, timeout=LAUNCH_TIMEOUT_MS
            )
        except Error as exc:
            pytest.skip(f"Chromium ({executable}) did not start: {exc.message.splitlines()[0]}")
        yield launched
        launched.close()


@pytest.fixture(scope="package")
def playground(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Playground]:
    """The server, started only once a browser is there to drive it."""
    started = start_playground(tmp_path_factory.mktemp("playground"))
    yield started
    started.server.stop()


@dataclass
class Tab:
    """One browser context and its page, with what the page logged."""

    page: Page
    base: str
    artifacts: Path
    console: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)  # requests off this machine (refused)

    def open(self, route: str = "") -> Page:
        """Load the page afresh at ``#/route`` and wait until its first requests settled."""
        self.page.goto("about:blank")  # else a new hash only scrolls the same document
        self.page.goto(f"{self.base}/#/{route}")
        self.page.wait_for_selector("html[data-ready]", state="attached")
        return self.page

    def save(self) -> Path:
        """A screenshot and the console log, in the test's tmp dir; returns the screenshot."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        shot = self.artifacts / "failure.png"
        self.page.screenshot(path=str(shot), full_page=True)
        (self.artifacts / "console.log").write_text("\n".join(self.console) + "\n")
        return shot


# The tabs a test has open, for the failure hook below.
TABS = pytest.StashKey[list[Tab]]()


@pytest.fixture
def open_tab(
    browser: Browser, playground: Playground, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., Tab]]:
    """Opens browser contexts (``key``: the API key in localStorage, ``viewport``, ``base``:
    another server than the playground's), each with its own localStorage; all are closed
    after the test. Requests to other machines are refused and listed in ``Tab.external``."""
    opened: list[Generator[Tab, None, None]] = []
    tabs = request.node.stash.setdefault(TABS, [])

    def make(**options: Any) -> Tab:
        artifacts = tmp_path / f"tab{len(opened)}"
        generator = new_tab(
            browser, options.pop("base", playground.url), artifacts, tabs, **options
        )
        opened.append(generator)
        return next(generator)

    yield make
    for generator in opened:
        next(generator, None)


@pytest.fixture
def tab(open_tab: Callable[..., Tab], playground: Playground) -> Tab:
    """A fresh context whose localStorage holds alice's key."""
    return open_tab(key=playground.user_key)


def new_tab(
    browser: Browser,
    base: str,
    artifacts: Path,
    tabs: list[Tab],
    *,
    key: str | None = None,
    viewport: dict[str, int] | None = None,
) -> Generator[Tab, None, None]:
    context = browser.new_context(
        viewport=viewport or {"width": 1280, "height": 900}, accept_downloads=True
    )
    context.set_default_timeout(STEP_TIMEOUT_MS)
    if key is not None:
        context.add_init_script(f"localStorage.setItem('dan.apiKey', {json.dumps(key)})")
    page = context.new_page()
    tab = Tab(page, base, artifacts)

    def offline(route: Route) -> None:  # the tests run offline, as the page must work
        tab.external.append(route.request.url)
        route.abort()

    context.route(lambda url: urlsplit(url).hostname not in LOCAL_HOSTS, offline)

    def log(message: ConsoleMessage) -> None:
        where = message.location.get("url", "")
        tab.console.append(f"[{message.type}] {message.text}" + (f" ({where})" if where else ""))

    def http_error(response: Response) -> None:
        if response.status >= 400:
            tab.console.append(f"[http] {response.status} {response.request.method} {response.url}")

    page.on("console", log)
    page.on("response", http_error)
    page.on("pageerror", lambda error: tab.console.append(f"[pageerror] {error}"))
    tabs.append(tab)
    try:
        yield tab
    finally:
        tabs.remove(tab)
        context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failure, save each open tab's screenshot and console log and name the files."""
    report = yield
    if report.failed and report.when == "call":
        for tab in list(item.stash.get(TABS, [])):
            try:
                shot = tab.save()
            except Exception as exc:  # the page may be what broke
                report.sections.append(("browser", f"no screenshot: {exc}"))
                continue
            note = f"screenshot: {shot}\nconsole log: {shot.parent / 'console.log'}"
            report.sections.append(("browser", note))
            print(f"\n{note}")
    return report
