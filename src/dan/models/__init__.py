"""Models: the catalog of downloadable models, the registry of installed ones, and downloads.

No torch here: the API process lists and resolves models without loading any.

- :mod:`dan.models.catalog`: :func:`load_catalog`, :class:`Catalog`, :class:`CatalogEntry`.
- :mod:`dan.models.hashing`: :class:`HashCache`, sha256 of files cached across restarts.
- :mod:`dan.models.registry`: :class:`ModelRegistry`, installed files resolved by hash or name.
- :mod:`dan.models.download`: :func:`pull`, resumable verified downloads.
- :mod:`dan.models.sources`: :class:`DownloadSources`, a Hugging Face mirror and the tokens
  that go only to their own source.
"""

from dan.models.catalog import Catalog, CatalogEntry, load_catalog
from dan.models.download import pull, target_path
from dan.models.hashing import HashCache, sha256_file
from dan.models.registry import ModelRegistry
from dan.models.sources import DownloadSources

__all__ = [
    "Catalog",
    "CatalogEntry",
    "DownloadSources",
    "HashCache",
    "ModelRegistry",
    "load_catalog",
    "pull",
    "sha256_file",
    "target_path",
]
