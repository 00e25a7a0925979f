"""The sd_notify client: datagrams read back from a test socket (path and abstract address),
the watchdog interval from the environment, and a manager that is not listening."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardpool.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound at a short path (unix paths are limited to ~108 bytes)."""
    path = tmp_path / "n.sock"
    if len(str(path)) > 100:
        pytest.skip(f"temporary path too long for a unix socket: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5.0)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def test_messages_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    try:
        assert n.enabled
        assert n.ready("running: 2 workers")
        assert sock.recv(4096) == b"READY=1\nSTATUS=running: 2 workers"
        assert n.status("draining")
        assert sock.recv(4096) == b"STATUS=draining"
        assert not n.status("draining")  # unchanged: not sent again
        assert n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert n.reloading()
        lines = sock.recv(4096).decode().split("\n")
        assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
        assert int(lines[1].partition("=")[2]) > 0
        assert n.stopping("stopping\nnow")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping now"
    finally:
        n.close()


def test_abstract_namespace_address() -> None:
    name = f"shardpool-unit-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        try:
            assert n.ready()
            assert sock.recv(4096) == b"READY=1"
        finally:
            n.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready("x") and not n.stopping() and not n.watchdog()
    assert n.watchdog_interval_s is None


def test_watchdog_interval_from_the_environment() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s == 15.0
    assert Notifier({"WATCHDOG_USEC": "nonsense"}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s is None
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval_s == 1.0
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(other).watchdog_interval_s is None


def test_a_manager_not_listening_is_logged_once_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, logger="shardpool.sdnotify"):
        assert not n.ready()
        assert not n.watchdog()
    n.close()
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1
