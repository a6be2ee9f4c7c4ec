"""The metrics a process counts itself: task times, node runs, requests, device memory.

One :class:`Metrics` per process (built by dan.services and by the local worker), passed where
it is used; nothing here is module-level state, so two apps in one process (the tests) count
apart. The store tells it of claims and ended runs (it is a RunObserver); the HTTP middleware
and the worker set the rest.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dan.domain import TaskKind, TaskStatus
from dan.tasks.base import RunEnded

WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
RUN_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0)
OUTCOMES = {
    TaskStatus.SUCCESS: "completed",
    TaskStatus.FAILURE: "failed",
    TaskStatus.CANCELLED: "cancelled",
}
NO_NODE, OTHER_NODES = "none", "other"


class Metrics:
    """This process's metrics, in its own registry (see dan.metrics.scrape for /metrics).

    Node ids label the runs each node reported, for the first ``max_nodes`` nodes this process
    sees; later ones count under ``node="other"``, so a network of thousands of nodes cannot
    make the scrape unbounded."""

    def __init__(self, *, max_nodes: int = 100) -> None:
        self.registry = CollectorRegistry()
        self._max_nodes = max_nodes
        self._nodes: set[str] = set()
        self._lock = threading.Lock()
        self.task_wait = self._histogram(
            "dan_task_wait_seconds", "Time from queued to first claimed", WAIT_BUCKETS
        )
        self.task_run = self._histogram(
            "dan_task_run_seconds", "Time from claim to the worker's result", RUN_BUCKETS
        )
        self.task_step = self._histogram(
            "dan_task_step_seconds", "Run time per denoising step requested", STEP_BUCKETS
        )
        self.node_runs = Counter(
            "dan_node_runs",
            "Runs a node reported the end of, by outcome",
            ["node", "outcome"],
            registry=self.registry,
        )
        self.requests = Counter(
            "dan_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_time = Histogram(
            "dan_http_request_duration_seconds",
            "Time to answer an HTTP request (a stream: until it ends)",
            ["method", "route"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.device_memory = Gauge(
            "dan_worker_device_memory_bytes",
            "The local worker's memory on its device: used by it, and the device's total",
            ["device", "kind"],
            registry=self.registry,
            multiprocess_mode="liveall",  # one series per live worker process
        )

    def _histogram(self, name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
        histogram = Histogram(name, text, ["kind"], buckets=buckets, registry=self.registry)
        for kind in TaskKind:  # every kind's series exists from the start, at zero
            histogram.labels(kind.value)
        return histogram

    # -- RunObserver -------------------------------------------------------------------------
    def claimed(self, kind: TaskKind, waited_s: float) -> None:
        self.task_wait.labels(kind.value).observe(waited_s)

    def ended(self, run: RunEnded) -> None:
        self.node_runs.labels(self._node_label(run.node_id), OUTCOMES[run.status]).inc()
        if run.status != TaskStatus.SUCCESS:
            return  # a failure's run time says nothing of how long tasks take
        self.task_run.labels(run.kind.value).observe(run.ran_s)
        steps = denoising_steps(run.kind, run.params)
        if steps > 0:
            self.task_step.labels(run.kind.value).observe(run.ran_s / steps)

    # -- the HTTP middleware and the worker --------------------------------------------------
    def request_answered(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_time.labels(method, route).observe(seconds)

    def set_device_memory(self, device: str, used: int, total: int) -> None:
        self.device_memory.labels(device, "used").set(used)
        self.device_memory.labels(device, "total").set(total)

    def _node_label(self, node_id: str | None) -> str:
        if node_id is None:
            return NO_NODE
        with self._lock:
            if node_id in self._nodes:
                return node_id
            if len(self._nodes) < self._max_nodes:
                self._nodes.add(node_id)
                return node_id
        return OTHER_NODES


def denoising_steps(kind: TaskKind, params: dict[str, Any]) -> int:
    """The denoising steps a task asked for: ``steps`` x ``n_iter`` of a txt2img or img2img
    (its hires pass and img2img's denoising strength not counted); 0 for other kinds."""
    if kind == TaskKind.TXT2IMG:
        generation = params
    elif kind == TaskKind.IMG2IMG:
        generation = params.get("generation") or {}
    else:
        return 0
    steps, batches = generation.get("steps"), generation.get("n_iter", 1)
    if not isinstance(steps, int) or not isinstance(batches, int):
        return 0
    return steps * max(batches, 1)
