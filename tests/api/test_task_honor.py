"""Task honor is the work a node was given: the task's cost as queued (images x steps x
pixels), in the ledger and in escrow alike, whatever the node reports. On SQLite and
PostgreSQL."""

from __future__ import annotations

import pytest

from tests.fixtures.network import Net, Start
from tests.fixtures.scripted_node import ScriptedNode, png

# One 512x512, 20-step SD 1.x image with a first-order sampler: cost 1 (dan.tasks.needs).
ONE_UNIT = {"width": 512, "height": 512, "steps": 20, "sampler_name": "Euler a"}


def run(net: Net, node: ScriptedNode, key: str, **body: object) -> None:
    """Queue a task, and have ``node`` deliver all its images; its complete also claims a
    cost and an image count of its own, which must change nothing."""
    task_id = net.submit(key, **{**ONE_UNIT, **body})
    node.take()
    params = node.tasks[task_id]["params"]
    images = params.get("batch_size", 1) * params.get("n_iter", 1)
    keys = [node.key_of(task_id, i) for i in range(images)]
    size = (params["width"], params["height"])
    for key_ in keys:
        assert node.upload(task_id, key_, png(size)).status == 200
    result = {"image_keys": keys, "seeds": [1] * images, "cost": 1000.0, "images": 1000}
    body_ = {**node.ids(), "taskId": task_id, "result": result, "cost": 1000.0, "images": 1000}
    assert node.call("POST", "/api/node/complete", json=body_).status == 200


def test_a_task_of_four_images_earns_four_times_one_of_one(start: Start) -> None:
    """Before: a task of batch_size x n_iter = 4 images paid its node as much as one image."""
    net = start(probation_checks=0, honor_per_task=2.0)
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    node = net.node(donor, "gpu")
    run(net, node, user)
    assert net.task_honor("donor") == (pytest.approx(2.0), 0.0)
    run(net, node, user, batch_size=2, n_iter=2)
    assert net.task_honor("donor") == (pytest.approx(2.0 + 4 * 2.0), 0.0)


def test_steps_and_size_are_in_the_honor_too(start: Start) -> None:
    """Twice the steps on 1.5 times the pixels is three times the work."""
    net = start(probation_checks=0)
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    node = net.node(donor, "gpu")
    run(net, node, user, steps=40, width=768)
    assert net.task_honor("donor") == (pytest.approx(3.0), 0.0)


def test_escrow_holds_the_same_scaled_honor(start: Start) -> None:
    """A node on probation earns the same amount, held until its results are checked."""
    net = start(probation_checks=3)
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    node = net.node(donor, "gpu")
    run(net, node, user, batch_size=4)
    assert net.task_honor("donor") == (0.0, pytest.approx(4.0))


def test_an_admins_node_is_paid_at_once(start: Start) -> None:
    """Before: an admin's node, whose results are never checked, was on probation for good
    and its task honor sat in escrow for ever."""
    net = start(probation_checks=3)
    ops, user = net.key("ops", is_admin=True), net.key("user")
    node = net.node(ops, "gpu")
    run(net, node, user)
    assert net.task_honor("ops") == (pytest.approx(1.0), 0.0)
