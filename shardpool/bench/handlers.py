"""The handlers the bench runs in its pools (module level: workers import them by name).

* :func:`noop` — the trivial handler (:data:`TRIVIAL_HANDLER`): the worker still decodes each
  CBOR payload, as the baselines do.
* :class:`DigestLightningHandler` — the BOLT #2 state machine (:data:`LIGHTNING_HANDLER`) that
  also answers a probe with :func:`state_digest` of a channel's state, so that the bench can
  compare every channel's final state with a serial replay.
* :class:`AsyncDigestLightningHandler` — the same after awaiting a fixed delay per message (the
  by-type comparison's handling time).
* :class:`DigestWireHandler` / :class:`AsyncDigestWireHandler` — the same two for the real
  Lightning traffic (BOLT #2 wire bytes, real signature checks; ``payload = "raw"``), probed with
  :data:`WIRE_PROBE`.
* :class:`CountingSpinHandler` — the levelling bench's handler (:data:`SPIN_HANDLER`): a fixed
  CPU cost per message and an order check on a per-channel message number, probed with
  :data:`COUNT_PROBE` for the last number it saw.

The synthetic workload (CBOR dicts shaped like BOLT #2 messages, an optional calibrated CPU cost)
is what the ceilings and micro benchmarks measure; the real one is what a node does per message.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from typing import Any

import cbor2

from ..demo.channel import ChannelState
from ..demo.handler import LightningHandler, WireLightningHandler, check_delay

__all__ = [
    "ASYNC_LIGHTNING_HANDLER",
    "COUNT_PROBE",
    "SPIN_HANDLER",
    "ASYNC_WIRE_HANDLER",
    "LIGHTNING_HANDLER",
    "PROBE",
    "PROBE_TYPE",
    "TRIVIAL_HANDLER",
    "WIRE_HANDLER",
    "WIRE_PROBE",
    "AsyncDigestLightningHandler",
    "AsyncDigestWireHandler",
    "CountingSpinHandler",
    "DigestLightningHandler",
    "DigestWireHandler",
    "calibrate_cost",
    "noop",
    "state_digest",
]

LIGHTNING_HANDLER = "shardpool.bench.handlers:DigestLightningHandler"
"""The Lightning handler as the bench runs it: :class:`DigestLightningHandler`."""
ASYNC_LIGHTNING_HANDLER = "shardpool.bench.handlers:AsyncDigestLightningHandler"
"""The Lightning handler with a per-message delay: :class:`AsyncDigestLightningHandler`."""
TRIVIAL_HANDLER = "shardpool.bench.handlers:noop"
"""A handler that does nothing (the worker still decodes each CBOR payload, as the baselines do)."""

PROBE_TYPE = "_shardpool_digest"
"""Message type of the probe that asks :class:`DigestLightningHandler` for a channel's digest."""
PROBE = cbor2.dumps({"type": PROBE_TYPE})
"""The probe, CBOR-encoded for ``request_bytes``."""
WIRE_HANDLER = "shardpool.bench.handlers:DigestWireHandler"
"""The real traffic's handler as the bench runs it: :class:`DigestWireHandler`."""
ASYNC_WIRE_HANDLER = "shardpool.bench.handlers:AsyncDigestWireHandler"
"""The real traffic's handler with a per-message delay: :class:`AsyncDigestWireHandler`."""
WIRE_PROBE = struct.pack(">H", 0xFFFD) + b"shardpool/digest"
"""The real traffic's probe: a message of a BOLT #1 custom type (>= 32768), never a BOLT #2 one."""
SPIN_HANDLER = "shardpool.bench.handlers:CountingSpinHandler"
"""The levelling bench's handler: :class:`CountingSpinHandler` (``payload = "raw"``)."""
COUNT_PROBE = b"?"
"""Asks :class:`CountingSpinHandler` for the last message number of a channel (no cost burnt)."""


def noop(channel: Any, seq: int, message: Any, redelivered: bool) -> None:
    """The trivial handler: returns None (nothing to send back), does nothing."""
    return None


def calibrate_cost(cpu_cost_us: float, rounds: int = 3) -> int:
    """SHA-256 rounds that burn ``cpu_cost_us`` microseconds here, calibrated once (in the bench
    process, before any worker starts): the most of ``rounds`` calibrations, since a preempted
    one under-counts. 0 for no cost. Raises ValueError as :class:`LightningHandler`."""
    if cpu_cost_us <= 0:
        return 0
    best = 1
    for _ in range(max(1, rounds)):
        probe = LightningHandler(cpu_cost_us=cpu_cost_us)
        probe.setup(0)
        best = max(best, int(probe._cost_iters or 1))
    return best


def state_digest(state: ChannelState | None) -> str:
    """A short, stable hex digest of a channel's whole protocol state (``None``: no state yet).

    Stable across processes and runs: built from ``repr`` of :meth:`ChannelState.digest`, which
    holds only ints, bytes, strings, bools and None (no salted ``hash()``).
    """
    if state is None:
        return "-"
    return hashlib.sha256(repr(state.digest()).encode()).hexdigest()[:32]


def _is_probe(message: Any) -> bool:
    return type(message) is dict and message.get("type") == PROBE_TYPE


class DigestLightningHandler(LightningHandler):
    """:class:`LightningHandler` that also answers a probe: a message ``{"type": PROBE_TYPE}``
    returns :func:`state_digest` of the channel's state instead of being applied. Never raises.

    ``cost_iters`` fixes the SHA-256 rounds burnt per costly message (see :func:`calibrate_cost`)
    instead of calibrating in each worker: workers calibrating at start-up on a busy machine
    (all of them start at once) under-estimate the rounds, and two runs would do different work.
    """

    def __init__(
        self,
        cpu_cost_us: float = 0.0,
        cost_types: tuple[str, ...] = ("commitment_signed",),
        cost_iters: int | None = None,
    ) -> None:
        """Raises ValueError: ``cost_iters`` < 1, or as :class:`LightningHandler`."""
        super().__init__(cpu_cost_us, cost_types)
        if cost_iters is not None and (type(cost_iters) is not int or cost_iters < 1):
            raise ValueError(f"cost_iters must be an int >= 1 or None, got {cost_iters!r}")
        self.cost_iters = cost_iters

    def setup(self, worker_index: int) -> None:
        if self.cost_iters is None:
            super().setup(worker_index)
            return
        self.worker_index = worker_index
        # LightningHandler's own calibration result, set instead of measured.
        self._cost_iters = self.cost_iters

    # A probe's answer (its digest) is a str, which LightningHandler.handle never returns.
    def handle(  # type: ignore[override]
        self, channel: Any, seq: Any, message: Any, redelivered: Any
    ) -> dict[str, Any] | str | None:
        if _is_probe(message):
            state = getattr(channel, "state", None)
            return state_digest(state if type(state) is ChannelState else None)
        return LightningHandler.handle(self, channel, seq, message, redelivered)


class AsyncDigestLightningHandler(DigestLightningHandler):
    """:class:`DigestLightningHandler` whose ``handle`` first awaits ``delay_s`` seconds (the
    same handling time the by-type workers spend per message); probes answer at once."""

    def __init__(self, delay_s: float = 0.0, cpu_cost_us: float = 0.0,
                 cost_types: tuple[str, ...] = ("commitment_signed",),
                 cost_iters: int | None = None) -> None:
        """Raises ValueError: ``delay_s`` negative or not finite, or as the parent class."""
        super().__init__(cpu_cost_us, cost_types, cost_iters)
        self.delay_s = check_delay(delay_s)

    async def handle(  # type: ignore[override]
        self, channel: Any, seq: Any, message: Any, redelivered: Any
    ) -> dict[str, Any] | str | None:
        if not _is_probe(message):
            await asyncio.sleep(self.delay_s)
        return DigestLightningHandler.handle(self, channel, seq, message, redelivered)


def _digest_of(channel: Any) -> str:
    state = getattr(channel, "state", None)
    return state_digest(state if isinstance(state, ChannelState) else None)


class DigestWireHandler(WireLightningHandler):
    """:class:`~shardpool.demo.handler.WireLightningHandler` that also answers
    :data:`WIRE_PROBE` with :func:`state_digest` of the channel's state. Never raises."""

    def handle(  # type: ignore[override]
        self, channel: Any, seq: Any, message: Any, redelivered: Any
    ) -> dict[str, Any] | str | None:
        if message == WIRE_PROBE:
            return _digest_of(channel)
        return WireLightningHandler.handle(self, channel, seq, message, redelivered)


class AsyncDigestWireHandler(DigestWireHandler):
    """:class:`DigestWireHandler` whose ``handle`` first awaits ``delay_s`` seconds (probes
    answer at once). Raises ValueError for a negative or non-finite ``delay_s``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = check_delay(delay_s)

    async def handle(  # type: ignore[override]
        self, channel: Any, seq: Any, message: Any, redelivered: Any
    ) -> dict[str, Any] | str | None:
        if message != WIRE_PROBE:
            await asyncio.sleep(self.delay_s)
        return DigestWireHandler.handle(self, channel, seq, message, redelivered)


class CountingSpinHandler:
    """A CPU-bound handler with a fixed cost per message and an order check (``payload = "raw"``).

    Each message is the channel's message number ``k`` (1, 2, …) as 8 bytes big-endian. The
    handler burns ``cost_iters`` SHA-256 rounds (see :func:`calibrate_cost`), then checks that
    ``k`` follows the last number it saw on this channel, kept in ``channel.state`` (an int: it
    moves with the channel as CBOR). A number out of order returns ``{"violation": "order",
    "expected": …, "got": …}``; a redelivered duplicate (``k`` at or below the last) is
    accepted silently. :data:`COUNT_PROBE` returns the last number seen (0 for none).
    """

    def __init__(self, cost_iters: int = 0) -> None:
        """Raises ValueError: ``cost_iters`` not an int >= 0."""
        if type(cost_iters) is not int or cost_iters < 0:
            raise ValueError(f"cost_iters must be an int >= 0, got {cost_iters!r}")
        self.cost_iters = cost_iters
        self._sink = b"\x00" * 32

    def handle(
        self, channel: Any, seq: Any, message: Any, redelivered: Any
    ) -> dict[str, Any] | int | None:
        if message == COUNT_PROBE:
            return int(channel.state or 0)
        h = self._sink
        for _ in range(self.cost_iters):
            h = hashlib.sha256(h).digest()
        self._sink = h  # the work is used, as a verification's result would be
        k = int.from_bytes(message, "big")
        last = int(channel.state or 0)
        if k == last + 1:
            channel.state = k
            return None
        if redelivered and k <= last:
            return None
        channel.state = max(k, last)
        return {"violation": "order", "expected": last + 1, "got": k}
