"""The ingress wire protocol between producers and ``shardpool run`` (version 1).

Producers connect a ZeroMQ DEALER socket to the backend's ROUTER ingress socket. Every message is a
single ZeroMQ frame holding one CBOR array whose first element is the protocol version::

    producer → backend
        [1, SUBMIT, [[corr, channel_id, payload], ...]]   a batch, in the producer's order
        [1, HELLO, token]                                  handshake / barrier

    backend → producer
        [1, REPLIES, [[corr, status, value], ...]]         outcomes, in per-channel order
        [1, HELLO, token, {"version": 1, "max_message_bytes": n, "max_items": n, "pid": n}]
        [1, ERROR, {"error": code, "message": text}]       a frame that could not be read at all

* ``corr`` is the producer's correlation id, an unsigned integer below 2**64 of its choosing
  (the client numbers messages 0, 1, 2, ...); the backend only echoes it.
* ``channel_id`` is a CBOR byte string of 1..64 bytes, ``payload`` a byte string of at most
  ``transport.max_message_bytes`` bytes holding the CBOR-encoded message (or raw bytes with
  ``pool.payload = "raw"``); the backend forwards it without decoding it.
* ``status`` is one of :data:`OK` (``value`` is the handler's return value), :data:`FAILED` (the
  handler raised; ``value`` is ``{"error": "handler_failed", "type", "message", "seq",
  "policy"}``), :data:`REJECTED` (refused at the door, never processed; ``value`` is ``{"error":
  code, "message": text, "index": i}`` where ``i`` is the item's position in its frame, and
  ``corr`` is None when the item had no readable correlation id), :data:`CLOSED` (accepted but
  handed back at shutdown, never given to the handler: safe to send again), :data:`IN_DOUBT`
  (accepted, and the backend stopped while the handler may have been running it: it may or may
  not have been applied) and :data:`HALTED` (not final: the handler failed under the ``halt``
  policy, or its worker kept dying on it, and the channel is parked until an operator resumes or
  skips it; the message's final reply follows then).

Every item of a SUBMIT frame gets exactly one final reply (OK, FAILED, REJECTED, CLOSED or
IN_DOUBT); a frame
that cannot be read as a SUBMIT or HELLO gets one ERROR reply and nothing in it is processed.
Replies to accepted messages of one channel come back in the order the messages were accepted;
rejections are immediate, since a rejected message never took a place in its channel's order.
A HELLO is answered after every reply that was ready before it, so a producer may use it as a
barrier. An empty frame is reserved (ZeroMQ uses empty frames for peer notifications) and should
not be sent; it is answered with an ERROR like any other unreadable frame.
"""

from __future__ import annotations

from typing import Any, Final

import cbor2

__all__ = [
    "CLOSED",
    "ERROR",
    "FAILED",
    "FINAL_STATUSES",
    "HALTED",
    "HELLO",
    "IN_DOUBT",
    "MAX_CORR",
    "OK",
    "REJECTED",
    "REPLIES",
    "STATUS_NAMES",
    "SUBMIT",
    "VERSION",
    "FrameError",
    "decode",
    "encode_error",
    "encode_hello",
    "encode_hello_reply",
    "encode_replies",
    "encode_submit",
]

VERSION: Final = 1

# Frame kinds.
SUBMIT: Final = 0
HELLO: Final = 1
REPLIES: Final = 2
ERROR: Final = 3

# Reply statuses.
OK: Final = 0
FAILED: Final = 1
REJECTED: Final = 2
CLOSED: Final = 3
HALTED: Final = 4
IN_DOUBT: Final = 5

STATUS_NAMES: Final = {
    OK: "ok",
    FAILED: "failed",
    REJECTED: "rejected",
    CLOSED: "closed",
    HALTED: "halted",
    IN_DOUBT: "in_doubt",
}
FINAL_STATUSES: Final = frozenset({OK, FAILED, REJECTED, CLOSED, IN_DOUBT})

MAX_CORR: Final = 2**64 - 1
"""Largest correlation id (they are CBOR unsigned integers of at most 64 bits)."""

# Frame-level error codes (an ERROR reply).
E_BAD_CBOR: Final = "bad_cbor"
E_BAD_FRAME: Final = "bad_frame"
E_BAD_VERSION: Final = "bad_version"
E_BAD_KIND: Final = "bad_kind"
E_TOO_MANY_ITEMS: Final = "too_many_items"
E_TOO_MANY_PRODUCERS: Final = "too_many_producers"
# Item-level error codes (a REJECTED reply).
E_BAD_ITEM: Final = "bad_item"
E_BAD_CORR: Final = "bad_corr"
E_BAD_CHANNEL_ID: Final = "bad_channel_id"
E_EMPTY_CHANNEL_ID: Final = "empty_channel_id"
E_CHANNEL_ID_TOO_LONG: Final = "channel_id_too_long"
E_BAD_PAYLOAD: Final = "bad_payload"
E_PAYLOAD_TOO_LARGE: Final = "payload_too_large"
E_SHUTTING_DOWN: Final = "shutting_down"
E_DRAINING: Final = "draining"
E_POOL_BROKEN: Final = "pool_broken"
# Outcome codes (FAILED / CLOSED / HALTED replies).
E_HANDLER_FAILED: Final = "handler_failed"
E_CLOSED: Final = "closed"
E_IN_DOUBT: Final = "in_doubt"
E_HALTED: Final = "halted"

FRAME_ERRORS: Final = (
    E_BAD_CBOR,
    E_BAD_FRAME,
    E_BAD_VERSION,
    E_BAD_KIND,
    E_TOO_MANY_ITEMS,
    E_TOO_MANY_PRODUCERS,
)
ITEM_ERRORS: Final = (
    E_BAD_ITEM,
    E_BAD_CORR,
    E_BAD_CHANNEL_ID,
    E_EMPTY_CHANNEL_ID,
    E_CHANNEL_ID_TOO_LONG,
    E_BAD_PAYLOAD,
    E_PAYLOAD_TOO_LARGE,
    E_SHUTTING_DOWN,
    E_DRAINING,
    E_POOL_BROKEN,
)

_dumps = cbor2.dumps
_loads = cbor2.loads


class FrameError(Exception):
    """A frame could not be read; ``code`` is one of :data:`FRAME_ERRORS`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode(frame: bytes, max_items: int) -> tuple[int, Any]:
    """Read one producer frame: ``(SUBMIT, items)`` or ``(HELLO, token)``.

    ``items`` is returned as sent (a list); each item is checked by the caller, so that one bad
    item fails alone.

    Raises:
        FrameError: not CBOR, not an array of the right shape, another version, an unknown kind,
            or more than ``max_items`` items.
    """
    try:
        msg = _loads(frame)
    except Exception as exc:  # noqa: BLE001 - cbor2 raises several types for one problem
        raise FrameError(E_BAD_CBOR, f"frame is not valid CBOR: {exc}") from None
    if type(msg) is not list or len(msg) != 3:
        raise FrameError(
            E_BAD_FRAME, "frame must be a CBOR array [version, kind, body] of 3 elements"
        )
    version, kind, body = msg
    if type(version) is not int or version != VERSION:
        raise FrameError(E_BAD_VERSION, f"protocol version {version!r} is not supported (only 1)")
    if kind == SUBMIT and type(kind) is int:
        if type(body) is not list:
            raise FrameError(E_BAD_FRAME, "a SUBMIT body must be an array of items")
        if len(body) > max_items:
            raise FrameError(
                E_TOO_MANY_ITEMS, f"{len(body)} items in one frame, at most {max_items} allowed"
            )
        return SUBMIT, body
    if kind == HELLO and type(kind) is int:
        return HELLO, body
    raise FrameError(E_BAD_KIND, f"unknown frame kind {kind!r} (0 = SUBMIT, 1 = HELLO)")


def encode_submit(items: list[list[Any]]) -> bytes:
    """A SUBMIT frame of ``[corr, channel_id, payload]`` items."""
    return _dumps([VERSION, SUBMIT, items])


def encode_hello(token: Any) -> bytes:
    return _dumps([VERSION, HELLO, token])


def encode_hello_reply(token: Any, info: dict[str, Any]) -> bytes:
    return _dumps([VERSION, HELLO, token, info])


def encode_replies(replies: list[list[Any]]) -> bytes:
    """A REPLIES frame of ``[corr, status, value]`` entries.

    Raises:
        ValueError / TypeError (from cbor2): a value cannot be encoded (the caller falls back).
    """
    return _dumps([VERSION, REPLIES, replies])


def encode_error(code: str, message: str) -> bytes:
    return _dumps([VERSION, ERROR, {"error": code, "message": message}])
