"""The README's producer documentation holds: every Python example in README.md runs as written
(in a subprocess with a deadline, against a real backend where it needs one), the Client example
prints what the README says it prints, and the wire format section (statuses, error codes, HELLO
fields, the example frame) matches the protocol and a running backend.

The examples that use the default endpoint (``Client()``) are not edited: the subprocess gets
``SHARDPOOL_INGRESS_ENDPOINT``, the override the default config is read with, and runs in an empty
directory (no ``config/shardpool.toml`` there), so the text the README shows is the text run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import zmq
from backend_tools import raw_producer
from service_handlers import in_process_backend, subprocess_env

from shardpool import protocol as P

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
DEMO = {"pool": {"handler": "shardpool.demo.handler:LightningHandler", "workers": 2}}
EXAMPLE_TIMEOUT_S = 120.0
REPLY_TIMEOUT_MS = 10_000


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", TEXT, re.S | re.M)


def example(marker: str) -> str:
    """The one Python example containing ``marker``."""
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"{len(found)} README Python examples contain {marker!r}"
    return found[0]


LIBRARY, CLIENT, ASYNC = "ShardPool(", "Client(timeout=30)", "AsyncClient.connect("


def section(title: str) -> str:
    """The README's text under the heading ``title`` up to the next heading of any level."""
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ )", TEXT, re.S | re.M)
    assert m, f"no README section {title!r}"
    return m.group(1)


def run_example(code: str, cwd: Path, endpoint: str | None = None) -> str:
    """Run ``code`` as a script in ``cwd`` (deadline EXAMPLE_TIMEOUT_S; a timed-out child is
    killed and reaped by subprocess.run); its stdout, after asserting exit code 0."""
    script = cwd / "example.py"
    script.write_text(code)
    env = subprocess_env()
    if endpoint is not None:
        env["SHARDPOOL_INGRESS_ENDPOINT"] = endpoint
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=EXAMPLE_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"example failed:\n{code}\n--- stderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_python_example_is_one_this_file_runs() -> None:
    blocks = python_blocks()
    assert len(blocks) == 3, "a new README Python example needs a run here"
    for marker in (LIBRARY, CLIENT, ASYNC):
        example(marker)


def test_library_example_runs(tmp_path: Path) -> None:
    out = run_example(example(LIBRARY), tmp_path).splitlines()
    # chan-3 gets every amount i with i % 10 == 3: 3 + 13 + ... + 993.
    assert out[0] == str(sum(range(3, 1000, 10)))
    assert out[1].isdigit()


def test_client_example_prints_what_the_readme_says(tmp_path: Path) -> None:
    m = re.search(
        r"<!-- client-example-output -->\n```\n(.*?)```\n<!-- /client-example-output -->",
        TEXT, re.S,
    )
    assert m, "the README shows no output for the Client example"
    with in_process_backend(tmp_path, **DEMO) as svc:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        out = run_example(example(CLIENT), run_dir, svc.ingress.endpoint)
    assert out == m.group(1)


def test_async_example_runs_with_asyncio_run(tmp_path: Path) -> None:
    code = example(ASYNC)
    assert "asyncio.run(main())" in code
    with in_process_backend(tmp_path, **DEMO) as svc:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        out = run_example(code, run_dir, svc.ingress.endpoint).splitlines()
    assert out == [
        "True ok",
        "{'violation': 'malformed', 'type': 'shutdown', 'seq': 0}",
    ]


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """Rows of the markdown table whose header's first cell is ``first_cell``, as cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_wire_section_lists_every_status_and_error_code() -> None:
    wire = section("The ingress wire format")
    statuses = {int(r[0]): r[1].strip("`") for r in table_rows(wire, "status")}
    assert statuses == P.STATUS_NAMES
    final = {int(r[0]) for r in table_rows(wire, "status") if r[2] == "yes"}
    assert final == set(P.FINAL_STATUSES)
    kinds = {int(r[2]) for r in table_rows(wire, "direction")}
    assert kinds == {P.SUBMIT, P.HELLO, P.REPLIES, P.ERROR}
    rejected = wire[wire.index("`rejected` codes:"):wire.index("ERROR codes:")]
    errors = wire[wire.index("ERROR codes:"):wire.index("**HELLO.**")]
    assert set(re.findall(r"`([a-z_]+)`", rejected)) - {"rejected"} >= set(P.ITEM_ERRORS) | {
        P.E_INTERNAL_ERROR
    }
    assert set(re.findall(r"`([a-z_]+)`", errors)) >= set(P.FRAME_ERRORS)


def exchange(sock: zmq.Socket[bytes], frame: bytes) -> Any:
    sock.send(frame)
    assert sock.poll(REPLY_TIMEOUT_MS), "no reply from the backend"
    return cbor2.loads(sock.recv())


def test_wire_section_example_frame_and_hello_fields(tmp_path: Path) -> None:
    wire = section("The ingress wire format")
    frame_hex = re.search(r"is the\s+frame `([0-9a-f]+)`", wire)
    assert frame_hex, "no example frame in the wire section"
    frame = bytes.fromhex(frame_hex.group(1))
    assert cbor2.loads(frame) == [1, 0, [[7, b"chan-1", cbor2.dumps({"type": "ping"})]]]
    documented = {r[0].strip("`") for r in table_rows(wire, "key")}
    with in_process_backend(tmp_path, **DEMO) as svc:
        ctx, sock = raw_producer(svc.ingress.endpoint)
        try:
            hello = exchange(sock, cbor2.dumps([1, 1, b"token"]))
            assert hello[:3] == [1, 1, b"token"]
            assert set(hello[3]) == documented
            assert hello[3]["max_frame_bytes"] == max(
                64 << 20, 2 * hello[3]["max_message_bytes"] + (64 << 10)
            )
            reply = exchange(sock, frame)
            assert reply == [1, 2, [[7, 0, {"violation": "unknown_type", "type": "ping",
                                            "seq": 0}]]]
            assert cbor2.dumps(reply).hex().startswith("83010281830700a3")
            # The map itself where the byte string should be: rejected, as the README says.
            bad = exchange(sock, cbor2.dumps([1, 0, [[8, b"chan-1", {"type": "ping"}]]]))
            assert bad[2][0][:2] == [8, P.REJECTED]
            assert bad[2][0][2]["error"] == P.E_BAD_PAYLOAD
        finally:
            sock.close(0)
            ctx.term()
