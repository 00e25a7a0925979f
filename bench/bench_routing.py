"""Routing: channel id → slot → worker, per message on the front's hot path."""

from __future__ import annotations

from typing import Any

from shardpool.routing import Router, check_channel_id, slot_of


def test_route_256_ids(benchmark: Any, batch: list[tuple[bytes, bytes]]) -> None:
    """xxh64 + modulo + slot-table lookup for 256 ids (÷256 for one message)."""
    router = Router(4096, 8)
    ids = [cid for cid, _ in batch]
    worker_of = router.worker_of

    def route() -> int:
        total = 0
        for cid in ids:
            total += worker_of(cid)
        return total

    benchmark.extra_info["messages"] = len(ids)
    assert benchmark(route) >= 0


def test_slot_of_256_ids(benchmark: Any, batch: list[tuple[bytes, bytes]]) -> None:
    ids = [cid for cid, _ in batch]
    benchmark.extra_info["messages"] = len(ids)
    benchmark(lambda: [slot_of(cid, 4096) for cid in ids])


def test_check_channel_id_256(benchmark: Any, batch: list[tuple[bytes, bytes]]) -> None:
    """The validation a channel's first message pays (the front caches it afterwards)."""
    ids = [cid for cid, _ in batch]
    benchmark.extra_info["messages"] = len(ids)
    benchmark(lambda: [check_channel_id(cid) for cid in ids])
