"""What an AUTOMATIC1111 instance has, identified by sha256: the models a node reports for it.

DAN routes tasks by the sha256 of model files, so only what can be identified that way is
reported:

- checkpoints (``GET /sdapi/v1/sd-models``) by their ``sha256``; A1111 leaves it null until it
  has hashed a file (when it first loads it), so then the file is hashed here if its
  ``filename`` is readable from this machine (DAN's hash cache remembers it), else the
  checkpoint is left out with a warning that names it;
- LoRAs (``GET /sdapi/v1/loras``) by a ``sha256`` key if the instance gives one, else by
  hashing their ``path`` the same way (the ``sshs_model_hash`` of their metadata hashes the
  tensors, not the file, so it is not used);
- model upscalers (``GET /sdapi/v1/upscalers``) by hashing their ``model_path``; the built-in
  ``Lanczos`` and ``Nearest`` need no file, and the latent modes are part of every instance;
- ControlNet models (``GET /controlnet/model_list``, names with the extension's own short
  hash, which is not a sha256) by finding and hashing their file under the instance's
  ``models/ControlNet`` folder (next to its checkpoints' folder), or the extension's own;
- DAN's catalog interrogator and annotator weights (DeepDanbooru's, BLIP's, the OpenPose body
  model), found by their file names in the instance's folders, when their sha256 is the
  catalog's: DAN sends interrogate tasks only to nodes that have these files.

Checkpoints, LoRAs and ControlNets whose file is readable here carry the family its header
names (dan.models.families); the others count as SD 1.x.

Each model keeps two names: ``name`` (the file's stem, as DAN names models) and the name the
instance wants in a request (:meth:`A1111Inventory.call_name`: a checkpoint's title, a LoRA's
name, an upscaler's name, a ControlNet model's list entry).
"""

from __future__ import annotations

import builtins
import glob
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dan.domain import InstalledModel, ModelFamily, ModelKind
from dan.errors import EngineError, ModelNotFound
from dan.models.catalog import Catalog, load_catalog
from dan.models.families import family_of_file
from dan.models.hashing import HashCache
from dan.models.registry import EXTENSIONS
from dan.workers.a1111.client import A1111Client, A1111Refused

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
RESCAN_INTERVAL_S = 10.0
ANNOTATOR_DOWNLOADS = "extensions/sd-webui-controlnet/annotator/downloads"


@dataclass(frozen=True)
class Found:
    """A model of the instance: as DAN describes it, and the name the instance calls it."""

    model: InstalledModel
    call_name: str


class A1111Inventory:
    """The instance's identified models by kind (a ModelLookup for the worker loop).

    :meth:`refresh` reads them again; a lookup of a sha256 that is not known refreshes at most
    every ``rescan_interval_s`` before it gives up. Thread-safe."""

    def __init__(
        self,
        client: A1111Client,
        hashes: HashCache,
        *,
        catalog: Catalog | None = None,
        rescan_interval_s: float = RESCAN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client, self._hashes = client, hashes
        self._catalog = catalog if catalog is not None else load_catalog()
        self._rescan_interval_s, self._clock = rescan_interval_s, clock
        self._lock = threading.Lock()
        self._found: dict[tuple[ModelKind, str], Found] = {}
        self._refreshed = -float("inf")
        self.has_controlnet = False

    def refresh(self) -> bool:
        """Read the instance's models again; whether what it has changed. Raises
        A1111Unreachable when the instance is down (nothing changes then)."""
        found, has_controlnet = self._read()
        fresh = {(f.model.kind, f.model.sha256): f for f in found}
        with self._lock:
            changed = fresh != self._found or self.has_controlnet != has_controlnet
            self._found, self.has_controlnet = fresh, has_controlnet
            self._refreshed = self._clock()
        return changed

    # -- ModelLookup -------------------------------------------------------------------------
    def list(self, kind: ModelKind) -> list[InstalledModel]:
        """The identified models of ``kind``, by name."""
        with self._lock:
            models = [f.model for (k, _), f in self._found.items() if k == kind]
        return sorted(models, key=lambda m: (m.name.casefold(), m.sha256))

    def resolve(self, kind: ModelKind, ref: str) -> InstalledModel:
        """The model of ``kind`` whose sha256 is ``ref``; ModelNotFound if the instance does
        not have it (after one refresh, at most every ``rescan_interval_s``)."""
        return self._lookup(kind, ref).model

    def call_name(self, kind: ModelKind, sha256: str) -> str:
        """What the instance calls the model of ``kind`` with ``sha256`` in a request."""
        return self._lookup(kind, sha256).call_name

    def default_checkpoint(self, preferred: str | None) -> InstalledModel | None:
        if preferred:
            return self.resolve(ModelKind.CHECKPOINT, preferred)
        checkpoints = self.list(ModelKind.CHECKPOINT)
        return checkpoints[0] if checkpoints else None

    def checkpoint_titled(self, title: str) -> str | None:
        """The sha256 of the checkpoint the instance titles ``title`` (its loaded one)."""
        with self._lock:
            return next(
                (
                    sha
                    for (kind, sha), f in self._found.items()
                    if kind == ModelKind.CHECKPOINT and f.call_name == title
                ),
                None,
            )

    def _lookup(self, kind: ModelKind, sha256: str) -> Found:
        key = (kind, sha256.lower())
        with self._lock:
            found = self._found.get(key)
            due = self._clock() - self._refreshed >= self._rescan_interval_s
        if found is None and due:
            self.refresh()
            with self._lock:
                found = self._found.get(key)
        if found is None:
            raise ModelNotFound(
                f"the AUTOMATIC1111 instance at {self._client.url} has no {kind.value} with "
                f"sha256 {sha256} (any more)",
                kind=kind.value,
                ref=sha256,
            )
        return found

    # -- reading the instance ----------------------------------------------------------------
    def _read(self) -> tuple[builtins.list[Found], bool]:
        """Every identified model of the instance, and whether it has ControlNet."""
        ident = Identifier(self._hashes)
        try:
            listed = _items(self._client.get("/sdapi/v1/sd-models"), "sd-models")
        except A1111Refused as exc:
            raise EngineError(
                f"{exc.message}; is {self._client.url} an AUTOMATIC1111 or Forge instance "
                "started with --api?"
            ) from exc
        found = [
            *checkpoints(listed, ident),
            *loras(self._listing("/sdapi/v1/loras"), ident),
            *upscalers(self._listing("/sdapi/v1/upscalers"), ident),
        ]
        roots = models_roots(found)
        names = self._controlnet_list()
        if names is not None:
            found += controlnets(names, roots, ident)
        found += catalog_files(self._catalog, roots, ident)
        return found, names is not None

    def _listing(self, path: str) -> builtins.list[dict[str, Any]]:
        """A listing the instance may lack (its Lora extension can be turned off)."""
        try:
            return _items(self._client.get(path), path)
        except A1111Refused as exc:
            log.warning("reading %s of the instance failed, so none is served: %s", path, exc)
            return []

    def _controlnet_list(self) -> builtins.list[tuple[str, Any]] | None:
        """The ControlNet extension's models, each with the sha256 the instance gives (a DAN
        server does, in ``sha256``; the extension does not); None if it has no such extension."""
        try:
            answer = self._client.get("/controlnet/model_list")
        except A1111Refused as exc:
            log.info("no ControlNet on the instance (%s)", exc.message)
            return None
        names = answer.get("model_list") if isinstance(answer, dict) else None
        given = answer.get("sha256") if isinstance(answer, dict) else None
        hashes = given if isinstance(given, dict) else {}
        if not isinstance(names, list):
            return []
        return [(str(n), hashes.get(n)) for n in names if n and n != "None"]


class Identifier:
    """Finds the sha256 of an instance's model: the one it gives, or its file's, hashed here."""

    def __init__(self, hashes: HashCache) -> None:
        self._hashes = hashes

    def identify(
        self, kind: ModelKind, call_name: str, path: str, sha256: Any, *, quiet: bool = False
    ) -> Found | None:
        """The model if its sha256 is given or its file can be hashed here; else None, with a
        warning that names it (unless ``quiet``)."""
        if not call_name:
            return None
        # Either separator: the instance may run on Windows and this node not.
        file = Path(path.replace("\\", "/")) if path else None
        digest = _sha256(sha256) or self._hash(kind, call_name, file, quiet=quiet)
        if digest is None:
            return None
        name = file.stem if file is not None else call_name
        where = file if file is not None else Path(call_name.replace("/", "_"))
        family = _family(kind, file)
        model = InstalledModel(kind, name, digest, where, _size(file), family)
        return Found(model, call_name)

    def _hash(
        self, kind: ModelKind, call_name: str, file: Path | None, *, quiet: bool
    ) -> str | None:
        try:  # a bare file name would be looked up in this process's folder: not the file
            if file is not None and file.is_absolute() and file.is_file():
                return self._hashes.sha256(file)
        except OSError as exc:
            log.warning("%s %r left out: reading %s failed: %s", kind.value, call_name, file, exc)
            return None
        if not quiet:
            log.warning(
                "%s %r left out: the instance has not hashed it yet and its file %s is not "
                "readable here (load it once in the instance, or run this node on the "
                "instance's machine)",
                kind.value,
                call_name,
                file or "(none given)",
            )
        return None


def checkpoints(items: builtins.list[dict[str, Any]], ident: Identifier) -> Iterator[Found]:
    """The identified checkpoints of a ``GET /sdapi/v1/sd-models`` answer, called by title."""
    for item in items:
        title = str(item.get("title") or item.get("model_name") or "")
        path = str(item.get("filename") or "")
        found = ident.identify(ModelKind.CHECKPOINT, title, path, item.get("sha256"))
        if found is not None:
            yield found


def loras(items: builtins.list[dict[str, Any]], ident: Identifier) -> Iterator[Found]:
    """The identified LoRAs of a ``GET /sdapi/v1/loras`` answer, called by name."""
    for item in items:
        name, path = str(item.get("name") or ""), str(item.get("path") or "")
        found = ident.identify(ModelKind.LORA, name, path, item.get("sha256"))
        if found is not None:
            yield found


def upscalers(items: builtins.list[dict[str, Any]], ident: Identifier) -> Iterator[Found]:
    """The model upscalers of a ``GET /sdapi/v1/upscalers`` answer whose file is here (the
    built-in ones have none; others name a URL until the instance downloads them)."""
    for item in items:
        name, path = str(item.get("name") or ""), item.get("model_path")
        if isinstance(path, str) and path:
            found = ident.identify(ModelKind.UPSCALER, name, path, item.get("sha256"), quiet=True)
            if found is not None:
                yield found


def controlnets(
    names: builtins.list[tuple[str, Any]], roots: builtins.list[Path], ident: Identifier
) -> Iterator[Found]:
    """The ControlNet models of ``GET /controlnet/model_list`` (``name [short hash]``) whose
    sha256 the instance gives or whose file is found in the ControlNet folders under
    ``roots``, called by their list entry."""
    folders = controlnet_folders(roots)
    for entry, sha256 in names:
        if sha256 is not None:
            given = ident.identify(ModelKind.CONTROLNET, entry, entry, sha256)
            if given is not None:
                yield given
                continue
        path = _find_file(entry.rsplit(" [", 1)[0], folders)
        if path is None:
            log.warning(
                "ControlNet model %r left out: no file of that name under %s on this machine, "
                "so its sha256 cannot be known",
                entry,
                ", ".join(str(f) for f in folders) or "the instance's models folder",
            )
            continue
        found = ident.identify(ModelKind.CONTROLNET, entry, str(path), None)
        if found is not None:
            yield found


def catalog_files(
    catalog: Catalog, roots: builtins.list[Path], ident: Identifier
) -> Iterator[Found]:
    """The interrogator and annotator weights of DAN's catalog found by file name in the
    instance's folders (``models/BLIP``, ``models/torch_deepdanbooru``, the ControlNet
    extension's downloads) with the catalog's sha256: the files that let interrogate tasks,
    and openpose ones that ask for the body model, reach this node."""
    folders = [*roots, *(root.parent / ANNOTATOR_DOWNLOADS for root in roots)]
    folders = [folder for folder in folders if folder.is_dir()]
    for entry in (*catalog.of_kind(ModelKind.INTERROGATOR), *catalog.of_kind(ModelKind.ANNOTATOR)):
        path = _find_named(entry.file_name, folders)
        found = path and ident.identify(entry.kind, entry.name, str(path), None, quiet=True)
        if found and found.model.sha256 in entry.hashes:
            yield found


def _find_named(name: str, folders: builtins.list[Path]) -> Path | None:
    for folder in folders:
        for path in sorted(folder.rglob(glob.escape(name))):
            if path.is_file():
                return path
    return None


def _items(answer: Any, path: str) -> list[dict[str, Any]]:
    if not isinstance(answer, list):
        raise EngineError(f"the instance's {path} is not a list: {str(answer)[:200]}")
    return [item for item in answer if isinstance(item, dict)]


def _sha256(value: Any) -> str | None:
    """``value`` if it is a sha256 in hex (lower-cased), else None (A1111's null included)."""
    return value.lower() if isinstance(value, str) and _SHA256.fullmatch(value) else None


def _size(file: Path | None) -> int:
    """The file's size if it is here (0 if not: the protocol takes any size)."""
    try:
        return file.stat().st_size if file is not None and file.is_absolute() else 0
    except OSError:
        return 0


def _family(kind: ModelKind, file: Path | None) -> ModelFamily | None:
    """The family read from the file's header if it is here; None if not (taken as SD 1.x:
    an SDXL checkpoint is only known as one when this node can read it)."""
    try:
        return family_of_file(kind, file) if file is not None and file.is_absolute() else None
    except OSError:
        return None


def models_roots(found: list[Found]) -> list[Path]:
    """The instance's ``models`` folders, seen from here: the parents of its checkpoints'
    folders (``models/Stable-diffusion/x.safetensors``) that exist on this machine."""
    roots = {
        f.model.path.parent.parent
        for f in found
        if f.model.kind == ModelKind.CHECKPOINT and f.model.path.is_file()
    }
    return sorted(roots)


def controlnet_folders(roots: list[Path]) -> list[Path]:
    folders = []
    for root in roots:
        folders += [root / "ControlNet", root.parent / "extensions/sd-webui-controlnet/models"]
    return [folder for folder in folders if folder.is_dir()]


def _find_file(stem: str, folders: list[Path]) -> Path | None:
    suffixes = EXTENSIONS[ModelKind.CONTROLNET] | {".pt", ".ckpt", ".bin"}
    for folder in folders:
        for path in sorted(folder.rglob(f"{glob.escape(stem)}.*")):
            if path.suffix.lower() in suffixes and path.is_file():
                return path
    return None
