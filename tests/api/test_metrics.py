"""GET /metrics after real tasks: parsed as Prometheus parses it, counts matched to what ran."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dan.api.app import create_app
from dan.engine.fake import FakeEngine
from dan.services import build_services
from tests.api.conftest import Api, make_settings

TXT2IMG = "/api/sd/txt2img"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def small(**fields: object) -> dict[str, object]:
    return {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, **fields}


def scrape(api: Api) -> Samples:
    response = api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.mark.usefixtures("worker")
def test_metrics_count_the_tasks_that_ran(api: Api) -> None:
    assert api.post(TXT2IMG, small())["_http"] == 200
    assert api.post(TXT2IMG, small(n_iter=2))["_http"] == 200
    assert api.post(TXT2IMG, small(prompt=FakeEngine.FAIL_PROMPT))["_http"] == 500

    samples = scrape(api)

    # Two runs ended with a result: their run time, and per step (2 and 4 steps asked).
    assert value(samples, "dan_task_run_seconds_count", kind="txt2img") == 2
    assert value(samples, "dan_task_step_seconds_count", kind="txt2img") == 2
    assert value(samples, "dan_task_run_seconds_count", kind="img2img") == 0
    # All three waited in the queue and were claimed once.
    assert value(samples, "dan_task_wait_seconds_count", kind="txt2img") == 3
    assert value(samples, "dan_task_wait_seconds_sum", kind="txt2img") >= 0
    # The test's worker claims without a node (the local node's worker would name it).
    assert value(samples, "dan_node_runs_total", node="none", outcome="completed") == 2
    assert value(samples, "dan_node_runs_total", node="none", outcome="failed") == 1
    # Nothing is left in the queue; no node has registered.
    assert value(samples, "dan_queue_tasks", state="pending", kind="txt2img") == 0
    assert value(samples, "dan_queue_tasks", state="running", kind="txt2img") == 0
    assert value(samples, "dan_nodes_online") == 0
    assert value(samples, "dan_database_up") == 1
    # Requests by route template and status.
    submit = {"method": "POST", "route": TXT2IMG}
    assert value(samples, "dan_http_requests_total", **submit, status="200") == 2
    assert value(samples, "dan_http_requests_total", **submit, status="500") == 1
    assert value(samples, "dan_http_request_duration_seconds_count", **submit) == 3


def test_queue_depth_and_route_templates(api: Api) -> None:
    """No worker: what is submitted stays pending; a path with an id counts under its
    template."""
    for _ in range(2):
        assert api.post(f"{TXT2IMG}/async", small())["_http"] == 200
    api.client.delete("/api/user/keys/some-key-id")
    api.client.delete("/api/user/keys/another-key-id")
    api.client.get("/no/such/thing.png")
    for invented in ("ZZZ1", "ZZZ2"):  # any token parses as a method: one label for them all
        api.client.request(invented, "/no/such/thing.png")

    samples = scrape(api)

    assert value(samples, "dan_queue_tasks", state="pending", kind="txt2img") == 2
    assert value(samples, "dan_queue_tasks", state="running", kind="txt2img") == 0
    assert value(samples, "dan_task_wait_seconds_count", kind="txt2img") == 0
    keys = [
        labels
        for (name, labels), count in samples.items()
        if name == "dan_http_requests_total" and ("method", "DELETE") in labels
    ]
    assert [dict(labels)["route"] for labels in keys] == ["/api/user/keys/{key_id}"]
    assert value(samples, "dan_http_requests_total", **dict(keys[0])) == 2
    routes = {dict(labels)["route"] for name, labels in samples if name.startswith("dan_http")}
    assert not any("some-key-id" in route or "thing.png" in route for route in routes)
    methods = {dict(labels)["method"] for name, labels in samples if name.startswith("dan_http")}
    assert "other" in methods and not {"ZZZ1", "ZZZ2"} & methods


def test_metrics_token_and_off(tmp_path: Path) -> None:
    guarded = build_services(make_settings(tmp_path / "a", metrics_token="s3cret"))
    with TestClient(create_app(guarded)) as client:
        assert client.get("/metrics").status_code == 403
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        right = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200 and "dan_queue_tasks" in right.text
    guarded.close()
    off = build_services(make_settings(tmp_path / "b", metrics=False))
    with TestClient(create_app(off)) as client:
        assert client.get("/metrics").status_code == 404
    off.close()
