"""Prometheus metrics (GET /metrics), through prometheus_client.

Where each number comes from, and why there:

- **Read from the database at scrape time** (dan.metrics.scrape): the tasks pending and running
  by kind (one grouped count over the open states, on the status index) and the nodes online.
  Every API replica of one database reports the same values, as it should.
- **Counted where the store records them** (dan.metrics.families, a
  :class:`dan.tasks.base.RunObserver` the task store calls after each commit): how long a task
  waited (queued to first claim), ran (claim to the worker's report) and took per step, and the
  runs each node reported. The store is the one place every run passes through: the local
  worker calls it in its own process, and a remote node's claim and report are handled by the
  API process it talks to. No database write is added; the times come back from the same
  UPDATE (``RETURNING``).
- **Counted per request** by an ASGI middleware (dan.api.metrics), labelled by the route's
  template, never the raw path.
- **The worker's device memory** is set by the local worker (dan.workers.memory): the API
  process never imports torch.

``dan serve`` runs its worker as a child process, so the counts of two processes are one
server's: ``dan serve`` turns on prometheus_client's multiprocess mode
(dan.metrics.processes), each process writing its values to files in ``<data_dir>/metrics``,
which it empties at start and which /metrics reads back and adds up; a child that exits has its
memory gauge dropped. Without ``dan serve`` (the tests, a bare app) the metrics live in the
process's memory. Counters reset when the server restarts, as Prometheus expects.

This package's ``__init__`` imports nothing: prometheus_client decides at import time whether it
runs in multiprocess mode, so ``dan serve`` must set that up before anything imports it.
"""
