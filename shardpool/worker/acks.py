"""What a worker tells its front about finished work: one ACK frame per event-loop turn.

An ACK names what finished — wseq ranges whose handler returned None, results with their values,
failures with their traceback and the action taken — and the channels the worker dropped, in the
same frame as their last acknowledgements (see :mod:`shardpool.codec`). Completions of many
channels in one loop iteration share one frame.
"""

from __future__ import annotations

import asyncio
import traceback
from typing import Any, Protocol

from .. import codec
from ..codec import Action, ToFront

__all__ = ["Acks", "Sender", "failure_entry"]


class Sender(Protocol):
    """The worker's PUSH socket towards the front (or a stand-in in tests)."""

    def send(self, data: bytes) -> Any: ...


def failure_entry(wseq: int, exc: BaseException, action: Action) -> list[Any]:
    """``[wseq, exc_type, message, traceback, action]`` for a failed message."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return [wseq, type(exc).__qualname__, str(exc), tb, action]


class Acks:
    """The acknowledgements not sent yet, and the socket they go out on.

    ``ranges``, ``results``, ``failures`` and ``forgotten`` are the fields of the next ACK frame;
    the dispatch hot path extends ``ranges`` directly.
    """

    def __init__(self, index: int, epoch: int, push: Sender | None = None) -> None:
        self.index = index
        self.epoch = epoch
        self.push = push
        self.ranges: list[int] = []
        self.results: list[list[Any]] = []
        self.failures: list[list[Any]] = []
        self.forgotten: list[list[Any]] = []  # [cid, next cseq] of channels dropped
        self.unencodable = 0  # results that could not be encoded (each became a failure)
        self._scheduled = False

    def add_range(self, a: int, b: int) -> None:
        """wseqs ``a``..``b-1`` finished with a None result."""
        if a == b:
            return
        ranges = self.ranges
        if ranges and ranges[-1] == a:
            ranges[-1] = b
        else:
            ranges.append(a)
            ranges.append(b)

    def complete(self, wseq: int, result: Any) -> None:
        """One message finished (off the inline path); sent with the next loop turn."""
        if result is None:
            self.add_range(wseq, wseq + 1)
        else:
            self.results.append([wseq, result])
        self.schedule()

    def fail(self, wseq: int, exc: BaseException, action: Action) -> None:
        self.failures.append(failure_entry(wseq, exc, action))
        self.schedule()

    def skipped(self, wseq: int) -> None:
        """An operator skipped this message on its halted channel."""
        self.failures.append(codec.operator_skip(wseq))
        self.schedule()

    def schedule(self) -> None:
        # Completions of many channels in one loop iteration share one ACK frame.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send what is due as one ACK frame (nothing when nothing is)."""
        self._scheduled = False
        if not (self.ranges or self.results or self.failures or self.forgotten):
            return
        frame = [
            ToFront.ACK,
            self.index,
            self.epoch,
            self.ranges,
            self.results,
            self.failures,
            self.forgotten,
        ]
        try:
            data = codec.dumps(frame)
        except Exception:  # noqa: BLE001 - one unencodable result must not lose the others
            data = codec.dumps(self._sanitised(frame))
        self.ranges = []
        self.results = []
        self.failures = []
        self.forgotten = []
        assert self.push is not None
        self.push.send(data)

    def _sanitised(self, frame: list[Any]) -> list[Any]:
        """Turn results that CBOR cannot encode into failures of their own message."""
        results = []
        for wseq, value in frame[4]:
            try:
                codec.dumps(value)
            except Exception as exc:  # noqa: BLE001
                self.unencodable += 1
                frame[5].append(
                    failure_entry(
                        wseq,
                        TypeError(f"handler result is not CBOR-encodable: {exc}"),
                        Action.SKIP,
                    )
                )
            else:
                results.append([wseq, value])
        frame[4] = results
        return frame

    def send(self, kind: codec.ToFront, *fields: Any) -> None:
        """Send a cold frame ``[kind, worker, epoch, *fields]``."""
        assert self.push is not None
        self.push.send(codec.frame(kind, self.index, self.epoch, *fields))
