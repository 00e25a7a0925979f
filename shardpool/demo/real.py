"""The channel state machine of the real Lightning traffic: BOLT #2 wire messages, real signatures.

:class:`RealChannelState` is :class:`~shardpool.demo.channel.ChannelState` (the same update,
commitment, revocation, shutdown and reestablish rules, one direction of updates) plus what a node
checks with its keys:

* The channel opens on the wire: ``open_channel`` (the remote funds it and states its keys: funding
  pubkey, HTLC basepoint, first per-commitment point, dust limit, the amount pushed to us), then
  ``funding_created`` whose signature must verify over our first commitment, then
  ``channel_ready`` with the remote's second per-commitment point. Anything else before that is
  ``channel_not_ready``. (A node re-keys a channel from its temporary id to the funding-derived
  one at ``funding_signed``; the demo uses the final id from the start, so the pool routes every
  message of a channel, its opening included, by one id.)
* ``commitment_signed``: we compute our next commitment (pending updates applied, HTLCs below the
  dust limit trimmed as with zero-fee HTLC anchors) and our per-commitment point for it (the BOLT
  #3 shachain from our per-channel seed), then verify the remote's signature with its funding key
  and one signature per untrimmed HTLC with its HTLC key derived for that point (BOLT #3).
  ``num_htlcs`` must equal the untrimmed HTLC count (``commitment_mismatch``).
* ``revoke_and_ack``: ``per_commitment_secret`` times G must equal the point the remote gave for the
  commitment it revokes (``first_per_commitment_point``, then ``channel_ready``'s, then each
  ``next_per_commitment_point``).
* ``closing_signed``: the signature must verify over the closing transaction (fee, balances, the
  remote's shutdown script).
* Every message's ``channel_id`` must be the channel's (``wrong_channel``).

What is signed: :mod:`~shardpool.demo.crypto`. Our node's secret is :data:`LOCAL_NODE_SECRET`, the
same in every process (the traffic generator plays the remote, which learns our per-commitment
points from the messages we would send it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from coincurve import PublicKey

from . import wire
from .channel import (
    _TYPE_INDEX,
    MESSAGE_TYPES,
    VIOLATION_CODES,
    ChannelState,
    _blob,
    _u64,
    replay,
)
from .crypto import (
    Htlc,
    closing_digest,
    commitment_digest,
    derive_pubkey,
    funding_digest,
    htlc_digest,
    per_commitment_point,
    per_commitment_secret,
    secret_from,
    verify,
)

__all__ = [
    "LOCAL_NODE_SECRET",
    "OPENING_TYPES",
    "REAL_MESSAGE_TYPES",
    "REAL_VIOLATION_CODES",
    "RealChannelState",
    "commitment_outputs",
    "local_point",
    "local_seed",
    "replay_wire",
    "verifications",
]

LOCAL_NODE_SECRET: Final = hashlib.sha256(b"shardpool.demo/local-node").digest()
"""Our node's secret, from which each channel's per-commitment seed is derived."""

OPENING_TYPES: Final[tuple[str, ...]] = ("open_channel", "funding_created", "channel_ready")
REAL_MESSAGE_TYPES: Final[tuple[str, ...]] = OPENING_TYPES + MESSAGE_TYPES

REAL_VIOLATION_CODES: Final[dict[str, str]] = {
    **VIOLATION_CODES,
    "malformed": "not a decodable BOLT #2 message, or a field out of range",
    "unknown_type": "a BOLT #2 message type this state machine does not handle",
    "channel_not_ready": "a channel message before open_channel, funding_created, channel_ready",
    "unexpected_opening": "an opening message out of its place in the opening sequence",
    "wrong_channel": "the message's channel_id is not the channel's",
    "invalid_funding": "open_channel pushes more than it funds",
    "bad_key": "open_channel carries a funding pubkey or HTLC basepoint that is not a point",
    "bad_commitment_signature": "funding_created / commitment_signed signature does not verify",
    "bad_htlc_signature": "an HTLC signature of commitment_signed does not verify",
    "bad_revocation_secret": "revoke_and_ack secret does not match the revoked commitment's point",
    "bad_closing_signature": "closing_signed signature does not verify",
}
"""Every code :meth:`RealChannelState.apply` can return, with what it means."""

_OPEN, _FUNDED, _READY, _OPERATING = range(4)  # phases: what the channel waits for next
_REAL_TYPE_INDEX: Final[dict[str, int]] = {
    **_TYPE_INDEX, **{t: len(_TYPE_INDEX) + i + 1 for i, t in enumerate(OPENING_TYPES)}
}


def local_seed(channel_id: bytes) -> bytes:
    """Our per-commitment seed for ``channel_id`` (32 bytes)."""
    return secret_from(LOCAL_NODE_SECRET, b"/per-commitment-seed/", channel_id)


def local_point(seed: bytes, number: int) -> bytes:
    """Our per-commitment point of commitment ``number`` (33 bytes). Raises ValueError for a
    number outside [0, 2^48)."""
    return per_commitment_point(per_commitment_secret(seed, number))


def commitment_outputs(
    htlcs: Iterable[Htlc], local_msat: int, remote_msat: int, dust_limit_sat: int
) -> tuple[list[Htlc], int, int]:
    """A commitment's outputs from its HTLCs and balances (millisatoshi): ``(untrimmed HTLCs in
    output order, to_local_msat, to_remote_msat)``. The remote offered every HTLC, so all of them,
    trimmed ones included (their amount goes to fees), come out of its balance; an HTLC below
    ``dust_limit_sat`` gets no output (and no signature). Output order: amount, CLTV, payment
    hash, id (BIP 69 sorts by amount, then script)."""
    every = list(htlcs)
    untrimmed = sorted((h for h in every if h[1] // 1000 >= dust_limit_sat),
                       key=lambda h: (h[1], h[3], h[2], h[0]))
    return untrimmed, local_msat, remote_msat - sum(h[1] for h in every)


def _operating(
    fn: Callable[[Any, dict[object, object]], str | None],
) -> Callable[[Any, dict[object, object]], str | None]:
    """``fn`` behind the checks every channel message passes once the channel is open."""

    def check(self: RealChannelState, msg: dict[object, object]) -> str | None:
        if self.phase != _OPERATING:
            return "channel_not_ready"
        if msg.get("channel_id") != self.channel_id:
            return "wrong_channel"
        return fn(self, msg)

    return check


class RealChannelState(ChannelState):
    """One channel's state as our node sees the remote's wire messages (see the module docstring).

    ``verifications`` counts the signatures verified so far and ``secret_checks`` the revocation
    secrets checked (figures, not protocol state). Never raises from :meth:`apply`.
    """

    __slots__ = (
        "channel_id",
        "phase",
        "dust_limit_sat",
        "funding_pubkey",
        "htlc_basepoint",
        "remote_points",
        "seed",
        "verifications",
        "secret_checks",
    )

    def __init__(self, channel_id: bytes) -> None:
        """A channel waiting for its ``open_channel``.

        Raises:
            ValueError: ``channel_id`` is not 32 bytes.
        """
        if type(channel_id) is not bytes or len(channel_id) != 32:
            raise ValueError(f"channel_id must be 32 bytes, got {channel_id!r}")
        super().__init__(0, 0)
        self.channel_id = channel_id
        self.phase = _OPEN
        self.dust_limit_sat = 0
        self.funding_pubkey: PublicKey | None = None
        self.htlc_basepoint: PublicKey | None = None
        # The remote's per-commitment points not yet revoked: the next revoke_and_ack must reveal
        # the secret of the first.
        self.remote_points: list[bytes] = []
        self.seed = local_seed(channel_id)
        self.verifications = 0
        self.secret_checks = 0

    def to_record(self) -> dict[str, Any]:
        """As :meth:`ChannelState.to_record`, the remote's keys as their 33-byte encoding."""
        record = super().to_record()
        for name in ("funding_pubkey", "htlc_basepoint"):
            key = record[name]
            record[name] = None if key is None else key.format()
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RealChannelState:
        """As :meth:`ChannelState.from_record`.

        Raises:
            KeyError: an attribute is missing; ValueError: a key is not a valid point.
        """
        state = super().from_record(record)
        for name in ("funding_pubkey", "htlc_basepoint"):
            blob = getattr(state, name)
            setattr(state, name, None if blob is None else PublicKey(blob))
        return state

    def apply(self, msg: object) -> str | None:
        """Apply one message: a decoded dict (:func:`~shardpool.demo.wire.decode`) or the wire
        bytes themselves. Returns None or a code of :data:`REAL_VIOLATION_CODES`, as
        :meth:`ChannelState.apply`. Never raises."""
        if isinstance(msg, bytes):
            try:
                msg = wire.decode(msg)
            except wire.WireError:
                msg = None
        return super().apply(msg)

    # -- opening ---------------------------------------------------------------------------------

    def _on_open(self, msg: dict[object, object]) -> str | None:
        funding = _u64(msg, "funding_satoshis")
        push = _u64(msg, "push_msat")
        dust = _u64(msg, "dust_limit_satoshis")
        keys = [_blob(msg, k, 33) for k in ("funding_pubkey", "htlc_basepoint",
                                            "first_per_commitment_point")]
        if funding is None or push is None or dust is None or None in keys:
            return "malformed"
        if self.phase != _OPEN:
            return "unexpected_opening"
        if msg.get("temporary_channel_id") != self.channel_id:
            return "wrong_channel"
        if push > funding * 1000:
            return "invalid_funding"
        try:
            funding_pubkey, htlc_basepoint = PublicKey(keys[0]), PublicKey(keys[1])
        except ValueError:
            return "bad_key"
        self.funding_pubkey, self.htlc_basepoint = funding_pubkey, htlc_basepoint
        self.remote_points = [keys[2]]  # type: ignore[list-item]  # checked not None above
        self.dust_limit_sat = dust
        self.local_msat = push
        self.remote_msat = funding * 1000 - push
        self.phase = _FUNDED
        return None

    def _opening_step(self, msg: dict[object, object], phase: int, id_field: str, field: str,
                      size: int) -> tuple[bytes, str | None]:
        """The checks of an opening message after ``open_channel``: its ``field`` (``size``
        bytes), the phase, the channel id (in ``id_field``). ``(value, None)`` or ``(b"",
        code)``."""
        value = _blob(msg, field, size)
        if value is None:
            return b"", "malformed"
        if self.phase != phase:
            return b"", "unexpected_opening"
        if msg.get(id_field) != self.channel_id:
            return b"", "wrong_channel"
        return value, None

    def _on_funding_created(self, msg: dict[object, object]) -> str | None:
        signature, code = self._opening_step(msg, _FUNDED, "temporary_channel_id", "signature", 64)
        if code is not None:
            return code
        assert self.funding_pubkey is not None  # set with the phase
        digest = funding_digest(self.channel_id, local_point(self.seed, 0), self.local_msat,
                                self.remote_msat)
        self.verifications += 1
        if not verify(self.funding_pubkey, signature, digest):
            return "bad_commitment_signature"
        self.phase = _READY
        return None

    def _on_channel_ready(self, msg: dict[object, object]) -> str | None:
        point, code = self._opening_step(msg, _READY, "channel_id",
                                         "second_per_commitment_point", 33)
        if code is not None:
            return code
        self.remote_points.append(point)
        self.phase = _OPERATING
        return None

    # -- what a node checks with its keys ----------------------------------------------------------

    def _next_commitment(self) -> tuple[list[Htlc], int, int]:
        """Our next commitment's outputs: every pending update applied (nothing is mutated)."""
        htlcs = dict(self.htlcs)
        local, remote = self.local_msat, self.remote_msat
        for htlc_id, fulfilled in self.pending_removes.items():
            amount = htlcs.pop(htlc_id)[0]
            if fulfilled:
                local += amount
                remote -= amount
        htlcs.update(self.pending_adds)
        return commitment_outputs(
            ((i, a, h, c) for i, (a, h, c) in htlcs.items()), local, remote, self.dust_limit_sat
        )

    def _on_commitment_signed_real(self, msg: dict[object, object]) -> str | None:
        signature = _blob(msg, "signature", 64)
        htlc_sigs = msg.get("htlc_signature")
        if signature is None or type(htlc_sigs) is not list:
            return "malformed"
        if not self.pending_adds and not self.pending_removes:
            return "empty_commitment"
        untrimmed, to_local, to_remote = self._next_commitment()
        if len(htlc_sigs) != len(untrimmed) or msg.get("num_htlcs") != len(htlc_sigs):
            return "commitment_mismatch"
        number = self.commitment_number + 1
        point = local_point(self.seed, number)
        digest = commitment_digest(self.channel_id, number, point, to_local, to_remote, untrimmed)
        self.verifications += 1
        assert self.funding_pubkey is not None and self.htlc_basepoint is not None  # operating
        if not verify(self.funding_pubkey, signature, digest):
            return "bad_commitment_signature"
        if untrimmed:
            htlc_key = derive_pubkey(self.htlc_basepoint, point)
            for i, (htlc, sig) in enumerate(zip(untrimmed, htlc_sigs, strict=True)):
                self.verifications += 1
                if not verify(htlc_key, sig, htlc_digest(digest, i, htlc)):
                    return "bad_htlc_signature"
        self._commit()
        return None

    def _on_revoke_and_ack_real(self, msg: dict[object, object]) -> str | None:
        secret = _blob(msg, "per_commitment_secret", 32)
        next_point = _blob(msg, "next_per_commitment_point", 33)
        if secret is None or next_point is None:
            return "malformed"
        if self.outstanding == 0:
            return "revoke_without_commitment"
        self.secret_checks += 1
        try:
            revealed = per_commitment_point(secret)
        except ValueError:  # zero or not below the group order: no secret of any point
            return "bad_revocation_secret"
        if revealed != self.remote_points[0]:
            return "bad_revocation_secret"
        self.remote_points = [self.remote_points[-1], next_point]
        return ChannelState._on_revoke_and_ack(self, msg)

    def _on_closing_signed_real(self, msg: dict[object, object]) -> str | None:
        fee = _u64(msg, "fee_satoshis")
        signature = _blob(msg, "signature", 64)
        script = self.shutdown_script
        if fee is not None and signature is not None and script is not None:
            assert self.funding_pubkey is not None  # operating
            self.verifications += 1
            digest = closing_digest(self.channel_id, fee, self.local_msat, self.remote_msat,
                                    script)
            if not verify(self.funding_pubkey, signature, digest):
                return "bad_closing_signature"
        return ChannelState._on_closing_signed(self, msg)

    def digest(self) -> tuple[object, ...]:
        """:meth:`ChannelState.digest` plus the opening phase, the dust limit and the remote's
        unrevoked per-commitment points (the keys follow from ``open_channel``)."""
        return (*super().digest(), self.phase, self.dust_limit_sat, tuple(self.remote_points))

    def __repr__(self) -> str:
        if self.phase != _OPERATING and not self.force_closed:
            return f"RealChannelState(opening, phase={self.phase})"
        return "Real" + super().__repr__()


RealChannelState._APPLY = {
    "open_channel": RealChannelState._on_open,
    "funding_created": RealChannelState._on_funding_created,
    "channel_ready": RealChannelState._on_channel_ready,
    **{t: _operating(fn) for t, fn in {
        **ChannelState._APPLY,
        "commitment_signed": RealChannelState._on_commitment_signed_real,
        "revoke_and_ack": RealChannelState._on_revoke_and_ack_real,
        "closing_signed": RealChannelState._on_closing_signed_real,
    }.items()},
}
RealChannelState._TYPE_INDEX = _REAL_TYPE_INDEX


def replay_wire(
    stream: Iterable[tuple[bytes, bytes]],
    states: dict[bytes, ChannelState] | None = None,
) -> tuple[dict[bytes, ChannelState], dict[str, int]]:
    """Apply a ``(channel_id, wire message)`` stream serially, in order: the reference result
    (:func:`~shardpool.demo.channel.replay` with a :class:`RealChannelState` per channel).
    Never raises on bad messages (they are counted); channel ids must be 32 bytes.

    Raises:
        ValueError: a channel id is not 32 bytes.
    """
    return replay(stream, states, new_state=RealChannelState)


def verifications(states: Mapping[bytes, ChannelState]) -> int:
    """Signatures verified by the :class:`RealChannelState` among ``states``."""
    return sum(s.verifications for s in states.values() if isinstance(s, RealChannelState))
