"""secp256k1 for the real Lightning traffic: BOLT #3 keys and secrets, and what gets signed.

Signatures are made and checked with ``coincurve`` (libsecp256k1): 64-byte compact ECDSA
signatures (BOLT #1's ``signature`` type, low-S) over 32-byte digests. Verifying one costs
~50 µs here, signing ~35 µs, deriving a public key ~25-35 µs: the per-message work of a node.

From BOLT #3, exactly (``tests/test_demo_crypto.py`` checks the spec's test vectors):

* :func:`per_commitment_secret` — the shachain ``generate_from_seed(seed, 2^48 - 1 - n)``;
* :func:`derive_pubkey` / :func:`derive_privkey` — ``basepoint + SHA256(per_commitment_point ||
  basepoint) * G`` (the ``localpubkey``/``htlcpubkey`` derivation).

What is signed is this demo's own construction, not the BOLT #3 transactions: building the
commitment transaction and its BIP 143 sighash would add Python work of no interest to the pool,
while the cryptographic cost the issue measures (one libsecp256k1 verification per signature) is
the same. :func:`commitment_digest` covers every part of a commitment both sides compute — the
channel, its commitment number, the receiver's per-commitment point, both balances and every HTLC
(id, amount, payment hash, CLTV) in output order — so a signature made for another commitment
(an update missing, reordered or extra) does not verify.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from coincurve import PrivateKey, PublicKey
from coincurve.ecdsa import cdata_to_der, der_to_cdata, deserialize_compact, serialize_compact

__all__ = [
    "Htlc",
    "closing_digest",
    "commitment_digest",
    "derive_privkey",
    "derive_pubkey",
    "funding_digest",
    "htlc_digest",
    "per_commitment_point",
    "per_commitment_secret",
    "secret_from",
    "sign",
    "verify",
]

_sha256 = hashlib.sha256
_MAX_INDEX = 2**48 - 1
_HTLC = struct.Struct(">QQ32sI")
_HEAD = struct.Struct(">32sQ33sQQH")

Htlc = tuple[int, int, bytes, int]
"""One HTLC of a commitment: ``(id, amount_msat, payment_hash, cltv_expiry)``."""


def secret_from(*parts: bytes) -> bytes:
    """A valid secp256k1 secret key (32 bytes) derived deterministically from ``parts``
    (SHA-256 of their concatenation, re-hashed in the ~2^-128 case it is out of range)."""
    h = _sha256(b"".join(parts)).digest()
    while not 0 < int.from_bytes(h, "big") < _ORDER:
        h = _sha256(h).digest()
    return h


_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def sign(key: PrivateKey, digest: bytes) -> bytes:
    """Sign a 32-byte digest: the 64-byte compact signature (r || s, low-S, RFC 6979 nonce)."""
    return bytes(serialize_compact(der_to_cdata(key.sign(digest, hasher=None))))


def verify(pub: PublicKey, signature: bytes, digest: bytes) -> bool:
    """True if ``signature`` (64-byte compact) is ``pub``'s valid low-S signature of the 32-byte
    ``digest``. Never raises: bytes that are no signature at all just do not verify."""
    try:
        return bool(pub.verify(cdata_to_der(deserialize_compact(signature)), digest, hasher=None))
    except (ValueError, TypeError):
        return False


def per_commitment_secret(seed: bytes, n: int) -> bytes:
    """BOLT #3 per-commitment secret of commitment number ``n`` (0 first) from a 32-byte seed:
    ``generate_from_seed(seed, 2^48 - 1 - n)``.

    Raises:
        ValueError: ``n`` outside [0, 2^48).
    """
    if not 0 <= n <= _MAX_INDEX:
        raise ValueError(f"commitment number must be within [0, 2^48), got {n}")
    index = _MAX_INDEX - n
    p = bytearray(seed)
    for bit in range(47, -1, -1):
        if index >> bit & 1:
            p[bit // 8] ^= 1 << (bit % 8)
            p[:] = _sha256(p).digest()
    return bytes(p)


def per_commitment_point(secret: bytes) -> bytes:
    """The compressed point (33 bytes) of a per-commitment secret. Raises ValueError for a
    secret out of range."""
    return bytes(PublicKey.from_secret(secret).format())


def _tweak(point: bytes, basepoint: bytes) -> bytes:
    return _sha256(point + basepoint).digest()


def derive_pubkey(basepoint: PublicKey, point: bytes) -> PublicKey:
    """BOLT #3: ``basepoint + SHA256(per_commitment_point || basepoint) * G``. Raises ValueError
    if the result is the point at infinity (never for real keys)."""
    base = basepoint.format()
    return basepoint.add(_tweak(point, base))


def derive_privkey(basesecret: PrivateKey, point: bytes) -> PrivateKey:
    """The secret key of :func:`derive_pubkey`'s result: ``basesecret + SHA256(per_commitment_point
    || basepoint)``."""
    return basesecret.add(_tweak(point, basesecret.public_key.format()))


def commitment_digest(
    channel_id: bytes,
    number: int,
    point: bytes,
    to_local_msat: int,
    to_remote_msat: int,
    htlcs: Sequence[Htlc],
) -> bytes:
    """What a ``commitment_signed`` (and ``funding_created``, for number 0) signs: the double
    SHA-256 of the commitment's parts (see the module docstring), ``htlcs`` in output order.
    Raises struct.error for values out of their field's range."""
    h = _sha256(b"shardpool.demo/commitment")
    h.update(_HEAD.pack(channel_id, number, point, to_local_msat, to_remote_msat, len(htlcs)))
    for htlc in htlcs:
        h.update(_HTLC.pack(*htlc))
    return _sha256(h.digest()).digest()


def htlc_digest(commitment: bytes, index: int, htlc: Htlc) -> bytes:
    """What the ``index``-th HTLC signature of a ``commitment_signed`` signs: the HTLC's second-
    stage transaction, here the SHA-256 of the commitment digest, the output index and the HTLC."""
    return _sha256(b"shardpool.demo/htlc" + commitment + struct.pack(">H", index)
                   + _HTLC.pack(*htlc)).digest()


def funding_digest(channel_id: bytes, point: bytes, to_local_msat: int,
                   to_remote_msat: int) -> bytes:
    """What ``funding_created`` signs: the receiver's first commitment (number 0, no HTLC)."""
    return commitment_digest(channel_id, 0, point, to_local_msat, to_remote_msat, ())


def closing_digest(channel_id: bytes, fee_sat: int, to_local_msat: int, to_remote_msat: int,
                   remote_script: bytes) -> bytes:
    """What ``closing_signed`` signs: the closing transaction (fee, both balances, the remote's
    shutdown script). Raises struct.error for values out of range."""
    return _sha256(b"shardpool.demo/closing" + struct.pack(
        ">32sQQQ", channel_id, fee_sat, to_local_msat, to_remote_msat) + remote_script).digest()
