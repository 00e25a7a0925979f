"""The control socket's wire format, without sockets: one encoder and decoder per direction."""

from __future__ import annotations

import cbor2
import pytest

from shardpool.control import decode_reply, decode_request, encode_reply, encode_request
from shardpool.errors import ControlError


def test_a_request_round_trips() -> None:
    assert cbor2.loads(encode_request("status")) == [1, "status", {}]
    assert decode_request(encode_request("skip", {"channel": "ab"})) == ("skip", {"channel": "ab"})


@pytest.mark.parametrize(
    "frame",
    [
        b"\xff",  # not CBOR
        cbor2.dumps({"op": "status"}),
        cbor2.dumps([2, "status", {}]),  # another version
        cbor2.dumps([1, "status"]),
        cbor2.dumps([1, 7, {}]),
        cbor2.dumps([1, "status", []]),
    ],
)
def test_a_malformed_request_is_a_value_error(frame: bytes) -> None:
    with pytest.raises(ValueError):
        decode_request(frame)


def test_a_reply_round_trips_and_an_error_reply_raises_its_text() -> None:
    assert decode_reply(encode_reply(True, {"pid": 7})) == {"pid": 7}
    with pytest.raises(ControlError, match="^not halted$"):
        decode_reply(encode_reply(False, {"error": "not halted"}))


def test_an_unencodable_payload_becomes_an_error_reply() -> None:
    with pytest.raises(ControlError, match="unencodable reply"):
        decode_reply(encode_reply(True, {"x": object()}))


@pytest.mark.parametrize("frame", [b"\xff", cbor2.dumps([1, True]), cbor2.dumps("ok")])
def test_a_reply_that_is_not_one_is_a_control_error(frame: bytes) -> None:
    with pytest.raises(ControlError):
        decode_reply(frame)
