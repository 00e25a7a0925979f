"""The ingress wire protocol between producers and ``shardpool run`` (version 1).

Producers connect a ZeroMQ DEALER socket to the backend's ROUTER ingress socket. Every message is a
single ZeroMQ frame holding one CBOR array whose first element is the protocol version::

    producer → backend
        [1, SUBMIT, [[corr, channel_id, payload], ...]]   a batch, in the producer's order
        [1, HELLO, token]                                  handshake / barrier

    backend → producer
        [1, REPLIES, [[corr, status, value], ...]]         outcomes, in per-channel order
        [1, HELLO, token, {"version": 1, "max_message_bytes": n, "max_items": n,
                           "max_pending_per_producer": n, "pid": n, ...}]
        [1, ERROR, {"error": code, "message": text, ...}]  a frame that could not be read at all

* ``corr`` is the producer's correlation id, an unsigned integer below 2**64 of its choosing
  (the client numbers messages 0, 1, 2, ...); the backend only echoes it.
* ``channel_id`` is a CBOR byte string of 1..64 bytes, ``payload`` a byte string of at most
  ``transport.max_message_bytes`` bytes holding the CBOR-encoded message (or raw bytes with
  ``pool.payload = "raw"``); the backend forwards it without decoding it. :func:`item_problem`
  is the one statement of these two rules (the clients, the ingress and the pool all use it).
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
barrier; its token is echoed as sent (containers in it come back with CBOR shared-value tags 28/29,
so a token with shared references costs no more to echo than it cost to send). An empty frame is
reserved (ZeroMQ uses empty frames for peer notifications) and should not be sent; it is answered
with an ERROR like any other unreadable frame. Error texts describe a bad value (its type, its
length, an integer's sign and bit length) and never quote it whole.

:func:`decode` reads a producer's frame, :func:`decode_reply` one from the backend (the
clients' only reader); both raise :class:`FrameError` for a frame that cannot be read.

Frames are decoded within limits that keep decoding linear in a frame's size (see
:func:`loads_frame`): map keys and set elements must be text or byte strings (else the frame is
``bad_cbor``), and decimal fractions, bigfloats, rationals, regular expressions and MIME messages
(tags 4, 5, 30, 35, 36) are read as plain tags, never converted.

**What a producer can make the backend hold is bounded** by ``ingress.max_pending_per_producer``
(advertised in the HELLO reply as ``max_pending_per_producer``): per producer (ZeroMQ routing id),
the messages accepted but not yet answered plus the replies the backend holds because the producer
does not read them. Past the bound the producer's further items are answered REJECTED with
:data:`E_TOO_MANY_PENDING` (never dropped); if it does not even read those, its further frames are
refused whole and counted into one ERROR ``too_many_pending`` (with ``"frames"`` and
``"messages"``: how many were refused), sent once it reads again. Beyond that, ZeroMQ itself
queues at most 64 reply frames of at most 64 replies per producer, and reads ahead at most 16 of
its frames. A producer that keeps at most that many messages unanswered and reads its replies
never meets the bound (the clients of :mod:`shardpool.client` cap ``max_outstanding`` to it).

:data:`E_INTERNAL_ERROR` (an ERROR, or an item's REJECTED) means the backend failed while handling
that frame or item: a bug, logged with its traceback; nothing else is affected.
"""

from __future__ import annotations

import decimal
import fractions
from typing import Any, Final, NamedTuple

import cbor2

from .errors import ChannelIdError, FrameError, PayloadTooLarge

__all__ = [
    "CLOSED",
    "ERROR",
    "FAILED",
    "FINAL_STATUSES",
    "HALTED",
    "HELLO",
    "IN_DOUBT",
    "MAX_CHANNEL_ID_BYTES",
    "MAX_CORR",
    "OK",
    "REJECTED",
    "REPLIES",
    "STATUS_NAMES",
    "SUBMIT",
    "VERSION",
    "FrameError",
    "ItemProblem",
    "check_item",
    "decode",
    "decode_reply",
    "describe",
    "encode_error",
    "encode_hello",
    "encode_hello_reply",
    "encode_replies",
    "encode_submit",
    "exc_text",
    "item_problem",
    "loads_frame",
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

MAX_CHANNEL_ID_BYTES: Final = 64
"""Longest accepted channel id in bytes (Lightning channel ids are 32)."""

# Frame-level error codes (an ERROR reply).
E_BAD_CBOR: Final = "bad_cbor"
E_BAD_FRAME: Final = "bad_frame"
E_BAD_VERSION: Final = "bad_version"
E_BAD_KIND: Final = "bad_kind"
E_TOO_MANY_ITEMS: Final = "too_many_items"
E_TOO_MANY_PRODUCERS: Final = "too_many_producers"
E_INTERNAL_ERROR: Final = "internal_error"  # also an item's REJECTED code
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
E_TOO_MANY_PENDING: Final = "too_many_pending"  # also an ERROR code (frames refused whole)
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
    E_INTERNAL_ERROR,
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
    E_TOO_MANY_PENDING,
)

_dumps = cbor2.dumps
_loads = cbor2.loads


def _keep_tag(tag: int) -> Any:
    def keep(value: Any, immutable: bool) -> cbor2.CBORTag:
        return cbor2.CBORTag(tag, value)

    return keep


# How producer frames are decoded. A frame of the protocol holds only arrays, integers and byte
# strings; anything else is a value to describe in an error, so it is decoded as cheaply as
# possible: decimal fractions and bigfloats (tags 4, 5: converting a mantissa costs quadratic
# time, 16 s for one of 400 KB), rationals (30: a gcd), regular expressions (35: compiled) and
# MIME messages (36: parsed) stay CBORTag objects, and map keys and set elements must be text or
# byte strings (integer keys can be chosen to collide in one hash bucket: a 400 KB map took 11 s).
_FRAME_DECODING: dict[str, Any] = {
    "semantic_decoders": {tag: _keep_tag(tag) for tag in (4, 5, 30, 35, 36)},
    "strict_hashable_types": True,
}


def loads_frame(frame: bytes) -> Any:
    """Decode a producer's frame with the limits above.

    Raises:
        Exception (cbor2's several types): not CBOR, or outside those limits.
    """
    return _loads(frame, **_FRAME_DECODING)


def decode(frame: bytes, max_items: int) -> tuple[int, Any]:
    """Read one producer frame: ``(SUBMIT, items)`` or ``(HELLO, token)``.

    ``items`` is returned as sent (a list); each item is checked by the caller, so that one bad
    item fails alone.

    Raises:
        FrameError: not CBOR, not an array of the right shape, another version, an unknown kind,
            or more than ``max_items`` items.
    """
    try:
        msg = _loads(frame, **_FRAME_DECODING)
    except Exception as exc:  # noqa: BLE001 - cbor2 raises several types for one problem
        raise FrameError(E_BAD_CBOR, f"frame is not valid CBOR: {exc_text(exc)}") from None
    if type(msg) is not list or len(msg) != 3:
        raise FrameError(
            E_BAD_FRAME,
            "frame must be a CBOR array [version, kind, body] of 3 elements, got "
            + describe(msg),
        )
    version, kind, body = msg
    # Types first: a decoded value of another type is never compared (its __eq__ is not ours).
    if type(version) is not int or version != VERSION:
        raise FrameError(
            E_BAD_VERSION, f"protocol version {describe(version)} is not supported (only 1)"
        )
    if type(kind) is int and kind == SUBMIT:
        if type(body) is not list:
            raise FrameError(
                E_BAD_FRAME, f"a SUBMIT body must be an array of items, got {describe(body)}"
            )
        if len(body) > max_items:
            raise FrameError(
                E_TOO_MANY_ITEMS, f"{len(body)} items in one frame, at most {max_items} allowed"
            )
        return SUBMIT, body
    if type(kind) is int and kind == HELLO:
        return HELLO, body
    raise FrameError(E_BAD_KIND, f"unknown frame kind {describe(kind)} (0 = SUBMIT, 1 = HELLO)")


def decode_reply(frame: bytes) -> tuple[int, Any]:
    """Read one frame from the backend: ``(REPLIES, [[corr, status, value], ...])``,
    ``(HELLO, (token, info))`` or ``(ERROR, {"error": code, "message": text, ...})``.

    Values are decoded without the limits of :func:`loads_frame`: they are the handler's results,
    which may hold anything CBOR can say.

    Raises:
        FrameError: not CBOR, another version, an unknown kind, or a body of the wrong shape
            (each reply must be an array of 3 elements with an integer status).
    """
    try:
        msg = _loads(frame)
    except Exception as exc:  # noqa: BLE001 - cbor2 raises several types for one problem
        raise FrameError(E_BAD_CBOR, f"frame is not valid CBOR: {exc_text(exc)}") from None
    if type(msg) is not list or len(msg) < 3:
        raise FrameError(E_BAD_FRAME, f"a reply frame must be an array, got {describe(msg)}")
    if type(msg[0]) is not int or msg[0] != VERSION:
        raise FrameError(E_BAD_VERSION, f"protocol version {describe(msg[0])} is not supported")
    kind, body = msg[1], msg[2]
    if type(kind) is not int:
        raise FrameError(E_BAD_KIND, f"unknown reply frame kind {describe(kind)}")
    if kind == REPLIES and type(body) is list:
        for entry in body:
            if type(entry) is not list or len(entry) != 3 or type(entry[1]) is not int:
                raise FrameError(
                    E_BAD_FRAME, f"a reply must be [corr, status, value], got {describe(entry)}"
                )
        return REPLIES, body
    if kind == HELLO and len(msg) == 4 and type(msg[3]) is dict:
        return HELLO, (body, msg[3])
    if kind == ERROR and type(body) is dict:
        return ERROR, body
    if kind in (REPLIES, HELLO, ERROR):
        raise FrameError(E_BAD_FRAME, f"reply frame of kind {kind} has the wrong shape")
    raise FrameError(E_BAD_KIND, f"unknown reply frame kind {describe(kind)}")


class ItemProblem(NamedTuple):
    """Why a ``(channel_id, payload)`` pair is refused: ``code`` is one of :data:`ITEM_ERRORS`,
    ``message`` says what is wrong (describing the bad value, never quoting it)."""

    code: str
    message: str

    def error(self) -> Exception:
        """The exception a local caller raises for it: :class:`ChannelIdError`,
        :class:`PayloadTooLarge` or (a payload that is not bytes) :class:`TypeError`."""
        return _PROBLEM_ERRORS[self.code](self.message)


def item_problem(
    channel_id: object, payload: object, max_payload_bytes: int | None
) -> ItemProblem | None:
    """None if ``channel_id`` is a byte string of 1..:data:`MAX_CHANNEL_ID_BYTES` bytes and
    ``payload`` a byte string of at most ``max_payload_bytes`` bytes (None: any length); else
    the first problem, the channel id's before the payload's. Pure: never raises, and costs two
    type checks and two length comparisons on a good pair (the ingress runs it per message).

    ``bytes`` only: a ``bytearray`` or ``memoryview`` is a problem here (a decoded frame never
    holds one); :func:`check_item` converts them first.
    """
    if type(channel_id) is not bytes or not 0 < len(channel_id) <= MAX_CHANNEL_ID_BYTES:
        return _channel_id_problem(channel_id)
    if type(payload) is not bytes:
        return ItemProblem(E_BAD_PAYLOAD, f"payload must be a byte string, got {describe(payload)}")
    if max_payload_bytes is not None and len(payload) > max_payload_bytes:
        return ItemProblem(
            E_PAYLOAD_TOO_LARGE,
            f"payload is {len(payload)} bytes, over transport.max_message_bytes = "
            f"{max_payload_bytes}",
        )
    return None


def _channel_id_problem(channel_id: object) -> ItemProblem:
    if type(channel_id) is not bytes:
        return ItemProblem(
            E_BAD_CHANNEL_ID,
            f"channel id must be a byte string of 1..{MAX_CHANNEL_ID_BYTES} bytes, got "
            + describe(channel_id),
        )
    n = len(channel_id)
    return ItemProblem(
        E_EMPTY_CHANNEL_ID if n == 0 else E_CHANNEL_ID_TOO_LONG,
        f"channel id must be 1..{MAX_CHANNEL_ID_BYTES} bytes long, got {n} bytes",
    )


def check_item(
    channel_id: object, payload: object, max_payload_bytes: int | None
) -> tuple[bytes, bytes]:
    """``(channel_id, payload)`` as ``bytes`` (a ``bytearray`` or ``memoryview`` is copied) if
    :func:`item_problem` finds nothing wrong with them.

    Raises:
        ChannelIdError: the channel id is not a byte string of 1..64 bytes.
        PayloadTooLarge: the payload is longer than ``max_payload_bytes``.
        TypeError: the payload is not a byte string.
    """
    if type(channel_id) is not bytes and isinstance(channel_id, (bytearray, memoryview)):
        channel_id = bytes(channel_id)
    if type(payload) is not bytes and isinstance(payload, (bytearray, memoryview)):
        payload = bytes(payload)
    problem = item_problem(channel_id, payload, max_payload_bytes)
    if problem is not None:
        raise problem.error()
    return channel_id, payload  # type: ignore[return-value]  # item_problem checked both


_PROBLEM_ERRORS: Final[dict[str, type[Exception]]] = {
    E_BAD_CHANNEL_ID: ChannelIdError,
    E_EMPTY_CHANNEL_ID: ChannelIdError,
    E_CHANNEL_ID_TOO_LONG: ChannelIdError,
    E_BAD_PAYLOAD: TypeError,
    E_PAYLOAD_TOO_LARGE: PayloadTooLarge,
}


_SMALL_INT_BITS = 64  # integers up to this size are quoted; larger ones only described
_TEXT_MAX = 200  # characters of an exception's text kept in an error message


def describe(value: Any) -> str:
    """A short description of a value a producer sent, for an error message: bounded in length
    and cost whatever the value, and never raising.

    Only small integers, floats, booleans and None are quoted; an integer beyond 64 bits is
    described by its sign and bit length (formatting one of 10**5000 would raise ``ValueError``
    under Python's integer string conversion limit, and cost time even without it), containers
    and strings by their type and length, CBOR tags by their number, anything else by its type.
    """
    try:
        t = type(value)
        if value is None or t is bool or t is float:
            return repr(value)  # a float's repr is at most ~24 characters (nan, inf, -0.0 too)
        if t is int:
            bits = value.bit_length()
            if bits <= _SMALL_INT_BITS:
                return f"integer {value}"
            return f"{'negative' if value < 0 else 'positive'} integer of {bits} bits"
        if t in (bytes, bytearray, str):
            return f"{t.__name__} of length {len(value)}"
        if t in (list, tuple, dict, set, frozenset):
            return f"{t.__name__} of {len(value)} elements"
        return _describe_rare(value, t)
    except Exception:  # noqa: BLE001 - a description must never fail the caller
        return "a value that cannot be described"


def _describe_rare(value: Any, t: type) -> str:
    """:func:`describe` for CBOR tags and simple values, decimals, fractions and anything else
    (may raise: the caller catches)."""
    if t is cbor2.CBORTag:
        tag = value.tag
        number = tag if type(tag) is int and tag.bit_length() <= _SMALL_INT_BITS else "?"
        return f"CBOR tag {number} holding {type(value.value).__name__}"
    if t is cbor2.CBORSimpleValue:
        return f"CBOR simple value {int(value.value)}"
    if value is cbor2.undefined:
        return "CBOR undefined"
    if t is decimal.Decimal:
        if not value.is_finite():
            return "decimal NaN" if value.is_nan() else "decimal infinity"
        return f"decimal of {len(value.as_tuple().digits)} digits"
    if t is fractions.Fraction:
        num, den = value.numerator.bit_length(), value.denominator.bit_length()
        return f"fraction of {num}/{den} bits"
    return t.__name__


def exc_text(exc: BaseException) -> str:
    """``str(exc)`` cut to 200 characters; the exception's type name if even that fails (the
    text of an exception about a producer's value may format that value)."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001
        return type(exc).__name__
    return text if len(text) <= _TEXT_MAX else text[:_TEXT_MAX] + "..."


def encode_submit(items: list[list[Any]]) -> bytes:
    """A SUBMIT frame of ``[corr, channel_id, payload]`` items."""
    return _dumps([VERSION, SUBMIT, items])


def encode_hello(token: Any) -> bytes:
    return _dumps([VERSION, HELLO, token])


_HELLO_REPLY_HEAD: Final = b"\x84" + _dumps(VERSION) + _dumps(HELLO)  # array(4), 1, 1


def encode_hello_reply(token: Any, info: dict[str, Any]) -> bytes:
    """``[1, HELLO, token, info]``. The token is encoded with shared-value tags: a token whose
    decoded form references one container many times (CBOR tags 28/29; 40 levels of ``[x, x]``
    fit in a few hundred bytes) would otherwise be written out 2**40 times.

    Raises:
        ValueError / TypeError (from cbor2): the token cannot be encoded (the caller falls back).
    """
    sharing = isinstance(token, (list, dict, set, frozenset, tuple, cbor2.CBORTag))
    return _HELLO_REPLY_HEAD + _dumps(token, value_sharing=sharing) + _dumps(info)


def encode_replies(replies: list[list[Any]]) -> bytes:
    """A REPLIES frame of ``[corr, status, value]`` entries.

    Raises:
        ValueError / TypeError (from cbor2): a value cannot be encoded (the caller falls back).
    """
    return _dumps([VERSION, REPLIES, replies])


def encode_error(code: str, message: str, **extra: Any) -> bytes:
    """``[1, ERROR, {"error": code, "message": message, **extra}]``."""
    return _dumps([VERSION, ERROR, {"error": code, "message": message, **extra}])
