"""The hostile-node suite: a scripted node that speaks the node protocol over real HTTP does
what a dishonest or broken donor would, and the network stays correct. On SQLite and
PostgreSQL.

Each test names what a node could do before and what must happen instead."""

from __future__ import annotations

import base64
import io
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from dan.domain import ModelKind, TaskStatus
from tests.fixtures.network import SMALL, Start
from tests.fixtures.scripted_node import ScriptedNode, fake_sha, png


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (7.5 GB of RGB) over a few
    bytes of data: a decoder that trusts it allocates the lot."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def png_with_text(size: tuple[int, int], text_bytes: int) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("padding", "x" * text_bytes)
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# -- 1. flooding what a node has ---------------------------------------------------------------
def test_a_flood_of_made_up_files_is_refused_and_submits_keep_working(start: Start) -> None:
    """Before: 70,000 made-up hashes were accepted, and every submit on PostgreSQL built an
    IN list past its 65,535 parameters and answered 500."""
    net = start(max_files_per_account=30_000)
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    flood = [f"{i:064x}" for i in range(70_000)]
    refused = ScriptedNode(net.api.client, donor, "flood").register(flood)  # type: ignore[arg-type]
    assert (refused.status, refused.reason) == (400, "invalid") and "files" in refused.message
    net.node(donor, "big", [net.checkpoint, *flood[:19_999]])
    over = ScriptedNode(net.api.client, donor, "more").register(flood[20_000:40_000])  # type: ignore[arg-type]
    assert over.status == 400 and "at most 30000 are accepted per account" in over.message
    task_id = net.submit(user)
    status = net.call("POST", "/api/sd/task/status", user, json={"taskId": task_id})
    assert (status["_http"], status["data"]["queuePosition"]) == (200, 1)


# -- 2. capturing other people's tasks through names -------------------------------------------
def named(kind: str, name: str, sha: str) -> dict[str, Any]:
    return {"sha256": sha, "kind": kind, "name": name, "file": f"{name}.safetensors", "size": 9}


def test_catalog_names_cannot_be_captured_by_a_node_reporting_them(start: Start) -> None:
    """Before: a node reporting a file named ``chillout_mix`` (or ``sd15_canny``, ``R-ESRGAN
    4x+``) with its own hash made every task naming it need that file: only that node got the
    prompts and input images."""
    net = start()
    sly, donor, user = (
        net.key("sly", can_run_nodes=True),
        net.key("donor", can_run_nodes=True),
        net.key("user"),
    )
    catalog = net.services.registry.catalog
    thief = net.node(
        sly,
        "thief",
        [
            named("checkpoint", "chillout_mix", fake_sha("a")),
            named("controlnet", "sd15_canny", fake_sha("b")),
            named("upscaler", "R-ESRGAN 4x+", fake_sha("c")),
            net.checkpoint,
        ],
        slots=8,
    )
    refused = net.call(
        "POST", "/api/sd/txt2img/async", user, json={**SMALL, "model": "chillout_mix"}
    )
    assert refused["_http"] == 400 and "in the catalog but neither installed" in refused["message"]
    control = {
        "image": base64.b64encode(png()).decode(),
        "preprocess": "canny",
        "model": "sd15_canny",
    }
    canny = net.call(
        "POST", "/api/sd/txt2img/async", user, json={**SMALL, "control_net": [control]}
    )
    assert canny["_http"] == 400 and "control_net.0.model" in canny["message"]
    image = base64.b64encode(png()).decode()
    body = {"image": image, "upscalingRate": 2, "upscaler": "R-ESRGAN 4x+"}
    upscale = net.call("POST", "/api/sd/upscale/async", user, json=body)
    assert upscale["_http"] == 400 and "upscaler" in upscale["message"]
    real = catalog.find("chillout_mix").sha256
    honest = net.node(donor, "honest", [named("checkpoint", "chillout_mix", real)])
    task_id = net.submit(user, model="chillout_mix")
    assert net.record(task_id).params["model"]["sha256"] == real
    assert thief.take() is None  # the catalog's file is what the task needs
    assert honest.take()["id"] == task_id  # type: ignore[index]


def test_a_name_only_nodes_report_resolves_only_while_they_agree(start: Start) -> None:
    net = start()
    user = net.key("user")
    net.node(net.key("a", can_run_nodes=True), "a", [named("lora", "style", fake_sha("1"))])
    net.node(net.key("b", can_run_nodes=True), "b", [named("lora", "style", fake_sha("2"))])
    reply = net.call("POST", "/api/sd/txt2img/async", user, json={**SMALL, "loras": [["style", 1]]})
    assert reply["_http"] == 400 and "name the one you want by its sha256" in reply["message"]


# -- 3. garbage results --------------------------------------------------------------------------
GARBAGE: dict[str, Callable[[ScriptedNode, str], Any]] = {
    "no images": lambda node, task: node.complete(task, []),
    "bytes after a PNG signature": lambda node, task: node.upload(
        task, node.key_of(task), b"\x89PNG\r\n\x1a\n" + b"junk" * 100
    ),
    "a decompression bomb": lambda node, task: node.upload(task, node.key_of(task), bomb_png()),
    "another size": lambda node, task: node.upload(task, node.key_of(task), png((128, 128))),
    "more bytes than the cap": lambda node, task: node.upload(
        task, node.key_of(task), png_with_text((64, 64), 2 * 1024 * 1024)
    ),
    "a caption instead of the image": lambda node, task: node.complete(task, [], caption="a fox"),
    "two images for one": lambda node, task: (
        node.upload(task, node.key_of(task, 1), png()),
        node.complete(task, [node.key_of(task, 0), node.key_of(task, 1)]),
    )[0],
}


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_results_are_refused_requeued_and_unpaid(start: Start, garbage: str) -> None:
    """Before: ``complete`` with no images, or any bytes after a PNG signature, succeeded and
    paid honor."""
    net = start(max_attempts=2)
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    node = net.node(donor, "gpu")
    task_id = net.submit(user)
    for attempt in (1, 2):
        assert node.take()["attempt"] == attempt  # type: ignore[index]
        reply = GARBAGE[garbage](node, task_id)
        assert (reply.status, reply.reason) == (400, "result_refused"), reply
    record = net.record(task_id)
    assert record.status == TaskStatus.FAILURE and "was refused" in record.error
    assert net.honor_rows("donor") == (0, 0)


def test_a_real_result_is_accepted_and_held_for_a_new_nodes_honor(start: Start) -> None:
    net = start()
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    node = net.node(donor, "gpu")
    task_id = net.submit(user)
    node.take()
    assert node.deliver(task_id).status == 200
    assert net.record(task_id).status == TaskStatus.SUCCESS
    assert net.honor_rows("donor") == (0, 1)  # in escrow until the node has a record


def test_a_batch_is_delivered_whole_or_refused(start: Start) -> None:
    """A task of batch_size x n_iter images expects every one: a node returning an image too
    many, or fewer (the cheap first image only), is refused; all of them, each with its seed,
    succeed."""
    net = start(max_attempts=3)
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    node = net.node(donor, "gpu")
    task_id = net.submit(user, seed=10, batch_size=3)
    assert node.take()["attempt"] == 1  # type: ignore[index]
    extra = node.upload(task_id, node.key_of(task_id, 3), png())
    assert (extra.status, extra.reason) == (400, "result_refused")
    assert node.take()["attempt"] == 2  # type: ignore[index]
    assert node.upload(task_id, node.key_of(task_id, 0), png()).status == 200
    short = node.complete(task_id, [node.key_of(task_id, 0)], seeds=[10])
    assert (short.status, short.reason) == (400, "result_refused")
    assert node.take()["attempt"] == 3  # type: ignore[index]
    keys = [node.key_of(task_id, i) for i in range(3)]
    for i, key in enumerate(keys):
        assert node.upload(task_id, key, png(colour=(i, i, i))).status == 200
    assert node.complete(task_id, keys, seeds=[10, 11, 12]).status == 200
    record = net.record(task_id)
    assert record.status == TaskStatus.SUCCESS and record.result.seeds == (10, 11, 12)
    assert len(record.result.image_keys) == 3


# -- 4. farming honor ----------------------------------------------------------------------------
def test_no_honor_for_ones_own_tasks(start: Start) -> None:
    """Before: a node completing its own account's tiny tasks in a loop was paid for each."""
    net = start(probation_checks=0)
    donor = net.key("donor", can_run_nodes=True)
    node = net.node(donor, "gpu", slots=4)
    for _ in range(3):
        task_id = net.submit(donor)
        node.take()
        assert node.deliver(task_id).status == 200
    assert net.honor_rows("donor") == (0, 0)
    other = net.submit(net.key("user"))
    node.take()
    node.deliver(other)
    assert net.honor_rows("donor") == (1, 0)


def test_idle_node_names_earn_no_online_honor_and_are_bounded(start: Start) -> None:
    """Before: 1,000 registered names that never worked collected online honor each."""
    net = start(max_nodes_per_account=5, online_interval_s=0.2, probation_checks=0)
    farmer = net.key("farmer", can_run_nodes=True)
    names = [net.node(farmer, f"idle-{i}") for i in range(5)]
    extra = ScriptedNode(net.api.client, farmer, "idle-5").register([])  # type: ignore[arg-type]
    assert (extra.status, extra.reason) == (429, "too_many")
    honor = net.services.accounts.find(nickname="farmer").honor
    for _ in range(5):
        time.sleep(0.25)
        for node in names:
            assert node.claim().status == 200  # each claim records the node as online
    assert net.services.accounts.find(nickname="farmer").honor == honor


# -- 5. holding tasks and ignoring cancels -------------------------------------------------------
def test_a_node_holds_at_most_the_tasks_it_declared(start: Start) -> None:
    """Before: a node could claim until the queue was empty and heartbeat forever."""
    net = start()
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    tasks = [net.submit(user) for _ in range(4)]
    one = net.node(donor, "one")
    two = net.node(donor, "two", slots=2)
    assert one.take() is not None and one.take() is None
    assert two.take() is not None and two.take() is not None and two.take() is None
    assert net.record(tasks[3]).status == TaskStatus.PENDING


def test_a_run_past_its_time_limit_goes_to_another_node(start: Start) -> None:
    net = start(runtime_base_s=0.5, runtime_per_cost_s=0.0)
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    holder, other = net.node(donor, "holder"), net.node(donor, "other")
    task_id = net.submit(user)
    holder.take()
    time.sleep(0.7)
    assert holder.heartbeat(task_id).data["held"]  # heartbeats do not extend the limit
    net.services.tasks.sweep(time.time())
    assert holder.heartbeat(task_id).data == {"held": False, "cancelRequested": True}
    assert other.take()["attempt"] == 2  # type: ignore[index]


def test_a_cancel_ignored_for_a_lease_ends_the_task_and_refuses_its_result(start: Start) -> None:
    net = start(lease_s=0.6)
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    node = net.node(donor, "gpu")
    task_id = net.submit(user)
    node.take()
    net.call("POST", "/api/sd/task/cancel", user, json={"taskId": task_id})
    assert node.heartbeat(task_id).data == {"held": True, "cancelRequested": True}
    time.sleep(0.8)
    net.services.tasks.sweep(time.time())
    record = net.record(task_id)
    assert record.status == TaskStatus.CANCELLED and "cancel" in record.error
    assert node.upload(task_id, node.key_of(task_id), png()).status == 409
    assert node.complete(task_id, [node.key_of(task_id)]).reason == "task_not_held"


# -- 7. poison tasks ----------------------------------------------------------------------------
def test_a_task_whose_holders_keep_dying_fails_after_the_last_try(start: Start) -> None:
    """Before: a hand-back re-queued a task without counting it, so a task that kills its
    worker looped forever, starving everything behind it."""
    net = start(max_attempts=3)
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    task_id = net.submit(user)
    for attempt in (1, 2, 3):
        node = net.node(donor, "crashy")
        assert node.take()["attempt"] == attempt  # type: ignore[index]
        assert node.offline().data == {"released": 1}  # its process died with the task
    record = net.record(task_id)
    assert (
        record.status == TaskStatus.FAILURE and "stopped while running it 3 times" in record.error
    )


# -- 8. a blocked queue ---------------------------------------------------------------------------
def test_tasks_no_single_node_can_run_never_block_the_head(start: Start) -> None:
    """Before: tasks needing files spread over two nodes were accepted, and 64 of them at the
    head of the queue hid every task behind them from every node. Now they are refused at
    submit (tests/api/test_served_models_contract.py), or, where the operator accepts them,
    claims look past them."""
    net = start(unserved_models="accept", max_pending_per_account=200)
    user, donor = net.key("user"), net.key("donor", can_run_nodes=True)
    lora = net.services.registry.models_dir / "loras" / "style.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    lora.write_bytes(b"a lora")
    net.services.registry.scan()
    lora_sha = net.services.registry.resolve(ModelKind.LORA, "style").sha256
    net.node(donor, "has-the-lora", [lora_sha])
    base_only = net.node(donor, "has-the-checkpoint", [net.checkpoint])
    body = {**SMALL, "loras": [["style", 1]]}
    accepted = net.call("POST", "/api/sd/txt2img/async", user, json=body)
    assert accepted["_http"] == 200 and "has them all" in accepted["message"]
    for _ in range(80):
        net.submit(user, loras=[["style", 1]])
    runnable = net.submit(user)
    assert base_only.take()["id"] == runnable  # type: ignore[index]


# -- also found ---------------------------------------------------------------------------------
def test_two_processes_of_one_node_never_hand_back_each_others_tasks(start: Start) -> None:
    net = start()
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    first, second = net.node(donor, "same-host"), net.node(donor, "same-host")
    assert first.node_id == second.node_id and first.session_id != second.session_id
    task_id = net.submit(user)
    first.take()
    assert second.offline().data == {"released": 0}
    assert net.record(task_id).status == TaskStatus.PROCESSING
    assert first.deliver(task_id).status == 200


def test_waiting_claims_are_bounded_per_process(start: Start) -> None:
    net = start()
    node = net.node(net.key("donor", can_run_nodes=True), "gpu")
    waiting = threading.Thread(target=node.claim, kwargs={"wait_s": 1.5})
    waiting.start()
    time.sleep(0.3)
    second = node.claim(wait_s=0)
    waiting.join(5)
    assert (second.status, second.reason) == (429, "too_many")


ENDPOINTS: dict[str, Callable[[ScriptedNode, str], Any]] = {
    "claim": lambda node, task: node.claim(),
    "heartbeat": lambda node, task: node.heartbeat(task),
    "input": lambda node, task: node.input(task, f"{task}/init.png"),
    "result": lambda node, task: node.upload(task, f"{task}/a1-0.png", png()),
    "complete": lambda node, task: node.complete(task, [f"{task}/a1-0.png"]),
    "fail": lambda node, task: node.fail(task, "no"),
    "offline": lambda node, task: node.offline(),
}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_node_endpoint_refuses_no_key_and_another_accounts_node(
    start: Start, endpoint: str
) -> None:
    net = start()
    owner, user = net.key("owner", can_run_nodes=True), net.key("user")
    node = net.node(owner, "gpu")
    task_id = net.submit(user)
    node.take()
    for key in ("", net.key("intruder", can_run_nodes=True)):
        intruder = ScriptedNode(net.api.client, key, "gpu", node.node_id, node.session_id)  # type: ignore[arg-type]
        reply = ENDPOINTS[endpoint](intruder, task_id)
        assert (reply.status, reply.reason) == (403, "forbidden"), (key, reply)
    assert net.record(task_id).status == TaskStatus.PROCESSING  # nothing changed


# -- model families ------------------------------------------------------------------------------
def xl(sha: str) -> dict[str, Any]:
    return {**named("checkpoint", "xl_mix", sha), "family": "sdxl"}


def test_an_sdxl_task_goes_only_to_a_node_that_declared_sdxl(start: Start) -> None:
    """Before: every node was offered every task, so an SD 1.x-only card took SDXL work it
    could only fail; a node that declares no families (an old one) gets SD 1.x only."""
    net = start(unserved_models="accept")
    user = net.key("user")
    sha = fake_sha("xl")
    small = net.node(net.key("a", can_run_nodes=True), "small", [xl(sha)], families=["sd15"])
    old = net.node(net.key("b", can_run_nodes=True), "old", [xl(sha), net.checkpoint])
    listed = net.call("GET", "/api/sd/supportedModelInfo", user)["data"]["Models"]
    assert {"name": "xl_mix", "hash": sha, "family": "sdxl"} in listed  # as the nodes read it
    task_id = net.submit(user, model="xl_mix")
    record = net.record(task_id)
    assert record.params["model"]["sha256"] == sha
    plain = net.submit(user)
    assert small.take() is None  # it has the file, not the family
    assert old.take()["id"] == plain  # type: ignore[index]
    assert old.take() is None
    big = net.node(net.key("c", can_run_nodes=True), "big", [xl(sha)], families=["sdxl"])
    assert big.take()["id"] == task_id  # type: ignore[index]


def test_a_node_cannot_claim_a_family_by_naming_it_elsewhere(start: Start) -> None:
    """The server goes by what the node registered: capabilities or claim bodies that say
    "sdxl" change nothing, and an unknown family is refused naming the field."""
    net = start()
    donor, user = net.key("donor", can_run_nodes=True), net.key("user")
    sha = fake_sha("xl")
    net.node(net.key("big", can_run_nodes=True), "big", [xl(sha)], families=["sdxl"])
    sly = net.node(donor, "sly", [xl(sha)], capabilities={"families": ["sdxl"]})
    task_id = net.submit(user, model="xl_mix")
    assert sly.take(families=["sdxl"]) is None
    bogus = ScriptedNode(net.api.client, donor, "bogus").register([xl(sha)], families=["sd3"])
    assert (bogus.status, bogus.reason) == (400, "invalid") and "families" in bogus.message
    assert net.record(task_id).status == TaskStatus.PENDING


def test_an_sdxl_task_no_online_node_runs_is_refused_like_an_unserved_model(
    start: Start,
) -> None:
    net = start(unserved_models="reject")
    user = net.key("user")
    sha = fake_sha("xl")
    net.node(net.key("donor", can_run_nodes=True), "small", [xl(sha)], families=["sd15"])
    reply = net.call("POST", "/api/sd/txt2img/async", user, json={**SMALL, "model": "xl_mix"})
    assert reply["_http"] == 503 and "runs sdxl checkpoints" in reply["message"], reply
