"""The real traffic's codec and cryptography: BOLT #2 messages round-trip byte-exactly, the fast
codec agrees with pyln-proto's own reader and writer both ways, and the BOLT #3 derivations give
the spec's test vectors. No processes."""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
from coincurve import PrivateKey, PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from shardpool.demo import crypto, wire
from shardpool.demo.realtraffic import generate_wire

# One stream with every message type the generator sends; a few of each go through pyln (whose
# reader takes ~1 ms for an update_add_htlc).
STREAM = generate_wire(10, 6, 3_000, 3, close_fraction=0.5)
PER_TYPE = 12


def _sample() -> list[bytes]:
    by_type: dict[str | None, list[bytes]] = defaultdict(list)
    for _, msg in STREAM:
        bucket = by_type[wire.message_type(msg)]
        if len(bucket) < PER_TYPE:
            bucket.append(msg)
    return list(itertools.chain.from_iterable(by_type.values()))


def _without_empty_tlvs(fields: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in fields.items() if not (k == "tlvs" and v == b"")}


def test_the_stream_has_every_message_type_the_state_machine_speaks() -> None:
    seen = {wire.message_type(m) for _, m in STREAM}
    assert seen == {
        "open_channel", "funding_created", "channel_ready", "update_add_htlc",
        "update_fulfill_htlc", "update_fail_htlc", "commitment_signed", "revoke_and_ack",
        "channel_reestablish", "shutdown", "closing_signed",
    }


def test_every_message_round_trips_byte_exactly() -> None:
    for _, msg in STREAM:
        fields = wire.decode(msg)
        assert wire.encode(str(fields.pop("type")), fields) == msg


def test_the_fast_codec_agrees_with_pyln_both_ways() -> None:
    for msg in _sample():
        ours = wire.decode(msg)
        assert _without_empty_tlvs(ours) == wire.reference_decode(msg)
        name = str(ours.pop("type"))
        assert wire.reference_encode(name, ours) == msg


def test_commitment_signed_carries_one_signature_per_htlc_output() -> None:
    signed = [wire.decode(m) for _, m in STREAM if wire.message_type(m) == "commitment_signed"]
    assert any(d["num_htlcs"] > 0 for d in signed)
    for d in signed:
        assert d["num_htlcs"] == len(d["htlc_signature"])
        assert all(len(s) == 64 for s in d["htlc_signature"])


@settings(max_examples=40, deadline=None)
@given(
    htlc_id=st.integers(0, 2**64 - 1), amount=st.integers(0, 2**64 - 1),
    cltv=st.integers(0, 2**32 - 1), payment_hash=st.binary(min_size=32, max_size=32),
    sigs=st.lists(st.binary(min_size=64, max_size=64), max_size=5),
    reason=st.binary(max_size=300),
)
def test_random_field_values_encode_as_pyln_encodes_them(
    htlc_id: int, amount: int, cltv: int, payment_hash: bytes, sigs: list[bytes], reason: bytes
) -> None:
    cid = bytes(range(32))
    cases = [
        ("update_add_htlc", {"channel_id": cid, "id": htlc_id, "amount_msat": amount,
                             "payment_hash": payment_hash, "cltv_expiry": cltv,
                             "onion_routing_packet": bytes(1366)}),
        ("commitment_signed", {"channel_id": cid, "signature": bytes(64),
                               "htlc_signature": sigs}),
        ("update_fail_htlc", {"channel_id": cid, "id": htlc_id, "reason": reason}),
    ]
    for name, fields in cases:
        data = wire.encode(name, fields)
        assert data == wire.reference_encode(name, fields)
        assert _without_empty_tlvs(wire.decode(data)) == wire.reference_decode(data)


def test_bad_bytes_raise_wire_error_naming_the_problem() -> None:
    msg = next(m for _, m in STREAM if wire.message_type(m) == "update_fulfill_htlc")
    with pytest.raises(wire.WireError, match="truncated"):
        wire.decode(msg[:-1])
    with pytest.raises(wire.WireError, match="1 bytes after the last field"):
        wire.decode(msg + b"\x00")
    with pytest.raises(wire.WireError, match="unknown message type 65533"):
        wire.decode(b"\xff\xfd")
    with pytest.raises(wire.WireError, match="too short"):
        wire.decode(b"\x00")
    with pytest.raises(wire.WireError, match="unknown message type 'nope'"):
        wire.encode("nope", {})
    with pytest.raises(wire.WireError, match="KeyError"):
        wire.encode("update_fulfill_htlc", {"id": 1})
    assert wire.message_type(b"\xff\xfd") is None and wire.message_type(b"") is None


# --- BOLT #3 test vectors (Appendix D and E) ------------------------------------------------------

@pytest.mark.parametrize(("seed", "index", "expected"), [
    (bytes(32), 2**48 - 1, "02a40c85b6f28da08dfdbe0926c53fab2de6d28c10301f8f7c4073d5e42e3148"),
    (b"\xff" * 32, 2**48 - 1, "7cc854b54e3e0dcdb010d7a3fee464a9687be6e8db3be6854c475621e007a5dc"),
    (b"\xff" * 32, 0xAAAAAAAAAAA,
     "56f4008fb007ca9acf0e15b054d5c9fd12ee06cea347914ddbaed70d1c13a528"),
    (b"\xff" * 32, 0x555555555555,
     "9015daaeb06dba4ccc05b91b2f73bd54405f2be9f217fbacd3c5ac2e62327d31"),
    (b"\x01" * 32, 1, "915c75942a26bb3a433a8ce2cb0427c29ec6c1775cfc78328b57f6ba7bfeaa9c"),
])
def test_per_commitment_secrets_match_bolt3(seed: bytes, index: int, expected: str) -> None:
    assert crypto.per_commitment_secret(seed, 2**48 - 1 - index).hex() == expected


def test_key_derivation_matches_bolt3() -> None:
    base_secret = PrivateKey(bytes.fromhex(
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"))
    point = bytes.fromhex("025f7117a78150fe2ef97db7cfc83bd57b2e2c0d0dd25eaf467a4a1c2a45ce1486")
    assert base_secret.public_key.format().hex() == (
        "036d6caac248af96f6afa7f904f550253a0f3ef3f5aa2fe6838a95b216691468e2")
    derived = crypto.derive_pubkey(base_secret.public_key, point)
    assert derived.format().hex() == (
        "0235f2dbfaa89b57ec7b055afe29849ef7ddfeb1cefdb9ebdc43f5494984db29e5")
    assert crypto.derive_privkey(base_secret, point).to_hex() == (
        "cbced912d3b21bf196a766651e436aff192362621ce317704ea2f75d87e7be0f")


def test_signatures_verify_only_for_their_key_and_digest() -> None:
    key = PrivateKey(crypto.secret_from(b"k"))
    other = PublicKey.from_secret(crypto.secret_from(b"other"))
    digest = crypto.commitment_digest(bytes(32), 1, bytes(33), 10, 20, [(0, 1000, bytes(32), 9)])
    sig = crypto.sign(key, digest)
    assert len(sig) == 64 and crypto.verify(key.public_key, sig, digest)
    assert not crypto.verify(other, sig, digest)
    assert not crypto.verify(key.public_key, sig, bytes(32))
    assert not crypto.verify(key.public_key, bytes(64), digest)  # not a signature at all
    assert not crypto.verify(key.public_key, b"short", digest)
    with pytest.raises(ValueError, match="commitment number"):
        crypto.per_commitment_secret(bytes(32), 2**48)
