"""NetworkModels: the models a request may name, on this server or on an online node.

An API replica need not hold model files: each node reports its usable models (kind, name,
file name, sha256, size) under ``"models"`` in its capabilities, and a request naming one of
them resolves to its sha256; the queue then hands the task only to a node that has that file.

A model only nodes have is an :class:`~dan.domain.InstalledModel` whose ``path`` is
``<network>/<file name>``, which names no file here. ``path`` is only meaningful on the machine
that holds the file: the API side uses a resolved model's ``sha256`` and ``name`` (its
``ref``), never its path, and every worker finds the file again, by sha256, in its own
:class:`~dan.models.registry.ModelRegistry`.
"""

from __future__ import annotations

import builtins
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from dan.domain import InstalledModel, ModelKind
from dan.errors import ModelNotFound
from dan.models.catalog import Catalog
from dan.models.registry import (
    ModelRegistry,
    by_full_hash,
    by_prefix,
    catalog_entry,
    not_found_message,
)
from dan.nodes.store import NodeRecord

NETWORK_FOLDER = Path("<network>")  # the parent of a network-only model's (unusable) path
CACHE_S = 2.0  # how long the online nodes' reports are reused
_SHA256 = re.compile(r"[0-9a-f]{64}")


class OnlineNodes(Protocol):
    """What NetworkModels needs of the node store."""

    def list_online(self) -> list[NodeRecord]: ...


@dataclass(frozen=True)
class _Reports:
    """The models the online nodes report, by kind, and how many nodes hold each sha256."""

    models: Mapping[ModelKind, tuple[InstalledModel, ...]]
    holders: Mapping[str, int]


class NetworkModels:
    """A ModelLookup over this server's registry and the models online nodes report.

    The registry answers first: a local file always wins, and while it resolves a reference
    nothing changes from a server without nodes. Otherwise the reference is matched against
    the online nodes' models by the registry's rules, in its order: full sha256, file stem or
    file name, unique prefix of at least 10 hex digits, catalog name, alias or hash. Where
    nodes report different files under one name, one the catalog lists under that name wins,
    then the one most nodes hold, then .safetensors, then the lowest sha256. Thread-safe; the
    nodes are read at most every ``cache_s``.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        nodes: OnlineNodes,
        *,
        cache_s: float = CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._nodes = nodes
        self._cache_s = cache_s
        self._clock = clock
        self._lock = threading.Lock()
        self._reports: _Reports | None = None
        self._read_at = -float("inf")

    @property
    def catalog(self) -> Catalog:
        return self._registry.catalog

    def resolve(self, kind: ModelKind, ref: str) -> InstalledModel:
        """The model of ``kind`` that ``ref`` names, here or on an online node.

        Raises :class:`ModelNotFound` when neither has it (the message lists both), and
        passes on the registry's refusal of a blocked pickle here that no node offers instead.
        """
        key = ref.strip()
        try:
            return self._registry.resolve(kind, key)
        except ModelNotFound as exc:
            reports = self._online()
            remote = reports.models.get(kind, ())
            model = _match(remote, kind, key, self.catalog, reports.holders)
            if model is not None:
                return model
            if not remote or self._blocked_here(kind, key):
                raise
            raise ModelNotFound(self._not_found(kind, key), kind=kind.value, ref=key) from exc

    def default_checkpoint(self, preferred: str | None) -> InstalledModel | None:
        """``preferred`` resolved (here or on a node) if given; else the registry's default;
        else the catalog's default if a node has it; else the first checkpoint a node has, by
        name; ``None`` if there is none anywhere."""
        if preferred:
            return self.resolve(ModelKind.CHECKPOINT, preferred)
        local = self._registry.default_checkpoint(None)
        if local is not None:
            return local
        reports = self._online()
        remote = reports.models.get(ModelKind.CHECKPOINT, ())
        default = _installed(remote, self.catalog.default_checkpoint.hashes, reports.holders)
        if default is not None:
            return default
        listed = self.list(ModelKind.CHECKPOINT)
        return listed[0] if listed else None

    def list(self, kind: ModelKind) -> builtins.list[InstalledModel]:
        """The registry's usable models of ``kind`` and, once per sha256 not among them, the
        online nodes' ones; sorted by name (case-insensitive)."""
        local = self._registry.list(kind)
        reports = self._online()
        seen = {m.sha256 for m in local}
        remote: builtins.list[InstalledModel] = []
        for model in _ranked(reports.models.get(kind, ()), reports.holders):
            if model.sha256 not in seen:
                seen.add(model.sha256)
                remote.append(model)
        return sorted([*local, *remote], key=lambda m: (m.name.casefold(), str(m.path)))

    # -- helpers -----------------------------------------------------------------------------
    def _online(self) -> _Reports:
        """The online nodes' reports, read again when older than ``cache_s``."""
        with self._lock:
            if self._reports is not None and self._clock() - self._read_at < self._cache_s:
                return self._reports
            self._reports = _collect(self._nodes.list_online())
            self._read_at = self._clock()
            return self._reports

    def _blocked_here(self, kind: ModelKind, key: str) -> bool:
        """Whether the registry refused a blocked pickle here (its message says how to allow
        it, which beats a list of what is installed)."""
        blocked = tuple(
            m
            for m in self._registry.list(kind, include_blocked=True)
            if self._registry.is_blocked(m)
        )
        try:
            return bool(blocked) and _match(blocked, kind, key, self.catalog, {}) is not None
        except ModelNotFound:  # an ambiguous prefix: the registry's own message says so
            return True

    def _not_found(self, kind: ModelKind, key: str) -> str:
        return not_found_message(
            self.catalog,
            kind,
            key,
            self.list(kind),
            where="installed here or on online nodes",
            absent="neither installed on this server nor on an online node",
        )


# -- the nodes' reports ----------------------------------------------------------------------
def _collect(online: Iterable[NodeRecord]) -> _Reports:
    """Each distinct (kind, sha256, name, file) the nodes report, and each sha256's holders."""
    found: dict[ModelKind, dict[tuple[str, str, str], InstalledModel]] = {}
    holders: Counter[str] = Counter()
    for node in online:
        reported = reported_models(node)
        holders.update({m.sha256 for m in reported})
        for model in reported:
            key = (model.sha256, model.name, model.path.name)
            found.setdefault(model.kind, {}).setdefault(key, model)
    models = {kind: tuple(by_key.values()) for kind, by_key in found.items()}
    return _Reports(models, dict(holders))


def reported_models(node: NodeRecord) -> list[InstalledModel]:
    """The models ``node`` reports in ``capabilities["models"]`` whose file it also lists in
    ``installed`` (what the queue offers it tasks for); malformed entries are skipped, as a
    node's report is not trusted further than its own tasks."""
    entries = node.capabilities.get("models")
    if not isinstance(entries, list):
        return []
    parsed = (_parse(entry) for entry in entries)
    return [m for m in parsed if m is not None and m.sha256 in node.installed]


def _parse(entry: Any) -> InstalledModel | None:
    if not isinstance(entry, dict):
        return None
    kind, name, sha = entry.get("kind"), entry.get("name"), entry.get("sha256")
    file, size = entry.get("file", name), entry.get("size", 0)
    if kind not in {k.value for k in ModelKind} or not isinstance(sha, str):
        return None
    if not (isinstance(name, str) and name and isinstance(file, str) and file):
        return None
    if not _SHA256.fullmatch(sha) or "/" in file or "\\" in file or not isinstance(size, int):
        return None
    path = NETWORK_FOLDER / file
    return InstalledModel(kind=ModelKind(kind), name=name, sha256=sha, path=path, size=size)


# -- matching: ModelRegistry's rules, over reported models -----------------------------------
def _match(
    models: tuple[InstalledModel, ...],
    kind: ModelKind,
    key: str,
    catalog: Catalog,
    holders: Mapping[str, int],
) -> InstalledModel | None:
    return (
        by_full_hash(models, key, partial(_best, holders=holders))
        or _by_name(models, key, kind, catalog, holders)
        or by_prefix(models, key, kind, partial(_best, holders=holders))
        or _by_catalog(models, key, kind, catalog, holders)
    )


def _by_name(
    models: tuple[InstalledModel, ...],
    key: str,
    kind: ModelKind,
    catalog: Catalog,
    holders: Mapping[str, int],
) -> InstalledModel | None:
    """The file named ``key``; where files of several hashes bear a catalog name, one with a
    hash the catalog lists for it (a node cannot capture a catalog name with another file)."""
    folded = key.casefold()
    named = [m for m in models if folded in (m.name.casefold(), m.path.name.casefold())]
    entry = catalog.get(key, kind) if len({m.sha256 for m in named}) > 1 else None
    vouched = [m for m in named if entry is not None and m.sha256 in entry.hashes]
    return _best(vouched or named, holders)


def _by_catalog(
    models: tuple[InstalledModel, ...],
    key: str,
    kind: ModelKind,
    catalog: Catalog,
    holders: Mapping[str, int],
) -> InstalledModel | None:
    entry = catalog_entry(catalog, key, kind)
    return _installed(models, entry.hashes, holders) if entry is not None else None


def _installed(
    models: tuple[InstalledModel, ...], hashes: Iterable[str], holders: Mapping[str, int]
) -> InstalledModel | None:
    """The model of the first of ``hashes`` (a catalog entry's) that is among ``models``."""
    for digest in hashes:
        model = _best((m for m in models if m.sha256 == digest), holders)
        if model is not None:
            return model
    return None


def _ranked(
    models: Iterable[InstalledModel], holders: Mapping[str, int]
) -> builtins.list[InstalledModel]:
    """Most holders first, then .safetensors, then by sha256 and name."""
    return sorted(
        models,
        key=lambda m: (
            -holders.get(m.sha256, 0),
            m.path.suffix.lower() != ".safetensors",
            m.sha256,
            m.name.casefold(),
        ),
    )


def _best(models: Iterable[InstalledModel], holders: Mapping[str, int]) -> InstalledModel | None:
    ranked = _ranked(models, holders)
    return ranked[0] if ranked else None
