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
- VAEs (``GET /sdapi/v1/sd-vae``) by a ``sha256`` key if the instance gives one (a DAN server
  does), else by hashing their ``filename``; a request names one by its ``model_name``;
- textual-inversion embeddings (``GET /sdapi/v1/embeddings``, ``loaded`` and ``skipped``
  alike: the skipped ones are of the other family) by a ``sha256`` key if given, else by
  finding and hashing their file (the listing names none) under the instance's
  ``embeddings`` folder (next to its ``models`` folder), or ``models/embeddings``;
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
name, an upscaler's name, a VAE's file name, a ControlNet model's list entry; an embedding's
name, which prompts use). The reading of each listing is in :mod:`dan.workers.a1111.listings`.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from dan.domain import InstalledModel, ModelKind
from dan.errors import EngineError, ModelNotFound
from dan.models.catalog import Catalog, load_catalog
from dan.models.hashing import HashCache
from dan.workers.a1111.client import A1111Client, A1111Refused
from dan.workers.a1111.listings import (
    Found,
    Identifier,
    catalog_files,
    checkpoints,
    controlnets,
    embeddings,
    loras,
    models_roots,
    upscalers,
    vaes,
)

log = logging.getLogger(__name__)

RESCAN_INTERVAL_S = 10.0


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
            *vaes(self._listing("/sdapi/v1/sd-vae"), ident),
        ]
        roots = models_roots(found)
        found += embeddings(self._embeddings(), roots, ident)
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

    def _embeddings(self) -> dict[str, Any]:
        """The instance's textual-inversion embeddings by name, those its loaded checkpoint
        can use (``loaded``) and the others (``skipped``: they serve checkpoints of the other
        family); empty if the instance cannot list them."""
        path = "/sdapi/v1/embeddings"
        try:
            answer = self._client.get(path)
        except A1111Refused as exc:
            log.warning("reading %s of the instance failed, so none is served: %s", path, exc)
            return {}
        if not isinstance(answer, dict):
            return {}
        named: dict[str, Any] = {}
        for part in (answer.get("skipped"), answer.get("loaded")):
            named.update(part if isinstance(part, dict) else {})
        return named

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


def _items(answer: Any, path: str) -> list[dict[str, Any]]:
    if not isinstance(answer, list):
        raise EngineError(f"the instance's {path} is not a list: {str(answer)[:200]}")
    return [item for item in answer if isinstance(item, dict)]
