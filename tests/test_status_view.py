"""The live ``shardpool status`` view: the table fitted to 80 and 160 columns (columns dropped in
:data:`~shardpool.status.DROP_ORDER`, never a channel id cut), colour only when asked (and not
under ``NO_COLOR``), the front's own row, and a screenshot-equivalent check: the real command
under a pseudo-terminal of 80 and 160 columns against a backend with halted channels, quit with
``q``, the alternate screen left and the terminal's modes restored; remote workers' host, link,
lease age and round trip (columns shown only when some worker is remote) and their summary line."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest
from service_handlers import in_process_backend

from shardpool.cli import main
from shardpool.client import Client
from shardpool.control import ControlClient
from shardpool.status import (
    DROP_ORDER,
    REMOTE_COLUMNS,
    remote_summary,
    render_status,
    worker_rows,
)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
LIGHTNING = bytes(range(32))  # a 32-byte channel id: printed as 64 hex digits
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HEADINGS = ("W", "PID", "STATE", "EPOCH", "RST", "SLOTS", "LOAD%", "CHANNELS", "QUEUED",
            "INFLIGHT", "PROC/S", "PROCESSED", "FAILED", "REDELIV", "LAG ms", "CPU%", "RSS MB")
# The columns of a pool with remote workers: host, link, lease age and round trip after STATE.
REMOTE_HEADINGS = (*HEADINGS[:3], *REMOTE_COLUMNS, *HEADINGS[3:])
# DROP_ORDER as a local-only table sees it (the remote columns are not shown there).
LOCAL_DROP_ORDER = tuple(h for h in DROP_ORDER if h not in REMOTE_COLUMNS)


def _snapshot() -> dict[str, Any]:
    """A snapshot as the backend gives it: two workers (one dead, with failures), two halted
    channels (a Lightning id and a text id), the front's own figures."""
    halted = [
        {"channel": LIGHTNING.hex(), "seq": 4, "since": 0.0, "quarantined": False,
         "error": "ValueError: boom", "type": "ValueError"},
        {"channel": b"chan-1".hex(), "seq": 7, "since": 0.0, "quarantined": True,
         "error": "", "type": "ValueError"},
    ]
    pool = {"state": "running", "acknowledged": 1234567, "submitted": 1234570, "inflight": 3,
            "failures": 2, "halted_channels": 2, "restarts": 1, "replayed": 5,
            "halted": halted, "quarantined": 1}
    ingress: dict[str, Any] = dict.fromkeys(
        ("producers", "accepted", "rejected", "frame_errors", "replies", "backpressure_waits",
         "auth_failures"), 0)
    ingress["accepting"] = True
    worker = {"epoch": 1, "restarts": 0, "state": "ready", "inflight": 1, "channels": 12,
              "queued": 0, "processed": 617000, "processed_per_s": 9876.0, "failed": 0,
              "redelivered": 0, "loop_lag_s": 0.0004, "cpu_percent": 97.5, "rss_bytes": 61e6,
              "slots": 128, "load_share": 0.5}
    workers = [{**worker, "index": 0, "pid": 4242},
               {**worker, "index": 1, "pid": 4243, "state": "dead", "failed": 2}]
    return {
        "service": {"version": "9.9", "pid": 4200, "uptime_s": 3723.0, "state": "running",
                    "ingress": "ipc:///run/shardpool/ingress.sock",
                    "control": "ipc:///run/shardpool/control.sock",
                    "front": {"pid": 4200, "cpu_percent": 12.5, "rss_bytes": 80e6,
                              "threads": 9}},
        "pool": pool, "workers": workers,
        "order": {"gaps": 1, "duplicates": 0, "reorders": 0},
        "hot_channels": [[LIGHTNING.hex(), 123456, 0], [b"chan-1".hex(), 7, 1]],
        "placement": None, "ingress": ingress,
        "rates": {"processed_per_s": 19752.0, "ingress_per_s": 19750.0}, "demo_load": None,
    }


def _headings(table: str, headings: tuple[str, ...] = HEADINGS) -> list[str]:
    line = next(line for line in table.splitlines() if line.split()[:2] == ["W", "PID"])
    return [h for h in headings if re.search(rf"(^| ){re.escape(h)}( |$)", line)]


@pytest.mark.parametrize("width", [80, 160])
def test_table_fits_the_width_and_prints_the_halted_ids_whole(width: int) -> None:
    table = render_status(_snapshot(), width)
    lines = table.splitlines()
    assert all(len(line) <= width for line in lines), [ln for ln in lines if len(ln) > width]
    assert "\x1b" not in table  # no colour unless asked
    assert any(line.startswith(f"  {LIGHTNING.hex()}  seq 4") for line in lines), table
    assert "  chan-1  seq 7  QUARANTINED since" in table
    # nothing cut: the fields of a long line flow onto the next, they are not dropped
    assert "internal errors 0" in table and "order violations: gaps 1" in table
    # the front's own row: its pid, CPU% and RSS
    front = next(line for line in lines if line.lstrip().startswith("front "))
    assert front.split()[:3] == ["front", "4200", "running"]
    assert "12.5" in front and "80.0" in front


def test_columns_are_dropped_least_important_first() -> None:
    snap = _snapshot()
    assert _headings(render_status(snap, 160)) == list(HEADINGS)  # all of them fit 160
    assert _headings(render_status(snap)) == list(HEADINGS)  # no width: all
    at_80 = _headings(render_status(snap, 80))
    dropped = [h for h in HEADINGS if h not in at_80]
    assert dropped
    assert set(dropped) == set(LOCAL_DROP_ORDER[: len(dropped)])
    assert {"W", "PID", "STATE", "FAILED", "CPU%", "RSS MB"} <= set(at_80)
    previous: set[str] = set(HEADINGS)
    for width in range(160, 19, -1):  # narrower: the same order, one column after another
        shown = set(_headings(render_status(snap, width)))
        assert shown <= previous
        gone = [h for h in LOCAL_DROP_ORDER if h not in shown]
        assert gone == list(LOCAL_DROP_ORDER[: len(gone)]), (width, gone)
        previous = shown


def test_colour_only_when_asked_and_the_layout_is_the_same() -> None:
    snap = _snapshot()
    for width in (80, 160):
        plain = render_status(snap, width)
        coloured = render_status(snap, width, colour=True)
        assert "\x1b[" in coloured and ANSI.sub("", coloured) == plain
        red = [ANSI.sub("", ln) for ln in coloured.splitlines() if ln.startswith("\x1b[1;31m")]
        assert any(ln.startswith("halted channels (2") for ln in red)
        assert any(ln.startswith(f"  {LIGHTNING.hex()}") for ln in red)
        assert any(ln.startswith("order violations") for ln in red)
        assert any(ln.split()[:2] == ["1", "4243"] for ln in red)  # the worker with failures
    healthy = _snapshot()
    healthy["pool"].update(halted=[], halted_channels=0, quarantined=0, failures=0)
    healthy["order"]["gaps"] = 0
    healthy["workers"][1].update(state="ready", failed=0)
    assert "\x1b[1;31m" not in render_status(healthy, 80, colour=True)


# --------------------------------------------------------------------------------- remote workers


def _remote_snapshot(json_keys: bool = False) -> dict[str, Any]:
    """Three workers: 0 local, 1 remote and up (lease 0.2 s, round trip 1.5 ms), 2 remote and
    away (no lease, no round trip); the remote summary in the pool's stats and the placement
    (its ``workers`` keyed by strings when ``json_keys``, as through the control socket)."""
    snap = _snapshot()
    snap["pool"].update(halted=[], halted_channels=0, quarantined=0, failures=0)
    snap["hot_channels"] = []  # a 64-digit id passes a narrow width: not what is tested here
    local, up = snap["workers"]
    local.update(remote=False, host="local", link="ipc")
    up.update(state="ready", failed=0, pid=5151)
    base = {"remote": True, "weight": 1.0, "failover_s": [], "last_lost": None}
    reports = {
        1: {**base, "worker_id": "east-1", "host": "east-1.dc2.example.com", "pid": 5151,
            "link": "up", "lease_age_s": 0.2, "rtt_s": 0.0015, "failovers": 0, "state": "ready"},
        2: {**base, "worker_id": "west-7", "host": "10.20.30.40", "pid": 6161, "link": "away",
            "lease_age_s": None, "rtt_s": None, "failovers": 2, "failover_s": [0.4, 0.6],
            "last_lost": "lease expired", "state": "away"},
    }
    up.update(reports[1])
    away = {**up, **reports[2], "index": 2, "channels": 0, "processed": 10}
    snap["workers"] = [local, up, away]
    remote = {"endpoint": "tcp://0.0.0.0:7100", "refused": 3, "auth_failures": 1,
              "impersonations": 0, "stray_frames": 4, "failovers": 2, "joins": 5,
              "workers": {str(i) if json_keys else i: r for i, r in reports.items()}}
    snap["pool"]["remote"] = remote
    return snap


def _row_of(table: str, index: int) -> str:
    return next(ln for ln in table.splitlines() if ln.split()[:1] == [str(index)])


def _cells(table: str, index: int) -> dict[str, str]:
    """Worker ``index``'s row, heading by heading (no cell of a worker row is blank or holds a
    space, so the row's words are its cells)."""
    cells = _row_of(table, index).split()
    headings = _headings(table, REMOTE_HEADINGS)
    assert len(cells) == len(headings), (headings, cells)
    return dict(zip(headings, cells, strict=True))


def test_remote_workers_show_host_link_lease_and_round_trip() -> None:
    for json_keys in (False, True):
        snap = _remote_snapshot(json_keys)
        table = render_status(snap)
        headings = _headings(table, REMOTE_HEADINGS)
        assert headings == list(REMOTE_HEADINGS)
        shown = ("STATE", "HOST", "LINK", "LEASE", "RTT ms", "EPOCH")
        cells = {i: {h: c for h, c in _cells(table, i).items() if h in shown} for i in (0, 1, 2)}
        assert cells[0] == {"STATE": "ready", "HOST": "local", "LINK": "ipc", "LEASE": "-",
                            "RTT ms": "-", "EPOCH": "1"}
        # a long host name: its first label; an IP address whole
        assert cells[1] == {"STATE": "ready", "HOST": "east-1", "LINK": "up", "LEASE": "0.2s",
                            "RTT ms": "1.5", "EPOCH": "1"}
        assert cells[2] == {"STATE": "away", "HOST": "10.20.30.40", "LINK": "away",
                            "LEASE": "-", "RTT ms": "-", "EPOCH": "1"}
        # the summary line: endpoint, workers away, and the counters
        line = next(ln for ln in table.splitlines() if ln.startswith("remote:"))
        assert line == (
            "remote:    endpoint tcp://0.0.0.0:7100  workers 2 (1 away)  joins 5  failovers 2  "
            "refused 3  auth failures 1  impersonations 0  stray frames 4"
        )
        # the front's row leaves the remote cells blank
        front = next(ln for ln in table.splitlines() if ln.lstrip().startswith("front "))
        assert front.split()[:3] == ["front", "4200", "running"]


def test_an_away_worker_is_marked_and_the_remote_columns_drop_early() -> None:
    snap = _remote_snapshot()
    coloured = render_status(snap, 160, colour=True)
    marked = [ANSI.sub("", ln) for ln in coloured.splitlines() if ln.startswith("\x1b[33m")]
    assert any(ln.split()[:2] == ["2", "6161"] for ln in marked)  # away: marked
    assert not any(ln.split()[:2] == ["1", "5151"] for ln in marked)  # up: not
    assert not any(ln.split()[:2] == ["0", "4242"] for ln in marked)
    red = [ANSI.sub("", ln) for ln in coloured.splitlines() if ln.startswith("\x1b[1;31m")]
    assert any(ln.startswith("remote:") for ln in red)  # an auth failure
    # the same remote worker away only by its link (state not yet updated) is marked too
    snap["workers"][2]["state"] = "ready"
    coloured = render_status(snap, 160, colour=True)
    assert any(ANSI.sub("", ln).split()[:2] == ["2", "6161"]
               for ln in coloured.splitlines() if ln.startswith("\x1b[33m"))

    assert _headings(render_status(snap, 160), REMOTE_HEADINGS) == list(REMOTE_HEADINGS)
    previous = set(REMOTE_HEADINGS)
    for width in range(160, 19, -1):
        table = render_status(snap, width)
        assert all(len(ln) <= width for ln in table.splitlines()), width
        shown = set(_headings(table, REMOTE_HEADINGS))
        assert shown <= previous
        gone = [h for h in DROP_ORDER if h not in shown]
        assert gone == list(DROP_ORDER[: len(gone)]), (width, gone)
        previous = shown
    at_80 = _headings(render_status(snap, 80), REMOTE_HEADINGS)
    assert "RTT ms" not in at_80 and "LEASE" not in at_80 and "LINK" in at_80
    assert DROP_ORDER.index("HOST") > max(DROP_ORDER.index("LEASE"), DROP_ORDER.index("RTT ms"))


def test_the_remote_summary_from_the_placement_and_long_host_names() -> None:
    snap = _remote_snapshot(json_keys=True)
    remote = snap["pool"].pop("remote")
    for w in snap["workers"][1:]:  # no remote fields merged in: taken from the summary
        for key in ("remote", "host", "link", "lease_age_s", "rtt_s"):
            del w[key]
    remote["workers"]["1"]["host"] = "a-very-long-host-name-without-dots"
    remote["workers"]["2"]["host"] = "fd00:1234:5678::42"
    snap["placement"] = {"remote": remote}  # only the summary is read from it here
    assert remote_summary(snap) is remote
    assert [w["link"] for w in worker_rows(snap)] == ["ipc", "up", "away"]
    table = render_status({**snap, "placement": None, "pool": {**snap["pool"], "remote": remote}})
    assert _cells(table, 1)["HOST"] == "a-very-long…"
    assert _cells(table, 2)["HOST"] == "fd00:1234:5…"  # an IP address: cut, not split at dots
    assert _cells(table, 1)["LEASE"] == "0.2s" and _cells(table, 2)["LINK"] == "away"
    assert "remote:    endpoint tcp://0.0.0.0:7100" in table


def test_a_local_only_pool_renders_as_before() -> None:
    snap = _snapshot()
    before = render_status(snap, 160)
    for w in snap["workers"]:  # what stats() now adds for a local worker
        w.update(remote=False, host="local", link="ipc")
    snap["pool"]["remote"] = None
    snap["placement"] = None
    for width in (None, 80, 160):
        table = render_status(snap, width)
        assert table == render_status(_snapshot(), width)
        assert not any(h in table for h in ("HOST", "LINK", "LEASE", "RTT", "remote:"))
    assert render_status(snap, 160) == before


# ------------------------------------------------------------------------- under a pseudo-terminal


def _controlling_terminal() -> None:
    """In the child (a new session): its stdin, the pty, becomes its controlling terminal, so
    that the terminal's interrupt character sends it SIGINT as in a shell."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class _Pty:
    """``python -m shardpool ARGV`` with a pseudo-terminal of ``cols`` x ``rows`` as its stdin,
    stdout and stderr; what it writes is collected in :attr:`out`."""

    def __init__(self, argv: list[str], cols: int, rows: int, env: dict[str, str]) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.modes = termios.tcgetattr(self.slave)
        full = {k: v for k, v in os.environ.items()
                if k not in ("COLUMNS", "LINES", "NO_COLOR") and not k.startswith("SHARDPOOL_")}
        full.update(TERM="xterm", PYTHONPATH=os.pathsep.join((str(TESTS), str(REPO))), **env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardpool", *argv],
            stdin=self.slave, stdout=self.slave, stderr=self.slave, cwd=REPO, env=full,
            start_new_session=True, preexec_fn=_controlling_terminal,
        )
        self.out = ""

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            self.out += os.read(self.master, 65536).decode("utf-8", "replace")

    def read_until(self, done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.out):
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, f"gave up; output:\n{self.out}"
            self.read(min(left, 0.2))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def _last_screen(out: str) -> list[str] | None:
    """The lines of the last complete frame (home ... clear to end of screen), ANSI removed."""
    frame = out.rpartition("\x1b[H")[2]
    if "\x1b[J" not in frame:
        return None
    text = ANSI.sub("", frame.partition("\x1b[J")[0])
    return [line.rstrip("\r") for line in text.split("\n")]  # the tty writes \n as \r\n


def _names_the_halted(screen: list[str] | None) -> bool:
    return screen is not None and any(
        ln.startswith(f"  {LIGHTNING.hex()}  seq") for ln in screen
    ) and any(ln.startswith("  chan-1  seq") for ln in screen)


@pytest.mark.multiprocess
def test_live_view_under_a_pty_fits_names_the_halted_channel_and_quits_on_q(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with (
        in_process_backend(
            tmp_path, pool={"workers": 2, "handler": "handlers:fail_on", "failure_policy": "halt"}
        ) as svc,
        Client(svc.ingress_endpoint, timeout=30.0) as client,
        ControlClient(svc.control_endpoint) as ctl,
    ):
        client.send(LIGHTNING, {"i": 0, "fail": True})
        client.send(b"chan-1", {"i": 1, "fail": True})
        client.flush()
        deadline = time.monotonic() + 30
        while ctl.request("status")["pool"]["halted_channels"] < 2:
            assert time.monotonic() < deadline
            ctl.request("ping", timeout=1.0)
        front = ctl.request("status")["service"]["front"]
        assert front["pid"] == os.getpid() and front["rss_bytes"] > 0
        assert {"cpu_percent", "threads"} <= set(front)

        # a pipe: whole lines, no colour
        capsys.readouterr()
        assert main(["status", "--once", "--endpoint", svc.control_endpoint]) == 0
        assert "\x1b" not in capsys.readouterr().out

        ep = ["--endpoint", svc.control_endpoint]
        for cols, env in ((80, {"NO_COLOR": "1"}), (160, {})):
            rows = 50
            term = _Pty(["status", *ep, "--interval", "0.2"], cols, rows, env)
            try:
                term.read_until(lambda out: _names_the_halted(_last_screen(out)), 30.0)
                assert term.out.startswith("\x1b[?1049h")  # the alternate screen first
                screen = _last_screen(term.out)
                assert screen is not None and len(screen) <= rows
                assert all(len(ln) <= cols for ln in screen), [
                    ln for ln in screen if len(ln) > cols]
                assert any(ln.split()[:2] == ["front", str(os.getpid())] for ln in screen)
                assert screen[-1].startswith("q quits")
                coloured = "\x1b[1;31m" in term.out
                assert coloured == ("NO_COLOR" not in env), cols
                assert (termios.tcgetattr(term.slave)[3] & termios.ICANON) == 0  # cbreak
                os.write(term.master, b"q")
                term.proc.wait(timeout=10)
                assert term.proc.returncode == 0
                term.read(0.5)
                tail = term.out.rpartition("\x1b[H")[2]
                assert term.out.rfind("\x1b[?1049l") > term.out.rfind("\x1b[?1049h")
                assert tail.endswith("\x1b[?25h\x1b[?1049l"), repr(tail[-40:])
                assert termios.tcgetattr(term.slave) == term.modes  # echo, canonical again
            finally:
                term.close()

        # a resized terminal is redrawn at once (not after the 30 s interval) to its new width;
        # Ctrl-C leaves the alternate screen too
        term = _Pty(["status", *ep, "--interval", "30"], 160, 50, {})
        try:
            term.read_until(lambda out: _names_the_halted(_last_screen(out)), 30.0)
            assert "EPOCH" in "".join(_last_screen(term.out) or ())
            fcntl.ioctl(term.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 100, 0, 0))
            term.read_until(
                lambda out: (screen := _last_screen(out)) is not None
                and "EPOCH" not in "".join(screen) and all(len(ln) <= 100 for ln in screen),
                10.0,
            )
            os.write(term.master, b"\x03")  # the terminal's interrupt character: SIGINT
            term.proc.wait(timeout=10)
            term.read(0.5)
            assert term.proc.returncode == 0
            assert term.out.endswith("\x1b[?25h\x1b[?1049l"), repr(term.out[-40:])
            assert termios.tcgetattr(term.slave) == term.modes
        finally:
            term.close()
