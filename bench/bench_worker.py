"""Worker dispatch in-process (no sockets): one decoded batch of 256 messages through
``Dispatcher.on_batch`` (order check, per-channel bookkeeping, handler call, ack ranges)."""

from __future__ import annotations

import itertools
from typing import Any

from shardpool import codec
from shardpool.bench.handlers import noop
from shardpool.demo.handler import LightningHandler
from shardpool.demo.traffic import generate
from shardpool.handler import load_handler
from shardpool.worker import Acks, Dispatcher, WorkerSpec


class _Sink:
    """Stands in for the worker's PUSH socket: the ACK frame is built, then dropped."""

    def send(self, data: bytes) -> None:
        pass


def _worker(handler: Any, decode: bool) -> Dispatcher:
    spec = WorkerSpec(index=0, epoch=1, data_endpoint="", front_endpoint="",
                      handler=handler, payload="cbor" if decode else "raw")
    return Dispatcher(spec, load_handler(handler), Acks(0, 1, _Sink()), [])


def _frames(batch: list[tuple[bytes, bytes]]) -> Any:
    """Endless decoded BATCH frames with per-channel seqs that keep counting up, so the
    worker's order check sees a valid stream in every round."""
    seqs: dict[bytes, itertools.count[int]] = {}
    wseq = itertools.count(0, len(batch))
    while True:
        items = [(cid, next(seqs.setdefault(cid, itertools.count())), p) for cid, p in batch]
        yield codec.loads(codec.encode_batch(1, next(wseq), False, items))


def test_dispatch_256_noop_with_payload_decode(benchmark: Any,
                                               batch: list[tuple[bytes, bytes]]) -> None:
    w = _worker(noop, decode=True)
    frames = _frames(batch)
    benchmark.extra_info["messages"] = len(batch)
    benchmark.pedantic(w.on_batch, setup=lambda: ((next(frames),), {}), rounds=300)
    assert w.counters["gaps"] == w.counters["reorders"] == 0


def test_dispatch_256_noop_raw(benchmark: Any, batch: list[tuple[bytes, bytes]]) -> None:
    """``payload = "raw"``: the handler gets the bytes; the dispatch overhead alone."""
    w = _worker(noop, decode=False)
    frames = _frames(batch)
    benchmark.extra_info["messages"] = len(batch)
    benchmark.pedantic(w.on_batch, setup=lambda: ((next(frames),), {}), rounds=300)


def test_lightning_handler_256_messages(benchmark: Any) -> None:
    """The demo state machine alone, no pool: 256 valid messages of a seeded stream."""
    stream = generate(20, 10, 256 * 200, 1)
    chunks = iter([stream[i : i + 256] for i in range(0, len(stream), 256)])
    handler = LightningHandler()

    class Chan:
        __slots__ = ("id", "state")

    chans: dict[bytes, Chan] = {}
    seqs: dict[bytes, int] = {}

    def run(chunk: list[tuple[bytes, Any]]) -> None:
        for cid, msg in chunk:
            ch = chans.get(cid)
            if ch is None:
                ch = chans[cid] = Chan()
                ch.id, ch.state = cid, None
            seq = seqs.get(cid, 0)
            seqs[cid] = seq + 1
            assert handler.handle(ch, seq, msg, False) is None

    benchmark.extra_info["messages"] = 256
    benchmark.pedantic(run, setup=lambda: ((next(chunks),), {}), rounds=150)
