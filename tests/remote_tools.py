"""Helpers of the remote-worker tests: a front with remote workers, worker processes started the
way a host's service manager would, and the journal checks (order, duplicates, one host at a
time)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import handlers

from shardpool import ShardPool
from shardpool.config import Config, config_from_dict
from shardpool.security import generate_worker_keys

TESTS = Path(__file__).resolve().parent


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``pred`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # sleep-ok: polling a condition with a deadline


def make_keys(dir: Path, ids: list[str]) -> dict[str, Any]:
    """Front and worker keys for ``ids`` (``shardpool keys --worker``'s layout)."""
    for wid in ids:
        generate_worker_keys(dir, wid)
    return {
        "curve_public_key": str(dir / "front.key"),
        "curve_secret_key": str(dir / "front.key_secret"),
        "workers_dir": str(dir / "workers"),
    }


def front_config(
    bind: str,
    ids: list[str],
    journal_dir: Path,
    *,
    local: int = 1,
    keys: dict[str, Any] | None = None,
    lease_s: float = 3.0,
    margin_s: float = 1.0,
    pool: dict[str, Any] | None = None,
) -> Config:
    return config_from_dict({
        "pool": {
            "workers": local,
            "handler": "handlers:HostJournal",
            "handler_options": {"dir": str(journal_dir)},
            "max_concurrent_moves": 512,
            **(pool or {}),
        },
        "supervisor": {"heartbeat_interval_s": 0.2},
        "remote": {
            "bind": bind,
            "workers": dict.fromkeys(ids, 1.0),
            "lease_s": lease_s,
            "lease_margin_s": margin_s,
            **(keys or {}),
        },
    })


def worker_argv(endpoint: str, wid: str, keys_dir: Path | None) -> list[str]:
    argv = [sys.executable, "-m", "shardpool", "worker", "--connect", endpoint, "--id", wid,
            "--log-level", "WARNING"]
    if keys_dir is not None:
        argv += ["--front-key", str(keys_dir / "front.key"),
                 "--secret-key", str(keys_dir / f"{wid}.key_secret")]
    return argv


class HostService:
    """One worker process kept running as systemd's ``Restart=on-failure`` would: restarted
    (after ``delay`` seconds) whenever it exits with anything but 0 or 2, until :meth:`stop`.
    ``start`` makes the process (e.g. ``Hosts.popen`` in a namespace)."""

    def __init__(self, start: Callable[[], subprocess.Popen[bytes]], delay: float = 0.1) -> None:
        self._start = start
        self.delay = delay
        self.proc = start()
        self.exits: list[int] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            self.exits.append(code)
            if code in (0, 2):
                return
            if self._stopping.wait(self.delay):
                return
            self.proc = self._start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the current process (the service restarts it)."""
        os.kill(self.proc.pid, signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL if need be; no restart. Returns the exit code."""
        self._stopping.set()
        proc = self.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._thread.join(timeout)
        return proc.returncode


def joined(pool: ShardPool, n: int) -> bool:
    """``n`` remote workers are ready, own their share of the slots and no move is running."""
    f = pool._front  # the tests look inside: placement is the front's
    with f.lock:
        table = f.channels.router.table
        workers = len(f.links)
        if f.mover.moves:
            return False
        ready = [i for i in range(workers) if f.sup.workers[i].state.value == "ready"]
        if len(ready) != workers:
            return False
        remote = [i for i in ready if f.sup.workers[i].remote]
        return len(remote) == n and all(
            table.count(i) >= len(table) // workers - 1 for i in remote
        )


class Results:
    """Collects ``on_result`` per channel (the pool delivers one channel's results in order)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_channel: dict[bytes, list[Any]] = {}
        self.count = 0

    def __call__(self, channel_id: bytes, seq: int, value: Any) -> None:
        with self.lock:
            self.by_channel.setdefault(channel_id, []).append((seq, value))
            self.count += 1


def check_journal(dir: Path, sent: dict[bytes, int]) -> dict[str, int]:
    """Check every channel's calls in the journal: each message applied, in order; a message
    applied again only flagged redelivered; never two calls of one channel at once (on one
    host or two). ``sent``: messages sent per channel (indexes 0..n-1). Returns counts."""
    journal = handlers.read_host_journal(str(dir))
    stats = {"calls": 0, "redelivered_dups": 0, "channels": 0}
    for cid, n in sent.items():
        calls = journal.get(cid.hex(), [])
        assert calls, f"channel {cid!r}: never ran"
        stats["channels"] += 1
        last = -1
        prev_end = 0.0
        for seq, i, redelivered, pid, start, end in calls:
            stats["calls"] += 1
            assert start >= prev_end, (
                f"channel {cid!r}: seq {seq} started at {start:.6f} (pid {pid}) before the "
                f"previous call ended at {prev_end:.6f}: two calls at once"
            )
            prev_end = end
            assert seq == i, f"channel {cid!r}: seq {seq} carried index {i}"
            if seq <= last:
                assert redelivered, f"channel {cid!r}: seq {seq} applied again unflagged"
                stats["redelivered_dups"] += 1
                continue
            assert seq == last + 1, f"channel {cid!r}: seq {seq} after {last} (a gap)"
            last = seq
        assert last == n - 1, f"channel {cid!r}: last applied {last}, sent {n}"
    return stats


def check_results(results: Results, sent: dict[bytes, int]) -> None:
    """Every message's result arrived once, in per-channel order."""
    for cid, n in sent.items():
        got = [seq for seq, _ in results.by_channel.get(cid, [])]
        assert got == list(range(n)), f"channel {cid!r}: results {got[:10]}... of {n}"
