"""The front's I/O thread: everything that waits on the workers.

One thread reads every worker's frames from the front's single PULL socket, watches the process
sentinels and the timers, and acts with the front's lock held:

* ACK → retire from the window, build the outcomes (delivered in per-channel order, lock released),
  halt a channel whose message failed under ``halt``, drop the records of forgotten channels;
* READY → connect, re-send the window (the replay, first, marked redelivered where a dead
  incarnation may have run it);
* a sentinel → settle what the worker held, count the death against the message a careful replay
  was running (and quarantine it when it keeps killing its worker), let the supervisor decide;
* the linger → flush half-full batches; the supervisor's timers → READY deadlines, heartbeat
  silence, restarts.

It is also the only thread that starts workers (:mod:`shardpool.launch`), with SIGINT/SIGTERM
blocked (children inherit the mask and unblock once their handlers are in place).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import zmq

from .. import codec
from ..codec import FINAL_ACTIONS, Action, ToFront
from ..errors import HandlerError, PoolBroken, RemoteTraceback, WorkerStartError
from ..exitcodes import EXIT_OK
from ..supervisor import (
    Death,
    GiveUp,
    Killed,
    Restart,
    Spawned,
    StartFailed,
    WorkerProcess,
    WorkerState,
)
from ..worker import NO_MESSAGE, WorkerSpec
from .channels import Halt, quarantine_error
from .link import Link
from .outcomes import Done, HaltNotice, Outcome, Reported, Result, deliver
from .window import Window

if TYPE_CHECKING:
    from .engine import Front

__all__ = ["FrontIO"]

log = logging.getLogger("shardpool.front")

_READ_BURST = 256  # frames read per turn before timers and deaths get their turn


def _first(pair: tuple[int, Outcome]) -> int:
    return pair[0]


class FrontIO:
    """The I/O half of a :class:`~.engine.Front` (see the module docstring)."""

    def __init__(self, front: Front) -> None:
        self.front = front

    # -- spawning --------------------------------------------------------------------------------

    def worker_settings(self) -> dict[str, Any]:
        """What every worker is told by the front's config, local or remote (the
        :class:`WorkerSpec` fields a remote worker's WELCOME carries)."""
        f = self.front
        pool = f.cfg.pool
        return {
            "handler": f.handler,
            "handler_options": pool.handler_options.thaw(),
            "payload": pool.payload,
            "failure_policy": pool.failure_policy,
            "failure_policy_by_type": pool.failure_policy_by_type.thaw(),
            "retry_limit": pool.retry_limit,
            "retry_backoff_s": pool.retry_backoff_ms / 1000.0,
            "heartbeat_interval_s": f.cfg.supervisor.heartbeat_interval_s,
            "channel_idle_expiry_s": pool.channel_idle_expiry_s,
            "slots": pool.slots,
            "move_state": pool.move_state,
            "load_interval_s": pool.rebalance_interval_s,
        }

    def make_process(self, index: int, epoch: int) -> WorkerProcess:
        """The supervisor's spawn factory: incarnation ``epoch`` of worker ``index``."""
        f = self.front
        link = f.links[index]
        link.incarnation(epoch)
        spec = WorkerSpec(
            index=index,
            epoch=epoch,
            data_endpoint=f"ipc://{f.rundir}/w{index}.{epoch}",
            front_endpoint=f.front_endpoint,
            parent_pid=os.getpid(),
            run_slot=link.run_slot.path,
            **self.worker_settings(),
        )
        # The worker's PR_SET_PDEATHSIG follows the thread that forks it: the fork server's (which
        # ends with this process), or, spawned, this one, which lives as long as the pool.
        return WorkerProcess(spec)

    # -- the loop --------------------------------------------------------------------------------

    def main(self) -> None:
        """Thread target."""
        f = self.front
        # Signals go to the main thread; blocking them here also makes every worker we spawn
        # start with them blocked (the mask survives fork and exec).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a dead I/O thread must not hang producers
            log.exception("front I/O thread failed")
            with f.lock:
                f.break_pool(PoolBroken(f"front I/O thread failed: {exc!r}"))
                if f.start_error is None:
                    f.start_error = WorkerStartError(f"front I/O thread failed: {exc!r}")
                f.cv.notify_all()

    def _start_local(self) -> bool:
        """Start every local worker (remote ones join when they connect); False if one could
        not be spawned (``start_error`` says why)."""
        f = self.front
        with f.lock:
            for link in f.links:
                if f.sup.workers[link.index].remote:
                    continue
                try:
                    f.sup.start(link.index)
                except Exception as exc:
                    f.start_error = WorkerStartError(
                        f"worker {link.index} could not be spawned: {exc!r}"
                    )
                    f.start_error.__cause__ = exc
                    f.cv.notify_all()
                    return False
                link.watch(f.sup.workers[link.index].proc.pid)  # type: ignore[union-attr]
        return True

    def _loop(self) -> None:
        f = self.front
        if not self._start_local():
            return
        pull = f.pull
        poller = zmq.Poller()
        wake_fd = f.wakeup.fileno()
        for source in [pull, wake_fd, *([] if f.remote is None else f.remote.fds())]:
            poller.register(source, zmq.POLLIN)
        sentinels: dict[int, int] = {}
        while True:
            outcomes: list[Outcome] = []
            with f.lock:
                if f.closed:
                    return
                current = f.sup.sentinels()
                due = self._flush_stale(time.monotonic())
                due = self._timers(due, outcomes)
                if due is None and any(k.window.inflight for k in f.links):
                    due = f.linger  # a batch may start any moment: be back within the linger
            deliver(outcomes)
            for fd in sentinels.keys() - current.keys():
                poller.unregister(fd)
            for fd in current.keys() - sentinels.keys():
                poller.register(fd, zmq.POLLIN)
            sentinels = current
            # zmq polls in whole milliseconds and truncates: round up, or a 0.5 ms linger spins.
            timeout_ms = 100 if due is None else max(0, min(100, math.ceil(due * 1000.0)))
            events = dict(poller.poll(timeout_ms))
            if wake_fd in events:
                f.wakeup.drain()
            if pull in events:
                self._on_frames(self._recv_frames())
            if f.remote is not None:
                # Polled on every turn: a producer's send on the ROUTER may have taken its
                # file descriptor's signal (see RoutedSocket).
                self._on_remote()
            dead = [sentinels[fd] for fd in events if fd in sentinels]
            if dead:
                self._on_deaths(dead)

    def _on_deaths(self, dead: list[int]) -> None:
        """Workers whose sentinels fired: their last words first, then each death."""
        self._await_last_words(dead)
        outcomes: list[Outcome] = []
        with self.front.lock:
            for index in dead:
                self._on_death(index, outcomes)
        deliver(outcomes)

    def _recv_frames(self) -> list[bytes]:
        """Whatever the PULL socket holds, up to :data:`_READ_BURST` frames."""
        frames: list[bytes] = []
        recv = self.front.pull.recv
        try:
            while len(frames) < _READ_BURST:
                frames.append(recv(zmq.NOBLOCK))
        except zmq.Again:
            pass
        return frames

    def _await_last_words(self, dead: list[int]) -> None:
        """Read what the dead workers sent before they went (lock not held).

        A worker that exited cleanly sent BYE first, but ZeroMQ may hand it over only after the
        exit is seen; what it finished must be known before anything is decided about the rest,
        so wait for that BYE (1 s at most). For the others, take what has already arrived."""
        f = self.front
        waiting = [
            f.links[i]
            for i in dead
            if (proc := f.sup.workers[i].proc) is not None
            and proc.join(0) == EXIT_OK
            and not f.links[i].said_bye
            and not f.links[i].last_tb  # a CRASH (SystemExit(0)) says no BYE is coming
        ]
        deadline = time.monotonic() + 1.0
        while True:
            if f.pull.poll(0):
                self._on_frames(self._recv_frames())
            waiting = [link for link in waiting if not link.said_bye]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                return
            f.pull.poll(math.ceil(min(left, 0.05) * 1000))

    def _flush_stale(self, now: float) -> float | None:
        """Flush batches older than the linger (lock held); seconds until the next is due."""
        f = self.front
        due: float | None = None
        for link in f.links:
            win = link.window
            if win.parts:
                left = win.batch_t0 + f.linger - now
                if left <= 0:
                    link.flush()
                elif due is None or left < due:
                    due = left
        return due

    def _timers(self, due: float | None, outcomes: list[Outcome]) -> float | None:
        """The timers (lock held): moves' deadlines, the resize and levelling, then the
        supervisor's READY deadlines, heartbeat silence and restarts."""
        f = self.front
        behind: bool | None = None  # frames still unread: the silence may be ours, not theirs

        def caught_up() -> bool:
            nonlocal behind
            if behind is None:
                behind = bool(f.pull.poll(0))
            return not behind

        now = time.monotonic()
        for placement_due in (
            f.mover.tick(now), f.resizer.tick(now), f.roller.tick(now), f.balancer.tick(now)
        ):
            if placement_due is not None:
                due = placement_due if due is None else min(due, placement_due)
        if f.remote is not None:
            remote_due = f.remote.tick(now, caught_up)
            outcomes += f.remote.take_outcomes()
            if remote_due is not None:
                due = remote_due if due is None else min(due, remote_due)
        decisions, restart_due = f.sup.tick(caught_up)
        for d in decisions:
            if isinstance(d, Killed):
                log.warning("worker %d: %s; killing it", d.index, d.reason)
            elif isinstance(d, Spawned):
                f.links[d.index].watch(d.pid)
            elif isinstance(d, GiveUp):
                f.break_pool(d.error)
        if restart_due is not None:
            due = restart_due if due is None else min(due, restart_due)
        return due

    # -- frames ----------------------------------------------------------------------------------

    def _on_frames(self, frames: list[bytes]) -> None:
        f = self.front
        outcomes: list[Outcome] = []
        with f.lock:
            for frame in frames:
                try:
                    msg = codec.loads(frame)
                    f.links[msg[1]], msg[2]  # noqa: B018 - a worker index and an epoch
                except Exception:  # noqa: BLE001 - never let a bad frame stop the front
                    log.warning("dropped a malformed frame from a worker (%d bytes)", len(frame))
                    continue
                self._on_msg(msg, outcomes)
            f.release_room_waiters()
        deliver(outcomes)

    def _on_remote(self) -> None:
        """Frames from remote workers (the ROUTER is read under the lock: producers send on
        it)."""
        f = self.front
        assert f.remote is not None
        outcomes: list[Outcome] = []
        with f.lock:
            if f.closed:
                return
            for msg in f.remote.receive():  # (checked there: its own index)
                try:
                    self._on_msg(msg, outcomes)
                except Exception:  # noqa: BLE001 - another host must not stop the front
                    log.exception("remote worker %d sent a frame the front cannot use", msg[1])
                    f.remote.cut(msg[1])
            outcomes += f.remote.take_outcomes()
            f.release_room_waiters()
        deliver(outcomes)

    def _on_msg(self, msg: list[Any], outcomes: list[Outcome]) -> None:
        """One decoded frame from a worker, its index and epoch checked (lock held)."""
        f = self.front
        kind, index, epoch = msg[0], msg[1], msg[2]
        link = f.links[index]
        if epoch != link.epoch:
            return  # a dead incarnation's last words
        f.sup.heard(index)
        if kind == ToFront.ACK:
            f.counters["acks"] += 1
            self.on_ack(link, msg[3], msg[4], msg[5], outcomes)
            if msg[6]:
                f.channels.forget(link.window, msg[6])
        elif kind == ToFront.HEARTBEAT:
            pass
        elif kind == ToFront.READY:
            if f.sup.on_ready(index):
                self._on_ready(link)
        else:
            self._on_cold_frame(link, kind, msg)

    def _on_cold_frame(self, link: Link, kind: int, msg: list[Any]) -> None:
        f = self.front
        if kind == ToFront.STATS:
            reply = codec.StatsReply._make(msg[1:])
            replies = f.stats_replies.get(reply.request)
            if replies is not None:
                replies[link.index] = reply.stats
                f.cv.notify_all()
        elif kind == ToFront.SLOT_STATE:
            f.mover.on_slot_state(link, msg)
        elif kind == ToFront.CANCELLED:
            f.mover.on_cancelled(link, msg)
        elif kind == ToFront.LOAD:
            f.balancer.on_load(link, msg)
        elif kind == ToFront.STOPPING:
            link.stop_running = set(codec.Stopping._make(msg[1:]).running)
        elif kind == ToFront.BYE:
            link.stats = codec.Bye._make(msg[1:]).stats
            link.said_bye = True
            if f.remote is not None and f.remote.is_remote(link.index):
                f.remote.on_bye(link)
            f.cv.notify_all()
        elif kind == ToFront.CRASH:
            crash = codec.Failure._make(msg[1:])
            link.last_tb = crash.traceback
            f.sup.note_crash(link.index, f"{crash.exc_type}: {crash.message}")
            log.error(
                "worker %d is dying: %s: %s\n%s",
                link.index,
                crash.exc_type,
                crash.message,
                crash.traceback,
            )
        elif kind == ToFront.FATAL:
            self._on_fatal(link, codec.Failure._make(msg[1:]))

    def _on_fatal(self, link: Link, fatal: codec.Failure) -> None:
        """The worker could not start its handler (FATAL)."""
        f = self.front
        f.sup.note_crash(link.index, f"{fatal.exc_type}: {fatal.message}")
        err = WorkerStartError(
            f"worker {link.index} failed to start its handler: {fatal.exc_type}: "
            f"{fatal.message}"
        )
        err.__cause__ = RemoteTraceback(fatal.traceback)
        if f.remote is not None and f.remote.is_remote(link.index):
            f.remote.on_fatal(link, f"{fatal.exc_type}: {fatal.message}", fatal.traceback)
            return  # a remote host's install: the pool goes on without it
        if f.resizer.on_start_failed(link.index, err) or f.roller.on_start_failed(
            link.index, err
        ):
            return  # a worker the resize added: the pool goes on without it
        if f.start_error is None and f.sup.workers[link.index].restarts == 0:
            f.start_error = err
        # An import or setup error will not fix itself by restarting.
        f.break_pool(err)

    def on_ack(
        self,
        link: Link,
        ranges: list[int],
        results: list[list[Any]],
        failures: list[list[Any]],
        outcomes: list[Outcome],
    ) -> None:
        """Retire what one ACK names and append its outcomes, in wseq order (lock held)."""
        f = self.front
        win = link.window
        if win.parts:
            # Ack-clocked batching (as Nagle's algorithm): the worker just finished work, so hand
            # it the next batch now rather than when the linger runs out.
            link.flush()
        # One ACK lists None-result completions, values and failures separately; per channel they
        # happened in wseq order, so outcomes are delivered sorted by wseq to keep that order.
        keyed: list[tuple[int, Outcome]] = []
        done: list[tuple[int, Any]] = []
        n = 0
        for i in range(0, len(ranges), 2):
            n += win.finish_range(ranges[i], ranges[i + 1], done)
        for wseq, waiter in done:
            keyed.append((wseq, Done(waiter, None, None)))
        n += self._results(win, results, keyed)
        n += self._failures(win, failures, keyed)
        if keyed:
            keyed.sort(key=_first)
            outcomes.extend(outcome for _, outcome in keyed)
        f.counters["acknowledged"] += n
        f.counters["results"] += len(results)
        if n or failures:
            f.cv.notify_all()

    def _results(
        self, win: Window, results: list[list[Any]], keyed: list[tuple[int, Outcome]]
    ) -> int:
        """Retire the messages that finished with a value; how many were still open."""
        on_result = self.front.on_result
        n = 0
        for wseq, value in results:
            found = win.open(wseq)
            if found is None:
                continue
            batch, item = found
            waiter = win.finish_one(batch, wseq)
            n += 1
            if waiter is not None:
                keyed.append((wseq, Done(waiter, value, None)))
            elif on_result is not None:
                keyed.append((wseq, Result(on_result, item[0], item[1], value)))
        return n

    def _failures(
        self, win: Window, failures: list[list[Any]], keyed: list[tuple[int, Outcome]]
    ) -> int:
        """Apply the failures: a final one retires its message (its ``on_done``, if any, gets the
        error; else ``on_failure`` does); a halt parks its channel, tells the message's
        ``on_done`` (not final) and ``on_failure``. Returns how many messages were retired."""
        f = self.front
        n = 0
        for wseq, exc_type, message, tb, action in failures:
            found = win.open(wseq)
            if found is None:
                continue
            batch, item = found
            cid, cseq = item[0], item[1]
            err = HandlerError(
                f"handler failed on channel {cid.hex()} seq {cseq}: {exc_type}: {message} "
                f"(policy: {action})",
                channel_id=cid,
                seq=cseq,
                exc_type=exc_type,
                policy=action,
                traceback=tb,
            )
            f.counters["failures"] += 1
            if action == Action.SKIPPED:
                f.channels.skipping.pop(cid, None)
            if action in FINAL_ACTIONS:
                waiter = win.finish_one(batch, wseq)
                n += 1
                if f.dead_letters is not None:
                    f.dead_letters.record(cid, cseq, item[2], exc_type, message, action, waiter)
                if waiter is not None:
                    keyed.append((wseq, Done(waiter, None, err)))
                    continue
            else:
                f.channels.halt(cid, Halt(cseq, err, time.time()))
                win.count_parked(f.channels.is_halted)
                waiter = win.waiters.get(wseq)
                if waiter is not None:
                    keyed.append((wseq, HaltNotice(waiter, err)))
            keyed.append((wseq, Reported(f.on_failure, err)))
        return n

    # -- incarnations ----------------------------------------------------------------------------

    def _on_ready(self, link: Link) -> None:
        """The current epoch is ready: connect, replay whatever the window holds (lock held)."""
        f = self.front
        if f.remote is not None and f.remote.is_remote(link.index):
            f.remote.connect(link)
        else:
            link.connect(f.ctx, f"ipc://{f.rundir}/w{link.index}.{link.epoch}")
        win = link.window
        if win.batches or win.parts:
            halted = f.channels.halted_on(win)
            f.counters["replayed"] += link.replay(halted, f.cfg.transport.batch_size)
            if halted:
                win.count_parked(f.channels.is_halted)  # a scan of the whole window
            else:
                win.parked = 0
        if link.died_at:
            link.recovery_s.append(time.monotonic() - link.died_at)
            link.died_at = 0.0
        f.cv.notify_all()

    def settle_skips(self, link: Link, outcomes: list[Outcome]) -> None:
        """Settle here the operator's skips that ``link``'s worker did not act on (it is down,
        or died with the skip unread), as that worker would have: otherwise the replay would
        run the skipped message again (lock held)."""
        skipping = self.front.channels.skipping
        if not skipping:
            return
        skipped = [
            codec.operator_skip(w)
            for w, (cid, cseq, _) in link.window.open_entries()
            if skipping.get(cid) == cseq
        ]
        if skipped:
            self.on_ack(link, [], [], skipped, outcomes)

    def _on_death(self, index: int, outcomes: list[Outcome]) -> None:
        """A worker process ended (lock held): settle what it held, count the death against the
        message a careful replay was running, and act on the supervisor's decision."""
        f = self.front
        link = f.links[index]
        death = f.sup.reap(index)
        taken, running = link.run_slot.read()
        link.run_slot.reset()
        link.disconnect()
        stopping = f.sup.workers[index].state is WorkerState.STOPPING
        link.window.worker_died(taken, link.said_bye, stopping and link.stop_running is not None)
        self.settle_skips(link, outcomes)
        f.mover.on_death(index)  # (after the window is settled: held messages follow it, fresh)
        key = None if link.said_bye or running == NO_MESSAGE else link.window.message(running)
        n = f.channels.count_death(link.window, key)
        if key is not None and n >= f.cfg.supervisor.poison_after_crashes:
            self._quarantine(link, key, death, n, outcomes)
        decision = f.sup.after_death(death, explained=key is not None)
        if isinstance(decision, StartFailed):
            if f.resizer.on_start_failed(index, decision.error) or f.roller.on_start_failed(
                index, decision.error
            ):
                return  # a worker the resize added: the pool goes on without it
            if f.start_error is None:
                f.start_error = decision.error
            f.break_pool(decision.error)
        elif isinstance(decision, GiveUp):
            f.break_pool(decision.error)
        elif isinstance(decision, Restart):
            f.counters["restarts"] += 1
            link.died_at = time.monotonic()
            log.warning(
                "worker %d (pid %s, epoch %d) %s%s; restarting in %.2f s, %d messages to replay",
                index,
                death.pid,
                death.epoch,
                death.cause,
                "" if key is None else f" in its handler for channel {key[0].hex()} seq {key[1]}",
                decision.delay,
                link.window.inflight,
            )
        f.cv.notify_all()

    def _quarantine(
        self, link: Link, key: tuple[bytes, int], death: Death, n: int, outcomes: list[Outcome]
    ) -> None:
        """Halt the channel of a message that keeps killing its worker; the operator resumes
        (runs it again) or skips it as any halt."""
        f = self.front
        err = quarantine_error(
            key,
            f"worker {link.index} {death.cause}",
            death.hung,
            n,
            f.cfg.supervisor.poison_after_crashes,
            link.last_tb,
        )
        win, waiter = f.channels.quarantine(key, err)
        win.count_parked(f.channels.is_halted)
        f.counters["quarantined"] += 1
        f.counters["failures"] += 1
        if waiter is not None:
            outcomes.append(HaltNotice(waiter, err))
        outcomes.append(Reported(f.on_failure, err))
