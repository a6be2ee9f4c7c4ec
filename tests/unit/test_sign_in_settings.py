"""Sign-in settings: checked when read, and the session secret made once and kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dan.config import Settings
from dan.services import session_secret

OIDC = {"oidc_issuer": "https://id.example", "oidc_client_id": "dan", "oidc_client_secret": "s"}


def test_sign_in_is_off_unless_a_provider_is_configured() -> None:
    assert Settings().sign_in_providers == ()
    assert Settings(**OIDC).sign_in_providers == ("oidc",)
    both = Settings(github_client_id="id", github_client_secret="secret", **OIDC)
    assert both.sign_in_providers == ("github", "oidc")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"oidc_issuer": "https://id.example"}, "not set: DAN_OIDC_CLIENT_ID, DAN_OIDC_CLIENT_"),
        ({"github_client_id": "id"}, "not set: DAN_GITHUB_CLIENT_SECRET"),
        ({**OIDC, "oidc_issuer": "id.example"}, "DAN_OIDC_ISSUER must be an http"),
        ({"public_url": "dan.example"}, "DAN_PUBLIC_URL must be an http"),
        ({"session_secret": "short"}, "at least 32 characters"),
    ],
)
def test_half_a_configuration_is_refused(values: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)  # type: ignore[arg-type]


def test_the_session_secret_is_made_once_and_kept(tmp_path: Path) -> None:
    assert session_secret(Settings(data_dir=tmp_path)) is None  # no provider: no secret
    assert not (tmp_path / "session-secret").exists()
    made = session_secret(Settings(data_dir=tmp_path, **OIDC))
    assert made is not None and len(made) >= 32
    assert (tmp_path / "session-secret").stat().st_mode & 0o077 == 0
    assert session_secret(Settings(data_dir=tmp_path, **OIDC)) == made  # a restart keeps it
    chosen = "x" * 40  # what every replica is given
    assert session_secret(Settings(data_dir=tmp_path, session_secret=chosen, **OIDC)) == chosen
