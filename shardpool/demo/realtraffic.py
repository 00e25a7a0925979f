"""Seeded real Lightning traffic: BOLT #2 wire messages, signed with real keys.

:func:`iter_wire` yields ``(channel_id, message bytes)`` pairs in arrival order, each message the
BOLT #1/#2 wire encoding (:mod:`~shardpool.demo.wire`) a peer connection would hand over. The
traffic has the shape of :mod:`~shardpool.demo.traffic` (peers × channels, bursty per peer, adds,
fulfils and fails, commitment dances, reconnects, cooperative closes; the same draws decide what
comes next) and each channel now opens on the wire (``open_channel``, ``funding_created``,
``channel_ready``) before its first update. The generator plays the remote peer of every channel:
its keys (funding key, HTLC basepoint, per-commitment seed) derive from the seed and the channel
id, and every ``funding_created``, ``commitment_signed`` (one signature per untrimmed HTLC too) and
``closing_signed`` carries a real secp256k1 signature over the commitment our node computes;
every ``revoke_and_ack`` reveals the real per-commitment secret. Applied serially to
:class:`~shardpool.demo.real.RealChannelState` the stream has no violation
(:func:`~shardpool.demo.real.replay_wire`).

Faults (``faults={kind: probability}``), each injected at an opportunity of its kind with that
probability; the channel is then retired (its slot goes on with a fresh channel), and the fault is
recorded with the violation the receiver must report (:class:`Fault`):

* ``bad_signature`` — a ``commitment_signed`` signed over another commitment:
  ``bad_commitment_signature``;
* ``bad_htlc_signature`` — one HTLC signature over another HTLC: ``bad_htlc_signature``;
* ``wrong_secret`` — ``revoke_and_ack`` reveals another commitment's secret:
  ``bad_revocation_secret``;
* ``update_after_shutdown`` — an ``update_add_htlc`` after the remote's ``shutdown``:
  ``add_after_shutdown``;
* ``out_of_order`` — a ``commitment_signed`` delivered before the update it covers (the race of
  lnd 8393): ``empty_commitment`` if that was its only update, ``commitment_mismatch`` if the
  update changes the number of HTLC outputs, else ``bad_commitment_signature``.

Cost: ~35 µs per signature made, so generating is about as expensive as checking (~60-100 µs per
message on average on the 2-core development machine).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from coincurve import PrivateKey

from . import wire
from .crypto import closing_digest as _closing_digest
from .crypto import (
    commitment_digest,
    derive_privkey,
    funding_digest,
    htlc_digest,
    per_commitment_point,
    per_commitment_secret,
    secret_from,
    sign,
)
from .real import commitment_outputs, local_point, local_seed
from .traffic import (
    _ADD,
    _COMMIT,
    _REMOVE,
    _REVOKE,
    _Chan,
    _check_args,
    _collect,
    _Generator,
    _kind,
    _visits,
)

__all__ = ["FAULT_KINDS", "Fault", "generate_wire", "iter_wire"]

FAULT_KINDS: Final[tuple[str, ...]] = (
    "bad_signature",
    "bad_htlc_signature",
    "wrong_secret",
    "update_after_shutdown",
    "out_of_order",
)

FUNDING_SAT: Final = 20_000_000
"""Every channel's capacity (satoshi); half of it is pushed to us, as the demo's balances."""
PUSH_MSAT: Final = 10_000_000_000
DUST_LIMIT_SAT: Final = 546
# Bitcoin's genesis block hash, as BOLT #2's chain_hash carries it.
_CHAIN_HASH: Final = bytes.fromhex(
    "6fe28c0ab6f1b372c1a6a246ae63f74f931e8365e15a089c68d6190000000000"
)
_ONIONS: Final = 16  # distinct onion packets (opaque to the state machine)


@dataclass(frozen=True)
class Fault:
    """One injected fault: the message at ``index`` in the stream (0-based) is the first one of
    channel ``channel_id`` that the receiver must refuse, with the violation ``expected``."""

    index: int
    channel_id: bytes
    kind: str
    expected: str


class _RealChan(_Chan):
    """The remote's side of one channel: the mirror of :class:`_Chan` plus balances, keys and the
    opening progress."""

    __slots__ = ("opening", "local", "remote", "funding_key", "htlc_key", "seed", "our_seed",
                 "held")

    def __init__(self, cid: bytes, generation: int, countdown: int, seed: int) -> None:
        super().__init__(cid, generation, countdown)
        tag = str(seed).encode()
        self.opening = 0  # opening messages sent (3: open)
        self.local = PUSH_MSAT  # our balance, msat, as the receiver will have it
        self.remote = FUNDING_SAT * 1000 - PUSH_MSAT
        self.funding_key = PrivateKey(secret_from(tag, b"/funding/", cid))
        self.htlc_key = PrivateKey(secret_from(tag, b"/htlc/", cid))
        self.seed = secret_from(tag, b"/per-commitment-seed/", cid)
        self.our_seed = local_seed(cid)  # the receiver's: the remote learns its points
        self.held: bytes | None = None  # an update held back by an out_of_order fault


class _WireGenerator(_Generator):
    """:class:`~shardpool.demo.traffic._Generator` whose builders return wire messages with real
    signatures (each base builder still decides the content and updates the mirror)."""

    def __init__(self, peers: int, channels_per_peer: int, messages: int, seed: int,
                 close_fraction: float, faults: Mapping[str, float]) -> None:
        self.faults = dict(faults)
        self.record: list[Fault] = []
        self.index = 0  # the stream position of the message being built
        super().__init__(peers, channels_per_peer, messages, seed, close_fraction)
        self.onions = [self.randbytes(1366) for _ in range(_ONIONS)]

    def _new_chan(self, slot: int, generation: int) -> _Chan:
        base = super()._new_chan(slot, generation)
        return _RealChan(base.cid, generation, base.countdown, self.seed)

    def _inject(self, kind: str) -> bool:
        p = self.faults.get(kind, 0.0)
        return p > 0 and self.rand() < p

    def _retire(self, ch: _RealChan, slot: int, kind: str, expected: str) -> None:
        self.record.append(Fault(self.index, ch.cid, kind, expected))
        self.chans[slot] = self._new_chan(slot, ch.generation + 1)

    # -- one message -------------------------------------------------------------------------

    def next_message(self, ch: _RealChan, slot: int) -> bytes:
        """The channel's next message (what it is: the module docstring)."""
        if ch.held is not None:
            held, ch.held = ch.held, None
            self.chans[slot] = self._new_chan(slot, ch.generation + 1)
            return held
        if ch.opening < 3:
            return self._opening(ch)
        if ch.countdown > 0:
            ch.countdown -= 1
        if ch.shutting_down and self._inject("update_after_shutdown"):
            self._retire(ch, slot, "update_after_shutdown", "add_after_shutdown")
            return self._add_wire(ch, slot)
        kind = _kind(ch, self.rand())
        if kind in (_ADD, _REMOVE) and self._inject("out_of_order"):
            return self._out_of_order(ch, slot, kind)
        if kind == _COMMIT:
            return self._commit_wire(ch, slot)
        if kind == _REVOKE:
            return self._revoke_wire(ch, slot)
        return self._WIRE[kind](self, ch, slot)

    def _opening(self, ch: _RealChan) -> bytes:
        step, ch.opening = ch.opening, ch.opening + 1
        cid = ch.cid
        if step == 0:
            pub = ch.funding_key.public_key.format()
            htlc = ch.htlc_key.public_key.format()
            return wire.encode("open_channel", {
                "chain_hash": _CHAIN_HASH, "temporary_channel_id": cid,
                "funding_satoshis": FUNDING_SAT, "push_msat": PUSH_MSAT,
                "dust_limit_satoshis": DUST_LIMIT_SAT,
                "max_htlc_value_in_flight_msat": FUNDING_SAT * 1000,
                "channel_reserve_satoshis": FUNDING_SAT // 100, "htlc_minimum_msat": 1000,
                "feerate_per_kw": 253, "to_self_delay": 144, "max_accepted_htlcs": 483,
                # One key for the bases the state machine does not use: it checks none of them.
                "funding_pubkey": pub, "revocation_basepoint": htlc, "payment_basepoint": htlc,
                "delayed_payment_basepoint": htlc, "htlc_basepoint": htlc,
                "first_per_commitment_point": self._remote_point(ch, 0), "channel_flags": 1,
            })
        if step == 1:
            digest = funding_digest(cid, local_point(ch.our_seed, 0), ch.local, ch.remote)
            return wire.encode("funding_created", {
                "temporary_channel_id": cid, "funding_txid": hashlib.sha256(cid).digest(),
                "funding_output_index": 0, "signature": sign(ch.funding_key, digest),
            })
        return wire.encode("channel_ready", {
            "channel_id": cid, "second_per_commitment_point": self._remote_point(ch, 1),
        })

    @staticmethod
    def _remote_point(ch: _RealChan, n: int) -> bytes:
        return per_commitment_point(per_commitment_secret(ch.seed, n))

    # -- updates -------------------------------------------------------------------------------

    def _add_wire(self, ch: _Chan, slot: int) -> bytes:
        if ch.shutting_down:  # only as a fault: the mirror is retired anyway
            msg: dict[str, Any] = {"type": "update_add_htlc", "id": ch.next_id,
                                   "amount_msat": 1000, "payment_hash": bytes(32),
                                   "cltv_expiry": 800_100}
        else:
            msg = self._add(ch, slot)
            ch.pending_adds[-1].extend((msg["payment_hash"], msg["cltv_expiry"]))
        msg["onion_routing_packet"] = self.onions[int(self.rand() * _ONIONS)]
        return _encode(ch, msg)

    def _remove_wire(self, ch: _Chan, slot: int) -> bytes:
        return _encode(ch, self._remove(ch, slot))

    def _out_of_order(self, ch: _RealChan, slot: int, kind: int) -> bytes:
        """Build the update, then the commitment that covers it; send the commitment first."""
        before = len(ch.pending_adds) + len(ch.pending_removes)
        update = self._add_wire(ch, slot) if kind == _ADD else self._remove_wire(ch, slot)
        htlc = ch.pending_adds[-1] if kind == _ADD else ch.pending_removes[-1][0]
        if before == 0:
            expected = "empty_commitment"
        elif htlc[1] // 1000 >= DUST_LIMIT_SAT:
            expected = "commitment_mismatch"  # one HTLC output more (or less) than it sees
        else:
            expected = "bad_commitment_signature"
        ch.held = update  # set first: no second fault goes into this commitment
        commit = self._commit_wire(ch, slot)
        self.record.append(Fault(self.index, ch.cid, "out_of_order", expected))
        return commit

    def _commit_wire(self, ch: _RealChan, slot: int) -> bytes:
        for htlc, fulfilled in ch.pending_removes:
            if fulfilled:
                ch.remote -= htlc[1]
                ch.local += htlc[1]
        after = [(h[0], h[1], h[3], h[4]) for h in (*ch.free, *ch.pending_adds)]
        self._commit(ch, slot)
        number = ch.commitments
        point = local_point(ch.our_seed, number)
        untrimmed, to_local, to_remote = commitment_outputs(after, ch.local, ch.remote,
                                                            DUST_LIMIT_SAT)
        digest = commitment_digest(ch.cid, number, point, to_local, to_remote, untrimmed)
        htlc_key = derive_privkey(ch.htlc_key, point)
        sigs = [sign(htlc_key, htlc_digest(digest, i, h)) for i, h in enumerate(untrimmed)]
        signed = digest
        if ch.held is None and self._inject("bad_signature"):
            signed = commitment_digest(ch.cid, number + 1, point, to_local, to_remote, untrimmed)
            self._retire(ch, slot, "bad_signature", "bad_commitment_signature")
        elif ch.held is None and sigs and self._inject("bad_htlc_signature"):
            sigs[-1] = sign(htlc_key, htlc_digest(digest, len(sigs), untrimmed[-1]))
            self._retire(ch, slot, "bad_htlc_signature", "bad_htlc_signature")
        return wire.encode("commitment_signed", {
            "channel_id": ch.cid, "signature": sign(ch.funding_key, signed),
            "htlc_signature": sigs,
        })

    def _revoke_wire(self, ch: _RealChan, slot: int) -> bytes:
        revoked = ch.revocations
        self._revoke(ch, slot)
        secret = per_commitment_secret(ch.seed, revoked)
        if self._inject("wrong_secret"):
            secret = per_commitment_secret(ch.seed, revoked + 1)
            self._retire(ch, slot, "wrong_secret", "bad_revocation_secret")
        return wire.encode("revoke_and_ack", {
            "channel_id": ch.cid, "per_commitment_secret": secret,
            "next_per_commitment_point": self._remote_point(ch, revoked + 2),
        })

    def _reestablish_wire(self, ch: _RealChan, slot: int) -> bytes:
        msg = self._reestablish(ch, slot)
        n = ch.commitments
        msg["your_last_per_commitment_secret"] = (
            per_commitment_secret(ch.our_seed, n - 1) if n else bytes(32))
        msg["my_current_per_commitment_point"] = self._remote_point(ch, ch.revocations)
        return _encode(ch, msg)

    def _shutdown_wire(self, ch: _Chan, slot: int) -> bytes:
        return _encode(ch, self._shutdown(ch, slot))

    def _close_wire(self, ch: _RealChan, slot: int) -> bytes:
        msg = self._close(ch, slot)
        script = b"\x00\x14" + ch.cid[:20]  # the base generator's shutdown script
        digest = _closing_digest(ch.cid, msg["fee_satoshis"], ch.local, ch.remote, script)
        msg["signature"] = sign(ch.funding_key, digest)
        return _encode(ch, msg)

    _WIRE: Final = (_add_wire, _remove_wire, _commit_wire, _revoke_wire, _reestablish_wire,
                    _shutdown_wire, _close_wire)


def _encode(ch: _Chan, msg: dict[str, Any]) -> bytes:
    """The base builders' dict, with the channel id, as wire bytes."""
    fields = dict(msg)
    fields["channel_id"] = ch.cid
    return wire.encode(fields.pop("type"), fields)


def _check_faults(faults: Mapping[str, float]) -> None:
    for kind, p in faults.items():
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if not isinstance(p, (int, float)) or not (math.isfinite(p) and 0 <= p <= 1):
            raise ValueError(f"fault probability of {kind} must be within [0, 1], got {p!r}")


def iter_wire(
    peers: int,
    channels_per_peer: int,
    messages: int,
    seed: int,
    *,
    close_fraction: float = 0.05,
    faults: Mapping[str, float] | None = None,
    record: list[Fault] | None = None,
) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``messages`` ``(channel_id, wire message)`` pairs lazily (see the module docstring).

    Args:
        peers, channels_per_peer, messages, seed, close_fraction: as
            :func:`~shardpool.demo.traffic.iter_stream`.
        faults: fault kind (:data:`FAULT_KINDS`) → probability per opportunity, in [0, 1].
        record: a list each injected :class:`Fault` is appended to, as it is yielded.

    Raises:
        ValueError: an argument is out of range (at the call).
    """
    _check_args(peers, channels_per_peer, messages, close_fraction)
    _check_faults(faults or {})
    gen = _WireGenerator(peers, channels_per_peer, messages, seed, close_fraction, faults or {})
    return _wire_stream(gen, peers, channels_per_peer, messages, record)


def _wire_stream(gen: _WireGenerator, peers: int, channels_per_peer: int, messages: int,
                 record: list[Fault] | None) -> Iterator[tuple[bytes, bytes]]:
    for index, slot in enumerate(_visits(gen.rand, peers, channels_per_peer, messages)):
        ch = gen.chans[slot]
        gen.index = index
        assert isinstance(ch, _RealChan)
        msg = gen.next_message(ch, slot)
        if gen.record:
            if record is not None:
                record.extend(gen.record)
            gen.record.clear()
        yield ch.cid, msg


def generate_wire(
    peers: int, channels_per_peer: int, messages: int, seed: int, **options: Any
) -> list[tuple[bytes, bytes]]:
    """The whole stream of :func:`iter_wire` as a list (``options`` and errors as there)."""
    return _collect(iter_wire(peers, channels_per_peer, messages, seed, **options))
