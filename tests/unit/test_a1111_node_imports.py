"""The a1111 node needs no torch: nothing on its path imports it (the end-to-end test of
tests/api/test_a1111_node_e2e.py runs the node process under a hook that kills it if anything
does, at run time too)."""

from __future__ import annotations

import os
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "open_clip", "spandrel")
PROBE = f"""
import sys
from dan.cli import build_parser
from dan.workers.a1111.node import run_a1111_node

build_parser().parse_args(["node", "--server", "http://x", "--backend", "a1111"])
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))
"""


def test_the_a1111_node_path_imports_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ},
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
