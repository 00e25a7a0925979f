"""Producers and operator commands learn of a dead backend at once, not at their own timeout.

A real ``shardpool run`` is killed (SIGKILL: the process vanishes, its connections close) or
frozen (SIGSTOP on tcp: nothing closes, only ZeroMQ heartbeats go unanswered) while clients wait
with messages unanswered; every API must raise ``BackendLost`` naming the endpoint and the count
within ~2 s. Commands against a backend that is gone answer at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from backend_tools import Backend, backend_process
from service_handlers import backend_sections

from shardpool.cli import main
from shardpool.client import AsyncClient, Client
from shardpool.control import ControlClient, NotRunning
from shardpool.errors import BackendLost

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]

NOTICE_S = 3.0  # a loss must be raised this soon after the kill (the aim is ~2 s at most)
# The handler waits for this file, which never appears: nothing sent with it is answered.
STUCK = {"gate": "/nonexistent/shardpool-test-gate"}


def _sections(tmp_path: Path, **ingress: Any) -> dict[str, dict[str, Any]]:
    return backend_sections(
        tmp_path, pool={"workers": 2, "handler": "handlers:gated"}, ingress=ingress
    )


def _wait_accepted(control: str, n: int) -> None:
    """Handshake: the backend has accepted ``n`` messages (each status request waits)."""
    deadline = time.monotonic() + 30.0
    with ControlClient(control, timeout=10.0) as ctl:
        while ctl.request("status")["ingress"]["accepted"] < n:
            assert time.monotonic() < deadline, "messages never reached the backend"


class _Caller(threading.Thread):
    """Runs one blocking client call; records what it raised and when."""

    def __init__(self, name: str, call: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self.call = call
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.ended_at = 0.0

    def run(self) -> None:
        self.started.set()
        try:
            self.call()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc
        self.ended_at = time.monotonic()


def _check_lost(err: BaseException | None, endpoint: str, unanswered: int) -> None:
    assert isinstance(err, BackendLost), repr(err)
    assert err.endpoint == endpoint and err.unanswered == unanswered, (err, unanswered)
    assert endpoint in str(err) and f"{unanswered} messages unanswered" in str(err)
    assert "create a new one" in str(err)


def test_every_sync_api_raises_backend_lost_soon_after_the_backend_is_killed(
    tmp_path: Path,
) -> None:
    sections = _sections(tmp_path)
    ingress = sections["ingress"]["endpoint"]
    clients: list[Client] = []
    try:
        with backend_process(tmp_path, sections) as backend:

            def client(**kw: Any) -> Client:
                c = Client(ingress, timeout=30.0, **kw)
                clients.append(c)
                return c

            quiet = client()  # everything it sent is answered: a loss is no error for it
            assert quiet.call(b"q", {"i": 7}, timeout=30.0) == [0, 7]
            # Each client leaves a different number of messages unanswered.
            c_send = client(max_outstanding=3)
            for i in range(2):
                c_send.send(b"s", {**STUCK, "i": i})
            c_call = client()
            c_req = client()
            fut = c_req.request(b"r", STUCK)
            c_req.send(b"r", STUCK)
            c_results, c_wait, c_poll = client(), client(), client()
            for c, n in ((c_results, 4), (c_wait, 5), (c_poll, 6)):
                for i in range(n):
                    c.send(b"w%d" % n, {**STUCK, "i": i})
                c.flush()
            callers = {
                "send": (_Caller("send", lambda: c_send.send(b"s", STUCK)), 3),
                "call": (_Caller("call", lambda: c_call.call(b"c", STUCK, timeout=30.0)), 1),
                "request": (_Caller("request", lambda: fut.result(timeout=30.0)), 2),
                "results": (_Caller("results", lambda: list(c_results.results(30.0))), 4),
                "wait": (_Caller("wait", lambda: c_wait.wait(30.0)), 5),
                "poll": (_Caller("poll", lambda: c_poll.poll(30.0)), 6),
            }
            for caller, _n in callers.values():
                caller.start()
                assert caller.started.wait(10.0)
            _wait_accepted(sections["control"]["endpoint"], 1 + 3 + 1 + 2 + 4 + 5 + 6)
            killed = time.monotonic()
            backend.kill()
            for name, (caller, n) in callers.items():
                caller.join(NOTICE_S + 5.0)
                assert not caller.is_alive(), f"{name} still waiting after the kill"
                _check_lost(caller.error, ingress, n)
                noticed = caller.ended_at - killed
                print(f"{name}: BackendLost after {noticed * 1000:.0f} ms")
                assert noticed < NOTICE_S, (name, noticed)
            # Sticky: the client stays broken.
            with pytest.raises(BackendLost):
                c_call.send(b"c", STUCK)
            with pytest.raises(BackendLost):
                c_req.poll()
            # Nothing unanswered: no error, and nothing pending.
            assert quiet.poll(0.2) == [] and quiet.outstanding == 0
            quiet.wait(1.0)
    finally:
        for c in clients:
            c.close(0)


def test_every_async_api_raises_backend_lost_and_a_long_drain_notices_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sections = _sections(tmp_path)
    ingress = sections["ingress"]["endpoint"]
    control = sections["control"]["endpoint"]

    async def scenario(backend: Backend) -> dict[str, tuple[BaseException | None, float, int]]:
        clients = [await AsyncClient.connect(ingress, timeout=30.0) for _ in range(4)]
        c_send = await AsyncClient.connect(ingress, timeout=30.0, max_outstanding=3)
        clients.append(c_send)
        c_call, c_req, c_results, c_wait = clients[:4]
        try:
            fut = await c_req.request(b"r", STUCK)
            for c, n in ((c_results, 2), (c_wait, 3)):
                for i in range(n):
                    await c.send(b"a%d" % n, {**STUCK, "i": i})
                await c.flush()
            for i in range(2):
                await c_send.send(b"s", {**STUCK, "i": i})
            loop = asyncio.get_running_loop()
            ended: dict[str, tuple[BaseException | None, float, int]] = {}

            async def watch(name: str, n: int, coro: Any) -> None:
                try:
                    await coro
                    error: BaseException | None = None
                except BaseException as exc:  # noqa: BLE001 - inspected below
                    error = exc
                ended[name] = (error, loop.time(), n)

            tasks = [
                asyncio.ensure_future(watch("send", 3, c_send.send(b"s", STUCK))),
                asyncio.ensure_future(watch("call", 1, c_call.call(b"c", STUCK, timeout=30.0))),
                asyncio.ensure_future(watch("request", 1, fut)),
                asyncio.ensure_future(watch("results", 2, _drain(c_results))),
                asyncio.ensure_future(watch("wait", 3, c_wait.wait(30.0))),
            ]
            await loop.run_in_executor(None, _wait_accepted, control, 1 + 1 + 2 + 3 + 3)
            # A long drain (it cannot finish: the handlers sleep) is waiting when the backend dies.
            drain = _Caller(
                "drain", lambda: main(["drain", "--endpoint", control, "--timeout", "35"])
            )
            drain.start()
            await loop.run_in_executor(None, _wait_draining, control)
            killed = loop.time()
            killed_mono = time.monotonic()
            backend.kill()
            await asyncio.wait_for(asyncio.gather(*tasks), NOTICE_S + 5.0)
            drain.join(NOTICE_S + 5.0)
            assert not drain.is_alive()
            ended["drain"] = (drain.error, killed + (drain.ended_at - killed_mono), 0)
            with pytest.raises(BackendLost):
                await c_call.send(b"c", STUCK)  # sticky
            return {k: (e, t - killed, n) for k, (e, t, n) in ended.items()}
        finally:
            for c in clients:
                await c.aclose(0)

    with backend_process(tmp_path, sections) as backend:
        capsys.readouterr()
        outcome = asyncio.run(scenario(backend))
    for name, (error, noticed, n) in outcome.items():
        with capsys.disabled():
            print(f"async {name}: ended {noticed * 1000:.0f} ms after the kill")
        assert noticed < NOTICE_S, (name, noticed)
        if name != "drain":
            _check_lost(error, ingress, n)
    # `shardpool drain` answered (exit 1) naming the backend that went away.
    assert capsys.readouterr().err.count("went away while answering 'drain'") == 1


async def _drain(client: AsyncClient) -> None:
    async for _reply in client.results(timeout=30.0):
        pass


def _wait_draining(control: str) -> None:
    deadline = time.monotonic() + 30.0
    with ControlClient(control, timeout=10.0) as ctl:
        while ctl.request("status")["ingress"]["accepting"]:
            assert time.monotonic() < deadline, "the drain never started"


def test_a_frozen_tcp_backend_is_noticed_by_heartbeats(tmp_path: Path) -> None:
    port = _free_port()
    sections = _sections(tmp_path, endpoint=f"tcp://127.0.0.1:{port}")
    ingress = sections["ingress"]["endpoint"]
    with backend_process(tmp_path, sections) as backend, Client(ingress, timeout=30.0) as client:
        fut = client.request(b"f", STUCK)
        client.flush()
        # Stopped, its connections stay open: only the missing heartbeat answers tell.
        os.kill(backend.proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            with pytest.raises(BackendLost) as exc:
                fut.result(timeout=30.0)
            noticed = time.monotonic() - frozen
        finally:
            os.kill(backend.proc.pid, signal.SIGCONT)
        print(f"frozen tcp backend: BackendLost after {noticed * 1000:.0f} ms")
        assert noticed < NOTICE_S and exc.value.unanswered == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_commands_and_clients_answer_at_once_when_the_backend_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What a killed `shardpool run` leaves: its socket files, and lock files naming its pid,
    # held by nobody.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    endpoints = {}
    for name in ("in", "ctl"):
        path = tmp_path / name
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
        (tmp_path / f"{name}.lock").write_text(f"{dead.pid}\n")
        endpoints[name] = f"ipc://{path}"
    capsys.readouterr()
    for command in (["status", "--once"], ["drain", "--timeout", "35"], ["stop"]):
        t0 = time.monotonic()
        assert main([*command, "--endpoint", endpoints["ctl"]]) == 1
        assert time.monotonic() - t0 < 2.0, command
        err = capsys.readouterr().err
        assert f"pid {dead.pid}, which is gone" in err, (command, err)
    t0 = time.monotonic()
    with pytest.raises(NotRunning, match=f"pid {dead.pid}, which is gone"):
        Client(endpoints["in"], timeout=30.0)
    with pytest.raises(NotRunning, match=f"pid {dead.pid}, which is gone"):
        asyncio.run(AsyncClient.connect(endpoints["in"], timeout=30.0))
    assert time.monotonic() - t0 < 2.0
    # Without the socket file at all (a backend that stopped cleanly), commands answer at once too.
    (tmp_path / "ctl").unlink()
    assert main(["status", "--once", "--endpoint", endpoints["ctl"]]) == 1
    assert "is `shardpool run` running?" in capsys.readouterr().err
