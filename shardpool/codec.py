"""Wire protocol between the front and its workers: one CBOR array per ZeroMQ frame.

Front → worker (on the worker's own PUSH/PULL pipe)::

    [BATCH, epoch, first_wseq, redelivered, [cid, cseq, payload], ...]   many messages per frame
    [STATS, epoch, request_id]                                            in-band: answered after
    [CONTROL, epoch, op, cid]                                             everything sent before it
    [STOP, epoch]                                                         the stop request, in
                                                                          band (locally: SIGTERM)
    [DRAIN, epoch, gen, slots, cids, keep]    a move: once every channel of these slots (or these
                                              channels; not those in keep) is idle, answer
                                              SLOT_STATE and forget them
    [CANCEL, epoch, gen]                      the move is off: keep them; answer CANCELLED
    [INSTALL, epoch, wseq, gen, states]       a move arrives: restore these channels; acknowledged
                                              like a message (it is a window entry)
    [LEASE, epoch, sent_at]                   (remote) the answer to a HEARTBEAT: the worker may
                                              take messages until sent_at + lease_s (its clock)

A remote worker (``shardpool worker --connect``) speaks over one DEALER socket to the front's
ROUTER, the same frames, after a handshake::

    worker → front  [HELLO, worker_id, nonce, version, protocol, pid, host]
    front → worker  [WELCOME, epoch, index, settings]   settings: the WorkerSpec fields it needs
                    [REFUSED, 0, reason, final]         final: retrying will not help

Worker → front (every worker PUSHes to the front's single PULL)::

    [READY, worker, epoch, pid]
    [ACK, worker, epoch, ranges, results, failures, forgotten]
        ranges    = [a0, b0, a1, b1, ...]  finished wseqs a..b-1 whose handler returned None
        results   = [[wseq, value], ...]   finished with a value, in completion order
        failures  = [[wseq, exc_type, message, traceback, action], ...]
        forgotten = [[cid, next_cseq], ...]  channels the worker dropped (ended, or idle): in
                    the same frame as their last acknowledgements, so the front drops its
                    record before their results are delivered
    [STATS, worker, epoch, request_id, {counter: value}]
    [HEARTBEAT, worker, epoch, loop_lag_s, sent_at, rtt_s]   sent_at: the worker's monotonic
                                              clock; rtt_s: its last LEASE round trip (remote)
    [FATAL, worker, epoch, exc_type, message, traceback]     worker could not start
    [CRASH, worker, epoch, exc_type, message, traceback]     worker is dying of this (it was up)
    [STOPPING, worker, epoch, [wseq, ...]]    asked to stop: these calls are running; nothing
                                              else it was sent will be started
    [BYE, worker, epoch, {counter: value}]    stopped: every call it started has been
                                              acknowledged; nothing else ran
    [SLOT_STATE, worker, epoch, gen, states, error]   drained (after the acks of those channels)
    [CANCELLED, worker, epoch, gen, busy]

``wseq`` numbers the messages the front sent to one worker incarnation stream (implicit in a batch:
``first_wseq + i``); acknowledgements name *what* finished, not a watermark, because channels
finish out of per-worker order. ``cseq`` is the per-channel sequence number stamped by the front.
``epoch`` names the worker incarnation; frames of another epoch are dropped on both sides.
``redelivered`` marks a replay after a crash: the worker runs such a batch carefully, one message
at a time, recording the running one in its run slot (see :class:`shardpool.worker.RunSlot`).

The payload travels as a CBOR byte string holding the caller's CBOR (or raw bytes): the front never
decodes it (the bytes fast path), and a malformed payload fails only its own message in the worker
instead of the whole frame. Batch frames are assembled from pre-built byte pieces rather than by
re-encoding, which is what keeps the front near the bare transport's speed.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from typing import Any, NamedTuple

import cbor2


class ToWorker(enum.IntEnum):
    """Frame kinds, front → worker."""

    BATCH = 0
    STATS = 1
    CONTROL = 2
    STOP = 3
    DRAIN = 4  # a move: hand over these slots / channels once they are idle
    CANCEL = 5  # the move is called off: keep them
    INSTALL = 6  # a move's arrival: restore these channels (a window entry, with a wseq)
    WELCOME = 7  # (remote) the handshake's answer: epoch, index, settings
    REFUSED = 8  # (remote) the handshake is refused: why, and whether retrying can help
    LEASE = 9  # (remote) a heartbeat's answer: the lease runs from its sent_at


class ToFront(enum.IntEnum):
    """Frame kinds, worker → front."""

    READY = 0
    ACK = 1
    STATS = 2
    HEARTBEAT = 3
    FATAL = 4
    BYE = 5
    CRASH = 6
    STOPPING = 7
    SLOT_STATE = 8  # the drained channels' state: the move may commit
    CANCELLED = 9  # the worker kept the channels of a cancelled move
    LOAD = 10  # what the worker was busy with over the last period, by slot (sparse)
    HELLO = 11  # (remote) a worker that connected introduces itself


PROTOCOL = 1
"""The front ↔ worker wire version: a remote worker speaking another is refused at HELLO."""


class Action(enum.StrEnum):
    """What was done with a message whose handler failed (the last field of a failure entry)."""

    SKIP = "skip"  # the policy skipped it: finished, reported as failed
    HALT = "halt"  # the policy halted its channel: not finished, waits for an operator
    SKIPPED = "skipped"  # an operator skipped it after a halt: finished


FINAL_ACTIONS = frozenset({Action.SKIP, Action.SKIPPED})
"""Failure actions after which the message is finished (acknowledged)."""


def operator_skip(wseq: int) -> list[Any]:
    """The failure entry of a message an operator skipped on its halted channel."""
    return [wseq, "Skipped", "skipped by operator", "", Action.SKIPPED]


# The cold frames, decoded by name (``Ready._make(msg[1:])``); BATCH and ACK stay positional: they
# are the hot path. Every worker → front frame starts [kind, worker, epoch, ...].


class Ready(NamedTuple):
    worker: int
    epoch: int
    pid: int


class Hello(NamedTuple):
    """A remote worker's handshake: its configured id, a fresh nonce per incarnation, its
    shardpool version and wire :data:`PROTOCOL`, pid and host name."""

    worker_id: str
    nonce: bytes
    version: str
    protocol: int
    pid: int
    host: str


class Failure(NamedTuple):
    """FATAL (could not start) and CRASH (dying of this, having been up)."""

    worker: int
    epoch: int
    exc_type: str
    message: str
    traceback: str


class StatsReply(NamedTuple):
    worker: int
    epoch: int
    request: int
    stats: dict[str, Any]


class Stopping(NamedTuple):
    worker: int
    epoch: int
    running: list[int]


class SlotState(NamedTuple):
    """The answer to DRAIN: each drained channel as ``[cid, state, expect, halted, parked]``
    (``state``: bytes or None; ``expect``: the next cseq; ``parked``: the wseqs a halted channel
    holds), or ``error`` (``[cid, text]``: a state that could not be taken; nothing was dropped)."""

    worker: int
    epoch: int
    gen: int
    states: list[list[Any]]
    error: list[Any] | None


class Load(NamedTuple):
    """A worker's load over ``wall_s`` seconds: ``cpu_s`` of its CPU time, ``slots`` (slot →
    messages it finished of that slot, active slots only) and ``hot`` (``[cid, messages]`` of its
    busiest channels)."""

    worker: int
    epoch: int
    wall_s: float
    cpu_s: float
    slots: dict[int, int]
    hot: list[list[Any]]


class Cancelled(NamedTuple):
    """The answer to CANCEL; ``busy`` names the channels that were still running (the reason a
    drain did not finish)."""

    worker: int
    epoch: int
    gen: int
    busy: list[bytes]


class Bye(NamedTuple):
    worker: int
    epoch: int
    stats: dict[str, Any]


def frame(kind: ToFront | ToWorker, *fields: Any) -> bytes:
    """Encode ``[kind, *fields]`` (a cold frame; BATCH frames are assembled, not encoded)."""
    return dumps([int(kind), *fields])


dumps = cbor2.dumps
loads = cbor2.loads
CBORDecodeError = cbor2.CBORDecodeError

# uint64 cseq + byte-string header with a 32-bit length: fixed width, one struct call per message.
# CBOR decoders accept these non-shortest heads (RFC 8949 §4.2 makes shortest form a preference).
ITEM_HEAD = struct.Struct(">BQBI").pack
CSEQ_HEAD = 0x1B  # major type 0 (unsigned), 8-byte argument
PAYLOAD_HEAD = 0x5A  # major type 2 (byte string), 4-byte length


def item_prefix(channel_id: bytes) -> bytes:
    """The constant start of every batch item of ``channel_id``: array(3) head + the id."""
    return b"\x83" + dumps(channel_id)


def item_head(cseq: int, payload_len: int) -> bytes:
    """The bytes between an item's prefix and its payload: ``cseq`` and the payload's length."""
    return ITEM_HEAD(CSEQ_HEAD, cseq, PAYLOAD_HEAD, payload_len)


def _head(major: int, n: int) -> bytes:
    """CBOR initial byte(s) for major type ``major`` with argument ``n`` (shortest form)."""
    mt = major << 5
    if n < 24:
        return bytes((mt | n,))
    if n < 0x100:
        return bytes((mt | 24, n))
    if n < 0x10000:
        return bytes((mt | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((mt | 26,)) + n.to_bytes(4, "big")
    return bytes((mt | 27,)) + n.to_bytes(8, "big")


def batch_header(epoch: int, first_wseq: int, redelivered: bool, count: int) -> bytes:
    """Head of a BATCH frame carrying ``count`` items; the items' bytes follow it directly."""
    return (
        _head(4, 4 + count)
        + _head(0, ToWorker.BATCH)
        + _head(0, epoch)
        + _head(0, first_wseq)
        + (b"\xf5" if redelivered else b"\xf4")
    )


def _item_len(initial: int) -> int:
    """Bytes of a CBOR head (an unsigned int, or a container's length) from its initial byte."""
    ai = initial & 0x1F
    return 1 if ai < 24 else 1 + (1 << (ai - 24))


def rehead_batch(frame: bytes, n: int, epoch: int, first_wseq: int, redelivered: bool) -> bytes:
    """The BATCH ``frame`` of ``n`` items renumbered for another incarnation: a new head, the
    items' bytes as they are (a replay resends whole batches without decoding them)."""
    pos = _item_len(frame[0])  # the array head
    for _ in range(3):  # kind, epoch, first wseq
        pos += _item_len(frame[pos])
    pos += 1  # redelivered (a simple value)
    return batch_header(epoch, first_wseq, redelivered, n) + frame[pos:]


def encode_batch(
    epoch: int,
    first_wseq: int,
    redelivered: bool,
    items: Iterable[tuple[bytes, int, bytes]],
) -> bytes:
    """Encode ``(channel_id, cseq, payload)`` items as one BATCH frame (the slow, simple path)."""
    parts: list[bytes] = []
    for cid, cseq, payload in items:
        parts.append(item_prefix(cid))
        parts.append(item_head(cseq, len(payload)))
        parts.append(payload)
    return batch_header(epoch, first_wseq, redelivered, len(parts) // 3) + b"".join(parts)
