"""`dan keys ...` and `dan honor grant`: admin commands on the account database."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dan.cli import main
from dan.config import Settings
from dan.errors import PermissionDenied
from dan.services import account_services

KEY = re.compile(r"^sk-[A-Za-z0-9]{48}$", re.MULTILINE)


def test_keys_create_prints_a_working_key_that_is_not_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**os.environ, "DAN_DATA_DIR": str(tmp_path)}
    env.pop("DAN_DATABASE_URL", None)
    argv = ["keys", "create", "--nickname", "carol", "--email", "c@example.org", "--admin"]
    done = subprocess.run(
        [sys.executable, "-m", "dan", *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert KEY.fullmatch(key), done.stdout
    assert "shown only now" in done.stderr and key not in done.stderr

    settings = Settings(data_dir=tmp_path, auth="required")
    with account_services(settings) as accounts:
        account = accounts.authenticate(key)
        assert (account.nickname, account.is_admin, account.honor) == ("carol", True, 10.0)
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert key.encode() not in stored and key[7:].encode() not in stored

    data_dir = ["--data-dir", str(tmp_path)]
    assert main(["honor", "grant", "carol", "2.5", "--note", "thanks", *data_dir]) == 0
    assert "balance 12.5" in capsys.readouterr().out
    assert main(["keys", "list", "--nickname", "carol", *data_dir]) == 0
    listing = capsys.readouterr().out
    assert key[:7] in listing and key not in listing and "active" in listing
    key_id = listing.splitlines()[1].split()[0]
    assert main(["keys", "revoke", key_id, *data_dir]) == 0
    with account_services(settings) as accounts, pytest.raises(PermissionDenied, match="revoked"):
        accounts.authenticate(key)


def test_keys_create_refuses_reserved_nicknames(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for nickname in ("public", "anon-123", "two words"):
        assert main(["keys", "create", "--nickname", nickname, "--data-dir", str(tmp_path)]) == 1
        assert "error: " in capsys.readouterr().err


def test_keys_revoke_account_revokes_every_key_of_that_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(data_dir=tmp_path, auth="required")
    with account_services(settings) as accounts:
        alice = [accounts.issue_key("alice").key.key for _ in range(2)]
        bob = accounts.issue_key("bob").key.key
    assert main(["keys", "revoke", "--account", "alice", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "revoked 2 active keys of alice" in out
    assert all(key[:7] in out for key in alice) and bob[:7] not in out
    with account_services(settings) as accounts:
        for key in alice:
            with pytest.raises(PermissionDenied, match="revoked"):
                accounts.authenticate(key)
        assert accounts.authenticate(bob).nickname == "bob"
    assert main(["keys", "revoke", "--account", "nobody", "--data-dir", str(tmp_path)]) == 1
    assert "no account with nickname 'nobody'" in capsys.readouterr().err


def test_keys_roles_gives_and_takes_roles_but_keeps_an_admin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = ["--data-dir", str(tmp_path)]
    with account_services(Settings(data_dir=tmp_path)) as accounts:
        accounts.issue_key("alice", can_run_nodes=True)
    assert main(["keys", "roles", "alice", "--admin", *data_dir]) == 0
    assert capsys.readouterr().out == "alice: admin, nodes\n"
    assert main(["keys", "roles", "alice", "--no-nodes", *data_dir]) == 0
    assert capsys.readouterr().out == "alice: admin\n"
    assert main(["keys", "roles", "alice", "--no-admin", *data_dir]) == 1
    assert "'alice' is the only admin" in capsys.readouterr().err
    assert main(["keys", "roles", "alice", *data_dir]) == 1
    assert "name a role" in capsys.readouterr().err
    assert main(["keys", "create", "--nickname", "root", "--admin", *data_dir]) == 0
    assert main(["keys", "roles", "alice", "--no-admin", *data_dir]) == 0
    assert capsys.readouterr().out.endswith("alice: no roles\n")
    with account_services(Settings(data_dir=tmp_path)) as accounts:
        alice = accounts.find(nickname="alice")
        assert not alice.is_admin and not alice.can_run_nodes


def test_keys_create_stops_at_max_keys_per_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAN_MAX_KEYS_PER_ACCOUNT", "2")
    create = ["keys", "create", "--nickname", "alice", "--data-dir", str(tmp_path)]
    assert main(create) == 0 and main(create) == 0
    capsys.readouterr()
    assert main([*create, "--admin"]) == 1
    err = capsys.readouterr().err
    assert "already has 2 active API keys" in err and "DAN_MAX_KEYS_PER_ACCOUNT=2" in err
    with account_services(Settings(data_dir=tmp_path)) as accounts:
        alice = accounts.find(nickname="alice")
        assert not alice.is_admin  # the refused call changed nothing
        assert len(accounts.list_keys(alice)) == 2
