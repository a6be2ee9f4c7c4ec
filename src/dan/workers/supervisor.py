"""Runs the local worker as a child process and restarts it when it dies.

The worker is a separate process so that the API process never imports torch, and so that a
dead engine (a CUDA error, a crash in native code) costs one restart, not the server. The child
reads its stdin until EOF: when the server dies, even by ``kill -9``, the pipe closes and the
worker exits instead of running on as an orphan; each byte the server writes there
(:meth:`wake`, when it queues a task) wakes the idle worker at once. Each child works in a node
session the supervisor names; when it exits, ``on_exit(session)`` hands back what it held at
once, each task counting a try, so a task that kills its worker fails after its last try
instead of killing every restart, and ``on_exit_pid(pid)`` lets the metrics forget the dead
process's gauges (dan.metrics.processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

MIN_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0
HEALTHY_AFTER_S = 60.0


class WorkerSupervisor:
    def __init__(
        self,
        env: Mapping[str, str],
        argv: list[str] | None = None,
        *,
        on_exit: Callable[[str], object] = lambda session: None,
        new_session: Callable[[], str] = lambda: str(uuid.uuid4()),
        on_exit_pid: Callable[[int], object] = lambda pid: None,
    ) -> None:
        self._env = dict(env)
        self._argv = argv or [sys.executable, "-m", "dan", "worker", "--watch-stdin"]
        self._on_exit = on_exit
        self._on_exit_pid = on_exit_pid
        self._new_session = new_session
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._pipe_lock = threading.Lock()  # wake() writes from request threads
        self._thread = threading.Thread(
            target=self._supervise, name="worker-supervisor", daemon=True
        )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker (SIGTERM, then SIGKILL after ``timeout_s``) and stop restarting it."""
        self._stopping.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._thread.join(timeout_s)

    def wake(self) -> None:
        """Tell the worker a task may be waiting for it. Never blocks: a full pipe already
        holds a wake-up, and a worker that is gone or restarting looks at the queue anyway."""
        with self._pipe_lock:
            process = self._process
            if process is None or process.stdin is None or process.stdin.closed:
                return
            with contextlib.suppress(OSError):  # BlockingIOError, BrokenPipeError
                process.stdin.write(b"\n")

    def _supervise(self) -> None:
        backoff = MIN_BACKOFF_S
        while not self._stopping.is_set():
            started = time.monotonic()
            session = self._new_session()
            argv = [*self._argv, "--session-id", session]
            process = subprocess.Popen(argv, env=self._env, stdin=subprocess.PIPE, bufsize=0)
            if process.stdin is not None:
                os.set_blocking(process.stdin.fileno(), False)
            with self._pipe_lock:
                self._process = process
            code = process.wait()
            with self._pipe_lock:
                if process.stdin is not None:
                    process.stdin.close()
            self._hand_back(session, process.pid)
            if self._stopping.is_set():
                log.info("the local worker exited with code %s", code)
                return
            if time.monotonic() - started > HEALTHY_AFTER_S:
                backoff = MIN_BACKOFF_S
            log.error("the local worker exited with code %s; restarting in %.0f s", code, backoff)
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _hand_back(self, session: str, pid: int) -> None:
        try:
            self._on_exit(session)
        except Exception:
            log.exception("could not hand back the tasks of worker session %s", session)
        try:
            self._on_exit_pid(pid)
        except Exception:
            log.exception("could not forget the metrics of worker process %d", pid)
