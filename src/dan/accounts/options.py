"""Client options: the settings an AUTOMATIC1111 client stores with ``POST /sdapi/v1/options``.

A1111 keeps one global set of options, so one client choosing a checkpoint changes it for every
other. DAN keeps them per caller instead: under the caller's API key (``key:<key id>``), or,
for a caller without a stored key (the embedded server's local account, an anonymous lane, a
signed-in session), under its account (``account:<account id>``). Only what DAN acts on is
kept: the checkpoint (by sha256), the clip skip and the VAE.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from dan.db.tables import client_options
from dan.domain import MAX_CLIP_SKIP

Clock = Callable[[], float]
VAE_WORDS = ("Automatic", "None")  # A1111's sd_vae values that mean the checkpoint's own VAE
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ChosenOptions:
    """What a caller chose; None where it chose nothing (the server's default applies)."""

    checkpoint: str | None = None  # a checkpoint's sha256
    clip_skip: int | None = None  # 1 to MAX_CLIP_SKIP
    vae: str | None = None  # a VAE file's sha256, or one of VAE_WORDS


def options_owner(account_id: str, key_id: str | None) -> str:
    """Whose options a caller reads and writes: its stored key's, else its account's."""
    return f"key:{key_id}" if key_id else f"account:{account_id}"


class ClientOptionsStore(Protocol):
    """Persistence of client options. Synchronous and thread-safe."""

    def chosen(self, owner: str) -> ChosenOptions:
        """What ``owner`` chose (all None when it never chose)."""
        ...

    def save(self, owner: str, chosen: ChosenOptions) -> None:
        """Remember the fields of ``chosen`` that are not None as ``owner``'s, replacing
        earlier choices of those fields only, atomically."""
        ...


class SqlClientOptionsStore:
    """ClientOptionsStore on SQLAlchemy Core (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, *, clock: Clock = time.time) -> None:
        self._engine = engine
        self._clock = clock

    def chosen(self, owner: str) -> ChosenOptions:
        c = client_options.c
        query = select(c.checkpoint, c.clip_skip, c.vae).where(c.owner == owner)
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            row = conn.execute(query).one_or_none()
        return ChosenOptions() if row is None else ChosenOptions(**row._asdict())

    def save(self, owner: str, chosen: ChosenOptions) -> None:
        changes: dict[str, Any] = {k: v for k, v in asdict(chosen).items() if v is not None}
        changes["updated_at"] = self._clock()
        dialect = postgresql if self._engine.dialect.name == "postgresql" else sqlite
        insert = dialect.insert(client_options).values(owner=owner, **changes)
        # Only the fields chosen now: a concurrent choice of another field is kept.
        upsert = insert.on_conflict_do_update(index_elements=[client_options.c.owner], set_=changes)
        with self._engine.begin() as conn:
            conn.execute(upsert)


class ClientOptions:
    """The rules of client options: each caller has its own, and a caller that never chose
    an option has none (the server's default applies)."""

    def __init__(self, store: ClientOptionsStore) -> None:
        self._store = store

    def chosen(self, owner: str) -> ChosenOptions:
        """What ``owner`` chose for its later requests that name nothing."""
        return self._store.chosen(owner)

    def choose(self, owner: str, chosen: ChosenOptions) -> None:
        """Make the fields of ``chosen`` that are not None ``owner``'s choices (models resolved
        by the caller; hashes in any case); the others stay as they were. ValueError for a
        value that :class:`ChosenOptions` does not allow."""
        clip_skip = chosen.clip_skip
        if clip_skip is not None and not 1 <= clip_skip <= MAX_CLIP_SKIP:
            raise ValueError(f"clip skip is 1 to {MAX_CLIP_SKIP}, got {clip_skip}")
        checkpoint = _kept(chosen.checkpoint, (), "checkpoint")
        vae = _kept(chosen.vae, VAE_WORDS, "VAE")
        self._store.save(owner, ChosenOptions(checkpoint, clip_skip, vae))


def _kept(value: str | None, words: tuple[str, ...], what: str) -> str | None:
    """``value`` as kept: a sha256 in lower case, or one of ``words``; ValueError otherwise."""
    if value is None or value in words:
        return value
    if not _SHA256.match(value.lower()):
        raise ValueError(f"a {what} is kept by its sha256, got {value!r}")
    return value.lower()
