"""The model registry and its hash cache, on small files in a temporary models directory."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from dan.domain import ModelFamily, ModelKind
from dan.errors import ModelNotFound
from dan.models.catalog import Catalog, CatalogEntry
from dan.models.hashing import FileChanged, HashCache, sha256_file
from dan.models.registry import ModelRegistry

CKPT = ModelKind.CHECKPOINT


class CountingHasher:
    """sha256_file, or a fixed digest for the file names in ``fake``; counts the files read."""

    def __init__(self, fake: dict[str, str] | None = None) -> None:
        self.fake = fake or {}
        self.calls: list[str] = []

    def __call__(self, path: Path) -> str:
        self.calls.append(path.name)
        return self.fake.get(path.name) or sha256_file(path)


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def put(models_dir: Path, kind: ModelKind, file_name: str, content: bytes | None = None) -> Path:
    path = models_dir / kind.folder / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if content is not None else os.urandom(64))
    return path


DEFAULT_BYTES = b"the default checkpoint"
OLD_DEFAULT_SHA = "3a17d0de" + "0" * 56


def _catalog() -> Catalog:
    default = CatalogEntry(
        kind=CKPT,
        name="chilloutmix_NiPrunedFp32Fix",
        sha256=_sha(DEFAULT_BYTES),
        url="http://127.0.0.1/chill.safetensors",
        file_name="chilloutmix_NiPrunedFp32Fix.safetensors",
        aliases=("chillout_mix",),
        also_known_sha256=(OLD_DEFAULT_SHA,),
    )
    missing = CatalogEntry(CKPT, "not_here", "e" * 64, "http://127.0.0.1/n", "not_here.ckpt")
    return Catalog([default, missing], default_checkpoint="chillout_mix")


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def make_registry(
    tmp_path: Path, models_dir: Path
) -> Callable[..., tuple[ModelRegistry, CountingHasher]]:
    def make(
        *, allow_ckpt: bool = False, fake: dict[str, str] | None = None, **kwargs: object
    ) -> tuple[ModelRegistry, CountingHasher]:
        hasher = CountingHasher(fake)
        hashes = HashCache(tmp_path / "cache", hasher=hasher)
        registry = ModelRegistry(
            models_dir,
            tmp_path / "cache",
            allow_ckpt=allow_ckpt,
            catalog=_catalog(),
            hashes=hashes,
            **kwargs,  # type: ignore[arg-type]
        )
        return registry, hasher

    return make


MakeRegistry = Callable[..., tuple[ModelRegistry, CountingHasher]]


def test_scan_creates_folders_and_lists_by_stem(
    make_registry: MakeRegistry, models_dir: Path
) -> None:
    registry, _ = make_registry()
    registry.scan()
    for kind in ModelKind:
        assert (models_dir / kind.folder).is_dir()
    put(models_dir, CKPT, "b.safetensors")
    put(models_dir, CKPT, "A.safetensors")
    put(models_dir, CKPT, "sub/c.safetensors")
    for ignored in ("d.safetensors.part", ".hidden.safetensors", "e.yaml", ".trash/f.safetensors"):
        put(models_dir, CKPT, ignored)
    put(models_dir, ModelKind.UPSCALER, "up.pth")
    registry.scan()
    assert [m.name for m in registry.list(CKPT)] == ["A", "b", "c"]
    model = registry.list(CKPT)[0]
    assert model.sha256 == sha256_file(model.path)
    assert model.size == 64
    assert [m.name for m in registry.list(ModelKind.UPSCALER)] == ["up"]
    assert registry.list(ModelKind.LORA) == []


def test_hashes_survive_a_restart(make_registry: MakeRegistry, models_dir: Path) -> None:
    put(models_dir, CKPT, "a.safetensors")
    put(models_dir, ModelKind.LORA, "l.safetensors")
    first, hasher = make_registry()
    first.scan()
    assert sorted(hasher.calls) == ["a.safetensors", "l.safetensors"]
    second, hasher2 = make_registry()  # a new process: new cache object, same cache file
    second.scan()
    assert hasher2.calls == []
    assert second.list(CKPT) == first.list(CKPT)


def test_changed_size_or_mtime_is_hashed_again(
    make_registry: MakeRegistry, models_dir: Path
) -> None:
    path = put(models_dir, CKPT, "a.safetensors", b"one")
    registry, hasher = make_registry()
    registry.scan()
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    registry.scan()
    assert hasher.calls == ["a.safetensors", "a.safetensors"]
    path.write_bytes(b"longer content")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    registry.scan()
    assert len(hasher.calls) == 3
    assert registry.list(CKPT)[0].sha256 == _sha(b"longer content")


def checkpoint_header(first_key: str) -> bytes:
    """A .safetensors file of one empty tensor named ``first_key``, its header padded to 128
    bytes, so that files of different families can have the same size."""
    header = json.dumps({first_key: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})
    return struct.pack("<Q", 128) + header.encode().ljust(128)


def test_a_rescan_does_not_read_unchanged_files_and_reads_changed_ones(
    make_registry: MakeRegistry, models_dir: Path
) -> None:
    sd15 = checkpoint_header("model.diffusion_model.out.2.weight")
    sdxl = checkpoint_header("conditioner.embedders.0.transformer.x")
    path = put(models_dir, CKPT, "model.safetensors", sd15)
    registry, hasher = make_registry()
    registry.scan()
    [first] = registry.list(CKPT)
    assert (first.family, first.sha256) == (ModelFamily.SD15, _sha(sd15))
    # Rewritten in place with the same size, and its mtime put back: to a rescan it is the
    # same file. It still shows what the first scan read, which it would not had the rescan
    # opened it for its header or its hash.
    stat = path.stat()
    path.write_bytes(sdxl)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    registry.scan()
    assert registry.list(CKPT) == [first]
    assert hasher.calls == ["model.safetensors"]
    # A new mtime: read again, header and hash.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    registry.scan()
    [changed] = registry.list(CKPT)
    assert (changed.family, changed.sha256) == (ModelFamily.SDXL, _sha(sdxl))
    assert hasher.calls == ["model.safetensors"] * 2


def test_a_removed_file_leaves_the_registry(make_registry: MakeRegistry, models_dir: Path) -> None:
    path = put(models_dir, CKPT, "gone.safetensors")
    registry, _ = make_registry()
    registry.scan()
    path.unlink()
    registry.scan()
    assert registry.list(CKPT) == []


def test_corrupt_cache_file_is_ignored_and_rewritten(
    make_registry: MakeRegistry, models_dir: Path, tmp_path: Path
) -> None:
    put(models_dir, CKPT, "a.safetensors")
    cache_file = tmp_path / "cache" / "sha256.json"
    cache_file.parent.mkdir()
    cache_file.write_text('{"version": 1, "files": {"trunc')
    registry, hasher = make_registry()
    registry.scan()
    assert hasher.calls == ["a.safetensors"]
    assert len(json.loads(cache_file.read_text())["files"]) == 1
    assert [p.name for p in cache_file.parent.iterdir()] == ["sha256.json"]  # no temp files left


def test_two_caches_on_one_file_merge_their_entries(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    first, second = HashCache(tmp_path / "cache"), HashCache(tmp_path / "cache")
    assert second.get(b) is None  # second loads the cache before first writes to it
    first.sha256(a)
    second.sha256(b)
    third = HashCache(tmp_path / "cache", hasher=CountingHasher({"a.bin": "x", "b.bin": "x"}))
    assert third.sha256(a) == _sha(b"a")
    assert third.sha256(b) == _sha(b"b")


def test_file_changing_while_hashed_is_not_cached(tmp_path: Path) -> None:
    path = tmp_path / "growing.bin"
    path.write_bytes(b"start")

    def appending_hasher(p: Path) -> str:
        with p.open("ab") as file:
            file.write(b"more")
        return "0" * 64

    cache = HashCache(tmp_path / "cache", hasher=appending_hasher)
    with pytest.raises(FileChanged):
        cache.sha256(path)
    assert cache.get(path) is None


def test_resolve_by_hash_prefix_and_name(make_registry: MakeRegistry, models_dir: Path) -> None:
    path = put(models_dir, CKPT, "MyModel.safetensors")
    sha = sha256_file(path)
    registry, _ = make_registry()
    for ref in (sha, sha.upper(), f"  {sha}  ", sha[:10], sha[:20].upper(), "MyModel", "mymodel"):
        assert registry.resolve(CKPT, ref).path == path, ref
    assert registry.resolve(CKPT, "MyModel.safetensors").path == path


def test_resolve_catalog_alias_and_also_known_hash(
    make_registry: MakeRegistry, models_dir: Path
) -> None:
    path = put(models_dir, CKPT, "renamed.safetensors", DEFAULT_BYTES)
    registry, _ = make_registry()
    for ref in ("chillout_mix", "CHILLOUT_MIX", "chilloutmix_NiPrunedFp32Fix", OLD_DEFAULT_SHA):
        model = registry.resolve(CKPT, ref)
        assert model.path == path, ref
        assert model.sha256 == _sha(DEFAULT_BYTES)
    assert registry.resolve(CKPT, OLD_DEFAULT_SHA[:10]).path == path  # A1111 short hash


def test_ambiguous_prefix_is_refused(make_registry: MakeRegistry, models_dir: Path) -> None:
    put(models_dir, CKPT, "one.safetensors")
    put(models_dir, CKPT, "two.safetensors")
    fake = {"one.safetensors": "abcdef0123" + "1" * 54, "two.safetensors": "abcdef0123" + "2" * 54}
    registry, _ = make_registry(fake=fake)
    with pytest.raises(ModelNotFound, match=r"'abcdef0123' is ambiguous.*one.*two"):
        registry.resolve(CKPT, "abcdef0123")
    assert registry.resolve(CKPT, "abcdef01231").name == "one"


def test_short_prefix_is_rejected(make_registry: MakeRegistry, models_dir: Path) -> None:
    path = put(models_dir, CKPT, "a.safetensors")
    registry, _ = make_registry()
    with pytest.raises(ModelNotFound, match="at least 10 hex digits"):
        registry.resolve(CKPT, sha256_file(path)[:9])


def test_not_found_message_teaches(make_registry: MakeRegistry, models_dir: Path) -> None:
    put(models_dir, CKPT, "a.safetensors")
    registry, _ = make_registry()
    with pytest.raises(ModelNotFound) as info:
        registry.resolve(CKPT, "f" * 64)
    message = info.value.message
    assert f"no checkpoint matches '{'f' * 64}'" in message
    assert "installed: a (" in message
    assert "supportedModelInfo" in message and "dan models pull" in message
    with pytest.raises(ModelNotFound, match=r"in the catalog but not installed.*pull not_here"):
        registry.resolve(CKPT, "not_here")
    with pytest.raises(ModelNotFound, match="no lora matches 'zzz'; installed: none"):
        registry.resolve(ModelKind.LORA, "zzz")


def test_unknown_ref_rescans_at_most_once_per_interval(
    make_registry: MakeRegistry, models_dir: Path
) -> None:
    now = [100.0]
    registry, _ = make_registry(rescan_interval_s=10.0, clock=lambda: now[0])
    registry.scan()
    put(models_dir, CKPT, "late.safetensors")
    assert registry.resolve(CKPT, "late").name == "late"  # the first miss rescans
    put(models_dir, CKPT, "later.safetensors")
    now[0] += 5
    with pytest.raises(ModelNotFound):
        registry.resolve(CKPT, "later")  # too soon for another rescan
    now[0] += 6
    assert registry.resolve(CKPT, "later").name == "later"


def test_pickled_checkpoints_are_blocked_unless_allowed(
    make_registry: MakeRegistry, models_dir: Path
) -> None:
    put(models_dir, CKPT, "pickled.ckpt")
    put(models_dir, CKPT, "safe.safetensors")
    registry, _ = make_registry(allow_ckpt=False)
    assert [m.name for m in registry.list(CKPT)] == ["safe"]
    assert [m.name for m in registry.list(CKPT, include_blocked=True)] == ["pickled", "safe"]
    with pytest.raises(ModelNotFound, match=r"pickled.*DAN_ALLOW_CKPT"):
        registry.resolve(CKPT, "pickled")
    allowed, _ = make_registry(allow_ckpt=True)
    assert allowed.resolve(CKPT, "pickled").path.suffix == ".ckpt"


def test_same_stem_prefers_safetensors(make_registry: MakeRegistry, models_dir: Path) -> None:
    put(models_dir, CKPT, "twin.ckpt")
    put(models_dir, CKPT, "twin.safetensors")
    registry, _ = make_registry(allow_ckpt=True)
    assert registry.resolve(CKPT, "twin").path.suffix == ".safetensors"
    assert registry.resolve(CKPT, "twin.ckpt").path.suffix == ".ckpt"


def test_default_checkpoint_order(make_registry: MakeRegistry, models_dir: Path) -> None:
    registry, _ = make_registry()
    assert registry.default_checkpoint(None) is None
    put(models_dir, CKPT, "zzz.safetensors", DEFAULT_BYTES)
    put(models_dir, CKPT, "aaa.safetensors")
    registry.scan()
    assert registry.default_checkpoint(None).name == "zzz"  # type: ignore[union-attr]
    assert registry.default_checkpoint("aaa").name == "aaa"  # type: ignore[union-attr]
    with pytest.raises(ModelNotFound):
        registry.default_checkpoint("missing")
    (models_dir / "checkpoints" / "zzz.safetensors").unlink()
    registry.scan()
    assert registry.default_checkpoint(None).name == "aaa"  # type: ignore[union-attr]


def test_concurrent_resolve_and_scan(make_registry: MakeRegistry, models_dir: Path) -> None:
    for i in range(5):
        put(models_dir, CKPT, f"m{i}.safetensors")
    registry, _ = make_registry()
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                assert registry.resolve(CKPT, f"m{i % 5}").name == f"m{i % 5}"
                if i == 0:
                    registry.scan()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
