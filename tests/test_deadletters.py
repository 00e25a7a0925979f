"""Dead letters: the SQLite store (bound, order, purge, durability), the front's sink, and the
``shardpool dead-letters list|replay|purge`` round trip against a real backend."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import backend_tools
import pytest
from service_handlers import in_process_backend

from shardpool.client import Client
from shardpool.control import ControlClient, ControlError
from shardpool.deadletters import DeadLetter, DeadLetters, DeadLetterStore
from shardpool.metrics import SnapshotCollector


def _entry(channel: bytes, seq: int, error: str = "boom") -> DeadLetter:
    return DeadLetter(0, time.time(), channel, seq, b"\xa1ai\x00", "ValueError", error, "skip")


# ------------------------------------------------------------------------------------- the store


def test_store_keeps_order_and_bound_and_counts_what_it_drops(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "dl.sqlite", max_entries=3)
    try:
        assert store.add([_entry(b"a", 1), _entry(b"b", 1)]) == 0
        assert store.add([_entry(b"a", 2), _entry(b"a", 3)]) == 1  # the oldest goes
        got = store.entries()
        assert [(e.channel, e.seq) for e in got] == [(b"b", 1), (b"a", 2), (b"a", 3)]
        assert [e.id for e in got] == sorted(e.id for e in got)
        assert store.count() == 3 and store.dropped == 1
        assert [e.seq for e in store.entries(channel=b"a")] == [2, 3]
        assert [e.seq for e in store.entries(limit=1)] == [1]
        assert [e.channel for e in store.entries(ids=[got[2].id, 999])] == [b"a"]
        assert store.entries(ids=[]) == []
        assert got[0].payload == b"\xa1ai\x00" and got[0].error_type == "ValueError"
    finally:
        store.close()


def test_store_purge_remove_and_set_error(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "dl.sqlite", max_entries=100)
    try:
        store.add([_entry(b"a", 1), _entry(b"b", 1), _entry(b"a", 2), _entry(b"c", 1)])
        assert store.purge(b"a") == 2
        assert [e.channel for e in store.entries()] == [b"b", b"c"]
        first = store.entries()[0]
        store.set_error(first.id, "KeyError", "again", "skip")
        assert store.entries(ids=[first.id])[0].error == "again"
        assert store.remove([first.id, 12345]) == 1
        assert store.count() == 1
        assert store.purge() == 1 and store.count() == 0
    finally:
        store.close()


def test_store_is_durable_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dl.sqlite"
    store = DeadLetterStore(path, max_entries=10)
    store.add([_entry(b"a", 1), _entry(b"a", 2)])
    store.close()
    again = DeadLetterStore(path, max_entries=10)
    try:
        assert [e.seq for e in again.entries()] == [1, 2]
        assert again.count() == 2
        again.add([_entry(b"a", 3)])  # ids keep growing after a reopen
        ids = [e.id for e in again.entries()]
        assert ids == sorted(ids) and len(set(ids)) == 3
        assert path.stat().st_mode & 0o077 == 0
    finally:
        again.close()


def test_sink_writes_in_the_background_and_survives_a_failed_write(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "dl.sqlite", max_entries=10)
    sink = DeadLetters(store)
    try:
        sink.record(b"a", 1, b"\x01", "ValueError", "x", "skip")
        sink.record(b"a", 2, [1, 2], "ValueError", "not bytes: ignored", "skip")
        assert sink.flush(10.0)
        assert [e.seq for e in store.entries()] == [1]
        # A write that fails is counted and logged, never raised; later ones still go through.
        broken = sqlite3.connect(":memory:")
        real, store._db = store._db, broken  # noqa: SLF001 - simulate a failing disk
        broken.close()
        sink.record(b"a", 3, b"\x03", "ValueError", "lost", "skip")
        assert sink.flush(10.0)
        assert sink.write_errors == 1
        store._db = real  # noqa: SLF001
        sink.record(b"a", 4, b"\x04", "ValueError", "kept", "skip")
        assert sink.flush(10.0)
        assert [e.seq for e in store.entries()] == [1, 4]
        assert sink.figures()["count"] == 2
    finally:
        sink.close()
    assert not sink._thread.is_alive()  # noqa: SLF001


# --------------------------------------------------------------------------- against a backend


def _send(client: Client, cid: bytes, i: int, gate: Path, applied: Path) -> int:
    return client.send(cid, {"i": i, "gate": str(gate), "log": str(applied)})


def test_dead_letter_list_replay_round_trip(tmp_path: Path) -> None:
    gate, applied, store = tmp_path / "gate", tmp_path / "applied", tmp_path / "dl.sqlite"
    gate.touch()  # the cause: every message fails while it exists
    with (
        in_process_backend(
            tmp_path,
            pool={"workers": 2, "handler": "service_handlers:gated_failure",
                  "failure_policy": "skip"},
            deadletters={"enabled": True, "path": str(store)},
        ) as svc,
        Client(svc.ingress_endpoint, timeout=20.0) as client,
    ):
        for i in range(3):
            _send(client, b"chan-a", i, gate, applied)
            _send(client, b"chan-b", 10 + i, gate, applied)
        replies = list(client.results(timeout=20.0))
        assert len(replies) == 6 and all(r.status == "failed" for r in replies)
        ctl_args = ("--endpoint", svc.control_endpoint)

        out = backend_tools.cli("dead-letters", "list", "--json", *ctl_args)
        assert out.returncode == 0, out.stderr
        listed = json.loads(out.stdout)
        assert listed["count"] == 6 and listed["path"] == str(store)
        entries = listed["entries"]
        by_channel: dict[str, list[Any]] = {}
        for e in entries:
            assert e["error_type"] == "ValueError" and "gate closed" in e["error"]
            assert e["action"] == "skip"
            by_channel.setdefault(e["channel"], []).append(e["seq"])
        assert by_channel == {b"chan-a".hex(): [0, 1, 2], b"chan-b".hex(): [0, 1, 2]}

        table = backend_tools.cli("dead-letters", "list", "--channel", "chan-a", *ctl_args)
        assert table.returncode == 0, table.stderr
        assert table.stdout.count("chan-a") == 3 and "chan-b" not in table.stdout
        assert "gate closed for message 2" in table.stdout

        snap = svc.snapshot()
        assert snap["dead_letters"]["count"] == 6
        shown = backend_tools.cli("status", "--once", *ctl_args)
        assert "dead letters: 6 stored, 0 dropped" in shown.stdout, shown.stdout + shown.stderr
        metrics = {m.name: m for m in SnapshotCollector(svc.snapshot).collect()}
        assert metrics["shardpool_dead_letters"].samples[0].value == 6
        assert metrics["shardpool_dead_letters_dropped"].type == "counter"

        # Still failing: a replay keeps the entries, with the new error.
        out = backend_tools.cli("dead-letters", "replay", "--channel", "chan-b", *ctl_args)
        assert out.returncode == 1 and "replayed 0 of 3: 3 failed again" in out.stdout
        assert svc.dead_letters is not None and svc.dead_letters.figures()["count"] == 6

        gate.unlink()  # fix the cause
        out = backend_tools.cli("dead-letters", "replay", *ctl_args)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "replayed 6 of 6" in out.stdout
        lines = applied.read_text().split()
        got: dict[str, list[int]] = {}
        for cid, i in zip(lines[::2], lines[1::2], strict=True):
            got.setdefault(cid, []).append(int(i))
        assert got == {b"chan-a".hex(): [0, 1, 2], b"chan-b".hex(): [10, 11, 12]}

        out = backend_tools.cli("dead-letters", "list", "--json", *ctl_args)
        assert json.loads(out.stdout)["entries"] == []
        assert svc.snapshot()["dead_letters"]["count"] == 0


def test_operator_skip_is_a_dead_letter_and_purge(tmp_path: Path) -> None:
    gate, applied, store = tmp_path / "gate", tmp_path / "applied", tmp_path / "dl.sqlite"
    gate.touch()
    with (
        in_process_backend(
            tmp_path,
            pool={"workers": 1, "handler": "service_handlers:gated_failure",
                  "failure_policy": "halt"},
            deadletters={"enabled": True, "path": str(store), "max_entries": 5},
        ) as svc,
        Client(svc.ingress_endpoint, timeout=20.0) as client,
        ControlClient(svc.control_endpoint) as ctl,
    ):
        _send(client, b"chan-h", 0, gate, applied)
        client.flush(timeout=10.0)
        backend_tools.wait_for(ctl, "status", lambda s: s["pool"]["halted_channels"] == 1, 20.0)
        ctl.request("skip", {"channel": b"chan-h".hex()})
        deadline = time.monotonic() + 20.0
        while not (listed := ctl.request("dead-letters", {"action": "list"}))["entries"]:
            assert time.monotonic() < deadline, listed
            ctl.request("ping", timeout=1.0)
        [entry] = listed["entries"]
        assert entry["action"] == "skipped" and entry["channel"] == b"chan-h".hex()
        with pytest.raises(ControlError, match="purge needs"):
            ctl.request("dead-letters", {"action": "purge"})
        out = backend_tools.cli("dead-letters", "purge", "--all", "--endpoint",
                                svc.control_endpoint)
        assert out.returncode == 0 and "purged 1" in out.stdout
        assert ctl.request("dead-letters", {"action": "list"})["count"] == 0


def test_off_by_default_nothing_is_written(tmp_path: Path) -> None:
    gate, applied = tmp_path / "gate", tmp_path / "applied"
    gate.touch()
    with (
        in_process_backend(
            tmp_path,
            pool={"workers": 1, "handler": "service_handlers:gated_failure",
                  "failure_policy": "skip"},
            transport={"runtime_dir": str(tmp_path)},
        ) as svc,
        Client(svc.ingress_endpoint, timeout=20.0) as client,
    ):
        assert svc.config.deadletters.enabled is False and svc.dead_letters is None
        _send(client, b"chan-x", 0, gate, applied)
        assert [r.status for r in client.results(timeout=20.0)] == ["failed"]
        out = backend_tools.cli("dead-letters", "list", "--endpoint", svc.control_endpoint)
        assert out.returncode == 1 and "dead letters are off" in out.stderr
        assert "dead_letters" not in svc.snapshot()
    assert list(tmp_path.rglob("*.sqlite*")) == []
