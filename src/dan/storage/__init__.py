"""Where result images live: the BlobStore seam, a local directory, and an in-memory twin."""

from dan.storage.blobs import BlobStore, InMemoryBlobStore, LocalBlobStore

__all__ = ["BlobStore", "InMemoryBlobStore", "LocalBlobStore"]
