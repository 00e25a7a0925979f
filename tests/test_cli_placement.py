"""Placement of a running backend from the command line: ``shardpool move``, ``pin``, ``unpin``,
``resize``, SIGTTIN/SIGTTOU, and what ``status`` and the metrics show of it."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import backend_tools
import pytest
from service_handlers import backend_sections, in_process_backend

from shardpool.cli import main
from shardpool.client import Client
from shardpool.control import ControlClient
from shardpool.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from shardpool.metrics import SnapshotCollector
from shardpool.routing import slot_of
from shardpool.status import Figures, render_status

Snapshot = dict[str, Any]


class _Traffic:
    """Messages for the ``ordered`` handler (index per channel, checked in the worker) on
    ``channels`` channels, sent in rounds around the operations; every reply must be ok."""

    def __init__(self, client: Client, channels: int) -> None:
        self.client = client
        self.cids = [b"chan-%03d" % k for k in range(channels)]
        self.next = dict.fromkeys(self.cids, 0)
        self.sent = 0

    def round(self) -> None:
        for cid in self.cids:
            self.client.send(cid, {"p": 0, "i": self.next[cid]})
            self.next[cid] += 1
            self.sent += 1
        self.client.flush()

    def check(self) -> None:
        replies = list(self.client.results(timeout=30.0))
        assert len(replies) == self.sent
        assert [r for r in replies if not r.ok] == []


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.multiprocess
def test_move_pin_unpin_and_resize_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each command against a running backend while its channels carry traffic: the placement
    changes as asked, every message is answered ok in order, errors name what was wrong."""
    with (
        in_process_backend(tmp_path, pool={"workers": 2}) as svc,
        Client(svc.ingress_endpoint, timeout=30.0) as client,
    ):
        ep = ("--endpoint", svc.control_endpoint)
        pool = svc.pool
        traffic = _Traffic(client, 40)
        traffic.round()

        # move: one slot, then several of one worker, --json
        src = pool.worker_of_slot(0)
        code, out, err = _run(capsys, "move", "0", str(1 - src), *ep)
        assert code == EXIT_OK, err
        assert f"moved slot 0 from worker {src} to worker {1 - src}" in out
        assert pool.worker_of_slot(0) == 1 - src
        traffic.round()
        mine = [s for s in range(1, 64) if pool.worker_of_slot(s) == src][:4]
        spec = f"{mine[0]},{mine[1]}-{mine[1]}," + ",".join(map(str, mine[2:]))
        code, out, err = _run(capsys, "move", spec, str(1 - src), "--json", *ep)
        assert code == EXIT_OK, err
        reply = json.loads(out)
        assert (reply["state"], reply["slots"], reply["src"], reply["dst"]) == (
            "committed", mine, src, 1 - src
        )
        assert reply["pause_s"] >= 0.0
        assert all(pool.worker_of_slot(s) == 1 - src for s in mine)
        traffic.round()

        # pin to a named worker, pin again (already there), unpin, unpin again (not pinned)
        cid = traffic.cids[0]
        away = 1 - pool.worker_of(cid)
        code, out, err = _run(capsys, "pin", cid.hex(), str(away), *ep)
        assert code == EXIT_OK, err
        assert f"channel {cid.decode()} pinned to worker {away}" in out
        assert pool.worker_of(cid) == away and pool.placement()["pins"] == {cid.hex(): away}
        traffic.round()
        code, out, _ = _run(capsys, "pin", cid.hex(), str(away), *ep)
        assert code == EXIT_OK and "it was there already" in out
        code, out, err = _run(capsys, "unpin", cid.hex(), *ep)
        assert code == EXIT_OK, err
        home = pool.worker_of_slot(slot_of(cid, svc.config.pool.slots))
        assert f"back on its slot's worker {home}" in out
        assert pool.worker_of(cid) == home and pool.placement()["pins"] == {}
        code, _, err = _run(capsys, "unpin", cid.hex(), *ep)
        assert code == EXIT_FAILURE and f"channel {cid.hex()} is not pinned" in err
        # pin with no worker: the least loaded other one
        code, out, err = _run(capsys, "pin", cid.hex(), "--json", *ep)
        assert code == EXIT_OK, err
        reply = json.loads(out)
        assert reply["moved"] and reply["worker"] == 1 - home == pool.worker_of(cid)
        traffic.round()

        # resize up and down; the pin stays on a worker that stays
        code, out, err = _run(capsys, "resize", "3", *ep)
        assert code == EXIT_OK, err
        assert "resized to 3 workers" in out
        assert len(pool.worker_pids()) == 3 and svc.info()["workers"] == 3
        assert min(pool.placement()["slots_per_worker"]) > 0
        traffic.round()
        code, out, err = _run(capsys, "resize", "1", "--json", *ep)
        assert code == EXIT_OK, err
        reply = json.loads(out)
        assert reply["done"] and reply["workers"] == 1 and not reply["resize"]["in_progress"]
        assert pool.placement()["slots_per_worker"] == [svc.config.pool.slots]
        traffic.round()
        traffic.check()


_BAD_REQUESTS: list[tuple[tuple[str, ...], int, str]] = [
        (("move", "4096", "0"), EXIT_USAGE, "no slot 4096: the pool has 4096 slots (0..4095"),
        (("move", "0", "2"), EXIT_USAGE, "no worker 2: the pool has 2 workers (0..1)"),
        (("move", "-1", "0"), EXIT_USAGE, "is not a slot number"),
        (("move", "x", "0"), EXIT_USAGE, "is not a slot number"),
        (("move", "1,2", "0"), EXIT_FAILURE, "owned by several workers: [0, 1]"),
        (("move", "1", "1"), EXIT_FAILURE, "already on worker 1"),
        (("pin", "hex:zz", "0"), EXIT_USAGE, "'hex:zz' is not a channel id: after hex: an even"),
        (("pin", "abc", "0"), EXIT_USAGE, "'abc' is not a channel id: an odd number of hex"),
        (("pin", "ab" * 65, "0"), EXIT_USAGE, "channel id must be 1..64 bytes long"),
        (("pin", "abcd", "7"), EXIT_USAGE, "no worker 7"),
        (("unpin", "abcd"), EXIT_FAILURE, "channel abcd is not pinned"),
        (("resume", "xyz"), EXIT_FAILURE, "channel 78797a is not halted (xyz is 78797a in hex)"),
        (("resize", "0"), EXIT_USAGE, "'0' is not a worker count"),
        (("resize", "2000"), EXIT_USAGE, "workers must be from 1 to 1024, got 2000"),
]


@pytest.mark.multiprocess
def test_bad_requests_are_named_and_change_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against a backend of 2 workers (round-robin slot table): each bad request is answered
    with its exit code and a message naming what was wrong; the placement stays as it was."""
    with in_process_backend(tmp_path, pool={"workers": 2}) as svc:
        before = svc.pool.placement()
        for argv, code, says in _BAD_REQUESTS:
            got, _, err = _run(capsys, *argv, "--endpoint", svc.control_endpoint)
            assert got == code and says in err, (argv, got, err)
        after = svc.pool.placement()
        assert after["slots_per_worker"] == before["slots_per_worker"] and after["pins"] == {}
        assert after["moves"]["committed"] == before["moves"]["committed"] == 0


def test_the_placement_commands_say_when_no_backend_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ep = ("--endpoint", f"ipc://{tmp_path}/none")
    for argv in (("move", "1", "0"), ("pin", "ab"), ("unpin", "ab"), ("resize", "2")):
        code, _, err = _run(capsys, *argv, *ep)
        assert code == EXIT_FAILURE and "no shardpool backend" in err, argv


@pytest.mark.multiprocess
def test_control_requests_are_answered_while_a_move_waits(tmp_path: Path) -> None:
    """A move stuck behind a long handler call runs off the control thread: placement and
    status are answered meanwhile (the move shows there, with the message it holds), and the
    move's own answer comes once it commits."""
    gate = tmp_path / "gate"
    with (
        in_process_backend(
            tmp_path, pool={"workers": 2, "handler": "service_handlers:gated_or_ordered"}
        ) as svc,
        Client(svc.ingress_endpoint, timeout=30.0) as client,
        ControlClient(svc.control_endpoint, timeout=10.0) as ctl,
    ):
        cid = b"slow"
        slot = slot_of(cid, svc.config.pool.slots)
        src = svc.pool.worker_of_slot(slot)
        # The channel's state (index 0 applied) must reach the new worker: index 1 checks it.
        assert client.call(cid, {"i": 0}, timeout=20.0) == [0, 0]
        first = client.send(cid, {"gate": str(gate), "i": 99})
        client.flush()
        backend_tools.wait_for(ctl, "status", lambda s: s["pool"]["inflight"] == 1, 20.0)
        answer: list[Any] = []

        def move() -> None:
            with ControlClient(svc.control_endpoint, timeout=30.0) as mover:
                answer.append(
                    mover.request("move", {"slots": [slot], "worker": 1 - src, "timeout": 20.0})
                )

        thread = threading.Thread(target=move)
        thread.start()
        try:
            place = backend_tools.wait_for(
                ctl, "placement", lambda p: len(p["moves"]["in_progress"]) == 1, 20.0
            )
            [m] = place["moves"]["in_progress"]
            assert (m["slots"], m["src"], m["dst"], m["state"]) == (
                [slot], src, 1 - src, "draining"
            )
            later = client.send(cid, {"i": 1})  # held at the front during the move
            client.flush()
            snap = backend_tools.wait_for(
                ctl,
                "status",
                lambda s: s["placement"]["moves"]["in_progress"][0]["held"] == 1,
                20.0,
            )
            assert "move " in render_status(snap) and "held 1" in render_status(snap)
            assert answer == []  # still waiting for the first message's handler
        finally:
            gate.touch()
            thread.join(30.0)
        assert not thread.is_alive()
        [reply] = answer
        assert (reply["state"], reply["held"], reply["slots"]) == ("committed", 1, [slot])
        replies = {r.corr: r for r in client.results(timeout=20.0)}
        assert replies[first].ok and replies[later].ok and replies[later].value == [2, 1]
        assert svc.pool.worker_of(cid) == 1 - src


@pytest.mark.multiprocess
def test_sigttin_adds_a_worker_and_sigttou_removes_one_never_below_one(tmp_path: Path) -> None:
    sections = backend_sections(tmp_path, pool={"workers": 2})
    with (
        backend_tools.backend_process(tmp_path, sections) as backend,
        ControlClient(sections["control"]["endpoint"], timeout=10.0) as ctl,
    ):

        def settled(n: int) -> Callable[[Snapshot], bool]:
            return lambda p: p["workers"] == n and not p["resize"]["in_progress"]

        backend.proc.send_signal(signal.SIGTTIN)
        backend_tools.wait_for(ctl, "placement", settled(3), 30.0)
        assert ctl.request("ping")["workers"] == 3
        for n in (2, 1):
            backend.proc.send_signal(signal.SIGTTOU)
            backend_tools.wait_for(ctl, "placement", settled(n), 30.0)
        backend.proc.send_signal(signal.SIGTTOU)  # at 1: logged, nothing changes
        backend_tools.wait_for(ctl, "status", lambda s: len(s["workers"]) == 1, 10.0)
        log = tmp_path / "backend.log"
        deadline = time.monotonic() + 10.0
        while "SIGTTOU: not resizing" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            ctl.request("ping", timeout=1.0)
        text = log.read_text()
        assert "SIGTTIN: resizing from 2 to 3 workers" in text
        assert "SIGTTOU: resizing from 3 to 2 workers" in text
        assert "SIGTTOU: resizing from 2 to 1 workers" in text
        assert "SIGTTOU: not resizing: 1 workers now, and 1 is the fewest" in text
        assert ctl.request("placement")["workers"] == 1
        assert backend.proc.poll() is None  # still serving
        backend.proc.send_signal(signal.SIGTERM)
        assert backend.proc.wait(30) == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.multiprocess
def test_status_and_metrics_show_the_placement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with (
        in_process_backend(
            tmp_path,
            pool={"workers": 2},
            metrics={"enabled": True, "host": "127.0.0.1", "port": _free_port()},
        ) as svc,
        Client(svc.ingress_endpoint, timeout=30.0) as client,
    ):
        ep = ("--endpoint", svc.control_endpoint)
        for i in range(20):
            client.send(b"c%d" % i, {"p": 0, "i": 0})
        client.wait(20.0)
        svc.pool.pin(b"c1", 1 - svc.pool.worker_of(b"c1"))
        svc.pool.move_slots([0], 1)
        code, out, err = _run(capsys, "status", "--json", *ep)
        assert code == EXIT_OK, err
        snap = json.loads(out)
        place = snap["placement"]
        assert place["workers"] == 2 and place["slots_per_worker"] == [2047, 2049]
        assert place["pins"] == {b"c1".hex(): svc.pool.worker_of(b"c1")}
        assert place["moves"]["committed"] == 2 and place["moves"]["aborted"] == 0
        assert place["moves"]["pause_p50_s"] is not None
        assert place["levelling"]["mode"] == "advise" and place["resize"]["in_progress"] is False
        assert [w["slots"] for w in snap["workers"]] == [2047, 2049]
        assert all("load_share" in w and "load" in w for w in snap["workers"])
        assert "placement" not in snap["pool"]

        code, table, _ = _run(capsys, "status", "--once", *ep)
        assert code == EXIT_OK
        assert "SLOTS" in table and "LOAD%" in table
        assert "placement: 4096 slots on 2 workers  pinned channels 1  levelling advise" in table
        assert "moves committed 2  aborted 0" in table
        # printed as the commands take it: "c1" alone would read as hex
        assert "pinned channels (1; shardpool unpin CHANNEL):\n  text:c1  worker" in table

        with urllib.request.urlopen(svc.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        for line in (
            "shardpool_workers 2.0",
            'shardpool_worker_slots{worker="0"} 2047.0',
            'shardpool_worker_slots{worker="1"} 2049.0',
            'shardpool_moves_total{result="committed"} 2.0',
            'shardpool_moves_total{result="aborted"} 0.0',
            "shardpool_moves_in_progress 0.0",
            "shardpool_pinned_channels 1.0",
            "shardpool_resize_in_progress 0.0",
            "shardpool_resize_target_workers 2.0",
            "# TYPE shardpool_worker_load_share gauge",
            "shardpool_saturated_channels 0.0",
        ):
            assert line in text, line
        assert "shardpool_move_pause_p50_seconds " in text
        assert "shardpool_move_pause_p99_seconds " in text


# ------------------------------------------------------------------ rendering, without a backend


def _placement(**changes: Any) -> dict[str, Any]:
    place: dict[str, Any] = {
        "workers": 3,
        "slots_per_worker": [1400, 1400, 1296],
        "pins": {"aa" * 32: 2},
        "moves": {
            "in_progress": [
                {"gen": 41, "slots": [7, 9], "channels": [], "src": 0, "dst": 2,
                 "reason": "resize", "state": "draining", "age_s": 0.25, "held": 12},
                {"gen": 42, "slots": [], "channels": ["bb" * 8], "src": 1, "dst": 0,
                 "reason": "pin", "state": "cancelling", "age_s": 1.5, "held": 0},
            ],
            "committed": 40,
            "aborted": 1,
            "pause_p50_s": 0.0012,
            "pause_p99_s": 0.0315,
        },
        "resize": {"target": 2, "in_progress": True, "retiring": [2], "error": None},
        "levelling": {
            "mode": "advise",
            "load": [0.6, 0.2, 0.2],
            "load_share": [0.6, 0.2, 0.2],
            "plan": [
                {"kind": "move", "slots": [3, 4], "src": 0, "dst": 1, "load": 0.125},
                {"kind": "pin", "channel": "cc" * 32, "src": 0, "dst": 2, "load": 0.5},
            ],
            "dedicated": {2: "aa" * 32},
            "saturated": ["dd" * 32],
        },
    }
    place.update(changes)
    return place


def _snapshot(placement: dict[str, Any] | None) -> Snapshot:
    workers = [
        {"index": i, "epoch": 1, "pid": 100 + i, "processed": 5, "restarts": 0,
         "state": "ready", "inflight": 0}
        for i in range(3)
    ]
    pool = {"state": "running", "acknowledged": 15, "submitted": 15, "inflight": 0,
            "failures": 0, "halted_channels": 0, "restarts": 0, "replayed": 0, "halted": [],
            "results": 15, "quarantined": 0, "forgotten": 0, "channels": 3, "workers": workers}
    if placement is not None:
        pool["placement"] = placement
    ingress = {k: 0 for k in (
        "producers", "accepted", "rejected", "frame_errors", "replies", "backpressure_waits",
        "auth_failures", "frames", "messages", "undeliverable", "internal_errors",
        "refused_frames", "refused_messages", "stalled_sends", "ok", "failed", "closed",
        "in_doubt", "halted", "held_replies", "stalled_producers")}
    ingress["accepting"] = True
    service = {"version": "x", "pid": 1, "uptime_s": 3.0, "state": "running",
               "ingress": "ipc://i", "control": "ipc://c"}
    return Figures().snapshot(service, pool, ingress, None)


def test_the_table_shows_moves_resize_plan_pins_and_saturated_channels() -> None:
    snap = _snapshot(_placement())
    assert [w["slots"] for w in snap["workers"]] == [1400, 1400, 1296]
    assert [w["load_share"] for w in snap["workers"]] == [0.6, 0.2, 0.2]
    table = render_status(snap, width=200)
    lines = table.splitlines()
    row0 = next(line for line in lines if line.split()[:2] == ["0", "100"])
    assert " 1400  60.0 " in row0
    for expected in (
        "placement: 4096 slots on 3 workers  pinned channels 1  levelling advise  moves "
        "committed 40  aborted 1  pause p50 1.2 ms  p99 31.5 ms",
        "resize:    to 2 workers in progress (retiring 2)",
        "moves in progress (2):",
        "  move 41  2 slots  worker 0 → 2  resize  draining  age 0.2 s  held 12",
        f"  move 42  channel {'bb' * 8}  worker 1 → 0  pin  cancelling  age 1.5 s  held 0",
        "levelling plan (advise: shown, not carried out):",
        "  move 2 slot(s)  worker 0 → 1  load 0.125",
        f"  pin channel {'cc' * 32}  worker 0 → 2  load 0.500",
        "pinned channels (1; shardpool unpin CHANNEL):",
        f"  {'aa' * 32}  worker 2  (dedicated worker)",
        "saturated channels (1; each keeps a core busy: order forbids splitting one):",
        f"  {'dd' * 32}",
    ):
        assert expected in lines, (expected, table)

    called_off = _placement(
        resize={"target": 3, "in_progress": False, "retiring": [], "error": "worker 3 could "
                "not start: boom"},
        moves={"in_progress": [], "committed": 0, "aborted": 0, "pause_p50_s": None,
               "pause_p99_s": None},
    )
    table = render_status(_snapshot(called_off), width=200)
    assert "resize:    called off: worker 3 could not start: boom" in table
    assert "pause p50 -  p99 -" in table and "moves in progress" not in table
    # A snapshot without placement (an older backend) still renders.
    table = render_status(_snapshot(None), width=200)
    assert "placement:" not in table and " SLOTS " in table


def test_metrics_of_a_placement_snapshot() -> None:
    snap = _snapshot(_placement())
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    text = generate_latest(registry).decode()
    for line in (
        "shardpool_workers 3.0",
        'shardpool_worker_slots{worker="2"} 1296.0',
        'shardpool_worker_load_share{worker="0"} 0.6',
        'shardpool_worker_load{worker="1"} 0.2',
        "shardpool_moves_in_progress 2.0",
        'shardpool_moves_total{result="committed"} 40.0',
        'shardpool_moves_total{result="aborted"} 1.0',
        "shardpool_move_pause_p50_seconds 0.0012",
        "shardpool_move_pause_p99_seconds 0.0315",
        "shardpool_pinned_channels 1.0",
        "shardpool_saturated_channels 1.0",
        "shardpool_resize_in_progress 1.0",
        "shardpool_resize_target_workers 2.0",
    ):
        assert line in text, line
    assert "dd" * 32 not in text  # channel ids stay in status: no per-channel series


def test_order_totals_keep_what_workers_gone_since_had_counted() -> None:
    """A worker removed by a resize, one restarted, and a new worker at a reused index (epoch 1
    again, another pid): none of their violations leaves the totals."""
    figures = Figures()

    def snap(*workers: tuple[int, int, int]) -> dict[str, int]:
        stats = {
            "state": "running",
            "acknowledged": 0,
            "halted": [],
            "workers": [
                {"index": i, "epoch": epoch, "pid": pid, "gaps": gaps, "duplicates": 0,
                 "reorders": 0}
                for i, (epoch, pid, gaps) in enumerate(workers)
            ],
        }
        order: dict[str, int] = figures.snapshot({}, stats, {"accepted": 0}, None)["order"]
        return order

    assert snap((1, 10, 1), (1, 11, 2), (1, 12, 4))["gaps"] == 7
    assert snap((1, 10, 1), (1, 11, 2))["gaps"] == 7  # worker 2 removed
    assert snap((2, 20, 0), (1, 11, 2))["gaps"] == 7  # worker 0 restarted
    assert snap((2, 20, 0), (1, 11, 3), (1, 30, 0))["gaps"] == 8  # a new worker 2
    assert snap((2, 20, 0), (1, 11, 3), (1, 31, 1))["gaps"] == 9  # ... and another one
    assert snap((2, 20, 0), (1, 11, 3), (1, 31, 1))["gaps"] == 9  # nothing new: the same


# ----------------------------------------------------------------------- the acceptance run


@pytest.mark.multiprocess
def test_resize_2_3_1_2_under_demo_load_keeps_every_channel_in_order(tmp_path: Path) -> None:
    """`shardpool run --demo-load` (the Lightning demo handler, synthetic BOLT #2 traffic through
    the ingress) resized 2 → 3 → 1 → 2 with `shardpool resize`: every resize ends, the demo sees
    no protocol violation and no failed reply, and status counts no gap, duplicate or reorder."""
    sections = backend_sections(
        tmp_path, pool={"workers": 2, "handler": "shardpool.demo.handler:LightningHandler"}
    )
    cfg = str(tmp_path / "backend.toml")
    with (
        backend_tools.backend_process(tmp_path, sections, ("--demo-load", "2000")),
        ControlClient(sections["control"]["endpoint"], timeout=10.0) as ctl,
    ):
        replies = backend_tools.wait_for(
            ctl, "status", lambda s: s["demo_load"]["replies"] >= 1000, 60.0
        )
        for n in (3, 1, 2):
            seen = replies["demo_load"]["replies"]
            out = backend_tools.cli("resize", str(n), "-c", cfg, "--timeout", "30")
            assert out.returncode == 0, (out.stdout, out.stderr)
            assert f"resized to {n} workers" in out.stdout
            # Traffic goes on at the new size before the next step.
            replies = backend_tools.wait_for(
                ctl, "status", lambda s, seen=seen: s["demo_load"]["replies"] >= seen + 1000, 60.0
            )
            assert len(replies["workers"]) == n
        out = backend_tools.cli("status", "--json", "-c", cfg)
        assert out.returncode == 0, out.stderr
        snap = json.loads(out.stdout)
    demo = snap["demo_load"]
    assert demo["replies"] > 3000
    assert demo["violations"] == 0 and demo["not_ok"] == 0, demo
    assert snap["order"] == {"gaps": 0, "duplicates": 0, "reorders": 0}
    place = snap["placement"]
    assert place["workers"] == 2 and sum(place["slots_per_worker"]) == 4096
    assert place["moves"]["committed"] > 0 and not place["resize"]["in_progress"]
    assert place["resize"]["error"] is None
