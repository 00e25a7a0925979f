"""The public library API: :class:`ShardPool`.

::

    from shardpool import ShardPool

    def handle(channel, seq, message, redelivered):
        channel.state = (channel.state or 0) + message["amount"]
        return channel.state

    with ShardPool(handle, workers=4) as pool:
        pool.submit(b"chan-1", {"amount": 5})          # fire and forget, in order per channel
        total = pool.request(b"chan-1", {"amount": 1}).result(timeout=5)   # wait for one result
        pool.drain(timeout=30)                                 # everything accepted is finished

Every message of one channel is handled by one handler call at a time, in the order ``submit`` was
called for that channel, on the worker its channel id hashes to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from . import codec
from .config import Config, load_config, with_overrides
from .deadletters import DeadLetters
from .errors import InputError
from .front import (
    CloseReport,
    DoneCallback,
    FailureCallback,
    Front,
    Halt,
    ResultCallback,
)
from .front.moves import Move

_SECTIONS_FOR_SHORT_NAMES = ("pool", "transport", "supervisor")
_ABORT_TIMEOUT_S = 1.0  # close on leaving a with-block by an exception (seconds)


def _dotted(config: Config, options: Mapping[str, Any]) -> dict[str, Any]:
    """Map ``workers=4``-style keyword options onto dotted config keys."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if "." in name:
            out[name] = value
            continue
        for section in _SECTIONS_FOR_SHORT_NAMES:
            if hasattr(getattr(config, section), name):
                out[f"{section}.{name}"] = value
                break
        else:
            raise TypeError(f"ShardPool() got an unexpected option {name!r}")
    return out


class ShardPool:
    """A pool of worker processes with strict per-channel order.

    Args:
        handler: ``"module:attr"`` or a handler object/function (see :mod:`shardpool.handler`);
            defaults to ``pool.handler`` of the config.
        config: a :class:`Config`, a path to a TOML file, or None for the built-in defaults
            (``SHARDPOOL_*`` environment overrides apply in every case a file or defaults are
            loaded).
        on_result: called as ``on_result(channel_id, seq, value)`` for every message whose handler
            returned a value other than None (except those submitted with :meth:`request`), in
            per-channel order, on the pool's I/O thread. It must not block for long.
        on_failure: called with a :class:`~shardpool.errors.HandlerError` for every failure.
            Without it, failures are logged.
        **options: config overrides by key name (``workers=4``, ``max_inflight=64``,
            ``failure_policy="skip"``) or dotted key (``**{"pool.slots": 1024}``).

    Raises:
        ConfigError: an option or the config file is invalid.
        WorkerStartError: a worker could not start its handler (the cause carries its traceback).
    """

    def __init__(
        self,
        handler: Any = None,
        *,
        config: Config | str | os.PathLike[str] | None = None,
        on_result: ResultCallback | None = None,
        on_failure: FailureCallback | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(config, Config):
            config = load_config(Path(config) if config is not None else None)
        if options:
            config = with_overrides(config, _dotted(config, options))
        self.config = config
        self._front = Front(config, handler, on_result=on_result, on_failure=on_failure)
        self._encode = codec.dumps
        # The bytes fast path is the front's own method: one Python call less per message.
        self.submit_bytes = self._front.submit_bytes  # type: ignore[method-assign]

    @classmethod
    async def open(cls, handler: Any = None, **kwargs: Any) -> ShardPool:
        """Start a pool without blocking the running event loop (the start takes ~a second)."""
        return await asyncio.to_thread(cls, handler, **kwargs)

    # -- submitting --------------------------------------------------------------------------

    def _payload(self, message: Any) -> bytes:
        try:
            return self._encode(message)
        except Exception as exc:  # noqa: BLE001 - cbor2 raises several types for one problem
            raise InputError(f"message cannot be CBOR-encoded: {exc}") from exc

    def submit(self, channel_id: bytes, message: Any) -> int:
        """Queue ``message`` (CBOR-encoded here) for ``channel_id``; returns its per-channel seq.

        Blocks while the channel's worker has ``max_inflight`` messages unacknowledged.

        Raises:
            InputError: bad channel id, unencodable message or oversize payload.
            PoolClosed / PoolBroken: the pool no longer accepts work.
        """
        return self._front.submit_bytes(channel_id, self._payload(message))

    def submit_bytes(
        self,
        channel_id: bytes,
        payload: bytes,
        *,
        block: bool = True,
        on_done: DoneCallback | None = None,
    ) -> int:
        """The fast path: ``payload`` is already CBOR (or raw bytes with ``payload = "raw"``) and
        is forwarded without being decoded. Same blocking and errors as :meth:`submit`;
        ``block=False`` raises BlockingIOError instead of waiting, and ``on_done(value, error)``
        is called once for this message instead of the pool's callbacks (see
        :meth:`Front.submit_bytes`). Each instance binds this name straight to the front's
        method, saving a call per message."""
        return self._front.submit_bytes(channel_id, payload, block=block, on_done=on_done)

    def submit_many_bytes(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """The fastest way in: ``(channel_id, payload)`` pairs, each as :meth:`submit_bytes`
        (same order, blocking and errors), with the locking cost shared by a chunk of messages.
        Returns how many were accepted."""
        return self._front.submit_many_bytes(items)

    def submit_chunk(
        self, pairs: list[tuple[bytes, bytes]], on_done: list[DoneCallback]
    ) -> int:
        """Submit ``(channel_id, payload)`` pairs in order without blocking, ``on_done[i]``
        called once for ``pairs[i]`` (as :meth:`submit_bytes`), up to the first pair whose
        worker's window is full; returns how many were accepted (offer the rest again once there
        is room). The lock is taken once for the whole list: how the ingress submits a
        producer's frame.

        Raises: as :meth:`submit_bytes`, when the first pair cannot be accepted.
        """
        return self._front.submit_chunk(pairs, on_done)

    def request(self, channel_id: bytes, message: Any) -> concurrent.futures.Future[Any]:
        """Submit and return a future of the handler's result (raises HandlerError on failure)."""
        return self._front.request_bytes(channel_id, self._payload(message))

    def request_bytes(self, channel_id: bytes, payload: bytes) -> concurrent.futures.Future[Any]:
        """:meth:`request` for a pre-encoded payload."""
        return self._front.request_bytes(channel_id, payload)

    def call(self, channel_id: bytes, message: Any, timeout: float | None = None) -> Any:
        """Submit and wait up to ``timeout`` seconds for the result.

        Raises:
            HandlerError: the handler failed. TimeoutError: no result in time.
        """
        return self.request(channel_id, message).result(timeout)

    def record_dead_letters(self, sink: DeadLetters | None) -> None:
        """Record every message that ends failed under ``skip`` or skipped by an operator in
        ``sink`` (None: stop); see :mod:`shardpool.deadletters`."""
        with self._front.lock:
            self._front.dead_letters = sink

    async def asubmit(self, channel_id: bytes, message: Any) -> int:
        """:meth:`submit` that awaits (instead of blocking the loop) while the window is full."""
        return await self.asubmit_bytes(channel_id, self._payload(message))

    async def asubmit_bytes(
        self, channel_id: bytes, payload: bytes, *, on_done: DoneCallback | None = None
    ) -> int:
        """:meth:`submit_bytes` that awaits while the window is full."""
        front = self._front
        while True:
            try:
                return front.submit_bytes(channel_id, payload, block=False, on_done=on_done)
            except BlockingIOError:
                await front.wait_room_async(channel_id)

    async def arequest(self, channel_id: bytes, message: Any) -> Any:
        """Submit (awaiting room) and await the handler's result.

        Raises: as :meth:`submit`, and :class:`HandlerError` if the handler failed.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(value: Any, error: BaseException | None) -> None:  # on the pool's I/O thread
            loop.call_soon_threadsafe(_settle, fut, value, error)

        await self.asubmit_bytes(channel_id, self._payload(message), on_done=done)
        return await fut

    # -- waiting and operating ---------------------------------------------------------------

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every accepted message is finished (messages parked behind a halted channel
        excepted). Raises DrainTimeout after ``timeout`` seconds, PoolBroken if the pool broke."""
        self._front.drain(timeout)

    async def adrain(self, timeout: float | None = None) -> None:
        """:meth:`drain` without blocking the event loop."""
        await asyncio.to_thread(self._front.drain, timeout)

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """Pool counters and fresh per-worker figures (see :meth:`Front.stats`)."""
        return self._front.stats(timeout)

    def placement(self) -> dict[str, Any]:
        """Where channels go now, without asking the workers: ``slots_per_worker``, ``pins``
        (channel hex → worker) and ``moves`` (in progress with age and held count, counts, pause
        p50/p99 in seconds)."""
        return self._front.placement()

    def apply_live_config(self, config: Config) -> None:
        """Replace the running configuration with ``config``, which may differ from it only in
        :data:`shardpool.reload.LIVE_KEYS` (levelling, the move timeout, the drain deadline: what
        the front reads afresh each time). Used by ``shardpool run`` on SIGHUP.

        Raises:
            ValueError: ``config`` differs in a key that needs a restart (naming the keys).
        """
        from .reload import plan_reload

        plan = plan_reload(self.config, config)
        if plan.restart:
            keys = ", ".join(c.key for c in plan.restart)
            raise ValueError(f"not live: {keys} need a restart of the pool")
        with self._front.lock:
            self._front.cfg = plan.effective
        self.config = plan.effective

    def halted_channels(self) -> dict[bytes, int]:
        """Channels parked after a failure under the ``halt`` policy, or quarantined → the failed
        message's seq."""
        return self._front.halted_channels()

    def halts(self) -> dict[bytes, Halt]:
        """Halted (or quarantined) channels → :class:`~shardpool.front.Halt`: the seq, the failure
        (for a quarantine, the worker's exit or hang), when, and whether it was a quarantine."""
        return self._front.halts()

    def resume(self, channel_id: bytes) -> None:
        """Retry the failed message of a halted channel, then continue with the rest in order."""
        self._front.control(channel_id, "resume")

    def skip(self, channel_id: bytes) -> None:
        """Record the failed message of a halted channel as skipped and continue in order."""
        self._front.control(channel_id, "skip")

    def move_slots(
        self, slots: list[int], worker: int, *, timeout: float | None = None
    ) -> Move:
        """Move routing ``slots`` to ``worker`` while running: their channels' new messages wait
        at the front while the old worker finishes what it has, then their state moves and they
        go on at ``worker`` in order. Waits up to ``timeout`` seconds (default
        ``pool.move_timeout_s`` + 5) and returns the move (``state``, ``pause_s``).

        Raises:
            MoveRefused: it could not start or was called off (nothing lost or reordered).
        """
        return self._front.move(slots, worker, timeout=timeout)

    def pin(
        self, channel_id: bytes, worker: int | None = None, *, timeout: float | None = None
    ) -> Move | None:
        """Place one channel on ``worker`` (None: the least loaded other worker), ahead of the
        slot table (a hot channel on a worker of its own), through the same barrier as a slot
        move. None if it was there already.

        Raises:
            ChannelIdError / MoveRefused.
        """
        return self._front.pin(channel_id, worker, timeout=timeout)

    def unpin(self, channel_id: bytes, *, timeout: float | None = None) -> Move | None:
        """Send a pinned channel back to its slot's worker.

        Raises:
            ChannelIdError / MoveRefused (also when it is not pinned).
        """
        return self._front.unpin(channel_id, timeout=timeout)

    def resize(self, workers: int, *, timeout: float | None = None, wait: bool = True) -> None:
        """Change the number of workers while running. Growing starts the new workers, then moves
        slots to them by measured load; shrinking moves every slot and pinned channel off the
        last workers (halted channels too), then stops them. Nothing is lost or reordered; at
        most ``pool.max_concurrent_moves`` slots move at once. With ``wait`` (default), returns
        once done, ``timeout`` seconds at most (None: no limit).

        Raises:
            MoveRefused: ``workers`` is not 1..1024, the pool is not running, or the resize was
                called off (a new worker could not start: the pool goes on as it was).
            DrainTimeout: ``timeout`` passed first; the resize goes on.
        """
        self._front.resize(workers, timeout=timeout, wait=wait)

    def roll(self, *, timeout: float | None = None, wait: bool = True) -> None:
        """Replace every worker process by a fresh one (which imports the handler code anew),
        one worker at a time: its slots and pins move to the others, it stops (a planned stop:
        no crash counted, nothing redelivered), its successor starts, and its share moves back.
        Nothing is lost or reordered; handler state moves with the slots. A single worker is
        rolled through a temporary second one. With ``wait`` (default), returns once done,
        ``timeout`` seconds at most (None: no limit).

        Raises:
            MoveRefused: the pool is not running, a roll or resize is under way, or the roll was
                called off (a new incarnation could not start, a move kept failing).
            DrainTimeout: ``timeout`` passed first; the roll goes on.
        """
        self._front.roll(timeout=timeout, wait=wait)

    def worker_of_slot(self, slot: int) -> int:
        """Index of the worker that owns routing ``slot`` now."""
        return self._front.channels.router.table[slot]

    def worker_of(self, channel_id: bytes) -> int:
        """Index of the worker that serves ``channel_id``."""
        return self._front.channel_worker(channel_id)

    def worker_pids(self) -> list[int | None]:
        """The current pid of each worker."""
        return self._front.worker_pids()

    @property
    def broken(self) -> bool:
        return self._front.broken is not None

    @property
    def closed(self) -> bool:
        return self._front.closed

    # -- shutdown ----------------------------------------------------------------------------

    def close(self, timeout: float | None = None, *, drain: bool = True) -> CloseReport:
        """Stop intake, drain (unless ``drain`` is false), stop the workers (each finishes the
        handler call it is in) and reap them, all within ``timeout`` seconds (default
        ``supervisor.stop_timeout_s``). Returns what was not finished, as unfinished (never
        handed to a handler: safe to submit again) or in doubt (its handler may have run); nothing
        is dropped silently. See :meth:`Front.close`."""
        return self._front.close(timeout, drain=drain)

    async def aclose(self, timeout: float | None = None, *, drain: bool = True) -> CloseReport:
        """:meth:`close` without blocking the event loop."""
        return await asyncio.to_thread(self._front.close, timeout, drain=drain)

    def __enter__(self) -> ShardPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # On an exception, do not wait for the queued work: stop the workers after their current
        # calls (a second at most) so the report still tells unfinished from in doubt.
        if exc_type is not None:
            self.close(_ABORT_TIMEOUT_S, drain=False)
        else:
            self.close()

    async def __aenter__(self) -> ShardPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            await self.aclose(_ABORT_TIMEOUT_S, drain=False)
        else:
            await self.aclose()


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(value)
    else:
        fut.set_exception(error)
