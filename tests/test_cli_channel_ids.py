"""Channel ids on the command line (``hex:…``, ``text:…``, bare) and in the ``status`` table: an id
the table prints can be pasted into ``resume``/``skip``/``pin``/``unpin`` as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import backend_tools
import pytest
from service_handlers import in_process_backend

from shardpool.channelid import format_channel, parse_channel
from shardpool.cli import main
from shardpool.client import Client
from shardpool.control import ControlClient
from shardpool.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from shardpool.protocol import MAX_CHANNEL_ID_BYTES
from shardpool.status import render_status

FORMS = "hex:HEX, text:TEXT, or a bare id"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _halted_ids(table: str) -> list[str]:
    """The channel ids of the table's halted list, as printed (first word of each entry)."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("halted channels ("))
    ids = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        if not line.startswith("      "):  # the error line under each entry is indented more
            ids.append(line.split()[0])
    return ids


@pytest.mark.parametrize(
    ("given", "cid"),
    [
        ("chan-1", b"chan-1"),  # not hex: text
        ("text:chan-1", b"chan-1"),
        ("hex:6368616e2d31", b"chan-1"),
        ("6368616e2d31", b"chan-1"),  # even number of hex digits: hex
        ("CAFE", b"\xca\xfe"),
        ("text:cafe", b"cafe"),
        ("text:hex:ab", b"hex:ab"),
        ("a:b", b"a:b"),
    ],
)
def test_accepted_forms(given: str, cid: bytes) -> None:
    assert parse_channel(given) == cid


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("abc", "odd number of hex digits"),  # a cut hex id, or text? neither is assumed
        ("hex:6368zz", "even number of hex digits"),
        ("hex:", "even number of hex digits"),
        ("text:", "1..64 bytes"),
        ("x" * (MAX_CHANNEL_ID_BYTES + 1), "1..64 bytes"),
    ],
)
def test_refused_forms_name_the_accepted_ones(given: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as err:
        parse_channel(given)
    assert FORMS in str(err.value)


@pytest.mark.parametrize(
    ("cid", "shown"),
    [
        (b"chan-1", "chan-1"),
        (b"cafe", "text:cafe"),  # bare, it would read as hex
        (b"-x", "text:-x"),  # bare, argparse would take it for an option
        (b"hex:ab", "text:hex:ab"),
        (b"a b", "612062"),  # a space: hex, so that a shell passes it unquoted
        (b"\x00\xff" * 16, "00ff" * 16),
        (bytes(range(200, 200 + MAX_CHANNEL_ID_BYTES // 2)) * 2, None),
    ],
)
def test_printed_form_reads_back_whole(cid: bytes, shown: str | None) -> None:
    text = format_channel(cid)
    if shown is not None:
        assert text == shown
    assert parse_channel(text) == cid
    assert text.split() == [text]


def _snapshot(hot: list[list[Any]], halted: list[dict[str, Any]]) -> dict[str, Any]:
    pool = {"state": "running", "acknowledged": 1, "submitted": 1, "inflight": 0,
            "failures": 0, "halted_channels": len(halted), "restarts": 0, "replayed": 0,
            "halted": halted, "quarantined": 0}
    ingress = {k: 0 for k in (
        "producers", "accepted", "rejected", "frame_errors", "replies", "backpressure_waits",
        "auth_failures")}
    ingress["accepting"] = True
    workers = [{"index": 0, "epoch": 1, "pid": 10, "restarts": 0, "state": "ready",
                "inflight": 0}]
    return {"service": {"version": "x", "pid": 1, "uptime_s": 1.0, "state": "running",
                        "ingress": "ipc://i", "control": "ipc://c"},
            "pool": pool, "workers": workers, "order": dict.fromkeys(
                ("gaps", "duplicates", "reorders"), 0),
            "hot_channels": hot, "placement": None, "ingress": ingress,
            "rates": {"processed_per_s": 0.0, "ingress_per_s": 0.0}, "demo_load": None}


def test_table_prints_ids_whole_even_in_a_narrow_terminal() -> None:
    """A 32-byte id (a Lightning channel id) fits an 80-column hot list whole; the longest id
    allowed is never cut, whatever the width (the rest of its line is)."""
    lightning = bytes(range(32))
    longest = b"\xee" * MAX_CHANNEL_ID_BYTES
    snap = _snapshot(
        hot=[[lightning.hex(), 123456, 0], [b"chan-1".hex(), 7, 0]],
        halted=[{"channel": longest.hex(), "seq": 4, "since": 0.0, "quarantined": False,
                 "error": "ValueError: boom", "type": "ValueError"}],
    )
    table = render_status(snap, width=80)
    lines = table.splitlines()
    assert f"    123456   0  {lightning.hex()}" in lines
    assert "         7   0  chan-1" in lines
    assert any(line == f"  {longest.hex()}" for line in lines), table  # cut after the id
    assert all(len(line) <= 80 for line in lines if longest.hex() not in line)


@pytest.mark.multiprocess
def test_ids_from_the_status_table_paste_into_the_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Halt two channels with text ids (one of them valid hex as text), read their ids off
    `shardpool status --once`, and resume/skip them by what the table printed; pin and unpin
    by text and hex: forms; refused forms exit 2 naming the accepted ones."""
    with (
        in_process_backend(
            tmp_path, pool={"workers": 2, "handler": "handlers:fail_on", "failure_policy": "halt"}
        ) as svc,
        Client(svc.ingress_endpoint, timeout=30.0) as client,
        ControlClient(svc.control_endpoint) as ctl,
    ):
        ep = ("--endpoint", svc.control_endpoint)
        first = client.send(b"chan-1", {"i": 0, "fail": True})
        behind = client.send(b"chan-1", {"i": 1})
        second = client.send(b"cafe", {"i": 2, "fail": True})
        client.flush()
        backend_tools.wait_for(ctl, "status", lambda s: s["pool"]["halted_channels"] == 2)

        code, table, err = _run(capsys, "status", "--once", *ep)
        assert code == EXIT_OK, err
        assert sorted(_halted_ids(table)) == ["chan-1", "text:cafe"]

        # bare "cafe" is hex (two bytes): not the halted text channel; the error says which
        code, _, err = _run(capsys, "skip", "cafe", *ep)
        assert code == EXIT_FAILURE and "channel cafe is not halted" in err
        code, _, err = _run(capsys, "resume", "abc", *ep)
        assert code == EXIT_USAGE and FORMS in err and "odd number of hex digits" in err

        failures = ctl.request("status")["pool"]["failures"]
        code, out, err = _run(capsys, "resume", "chan-1", *ep)  # as printed: text
        assert code == EXIT_OK, err
        assert "resume: channel chan-1" in out
        # retried: fail_on fails again, and the channel halts again
        backend_tools.wait_for(ctl, "status", lambda s: s["pool"]["failures"] == failures + 1
                     and s["pool"]["halted_channels"] == 2)
        code, out, err = _run(capsys, "skip", "chan-1", *ep)
        assert code == EXIT_OK, err
        code, out, err = _run(capsys, "skip", "text:cafe", *ep)
        assert code == EXIT_OK, err
        # a text id named in a backend error is shown with its hex too
        code, _, err = _run(capsys, "skip", "chan-1", *ep)
        assert code == EXIT_FAILURE
        assert f"(chan-1 is {b'chan-1'.hex()} in hex)" in err and "not halted" in err

        # pin / unpin by text and by hex: forms of the same channel
        away = 1 - svc.pool.worker_of(b"chan-1")
        code, out, err = _run(capsys, "pin", "text:chan-1", str(away), *ep)
        assert code == EXIT_OK, err
        assert f"channel chan-1 pinned to worker {away}" in out
        assert svc.pool.placement()["pins"] == {b"chan-1".hex(): away}
        code, table, _ = _run(capsys, "status", "--once", *ep)
        assert f"  chan-1  worker {away}" in table.splitlines()
        code, out, err = _run(capsys, "unpin", f"hex:{b'chan-1'.hex()}", *ep)
        assert code == EXIT_OK, err
        assert svc.pool.placement()["pins"] == {}
        replies = {r.corr: r for r in client.results(timeout=30.0)}
    finals = {c: r for c, r in replies.items() if r.status != "halted"}
    assert finals[first].status == finals[second].status == "failed"  # skipped
    assert finals[behind].ok and finals[behind].value == 1


def test_help_names_the_forms(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("resume", "skip", "pin", "unpin"):
        code, out, _ = _run(capsys, command, "--help")
        assert code == EXIT_OK
        flat = " ".join(out.split())
        assert "hex:HEX or text:TEXT" in flat and "text:cafe" in flat, command
