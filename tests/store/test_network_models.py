"""NetworkModels on the real node store (SQLite, and PostgreSQL when configured): models only
online nodes report resolve like local files, local files win, and the reports are cached."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from dan.domain import ModelKind
from dan.errors import ModelNotFound
from dan.models.catalog import Catalog, CatalogEntry
from dan.models.registry import ModelRegistry
from dan.nodes.models import NetworkModels
from dan.nodes.store import NodeFile, NodeRules, SqlNodeStore
from dan.workers.capabilities import installed_files
from tests.api.conftest import install_dummy_checkpoint
from tests.store.conftest import Clock

OFFLINE_AFTER = 60.0


def sha_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


CATALOG = Catalog(
    [
        CatalogEntry(
            ModelKind.CHECKPOINT,
            "famous_mix",
            sha_of("famous"),
            "https://example.org/famous.safetensors",
            "famous.safetensors",
            aliases=("famous",),
        )
    ],
    default_checkpoint="famous_mix",
)


def entry(
    name: str, sha: str | None = None, kind: str = "checkpoint", **extra: Any
) -> dict[str, Any]:
    sha = sha or sha_of(name)
    return {
        "kind": kind,
        "name": name,
        "file": f"{name}.safetensors",
        "sha256": sha,
        "size": 5,
        **extra,
    }


class Network:
    """A registry on ``tmp_path``, a node store, and NetworkModels over both."""

    def __init__(self, db: Engine, clock: Clock, tmp_path: Path) -> None:
        self.clock, self.models_dir = clock, tmp_path / "models"
        self.nodes = SqlNodeStore(db, rules=NodeRules(offline_after_s=OFFLINE_AFTER), clock=clock)
        self.registry = ModelRegistry(
            self.models_dir, tmp_path / "cache", allow_ckpt=False, catalog=CATALOG
        )
        self.models = NetworkModels(self.registry, self.nodes, clock=clock)

    def node(self, name: str, *entries: dict[str, Any], account: str = "donor") -> str:
        files = [
            NodeFile(e["sha256"], ModelKind(e["kind"]), e["name"], e["file"], e["size"])
            for e in entries
        ]
        return self.nodes.register(account, name, {}, files, []).node_id

    def local(self, name: str) -> str:
        path = install_dummy_checkpoint(self.models_dir, name)
        self.registry.scan()
        return self.registry.hashes.sha256(path)

    def later(self, seconds: float = 3.0) -> None:
        """Time passes beyond the report cache."""
        self.clock.advance(seconds)


@pytest.fixture
def net(db: Engine, clock: Clock, tmp_path: Path) -> Network:
    return Network(db, clock, tmp_path)


def test_a_model_only_a_node_has_resolves_by_name_file_hash_and_prefix(net: Network) -> None:
    net.node("gpu", entry("remote_mix"), entry("style", kind="lora"))
    sha = sha_of("remote_mix")
    for ref in ("remote_mix", " REMOTE_MIX.safetensors ", sha, sha.upper(), sha[:10]):
        model = net.models.resolve(ModelKind.CHECKPOINT, ref)
        assert (model.name, model.sha256, model.kind) == ("remote_mix", sha, ModelKind.CHECKPOINT)
    assert not model.path.exists()  # a network-only model names no local file
    assert net.models.resolve(ModelKind.LORA, "style").sha256 == sha_of("style")
    with pytest.raises(ModelNotFound):
        net.models.resolve(ModelKind.LORA, "remote_mix")  # kinds do not mix


def test_a_catalog_name_resolves_to_the_file_a_node_has(net: Network) -> None:
    net.node("gpu", entry("whatever_it_is_called", sha_of("famous")))
    assert net.models.resolve(ModelKind.CHECKPOINT, "famous").sha256 == sha_of("famous")
    assert net.models.resolve(ModelKind.CHECKPOINT, "famous_mix").sha256 == sha_of("famous")
    default = net.models.default_checkpoint(None)
    assert default is not None and default.sha256 == sha_of("famous")


def test_a_node_cannot_capture_a_catalog_name_with_another_file(net: Network) -> None:
    net.node("honest", entry("famous_mix", sha_of("famous")))
    net.node("sly-1", entry("famous_mix", sha_of("fake")), account="sly")
    net.node("sly-2", entry("famous", sha_of("fake")), account="sly")
    for name in ("famous_mix", "FAMOUS", "famous_mix.safetensors"):
        model = net.models.resolve(ModelKind.CHECKPOINT, name)
        assert (model.sha256, model.name) == (sha_of("famous"), "famous_mix")


def test_a_catalog_name_no_node_has_is_never_another_file(net: Network) -> None:
    net.node("sly", entry("famous_mix", sha_of("fake")))
    with pytest.raises(ModelNotFound, match="in the catalog but neither installed"):
        net.models.resolve(ModelKind.CHECKPOINT, "famous_mix")
    assert net.models.default_checkpoint(None) is None  # nor the default


def test_a_name_only_nodes_report_needs_them_to_agree(net: Network) -> None:
    net.node("a", entry("remote_mix"))
    net.node("b", entry("remote_mix"))
    assert net.models.resolve(ModelKind.CHECKPOINT, "remote_mix").sha256 == sha_of("remote_mix")
    net.node("sly", entry("remote_mix", sha_of("sly")), account="sly")
    with pytest.raises(ModelNotFound, match="report different checkpoint files named"):
        net.models.resolve(ModelKind.CHECKPOINT, "remote_mix")
    # The hash still names either file.
    for sha in (sha_of("remote_mix"), sha_of("sly")):
        assert net.models.resolve(ModelKind.CHECKPOINT, sha).sha256 == sha


def test_an_offline_nodes_models_do_not_resolve(net: Network) -> None:
    net.node("gpu", entry("remote_mix"))
    assert net.models.resolve(ModelKind.CHECKPOINT, "remote_mix")
    net.clock.advance(OFFLINE_AFTER + 1)
    with pytest.raises(ModelNotFound) as caught:
        net.models.resolve(ModelKind.CHECKPOINT, "remote_mix")
    assert "no checkpoint matches 'remote_mix'" in caught.value.message
    net.later()
    assert net.models.list(ModelKind.CHECKPOINT) == []
    assert net.models.default_checkpoint(None) is None


def test_local_files_win(net: Network) -> None:
    local = net.local("shared_name")
    net.node("gpu", entry("shared_name"), entry("only_remote"))
    model = net.models.resolve(ModelKind.CHECKPOINT, "shared_name")
    assert model.sha256 == local and model.path.is_file()
    default = net.models.default_checkpoint(None)
    assert default is not None and default.sha256 == local
    preferred = net.models.default_checkpoint("only_remote")
    assert preferred is not None and preferred.sha256 == sha_of("only_remote")


def test_list_is_the_union_once_per_hash_sorted_by_name(net: Network) -> None:
    here = net.local("Middle")
    net.node("a", entry("zeta"), entry("alpha"), entry("middle_copy", here))
    net.node("b", entry("zeta"), entry("style", kind="lora"))
    listed = net.models.list(ModelKind.CHECKPOINT)
    assert [(m.name, m.sha256) for m in listed] == [
        ("alpha", sha_of("alpha")),
        ("Middle", here),
        ("zeta", sha_of("zeta")),
    ]
    assert [m.name for m in net.models.list(ModelKind.LORA)] == ["style"]


def test_unknown_references_name_what_the_network_has(net: Network) -> None:
    net.node("gpu", entry("remote_mix"))
    with pytest.raises(ModelNotFound) as caught:
        net.models.resolve(ModelKind.CHECKPOINT, "nope")
    message = caught.value.message
    assert "installed here or on online nodes: remote_mix (" in message
    assert "supportedModelInfo" in message
    with pytest.raises(ModelNotFound, match="at least 10 hex digits"):
        net.models.resolve(ModelKind.CHECKPOINT, sha_of("remote_mix")[:6])
    with pytest.raises(ModelNotFound, match="in the catalog but neither installed"):
        net.models.resolve(ModelKind.CHECKPOINT, "famous_mix")


def test_an_ambiguous_prefix_is_refused(net: Network) -> None:
    net.node("gpu", entry("one", "abcdef0123" + "0" * 54), entry("two", "abcdef0123" + "1" * 54))
    with pytest.raises(ModelNotFound, match="ambiguous"):
        net.models.resolve(ModelKind.CHECKPOINT, "abcdef0123")
    assert net.models.resolve(ModelKind.CHECKPOINT, "abcdef01231").name == "two"


def test_files_a_node_does_not_describe_are_not_named(net: Network) -> None:
    net.nodes.register("donor", "gpu", {}, [NodeFile(sha_of("bare")), NodeFile(sha_of("x"))], [])
    net.node("other", entry("fine"))
    assert [m.name for m in net.models.list(ModelKind.CHECKPOINT)] == ["fine"]
    with pytest.raises(ModelNotFound):
        net.models.resolve(ModelKind.CHECKPOINT, sha_of("bare"))  # no kind: no model


def test_a_suspect_nodes_files_do_not_resolve(net: Network) -> None:
    node = net.node("gpu", entry("remote_mix"))
    net.nodes.record_check(node, passed=False, reason="wrong picture")
    with pytest.raises(ModelNotFound):
        net.models.resolve(ModelKind.CHECKPOINT, "remote_mix")


def test_reports_are_cached_for_a_moment(net: Network) -> None:
    assert net.models.list(ModelKind.CHECKPOINT) == []
    net.node("gpu", entry("remote_mix"))
    assert net.models.list(ModelKind.CHECKPOINT) == []  # read less than 2 s ago
    net.later()
    assert [m.name for m in net.models.list(ModelKind.CHECKPOINT)] == ["remote_mix"]


def test_a_blocked_pickle_here_keeps_its_message(net: Network) -> None:
    pickle = net.models_dir / "checkpoints" / "old.ckpt"
    pickle.parent.mkdir(parents=True, exist_ok=True)
    pickle.write_bytes(b"pickled")
    net.registry.scan()
    net.node("gpu", entry("remote_mix"))
    with pytest.raises(ModelNotFound, match="DAN_ALLOW_CKPT"):
        net.models.resolve(ModelKind.CHECKPOINT, "old")
    net.node("gpu", entry("remote_mix"), entry("old"))  # a node offers a usable "old"
    net.later()
    assert net.models.resolve(ModelKind.CHECKPOINT, "old").sha256 == sha_of("old")


def test_a_worker_describes_its_files_and_cuts_the_list_to_fit(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False)
    for index in range(40):
        install_dummy_checkpoint(tmp_path / "models", f"checkpoint_{index:02d}")
    registry.scan()
    files = installed_files(registry)
    assert len(files) == 40 and files[0].kind == ModelKind.CHECKPOINT
    assert (files[0].name, files[0].file) == ("checkpoint_00", "checkpoint_00.safetensors")
    assert installed_files(registry, limit=25) == files[:25]
