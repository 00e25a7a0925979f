"""The worker's dispatch in-process (no sockets, no processes): order checks, epochs, acks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import cbor2
import zmq

from shardpool import codec
from shardpool.codec import ToFront, ToWorker
from shardpool.handler import load_handler
from shardpool.worker import NO_MESSAGE, Dispatcher, RunSlot, Worker, WorkerSpec


class FakePush:
    def __init__(self) -> None:
        self.frames: list[list[Any]] = []

    def send(self, data: bytes) -> None:
        self.frames.append(codec.loads(data))


class FakePull:
    """The serve loop's socket with frames waiting (the test ends them with a STOP frame)."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = list(frames)

    def recv(self, flags: int = 0) -> bytes:
        if not self.frames:
            raise zmq.Again()
        return self.frames.pop(0)

    def getsockopt(self, option: int) -> int:
        assert option == zmq.EVENTS, "the serve loop only waits once nothing is left"
        return zmq.POLLIN if self.frames else 0


class W:
    """A worker incarnation without sockets: ``worker`` (the serve loop, stop requests) and its
    ``d`` (dispatcher); every frame it sends lands in ``push.frames``."""

    def __init__(self, handler: Any, epoch: int, **spec: Any) -> None:
        self.worker = Worker(
            WorkerSpec(
                index=0, epoch=epoch, data_endpoint="", front_endpoint="", handler=handler, **spec
            )
        )
        self.push = FakePush()
        self.worker.acks.push = self.push  # type: ignore[assignment]
        self.d = self.worker.dispatch = Dispatcher(
            self.worker.spec, load_handler(handler), self.worker.acks, self.worker.stop
        )


def make_worker(handler: Any, epoch: int = 1, **spec: Any) -> tuple[Dispatcher, FakePush]:
    w = W(handler, epoch, **spec)
    return w.d, w.push


def seen_handler(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    channel.state = (channel.state or []) + [seq]
    return None


def batch(
    epoch: int, first: int, items: list[tuple[bytes, int, Any]], redelivered: bool = False
) -> bytes:
    return codec.encode_batch(
        epoch, first, redelivered, [(c, s, cbor2.dumps(m)) for c, s, m in items]
    )


def test_in_order_messages_are_acked_as_one_range() -> None:
    w, push = make_worker(seen_handler)
    w.on_batch(codec.loads(batch(1, 10, [(b"a", 0, 1), (b"b", 0, 1), (b"a", 1, 1)])))
    assert push.frames == [[ToFront.ACK, 0, 1, [10, 13], [], [], []]]
    assert w.channels[b"a"].state == [0, 1]
    assert w.counters["processed"] == 3


def test_order_violations_are_counted_by_kind() -> None:
    w, _ = make_worker(seen_handler)
    # a: 0, 1, 3 (gap), 3 (duplicate), 1 (reorder)
    w.on_batch(
        codec.loads(
            batch(1, 0, [(b"a", 0, 0), (b"a", 1, 0), (b"a", 3, 0), (b"a", 3, 0), (b"a", 1, 0)])
        )
    )
    assert (w.counters["gaps"], w.counters["duplicates"], w.counters["reorders"]) == (1, 1, 1)


def test_first_message_of_a_new_incarnation_sets_the_baseline() -> None:
    # After a restart a channel's first message may be seq 40: not a gap.
    w, _ = make_worker(seen_handler, epoch=2)

    async def main() -> None:
        await w.careful_batch(
            codec.loads(batch(2, 0, [(b"a", 40, 0), (b"a", 41, 0)], redelivered=True))
        )

    asyncio.run(main())
    assert (w.counters["gaps"], w.counters["redelivered"]) == (0, 2)
    assert w.channels[b"a"].state == [40, 41]


def test_frames_of_another_epoch_are_never_processed() -> None:
    w = W(seen_handler, epoch=2)
    frames = [
        batch(1, 0, [(b"old", 0, 0)]),  # a dead incarnation's frame
        b"\xff\xfe not cbor",
        batch(2, 0, [(b"new", 0, 0)]),
        codec.dumps([ToWorker.STOP, 2]),
    ]
    asyncio.run(w.worker.serve(FakePull(frames)))
    assert b"old" not in w.d.channels and b"new" in w.d.channels
    stats = w.worker.stats()
    assert (stats["stale_frames"], stats["bad_frames"]) == (1, 1)
    assert w.push.frames == [[ToFront.ACK, 0, 2, [0, 1], [], [], []]]


def fail_b(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    if channel.id == b"b":
        raise KeyError("boom")
    return seq


def test_skip_policy_reports_the_failure_and_acks_the_rest() -> None:
    w, push = make_worker(fail_b, failure_policy="skip")

    async def main() -> None:
        w.on_batch(codec.loads(batch(1, 0, [(b"a", 0, 0), (b"b", 0, 0), (b"a", 1, 0)])))

    asyncio.run(main())
    [ack] = push.frames
    assert ack[3] == [] and ack[4] == [[0, 0], [2, 1]]
    [(wseq, exc_type, message, tb, action)] = ack[5]
    assert (wseq, exc_type, action) == (1, "KeyError", "skip") and "boom" in message
    assert "raise KeyError" in tb


def test_halt_policy_parks_the_channel_and_queues_its_later_messages() -> None:
    async def main() -> tuple[Dispatcher, FakePush]:
        w, push = make_worker(fail_b, failure_policy="halt")
        w.on_batch(codec.loads(batch(1, 0, [(b"b", 0, 0), (b"a", 0, 0), (b"b", 1, 0)])))
        assert w.channels[b"b"]._halted and len(w.channels[b"b"]._queue) == 2
        w.on_control("skip", b"b")  # skips seq 0, then seq 1 fails and halts again
        await asyncio.sleep(0)  # sleep-ok - let the drain task take one step
        await asyncio.sleep(0)  # sleep-ok
        return w, push

    w, push = asyncio.run(main())
    actions = [f[4] for frame in push.frames for f in frame[5]]
    assert actions == ["halt", "skipped", "halt"]
    assert w.channels[b"b"]._halted and [i[1] for i in w.channels[b"b"]._queue] == [1]


def unencodable(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    return object() if seq == 1 else seq


def test_unencodable_result_fails_only_its_own_message() -> None:
    w, push = make_worker(unencodable)
    w.on_batch(codec.loads(batch(1, 0, [(b"a", 0, 0), (b"a", 1, 0), (b"a", 2, 0)])))
    [ack] = push.frames
    assert ack[4] == [[0, 0], [2, 2]]
    assert [(f[0], f[1], f[4]) for f in ack[5]] == [(1, "TypeError", "skip")]


def test_forged_item_without_an_integer_seq_is_skipped_not_fatal() -> None:
    w, push = make_worker(seen_handler)
    frame = codec.dumps(
        [
            ToWorker.BATCH,
            1,
            0,
            False,
            [b"a", 0, cbor2.dumps(0)],
            [b"a", "x", b"\xa0"],
            [b"a", 1, cbor2.dumps(0)],
        ]
    )
    w.on_batch(codec.loads(frame))
    assert w.counters["bad_frames"] == 1
    assert w.channels[b"a"].state == [0, 1]
    assert push.frames == [[ToFront.ACK, 0, 1, [0, 1, 2, 3], [], [], []]]


# -- careful replay, stop requests, forgetting channels -----------------------------------------


class SlotWatcher:
    """An async handler that records, for each call, the run slot's value and how many calls were
    running at the time (a careful replay must show exactly one: its own)."""

    def __init__(self, slot: RunSlot) -> None:
        self.slot = slot
        self.running = 0
        self.seen: list[tuple[int, int, int]] = []  # (seq, slot value, calls running)

    async def handle(self, channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
        self.running += 1
        self.seen.append((seq, self.slot.read()[1], self.running))
        await asyncio.sleep(0)  # sleep-ok - a handler awaiting: others could run now
        self.running -= 1
        return None


def test_careful_replay_runs_one_call_at_a_time_recording_each_in_the_run_slot(
    tmp_path: Path,
) -> None:
    slot = RunSlot(str(tmp_path / "run"), create=True)
    watcher = SlotWatcher(slot)
    w, push = make_worker(watcher, epoch=3)
    w.run_slot = slot

    async def main() -> None:
        items = [(b"a", 5, 0), (b"b", 7, 0), (b"a", 6, 0), (b"c", 0, 0)]
        await w.careful_batch(codec.loads(batch(3, 100, items, redelivered=True)))
        await asyncio.sleep(0)  # sleep-ok - let the scheduled acknowledgement go out

    asyncio.run(main())
    assert watcher.seen == [(5, 100, 1), (7, 101, 1), (6, 102, 1), (0, 103, 1)]
    assert slot.read() == (103, NO_MESSAGE)  # all taken in; nothing running after the last call
    acked = [
        w
        for f in push.frames
        if f[0] == ToFront.ACK
        for a, b in zip(f[3][::2], f[3][1::2], strict=False)
        for w in range(a, b)
    ]
    assert sorted(acked) == [100, 101, 102, 103]
    slot.close()


def test_a_normal_batch_is_taken_in_whole_before_its_first_call(tmp_path: Path) -> None:
    slot = RunSlot(str(tmp_path / "run"), create=True)
    seen: list[tuple[int, int]] = []
    w, _ = make_worker(lambda ch, seq, m, r: seen.append(slot.read()))
    w.run_slot = slot
    w.on_batch(codec.loads(batch(1, 7, [(b"a", 0, 0), (b"a", 1, 0)])))
    # The front may treat wseqs 7..8 as possibly run, anything after as never read; normal
    # batches leave the running slot alone (it names messages of careful replays only).
    assert seen == [(8, NO_MESSAGE), (8, NO_MESSAGE)]
    slot.close()


def test_a_stop_request_mid_batch_stops_after_the_call_in_progress() -> None:
    calls: list[int] = []
    w: W

    def handler(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
        calls.append(seq)
        if seq == 2:
            w.worker.note_stop(15, None)  # SIGTERM arrives while this call runs
        return None

    w = W(handler, epoch=1)
    w.d.on_batch(codec.loads(batch(1, 10, [(b"a", i, 0) for i in range(6)])))
    assert calls == [0, 1, 2]
    # Only what ran is acknowledged; 13..15 were never handed to the handler.
    assert w.push.frames == [[ToFront.ACK, 0, 1, [10, 13], [], [], []]]
    assert w.d.counters["processed"] == 3


def test_stop_report_names_the_running_calls_and_nothing_new_starts(tmp_path: Path) -> None:
    gate_a, gate_b = str(tmp_path / "a"), str(tmp_path / "b")

    async def main() -> tuple[Dispatcher, FakePush]:
        w = W("handlers:gated", epoch=1)
        items = [
            (b"a", 0, {"gate": gate_a}),
            (b"a", 1, {}),
            (b"b", 0, {"gate": gate_b}),
            (b"b", 1, {}),
        ]
        w.d.on_batch(codec.loads(batch(1, 0, items)))
        await asyncio.sleep(0)  # sleep-ok - let the channel tasks start their calls
        w.worker.on_stop_request()
        open(gate_b, "w").close()  # b's running call may now finish; a's stays blocked
        await asyncio.wait_for(_until(lambda: not w.d.channels[b"b"]._busy), 5.0)
        return w.d, w.push

    w, push = asyncio.run(main())
    [stopping] = [f for f in push.frames if f[0] == ToFront.STOPPING]
    assert sorted(stopping[3]) == [0, 2]  # a seq 0 and b seq 0 were running
    results = [r for f in push.frames if f[0] == ToFront.ACK for r in f[4]]
    assert results == [[2, [0, None]]]  # b seq 0 finished and was acknowledged ...
    assert [i[1] for i in w.channels[b"b"]._queue] == [1]  # ... and b seq 1 never started
    assert [i[1] for i in w.channels[b"a"]._queue] == [0, 1]  # a is still in its call


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.002)  # sleep-ok - polled under the caller's wait_for deadline


def ending(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    channel.state = (channel.state or 0) + 1
    if message == "end":
        channel.end()
    return None


def test_an_ended_channel_is_dropped_once_its_last_message_is_done() -> None:
    w, push = make_worker(ending)
    w.on_batch(
        codec.loads(batch(1, 0, [(b"a", 0, 0), (b"a", 1, "end"), (b"a", 2, 0), (b"b", 0, 0)]))
    )
    assert b"a" not in w.channels and w.channels[b"b"].state == 1
    [ack] = push.frames
    assert ack[0] == ToFront.ACK and ack[3] == [0, 4]
    assert ack[6] == [[b"a", 3]]  # with its last acknowledgement
    # The channel's next message starts a fresh record: no state, and no gap counted.
    w.on_batch(codec.loads(batch(1, 4, [(b"a", 0, 0)])))
    assert w.channels[b"a"].state == 1
    assert (w.counters["gaps"], w.counters["reorders"], w.counters["forgotten"]) == (0, 0, 1)


def test_idle_sweep_forgets_only_idle_stateless_unhalted_channels() -> None:
    def handler(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
        if message == "keep":
            channel.state = "kept"
        if message == "fail":
            raise ValueError("halt me")
        return None

    async def main() -> tuple[Dispatcher, FakePush]:
        w = W(handler, epoch=1, channel_idle_expiry_s=0.04)
        w.d.on_batch(
            codec.loads(
                batch(1, 0, [(b"idle", 0, 0), (b"stateful", 0, "keep"), (b"halted", 0, "fail")])
            )
        )
        sweep = asyncio.get_running_loop().create_task(w.worker._sweep(0.04))
        deadline = asyncio.get_running_loop().time() + 5.0
        while b"idle" in w.d.channels and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)  # sleep-ok - the sweep runs on its own timer
        sweep.cancel()
        return w.d, w.push

    w, push = asyncio.run(main())
    assert b"idle" not in w.channels
    assert set(w.channels) == {b"stateful", b"halted"}
    assert [f[6] for f in push.frames if f[6]] == [[[b"idle", 1]]]
