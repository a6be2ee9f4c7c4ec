"""``dan serve`` and its worker child count into one folder, and /metrics adds them up.

prometheus_client picks its multiprocess mode at import, so this runs in a fresh interpreter:
a "server" process and a "worker" child each count a run; the server's exposition has both,
and the worker's memory gauge until the server forgets the exited child."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SERVER = textwrap.dedent(
    """
    import subprocess, sys
    from pathlib import Path
    from dan.metrics.processes import share_between_processes, forget_process
    if sys.argv[2] == "server":  # the worker inherits the folder, as dan serve's child does
        share_between_processes(Path(sys.argv[1]))
    from dan.domain import TaskKind, TaskStatus
    from dan.metrics.families import Metrics
    from dan.metrics.scrape import exposition
    from dan.tasks.base import RunEnded

    class Empty:  # the database's part is tested elsewhere
        def queue_depth(self): return {}
        def nodes_online(self): return 0

    def run(node):
        return RunEnded(TaskKind.TXT2IMG, TaskStatus.SUCCESS, node, 1.5, {"steps": 3})

    if sys.argv[2] == "worker":
        metrics = Metrics()
        metrics.ended(run("local"))
        metrics.set_device_memory("cpu", 100, 1000)
        sys.exit(0)
    metrics = Metrics()
    metrics.ended(run("remote"))
    child = subprocess.Popen([sys.executable, __file__, sys.argv[1], "worker"])
    assert child.wait() == 0
    print(exposition(metrics, Empty()).decode())
    print("--- forgotten")
    forget_process(child.pid)
    print(exposition(metrics, Empty()).decode())
    """
)


def test_the_server_and_its_worker_child_count_into_one_exposition(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "data"), "server"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    both, forgotten = out.split("--- forgotten")
    assert 'dan_task_run_seconds_count{kind="txt2img"} 2.0' in both
    assert 'dan_node_runs_total{node="local",outcome="completed"} 1.0' in both
    assert 'dan_node_runs_total{node="remote",outcome="completed"} 1.0' in both
    assert "dan_worker_device_memory_bytes{" in both
    # The exited child's counts stay the server's; its memory is no longer anyone's.
    assert 'dan_task_run_seconds_count{kind="txt2img"} 2.0' in forgotten
    assert "dan_worker_device_memory_bytes{" not in forgotten
