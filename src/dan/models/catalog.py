"""The catalog: models DAN knows how to download, with the sha256 each file must have.

The packaged ``catalog.json`` is read with :func:`load_catalog`; nothing is loaded at import
time. Lookups are case-insensitive on names and aliases; a sha256 matches an entry's own hash or
one of its ``also_known_sha256`` (earlier releases of the same model, e.g. the reference's
``chillout_mix`` hash ``3a17d0de...``).

Checkpoints, LoRAs, ControlNets and VAEs belong to a :class:`~dan.domain.ModelFamily` (``family``
in the JSON, ``sd15`` when absent); other kinds have none. Entries whose sha256 the original
service did not publish say where it was confirmed in ``sha256_source`` (kept in the JSON for
readers, not loaded).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dan.domain import ModelFamily, ModelKind
from dan.errors import ModelNotFound

SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Kinds whose files work only with checkpoints of one family.
FAMILY_KINDS = frozenset(
    {ModelKind.CHECKPOINT, ModelKind.LORA, ModelKind.CONTROLNET, ModelKind.VAE}
)


@dataclass(frozen=True)
class CatalogEntry:
    """One downloadable model file. ``sha256`` values are lower-case hex. ``family`` is set
    exactly for the kinds in :data:`FAMILY_KINDS` (``sd15`` unless given); giving one to
    another kind raises ``ValueError``."""

    kind: ModelKind
    name: str
    sha256: str
    url: str
    file_name: str
    aliases: tuple[str, ...] = ()
    also_known_sha256: tuple[str, ...] = ()
    family: ModelFamily | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAMILY_KINDS and self.family is not None:
            raise ValueError(f"catalog entry {self.name!r}: {self.kind} entries have no family")
        if self.kind in FAMILY_KINDS and self.family is None:
            # The original network served only SD 1.x models.
            object.__setattr__(self, "family", ModelFamily.SD15)

    @property
    def names(self) -> tuple[str, ...]:
        """The name and every alias."""
        return (self.name, *self.aliases)

    @property
    def hashes(self) -> tuple[str, ...]:
        """The catalog sha256 first, then the also-known ones."""
        return (self.sha256, *self.also_known_sha256)


class Catalog:
    """An immutable, validated set of entries with one default checkpoint.

    Raises ``ValueError`` on construction when names, aliases or hashes collide (case-insensitive,
    across all kinds) or the default is not a checkpoint of the set.
    """

    def __init__(self, entries: Iterable[CatalogEntry], default_checkpoint: str) -> None:
        self.entries: tuple[CatalogEntry, ...] = tuple(entries)
        self._by_name = _index(self.entries, lambda e: (n.casefold() for n in e.names))
        self._by_hash = _index(self.entries, lambda e: e.hashes)
        default = self._by_name.get(default_checkpoint.casefold())
        if default is None or default.kind is not ModelKind.CHECKPOINT:
            raise ValueError(
                f"default_checkpoint {default_checkpoint!r} is not a catalog checkpoint"
            )
        self.default_checkpoint: CatalogEntry = default

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def of_kind(self, kind: ModelKind) -> list[CatalogEntry]:
        """The entries of ``kind``, in catalog order."""
        return [e for e in self.entries if e.kind is kind]

    def get(self, ref: str, kind: ModelKind | None = None) -> CatalogEntry | None:
        """The entry named ``ref`` (name or alias, any case) or hashed ``ref`` (full sha256,
        catalog or also-known), restricted to ``kind`` when given; ``None`` if there is none."""
        key = ref.strip()
        entry = self._by_hash.get(key.lower()) or self._by_name.get(key.casefold())
        if entry is None or (kind is not None and entry.kind is not kind):
            return None
        return entry

    def find(self, ref: str, kind: ModelKind | None = None) -> CatalogEntry:
        """Like :meth:`get`, but raises :class:`ModelNotFound` naming the valid names."""
        entry = self.get(ref, kind)
        if entry is None:
            candidates = self.of_kind(kind) if kind is not None else list(self.entries)
            names = ", ".join(e.name for e in candidates)
            what = f"{kind.value} " if kind is not None else ""
            raise ModelNotFound(f"no catalog {what}named or hashed {ref!r}; known: {names}")
        return entry


def _index(
    entries: Iterable[CatalogEntry], keys_of: Callable[[CatalogEntry], Iterable[str]]
) -> dict[str, CatalogEntry]:
    index: dict[str, CatalogEntry] = {}
    for entry in entries:
        for key in keys_of(entry):
            other = index.setdefault(key, entry)
            if other is not entry:
                raise ValueError(f"catalog key {key!r} names both {other.name} and {entry.name}")
    return index


def load_catalog(path: Path | None = None) -> Catalog:
    """The catalog in ``path``, or the one packaged with DAN. Raises ``ValueError`` if invalid."""
    if path is None:
        text = resources.files("dan.models").joinpath("catalog.json").read_text(encoding="utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    entries = [_parse_entry(raw) for raw in data["models"]]
    return Catalog(entries, data["default_checkpoint"])


def find(ref: str, kind: ModelKind | None = None) -> CatalogEntry:
    """Look ``ref`` up in the packaged catalog; raises :class:`ModelNotFound` (see
    :meth:`Catalog.find`)."""
    return load_catalog().find(ref, kind)


def entries() -> tuple[CatalogEntry, ...]:
    """Every entry of the packaged catalog, in catalog order."""
    return load_catalog().entries


def _parse_entry(raw: Mapping[str, Any]) -> CatalogEntry:
    name = raw.get("name", "?")
    entry = CatalogEntry(
        kind=ModelKind(raw["kind"]),
        name=str(raw["name"]),
        sha256=str(raw["sha256"]).lower(),
        url=str(raw["url"]),
        file_name=str(raw["file_name"]),
        aliases=tuple(str(a) for a in raw.get("aliases", ())),
        also_known_sha256=tuple(str(h).lower() for h in raw.get("also_known_sha256", ())),
        family=_family(name, raw.get("family")),
    )
    for digest in entry.hashes:
        if not SHA256_RE.fullmatch(digest):
            raise ValueError(f"catalog entry {name!r}: {digest!r} is not a sha256 hex digest")
    if "/" in entry.file_name or "\\" in entry.file_name or entry.file_name.startswith("."):
        raise ValueError(
            f"catalog entry {name!r}: file_name {entry.file_name!r} is not a plain name"
        )
    return entry


def _family(name: str, value: object) -> ModelFamily | None:
    """The ``family`` of a JSON entry, if it has one."""
    if value is None:
        return None
    try:
        return ModelFamily(str(value))
    except ValueError as exc:
        known = ", ".join(f.value for f in ModelFamily)
        raise ValueError(
            f"catalog entry {name!r}: family must be one of {known}, got {value!r}"
        ) from exc
