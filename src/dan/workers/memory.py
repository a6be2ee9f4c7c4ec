"""How much memory the worker holds on its device, for dan_worker_device_memory_bytes.

On a CUDA device: what this process's allocator has reserved there, of the device's total
(torch is asked through dan.engine.loading.device, imported only then). Anywhere else (the
CPU, the fake engine of the tests): this process's resident memory, of the host's physical
memory.
"""

from __future__ import annotations

import os
import resource
import sys


def device_memory(device: str) -> tuple[int, int]:
    """(bytes used by this process, bytes in all) on ``device`` (``cuda:0``, ``cpu``, ...)."""
    if device.startswith("cuda"):
        from dan.engine.loading.device import cuda_memory

        return cuda_memory(device)
    return resident_bytes(), host_bytes()


def resident_bytes() -> int:
    """This process's resident set size (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, else KiB


def host_bytes() -> int:
    """The host's physical memory (0 if the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
