"""How workers are started (shardpool.launch): forked from a preloaded fork server, with the
front's environment, spawned where the fork server cannot be trusted; the fork server's death
takes its workers along and the pool replaces them (the fault itself is in test_faults)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import psutil
import pytest

from shardpool import ShardPool, launch

pytestmark = pytest.mark.multiprocess

CHANNEL = b"c" * 32


def _fork_server_of(pid: int) -> psutil.Process:
    return psutil.Process(pid).parent()


@pytest.fixture
def fresh_verdicts() -> Iterator[None]:
    launch.reset()
    yield
    launch.reset()


def test_workers_are_forked_from_the_fork_server_and_so_is_a_successor() -> None:
    with ShardPool("handlers:env_var", workers=2, restart_backoff_s=0.0) as pool:
        pids = pool.worker_pids()
        parents = {_fork_server_of(pid) for pid in pids if pid is not None}
        assert len(parents) == 1
        (server,) = parents
        assert "multiprocess.forkserver" in " ".join(server.cmdline())
        assert server.pid != os.getpid()
        owner = pool.worker_of(CHANNEL)
        dead = pids[owner]
        assert dead is not None
        os.kill(dead, signal.SIGKILL)
        value, parent = pool.request(CHANNEL, {"name": "HOME"}).result(timeout=60)
        assert pool.worker_pids()[owner] != dead
        assert parent == server.pid  # the successor came from the same fork server
        assert value == os.environ.get("HOME")


def test_a_worker_gets_the_environment_the_front_has_when_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with ShardPool("handlers:env_var", workers=1) as pool:  # the fork server is running now
        assert pool.request(CHANNEL, {"name": "LAUNCH_TEST_LATE"}).result(timeout=60)[0] is None
    monkeypatch.setenv("LAUNCH_TEST_LATE", "set after the fork server started")
    with ShardPool("handlers:env_var", workers=1) as pool:
        value, _ = pool.request(CHANNEL, {"name": "LAUNCH_TEST_LATE"}).result(timeout=60)
    assert value == "set after the fork server started"


@pytest.mark.usefixtures("fresh_verdicts")
def test_a_fork_server_with_other_code_preloaded_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launch, "_probe", lambda server: False)  # preloads another shardpool
    with ShardPool("handlers:env_var", workers=1) as pool:
        _, parent = pool.request(CHANNEL, {"name": "HOME"}).result(timeout=60)
    assert parent == os.getpid()  # spawned by this process


@pytest.mark.usefixtures("fresh_verdicts")
def test_the_probe_accepts_the_fork_server_of_this_checkout() -> None:
    launch.hold()  # as a pool does, so that release() ends the fork server again
    try:
        ctx, parent, forked = launch.context()
        assert forked and ctx.get_start_method() == "forkserver"
        assert "multiprocess.forkserver" in " ".join(psutil.Process(parent).cmdline())
    finally:
        launch.release()
    assert not psutil.pid_exists(parent)


def _fork_servers() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children():
        try:
            if "multiprocess.forkserver" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.Error:
            continue
    return out


def test_the_fork_server_ends_with_the_last_pool_and_comes_back_with_the_next() -> None:
    first = ShardPool("handlers:env_var", workers=1)
    try:
        second = ShardPool("handlers:env_var", workers=1)
        try:
            (server,) = _fork_servers()  # one for both pools
            assert server.pid == _fork_server_of(first.worker_pids()[0] or 0).pid
            assert server.pid == _fork_server_of(second.worker_pids()[0] or 0).pid
        finally:
            second.close(timeout=30)
        assert _fork_servers() == [server]  # the first pool still runs on it
        assert first.request(CHANNEL, {"name": "HOME"}).result(timeout=60)[1] == server.pid
    finally:
        first.close(timeout=30)
    assert _fork_servers() == []  # the last pool closed: nothing of shardpool's is left
    assert not psutil.pid_exists(server.pid)  # and it was reaped, not left a zombie
    with ShardPool("handlers:env_var", workers=1) as pool:
        (again,) = _fork_servers()
        assert pool.request(CHANNEL, {"name": "HOME"}).result(timeout=60)[1] == again.pid

