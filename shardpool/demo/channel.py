"""A compact BOLT #2 channel state machine: one direction of updates, as our node sees them.

Pure Python, no I/O, no clocks. Messages are plain dicts (they travel as CBOR)::

    update_add_htlc      {id: int, amount_msat: int, payment_hash: bytes(32), cltv_expiry: int}
    update_fulfill_htlc  {id: int, payment_preimage: bytes(32)}
    update_fail_htlc     {id: int, reason: bytes}
    commitment_signed    {signature: bytes(64), num_htlcs: int}
    revoke_and_ack       {per_commitment_secret: bytes(32)}
    shutdown             {scriptpubkey: bytes(1..80)}
    closing_signed       {fee_satoshis: int, signature: bytes(64)}
    channel_reestablish  {next_commitment_number: int, next_revocation_number: int}

Every message carries ``"type"`` too. Unknown extra keys are ignored (BOLT's "it's OK to be odd").

The model (deliberately one-directional, so it stays small while keeping BOLT #2's ordering rules):

* The remote peer offers HTLCs (``update_add_htlc``) paid from its balance and settles them
  (``update_fulfill_htlc`` moves the amount to our balance, ``update_fail_htlc`` returns it).
  Real BOLT has the fulfilling side be the *receiver* of the HTLC; folding both roles into one
  stream keeps a single HTLC set while every ordering rule below still bites.
* Updates are *pending* until the remote's ``commitment_signed`` covers them; only then are added
  HTLCs *committed* and removals settled into the balances. ``num_htlcs`` must equal the HTLC count
  after applying every pending update, and a commitment with no pending update is refused.
* Each ``commitment_signed`` we receive makes us answer with our own ``commitment_signed`` for the
  remote's commitment, which the remote must revoke: ``revoke_and_ack`` is valid only while such a
  commitment is outstanding (a counter; the remote may sign again before revoking).
* HTLC ids are strictly increasing. ``channel_reestablish`` (after a reconnect) must restate the
  remote's counters exactly (``next_commitment_number == commitments received + 1``,
  ``next_revocation_number == revocations received``) and, as BOLT #2 demands, reverses every
  pending (uncommitted) update, so retransmitted adds may reuse their ids.
* ``shutdown`` needs no pending update; afterwards no ``update_add_htlc``. The same ``shutdown``
  may be retransmitted (after a reestablish); a different scriptpubkey is a violation.
* ``closing_signed`` needs a prior ``shutdown``, no HTLC (pending or committed) and no unrevoked
  commitment; our node accepts any fee up to the channel capacity, so the first valid
  ``closing_signed`` completes the mutual close. After that only ``channel_reestablish`` is valid.

Any message that is invalid in the current state is a protocol violation: :meth:`ChannelState.apply`
returns a short code (see :data:`VIOLATION_CODES`) and marks the state ``force_closed`` (a real node
would broadcast its commitment). Every later message then gets ``"force_closed"``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Final, TypeVar

__all__ = [
    "CLTV_EXPIRY_LIMIT",
    "DEFAULT_LOCAL_MSAT",
    "DEFAULT_REMOTE_MSAT",
    "MAX_ACCEPTED_HTLCS",
    "MESSAGE_TYPES",
    "VIOLATION_CODES",
    "ChannelState",
    "replay",
]

_sha256 = hashlib.sha256

MAX_U64: Final = 2**64 - 1
MAX_ACCEPTED_HTLCS: Final = 483
"""BOLT #2 upper bound on ``max_accepted_htlcs``; the HTLC count (committed + pending adds) cap."""
CLTV_EXPIRY_LIMIT: Final = 500_000_000
"""``cltv_expiry`` must be a block height, i.e. below this (BOLT #2)."""
DEFAULT_LOCAL_MSAT: Final = 10_000_000_000
"""Our starting balance in millisatoshi (10 M sat)."""
DEFAULT_REMOTE_MSAT: Final = 10_000_000_000
"""The remote's starting balance in millisatoshi (10 M sat)."""
MAX_SCRIPTPUBKEY_BYTES: Final = 80

MESSAGE_TYPES: Final[tuple[str, ...]] = (
    "update_add_htlc",
    "update_fulfill_htlc",
    "update_fail_htlc",
    "commitment_signed",
    "revoke_and_ack",
    "shutdown",
    "closing_signed",
    "channel_reestablish",
)

VIOLATION_CODES: Final[dict[str, str]] = {
    "malformed": "not a dict, or a field is missing / of the wrong type / of the wrong size",
    "unknown_type": "'type' is a string but not one of MESSAGE_TYPES",
    "force_closed": "the channel was already force-closed by an earlier violation",
    "channel_closed": "a message other than channel_reestablish after the mutual close completed",
    "add_after_shutdown": "update_add_htlc after shutdown",
    "non_increasing_htlc_id": "update_add_htlc id not above the previous one",
    "invalid_amount": "update_add_htlc amount_msat of 0",
    "invalid_cltv": "update_add_htlc cltv_expiry of 0 or not below CLTV_EXPIRY_LIMIT",
    "too_many_htlcs": "update_add_htlc beyond MAX_ACCEPTED_HTLCS",
    "insufficient_balance": "update_add_htlc amount above the remote's available balance",
    "unknown_htlc": "fulfill/fail of an HTLC id never added (or already settled)",
    "uncommitted_htlc": "fulfill/fail of an HTLC not yet covered by a commitment_signed",
    "htlc_already_removed": "fulfill/fail of an HTLC that already has a pending removal",
    "bad_preimage": "update_fulfill_htlc preimage does not hash to the payment_hash",
    "empty_commitment": "commitment_signed with no pending update to cover",
    "commitment_mismatch": (
        "commitment_signed num_htlcs differs from the HTLC count after pending updates"
    ),
    "revoke_without_commitment": "revoke_and_ack with no outstanding commitment",
    "shutdown_with_pending": "shutdown while updates are not yet committed",
    "shutdown_script_changed": "a second shutdown with a different scriptpubkey",
    "closing_before_shutdown": "closing_signed without a prior shutdown",
    "closing_with_htlcs": "closing_signed while HTLCs are pending or committed",
    "closing_unrevoked": "closing_signed while a commitment is still unrevoked",
    "closing_fee_too_high": "closing_signed fee above the channel capacity",
    "reestablish_mismatch": "channel_reestablish counters differ from ours",
    "internal_error": "a bug in this module (never expected; reported instead of raised)",
}
"""Every code :meth:`ChannelState.apply` can return, with what it means."""

_MASK64: Final = 2**64 - 1
_FNV_PRIME: Final = 0x100000001B3
_TYPE_INDEX: Final[dict[str, int]] = {t: i + 1 for i, t in enumerate(MESSAGE_TYPES)}


def _u64(msg: dict[object, object], key: str) -> int | None:
    v = msg.get(key)
    # ``type(v) is int`` on purpose: bool is an int subclass and is never a valid field.
    if type(v) is int and 0 <= v <= MAX_U64:
        return v
    return None


def _blob(msg: dict[object, object], key: str, size: int) -> bytes | None:
    v = msg.get(key)
    if type(v) is bytes and len(v) == size:
        return v
    return None


_S = TypeVar("_S", bound="ChannelState")


def _slot_names(cls: type) -> list[str]:
    """The ``__slots__`` of ``cls`` and its bases, base first."""
    return [name for klass in reversed(cls.__mro__) for name in klass.__dict__.get("__slots__", ())]


class ChannelState:
    """One channel's state as our node sees the remote's updates. See the module docstring.

    Amounts are millisatoshi. All attributes are public for inspection; mutate only via
    :meth:`apply`. ``last_seq`` is not part of the protocol: it is the pool sequence number of the
    last message a handler applied (``-1`` before any), kept here so duplicates can be recognised.
    """

    __slots__ = (
        "local_msat",
        "remote_msat",
        "inflight_msat",
        "htlcs",
        "pending_adds",
        "pending_removes",
        "last_htlc_id",
        "committed_last_htlc_id",
        "commitment_number",
        "revocation_number",
        "outstanding",
        "shutdown_script",
        "closed",
        "closing_fee_sat",
        "force_closed",
        "violation",
        "applied",
        "trace",
        "last_seq",
    )

    # Message type -> validator, and type -> its number in ``trace``; a subclass that speaks
    # more message types (or checks more) replaces both.
    _APPLY: ClassVar[Mapping[str, Callable[[Any, dict[object, object]], str | None]]]
    _TYPE_INDEX: ClassVar[Mapping[str, int]]

    def __init__(
        self, local_msat: int = DEFAULT_LOCAL_MSAT, remote_msat: int = DEFAULT_REMOTE_MSAT
    ) -> None:
        """Start an open channel with the given balances (millisatoshi).

        Raises:
            ValueError: a balance is negative or not an int.
        """
        for name, v in (("local_msat", local_msat), ("remote_msat", remote_msat)):
            if type(v) is not int or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        self.local_msat: int = local_msat
        self.remote_msat: int = remote_msat
        # Sum of the amounts of pending-add and committed HTLCs: the part of remote_msat locked up.
        self.inflight_msat: int = 0
        # Committed: id -> (amount_msat, payment_hash, cltv_expiry).
        self.htlcs: dict[int, tuple[int, bytes, int]] = {}
        self.pending_adds: dict[int, tuple[int, bytes, int]] = {}
        self.pending_removes: dict[int, bool] = {}  # id -> True (fulfilled) / False (failed)
        self.last_htlc_id: int = -1
        self.committed_last_htlc_id: int = -1
        self.commitment_number: int = 0  # commitment_signed received
        self.revocation_number: int = 0  # revoke_and_ack received
        self.outstanding: int = 0  # our commitments the remote has not revoked yet
        self.shutdown_script: bytes | None = None
        self.closed: bool = False
        self.closing_fee_sat: int | None = None
        self.force_closed: bool = False
        self.violation: str | None = None  # the first violation, the reason for force_closed
        self.applied: int = 0  # valid messages applied
        self.trace: int = 0xCBF29CE484222325  # FNV-1a over the applied type sequence
        self.last_seq: int = -1

    # -- moving to another worker ----------------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """Every attribute as CBOR values, for a move to another worker (:meth:`from_record`
        rebuilds the state)."""
        return {name: getattr(self, name) for name in _slot_names(type(self))}

    @classmethod
    def from_record(cls: type[_S], record: Mapping[str, Any]) -> _S:
        """The state :meth:`to_record` described (after a CBOR round trip: arrays are lists).

        Raises:
            KeyError: an attribute is missing from ``record``.
        """
        state = cls.__new__(cls)
        for name in _slot_names(cls):
            setattr(state, name, record[name])
        # CBOR has no tuples: the HTLCs' (amount_msat, payment_hash, cltv_expiry) come as lists.
        state.htlcs = {int(k): tuple(v) for k, v in state.htlcs.items()}  # type: ignore[misc]
        state.pending_adds = {int(k): tuple(v) for k, v in state.pending_adds.items()}  # type: ignore[misc]
        return state

    @property
    def available_msat(self) -> int:
        """What the remote can still offer in new HTLCs (millisatoshi)."""
        return self.remote_msat - self.inflight_msat

    def apply(self, msg: object) -> str | None:
        """Apply one message from the remote.

        Returns:
            ``None`` if the message is valid here (the state advanced), else a violation code from
            :data:`VIOLATION_CODES`; the state is then left unchanged except ``force_closed = True``
            (and ``violation`` set on the first one).

        Never raises, whatever ``msg`` is.
        """
        if self.force_closed:
            return "force_closed"
        try:
            if type(msg) is not dict:
                code: str | None = "malformed"
            else:
                t = msg.get("type")
                if type(t) is not str:
                    code = "malformed"
                else:
                    fn = self._APPLY.get(t)
                    if fn is None:
                        code = "unknown_type"
                    elif self.closed and t != "channel_reestablish":
                        code = "channel_closed"
                    else:
                        code = fn(self, msg)
                        if code is None:
                            self.applied += 1
                            index = self._TYPE_INDEX[t]
                            self.trace = ((self.trace ^ index) * _FNV_PRIME) & _MASK64
        except Exception:
            # The validators check every field before mutating anything, so this is unreachable
            # unless this module has a bug; the contract is still "report, never raise".
            code = "internal_error"
        if code is not None:
            self.force_closed = True
            if self.violation is None:
                self.violation = code
        return code

    # Each _on_* validates every field first and mutates only once the message is known valid,
    # so a refused message leaves the state as it was (apart from force_closed).

    def _on_add(self, msg: dict[object, object]) -> str | None:
        htlc_id = _u64(msg, "id")
        amount = _u64(msg, "amount_msat")
        payment_hash = _blob(msg, "payment_hash", 32)
        cltv = _u64(msg, "cltv_expiry")
        if htlc_id is None or amount is None or payment_hash is None or cltv is None:
            return "malformed"
        if self.shutdown_script is not None:
            return "add_after_shutdown"
        if htlc_id <= self.last_htlc_id:
            return "non_increasing_htlc_id"
        if amount == 0:
            return "invalid_amount"
        if cltv == 0 or cltv >= CLTV_EXPIRY_LIMIT:
            return "invalid_cltv"
        if len(self.htlcs) + len(self.pending_adds) >= MAX_ACCEPTED_HTLCS:
            return "too_many_htlcs"
        if amount > self.remote_msat - self.inflight_msat:
            return "insufficient_balance"
        self.pending_adds[htlc_id] = (amount, payment_hash, cltv)
        self.last_htlc_id = htlc_id
        self.inflight_msat += amount
        return None

    def _removable(self, htlc_id: int) -> str | None:
        if htlc_id not in self.htlcs:
            return "uncommitted_htlc" if htlc_id in self.pending_adds else "unknown_htlc"
        if htlc_id in self.pending_removes:
            return "htlc_already_removed"
        return None

    def _on_fulfill(self, msg: dict[object, object]) -> str | None:
        htlc_id = _u64(msg, "id")
        preimage = _blob(msg, "payment_preimage", 32)
        if htlc_id is None or preimage is None:
            return "malformed"
        code = self._removable(htlc_id)
        if code is not None:
            return code
        if _sha256(preimage).digest() != self.htlcs[htlc_id][1]:
            return "bad_preimage"
        self.pending_removes[htlc_id] = True
        return None

    def _on_fail(self, msg: dict[object, object]) -> str | None:
        htlc_id = _u64(msg, "id")
        if htlc_id is None or type(msg.get("reason")) is not bytes:
            return "malformed"
        code = self._removable(htlc_id)
        if code is not None:
            return code
        self.pending_removes[htlc_id] = False
        return None

    def _on_commitment_signed(self, msg: dict[object, object]) -> str | None:
        num_htlcs = _u64(msg, "num_htlcs")
        if num_htlcs is None or _blob(msg, "signature", 64) is None:
            return "malformed"
        if not self.pending_adds and not self.pending_removes:
            return "empty_commitment"
        if num_htlcs != len(self.htlcs) + len(self.pending_adds) - len(self.pending_removes):
            return "commitment_mismatch"
        self._commit()
        return None

    def _commit(self) -> None:
        """Apply a valid ``commitment_signed``: pending updates become committed."""
        htlcs = self.htlcs
        for htlc_id, fulfilled in self.pending_removes.items():
            amount = htlcs.pop(htlc_id)[0]
            self.inflight_msat -= amount
            if fulfilled:
                self.remote_msat -= amount
                self.local_msat += amount
        htlcs.update(self.pending_adds)
        self.pending_adds.clear()
        self.pending_removes.clear()
        self.committed_last_htlc_id = self.last_htlc_id
        self.commitment_number += 1
        self.outstanding += 1

    def _on_revoke_and_ack(self, msg: dict[object, object]) -> str | None:
        if _blob(msg, "per_commitment_secret", 32) is None:
            return "malformed"
        if self.outstanding == 0:
            return "revoke_without_commitment"
        self.outstanding -= 1
        self.revocation_number += 1
        return None

    def _on_shutdown(self, msg: dict[object, object]) -> str | None:
        script = msg.get("scriptpubkey")
        if type(script) is not bytes or not 0 < len(script) <= MAX_SCRIPTPUBKEY_BYTES:
            return "malformed"
        if self.shutdown_script is not None:
            return None if script == self.shutdown_script else "shutdown_script_changed"
        if self.pending_adds or self.pending_removes:
            return "shutdown_with_pending"
        self.shutdown_script = script
        return None

    def _on_closing_signed(self, msg: dict[object, object]) -> str | None:
        fee = _u64(msg, "fee_satoshis")
        if fee is None or _blob(msg, "signature", 64) is None:
            return "malformed"
        if self.shutdown_script is None:
            return "closing_before_shutdown"
        if self.htlcs or self.pending_adds:
            return "closing_with_htlcs"
        if self.outstanding:
            return "closing_unrevoked"
        if fee * 1000 > self.local_msat + self.remote_msat:
            return "closing_fee_too_high"
        self.closed = True
        self.closing_fee_sat = fee
        return None

    def _on_reestablish(self, msg: dict[object, object]) -> str | None:
        next_commitment = _u64(msg, "next_commitment_number")
        next_revocation = _u64(msg, "next_revocation_number")
        if next_commitment is None or next_revocation is None:
            return "malformed"
        if (
            next_commitment != self.commitment_number + 1
            or next_revocation != self.revocation_number
        ):
            return "reestablish_mismatch"
        # BOLT #2: on reconnection, reverse every update the remote sent that no
        # commitment_signed covered; the remote retransmits them (same ids) if it still wants them.
        for amount, *_ in self.pending_adds.values():
            self.inflight_msat -= amount
        self.pending_adds.clear()
        self.pending_removes.clear()
        self.last_htlc_id = self.committed_last_htlc_id
        return None

    def digest(self) -> tuple[object, ...]:
        """A hashable, comparable summary of the whole protocol state.

        Two states fed the same messages in the same order have equal digests; the ``trace`` field
        (a hash of the applied type sequence) makes most reorderings visible even where every
        message happened to be valid. ``last_seq`` is excluded (it is pool bookkeeping).
        """
        return (
            self.local_msat,
            self.remote_msat,
            self.inflight_msat,
            tuple(sorted(self.htlcs)),
            tuple(sorted(self.pending_adds)),
            tuple(sorted(self.pending_removes.items())),
            self.last_htlc_id,
            self.commitment_number,
            self.revocation_number,
            self.outstanding,
            self.shutdown_script,
            self.closed,
            self.closing_fee_sat,
            self.force_closed,
            self.violation,
            self.applied,
            self.trace,
        )

    def __repr__(self) -> str:
        status = (
            f"force_closed({self.violation})"
            if self.force_closed
            else "closed"
            if self.closed
            else "shutting_down"
            if self.shutdown_script is not None
            else "open"
        )
        return (
            f"ChannelState({status}, local={self.local_msat}, remote={self.remote_msat}, "
            f"htlcs={len(self.htlcs)}, pending={len(self.pending_adds)}+/"
            f"{len(self.pending_removes)}-, commitments={self.commitment_number}, "
            f"revocations={self.revocation_number}, applied={self.applied})"
        )


ChannelState._APPLY = {
    "update_add_htlc": ChannelState._on_add,
    "update_fulfill_htlc": ChannelState._on_fulfill,
    "update_fail_htlc": ChannelState._on_fail,
    "commitment_signed": ChannelState._on_commitment_signed,
    "revoke_and_ack": ChannelState._on_revoke_and_ack,
    "shutdown": ChannelState._on_shutdown,
    "closing_signed": ChannelState._on_closing_signed,
    "channel_reestablish": ChannelState._on_reestablish,
}
ChannelState._TYPE_INDEX = _TYPE_INDEX


def replay(
    stream: Iterable[tuple[bytes, object]],
    states: dict[bytes, ChannelState] | None = None,
    *,
    new_state: Callable[[bytes], ChannelState] | None = None,
) -> tuple[dict[bytes, ChannelState], dict[str, int]]:
    """Apply a ``(channel_id, message)`` stream serially, in order: the reference result.

    Args:
        stream: the messages, in arrival order.
        states: states to continue from (updated in place); a fresh dict if omitted.
        new_state: makes the state of a channel first seen, from its id (default: a
            :class:`ChannelState`, open with the default balances).

    Returns:
        ``(states by channel id, violation counts by code)``; the counts are empty for a valid
        stream. Never raises on bad messages (they are counted); a channel id must be hashable.

    Raises:
        whatever ``new_state`` raises for a channel id.
    """
    if states is None:
        states = {}
    violations: dict[str, int] = {}
    get = states.get
    make = new_state or (lambda _cid: ChannelState())
    for channel_id, msg in stream:
        state = get(channel_id)
        if state is None:
            state = states[channel_id] = make(channel_id)
        code = state.apply(msg)
        if code is not None:
            violations[code] = violations.get(code, 0) + 1
    return states, violations
