"""Tests of the network-namespace helper (tests/netns.py) itself."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from netns import Hosts, require_netns

# Connect to ADDR:PORT and send LINE; one attempt with a timeout, or retry until a deadline.
# Exit 0 on success, 1 on failure; the last line of stdout is the connect time in seconds.
_CLIENT = """\
import socket, sys, time
addr, port, line = sys.argv[1], int(sys.argv[2]), sys.argv[3]
attempt_s, budget_s = float(sys.argv[4]), float(sys.argv[5])
deadline = time.monotonic() + budget_s
while True:
    t0 = time.monotonic()
    try:
        with socket.create_connection((addr, port), timeout=attempt_s) as s:
            took = time.monotonic() - t0
            s.sendall(line.encode() + b"\\n")
        print(took)
        sys.exit(0)
    except OSError as e:
        if time.monotonic() >= deadline:
            print(f"failed: {e!r}", file=sys.stderr)
            sys.exit(1)
        time.sleep(0.05)  # sleep-ok: retry pacing, bounded by the deadline
"""


@contextlib.contextmanager
def _server(addr: str) -> Iterator[socket.socket]:
    """A listening TCP socket on ``addr`` (ephemeral port), closed on exit."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        srv.bind((addr, 0))
        srv.listen(64)
        yield srv
    finally:
        srv.close()


def _connect(
    hosts: Hosts, host: int, port: int, line: str, *, attempt_s: float, budget_s: float
) -> tuple[bool, float, float]:
    """Connect from ``host`` to the front; return (ok, wall seconds, connect seconds)."""
    t0 = time.monotonic()
    proc = hosts.popen(
        host,
        [sys.executable, "-c", _CLIENT, hosts.front_addr, str(port), line,
         str(attempt_s), str(budget_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, _ = proc.communicate(timeout=budget_s + attempt_s + 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    wall = time.monotonic() - t0
    ok = proc.returncode == 0
    return ok, wall, float(out.split()[-1]) if ok else -1.0


def _read_lines(srv: socket.socket, n: int, timeout_s: float) -> dict[str, str]:
    """Accept ``n`` connections and read one line from each: {peer address: line}."""
    got: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        srv.settimeout(max(0.01, deadline - time.monotonic()))
        conn, (peer, _) = srv.accept()
        with conn:
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = conn.recv(1024)
                if not chunk:
                    break
                buf += chunk
        got[peer] = buf.decode().strip()
    return got


@pytest.fixture(autouse=True)
def _needs_netns() -> None:
    require_netns()


@pytest.mark.timeout(60)
def test_front_receives_lines_from_hosts() -> None:
    with Hosts(2) as hosts, _server(hosts.front_addr) as srv:
        port = srv.getsockname()[1]
        procs = [
            hosts.popen(
                h,
                [sys.executable, "-c",
                 "import socket, sys\n"
                 "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
                 "s.sendall(sys.argv[3].encode() + b'\\n'); s.close()\n",
                 hosts.front_addr, str(port), f"hello from {h}"],
            )
            for h in (1, 2)
        ]
        got = _read_lines(srv, 2, timeout_s=15)
        for p in procs:
            assert p.wait(timeout=10) == 0
    # Each line arrives from the host's own address.
    assert got == {hosts.addr(1): "hello from 1", hosts.addr(2): "hello from 2"}


@pytest.mark.timeout(60)
def test_link_down_partitions_one_host_only() -> None:
    with Hosts(2) as hosts, _server(hosts.front_addr) as srv:
        port = srv.getsockname()[1]
        hosts.link_down(1)
        ok, wall, _ = _connect(hosts, 1, port, "x", attempt_s=2, budget_s=0)
        assert not ok
        assert wall < 6, f"a partitioned connect took {wall:.1f}s to fail"
        ok, _, _ = _connect(hosts, 2, port, "x", attempt_s=2, budget_s=5)
        assert ok, "host 2 lost the front when host 1 was partitioned"
        hosts.link_up(1)
        ok, _, _ = _connect(hosts, 1, port, "x", attempt_s=1, budget_s=15)
        assert ok, "host 1 did not reach the front again after link_up"


@pytest.mark.timeout(60)
def test_everything_removed_and_no_default_route() -> None:
    hosts = Hosts(2)
    with pytest.raises(RuntimeError, match="body failed"), hosts:
        ns = hosts.ns(1)
        route = subprocess.run(
            ["ip", "netns", "exec", ns, "ip", "-4", "route"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        lines = [ln for ln in route.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(hosts.subnet), route
        assert "default" not in route
        lo = subprocess.run(
            ["ip", "-n", ns, "link", "show", "lo"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        assert "UP" in lo.split(">")[0], lo
        # A process left running in a namespace is reaped on exit.
        idle = "import time; time.sleep(120)"  # sleep-ok: a process for the cleanup to reap
        sleeper = hosts.popen(1, [sys.executable, "-c", idle])
        raise RuntimeError("body failed")
    assert sleeper.poll() is not None, "the process in the namespace was not reaped"
    spaces = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    links = subprocess.run(
        ["ip", "link", "show"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    addrs = subprocess.run(
        ["ip", "-4", "addr"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    for h in (1, 2):
        assert hosts.ns(h) not in spaces.split(), spaces
    assert hosts.prefix not in links, links
    assert hosts.front_addr + "/" not in addrs, addrs


@pytest.mark.timeout(60)
def test_netem_delays_both_ways_and_is_removed() -> None:
    with Hosts(1) as hosts, _server(hosts.front_addr) as srv:
        port = srv.getsockname()[1]
        try:
            hosts.netem(1, "delay 100ms")
        except RuntimeError as e:
            pytest.skip(f"netem unavailable: {e}")
        ok, _, rtt = _connect(hosts, 1, port, "x", attempt_s=5, budget_s=5)
        assert ok and rtt >= 0.19, rtt  # SYN delayed 100 ms each way
        hosts.netem(1, None)
        ok, _, rtt = _connect(hosts, 1, port, "x", attempt_s=5, budget_s=5)
        assert ok and rtt < 0.1, rtt
