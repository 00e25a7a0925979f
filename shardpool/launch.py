"""Starting worker processes: forked from a preloaded fork server where it can be, else spawned.

A spawned worker is a fresh interpreter that imports shardpool, pyzmq and cbor2 before it can say
READY: about 0.2 s on the 2-core development machine, which was nearly all of the time a SIGKILLed
worker's channels waited for its successor. A *fork server* (``multiprocess``'s ``forkserver``
start method) is one extra process, shared by the pools of a process, that imports those modules
(:data:`PRELOAD`) and forks every worker from that state: a successor is READY in about 15 ms.
Like spawn, and unlike fork, a worker inherits none of the front's threads, locks or sockets.

What a fork-server child gets from the front, and how:

* ``sys.path`` and the current directory: ``multiprocess`` applies the front's at every start, as
  for spawn (the handler is found where the front would find it);
* the environment: passed with every start (:func:`environment`) and applied by the worker before
  it loads its handler;
* its parent is the fork server, not the front's I/O thread: ``PR_SET_PDEATHSIG`` and the
  watchdog thread watch the fork server (:func:`context` says its pid), which exits the moment
  the front's process ends (it watches a pipe only the front holds), so a worker still leaves
  within about a second of the front's death;
* the handler's module is never preloaded: every worker imports it itself, so a rolling restart
  picks up new handler code (shardpool's own modules are those the fork server imported).

The fork server lives while a pool of the process runs (:func:`hold`, :func:`release`): once the
last one is closed, no process of shardpool's is left. It is used once a probe child, run through
it on stdlib code only, has confirmed that it preloaded the same shardpool as the front's (a fork
server started earlier by other code, or one that found another copy of shardpool on its path,
would run other code); otherwise, and where the method does not exist, workers are spawned. A
fork server that stops answering (stopped, hung) would hold the front's I/O thread in the start of
a worker: after :data:`START_TIMEOUT_S` it is killed (its workers go with it and are restarted
like any dead worker) and workers are spawned from then on; one that died is started again. The
caller blocks :data:`MASK` around :func:`context` and the start, so the fork server (and every
worker) starts with those signals blocked: a signal to the process group (Ctrl-C, a closed
terminal) must not take the fork server, and with it every worker, down; a worker unblocks what
it handles itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any

import multiprocess

log = logging.getLogger("shardpool.supervisor")

__all__ = [
    "MASK",
    "PRELOAD",
    "ForkServerError",
    "ForkServerGone",
    "ForkServerUnresponsive",
    "context",
    "environment",
    "forked_child",
    "hold",
    "release",
    "reset",
    "start",
]

PRELOAD = ["shardpool.worker.serve"]
"""Modules the fork server imports once for every worker (shardpool's worker side, pyzmq, cbor2,
asyncio)."""

MASK = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1}
"""Signals blocked while a worker (or the fork server) starts."""

START_TIMEOUT_S = 10.0
"""How long the fork server may take to start one worker (seconds) before it is given up."""

STOP_TIMEOUT_S = 5.0
"""How long the fork server gets to leave once the last pool closed (seconds; then SIGKILL)."""

PROBE_TIMEOUT_S = 30.0
"""How long the probe child may take (seconds) before the fork server is given up for spawn."""

_PROBE = (
    "import os, sys\n"
    "m = sys.modules.get('shardpool')\n"
    "f = getattr(m, '__file__', None)\n"
    "sys.exit(0 if f and os.path.realpath(f) == {want!r} else 3)\n"
)

_lock = threading.RLock()  # re-entered: the probe starts its child as start() does
_verified: int | None = None  # pid of the fork server the probe accepted
_refused = False  # the fork server cannot be used in this process: spawn
_users = 0  # fronts running in this process (the last one to close stops the fork server)


def context() -> tuple[Any, int, bool]:
    """The ``multiprocess`` context for the next worker, the pid its parent will have (what its
    parent guard watches) and whether it comes from the fork server (then pass
    :func:`environment` to it). Starts (and probes) the fork server on first use, and again if it
    died. Call it with :data:`MASK` blocked; never raises (falls back to spawn)."""
    global _refused
    with _lock:
        if not _refused and "forkserver" in multiprocess.get_all_start_methods():
            try:
                pid = _ensure_server()
            except Exception as exc:  # noqa: BLE001 - spawning still works
                log.warning("fork server unavailable, workers are spawned: %s: %s",
                            type(exc).__name__, exc)
                pid = None
            if pid is not None:
                return multiprocess.get_context("forkserver"), pid, True
            _refused = True
        return multiprocess.get_context("spawn"), os.getpid(), False


def start(process: Any, server: int) -> None:
    """Start ``process`` (of the fork-server context) through fork server ``server``, waiting at
    most :data:`START_TIMEOUT_S`. A fork server that does not answer in time (stopped, or hung)
    would hold the caller, the front's I/O thread, forever: it is killed (its workers go with it
    and are restarted as any dead worker is) and workers are spawned from then on.

    Raises:
        ForkServerUnresponsive: it did not answer (start the worker again: it is spawned).
        ForkServerGone: it died meanwhile (start the worker again: a new one is started).
        Whatever else :meth:`multiprocess.Process.start` raises.
    """
    failed: list[BaseException] = []

    def run() -> None:
        try:
            process.start()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            failed.append(exc)

    # The thread inherits the caller's blocked signals (and so does a fork server it starts).
    starter = threading.Thread(target=run, name="shardpool-start", daemon=True)
    starter.start()
    starter.join(START_TIMEOUT_S)
    if starter.is_alive():
        _give_up(server)
        starter.join(5.0)  # its read of the fork server's answer ends with the fork server
        raise ForkServerUnresponsive(
            f"the fork server (pid {server}) did not start a worker within {START_TIMEOUT_S:g} s"
        )
    if failed:
        if isinstance(failed[0], (OSError, EOFError)):
            # The fork server went away while it was asked (killed by someone): the next
            # context() starts a new one.
            raise ForkServerGone(f"the fork server (pid {server}) went away: {failed[0]}")
        raise failed[0]


class ForkServerError(RuntimeError):
    """Starting a worker through the fork server failed for the fork server's sake (start the
    worker again: the next :func:`context` starts a new fork server, or says to spawn)."""


class ForkServerUnresponsive(ForkServerError):
    """The fork server did not start a worker in time; it was killed, and workers are spawned."""


class ForkServerGone(ForkServerError):
    """The fork server died while it was starting a worker."""


def _give_up(server: int) -> None:
    """Kill an unresponsive fork server, reap it, forget it, and spawn from now on."""
    global _refused
    from multiprocess import forkserver

    log.error("the fork server (pid %d) did not start a worker within %g s: killed (its workers "
              "are restarted); workers are spawned from now on", server, START_TIMEOUT_S)
    with _lock:
        _refused = True
        with contextlib.suppress(OSError):
            os.kill(server, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.waitpid(server, 0)
        state: Any = getattr(forkserver, "_forkserver", None)
        if state is not None and getattr(state, "_forkserver_pid", None) == server:
            # As multiprocess itself forgets a fork server that died.
            with contextlib.suppress(OSError, TypeError):
                os.close(state._forkserver_alive_fd)
            state._forkserver_alive_fd = None
            state._forkserver_address = None
            state._forkserver_pid = None


def environment() -> dict[str, str]:
    """The front's environment now, for a fork-server child (a spawned one inherits it)."""
    return dict(os.environ)


def forked_child(environ: dict[str, str]) -> None:
    """In a worker forked from the fork server, first thing: take the front's ``environ``, and
    close the fork server's "alive" pipe that every fork-server child inherits (so that it can
    use the fork server itself). A worker that held it would keep the fork server, its parent,
    alive after the front's death, and so itself: the parent guard would never fire."""
    from multiprocess import forkserver

    server: Any = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None
    os.environ.clear()
    os.environ.update(environ)


def hold() -> None:
    """A front starts: the fork server, once started, stays until :func:`release`."""
    global _users
    with _lock:
        _users += 1


def release() -> None:
    """A front has reaped its workers. The last one stops the fork server: a process whose
    pools are all closed keeps no process of shardpool's (the next pool starts a new one)."""
    global _users
    with _lock:
        _users = max(0, _users - 1)
        if _users == 0:
            _stop_server()


def reset() -> None:
    """Forget the probe's verdicts (tests)."""
    global _verified, _refused
    with _lock:
        _verified, _refused = None, False


def _stop_server() -> None:
    """End the fork server if one runs: close our end of its "alive" pipe (it leaves on the end
    of file, as when the front's process ends), reap it, forget it (lock held)."""
    global _verified
    from multiprocess import forkserver

    state: Any = getattr(forkserver, "_forkserver", None)
    pid = getattr(state, "_forkserver_pid", None)
    if pid is None:
        return
    with contextlib.suppress(OSError, TypeError):
        os.close(state._forkserver_alive_fd)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            break  # not ours to wait for (or already reaped)
        if done:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            break
        time.sleep(0.005)  # sleep-ok - polling a child's exit, under a deadline
    state._forkserver_alive_fd = None
    state._forkserver_address = None
    state._forkserver_pid = None
    _verified = None


def _ensure_server() -> int | None:
    """The running fork server's pid once the probe accepted it (None: it preloads other code).

    Raises whatever starting the fork server raises.
    """
    global _verified
    from multiprocess import forkserver

    server: Any = getattr(forkserver, "_forkserver", None)
    if server is None or not hasattr(server, "_forkserver_pid"):
        return None  # not the implementation this relies on
    if server._forkserver_pid is None:
        forkserver.set_forkserver_preload(PRELOAD)
    server.ensure_running()
    pid: int | None = server._forkserver_pid
    if pid is not None and pid != _verified:
        if not _probe(pid):
            log.warning("the fork server preloads another copy of shardpool: workers are spawned")
            return None
        _verified = pid
    return pid


def _probe(server: int) -> bool:
    """Fork one child that checks which shardpool fork server ``server`` preloaded.

    Raises:
        ForkServerError: as :func:`start`.
    """
    import shardpool

    want = os.path.realpath(shardpool.__file__)
    ctx = multiprocess.get_context("forkserver")
    child = ctx.Process(target=exec, args=(_PROBE.format(want=want),),
                        name="shardpool-forkserver-probe", daemon=True)
    start(child, server)
    child.join(PROBE_TIMEOUT_S)
    if child.exitcode is None:
        child.kill()
        child.join(5.0)
        return False
    return bool(child.exitcode == 0)
