"""Result checks against nodes that return plausible but wrong pictures (another seed's), on
SQLite and PostgreSQL: re-runs by a trusted local worker or by other accounts' nodes catch
them within the tasks the README promises, and honest nodes pass and are paid."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from PIL import Image

from dan.domain import GenerationRequest, TaskStatus
from dan.engine.fake import FakeEngine
from dan.imaging import encode_png
from dan.nodes.store import SqlNodeStore
from dan.services import node_rules
from dan.workers.local import LocalNodeQueue
from dan.workers.loop import Worker
from tests.fixtures.network import Net, Start
from tests.fixtures.scripted_node import ScriptedNode, png


def picture(task: dict[str, Any], *, seed_offset: int = 0, index: int = 0) -> bytes:
    """The picture the (fake) engine makes for ``task`` (its image ``index``); with an offset,
    another seed's: a plausible result that is not the one asked for."""
    request = GenerationRequest.from_params(task["params"])
    request = replace(request, seed=request.seed + seed_offset)
    image = FakeEngine().txt2img(request, {}, lambda done, total: None)[index]
    return encode_png(image, "made by a scripted node")


def deliver(node: ScriptedNode, *, lie: bool = False) -> str:
    """Claim a task and deliver its picture (another seed's if ``lie``); its id."""
    task = node.take()
    assert task is not None
    reply = node.deliver(task["id"], picture(task, seed_offset=1 if lie else 0))
    assert reply.status == 200, reply
    return str(task["id"])


@contextmanager
def local_verifier(net: Net) -> Iterator[threading.Event]:
    """The trusted local worker (FakeEngine), registered as the local node at once; it starts
    serving when the yielded event is set."""
    services = net.services
    nodes = SqlNodeStore(services.db, rules=node_rules(services.settings))
    engine = FakeEngine()
    queue = LocalNodeQueue(services.store, nodes, services.registry, engine, lookahead=8)
    queue.register()
    worker = Worker(
        queue,
        engine,
        services.registry,
        services.blobs,
        worker_id=queue.worker_id,
        lease_s=30,
        idle_sleep_s=0.01,
        beat_s=0.05,
    )
    go, stop = threading.Event(), threading.Event()

    def serve() -> None:
        if go.wait(30):
            worker.run(stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield go
    finally:
        go.set()
        stop.set()
        thread.join(10)


def settle(net: Net, task_id: str, timeout_s: float = 20.0) -> Any:
    """Settle open checks until the task's is settled (the sweeper does this every 5 s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        net.services.checks.settle_open()
        record = net.record(task_id)
        if record.status == TaskStatus.SUCCESS:
            return record
        time.sleep(0.02)
    raise AssertionError(f"the check of {task_id} never settled: {net.record(task_id)}")


def test_a_new_node_returning_another_seeds_picture_is_caught_on_its_first_task(
    start: Start,
) -> None:
    net = start(probation_checks=3)
    liar_key, user, admin = (
        net.key("liar", can_run_nodes=True),
        net.key("user"),
        net.key("ops", is_admin=True),
    )
    liar = net.node(liar_key, "gpu")
    with local_verifier(net) as go:
        task_id = net.submit(user, seed=41)
        assert deliver(liar, lie=True) == task_id
        held = net.call("POST", "/api/sd/task/status", user, json={"taskId": task_id})["data"]
        assert held["status"] == TaskStatus.PROCESSING  # not shown before its check
        go.set()
        record = settle(net, task_id)
    [image] = net.services.tasks.images(record)
    assert pixels(image) == pixels(picture({"params": record.params}))  # the right picture
    assert net.honor_rows("liar") == (0, 0)  # its escrow went with the failed check
    refused = liar.claim()
    assert (refused.status, refused.reason) == (403, "node_suspect")
    suspects = net.call("GET", "/api/admin/nodes/suspects", admin)["data"]
    assert [s["id"] for s in suspects] == [liar.node_id]
    assert "another picture" in suspects[0]["reason"]
    path = f"/api/admin/nodes/{liar.node_id}/clear"
    assert net.call("POST", path, user)["_http"] == 403
    assert net.call("POST", path, admin)["_http"] == 200
    assert liar.claim().status == 200


def test_a_batch_with_one_forged_image_is_caught(start: Start) -> None:
    """Every image of a batch is compared, not only the first: a node may compute the first
    honestly and fill the rest with cheaper pictures."""
    net = start(probation_checks=3)
    liar, user = net.node(net.key("liar", can_run_nodes=True), "gpu"), net.key("user")
    with local_verifier(net) as go:
        task_id = net.submit(user, seed=41, batch_size=2)
        task = liar.take()
        assert task is not None
        honest, forged = picture(task), picture(task, seed_offset=5, index=1)
        keys = [liar.key_of(task_id, i) for i in range(2)]
        for key, image in zip(keys, (honest, forged), strict=True):
            assert liar.upload(task_id, key, image).status == 200
        assert liar.complete(task_id, keys, seeds=[41, 42]).status == 200
        go.set()
        record = settle(net, task_id)
    right = [pixels(png) for png in net.services.tasks.images(record)]
    assert right == [pixels(picture(task, index=i)) for i in range(2)]  # the verifier's
    assert liar.claim().reason == "node_suspect"


def test_an_honest_new_node_passes_its_probation_and_is_paid(start: Start) -> None:
    net = start(probation_checks=2, verify_share=0.0)
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    honest = net.node(donor, "gpu")
    for seed in (1, 2):
        # The local worker starts only once the node has taken the task, which it then checks.
        with local_verifier(net) as go:
            task_id = net.submit(user, seed=seed)
            assert deliver(honest) == task_id
            assert net.honor_rows("donor") == (0, seed)  # held in escrow meanwhile
            go.set()
            settle(net, task_id)
    assert net.honor_rows("donor") == (2, 0)  # paid from escrow once through probation
    later = net.submit(user, seed=3)
    assert deliver(honest) == later
    assert net.record(later).status == TaskStatus.SUCCESS  # shown at once now
    assert net.honor_rows("donor") == (3, 0)


def test_without_a_trusted_verifier_a_third_account_breaks_the_tie(start: Start) -> None:
    net = start(probation_checks=1)
    user = net.key("user")
    liar = net.node(net.key("liar", can_run_nodes=True), "gpu")
    first = net.node(net.key("first", can_run_nodes=True), "gpu")
    third = net.node(net.key("third", can_run_nodes=True), "gpu")
    task_id = net.submit(user, seed=7)
    assert deliver(liar, lie=True) == task_id
    deliver(first)  # the verification run: it disagrees, but it is not trusted
    assert net.record(task_id).status == TaskStatus.PROCESSING
    assert liar.take() is None  # nor may the accused break the tie
    deliver(third)  # the tie-break: the third account's run agrees with the first's
    record = settle(net, task_id)
    assert pixels(net.services.tasks.images(record)[0]) == pixels(
        picture({"params": record.params})
    )
    assert liar.claim().reason == "node_suspect"
    assert first.claim().status == 200 and third.claim().status == 200


def test_a_node_cheating_after_its_probation_is_caught_by_a_sampled_check(start: Start) -> None:
    # With every later result checked, the first cheat is caught (the README gives the
    # number of tasks for the default share).
    net = start(probation_checks=1, verify_share=1.0)
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    node = net.node(donor, "gpu")
    with local_verifier(net) as go:
        honest_task = net.submit(user, seed=5)
        deliver(node)
        go.set()
        settle(net, honest_task)
    with local_verifier(net) as go:
        cheat = net.submit(user, seed=6)
        assert deliver(node, lie=True) == cheat
        shown = net.record(cheat)
        assert shown.status == TaskStatus.SUCCESS  # past probation: shown, checked after
        go.set()
        deadline = time.monotonic() + 20
        while node.claim().reason != "node_suspect" and time.monotonic() < deadline:
            net.services.checks.settle_open()
            time.sleep(0.05)
    record = net.record(cheat)
    assert pixels(net.services.tasks.images(record)[0]) == pixels(
        picture({"params": record.params})
    )
    assert node.claim().reason == "node_suspect"


def pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").tobytes()


def test_a_verifier_reads_the_tasks_inputs_but_never_the_result_it_checks(start: Start) -> None:
    net = start(probation_checks=1)
    user = net.key("user")
    liar = net.node(net.key("liar", can_run_nodes=True), "gpu")
    verifier = net.node(net.key("verifier", can_run_nodes=True), "gpu")
    init = base64.b64encode(png(colour=(9, 9, 9))).decode()
    task_id = net.submit(user, "/api/sd/img2img/async", init_image=init)
    assert liar.take()["id"] == task_id  # type: ignore[index]
    assert liar.deliver(task_id, png(colour=(1, 1, 1))).status == 200
    run = verifier.take()
    assert run is not None and run["id"] != task_id
    assert run["params"]["init_image_key"] == f"{task_id}/init.png"
    assert verifier.input(run["id"], f"{task_id}/init.png").status == 200
    copied = verifier.input(run["id"], liar.key_of(task_id))
    assert copied.status == 400  # it could copy the result it is asked to check
    assert verifier.input(run["id"], f"{task_id}-other/init.png").status == 400
