"""Batch frames: what the front builds and the worker decodes, next to the bare harness's form.

Every benchmark handles one batch of 256 messages (~190-byte payloads): divide by 256 for the cost
per message.
"""

from __future__ import annotations

from typing import Any

import cbor2

from shardpool import codec


def _front_parts(batch: list[tuple[bytes, bytes]]) -> tuple[list[bytes], list[bytes]]:
    prefixes = [codec.item_prefix(cid) for cid, _ in batch]  # cached per channel by the front
    return prefixes, [p for _, p in batch]


def test_encode_batch_front_style(benchmark: Any, batch: list[tuple[bytes, bytes]]) -> None:
    """The front's way: cached item prefix + fixed-width head + payload bytes, one join."""
    prefixes, payloads = _front_parts(batch)
    head = codec.ITEM_HEAD

    def build() -> bytes:
        parts: list[bytes] = [b""]
        for cseq, (prefix, payload) in enumerate(zip(prefixes, payloads, strict=True)):
            parts += (prefix, head(0x1B, cseq, 0x5A, len(payload)), payload)
        parts[0] = codec.batch_header(1, 0, False, len(payloads))
        return b"".join(parts)

    frame = benchmark(build)
    assert len(codec.loads(frame)) == 4 + len(batch)
    benchmark.extra_info["messages"] = len(batch)


def test_encode_batch_simple_path(benchmark: Any, batch: list[tuple[bytes, bytes]]) -> None:
    """``codec.encode_batch`` (used for replays): builds each item's prefix anew."""
    items = [(cid, i, p) for i, (cid, p) in enumerate(batch)]
    benchmark.extra_info["messages"] = len(batch)
    benchmark(codec.encode_batch, 1, 0, True, items)


def test_encode_batch_bare_flat(benchmark: Any, batch: list[tuple[bytes, bytes]]) -> None:
    """The bare harness's frame: ``cbor2.dumps`` of the flat ``[cid, payload, ...]`` list."""
    flat: list[bytes] = []
    for cid, p in batch:
        flat += (cid, p)
    benchmark.extra_info["messages"] = len(batch)
    benchmark(cbor2.dumps, flat)


def test_decode_batch_pool(benchmark: Any, batch: list[tuple[bytes, bytes]]) -> None:
    """The worker's frame decode (payloads stay bytes)."""
    frame = codec.encode_batch(1, 0, False, [(cid, i, p) for i, (cid, p) in enumerate(batch)])
    benchmark.extra_info["messages"] = len(batch)
    assert len(benchmark(codec.loads, frame)) == 4 + len(batch)


def test_decode_batch_bare_flat(benchmark: Any, batch: list[tuple[bytes, bytes]]) -> None:
    flat: list[bytes] = []
    for cid, p in batch:
        flat += (cid, p)
    frame = cbor2.dumps(flat)
    benchmark.extra_info["messages"] = len(batch)
    benchmark(cbor2.loads, frame)


def test_decode_256_payloads(benchmark: Any, batch: list[tuple[bytes, bytes]]) -> None:
    """Decoding each ~190-byte payload: what a handler with ``payload = "cbor"`` costs first."""
    payloads = [p for _, p in batch]
    loads = cbor2.loads
    benchmark.extra_info["messages"] = len(batch)
    benchmark(lambda: [loads(p) for p in payloads])
