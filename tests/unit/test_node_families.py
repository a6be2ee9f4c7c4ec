"""Which model families a node says it runs: what its device's memory allows, narrowed by
DAN_NODE_FAMILIES; an AUTOMATIC1111 node runs the families of its checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from dan.config import Settings
from dan.domain import InstalledModel, ModelFamily, ModelKind
from dan.engine.fake import FakeEngine
from dan.workers.capabilities import GIB, checkpoint_families, runnable_families

SD15, SDXL = ModelFamily.SD15, ModelFamily.SDXL


class DeviceEngine(FakeEngine):
    """The fake engine on a device of ``memory`` bytes (0: the CPU), as the diffusers engine
    describes it."""

    def __init__(self, memory: int) -> None:
        super().__init__()
        self.memory = memory

    def describe(self) -> dict[str, str]:
        return {"device": "cuda" if self.memory else "cpu", "device_memory_bytes": str(self.memory)}


@pytest.mark.parametrize(
    ("memory", "host", "families"),
    [
        (6 * GIB, None, {SD15}),  # a 6 GiB card: SD 1.x only
        (24 * GIB, None, {SD15, SDXL}),
        (0, 8 * GIB, {SD15}),  # the CPU of a small host
        (0, 64 * GIB, {SD15, SDXL}),
    ],
)
def test_the_device_memory_decides_sdxl(memory: int, host: int | None, families: set[str]) -> None:
    assert runnable_families(DeviceEngine(memory), host_memory=host) == families


def test_a_setting_narrows_the_families_and_unknown_ones_are_refused() -> None:
    big = DeviceEngine(24 * GIB)
    assert runnable_families(big, Settings(node_families="sd15").node_family_names) == {SD15}
    assert runnable_families(DeviceEngine(6 * GIB), ["sdxl"]) == set()  # asked, cannot
    with pytest.raises(ValueError, match="model families are sd15, sdxl, got sd3"):
        Settings(node_families="sd15, sd3")


def test_an_engine_that_does_not_describe_its_memory_is_not_held_back() -> None:
    assert runnable_families(FakeEngine()) == {SD15, SDXL}


class Checkpoints:
    def __init__(self, *families: ModelFamily | None) -> None:
        self.models = [
            InstalledModel(ModelKind.CHECKPOINT, f"m{i}", f"{i:064x}", Path(f"m{i}"), 1, family)
            for i, family in enumerate(families)
        ]

    def list(self, kind: ModelKind) -> list[InstalledModel]:
        return self.models if kind == ModelKind.CHECKPOINT else []


def test_a_backend_runs_the_families_of_its_checkpoints() -> None:
    assert checkpoint_families(Checkpoints(None)) == {SD15}  # unknown counts as SD 1.x
    assert checkpoint_families(Checkpoints(SD15, SDXL)) == {SD15, SDXL}
    assert checkpoint_families(Checkpoints(SDXL)) == {SDXL}
    assert checkpoint_families(Checkpoints()) == set()
