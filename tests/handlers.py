"""Handlers used by the multi-process tests (imported by the spawned workers by reference)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any


def record(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Sync: check the producer's per-channel index follows the last one; return (seq, index)."""
    last = channel.state if channel.state is not None else -1
    i = message["i"]
    if i != last + 1 and not (redelivered and i <= last):
        raise AssertionError(f"channel {channel.id!r}: got index {i} after {last}")
    channel.state = max(last, i)
    return [seq, i]


async def record_async(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Async: awaits a random short delay between reading and writing the channel state, so an
    interleaving of two calls of one channel would be caught."""
    last = channel.state if channel.state is not None else -1
    await asyncio.sleep(random.choice((0.0, 0.0, 0.0001, 0.0005, 0.001)))
    i = message["i"]
    if i != last + 1:
        raise AssertionError(f"channel {channel.id!r}: got index {i} after {last}")
    if channel.state != (last if last >= 0 else None):
        raise AssertionError(f"channel {channel.id!r}: state changed during an await")
    channel.state = i
    return [seq, i]


async def gated(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Async: waits (polling, inside the worker) until the file named by the message exists;
    messages without a gate return at once."""
    gate = message.get("gate")
    while gate and not os.path.exists(gate):
        await asyncio.sleep(0.002)
    return [seq, message.get("i")]


def sleepy(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Sync: burns ``message["ms"]`` milliseconds of wall time (a blocking, slow handler)."""
    time.sleep(message.get("ms", 0) / 1000.0)
    return seq


def fail_on(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Sync: raises ValueError when the message says so; otherwise returns its index."""
    if message.get("fail"):
        raise ValueError(f"refusing message {message.get('i')}")
    return message.get("i")


def echo_bytes(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Returns what it got (used with payload = "raw" and for decode checks)."""
    return message


class Counting:
    """A class handler: instantiated once per worker with handler_options; hooks record calls."""

    def __init__(self, start: int = 0) -> None:
        self.start = start
        self.worker = -1
        self.calls = 0

    def setup(self, worker_index: int) -> None:
        self.worker = worker_index

    def teardown(self) -> None:
        pass

    def handle(self, channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
        self.calls += 1
        return [self.worker, self.start + self.calls]


BROKEN_IMPORT = "tests_missing_module_for_shardpool:handle"
