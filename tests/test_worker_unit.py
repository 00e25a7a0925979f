"""The worker's dispatch in-process (no sockets, no processes): order checks, epochs, acks."""

from __future__ import annotations

import asyncio
from typing import Any

import cbor2

from shardpool import codec
from shardpool.handler import load_handler
from shardpool.worker import Worker, WorkerSpec


class FakePush:
    def __init__(self) -> None:
        self.frames: list[list[Any]] = []

    def send(self, data: bytes) -> None:
        self.frames.append(codec.loads(data))


class FakePull:
    def __init__(self, frames: list[bytes]) -> None:
        self.frames = list(frames)

    async def recv(self) -> bytes:
        return self.frames.pop(0)


def make_worker(handler: Any, epoch: int = 1, **spec: Any) -> tuple[Worker, FakePush]:
    w = Worker(WorkerSpec(index=0, epoch=epoch, data_endpoint="", front_endpoint="", handler=handler, **spec))
    w.handler = load_handler(handler)
    push = FakePush()
    w.push = push  # type: ignore[assignment]
    return w, push


def seen_handler(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    channel.state = (channel.state or []) + [seq]
    return None


def batch(epoch: int, first: int, items: list[tuple[bytes, int, Any]], redelivered: bool = False) -> bytes:
    return codec.encode_batch(epoch, first, redelivered, [(c, s, cbor2.dumps(m)) for c, s, m in items])


def test_in_order_messages_are_acked_as_one_range() -> None:
    w, push = make_worker(seen_handler)
    w._on_batch(codec.loads(batch(1, 10, [(b"a", 0, 1), (b"b", 0, 1), (b"a", 1, 1)])))
    assert push.frames == [[codec.ACK, 0, 1, [10, 13], [], []]]
    assert w.channels[b"a"].state == [0, 1]
    assert w.counters["processed"] == 3


def test_order_violations_are_counted_by_kind() -> None:
    w, _ = make_worker(seen_handler)
    # a: 0, 1, 3 (gap), 3 (duplicate), 1 (reorder)
    w._on_batch(codec.loads(batch(1, 0, [(b"a", 0, 0), (b"a", 1, 0), (b"a", 3, 0), (b"a", 3, 0), (b"a", 1, 0)])))
    assert (w.counters["gaps"], w.counters["duplicates"], w.counters["reorders"]) == (1, 1, 1)


def test_first_message_of_a_new_incarnation_sets_the_baseline() -> None:
    # After a restart a channel's first message may be seq 40: not a gap.
    w, _ = make_worker(seen_handler, epoch=2)
    w._on_batch(codec.loads(batch(2, 0, [(b"a", 40, 0), (b"a", 41, 0)], redelivered=True)))
    assert (w.counters["gaps"], w.counters["redelivered"]) == (0, 2)


def test_frames_of_another_epoch_are_never_processed() -> None:
    w, push = make_worker(seen_handler, epoch=2)
    frames = [
        batch(1, 0, [(b"old", 0, 0)]),  # a dead incarnation's frame
        b"\xff\xfe not cbor",
        batch(2, 0, [(b"new", 0, 0)]),
        codec.dumps([codec.STOP, 2]),
    ]
    asyncio.run(w._serve(FakePull(frames)))  # type: ignore[arg-type]
    assert b"old" not in w.channels and b"new" in w.channels
    assert (w.counters["stale_frames"], w.counters["bad_frames"]) == (1, 1)
    assert push.frames == [[codec.ACK, 0, 2, [0, 1], [], []]]


def fail_b(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    if channel.id == b"b":
        raise KeyError("boom")
    return seq


def test_skip_policy_reports_the_failure_and_acks_the_rest() -> None:
    w, push = make_worker(fail_b, failure_policy="skip")

    async def main() -> None:
        w._on_batch(codec.loads(batch(1, 0, [(b"a", 0, 0), (b"b", 0, 0), (b"a", 1, 0)])))

    asyncio.run(main())
    [ack] = push.frames
    assert ack[3] == [] and ack[4] == [[0, 0], [2, 1]]
    [(wseq, exc_type, message, tb, action)] = ack[5]
    assert (wseq, exc_type, action) == (1, "KeyError", "skip") and "boom" in message
    assert "raise KeyError" in tb


def test_halt_policy_parks_the_channel_and_queues_its_later_messages() -> None:
    async def main() -> tuple[Worker, FakePush]:
        w, push = make_worker(fail_b, failure_policy="halt")
        w._idle = asyncio.Event()
        w._on_batch(codec.loads(batch(1, 0, [(b"b", 0, 0), (b"a", 0, 0), (b"b", 1, 0)])))
        assert w.channels[b"b"]._halted and len(w.channels[b"b"]._queue) == 2
        w._on_control("skip", b"b")  # skips seq 0, then seq 1 fails and halts again
        await asyncio.sleep(0)  # noqa: sleep-ok - let the drain task take one step
        await asyncio.sleep(0)  # noqa: sleep-ok
        return w, push

    w, push = asyncio.run(main())
    actions = [f[4] for frame in push.frames for f in frame[5]]
    assert actions == ["halt", "skipped", "halt"]
    assert w.channels[b"b"]._halted and [i[1] for i in w.channels[b"b"]._queue] == [1]


def unencodable(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    return object() if seq == 1 else seq


def test_unencodable_result_fails_only_its_own_message() -> None:
    w, push = make_worker(unencodable)
    w._on_batch(codec.loads(batch(1, 0, [(b"a", 0, 0), (b"a", 1, 0), (b"a", 2, 0)])))
    [ack] = push.frames
    assert ack[4] == [[0, 0], [2, 2]]
    assert [(f[0], f[1], f[4]) for f in ack[5]] == [(1, "TypeError", "skip")]


def test_forged_item_without_an_integer_seq_is_skipped_not_fatal() -> None:
    w, push = make_worker(seen_handler)
    frame = codec.dumps([codec.BATCH, 1, 0, False, [b"a", 0, cbor2.dumps(0)], [b"a", "x", b"\xa0"],
                         [b"a", 1, cbor2.dumps(0)]])
    w._on_batch(codec.loads(frame))
    assert w.counters["bad_frames"] == 1
    assert w.channels[b"a"].state == [0, 1]
    assert push.frames == [[codec.ACK, 0, 1, [0, 1, 2, 3], [], []]]
