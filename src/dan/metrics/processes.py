"""prometheus_client's multiprocess mode, for ``dan serve`` and its worker child.

prometheus_client reads ``PROMETHEUS_MULTIPROC_DIR`` once, when it is first imported, to
choose where values live (memory, or one file per process in that folder). ``dan serve`` calls
:func:`share_between_processes` before it imports anything that counts; the worker child
inherits the variable with the rest of its environment. This module imports prometheus_client
only inside functions, for that reason.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_between_processes(data_dir: Path) -> Path:
    """Make this process and the children it starts count into ``<data_dir>/metrics``, emptied
    first (the counts of an earlier run are not this one's). Raises RuntimeError if
    prometheus_client was imported already (it would keep counting in memory)."""
    if "prometheus_client" in sys.modules and shared_dir() is None:
        raise RuntimeError("prometheus_client was imported before its multiprocess folder was set")
    folder = (data_dir / "metrics").resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ[ENV] = str(folder)
    return folder


def shared_dir() -> Path | None:
    """The folder the processes of this server count into; None when this one counts alone."""
    folder = os.environ.get(ENV)
    return Path(folder) if folder else None


def forget_process(pid: int) -> None:
    """A process that counted into the shared folder exited: drop its live gauges (its counts
    stay, as the server's)."""
    folder = shared_dir()
    if folder is None:
        return
    from prometheus_client import multiprocess

    # prometheus_client leaves its multiprocess helpers unannotated.
    multiprocess.mark_process_dead(pid, str(folder))  # type: ignore[no-untyped-call]
