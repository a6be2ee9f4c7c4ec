"""NetworkModels: the models a request may name, on this server or on an online node.

An API replica need not hold model files: each node describes its files (kind, name, file
name, sha256, size) when it registers, and a request naming one of them resolves to its sha256;
the queue then hands the task only to a node that has that file.

What a node says about its files is not trusted to capture other people's tasks:

- a catalog name or alias (``chillout_mix``, ``sd15_canny``, ``R-ESRGAN 4x+``) always means the
  catalog's sha256, whatever files nodes report under that name;
- a name only nodes report resolves only while every online node that reports it agrees on
  one sha256; otherwise the request is refused, asking for the hash;
- the default checkpoint is this server's own, or a catalog checkpoint some node has, never
  one a node merely names (set ``DAN_DEFAULT_MODEL`` to a sha256 for anything else).

A model only nodes have is an :class:`~dan.domain.InstalledModel` whose ``path`` is
``<network>/<file name>``, which names no file here. ``path`` is only meaningful on the machine
that holds the file: the API side uses a resolved model's ``sha256`` and ``name`` (its
``ref``), never its path, and every worker finds the file again, by sha256, in its own
:class:`~dan.models.registry.ModelRegistry`.
"""

from __future__ import annotations

import builtins
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from dan.domain import InstalledModel, ModelFamily, ModelKind
from dan.errors import ModelNotFound
from dan.models.catalog import Catalog, CatalogEntry
from dan.models.registry import (
    EXTENSIONS,
    MIN_PREFIX,
    ModelRegistry,
    catalog_entry,
    is_hex,
    not_found_message,
)
from dan.nodes.store import NetworkFile

NETWORK_FOLDER = Path("<network>")  # the parent of a network-only model's (unusable) path
CACHE_S = 2.0  # how long the listing of the network's models is reused
LISTED = 500  # the most network models of one kind that are listed (most held first)


class NetworkFiles(Protocol):
    """What NetworkModels needs of the node store."""

    def find_files(
        self,
        kind: ModelKind,
        *,
        sha256: str | None = None,
        key: str | None = None,
        prefix: str | None = None,
        limit: int = 1000,
    ) -> list[NetworkFile]: ...


class NetworkModels:
    """A ModelLookup over this server's registry and the files online nodes describe.

    The registry answers first: a local file always wins, and while it resolves a reference
    nothing changes from a server without nodes. Otherwise the reference is matched against
    the online nodes' files: full sha256, catalog name or alias (the catalog's hashes only),
    model or file name (if the nodes agree on one sha256), unique prefix of at least 10 hex
    digits. Thread-safe; listings are read at most every ``cache_s``.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        nodes: NetworkFiles,
        *,
        cache_s: float = CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._nodes = nodes
        self._cache_s = cache_s
        self._clock = clock
        self._lock = threading.Lock()
        self._listed: dict[ModelKind, tuple[float, builtins.list[InstalledModel]]] = {}

    @property
    def catalog(self) -> Catalog:
        return self._registry.catalog

    def resolve(self, kind: ModelKind, ref: str) -> InstalledModel:
        """The model of ``kind`` that ``ref`` names, here or on an online node.

        Raises :class:`ModelNotFound` when neither has it (the message lists both) or when
        nodes disagree on what a name means, and passes on the registry's refusal of a
        blocked pickle here that no node offers instead.
        """
        key = ref.strip()
        try:
            return self._registry.resolve(kind, key)
        except ModelNotFound as exc:
            model = self._remote(kind, key)
            if model is not None:
                return model
            if not self._remote_list(kind) or self._blocked_here(kind, key):
                raise
            raise ModelNotFound(self._not_found(kind, key), kind=kind.value, ref=key) from exc

    def default_checkpoint(self, preferred: str | None) -> InstalledModel | None:
        """``preferred`` resolved (here or on a node) if given; else the registry's default;
        else the catalog's default, then any catalog checkpoint, that an online node has;
        ``None`` otherwise (a checkpoint a node merely names is never the default)."""
        if preferred:
            return self.resolve(ModelKind.CHECKPOINT, preferred)
        local = self._registry.default_checkpoint(None)
        if local is not None:
            return local
        entries = [self.catalog.default_checkpoint, *self.catalog.of_kind(ModelKind.CHECKPOINT)]
        for entry in entries:
            model = self._catalog_file(ModelKind.CHECKPOINT, entry)
            if model is not None:
                return model
        return None

    def list(self, kind: ModelKind) -> builtins.list[InstalledModel]:
        """The registry's usable models of ``kind`` and, once per sha256 not among them, the
        most held of the online nodes' ones; sorted by name (case-insensitive)."""
        local = self._registry.list(kind)
        seen = {m.sha256 for m in local}
        remote = []
        for model in self._remote_list(kind):
            if model.sha256 not in seen:
                seen.add(model.sha256)
                remote.append(model)
        return sorted([*local, *remote], key=lambda m: (m.name.casefold(), str(m.path)))

    def installed_here(self, kind: ModelKind) -> builtins.list[InstalledModel]:
        """The registry's usable models of ``kind`` (none that only nodes report)."""
        return self._registry.list(kind)

    # -- matching ----------------------------------------------------------------------------
    def _remote(self, kind: ModelKind, key: str) -> InstalledModel | None:
        if len(key) == 64 and is_hex(key):
            return _first(self._nodes.find_files(kind, sha256=key.lower(), limit=1))
        entry = self._catalog_name(kind, key)
        if entry is not None:  # a catalog name means the catalog's file, nothing else
            return self._catalog_file(kind, entry)
        named = self._agreed(kind, key, self._nodes.find_files(kind, key=key.casefold()))
        if named is not None:
            return named
        if is_hex(key) and MIN_PREFIX <= len(key) < 64:
            return self._by_prefix(kind, key)
        entry = catalog_entry(self.catalog, key, kind)  # a prefix of a catalog hash
        return self._catalog_file(kind, entry) if entry is not None else None

    def _catalog_name(self, kind: ModelKind, key: str) -> CatalogEntry | None:
        """The entry ``key`` names as a catalog name or alias, also with a model file's
        extension (``chillout_mix.safetensors``)."""
        stem, extension = os.path.splitext(key)
        if extension.lower() in EXTENSIONS[kind]:
            key = stem
        return self.catalog.get(key, kind)

    def _catalog_file(self, kind: ModelKind, entry: CatalogEntry) -> InstalledModel | None:
        for digest in entry.hashes:
            found = self._nodes.find_files(kind, sha256=digest, limit=1)
            if found:
                return _model(found[0], name=entry.name, family=entry.family)
        return None

    @staticmethod
    def _agreed(
        kind: ModelKind, key: str, files: builtins.list[NetworkFile]
    ) -> InstalledModel | None:
        hashes = sorted({f.sha256 for f in files})
        if len(hashes) > 1:
            shown = ", ".join(h[:MIN_PREFIX] for h in hashes[:5])
            raise ModelNotFound(
                f"online nodes report different {kind.value} files named {key!r} ({shown}); "
                "name the one you want by its sha256 (or its first 10+ hex digits)",
                kind=kind.value,
                ref=key,
            )
        return _first(files)

    def _by_prefix(self, kind: ModelKind, key: str) -> InstalledModel | None:
        files = self._nodes.find_files(kind, prefix=key.lower(), limit=50)
        hashes = sorted({f.sha256 for f in files})
        if len(hashes) > 1:
            names = ", ".join(f"{f.name} ({f.sha256[:16]}...)" for f in files[:5])
            raise ModelNotFound(
                f"{kind.value} hash prefix {key!r} is ambiguous: it matches {names}; "
                "give more hex digits or the full sha256",
                kind=kind.value,
                ref=key,
            )
        return _first(files)

    def _remote_list(self, kind: ModelKind) -> builtins.list[InstalledModel]:
        with self._lock:
            cached = self._listed.get(kind)
            if cached is not None and self._clock() - cached[0] < self._cache_s:
                return cached[1]
        listed = [_model(f) for f in self._nodes.find_files(kind, limit=LISTED)]
        with self._lock:
            self._listed[kind] = (self._clock(), listed)
        return listed

    def _blocked_here(self, kind: ModelKind, key: str) -> bool:
        """Whether the registry refused a blocked pickle here (its message says how to allow
        it, which beats a list of what is installed)."""
        folded = key.casefold()
        return any(
            self._registry.is_blocked(m)
            and (folded in (m.name.casefold(), m.path.name.casefold()) or m.sha256 == key.lower())
            for m in self._registry.list(kind, include_blocked=True)
        )

    def _not_found(self, kind: ModelKind, key: str) -> str:
        return not_found_message(
            self.catalog,
            kind,
            key,
            self.list(kind),
            where="installed here or on online nodes",
            absent="neither installed on this server nor on an online node",
        )


def _first(files: Iterable[NetworkFile]) -> InstalledModel | None:
    for file in files:
        return _model(file)
    return None


def _model(
    file: NetworkFile, *, name: str | None = None, family: ModelFamily | None = None
) -> InstalledModel:
    """The model a node's file describes; its family is the catalog's where given (the
    catalog is the server's own word), else what the nodes read from the file."""
    return InstalledModel(
        kind=file.kind,
        name=name or file.name,
        sha256=file.sha256,
        path=NETWORK_FOLDER / file.file,
        size=file.size,
        family=family or file.family,
    )
