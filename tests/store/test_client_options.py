"""Client options (what A1111 clients set with POST /sdapi/v1/options), kept per caller, on
SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from dan.accounts.options import ChosenOptions, ClientOptions, SqlClientOptionsStore, options_owner
from tests.store.conftest import Clock

SHA_A, SHA_B = "a" * 64, "b" * 64


@pytest.fixture
def options(db: Engine, clock: Clock) -> ClientOptions:
    return ClientOptions(SqlClientOptionsStore(db, clock=clock))


def test_each_owner_keeps_its_own_checkpoint(options: ClientOptions) -> None:
    alice, bob = options_owner("alice", "key-1"), options_owner("alice", "key-2")
    assert options.chosen(alice) == ChosenOptions()
    options.choose(alice, ChosenOptions(checkpoint=SHA_A))
    options.choose(bob, ChosenOptions(checkpoint=SHA_B.upper()))
    assert (options.chosen(alice).checkpoint, options.chosen(bob).checkpoint) == (SHA_A, SHA_B)
    options.choose(alice, ChosenOptions(checkpoint=SHA_B))  # a later choice replaces the earlier
    assert options.chosen(alice).checkpoint == SHA_B
    assert options.chosen(options_owner("alice", None)) == ChosenOptions()


def test_a_choice_changes_only_the_options_it_names(options: ClientOptions) -> None:
    options.choose("key:x", ChosenOptions(clip_skip=2))
    options.choose("key:x", ChosenOptions(vae=SHA_A.upper(), checkpoint=SHA_B))
    assert options.chosen("key:x") == ChosenOptions(SHA_B, 2, SHA_A)
    options.choose("key:x", ChosenOptions(vae="None"))
    options.choose("key:x", ChosenOptions(clip_skip=12))
    assert options.chosen("key:x") == ChosenOptions(SHA_B, 12, "None")


def test_owners_are_keys_or_else_accounts() -> None:
    assert options_owner("acc", "kid") == "key:kid"
    assert options_owner("acc", None) == "account:acc"


@pytest.mark.parametrize(
    ("chosen", "says"),
    [
        (ChosenOptions(checkpoint="model.safetensors"), "sha256"),
        (ChosenOptions(checkpoint="None"), "sha256"),
        (ChosenOptions(vae="clear.safetensors"), "sha256"),
        (ChosenOptions(clip_skip=0), "clip skip is 1 to 12"),
        (ChosenOptions(clip_skip=13), "clip skip is 1 to 12"),
    ],
)
def test_only_hashes_known_words_and_clip_skips_in_range_are_kept(
    options: ClientOptions, chosen: ChosenOptions, says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        options.choose("key:x", chosen)
    assert options.chosen("key:x") == ChosenOptions()
