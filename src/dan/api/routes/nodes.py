"""``/api/node/...`` (what nodes call), ``/api/nodes`` (listings), ``/api/admin/nodes``.

Every ``/api/node/...`` request carries the key of an account allowed to run nodes, and names
a node of that account (see dan.nodes.service for the rules). Handlers are plain functions that
FastAPI runs in its thread pool, except the claim long-poll and the upload, which wait without
holding a thread.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dan.api.auth import caller, require_admin, require_node_runner
from dan.api.generation import context
from dan.api.routes.sd import ok
from dan.domain import Account, ClaimedTask, TaskResult
from dan.nodes import NodeRecord, NodeService, PublicNode
from dan.nodes.service import MAX_WAIT_S, NodeDescription

router = APIRouter(tags=["nodes"])

Caller = Annotated[Account, Depends(caller)]
NodeRunner = Annotated[Account, Depends(require_node_runner)]
Admin = Annotated[Account, Depends(require_admin)]
MAX_CAPABILITIES_BYTES = 1024 * 1024  # room for thousands of models (a LoRA collection)
MAX_HASHES = 100_000


class RegisterBody(BaseModel):
    """Body of ``POST /api/node/register``: what the node is and has."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64)
    capabilities: dict[str, Any] = Field(default_factory=dict)
    installed: list[str] = Field(default_factory=list, max_length=MAX_HASHES)
    loaded: list[str] = Field(default_factory=list, max_length=MAX_HASHES)

    @field_validator("capabilities")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value)) > MAX_CAPABILITIES_BYTES:
            raise ValueError(f"must be at most {MAX_CAPABILITIES_BYTES} bytes of JSON")
        return value


class NodeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    nodeId: str = Field(min_length=1, max_length=64)


class ClaimBody(NodeBody):
    loaded: list[str] | None = Field(None, max_length=MAX_HASHES)
    waitS: float = Field(MAX_WAIT_S, ge=0, le=MAX_WAIT_S)


class TaskBody(NodeBody):
    taskId: str = Field(min_length=1, max_length=64)


class HeartbeatBody(TaskBody):
    progress: float | None = Field(None, ge=0, le=1)


class ResultBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image_keys: list[str] = Field(default_factory=list, max_length=1000)
    seeds: list[int] = Field(default_factory=list, max_length=1000)
    caption: str | None = Field(None, max_length=100_000)


class CompleteBody(TaskBody):
    result: ResultBody


class FailBody(TaskBody):
    error: str = Field("", max_length=100_000)


class PullBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)


def nodes(request: Request) -> NodeService:
    return context(request).services.nodes


def task_data(task: ClaimedTask | None) -> dict[str, Any] | None:
    if task is None:
        return None
    return {"id": task.id, "kind": task.kind.value, "params": task.params, "attempt": task.attempt}


def public_data(node: PublicNode) -> dict[str, Any]:
    return {
        "id": node.id,
        "owner": node.owner,
        "name": node.name,
        "tasksDone": node.tasks_done,
        "status": "online" if node.online else "offline",
    }


def own_data(node: NodeRecord) -> dict[str, Any]:
    return {
        "id": node.id,
        "name": node.name,
        "status": "online" if node.online else "offline",
        "tasksDone": node.tasks_done,
        "registeredAt": node.registered_at,
        "lastSeenAt": node.last_seen_at,
        "capabilities": node.capabilities,
        "installed": sorted(node.installed),
        "loaded": sorted(node.loaded),
        "pull": list(node.pull),
    }


@router.post("/api/node/register", summary="Register a node (or refresh it); returns its id")
def register(body: RegisterBody, account: NodeRunner, request: Request) -> dict[str, Any]:
    description = NodeDescription(
        body.name, body.capabilities, frozenset(body.installed), frozenset(body.loaded)
    )
    node = nodes(request).register(account, description)
    lease_s = context(request).services.settings.lease_s
    return ok({"nodeId": node.id, "name": node.name, "leaseS": lease_s, "maxWaitS": MAX_WAIT_S})


@router.post("/api/node/claim", summary="Wait (long-poll) for the next task this node can run")
async def claim(body: ClaimBody, account: NodeRunner, request: Request) -> dict[str, Any]:
    loaded = None if body.loaded is None else frozenset(body.loaded)
    assignment = await nodes(request).claim(
        account, body.nodeId, loaded=loaded, wait_s=body.waitS, gone=request.is_disconnected
    )
    return ok({"task": task_data(assignment.task), "pull": list(assignment.pull)})


@router.post("/api/node/heartbeat", summary="Renew the lease of a running task, with progress")
def heartbeat(body: HeartbeatBody, account: NodeRunner, request: Request) -> dict[str, Any]:
    beat = nodes(request).heartbeat(account, body.nodeId, body.taskId, body.progress)
    return ok({"held": beat.held, "cancelRequested": beat.cancel_requested})


@router.get("/api/node/input", summary="An input image (PNG) of a task the node holds")
def read_input(
    account: NodeRunner,
    request: Request,
    nodeId: Annotated[str, Query(max_length=64)],
    taskId: Annotated[str, Query(max_length=64)],
    key: Annotated[str, Query(max_length=200)],
) -> Response:
    data = nodes(request).read_input(account, nodeId, taskId, key)
    return Response(content=data, media_type="image/png")


@router.put("/api/node/result", summary="Upload a result image (PNG) of a task the node holds")
async def store_result(
    account: NodeRunner,
    request: Request,
    nodeId: Annotated[str, Query(max_length=64)],
    taskId: Annotated[str, Query(max_length=64)],
    key: Annotated[str, Query(max_length=200)],
) -> dict[str, Any]:
    data = await request.body()
    await asyncio.to_thread(nodes(request).store_result, account, nodeId, taskId, key, data)
    return ok({"key": key})


@router.post("/api/node/complete", summary="Report a task's success (images uploaded first)")
def complete(body: CompleteBody, account: NodeRunner, request: Request) -> dict[str, Any]:
    result = TaskResult(
        image_keys=tuple(body.result.image_keys),
        seeds=tuple(body.result.seeds),
        caption=body.result.caption,
    )
    nodes(request).complete(account, body.nodeId, body.taskId, result)
    return ok({"taskId": body.taskId})


@router.post("/api/node/fail", summary="Report that a task failed on the node")
def fail(body: FailBody, account: NodeRunner, request: Request) -> dict[str, Any]:
    nodes(request).fail(account, body.nodeId, body.taskId, body.error)
    return ok({"taskId": body.taskId})


@router.post("/api/node/offline", summary="The node stops: its tasks go back to the queue")
def offline(body: NodeBody, account: NodeRunner, request: Request) -> dict[str, Any]:
    return ok({"released": nodes(request).offline(account, body.nodeId)})


@router.get("/api/nodes", summary="Every node: owner, name, tasks done, online or offline")
def list_nodes(request: Request) -> dict[str, Any]:
    return ok([public_data(node) for node in nodes(request).list_public()])


@router.get("/api/nodes/mine", summary="The caller's nodes, with what they have installed")
def my_nodes(account: Caller, request: Request) -> dict[str, Any]:
    return ok([own_data(node) for node in nodes(request).list_for(account)])


@router.post("/api/admin/nodes/{node_id}/pull", summary="Ask a node to download a catalog model")
def request_pull(node_id: str, body: PullBody, admin: Admin, request: Request) -> dict[str, Any]:
    pending = nodes(request).request_pull(node_id, body.model)
    return ok({"nodeId": node_id, "pull": list(pending)})
