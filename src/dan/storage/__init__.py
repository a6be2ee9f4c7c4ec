"""Where result images live: the BlobStore seam, a local directory, the database (for
several replicas), and an in-memory twin."""

from dan.storage.blobs import BlobStore, InMemoryBlobStore, LocalBlobStore
from dan.storage.sql import SqlBlobStore

__all__ = ["BlobStore", "InMemoryBlobStore", "LocalBlobStore", "SqlBlobStore"]
