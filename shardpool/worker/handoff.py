"""A worker's side of a slot move: channels leaving (DRAIN → SLOT_STATE, or CANCEL → CANCELLED)
and arriving (INSTALL); see :mod:`shardpool.front.moves` for the whole protocol.

A leaving channel is handed over once it is idle — no call running, no retry waiting, nothing
queued (a halted channel counts as idle: its parked messages are re-sent to the new worker, which
gets the halt with the state). What moves with each channel: its handler state (``channel.state``
as CBOR, or the handler's ``snapshot``/``restore`` hooks, per ``pool.move_state``), the order
checker's next expected seq, and the halt. An arriving state that cannot be restored does not
stop anything else: the channel's next message fails with :class:`StateNotRestored` under the
failure policy (under ``halt`` an operator then resumes — without the state — or skips).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from .. import codec
from ..codec import ToFront
from ..handler import Channel

if TYPE_CHECKING:
    from .dispatch import Dispatcher

__all__ = ["Handoff"]


def _busy(ch: Channel) -> bool:
    """A call (or a retry wait) is running, or messages wait to run (a halted channel's parked
    messages do not count: they stay parked wherever the channel goes)."""
    return ch._busy or (ch._queue is not None and not ch._halted)


class _Leaving:
    """The channels of one move being drained, and which of them still have work."""

    __slots__ = ("members", "_waiting")

    def __init__(self, members: list[Channel]) -> None:
        self.members = members
        self._waiting = [ch for ch in members if _busy(ch)]

    def busy(self) -> bool:
        self._waiting = [ch for ch in self._waiting if _busy(ch)]
        return bool(self._waiting)


class Handoff:
    """The moves one dispatcher takes part in (see the module docstring)."""

    def __init__(self, dispatch: Dispatcher) -> None:
        self.dispatch = dispatch
        self.leaving: dict[int, _Leaving] = {}  # move generation → what is being drained
        # Channels whose moved state could not be restored → why; their next message fails with
        # StateNotRestored under the failure policy (until the policy settles it).
        self.unrestored: dict[bytes, Exception] = {}

    # -- leaving -------------------------------------------------------------------------------

    def on_drain(self, gen: int, slots: list[int], cids: list[bytes], keep: list[bytes]) -> None:
        """DRAIN: once every channel of ``slots`` (or in ``cids``) is idle, send their state
        (SLOT_STATE) and forget them. The front holds their newer messages, so nothing of them
        arrives after this; what arrived before is already queued. Channels in ``keep`` (pinned
        here) stay."""
        slot_set, cid_set, keep_set = frozenset(slots), frozenset(cids), frozenset(keep)
        members = [
            ch
            for ch in self.dispatch.channels.values()
            if (ch._slot in slot_set or ch.id in cid_set) and ch.id not in keep_set
        ]
        self.leaving[gen] = _Leaving(members)
        self.check()

    def check(self) -> None:
        """Answer every drain whose channels are all idle now."""
        d = self.dispatch
        for gen, leave in list(self.leaving.items()):
            if leave.busy():
                continue
            del self.leaving[gen]
            d.acks.flush()  # their acknowledgements go first (one FIFO pipe)
            states, error = self._take_states(leave.members)
            if error is None:
                for ch in leave.members:
                    if d.channels.get(ch.id) is ch:
                        del d.channels[ch.id]
            d.acks.send(ToFront.SLOT_STATE, gen, states, error)

    def on_cancel(self, gen: int) -> None:
        """CANCEL: the front called the move off; keep its channels, say which were running."""
        leave = self.leaving.pop(gen, None)
        busy = [] if leave is None else [ch.id for ch in leave.members if _busy(ch)]
        self.dispatch.acks.send(ToFront.CANCELLED, gen, busy)

    def _take_states(
        self, members: list[Channel]
    ) -> tuple[list[list[Any]], list[Any] | None]:
        """``[cid, state, expect, halted, parked]`` of each channel, or (``[]``, ``[cid, why]``)
        for the first whose state cannot be taken (the move is refused; nothing changes)."""
        states: list[list[Any]] = []
        for ch in members:
            try:
                blob = self._snapshot(ch)
            except Exception as exc:  # noqa: BLE001 - a refused move, reported with the cause
                return [], [ch.id, f"{type(exc).__name__}: {exc}"]
            parked = [entry[0] for entry in ch._queue] if ch._halted and ch._queue else []
            # The parked messages are re-sent to the new worker: expect the first of them.
            expect = ch._queue[0][1] if parked and ch._queue else ch._expect
            states.append([ch.id, blob, expect, ch._halted, parked])
        return states, None

    def _snapshot(self, ch: Channel) -> bytes | None:
        """The handler state of ``ch`` as bytes (None: none).

        Raises:
            TypeError: ``channel.state`` is not CBOR-encodable (``pool.move_state = "cbor"``);
                or whatever the handler's ``snapshot`` hook raises.
        """
        d = self.dispatch
        mode = d.spec.move_state
        if mode == "hooks":
            hook = d.handler.snapshot
            return None if hook is None else hook(ch)
        if mode == "none" or ch.state is None:
            return None
        try:
            return codec.dumps(ch.state)
        except Exception as exc:
            raise TypeError(
                f"channel.state of type {type(ch.state).__name__} is not CBOR-encodable ({exc}); "
                "keep it to CBOR values or give the handler snapshot/restore hooks"
            ) from exc

    # -- arriving ------------------------------------------------------------------------------

    def on_install(self, wseq: int, gen: int, states: list[list[Any]]) -> None:
        """INSTALL (a window entry): restore each channel — its state, the order checker's
        expectation, a halt — before any of its messages, then acknowledge."""
        d = self.dispatch
        if d.run_slot is not None:
            d.run_slot.take(wseq)  # taken in: replayed before what follows it if we die
        for cid, blob, expect, halted, _parked in states:
            ch = d.channels.get(cid) or d.new_channel(cid)
            try:
                self._restore(ch, blob)
            except Exception as exc:  # noqa: BLE001 - reported through the channel's next message
                ch.state = None
                self.unrestored[cid] = exc
                if ch._queue is None:
                    ch._queue = collections.deque()  # off the inline path, into _run_one
            ch._expect = ch._first = expect
            if halted:
                ch._halted = True
                if ch._queue is None:
                    ch._queue = collections.deque()
        d.acks.add_range(wseq, wseq + 1)
        d.acks.flush()

    def _restore(self, ch: Channel, blob: bytes | None) -> None:
        d = self.dispatch
        mode = d.spec.move_state
        if mode == "hooks":
            if d.handler.restore is not None:
                d.handler.restore(ch, blob)
        elif mode == "cbor":
            ch.state = None if blob is None else codec.loads(blob)
