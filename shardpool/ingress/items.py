"""Reading one item of a SUBMIT frame: ``[corr, channel_id, payload]`` or the reason it is refused.

The channel id and payload rules are :func:`shardpool.protocol.item_problem`'s, the one check the
clients and the pool use too; this adds what only a frame can get wrong (the item's shape and its
correlation id) and names the item by its position in the frame.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import protocol as P

__all__ = ["Rejection", "item_corr", "read_item"]


class Rejection(NamedTuple):
    """An item's REJECTED reply: ``corr`` (None when the item had no readable one), the error
    code and its message."""

    corr: int | None
    code: str
    message: str


def read_item(item: Any, index: int, max_payload_bytes: int) -> Rejection | None:
    """None if ``item`` (at ``index`` in its frame) is ``[corr, channel_id, payload]`` with a
    correlation id below 2**64, a channel id of 1..64 bytes and a payload of at most
    ``max_payload_bytes`` bytes; else why not. Pure: never raises, whatever ``item`` is."""
    if type(item) is not list or len(item) != 3:
        return Rejection(
            item_corr(item),
            P.E_BAD_ITEM,
            f"item {index} must be an array [corr, channel_id, payload], got {P.describe(item)}",
        )
    corr = item[0]
    if type(corr) is not int or not 0 <= corr <= P.MAX_CORR:
        return Rejection(
            None,
            P.E_BAD_CORR,
            f"item {index}: correlation id must be an unsigned integer below 2**64, got "
            + P.describe(corr),
        )
    problem = P.item_problem(item[1], item[2], max_payload_bytes)
    if problem is not None:
        return Rejection(corr, problem.code, f"item {index}: {problem.message}")
    return None


def item_corr(item: Any) -> int | None:
    """The correlation id of ``item`` if it is a list starting with a valid one, else None."""
    if type(item) is list and item:
        corr = item[0]
        if type(corr) is int and 0 <= corr <= P.MAX_CORR:
            return corr
    return None
