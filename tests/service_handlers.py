"""Handlers and a producer program for the service/ingress/client tests.

Workers import the handlers by reference (``service_handlers:ordered``); the end-to-end test runs
:func:`produce_main` in separate producer processes (``python -c "import service_handlers as s;
s.produce_main()" ...``).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any


def ordered(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """``message = {"p": producer, "i": index}``: per channel and producer, ``i`` must follow the
    previous one (0, 1, 2, ...); raises otherwise. Returns ``[seq, i]``."""
    state = channel.state
    if state is None:
        state = channel.state = {}
    p, i = message["p"], message["i"]
    last = state.get(p, -1)
    if i != last + 1 and not (redelivered and i <= last):
        raise AssertionError(f"channel {channel.id!r} producer {p}: index {i} after {last}")
    state[p] = max(last, i)
    return [seq, i]


def indexed(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """``message = {"i": n}`` with ``n`` increasing per channel (gaps allowed: some messages of
    a channel are rejected or poisoned); ``{"fail": true}`` raises. Returns ``[seq, i]``."""
    if message.get("fail"):
        raise ValueError("poison message")
    i = message["i"]
    last = channel.state if channel.state is not None else -1
    if i <= last:
        raise AssertionError(f"channel {channel.id!r}: index {i} after {last}")
    channel.state = i
    return [seq, i]


def _channels(n: int) -> list[bytes]:
    return [b"chan-%05d" % k for k in range(n)]


def _check_replies(replies: list[Any], sent: dict[int, tuple[bytes, int]]) -> dict[str, Any]:
    """Every reply ok, and per channel the indexes and seqs come back strictly in order."""
    errors: list[str] = []
    next_i: dict[bytes, int] = {}
    last_seq: dict[bytes, int] = {}
    ok = 0
    for r in replies:
        if not r.ok:
            errors.append(f"{r.corr}: {r.status} {r.value}")
            continue
        ok += 1
        cid, i = sent[r.corr]
        seq, got_i = r.value
        if got_i != i or i != next_i.get(cid, 0):
            errors.append(
                f"channel {cid!r}: reply for index {got_i}, expected {next_i.get(cid, 0)}"
            )
        next_i[cid] = i + 1
        if seq <= last_seq.get(cid, -1):
            errors.append(f"channel {cid!r}: seq {seq} after {last_seq[cid]}")
        last_seq[cid] = seq
    return {"replies": len(replies), "ok": ok, "errors": errors[:10], "n_errors": len(errors)}


def _plan(
    producer: int, channels: int, messages: int, seed: int
) -> list[tuple[bytes, dict[str, Any]]]:
    rng = random.Random(seed * 1000 + producer)
    cids = _channels(channels)
    counters: dict[bytes, int] = {}
    out = []
    for _ in range(messages):
        cid = rng.choice(cids)
        i = counters.get(cid, 0)
        counters[cid] = i + 1
        out.append((cid, {"p": producer, "i": i}))
    return out


def produce_sync(
    endpoint: str, producer: int, channels: int, messages: int, seed: int
) -> dict[str, Any]:
    from shardpool.client import Client

    sent: dict[int, tuple[bytes, int]] = {}
    with Client(endpoint, timeout=60.0) as client:
        for cid, msg in _plan(producer, channels, messages, seed):
            sent[client.send(cid, msg)] = (cid, msg["i"])
        replies = list(client.results(timeout=60.0))
    return {"sent": len(sent), **_check_replies(replies, sent)}


async def _produce_async(
    endpoint: str, producer: int, channels: int, messages: int, seed: int
) -> dict[str, Any]:
    from shardpool.client import AsyncClient

    sent: dict[int, tuple[bytes, int]] = {}
    client = await AsyncClient.connect(endpoint, timeout=60.0)
    try:
        for cid, msg in _plan(producer, channels, messages, seed):
            sent[await client.send(cid, msg)] = (cid, msg["i"])
        replies = [r async for r in client.results(timeout=60.0)]
    finally:
        await client.aclose()
    return {"sent": len(sent), **_check_replies(replies, sent)}


def produce_main() -> None:
    """Args ``ENDPOINT PRODUCER CHANNELS MESSAGES SEED sync|async``: send, check, print JSON."""
    endpoint, producer, channels, messages, seed, mode = sys.argv[1:7]
    args = (endpoint, int(producer), int(channels), int(messages), int(seed))
    summary = asyncio.run(_produce_async(*args)) if mode == "async" else produce_sync(*args)
    print(json.dumps(summary))


# ------------------------------------------------------------------------ helpers for the tests


def subprocess_env() -> dict[str, str]:
    """The environment for a ``shardpool`` or Python subprocess of a test: this checkout and the
    tests' handler modules importable, and no ``SHARDPOOL_*`` overrides meant for something
    else."""
    import os
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDPOOL_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(tests), str(tests.parent), env.get("PYTHONPATH", "")) if p
    )
    return env


def toml_config(sections: dict[str, dict[str, Any]]) -> str:
    """A TOML document for ``{section: {key: value}}`` (strings, numbers and booleans only)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = json.dumps(value)
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def backend_sections(directory: Any, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A small, fast backend config with its sockets in ``directory``; ``overrides`` maps a
    section name to keys replacing or adding to the defaults here."""
    sections: dict[str, dict[str, Any]] = {
        "pool": {"workers": 2, "handler": "service_handlers:ordered"},
        "transport": {"batch_linger_ms": 0.2},
        "supervisor": {"stop_timeout_s": 10.0, "ready_timeout_s": 30.0},
        "ingress": {"endpoint": f"ipc://{directory}/in"},
        "control": {"endpoint": f"ipc://{directory}/ctl"},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return sections


class in_process_backend:
    """``with in_process_backend(dir, pool={...}) as svc:`` — a started Service in this process
    (no main loop: tests drive it), stopped on exit whatever happens."""

    def __init__(self, directory: Any, **overrides: dict[str, Any]) -> None:
        from shardpool.config import config_from_dict
        from shardpool.service import Service

        self.config = config_from_dict(backend_sections(directory, **overrides))
        self.service = Service(self.config, env={})

    def __enter__(self) -> Any:
        self.service.start()
        return self.service

    def __exit__(self, *exc: object) -> None:
        if self.service.state != "stopped":
            self.service.stop()


def mixed(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Returns None for even indexes and ``[seq, i]`` for odd ones: outcomes of one channel then
    travel in different parts of an acknowledgement (ranges vs. results)."""
    i = message["i"]
    return None if i % 2 == 0 else [seq, i]


async def gated_or_ordered(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """With a ``"gate"`` path: wait (inside the worker) until that file exists, return
    ``[seq, i]``; otherwise as :func:`ordered` (``"p"`` defaults to 0)."""
    gate = message.get("gate")
    if gate:
        import os

        while not os.path.exists(gate):
            await asyncio.sleep(0.002)  # sleep-ok - the handler's own work, in a worker
        return [seq, message["i"]]
    return ordered(channel, seq, {"p": message.get("p", 0), "i": message["i"]}, redelivered)


def poisonable(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """``{"die": true}`` kills the worker process (exit code 71) every time: a poison message.
    Otherwise returns ``[seq, i]``."""
    if message.get("die"):
        import os

        os._exit(71)
    return [seq, message["i"]]


def gated_failure(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """``{"i": n, "gate": path, "log": path}``: raises ValueError while the file ``gate``
    exists (a cause an operator can fix); otherwise appends ``"<channel hex> <i>"`` to ``log``
    (what was applied, in order) and returns ``i``."""
    import os

    if os.path.exists(message["gate"]):
        raise ValueError(f"gate closed for message {message['i']}")
    with open(message["log"], "a", encoding="utf-8") as f:
        f.write(f"{channel.id.hex()} {message['i']}\n")
    return message["i"]
