"""Worker processes: spawn, exit codes, stop, and the crash-loop guard.

The supervisor knows processes, not messages: the front asks it to start an incarnation of worker
``i`` with epoch ``e``, watches the returned sentinel, and asks it whether a worker that died may be
restarted (and after how long). Signals are blocked in the thread that spawns, so a child never runs
Python-level signal handling before it has installed its own (it unblocks them itself).
"""

from __future__ import annotations

import collections
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import multiprocess

from .worker import EXIT_OK, EXIT_PARENT_GONE, EXIT_START_FAILED, WorkerSpec, worker_main

_EXIT_NAMES = {
    EXIT_OK: "exited cleanly",
    EXIT_START_FAILED: "failed to start its handler",
    EXIT_PARENT_GONE: "left because its front disappeared",
    1: "died of an unhandled exception",
}

_BLOCKED = {signal.SIGINT, signal.SIGTERM}


def describe_exit(code: int | None) -> str:
    """Human words for a worker exit code (negative: the signal that killed it)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return _EXIT_NAMES.get(code, f"exited with code {code}")


@dataclass
class RestartGuard:
    """Decides whether a dead worker is restarted, and after what backoff.

    At most ``max_restarts`` restarts within any ``window_s`` seconds; the backoff doubles from
    ``backoff_s`` up to ``backoff_max_s`` with each restart still inside the window.
    """

    max_restarts: int
    window_s: float
    backoff_s: float
    backoff_max_s: float
    _times: collections.deque[float] = field(default_factory=collections.deque)

    def next_delay(self, now: float | None = None) -> float | None:
        """Record a death; return the delay in seconds before restarting, or None: give up."""
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return None
        delay = min(self.backoff_max_s, self.backoff_s * (2 ** len(self._times)))
        self._times.append(now)
        return delay

    @property
    def restarts(self) -> int:
        """Restarts recorded within the current window."""
        return len(self._times)


class WorkerProcess:
    """One incarnation of one worker: a spawned process and its sentinel."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        ctx = multiprocess.get_context("spawn")
        self.process: Any = ctx.Process(
            target=worker_main,
            args=(spec,),
            name=f"shardpool-worker-{spec.index}",
            daemon=True,  # a safety net: the interpreter's exit reaps stragglers too
        )

    def start(self) -> None:
        """Spawn the process with SIGINT/SIGTERM blocked in the child until it is ready for them.

        Raises whatever :meth:`multiprocess.Process.start` raises (e.g. the handler object cannot
        be pickled).
        """
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    @property
    def pid(self) -> int | None:
        return self.process.pid  # type: ignore[no-any-return]

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the process ends."""
        return self.process.sentinel  # type: ignore[no-any-return]

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode  # type: ignore[no-any-return]

    def is_alive(self) -> bool:
        return bool(self.process.is_alive())

    def kill(self) -> None:
        """SIGKILL, for a worker that is hung or must go now."""
        if self.process.pid is not None and self.process.exitcode is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """SIGTERM: the worker dies at once (it keeps the default action)."""
        if self.process.pid is not None and self.process.exitcode is None:
            self.process.terminate()

    def join(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds; returns the exit code, or None if still running."""
        self.process.join(timeout)
        return self.exitcode

    def reap(self, timeout: float = 2.0) -> int | None:
        """Make sure the process is gone: wait, then SIGTERM, then SIGKILL. Returns the exit code."""
        if self.process.pid is None:
            return None
        if self.join(timeout) is None:
            self.terminate()
            if self.join(1.0) is None:
                self.kill()
                self.join(5.0)
        code = self.exitcode
        try:
            self.process.close()
        except ValueError:
            pass
        return code
