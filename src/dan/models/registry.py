"""The registry of installed models: files under ``models/<kind folder>/``, known by sha256.

Layout (created on the first scan)::

    models/checkpoints/  *.safetensors, *.ckpt
    models/loras/        *.safetensors, *.pt, *.ckpt
    models/controlnet/   *.safetensors, *.pth
    models/upscalers/    *.safetensors, *.pth, *.pt, *.ckpt
    models/interrogators/ *.safetensors, *.pth, *.pt, *.txt (CLIP, BLIP, DeepDanbooru)
    models/annotators/   *.safetensors, *.pth (the OpenPose body model)
    models/vaes/         *.safetensors (e.g. SDXL's fp16-fix VAE)
    models/embeddings/   *.safetensors, *.pt (textual inversion, used by name in prompts)

(folder names come from :attr:`dan.domain.ModelKind.folder`)

Sub-folders are scanned too; hidden files and folders and anything with another extension
(``*.part`` downloads in progress, ``*.tmp``, ``*.yaml``) are ignored. A model's name is its file
stem. A rescan reads only new or changed files: what a scan learnt of a file (its sha256 and
the family its header shows) is kept with the file's (size, mtime_ns) and reused while both are
unchanged, and hashes also outlive restarts in :class:`~dan.models.hashing.HashCache`.

Pickled checkpoints and LoRAs (``.ckpt``, ``.pt``) can run code when loaded. Unless
``allow_ckpt`` is set they are *blocked*: scanned and shown by ``list(kind, include_blocked=True)``
(so the CLI can say why they are unusable), but left out of ``list(kind)`` and refused by
:meth:`ModelRegistry.resolve` with a message saying how to allow them. ControlNet, upscaler,
interrogator and annotator weights ship mostly as ``.pth``/``.pt`` pickles; they are always
listed, and the engine loads them with ``torch.load(weights_only=True)`` (CLIP's ``ViT-L-14.pt``
is a TorchScript archive, read with ``torch.jit.load``, which runs no Python code).
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from dan.domain import InstalledModel, ModelFamily, ModelKind
from dan.errors import ModelNotFound
from dan.models.catalog import Catalog, CatalogEntry, load_catalog
from dan.models.families import family_of_file
from dan.models.hashing import HashCache

log = logging.getLogger(__name__)

EXTENSIONS: dict[ModelKind, frozenset[str]] = {
    ModelKind.CHECKPOINT: frozenset({".safetensors", ".ckpt"}),
    ModelKind.LORA: frozenset({".safetensors", ".pt", ".ckpt"}),
    ModelKind.CONTROLNET: frozenset({".safetensors", ".pth"}),
    ModelKind.UPSCALER: frozenset({".safetensors", ".pth", ".pt", ".ckpt"}),
    # CLIP's archive is .pt, BLIP's and DeepDanbooru's weights .pth/.pt, BLIP's vocabulary .txt.
    ModelKind.INTERROGATOR: frozenset({".safetensors", ".pth", ".pt", ".txt"}),
    ModelKind.ANNOTATOR: frozenset({".safetensors", ".pth"}),
    ModelKind.VAE: frozenset({".safetensors"}),
    # A1111's formats; .pt ones are read with torch.load(weights_only=True), which runs no code.
    ModelKind.EMBEDDING: frozenset({".safetensors", ".pt"}),
}
# Kinds whose pickled files need allow_ckpt, and which suffixes count as pickled for them.
GATED_KINDS = frozenset({ModelKind.CHECKPOINT, ModelKind.LORA})
PICKLED_SUFFIXES = frozenset({".ckpt", ".pt"})
MIN_PREFIX = 10  # AUTOMATIC1111's short hash is the first 10 hex digits of the sha256
_HEX = re.compile(r"[0-9a-fA-F]+")
_LISTED_IN_MESSAGES = 10
HOW_TO = (
    "see GET /api/sd/supportedModelInfo or `dan models list`; download with `dan models pull NAME`"
)


class ModelRegistry:
    """Installed models by kind, resolvable by hash, hash prefix, file name or catalog name.

    Thread-safe: scans are serialised, readers see the last complete scan of each kind. A kind
    is scanned on first use if :meth:`scan` was not called. ``rescan_interval_s`` limits the
    on-demand rescans that an unknown reference triggers (per kind).
    """

    def __init__(
        self,
        models_dir: Path,
        cache_dir: Path,
        *,
        allow_ckpt: bool,
        catalog: Catalog | None = None,
        hashes: HashCache | None = None,
        rescan_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models_dir = models_dir
        self.allow_ckpt = allow_ckpt
        self.catalog = catalog if catalog is not None else load_catalog()
        self.hashes = hashes if hashes is not None else HashCache(cache_dir)
        self.rescan_interval_s = rescan_interval_s
        self._clock = clock
        self._lock = threading.Lock()  # guards _models and _last_rescan
        self._scan_lock = threading.Lock()  # one scan at a time
        self._models: dict[ModelKind, tuple[InstalledModel, ...]] = {}
        self._last_rescan: dict[ModelKind, float] = {}
        # What the last scan found in each file, with the (size, mtime_ns) it had then; guarded
        # by _scan_lock, only the files of the last scan of their kind.
        self._inspected: dict[Path, tuple[tuple[int, int], InstalledModel]] = {}

    def folder(self, kind: ModelKind) -> Path:
        """The folder holding models of ``kind``."""
        return self.models_dir / kind.folder

    def scan(self) -> None:
        """Rescan every kind's folder (creating missing folders). Unreadable files are skipped
        with a warning; files changing during the scan are picked up by a later one."""
        for kind in ModelKind:
            self._scan_kind(kind)

    def installed_here(self, kind: ModelKind) -> builtins.list[InstalledModel]:
        """The usable models of ``kind``: all of a registry's are installed here."""
        return self.list(kind)

    def list(
        self, kind: ModelKind, *, include_blocked: bool = False
    ) -> builtins.list[InstalledModel]:
        """Models of ``kind`` sorted by name (case-insensitive); blocked pickles only on request."""
        return [m for m in self._snapshot(kind) if include_blocked or not self.is_blocked(m)]

    def is_blocked(self, model: InstalledModel) -> bool:
        """Whether ``model`` is a pickled checkpoint/LoRA and ``allow_ckpt`` is off."""
        return (
            not self.allow_ckpt
            and model.kind in GATED_KINDS
            and model.path.suffix.lower() in PICKLED_SUFFIXES
        )

    def find_installed(self, entry: CatalogEntry) -> InstalledModel | None:
        """The installed file of a catalog entry (its catalog sha256 first, then also-known ones),
        blocked or not; ``None`` if it is not installed."""
        models = self._snapshot(entry.kind)
        for digest in entry.hashes:
            for model in models:
                if model.sha256 == digest:
                    return model
        return None

    def resolve(self, kind: ModelKind, ref: str) -> InstalledModel:
        """The installed model of ``kind`` that ``ref`` names.

        ``ref`` is tried as, in order: a full sha256 (any case); a file stem or file name (any
        case); a unique sha256 prefix of at least 10 hex digits; a catalog name, alias or
        also-known sha256 (or prefix), meaning the installed file of that catalog entry. When
        nothing matches, the kind's folder is rescanned once (at most every
        ``rescan_interval_s``) and the lookup retried.

        Raises :class:`ModelNotFound` when nothing matches, when a prefix is ambiguous, or when
        the match is a blocked pickle; the message says what is installed and how to get more.
        """
        key = ref.strip()
        model = self._match(kind, key)
        if model is None and self._may_rescan(kind):
            self._scan_kind(kind)
            model = self._match(kind, key)
        if model is None:
            raise ModelNotFound(self._not_found_message(kind, key), kind=kind.value, ref=key)
        if self.is_blocked(model):
            raise ModelNotFound(_blocked_message(model), kind=kind.value, ref=key)
        return model

    def default_checkpoint(self, preferred: str | None) -> InstalledModel | None:
        """The checkpoint used when a request names none: ``preferred`` (resolved, so an
        unknown one raises :class:`ModelNotFound`) if given, else the catalog's default if
        installed and usable, else the first usable checkpoint by name; ``None`` if there is
        none."""
        if preferred:
            return self.resolve(ModelKind.CHECKPOINT, preferred)
        model = self.find_installed(self.catalog.default_checkpoint)
        if model is not None and not self.is_blocked(model):
            return model
        usable = self.list(ModelKind.CHECKPOINT)
        return usable[0] if usable else None

    # -- scanning -------------------------------------------------------------------------

    def _snapshot(self, kind: ModelKind) -> tuple[InstalledModel, ...]:
        with self._lock:
            models = self._models.get(kind)
        if models is None:
            self._scan_kind(kind)
            with self._lock:
                models = self._models[kind]
        return models

    def _scan_kind(self, kind: ModelKind) -> None:
        with self._scan_lock:
            folder = self.folder(kind)
            folder.mkdir(parents=True, exist_ok=True)
            paths = list(_model_files(folder, EXTENSIONS[kind]))
            found = [m for p in paths if (m := self._inspect(kind, p))]
            self._forget(kind, set(paths))
            found.sort(key=lambda m: (m.name.casefold(), str(m.path)))
            with self._lock:
                self._models[kind] = tuple(found)

    def _inspect(self, kind: ModelKind, path: Path) -> InstalledModel | None:
        """The model in ``path``: what the last scan found while the file's size and mtime
        are unchanged (the file is not opened), else read (hash and header) and remembered.
        None, with a warning, for a file that cannot be read."""
        try:
            stat = path.stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
            known = self._inspected.get(path)
            if known is not None and known[0] == stamp and known[1].kind == kind:
                return known[1]
            digest = self.hashes.sha256(path)
            family = self._family(kind, digest, path)
        except OSError as exc:
            log.warning("skipping %s: %s", path, exc)
            return None
        # Changed since the stat? Then the next scan sees another stamp and reads it again.
        model = InstalledModel(kind, path.stem, digest, path, stamp[0], family)
        self._inspected[path] = (stamp, model)
        return model

    def _forget(self, kind: ModelKind, present: set[Path]) -> None:
        """Drop what was remembered of ``kind``'s files that are gone."""
        gone = [p for p, (_, m) in self._inspected.items() if m.kind == kind and p not in present]
        for path in gone:
            del self._inspected[path]

    def _family(self, kind: ModelKind, sha256: str, path: Path) -> ModelFamily | None:
        """The catalog's family for a catalog file, else the one its tensor names show."""
        entry = self.catalog.get(sha256, kind)
        if entry is not None and entry.family is not None:
            return entry.family
        return family_of_file(kind, path)

    def _may_rescan(self, kind: ModelKind) -> bool:
        """Whether an on-demand rescan of ``kind`` is due; if so, records that it happens now."""
        now = self._clock()
        with self._lock:
            last = self._last_rescan.get(kind)
            if last is not None and now - last < self.rescan_interval_s:
                return False
            self._last_rescan[kind] = now
            return True

    # -- matching -------------------------------------------------------------------------

    def _match(self, kind: ModelKind, key: str) -> InstalledModel | None:
        models = self._snapshot(kind)
        return (
            by_full_hash(models, key)
            or _by_name(models, key)
            or by_prefix(models, key, kind)
            or self._by_catalog(kind, key)
        )

    def _by_catalog(self, kind: ModelKind, key: str) -> InstalledModel | None:
        entry = catalog_entry(self.catalog, key, kind)
        return self.find_installed(entry) if entry is not None else None

    def _not_found_message(self, kind: ModelKind, key: str) -> str:
        available = self.list(kind)
        return not_found_message(
            self.catalog, kind, key, available, where="installed", absent="not installed"
        )


def not_found_message(
    catalog: Catalog,
    kind: ModelKind,
    key: str,
    available: builtins.list[InstalledModel],
    *,
    where: str,
    absent: str,
) -> str:
    """Why ``key`` names no model of ``kind``: a catalog model that is ``absent`` (with the
    command that pulls it), or what is ``where`` (and a hint about short hash prefixes)."""
    entry = catalog.get(key, kind)
    if entry is not None:
        return (
            f"{kind.value} {key!r} is in the catalog but {absent}; "
            f"download it with `dan models pull {entry.name}`"
        )
    hint = ""
    if is_hex(key) and len(key) < MIN_PREFIX:
        hint = f" (a hash prefix needs at least {MIN_PREFIX} hex digits)"
    return f"no {kind.value} matches {key!r}{hint}; {where}: {describe(available)}; {HOW_TO}"


def catalog_entry(catalog: Catalog, key: str, kind: ModelKind) -> CatalogEntry | None:
    """The catalog entry of ``kind`` that ``key`` names: name, alias, sha256, or a 10+ digit
    prefix of one of its hashes."""
    entry = catalog.get(key, kind)
    if entry is None and is_hex(key) and MIN_PREFIX <= len(key) < 64:
        prefix = key.lower()
        entries = catalog.of_kind(kind)
        entry = next((e for e in entries if any(h.startswith(prefix) for h in e.hashes)), None)
    return entry


def _model_files(folder: Path, extensions: frozenset[str]) -> Iterator[Path]:
    """Files under ``folder`` with one of ``extensions``, hidden files and folders excluded."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                yield Path(root) / name


def is_hex(text: str) -> bool:
    return _HEX.fullmatch(text) is not None


Prefer = Callable[[Iterable[InstalledModel]], "InstalledModel | None"]


def by_full_hash(
    models: Iterable[InstalledModel], key: str, prefer: Prefer | None = None
) -> InstalledModel | None:
    """The model whose sha256 is ``key`` (any case), chosen by ``prefer`` among copies."""
    if len(key) != 64 or not is_hex(key):
        return None
    digest = key.lower()
    return (prefer or preferred)(m for m in models if m.sha256 == digest)


def _by_name(models: tuple[InstalledModel, ...], key: str) -> InstalledModel | None:
    folded = key.casefold()
    return preferred(m for m in models if folded in (m.name.casefold(), m.path.name.casefold()))


def by_prefix(
    models: Iterable[InstalledModel], key: str, kind: ModelKind, prefer: Prefer | None = None
) -> InstalledModel | None:
    """The model whose sha256 starts with ``key`` (10+ hex digits); raises ModelNotFound if
    several different hashes do."""
    if not (is_hex(key) and MIN_PREFIX <= len(key) < 64):
        return None
    prefix = key.lower()
    matches = [m for m in models if m.sha256.startswith(prefix)]
    hashes = sorted({m.sha256 for m in matches})
    if len(hashes) > 1:
        names = ", ".join(f"{m.name} ({m.sha256[:16]}...)" for m in matches)
        raise ModelNotFound(
            f"{kind.value} hash prefix {key!r} is ambiguous: it matches {names}; "
            "give more hex digits or the full sha256",
            kind=kind.value,
            ref=key,
        )
    return (prefer or preferred)(matches)


def preferred(models: Iterable[InstalledModel]) -> InstalledModel | None:
    """Among files that all match, prefer .safetensors, then the first by path."""
    ranked = sorted(models, key=lambda m: (m.path.suffix.lower() != ".safetensors", str(m.path)))
    return ranked[0] if ranked else None


def describe(models: builtins.list[InstalledModel]) -> str:
    """The first few models as ``name (short hash)``, for error messages."""
    if not models:
        return "none"
    shown = ", ".join(f"{m.name} ({m.sha256[:MIN_PREFIX]})" for m in models[:_LISTED_IN_MESSAGES])
    more = len(models) - _LISTED_IN_MESSAGES
    return shown + (f" and {more} more" if more > 0 else "")


def _blocked_message(model: InstalledModel) -> str:
    return (
        f"{model.kind.value} {model.name!r} is a pickled file ({model.path.name}), which can run "
        "code when loaded; convert it to .safetensors, or set DAN_ALLOW_CKPT=true if you trust it"
    )
