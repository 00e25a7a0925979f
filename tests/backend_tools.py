"""Test tools around a backend: a ``shardpool run`` subprocess (for tests that measure or kill the
backend process itself) and a raw producer socket (to send anything at all)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import zmq
from service_handlers import subprocess_env, toml_config

from shardpool.control import ControlClient


class Backend:
    """A started backend: ``proc``, ``info`` (its answer to the readiness ping) and ``workers``
    (the processes it had started when ready; psutil handles, so a reused pid is never hit)."""

    def __init__(self, proc: subprocess.Popen[bytes], info: dict[str, Any]) -> None:
        self.proc = proc
        self.info = info
        self.workers = psutil.Process(proc.pid).children(recursive=True)

    def kill(self) -> None:
        """SIGKILL the backend process alone (its workers are left to notice), reaped."""
        self.proc.kill()
        self.proc.wait(10)


def wait_for(
    ctl: ControlClient, op: str, cond: Callable[[Any], bool], timeout: float = 60.0
) -> Any:
    """Ask the control op ``op`` until ``cond(answer)`` holds, ``timeout`` seconds at most (one
    ping round trip between asks, no sleeps); the answer that satisfied it."""
    deadline = time.monotonic() + timeout
    while True:
        answer = ctl.request(op)
        if cond(answer):
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{op} never satisfied the condition; last: {answer}")
        ctl.request("ping", timeout=1.0)


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``python -m shardpool ARGS`` in a subprocess (deadline ``timeout`` s), output as text."""
    return subprocess.run(
        [sys.executable, "-m", "shardpool", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
    )


def popen_cli(*args: str) -> subprocess.Popen[str]:
    """``python -m shardpool ARGS`` started in the background (output piped, as text); the
    caller waits for it (``communicate(timeout=...)``) and kills it if it outlives the test."""
    return subprocess.Popen(
        [sys.executable, "-m", "shardpool", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )


@contextlib.contextmanager
def backend_process(
    tmp_path: Path,
    sections: dict[str, dict[str, Any]],
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Iterator[Backend]:
    """Start ``shardpool run -c <config> [args]`` (``env``: variables added to its
    environment), wait for the control socket's answer (the readiness handshake, 60 s at most),
    and on exit make sure the backend and every worker it ever had are gone, whatever happened
    (printing the end of its log)."""
    cfg = tmp_path / "backend.toml"
    cfg.write_text(toml_config(sections))
    argv = [sys.executable, "-m", "shardpool", "run", "-c", str(cfg), *args]
    with running(argv, sections["control"]["endpoint"], tmp_path,
                 {**subprocess_env(), **(env or {})}) as backend:
        yield backend


@contextlib.contextmanager
def running(
    argv: list[str], control: str, cwd: Path, env: dict[str, str]
) -> Iterator[Backend]:
    """Start the backend command line ``argv`` in ``cwd`` (output in ``cwd/backend.log``), wait
    for ``control`` to answer (60 s at most), and on exit make sure it and every worker it ever
    had are gone, whatever happened (printing the end of its log)."""
    log_path = cwd / "backend.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    kids: list[psutil.Process] = []
    try:
        with ControlClient(control) as ctl:
            info = ctl.wait_ready(60.0, alive=lambda: proc.poll() is None)
        backend = Backend(proc, info)
        kids = backend.workers
        yield backend
    finally:
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                kids += psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
        proc.wait(10)
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                kid.kill()
        _wait_gone(kids, 10.0)
        print(log_path.read_text(errors="replace")[-4000:])


def _wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until each process has exited. An orphan that exited counts as gone while it is a
    zombie: a container's pid 1 may never reap it (psutil.wait_procs would wait it out)."""
    deadline = time.monotonic() + timeout
    for p in procs:
        while True:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    break
                p.wait(max(0.0, min(0.05, deadline - time.monotonic())))
                break
            except psutil.NoSuchProcess:
                break
            except psutil.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise AssertionError(f"process {p.pid} still running") from None


def raw_producer(endpoint: str) -> tuple[zmq.Context[Any], zmq.Socket[bytes]]:
    """A DEALER connected to an ingress (linger 0): whatever bytes a test likes can be sent.
    The caller closes the socket (linger 0) and terminates the context."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    return ctx, sock
