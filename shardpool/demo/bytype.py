"""The naive baseline shardpool exists to replace: dispatch *by message type* (lnd issue 8393).

lnd hands different message types of one channel to different goroutines. Here the same design
runs on processes: the dispatcher (this process) routes each message by type to one of three
type-worker processes — ``update`` (``update_*``), ``commitment`` (``commitment_signed``,
``revoke_and_ack``) and ``control`` (``shutdown``, ``closing_signed``, ``channel_reestablish`` and
anything unknown) — each of which "handles" its messages in FIFO order (sleeping ``delay_s`` ±
``jitter`` per message to model the work) and then reports it done. This process is the single
state applier: it applies each message to its channel's :class:`ChannelState` in the order the
type-workers *finished* them.

Within one type the order is kept, but across types it is not: the ``update`` worker carries most
of the traffic, so its backlog grows while the ``commitment`` worker runs ahead. A
``commitment_signed`` then reaches the state machine before the updates it covers
(``empty_commitment`` / ``commitment_mismatch``), a ``revoke_and_ack`` before its
``commitment_signed``, a fulfil before its HTLC is committed (``uncommitted_htlc``) — and the
channel force-closes. A stream that is valid
when applied in arrival order (:func:`~shardpool.demo.channel.replay` gives zero violations) comes
out with violations on nearly every channel.
"""

from __future__ import annotations

import os
import queue
import random
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, Final

from .channel import ChannelState

__all__ = ["TYPE_GROUPS", "run_by_type_dispatch"]

TYPE_GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "update": ("update_add_htlc", "update_fulfill_htlc", "update_fail_htlc"),
    "commitment": ("commitment_signed", "revoke_and_ack"),
    "control": ("shutdown", "closing_signed", "channel_reestablish"),
}
"""Which type-worker handles which message types; anything else goes to ``control``."""

_ROUTE: Final[dict[str, str]] = {t: g for g, types in TYPE_GROUPS.items() for t in types}
_POLL_S: Final = 0.5  # how often a blocked wait re-checks deadlines and process liveness
_JOIN_S: Final = 5.0


def _type_worker(
    group: str,
    inbox: Any,
    outbox: Any,
    delay_s: float,
    jitter: float,
    seed: int,
    lifetime_s: float,
    parent_pid: int,
) -> None:
    """Body of one type-worker process: take message indexes from ``inbox`` in order, "handle"
    each (sleep ``delay_s * (1 ± jitter)`` seconds), report ``("done", index)`` on ``outbox``.

    Exits on a ``None`` sentinel, when ``lifetime_s`` seconds have passed, or when its parent is
    gone, so it never outlives a dispatcher that crashed. Raises nothing on its own.
    """
    rng = random.Random(f"{seed}:{group}")
    outbox.put(("ready", group))
    end = time.monotonic() + lifetime_s
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            return
        try:
            item = inbox.get(timeout=min(remaining, _POLL_S))
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if item is None:
            return
        if delay_s > 0:
            # Models the per-message handling work of this type-worker (not a test-side sleep).
            time.sleep(delay_s * (1.0 + jitter * (2.0 * rng.random() - 1.0)))
        outbox.put(("done", item))


def run_by_type_dispatch(
    stream: Sequence[tuple[bytes, Any]],
    *,
    delay_s: float = 0.0002,
    timeout: float = 60.0,
    jitter: float = 0.5,
    seed: int = 0,
    new_state: Callable[[bytes], ChannelState] | None = None,
    type_of: Callable[[Any], str | None] | None = None,
    inline: Collection[str] = (),
) -> dict[str, Any]:
    """Run ``stream`` through the by-type dispatch baseline (see the module docstring).

    Starts three spawned processes (``multiprocess``), waits for each to report ready, feeds every
    message, applies them in finishing order, then stops and reaps every process — also on error.

    Args:
        stream: ``(channel_id, message)`` pairs in arrival order (e.g. from
            :func:`~shardpool.demo.traffic.generate`).
        delay_s: mean handling time per message in each type-worker, in seconds (>= 0).
        timeout: overall deadline in seconds, process start-up included (> 0).
        jitter: relative spread of the per-message handling time, in [0, 1].
        seed: seeds the per-worker jitter.
        new_state: the state of a channel first seen, from its id (default: a
            :class:`ChannelState`); :class:`~shardpool.demo.real.RealChannelState` for the real
            traffic.
        type_of: a message's type name (default: a dict's ``"type"``);
            :func:`~shardpool.demo.wire.message_type` for wire messages.
        inline: message types this process applies itself, at arrival and in order, instead of
            dispatching them: a channel's opening (lnd's funding manager finishes it before the
            channel's link, where the by-type race happens, exists).

    Returns:
        ``{"messages", "channels", "violations", "violations_by_code", "root_causes",
        "force_closed_channels", "reordered_messages", "elapsed_s", "startup_s", "worker_pids",
        "exitcodes"}``: ``violations_by_code`` counts every violating message (the follow-up
        ``"force_closed"`` ones included), ``root_causes`` the first violation of each force-closed
        channel, ``reordered_messages`` the messages applied after a later-arriving message of the
        same channel. ``elapsed_s`` runs from the first message fed to the last one applied.

    Raises:
        ValueError: an argument is out of range.
        TimeoutError: the workers did not start, or the run did not finish, within ``timeout``.
        RuntimeError: a type-worker died before the run finished.
    """
    _check_arguments(delay_s, timeout, jitter)
    # Imported here so that importing the demo package (e.g. in a pool worker that only needs the
    # handler) does not pay for multiprocess/dill.
    import multiprocess

    ctx = multiprocess.get_context("spawn")
    start = time.monotonic()
    deadline = start + timeout
    outbox = ctx.Queue()
    inboxes = {group: ctx.Queue() for group in TYPE_GROUPS}
    procs: list[Any] = []
    finished = False
    try:
        for group, inbox in inboxes.items():
            proc = ctx.Process(
                target=_type_worker,
                args=(group, inbox, outbox, delay_s, jitter, seed, timeout, os.getpid()),
                name=f"bytype-{group}",
                daemon=True,
            )
            proc.start()
            procs.append(proc)

        ready = 0
        while ready < len(procs):
            kind, _ = _get(outbox, deadline, procs, "type-workers to start")
            ready += kind == "ready"
        startup_s = time.monotonic() - start

        t0 = time.perf_counter()
        type_name = type_of or _dict_type
        ledger = _Ledger(new_state)
        dispatched = 0
        for index, (cid, msg) in enumerate(stream):
            msg_type = type_name(msg)
            if msg_type in inline:
                ledger.apply(index, cid, msg)
                continue
            group = _ROUTE.get(msg_type, "control") if type(msg_type) is str else "control"
            inboxes[group].put(index)
            dispatched += 1

        for _ in range(dispatched):
            _, index = _get(outbox, deadline, procs, "the run to finish")
            ledger.apply(index, *stream[index])
        elapsed_s = time.perf_counter() - t0

        for inbox in inboxes.values():
            inbox.put(None)
        finished = True
    finally:
        exitcodes = _reap(procs, deadline, graceful=finished)
        for q in (outbox, *inboxes.values()):
            # Nothing left in these queues is needed; do not let a feeder thread block our exit.
            q.cancel_join_thread()
            q.close()

    return {
        "messages": len(stream),
        **ledger.summary(),
        "elapsed_s": elapsed_s,
        "startup_s": startup_s,
        "worker_pids": [p.pid for p in procs],
        "exitcodes": exitcodes,
    }


def _check_arguments(delay_s: float, timeout: float, jitter: float) -> None:
    """Raises ValueError naming the first argument of :func:`run_by_type_dispatch` out of range."""
    if not isinstance(delay_s, (int, float)) or not delay_s >= 0:
        raise ValueError(f"delay_s must be >= 0 seconds, got {delay_s!r}")
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if not isinstance(jitter, (int, float)) or not 0 <= jitter <= 1:
        raise ValueError(f"jitter must be within [0, 1], got {jitter!r}")


def _dict_type(msg: Any) -> str | None:
    t = msg.get("type") if type(msg) is dict else None
    return t if type(t) is str else None


class _Ledger:
    """The front side: applies each message in the order the type-workers finished it."""

    def __init__(self, new_state: Callable[[bytes], ChannelState] | None = None) -> None:
        self.new_state = new_state or (lambda _cid: ChannelState())
        self.states: dict[bytes, ChannelState] = {}
        self.last_index: dict[bytes, int] = {}
        self.by_code: dict[str, int] = {}
        self.reordered = 0

    def apply(self, index: int, channel_id: bytes, msg: Any) -> None:
        """Apply message ``index`` of the stream (arrival order) to its channel's state."""
        state = self.states.get(channel_id)
        if state is None:
            state = self.states[channel_id] = self.new_state(channel_id)
        if index < self.last_index.get(channel_id, -1):
            self.reordered += 1
        else:
            self.last_index[channel_id] = index
        code = state.apply(msg)
        if code is not None:
            self.by_code[code] = self.by_code.get(code, 0) + 1

    def summary(self) -> dict[str, Any]:
        """The figures of :func:`run_by_type_dispatch` that come from applying."""
        root_causes: dict[str, int] = {}
        for state in self.states.values():
            if state.violation is not None:
                root_causes[state.violation] = root_causes.get(state.violation, 0) + 1
        return {
            "channels": len(self.states),
            "violations": sum(self.by_code.values()),
            "violations_by_code": dict(sorted(self.by_code.items())),
            "root_causes": dict(sorted(root_causes.items())),
            "force_closed_channels": sum(s.force_closed for s in self.states.values()),
            "reordered_messages": self.reordered,
        }


def _get(outbox: Any, deadline: float, procs: list[Any], what: str) -> tuple[str, Any]:
    """Next item from ``outbox``, waiting at most until ``deadline`` (monotonic seconds).

    Raises:
        TimeoutError: the deadline passed.
        RuntimeError: a worker died (then nothing more will come from it).
    """
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"by-type dispatch: timed out waiting for {what}")
        try:
            item: tuple[str, Any] = outbox.get(timeout=min(remaining, _POLL_S))
            return item
        except queue.Empty:
            dead = [f"{p.name} (exit code {p.exitcode})" for p in procs if not p.is_alive()]
            if dead:
                raise RuntimeError(
                    f"by-type dispatch: worker died while waiting for {what}: {', '.join(dead)}"
                ) from None


def _reap(procs: list[Any], deadline: float, *, graceful: bool) -> list[int | None]:
    """Stop every process: if ``graceful`` (they were sent their sentinel) join each until
    ``deadline`` (at most 5 s, at least a short grace); then terminate, then kill whatever is left.
    Returns the exit codes; never raises for a process that is already gone."""
    if graceful:
        for proc in procs:
            proc.join(timeout=max(0.2, min(_JOIN_S, deadline - time.monotonic())))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=_JOIN_S)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=_JOIN_S)
    return [proc.exitcode for proc in procs]
