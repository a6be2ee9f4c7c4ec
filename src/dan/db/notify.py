"""Task notifications across processes: PostgreSQL LISTEN/NOTIFY.

When a task finishes, the store sends ``NOTIFY dan_task_finished, '<task id>'`` in the same
transaction (delivered at commit); when one is queued, ``dan_task_queued``. A
:class:`NotifyListener` in each API replica turns those into wake-ups of its TaskWatcher,
so a synchronous request served by one replica answers as soon as a node finishes the task
through another, and of the claims its nodes are waiting in, so they ask the database only
when there is something new. Polling stays as the fallback: a lost connection only adds latency.
Progress of running tasks travels on ``dan_task_progress`` (see dan.tasks.live), batched:
no row is written for it. SQLite (one process) needs none of this.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

FINISHED = "dan_task_finished"
QUEUED = "dan_task_queued"
PROGRESS = "dan_task_progress"
_RECONNECT_S = 2.0


def notify(conn: Connection, channel: str, payload: str = "") -> None:
    """Queue a notification on ``conn``'s transaction (PostgreSQL only)."""
    conn.execute(
        text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload}
    )


def publisher(engine: Engine, channel: str) -> Callable[[list[str]], None]:
    """A function that sends its payloads on ``channel``, all in one transaction (no row is
    written: a notification costs a commit, not a tuple)."""

    def publish(payloads: list[str]) -> None:
        with engine.begin() as conn:
            for payload in payloads:
                notify(conn, channel, payload)

    return publish


class NotifyListener:
    """A background thread LISTENing on ``channel``; calls ``on_notify(payload)`` for each
    notification (from that thread). Reconnects after errors until :meth:`stop`."""

    def __init__(
        self,
        database_url: str,
        on_notify: Callable[[str], None],
        channel: str = FINISHED,
        *,
        ready: threading.Event | None = None,
    ) -> None:
        # psycopg wants a libpq URL, without SQLAlchemy's "+psycopg" driver part.
        self._dsn = (
            make_url(database_url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False)
        )
        self._on_notify = on_notify
        self._channel = channel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"listen-{channel}", daemon=True)
        # Set while connected and listening (callers may pass their own to watch it).
        self.listening = ready if ready is not None else threading.Event()

    def start(self) -> NotifyListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    self.listening.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._on_notify(note.payload)
            except Exception:
                self.listening.clear()
                log.warning(
                    "LISTEN %s lost its connection; polling until it is back", self._channel
                )
                self._stop.wait(_RECONNECT_S)
        # Stopped: a caller's ``ready`` event must not say it is still listening.
        self.listening.clear()
