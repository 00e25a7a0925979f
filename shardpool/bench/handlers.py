"""The handlers the bench runs in its pools (module level: workers import them by name).

* :func:`noop` — the trivial handler (:data:`TRIVIAL_HANDLER`): the worker still decodes each
  CBOR payload, as the baselines do.
* :class:`DigestLightningHandler` — the BOLT #2 state machine (:data:`LIGHTNING_HANDLER`) that
  also answers a probe with :func:`state_digest` of a channel's state, so that the bench can
  compare every channel's final state with a serial replay.
* :class:`AsyncDigestLightningHandler` — the same after awaiting a fixed delay per message (the
  by-type comparison's handling time).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import Any

import cbor2

from ..demo.channel import ChannelState
from ..demo.handler import LightningHandler

__all__ = [
    "ASYNC_LIGHTNING_HANDLER",
    "LIGHTNING_HANDLER",
    "PROBE",
    "PROBE_TYPE",
    "TRIVIAL_HANDLER",
    "AsyncDigestLightningHandler",
    "DigestLightningHandler",
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
        if not (isinstance(delay_s, (int, float)) and math.isfinite(delay_s) and delay_s >= 0):
            raise ValueError(f"delay_s must be a finite number >= 0, got {delay_s!r}")
        self.delay_s = float(delay_s)

    async def handle(  # type: ignore[override]
        self, channel: Any, seq: Any, message: Any, redelivered: Any
    ) -> dict[str, Any] | str | None:
        if not _is_probe(message):
            await asyncio.sleep(self.delay_s)
        return DigestLightningHandler.handle(self, channel, seq, message, redelivered)
