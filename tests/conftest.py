"""Shared test configuration: no test may reach a model hub; with DAN_REQUIRE_POSTGRES=1 (CI)
no PostgreSQL test may skip, and with DAN_REQUIRE_BROWSER=1 (CI) no browser test may skip."""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REQUIRE_POSTGRES = "DAN_REQUIRE_POSTGRES"
REQUIRE_BROWSER = "DAN_REQUIRE_BROWSER"
# A test with the marker may not skip while the variable is set.
REQUIRED_BY_MARKER = {"postgres": REQUIRE_POSTGRES, "browser": REQUIRE_BROWSER}


def required(variable: str) -> bool:
    return os.environ.get(variable, "") not in ("", "0")


def postgres_required() -> bool:
    return required(REQUIRE_POSTGRES)


def pytest_configure(config: pytest.Config) -> None:
    if postgres_required() and not os.environ.get("DAN_TEST_POSTGRES_URL"):
        raise pytest.UsageError(
            f"{REQUIRE_POSTGRES} is set but DAN_TEST_POSTGRES_URL is not: the postgres tests "
            "would skip (e.g. DAN_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test)"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """With DAN_REQUIRE_POSTGRES (DAN_REQUIRE_BROWSER) set, a ``postgres`` (``browser``) test
    that skips fails instead: CI must not pass without having run them."""
    report = yield
    if not report.skipped:
        return report
    for marker, variable in REQUIRED_BY_MARKER.items():
        if required(variable) and item.get_closest_marker(marker):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            report.outcome = "failed"
            report.longrepr = f"a {marker} test skipped while {variable} is set: {reason}"
            break
    return report
