"""``/api/node/...`` (what nodes call), ``/api/nodes`` (listings), ``/api/admin/nodes``.

Every ``/api/node/...`` request carries the key of an account allowed to run nodes, and names
a node of that account and the session its process opened (see dan.nodes.service for the rules
and dan.nodes.protocol for the bodies and refusal reasons). Handlers are plain functions that
FastAPI runs in its thread pool, except the claim long-poll and the upload, which wait without
holding a thread.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from dan.api.auth import caller, require_admin, require_node_runner
from dan.api.generation import context
from dan.api.routes.sd import ok
from dan.domain import Account, ClaimedTask, ModelKind, TaskResult
from dan.errors import InvalidArgument
from dan.imaging import decode_base64
from dan.nodes import NodeRecord, NodeService, PublicNode
from dan.nodes.protocol import (
    MAX_WAIT_S,
    Assigned,
    Beat,
    ClaimBody,
    CompleteBody,
    FailBody,
    HeartbeatBody,
    RegisterBody,
    Registered,
    SessionBody,
    TaskWire,
)
from dan.nodes.sessions import NodeDescription
from dan.nodes.store import NodeFile

router = APIRouter(tags=["nodes"])

Caller = Annotated[Account, Depends(caller)]
NodeRunner = Annotated[Account, Depends(require_node_runner)]
Admin = Annotated[Account, Depends(require_admin)]
Id = Annotated[str, Query(min_length=1, max_length=64)]


class PullBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)


def nodes(request: Request) -> NodeService:
    return context(request).services.nodes


def task_data(task: ClaimedTask | None) -> TaskWire | None:
    if task is None:
        return None
    return TaskWire(id=task.id, kind=task.kind.value, params=task.params, attempt=task.attempt)


def public_data(node: PublicNode) -> dict[str, Any]:
    return {
        "id": node.id,
        "owner": node.owner,
        "name": node.name,
        "tasksDone": node.tasks_done,
        "status": "online" if node.online else "offline",
    }


def own_data(node: NodeRecord, installed: frozenset[str]) -> dict[str, Any]:
    return {
        "id": node.id,
        "name": node.name,
        "status": "online" if node.online else "offline",
        "tasksDone": node.tasks_done,
        "registeredAt": node.registered_at,
        "lastSeenAt": node.last_seen_at,
        "capabilities": node.capabilities,
        "installed": sorted(installed),
        "loaded": sorted(node.loaded),
        "pull": list(node.pull),
        "checksPassed": node.checks_passed,
        "checksFailed": node.checks_failed,
        "suspect": node.suspect_reason if node.suspect else None,
    }


def suspect_data(node: NodeRecord) -> dict[str, Any]:
    return {
        "id": node.id,
        "account": node.account,
        "name": node.name,
        "suspectSince": node.suspect_since,
        "reason": node.suspect_reason,
        "checksPassed": node.checks_passed,
        "checksFailed": node.checks_failed,
    }


def description(body: RegisterBody) -> NodeDescription:
    files = tuple(
        NodeFile(f.sha256, ModelKind(f.kind) if f.kind else None, f.name, f.file, f.size, f.family)
        for f in body.files
    )
    if any(f.kind is not None and f.name is None for f in files):
        raise InvalidArgument("Invalid files: a file with a kind needs a name")
    families = None if body.families is None else frozenset(body.families)
    return NodeDescription(
        body.name, body.capabilities, files, frozenset(body.loaded), body.slots, families
    )


@router.post("/api/node/register", summary="Register a node (or refresh it); opens a session")
def register(body: RegisterBody, account: NodeRunner, request: Request) -> dict[str, Any]:
    session = nodes(request).register(account, description(body))
    settings = context(request).services.settings
    answer = Registered(
        nodeId=session.node_id,
        sessionId=session.id,
        name=body.name,
        leaseS=settings.lease_s,
        maxWaitS=MAX_WAIT_S,
        slots=session.slots,
    )
    return ok(answer.model_dump())


@router.post("/api/node/claim", summary="Wait (long-poll) for the next task this node can run")
async def claim(body: ClaimBody, account: NodeRunner, request: Request) -> dict[str, Any]:
    loaded = None if body.loaded is None else frozenset(body.loaded)
    assignment = await nodes(request).claim(
        account,
        body.nodeId,
        body.sessionId,
        loaded=loaded,
        wait_s=body.waitS,
        gone=request.is_disconnected,
    )
    answer = Assigned(task=task_data(assignment.task), pull=list(assignment.pull))
    return ok(answer.model_dump())


@router.post("/api/node/heartbeat", summary="Renew the lease of a running task, with progress")
def heartbeat(body: HeartbeatBody, account: NodeRunner, request: Request) -> dict[str, Any]:
    preview = decode_base64(body.preview, "preview") if body.preview is not None else None
    beat = nodes(request).heartbeat(
        account, body.nodeId, body.sessionId, body.taskId, body.progress, preview
    )
    return ok(Beat(held=beat.held, cancelRequested=beat.cancel_requested).model_dump())


@router.get("/api/node/input", summary="An input image (PNG) of a task the node holds")
def read_input(
    account: NodeRunner,
    request: Request,
    nodeId: Id,
    sessionId: Id,
    taskId: Id,
    key: Annotated[str, Query(max_length=200)],
) -> Response:
    data = nodes(request).read_input(account, nodeId, sessionId, taskId, key)
    return Response(content=data, media_type="image/png")


@router.put("/api/node/result", summary="Upload a result image (PNG) of a task the node holds")
async def store_result(
    account: NodeRunner,
    request: Request,
    nodeId: Id,
    sessionId: Id,
    taskId: Id,
    key: Annotated[str, Query(max_length=200)],
) -> dict[str, Any]:
    data = await request.body()
    service = nodes(request)
    await asyncio.to_thread(service.store_result, account, nodeId, sessionId, taskId, key, data)
    return ok({"key": key})


@router.post("/api/node/complete", summary="Report a task's success (images uploaded first)")
def complete(body: CompleteBody, account: NodeRunner, request: Request) -> dict[str, Any]:
    result = TaskResult(
        image_keys=tuple(body.result.image_keys),
        seeds=tuple(body.result.seeds),
        caption=body.result.caption,
    )
    nodes(request).complete(account, body.nodeId, body.sessionId, body.taskId, result)
    return ok({"taskId": body.taskId})


@router.post("/api/node/fail", summary="Report that a task failed on the node")
def fail(body: FailBody, account: NodeRunner, request: Request) -> dict[str, Any]:
    nodes(request).fail(account, body.nodeId, body.sessionId, body.taskId, body.error)
    return ok({"taskId": body.taskId})


@router.post("/api/node/offline", summary="The node process stops: its tasks go back")
def offline(body: SessionBody, account: NodeRunner, request: Request) -> dict[str, Any]:
    return ok({"released": nodes(request).offline(account, body.nodeId, body.sessionId)})


@router.get("/api/nodes", summary="Every node: owner, name, tasks done, online or offline")
def list_nodes(request: Request) -> dict[str, Any]:
    return ok([public_data(node) for node in nodes(request).list_public()])


@router.get("/api/nodes/mine", summary="The caller's nodes, with what they have installed")
def my_nodes(account: Caller, request: Request) -> dict[str, Any]:
    service = nodes(request)
    return ok([own_data(node, service.files(node.id)) for node in service.list_for(account)])


@router.post("/api/admin/nodes/{node_id}/pull", summary="Ask a node to download a catalog model")
def request_pull(node_id: str, body: PullBody, admin: Admin, request: Request) -> dict[str, Any]:
    pending = nodes(request).request_pull(node_id, body.model)
    return ok({"nodeId": node_id, "pull": list(pending)})


@router.get("/api/admin/nodes/suspects", summary="Nodes whose results failed their checks")
def list_suspects(admin: Admin, request: Request) -> dict[str, Any]:
    return ok([suspect_data(node) for node in nodes(request).suspects()])


@router.post(
    "/api/admin/nodes/{node_id}/clear", summary="Clear a suspect node (it starts on probation)"
)
def clear_suspect(node_id: str, admin: Admin, request: Request) -> dict[str, Any]:
    return ok(suspect_data(nodes(request).clear_suspect(node_id)))
