"""Shared fixtures: every test that starts processes must leave none behind."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import psutil
import pytest

# The spawned workers import test handlers by module name (``handlers``).
sys.path.insert(0, os.path.dirname(__file__))


def _children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        # multiprocess starts one long-lived resource tracker per test process; it is not ours.
        # (The fork server workers come from is: it ends with the last pool.)
        if "resource_tracker" in cmd:
            continue
        out.append(p)
    return out


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves a child process running (and kill it, so the next test is clean)."""
    yield
    left = _children()
    if not left:
        return
    gone, alive = psutil.wait_procs(left, timeout=3)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=3)
    if alive:
        pytest.fail(f"test left child processes running: {[p.pid for p in alive]}")
