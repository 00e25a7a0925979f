"""Channel id → slot → worker.

``slot = xxh64(channel_id, seed=0) % slots`` and ``worker = table[slot]``. xxh64 is stable across
processes, runs, machines and Python versions (unlike the salted built-in ``hash()``), so a channel
always lands on the same worker for a given slot table. The slot table is the indirection that later
lets the pool move a slot (resize, hot-channel relief) without rehashing every channel: a slot may
only move after its old owner has acknowledged every in-flight message of that slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from .protocol import MAX_CHANNEL_ID_BYTES, check_item

__all__ = ["MAX_CHANNEL_ID_BYTES", "Router", "check_channel_id", "default_slot_table", "slot_of"]

_xxh64 = xxhash.xxh64_intdigest


def check_channel_id(channel_id: object) -> bytes:
    """``channel_id`` as ``bytes`` (a ``bytearray`` or ``memoryview`` is copied) if it is a byte
    string of 1..:data:`MAX_CHANNEL_ID_BYTES` bytes (the rule is
    :func:`shardpool.protocol.item_problem`'s).

    Raises:
        ChannelIdError: wrong type, empty or longer than :data:`MAX_CHANNEL_ID_BYTES`.
    """
    return check_item(channel_id, b"", None)[0]


def slot_of(channel_id: bytes, slots: int) -> int:
    """The slot of ``channel_id`` among ``slots`` slots (stable everywhere)."""
    return _xxh64(channel_id) % slots


def default_slot_table(slots: int, workers: int) -> tuple[int, ...]:
    """Spread ``slots`` slots over ``workers`` workers round-robin (slot ``s`` → worker
    ``s % workers``)."""
    if slots < 1 or workers < 1:
        raise ValueError(f"need slots >= 1 and workers >= 1, got slots={slots}, workers={workers}")
    return tuple(s % workers for s in range(slots))


class Router:
    """Maps channel ids to worker indexes through a fixed slot count and a slot table.

    The slot count never changes (it would move every channel); the table does, one slot at a
    time, when the pool moves a slot (and only once its old owner has finished every message of
    it, see :mod:`shardpool.front.moves`).
    """

    __slots__ = ("slots", "table")

    def __init__(self, slots: int, workers: int, table: Sequence[int] | None = None) -> None:
        """Raises ValueError if ``table`` has the wrong length or names a worker outside
        0..workers-1."""
        self.slots = slots
        if table is None:
            table = default_slot_table(slots, workers)
        if len(table) != slots:
            raise ValueError(f"slot table has {len(table)} entries, expected {slots}")
        bad = [w for w in table if not 0 <= w < workers]
        if bad:
            raise ValueError(f"slot table names worker {bad[0]}, allowed 0..{workers - 1}")
        self.table: list[int] = list(table)

    def slot_of(self, channel_id: bytes) -> int:
        """The slot of ``channel_id`` (assumed already checked)."""
        return _xxh64(channel_id) % self.slots

    def worker_of(self, channel_id: bytes) -> int:
        """Worker index for ``channel_id`` (assumed already checked)."""
        return self.table[_xxh64(channel_id) % self.slots]

    def slots_of(self, worker: int) -> list[int]:
        """The slots ``worker`` owns."""
        return [s for s, w in enumerate(self.table) if w == worker]
