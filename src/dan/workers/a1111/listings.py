"""Reading an AUTOMATIC1111 instance's listings, one function per kind of model.

Each function takes one listing's answer (see :mod:`dan.workers.a1111.inventory` for which
endpoint and what is identified how) and yields the models of it whose sha256 is known: the one
the instance gives, or that of its file hashed here (:class:`Identifier`).
"""

from __future__ import annotations

import builtins
import glob
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dan.domain import InstalledModel, ModelFamily, ModelKind
from dan.models.catalog import Catalog
from dan.models.families import family_of_file
from dan.models.hashing import HashCache
from dan.models.registry import EXTENSIONS

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
ANNOTATOR_DOWNLOADS = "extensions/sd-webui-controlnet/annotator/downloads"


@dataclass(frozen=True)
class Found:
    """A model of the instance: as DAN describes it, and the name the instance calls it."""

    model: InstalledModel
    call_name: str


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


def vaes(items: builtins.list[dict[str, Any]], ident: Identifier) -> Iterator[Found]:
    """The identified VAEs of a ``GET /sdapi/v1/sd-vae`` answer, called by ``model_name`` (what
    ``override_settings.sd_vae`` takes)."""
    for item in items:
        name, path = str(item.get("model_name") or ""), str(item.get("filename") or "")
        found = ident.identify(ModelKind.VAE, name, path, item.get("sha256"))
        if found is not None:
            yield found


def embeddings(
    named: Mapping[str, Any], roots: builtins.list[Path], ident: Identifier
) -> Iterator[Found]:
    """The embeddings of a ``GET /sdapi/v1/embeddings`` answer (``name -> info``, ``loaded``
    and ``skipped`` together) whose sha256 the instance gives or whose file is found in the
    embeddings folders of ``roots``, called by name (as prompts use them)."""
    folders = embedding_folders(roots)
    for name, info in named.items():
        given = info.get("sha256") if isinstance(info, dict) else None
        path = _find_file(ModelKind.EMBEDDING, name, folders)
        if given is None and path is None:
            log.warning(
                "embedding %r left out: no file of that name under %s on this machine, so its "
                "sha256 cannot be known",
                name,
                ", ".join(str(f) for f in folders) or "the instance's embeddings folder",
            )
            continue
        found = ident.identify(ModelKind.EMBEDDING, name, str(path or ""), given)
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
        path = _find_file(ModelKind.CONTROLNET, entry.rsplit(" [", 1)[0], folders)
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


def embedding_folders(roots: list[Path]) -> list[Path]:
    """A1111's ``embeddings`` folder sits beside ``models``; DAN's is ``models/embeddings``."""
    folders = [f for root in roots for f in (root.parent / "embeddings", root / "embeddings")]
    return [folder for folder in folders if folder.is_dir()]


def _find_file(kind: ModelKind, stem: str, folders: list[Path]) -> Path | None:
    suffixes = EXTENSIONS[kind] | {".pt", ".ckpt", ".bin"}
    for folder in folders:
        for path in sorted(folder.rglob(f"{glob.escape(stem)}.*")):
            if path.suffix.lower() in suffixes and path.is_file():
                return path
    return None
