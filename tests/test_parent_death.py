"""Workers never outlive their front: killed with SIGKILL while a worker is deep in a long,
CPU-bound synchronous handler call, the front's death still ends the worker within about a second
(Linux: PR_SET_PDEATHSIG; everywhere: a watchdog thread in the worker)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from backend_tools import backend_process
from service_handlers import backend_sections, subprocess_env

from shardpool.client import Client

pytestmark = pytest.mark.multiprocess

EXIT_WITHIN_S = 1.5  # "about a second", with room for a loaded 2-core machine


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _await_file(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The marker a handler writes once its long call has begun (the handshake)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the front process ended early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)  # sleep-ok - polling for a file another process writes, under a deadline
    return path.read_text()


def _kill_and_time(parent: subprocess.Popen[bytes], pids: list[int], limit: float = 10.0) -> float:
    """SIGKILL ``parent``; seconds until every one of ``pids`` is gone (inf past ``limit``)."""
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    t0 = time.monotonic()
    while not all(_gone(pid) for pid in pids):
        if time.monotonic() - t0 > limit:
            return float("inf")
        time.sleep(0.01)  # sleep-ok - polling other processes' exit, under a deadline
    return time.monotonic() - t0


@contextlib.contextmanager
def _reaped(*procs: subprocess.Popen[bytes]) -> Iterator[list[int]]:
    """Yields a list the test adds orphan pids to; kills whatever is left of both at the end."""
    orphans: list[int] = []
    try:
        yield orphans
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for pid in orphans:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


FRONT = """
import sys, threading
from shardpool import ShardPool
pool = ShardPool("handlers:hold", workers=1, runtime_dir=sys.argv[2])
pool.submit(b"long", {"marker": sys.argv[1]})
threading.Event().wait()
"""


def test_library_front_killed_mid_call_takes_its_worker_along(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    front = subprocess.Popen(
        [sys.executable, "-c", FRONT, str(marker), str(tmp_path)],
        env=subprocess_env(),
        cwd=tmp_path,
    )
    with _reaped(front) as orphans:
        worker = int(_await_file(marker, front, 60.0))
        orphans.append(worker)
        took = _kill_and_time(front, [worker])
        assert took <= EXIT_WITHIN_S, f"worker {worker} outlived its front by {took:.2f} s"
        print(f"worker gone {took * 1000:.0f} ms after its front was killed")


def test_shardpool_run_killed_mid_call_takes_its_workers_along(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    sections = backend_sections(tmp_path, pool={"workers": 2, "handler": "handlers:hold"})
    with backend_process(tmp_path, sections) as backend:
        with Client(sections["ingress"]["endpoint"], timeout=60.0) as client:
            client.send(b"long", {"marker": str(marker)})
            client.flush()
            worker = int(_await_file(marker, backend.proc, 60.0))
        workers = [p.pid for p in backend.workers]
        assert worker in workers
        took = _kill_and_time(backend.proc, workers)
        assert took <= EXIT_WITHIN_S, f"workers outlived shardpool run by {took:.2f} s"
        print(f"workers gone {took * 1000:.0f} ms after shardpool run was killed")


GUARDED = """
import os, sys, time
from shardpool.worker import guard_parent
guard_parent(os.getppid(), pdeathsig=False)
open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
end = time.monotonic() + 60
while time.monotonic() < end:
    pass
"""

PARENT = """
import subprocess, sys, threading
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
threading.Event().wait()
"""


def test_watchdog_thread_alone_ends_a_busy_orphan(tmp_path: Path) -> None:
    """Without the kernel's help (pdeathsig off, as on systems that lack it), the watchdog
    thread still ends a process whose main thread spins in Python when its parent dies."""
    marker = tmp_path / "marker"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, GUARDED, str(marker)], env=subprocess_env(), cwd=tmp_path
    )
    with _reaped(parent) as orphans:
        child = int(_await_file(marker, parent, 30.0))
        orphans.append(child)
        took = _kill_and_time(parent, [child])
        assert took <= EXIT_WITHIN_S, f"orphan {child} lived {took:.2f} s after its parent died"
        print(f"orphan gone {took * 1000:.0f} ms after its parent was killed (watchdog thread)")
