"""The pool handler for the Lightning demo: one :class:`ChannelState` per channel.

The worker calls ``handle(channel, seq, message, redelivered)`` with ``channel.id`` (bytes) and a
``channel.state`` slot (``None`` at first; this handler keeps its :class:`ChannelState` there).
Messages of one channel arrive one at a time in order, so the handler needs no locking.

``handle`` returns ``None`` for a valid message and ``{"violation": code, "type": msg_type,
"seq": seq}`` for a protocol violation (codes: :data:`~shardpool.demo.channel.VIOLATION_CODES`).
It never raises and never crashes the worker, whatever it is given: a violation is a *result* of
the channel (it force-closes), not a failure of the pool.

Optionally each message of a type in ``cost_types`` burns ``cpu_cost_us`` microseconds of real CPU
(chained SHA-256, calibrated once per worker in :meth:`LightningHandler.setup`), modelling the
signature verification a ``commitment_signed`` costs a real node (~50-100 µs per signature).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from typing import Any

import cbor2

from .channel import ChannelState

__all__ = ["AsyncLightningHandler", "AsyncWireLightningHandler", "LightningHandler",
           "WireLightningHandler", "check_delay"]

_sha256 = hashlib.sha256
_CALIBRATION_ITERS = 2_000
_CALIBRATION_ROUNDS = 5


class LightningHandler:
    """Synchronous handler applying BOLT #2 messages to per-channel state.

    Attributes (per worker process, for tests and stats):
        processed: messages applied (valid or not); duplicates excluded.
        violations: messages that were protocol violations.
        duplicates: redelivered messages skipped as already applied.
    """

    def __init__(
        self,
        cpu_cost_us: float = 0.0,
        cost_types: tuple[str, ...] = ("commitment_signed",),
    ) -> None:
        """
        Args:
            cpu_cost_us: CPU time to burn per costly message, in microseconds (>= 0; 0 = none).
            cost_types: the message types that cost ``cpu_cost_us``.

        Raises:
            ValueError: ``cpu_cost_us`` is negative or not finite, or ``cost_types`` is not a
                tuple of strings.
        """
        if not isinstance(cpu_cost_us, (int, float)) or not (
            math.isfinite(cpu_cost_us) and cpu_cost_us >= 0
        ):
            raise ValueError(f"cpu_cost_us must be a finite number >= 0, got {cpu_cost_us!r}")
        if not isinstance(cost_types, tuple) or not all(isinstance(t, str) for t in cost_types):
            raise ValueError(f"cost_types must be a tuple of str, got {cost_types!r}")
        self.cpu_cost_us: float = float(cpu_cost_us)
        self.cost_types: tuple[str, ...] = cost_types
        self._cost_set: frozenset[str] = frozenset(cost_types)
        self._cost_iters: int | None = None  # SHA-256 rounds per costly message; None: uncalibrated
        self._sink: bytes = b""
        self.worker_index: int | None = None
        self.processed: int = 0
        self.violations: int = 0
        self.duplicates: int = 0

    def setup(self, worker_index: int) -> None:
        """Once per worker process, before the first message: calibrate the CPU cost loop
        (a few milliseconds, only when ``cpu_cost_us > 0``). Never raises."""
        self.worker_index = worker_index
        if self.cpu_cost_us > 0:
            self._calibrate()

    def teardown(self) -> None:
        """Once per worker process, after the last message. Holds no resources; never raises."""
        self.worker_index = None

    def _calibrate(self) -> None:
        # The fastest of a few rounds: a round stretched by preemption would over-estimate the
        # per-round time and then burn too little CPU per message.
        best = math.inf
        h = b"\x00" * 32
        for _ in range(_CALIBRATION_ROUNDS):
            t0 = time.perf_counter()
            for _ in range(_CALIBRATION_ITERS):
                h = _sha256(h).digest()
            best = min(best, time.perf_counter() - t0)
        self._sink = h
        per_round_us = max(best, 1e-9) / _CALIBRATION_ITERS * 1e6
        self._cost_iters = max(1, round(self.cpu_cost_us / per_round_us))

    def _burn(self) -> None:
        if self._cost_iters is None:
            self._calibrate()  # setup() was skipped (e.g. a unit test calling handle directly)
        h = self._sink or b"\x00" * 32
        for _ in range(self._cost_iters or 0):
            h = _sha256(h).digest()
        # Keeping the result makes the work observable, like a verification whose result is used.
        self._sink = h

    def handle(
        self, channel: Any, seq: Any, message: Any, redelivered: Any
    ) -> dict[str, Any] | None:
        """Apply ``message`` to ``channel.state``.

        Args:
            channel: an object with ``id`` and a writable ``state`` attribute; a ``state`` that is
                not a :class:`ChannelState` (``None`` at first) is replaced by a fresh one.
            seq: this message's per-channel sequence number (int, strictly increasing).
            message: the decoded message dict (CBOR bytes are decoded here as a courtesy).
            redelivered: true if the pool re-sent it after a worker crash.

        Returns:
            ``None`` if valid or a skipped duplicate; otherwise ``{"violation": code, "type":
            msg_type or None, "seq": seq}``. Never raises: a channel object without a writable
            ``state`` gives the code ``"bad_channel"``, anything else unexpected
            ``"internal_error"``.
        """
        try:
            return self._handle(channel, seq, message, redelivered)
        except Exception:
            # Only a hostile channel object or ``redelivered`` (e.g. a property or __bool__ that
            # raises) gets here; the worker must survive it all the same.
            return {"violation": "internal_error", "type": None,
                    "seq": seq if type(seq) is int else None}

    def snapshot(self, channel: Any) -> bytes | None:
        """The channel's state as CBOR, when the pool moves it to another worker (``None``: none
        yet). Used with ``pool.move_state = "auto"`` (the default) or ``"hooks"``."""
        state = getattr(channel, "state", None)
        return cbor2.dumps(state.to_record()) if type(state) is self.state_type else None

    def restore(self, channel: Any, data: bytes | None) -> None:
        """The state :meth:`snapshot` took on the old worker, on the new one.

        Raises:
            ValueError, KeyError, cbor2.CBORDecodeError: ``data`` is not such a snapshot (the pool
                halts the channel, naming the cause).
        """
        channel.state = None if data is None else self.state_type.from_record(cbor2.loads(data))

    # The state type this handler keeps per channel; a subclass for another wire format replaces
    # it with _new_state and _parse.
    state_type: type[ChannelState] = ChannelState

    def _new_state(self, channel_id: Any) -> ChannelState:
        """A fresh state for a channel first seen. Raises ValueError for an id it cannot take."""
        return ChannelState()

    def _parse(self, message: Any) -> Any:
        """The message as the state machine takes it: CBOR bytes (``payload = "raw"``) are
        decoded; anything undecodable becomes None (``malformed``). Never raises."""
        if isinstance(message, (bytes, bytearray, memoryview)):
            try:
                return cbor2.loads(message)
            except Exception:
                return None
        return message

    def _handle(
        self, channel: Any, seq: Any, message: Any, redelivered: Any
    ) -> dict[str, Any] | None:
        state = getattr(channel, "state", None)
        if type(state) is not self.state_type:
            try:
                state = self._new_state(getattr(channel, "id", None))
            except Exception:
                return {"violation": "bad_channel", "type": None,
                        "seq": seq if type(seq) is int else None}
            try:
                channel.state = state
            except Exception:
                return {"violation": "bad_channel", "type": _type_of(message),
                        "seq": seq if type(seq) is int else None}
        if type(seq) is int:
            if redelivered and seq <= state.last_seq:
                # A crash lost the ack, not the work: this message was applied already.
                self.duplicates += 1
                return None
            if seq > state.last_seq:
                state.last_seq = seq
        message = self._parse(message)
        msg_type = _type_of(message)
        if msg_type is not None and self.cpu_cost_us > 0 and msg_type in self._cost_set:
            self._burn()
        self.processed += 1
        code = state.apply(message)
        if code is None:
            return None
        self.violations += 1
        return {"violation": code, "type": msg_type, "seq": seq if type(seq) is int else None}


def check_delay(delay_s: Any) -> float:
    """``delay_s`` as a float of seconds. Raises ValueError unless it is a finite number >= 0."""
    if not isinstance(delay_s, (int, float)) or not (math.isfinite(delay_s) and delay_s >= 0):
        raise ValueError(f"delay_s must be a finite number >= 0, got {delay_s!r}")
    return float(delay_s)


def _type_of(message: Any) -> str | None:
    if type(message) is dict:
        t = message.get("type")
        if type(t) is str:
            return t
    return None


class AsyncLightningHandler(LightningHandler):
    """:class:`LightningHandler` whose ``handle`` is a coroutine that first awaits
    ``asyncio.sleep(delay_s)`` (modelling I/O, e.g. a database write), so other channels on the
    same worker can run while this one waits. ``delay_s = 0`` still yields to the event loop once.
    """

    def __init__(
        self,
        delay_s: float = 0.0,
        cpu_cost_us: float = 0.0,
        cost_types: tuple[str, ...] = ("commitment_signed",),
    ) -> None:
        """
        Args:
            delay_s: seconds to await before applying each message (>= 0).
            cpu_cost_us, cost_types: as :class:`LightningHandler`.

        Raises:
            ValueError: ``delay_s`` is negative or not finite, or as :class:`LightningHandler`.
        """
        super().__init__(cpu_cost_us, cost_types)
        self.delay_s: float = check_delay(delay_s)

    async def handle(  # type: ignore[override]
        self, channel: Any, seq: Any, message: Any, redelivered: Any
    ) -> dict[str, Any] | None:
        """Await ``delay_s`` seconds, then do what :meth:`LightningHandler.handle` does (same
        arguments and result; never raises except ``asyncio.CancelledError`` when cancelled)."""
        await asyncio.sleep(self.delay_s)
        return LightningHandler.handle(self, channel, seq, message, redelivered)


class WireLightningHandler(LightningHandler):
    """The real Lightning traffic's handler: each message is the BOLT #2 wire encoding
    (:mod:`~shardpool.demo.wire`), parsed here and applied to a
    :class:`~shardpool.demo.real.RealChannelState` (real signature and secret checks). Run it
    with ``pool.payload = "raw"`` (the bytes as the producer sent them) or send each message as a
    CBOR byte string; either way the handler gets the wire bytes. Results and duplicates as
    :class:`LightningHandler`; codes from :data:`~shardpool.demo.real.REAL_VIOLATION_CODES`.
    Never raises; there is no synthetic CPU cost (the work is real)."""

    def __init__(self) -> None:
        super().__init__()
        from .real import RealChannelState

        self.state_type = RealChannelState

    def _new_state(self, channel_id: Any) -> ChannelState:
        from .real import RealChannelState

        return RealChannelState(bytes(channel_id))

    def _parse(self, message: Any) -> Any:
        from . import wire

        if isinstance(message, (bytes, bytearray, memoryview)):
            try:
                return wire.decode(bytes(message))
            except wire.WireError:
                return None
        return message


class AsyncWireLightningHandler(WireLightningHandler):
    """:class:`WireLightningHandler` whose ``handle`` first awaits ``asyncio.sleep(delay_s)``
    (as :class:`AsyncLightningHandler`). Raises ValueError for a negative or non-finite
    ``delay_s``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s: float = check_delay(delay_s)

    async def handle(  # type: ignore[override]
        self, channel: Any, seq: Any, message: Any, redelivered: Any
    ) -> dict[str, Any] | None:
        """Await ``delay_s`` seconds, then :meth:`LightningHandler.handle` (never raises except
        ``asyncio.CancelledError``)."""
        await asyncio.sleep(self.delay_s)
        return LightningHandler.handle(self, channel, seq, message, redelivered)
