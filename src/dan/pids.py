"""Whether a process id names a process that is still there, for files and sessions named by
the process that made them (a worker's session, a compile's partial package)."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
