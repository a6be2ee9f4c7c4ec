"""More of the hostile-node suite (tests/api/test_hostile_nodes.py): scripted nodes speaking
the node protocol over real HTTP, on SQLite and PostgreSQL. Each test names what a node could
do before and what must happen instead."""

from __future__ import annotations

import threading
import time
from typing import Any

from dan.nodes.store import SqlNodeStore
from dan.services import node_rules
from tests.fixtures.network import Net, Start
from tests.fixtures.scripted_node import ScriptedNode, fake_sha


def checkpoint(name: str, sha: str, family: str) -> dict[str, Any]:
    file = f"{name}.safetensors"
    return {"sha256": sha, "kind": "checkpoint", "name": name, "file": file, "family": family}


def past_probation(net: Net, node: ScriptedNode) -> None:
    """The node's results have been checked and found right as often as probation asks."""
    nodes = SqlNodeStore(net.services.db, rules=node_rules(net.services.settings))
    for _ in range(net.services.settings.probation_checks):
        nodes.record_check(node.node_id, passed=True)


def test_new_nodes_cannot_set_the_family_of_a_checkpoint_others_have(start: Start) -> None:
    """Before: a checkpoint only nodes have took the greatest family any holder reported, so
    one new node saying "sdxl" of an SD 1.x file (under its own name for it, even) made every
    task on it SDXL work: out of reach of the SD 1.x cards that have it, at 1024 px."""
    net = start(probation_checks=1)
    user, sha = net.key("user"), fake_sha("an sd15 mix")
    donor = net.key("donor", can_run_nodes=True)
    honest = net.node(donor, "honest", [checkpoint("mix", sha, "sd15")], families=["sd15"])
    past_probation(net, honest)
    sly = net.key("sly", can_run_nodes=True)
    for i in range(3):
        liar = [checkpoint("mix_xl", sha, "sdxl")]
        net.node(sly, f"liar-{i}", liar, families=["sd15", "sdxl"])
    listed = net.call("GET", "/api/sd/supportedModelInfo", user)["data"]["Models"]
    assert [m["family"] for m in listed if m["hash"] == sha] == ["sd15"]
    task_id = net.submit(user, model="mix_xl")  # by the liars' name for it
    assert net.record(task_id).params["model"]["sha256"] == sha
    assert honest.take()["id"] == task_id  # type: ignore[index]


def listed_family(net: Net, sha: str) -> list[str]:
    listed = net.call("GET", "/api/sd/supportedModelInfo", net.key("user"))["data"]["Models"]
    return [m["family"] for m in listed if m["hash"] == sha]


def test_one_accounts_many_nodes_cannot_outvote_two_accounts(start: Start) -> None:
    """Before: every node voted, so an account that may run nodes registered three names
    (nodes are free, up to DAN_MAX_NODES_PER_ACCOUNT) and outvoted two donors 3 to 2."""
    net = start(probation_checks=1)
    sha = fake_sha("an sd15 mix")
    for donor in ("alice", "bob"):
        key = net.key(donor, can_run_nodes=True)
        past_probation(net, net.node(key, "gpu", [checkpoint("mix", sha, "sd15")]))
    sly = net.key("sly", can_run_nodes=True)
    for i in range(3):
        past_probation(net, net.node(sly, f"liar-{i}", [checkpoint("mix", sha, "sdxl")]))
    assert listed_family(net, sha) == ["sd15"]


def test_an_admins_node_outvotes_newcomers(start: Start) -> None:
    """Before: an admin's node, never checked, voted as a node on probation, so two new
    accounts' nodes outvoted it."""
    net = start(probation_checks=1)
    sha = fake_sha("an sd15 mix")
    net.node(net.key("ops", is_admin=True), "gpu", [checkpoint("mix", sha, "sd15")])
    for newcomer in ("new-1", "new-2"):
        key = net.key(newcomer, can_run_nodes=True)
        net.node(key, "gpu", [checkpoint("mix", sha, "sdxl")])
    assert listed_family(net, sha) == ["sd15"]


def test_claims_past_the_waiting_limit_write_nothing(start: Start) -> None:
    """Before: a claim wrote the node's sighting (last seen, its loaded checkpoints, online
    honor) before the limit of waiting claims refused it, so a node flooding claims was kept
    online and credited by the very requests it was refused."""
    net = start()
    donor = net.key("donor", can_run_nodes=True)
    node = net.node(donor, "gpu", loaded=[net.checkpoint])
    waiting = threading.Thread(target=node.claim, kwargs={"wait_s": 3.0})
    waiting.start()
    time.sleep(0.5)  # its claim waits; the sighting it wrote is the last for now
    before = mine(net, donor)
    for _ in range(20):
        refused = node.claim(loaded=[fake_sha("another checkpoint")])
        assert (refused.status, refused.reason) == (429, "too_many")
        time.sleep(0.02)
    after = mine(net, donor)
    waiting.join(10)
    assert after["lastSeenAt"] == before["lastSeenAt"]
    assert after["loaded"] == [net.checkpoint]


def mine(net: Net, key: str) -> dict[str, Any]:
    nodes = net.call("GET", "/api/nodes/mine", key)["data"]
    assert len(nodes) == 1, nodes
    return nodes[0]  # type: ignore[no-any-return]
