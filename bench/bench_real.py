"""The real traffic's per-message work, in-process: the BOLT #2 codec, one signature check, and
one channel's whole message sequence through the state machine with its real checks.

Per call: ``decode`` one message; ``verify`` one signature; ``replay`` the 2,000 messages of one
seeded stream (divide by 2,000 for the mean per message; ``shardpool bench --workload
lightning-real`` gives the cost by message type)."""

from __future__ import annotations

from typing import Any

from coincurve import PrivateKey

from shardpool.demo import crypto, wire
from shardpool.demo.real import replay_wire
from shardpool.demo.realtraffic import generate_wire

STREAM = generate_wire(5, 4, 2_000, 1)
ADD = next(m for _, m in STREAM if wire.message_type(m) == "update_add_htlc")
COMMIT = max((m for _, m in STREAM if wire.message_type(m) == "commitment_signed"), key=len)


def test_decode_update_add_htlc(benchmark: Any) -> None:
    benchmark(wire.decode, ADD)


def test_decode_update_add_htlc_with_pyln(benchmark: Any) -> None:
    benchmark(wire.reference_decode, ADD)  # pyln-proto's reader: the reference, not the path


def test_decode_commitment_signed(benchmark: Any) -> None:
    benchmark(wire.decode, COMMIT)


def test_verify_one_signature(benchmark: Any) -> None:
    key = PrivateKey(crypto.secret_from(b"bench"))
    digest = crypto.secret_from(b"digest")
    sig = crypto.sign(key, digest)
    pub = key.public_key
    assert benchmark(crypto.verify, pub, sig, digest)


def test_replay_2000_real_messages(benchmark: Any) -> None:
    _, violations = benchmark(replay_wire, STREAM)
    assert violations == {}
