"""The client's parts without a backend: reading the backend's frames (protocol.decode_reply) and
the ReplyError family."""

from __future__ import annotations

import pickle
from typing import Any

import cbor2
import pytest

from shardpool import protocol as P
from shardpool.client import (
    Reply,
    ReplyClosed,
    ReplyError,
    ReplyFailed,
    ReplyInDoubt,
    ReplyRejected,
)
from shardpool.errors import ShardPoolError


def test_decode_reply_reads_each_frame_kind() -> None:
    replies: list[list[Any]] = [
        [0, P.OK, {1: "int keys are fine in results"}],
        [None, P.REJECTED, {"error": "x"}],
    ]
    assert P.decode_reply(P.encode_replies(replies)) == (P.REPLIES, replies)
    token, info = b"t" * 8, {"version": 1, "max_message_bytes": 10}
    assert P.decode_reply(P.encode_hello_reply(token, info)) == (P.HELLO, (token, info))
    kind, body = P.decode_reply(P.encode_error(P.E_TOO_MANY_PRODUCERS, "full", limit=1))
    assert (kind, body) == (
        P.ERROR,
        {"error": P.E_TOO_MANY_PRODUCERS, "message": "full", "limit": 1},
    )


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\xff\xff", P.E_BAD_CBOR),
        (cbor2.dumps({"a": 1}), P.E_BAD_FRAME),
        (cbor2.dumps([1, P.REPLIES]), P.E_BAD_FRAME),
        (cbor2.dumps([2, P.REPLIES, []]), P.E_BAD_VERSION),
        (cbor2.dumps([1, 9, []]), P.E_BAD_KIND),
        (cbor2.dumps([1, "x", []]), P.E_BAD_KIND),
        (cbor2.dumps([1, P.REPLIES, [[0, P.OK]]]), P.E_BAD_FRAME),
        (cbor2.dumps([1, P.REPLIES, [[0, "ok", None]]]), P.E_BAD_FRAME),
        (cbor2.dumps([1, P.REPLIES, {}]), P.E_BAD_FRAME),
        (cbor2.dumps([1, P.HELLO, b"t"]), P.E_BAD_FRAME),
        (cbor2.dumps([1, P.ERROR, "text"]), P.E_BAD_FRAME),
    ],
)
def test_decode_reply_refuses_a_garbled_frame_with_a_frame_error(frame: bytes, code: str) -> None:
    with pytest.raises(P.FrameError) as exc:
        P.decode_reply(frame)
    assert exc.value.code == code
    assert isinstance(exc.value, ShardPoolError)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        ("rejected", ReplyRejected),
        ("failed", ReplyFailed),
        ("closed", ReplyClosed),
        ("in_doubt", ReplyInDoubt),
        ("protocol", ReplyError),
        ("halted", ReplyError),
    ],
)
def test_a_reply_error_is_the_subclass_of_its_status(status: str, cls: type[ReplyError]) -> None:
    info: Any = {"error": "some_code", "message": "what happened"}
    err = Reply(3, status, info).error()
    assert type(err) is cls and isinstance(err, ReplyError) and isinstance(err, ShardPoolError)
    assert (err.status, err.code, err.info) == (status, "some_code", info)
    assert str(err) == f"{status}: what happened"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is cls and (again.status, again.info) == (status, info)


def test_a_reply_error_takes_a_value_that_is_not_a_map() -> None:
    err = Reply(1, "failed", "plain text").error()
    assert isinstance(err, ReplyFailed)
    assert (err.code, err.info) == ("failed", {"message": "plain text"})
    assert Reply(1, "ok", 5).error() is None
