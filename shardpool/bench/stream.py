"""A synthetic stream for the baselines and micro benchmarks: ``update_add_htlc``-shaped CBOR
payloads of a chosen size over randomly interleaved channels (:func:`make_stream`).

Unlike :mod:`shardpool.demo.traffic`, no channel's messages form a valid BOLT #2 sequence: this
stream is for measuring transport, not for checking order.
"""

from __future__ import annotations

import random
from typing import Any

import cbor2

__all__ = ["make_stream"]


def make_stream(
    messages: int, channels: int, *, payload_size: int = 190, seed: int = 0
) -> list[tuple[bytes, bytes]]:
    """Build ``messages`` interleaved ``(channel_id, cbor_payload)`` pairs over ``channels`` ids.

    Channel ids are 32 random bytes; each message goes to a channel drawn uniformly at random, so
    channels interleave as they do on a busy node. Each payload is a CBOR map shaped like an
    ``update_add_htlc`` (``type``, per-channel ``id``, ``amount_msat``, ``payment_hash``,
    ``cltv_expiry``, ``onion``), where the ``onion`` byte string pads the encoding to
    ``payload_size`` bytes (±1 where a CBOR length header changes size; a size below the ~100 bytes
    the other fields need gives an empty onion and a larger payload). The same ``seed`` gives the
    same stream in every process and run.

    Raises:
        ValueError: ``messages < 0``, ``channels < 1`` or ``payload_size < 0``.
    """
    if messages < 0:
        raise ValueError(f"messages must be >= 0, got {messages}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if payload_size < 0:
        raise ValueError(f"payload_size must be >= 0, got {payload_size}")
    rng = random.Random(seed)
    cids = [rng.randbytes(32) for _ in range(channels)]
    next_id = [0] * channels
    # Onion bytes are slices of one random blob: realistic entropy without 200k randbytes calls.
    blob = rng.randbytes(max(payload_size, 1) * 2)
    stream: list[tuple[bytes, bytes]] = []
    append = stream.append
    dumps = cbor2.dumps
    for _ in range(messages):
        c = rng.randrange(channels)
        htlc_id = next_id[c]
        next_id[c] = htlc_id + 1
        msg: dict[str, Any] = {
            "type": "update_add_htlc",
            "id": htlc_id,
            "amount_msat": rng.randrange(1_000, 5_000_000_000),
            "payment_hash": rng.randbytes(32),
            "cltv_expiry": rng.randrange(800_000, 900_000),
            "onion": b"",
        }
        k = _onion_len(payload_size, len(dumps(msg)))
        if k:
            off = rng.randrange(len(blob) - k + 1)
            msg["onion"] = blob[off : off + k]
        append((cids[c], dumps(msg)))
    return stream


def _bstr_head_len(n: int) -> int:
    """Bytes of the CBOR header of a byte string of length ``n``."""
    return 1 if n < 24 else 2 if n < 256 else 3 if n < 65536 else 5


def _onion_len(target: int, size_with_empty_onion: int) -> int:
    """Onion length that makes the payload ``target`` bytes (or 1 byte over, or 0 if too small)."""
    fixed = size_with_empty_onion - 1  # everything but the empty byte string's 1-byte header
    for head in (1, 2, 3, 5):
        k = target - fixed - head
        if k >= 0 and _bstr_head_len(k) == head:
            return k
    # target falls where the header grows by one byte: come as close as possible from above
    for head in (2, 3, 5):
        k = target - fixed - head + 1
        if k >= 0 and _bstr_head_len(k) == head:
            return k
    return 0
