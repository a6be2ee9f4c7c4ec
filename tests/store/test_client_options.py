"""Client options (what A1111 clients set with POST /sdapi/v1/options), kept per caller, on
SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from dan.accounts.options import ClientOptions, SqlClientOptionsStore, options_owner
from tests.store.conftest import Clock

SHA_A, SHA_B = "a" * 64, "b" * 64


@pytest.fixture
def options(db: Engine, clock: Clock) -> ClientOptions:
    return ClientOptions(SqlClientOptionsStore(db, clock=clock))


def test_each_owner_keeps_its_own_checkpoint(options: ClientOptions) -> None:
    alice, bob = options_owner("alice", "key-1"), options_owner("alice", "key-2")
    assert options.checkpoint(alice) is None
    options.choose_checkpoint(alice, SHA_A)
    options.choose_checkpoint(bob, SHA_B.upper())
    assert (options.checkpoint(alice), options.checkpoint(bob)) == (SHA_A, SHA_B)
    options.choose_checkpoint(alice, SHA_B)  # a later choice replaces the earlier one
    assert options.checkpoint(alice) == SHA_B
    assert options.checkpoint(options_owner("alice", None)) is None


def test_owners_are_keys_or_else_accounts() -> None:
    assert options_owner("acc", "kid") == "key:kid"
    assert options_owner("acc", None) == "account:acc"


def test_only_a_sha256_is_kept(options: ClientOptions) -> None:
    with pytest.raises(ValueError, match="sha256"):
        options.choose_checkpoint("key:x", "model.safetensors")
