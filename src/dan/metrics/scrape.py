"""What GET /metrics answers: this server's counts and the database's gauges, as text."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from dan.domain import TaskKind, TaskStatus
from dan.metrics.families import Metrics
from dan.metrics.processes import shared_dir
from dan.tasks.base import TaskStore

log = logging.getLogger(__name__)
# The classic text format: every Prometheus version and prometheus_client's parser read it.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
STATES = {TaskStatus.PENDING: "pending", TaskStatus.PROCESSING: "running"}


class DatabaseCollector:
    """The queue and the network as the database has them now, read at each scrape: two
    cheap queries (see TaskStore.queue_depth and nodes_online)."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        try:
            depth, online = self._store.queue_depth(), self._store.nodes_online()
        except SQLAlchemyError as exc:
            log.warning("metrics: the database is unreachable: %s", exc)
            yield GaugeMetricFamily("dan_database_up", "Whether the database answered", value=0)
            return
        yield GaugeMetricFamily("dan_database_up", "Whether the database answered", value=1)
        tasks = GaugeMetricFamily(
            "dan_queue_tasks", "Tasks pending and running, by kind", labels=["state", "kind"]
        )
        for status, state in STATES.items():
            for kind in TaskKind:
                tasks.add_metric([state, kind.value], depth.get((status, kind), 0))
        yield tasks
        yield GaugeMetricFamily("dan_nodes_online", "Nodes heard from recently", value=online)


class _Scrape:
    """The collectors of one scrape, in order."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


def exposition(metrics: Metrics, store: TaskStore) -> bytes:
    """The Prometheus text of this server: the counts of every process sharing its folder
    (dan.metrics.processes), or this process's own, then the database's gauges."""
    folder = shared_dir()
    counted: Collector = metrics.registry
    if folder is not None:
        # Unannotated in prometheus_client; None: a collector of its own, in no registry.
        counted = MultiProcessCollector(None, str(folder))  # type: ignore[no-untyped-call]
    return generate_latest(_Scrape([counted, DatabaseCollector(store)]))
