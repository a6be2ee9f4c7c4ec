"""The fast path's compiling child (dan.engine.generation.export_unet) and the package store
around it (dan.engine.generation.packages): a compile never outlives the worker that started
it, and what a killed compile left half-written is cleaned up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dan.engine.generation.packages import Packages, UNetSource, fingerprint

# A stand-in worker: starts the real compiling child, says its pid, and waits to be killed.
WORKER = """
import json, os, subprocess, sys, time
job = json.dumps({**json.loads(sys.argv[1]), "parent": os.getpid()})
child = subprocess.Popen([sys.executable, "-m", "dan.engine.generation.export_unet", job])
print(child.pid, flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def test_a_compile_exits_when_the_worker_that_started_it_is_killed(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    os.mkfifo(checkpoint)  # nobody writes: the child blocks loading it, mid-compile
    job = {
        "checkpoint": str(checkpoint),
        "dtype": "float32",
        "allow_ckpt": False,
        "cache_dir": str(tmp_path / "cache"),
        "inputs": str(tmp_path / "call.pt"),
        "out": str(tmp_path / "unet.pt2"),
    }
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(job)], stdout=subprocess.PIPE, text=True
    )
    assert worker.stdout is not None
    with worker.stdout:
        child = int(worker.stdout.readline())
    time.sleep(0.5)
    assert running(child)
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 30
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(child), "the compile kept running without its worker"


def test_partial_packages_of_gone_compiles_are_removed_at_load(tmp_path: Path) -> None:
    source = UNetSource(tmp_path / "m.safetensors", "c" * 64, torch.float32, False, tmp_path)
    folder = tmp_path / "fastpath" / source.sha256
    folder.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    abandoned = folder / f"abc.{gone.pid}.partial.pt2"
    being_written = folder / f"abc.{os.getpid()}.partial.pt2"
    for path in (abandoned, being_written):
        path.write_bytes(b"half a package")
    assert list(Packages(source, tmp_path / "fastpath").kept()) == []
    assert not abandoned.exists()
    assert being_written.exists()


def test_packages_kept_for_another_cpu_or_torch_are_not_loaded(tmp_path: Path) -> None:
    # A data dir moved to a CPU without the instruction set a package was compiled for (AMX
    # and AVX512 CPUs both report "AVX512" to get_cpu_capability) would die on it.
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    source = UNetSource(tmp_path / "m.safetensors", "d" * 64, torch.float32, False, tmp_path)
    folder = tmp_path / "fastpath" / source.sha256
    folder.mkdir(parents=True)
    here = fingerprint()
    assert str(pick_vec_isa()) in here
    for name, printed in (("here", here), ("elsewhere", here.replace("cpu ", "cpu other "))):
        (folder / f"{name}.pt2").write_bytes(b"a package")
        note = {"key": name, "fingerprint": printed}
        (folder / f"{name}.json").write_text(json.dumps(note))
    assert [key for key, _ in Packages(source, tmp_path / "fastpath").kept()] == ["here"]
