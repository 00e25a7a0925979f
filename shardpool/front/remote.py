"""Workers on other hosts: the front's ROUTER, the handshake, leases and failover.

::

    shardpool worker --connect ──tcp + CURVE──▶ ROUTER (remote.bind; a key pinned per worker)
      HELLO(id, nonce, version) ──▶ id = the key's pinned id ─▶ WELCOME(epoch, index, settings)
      READY ──▶ a link like any other: batches, acks, moves, stats on the same connection
      HEARTBEAT(sent_at) ──▶ LEASE(sent_at)        the worker's lease runs from sent_at (its clock)
      silent for lease_s + lease_margin_s ──▶ failover: its slots go to the ready workers, its
                                              window is replayed to their new owners in order
                                              (what it may have run flagged redelivered), then
                                              what was held; its handler state is lost
      HELLO again (a new incarnation) ──▶ it joins empty; slots move to it by live moves until it
                                          owns its weighted share

The front stays the only authority: routing, windows, epochs, replay and moves work as for a local
worker; only liveness differs (a lease instead of a process sentinel, see
:mod:`shardpool.worker.lease`) and a lost worker's slots fail over instead of waiting for a
restart. The failover is safe because the worker fenced itself before the front gave its channels
away: no channel runs on two hosts at once.

Process lifetime on the worker's host belongs to its service manager; a worker that keeps failing
is that manager's crash loop, not the front's.

Not thread-safe: the front calls it with its lock held (the ROUTER is used only so).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils import z85

from .. import codec
from ..codec import ToFront, ToWorker
from ..config import WORKER_ID_RE
from ..protocol import describe, loads_frame
from ..ratelog import RateLimitedLog
from ..security import RemoteKeys, monitor_events
from ..supervisor import WorkerState
from .link import Link
from .outcomes import Outcome
from .resize import RETRY_S, start_wave
from .state import PoolState

if TYPE_CHECKING:
    from .engine import Front

__all__ = ["Peer", "Remote", "RoutedSocket"]

log = logging.getLogger("shardpool.front")

_ZAP_DOMAIN = "shardpool-workers"
_AUTH_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_READ_BURST = 256


class RoutedSocket:
    """A remote link's socket: the front's ROUTER, addressed to one worker incarnation."""

    __slots__ = ("router", "peer", "remote")

    def __init__(self, remote: Remote, peer: bytes) -> None:
        self.remote = remote
        self.router = remote.sock
        self.peer = peer

    def send(self, data: bytes, copy: bool = True) -> None:
        # A peer that went away drops the frame (ROUTER without router_mandatory): the frame
        # stays in the window, and the lease decides what becomes of it.
        self.router.send_multipart((self.peer, data), copy=copy)
        self.remote.check_incoming()

    def close(self, linger: int = 0) -> None:
        """Nothing to close: the ROUTER is shared."""


@dataclass
class Peer:
    """What the front knows of one configured remote worker."""

    worker_id: str
    weight: float
    index: int
    session: bytes | None = None  # routing id of the current incarnation (None: away)
    host: str = ""
    pid: int | None = None
    version: str = ""
    last_heard: float = 0.0  # monotonic seconds
    rtt_s: float | None = None
    filling: bool = False  # joined: slots move to it until it owns its share
    cut: bool = False  # its frames are ignored (it sent one the front could not use)
    failovers: int = 0
    failover_s: list[float] = field(default_factory=list)  # last heard → slots served again
    last_lost: str = ""


class Remote:
    """The remote workers of one front (see the module docstring)."""

    def __init__(self, front: Front, keys: RemoteKeys | None, first_index: int) -> None:
        """Bind the ROUTER at ``remote.bind``.

        Raises:
            zmq.ZMQError: the address cannot be bound.
        """
        self.front = front
        cfg = front.cfg.remote
        self.lease_s = cfg.lease_s
        self.margin_s = cfg.lease_margin_s
        self.keys = keys
        self.peers: dict[str, Peer] = {}
        self.by_index: dict[int, Peer] = {}
        for i, (worker_id, weight) in enumerate(cfg.workers.items()):
            peer = Peer(worker_id, float(weight), first_index + i)
            self.peers[worker_id] = peer
            self.by_index[peer.index] = peer
        self.sessions: dict[bytes, Peer] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("refused", "auth_failures", "impersonations", "stray_frames", "failovers", "joins"), 0
        )
        self._warn = RateLimitedLog(log, 10.0)
        # Outcomes a failover settled (operator skips the lost worker never acted on), for the
        # I/O thread to deliver once the lock is released.
        self.outcomes: list[Outcome] = []
        self._next_fill = 0.0
        ctx = front.ctx
        self.auth: Any = None
        sock = self.sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.sndhwm = 0  # the windows bound what is queued
        sock.rcvhwm = 0
        sock.heartbeat_ivl = 1000
        sock.heartbeat_timeout = 5000
        if keys is not None:
            self.auth = _authenticator(ctx, keys)
            sock.curve_secretkey = keys.secret
            sock.curve_publickey = keys.public
            sock.curve_server = True
            sock.zap_domain = _ZAP_DOMAIN.encode()
        self.mon = sock.get_monitor_socket(_AUTH_FAILURES)
        sock.bind(cfg.bind)
        self.endpoint = str(sock.get_string(zmq.LAST_ENDPOINT))
        # Frames may wait inside ZeroMQ after a send (which reads the socket's commands) without
        # its file descriptor signalling again; the I/O thread is woken for them.
        self._wake = front.wakeup.wake

    def is_remote(self, index: int) -> bool:
        return index in self.by_index

    def fds(self) -> list[Any]:
        """What the I/O thread polls: the ROUTER's file descriptor (never the socket itself: it is
        used under the front's lock by producer threads) and the monitor."""
        return [self.sock.getsockopt(zmq.FD), self.mon]

    def check_incoming(self) -> None:
        """After a send on the ROUTER (lock held): wake the I/O thread if frames are waiting."""
        if int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._wake()

    # -- frames ----------------------------------------------------------------------------------

    def receive(self) -> list[list[Any]]:
        """Read what the ROUTER holds (lock held): handle HELLO and LEASE here, and return the
        other frames of current sessions, decoded, for the front's frame handling."""
        msgs: list[list[Any]] = []
        self._count_events()
        sock = self.sock
        now = time.monotonic()
        for _ in range(_READ_BURST):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if len(parts) != 2:
                self.counters["stray_frames"] += 1
                continue
            rid, frame = parts[0].bytes, parts[1]
            peer = self.sessions.get(rid)
            try:
                # A peer without a session has only a HELLO to say: decoded with the limits
                # producer frames get (no value can make its decoding slow).
                msg = (codec.loads if peer is not None else loads_frame)(frame.bytes)
                kind = msg[0]
            except Exception:  # noqa: BLE001 - never let a bad frame stop the front
                self.counters["stray_frames"] += 1
                continue
            if kind == ToFront.HELLO:
                user = frame.get("User-Id") if self.keys is not None else None
                self._on_hello(rid, None if user is None else str(user), msg, now)
                continue
            if peer is None:
                self.counters["stray_frames"] += 1  # a session that is over
                continue
            if not isinstance(msg, list) or len(msg) < 3 or msg[1] != peer.index:
                self.counters["impersonations"] += 1
                self._warn.warn(
                    "impersonation",
                    "remote worker %s sent a frame for another worker; dropped",
                    peer.worker_id,
                )
                continue
            if peer.cut:
                continue  # no longer heard: its lease runs out, then it fails over
            peer.last_heard = now
            if kind == ToFront.HEARTBEAT and len(msg) >= 6 and _is_time(msg[4]):
                sock.send_multipart((rid, codec.frame(ToWorker.LEASE, msg[2], msg[4])))
                if _is_time(msg[5]) and msg[5] > 0:
                    peer.rtt_s = float(msg[5])
            msgs.append(msg)
        if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._wake()  # more than one burst waiting
        return msgs

    def _unread(self) -> bool:
        """Frames wait in the ROUTER: silence is judged only once they are read (a front that
        fell behind must not take its own delay for a worker's silence)."""
        return bool(int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    def take_outcomes(self) -> list[Outcome]:
        """The outcomes failovers settled since the last call (lock held; deliver after)."""
        out, self.outcomes = self.outcomes, []
        return out

    def _count_events(self) -> None:
        for event in monitor_events(self.mon):
            if event & _AUTH_FAILURES:
                self.counters["auth_failures"] += 1
                self._warn.warn(
                    "auth",
                    "a remote worker failed the CURVE handshake (unknown or wrong key, or no "
                    "CURVE)",
                )

    def _refuse(self, rid: bytes, why: str, final: bool, worker_id: str) -> None:
        self.counters["refused"] += 1
        self._warn.warn(f"refused:{worker_id}:{why[:40]}", "refused remote worker %s: %s",
                        worker_id, why)
        self.sock.send_multipart((rid, codec.frame(ToWorker.REFUSED, 0, why, final)))

    def _on_hello(self, rid: bytes, user: str | None, msg: list[Any], now: float) -> None:
        f = self.front
        hello = _hello(msg)
        if hello is None:
            self._refuse(rid, "malformed HELLO (expected [11, id, nonce, version, protocol, pid, "
                         "host]: text, 16 bytes, text, an integer, an integer, text)", True, "?")
            return
        claimed = hello.worker_id
        shown = repr(claimed) if WORKER_ID_RE.fullmatch(claimed) else describe(claimed)
        if self.keys is not None and user != claimed:
            self.counters["impersonations"] += 1
            self._refuse(rid, f"this key is pinned to worker {user!r}, not {shown}", True, shown)
            return
        peer = self.peers.get(claimed)
        if peer is None:
            self._refuse(rid, f"unknown worker id {shown} (not in remote.workers)", True, shown)
            return
        if hello.protocol != codec.PROTOCOL:
            self._refuse(
                rid,
                f"wire protocol {hello.protocol}; this front speaks "
                f"{codec.PROTOCOL} (shardpool versions differ)",
                True,
                shown,
            )
            return
        rec = f.sup.workers[peer.index]
        if f.state != PoolState.RUNNING or rec.state not in (WorkerState.AWAY,):
            why = (
                "the pool is not running" if f.state != PoolState.RUNNING
                else f"worker {shown} is still connected or not yet failed over "
                f"(state {rec.state}); try again"
            )
            self._refuse(rid, why, False, shown)
            return
        epoch = f.sup.remote_joined(peer.index)
        link = f.links[peer.index]
        link.incarnation(epoch)
        peer.session = rid
        peer.host = hello.host
        peer.pid = hello.pid
        peer.version = hello.version
        peer.last_heard = now
        peer.rtt_s = None
        self.sessions[rid] = peer
        self.counters["joins"] += 1
        settings = dict(f.io.worker_settings(), lease_s=self.lease_s, lease_margin_s=self.margin_s)
        self.sock.send_multipart((rid, codec.frame(ToWorker.WELCOME, epoch, peer.index, settings)))
        log.info("remote worker %s (%s, pid %s) joined as worker %d, epoch %d", claimed,
                 peer.host, peer.pid, peer.index, epoch)

    def connect(self, link: Link) -> None:
        """The worker said READY: its link sends through the ROUTER to this incarnation."""
        peer = self.by_index[link.index]
        assert peer.session is not None
        link.sock = RoutedSocket(self, peer.session)  # type: ignore[assignment]
        peer.filling = True
        self._next_fill = 0.0

    def silent(self, index: int) -> bool:
        """Remote worker ``index`` has said nothing for longer than its lease (it is about to be
        failed over, or gone)."""
        peer = self.by_index.get(index)
        return peer is not None and time.monotonic() - peer.last_heard > self.lease_s

    def cut(self, index: int) -> None:
        """Stop listening to remote worker ``index`` (it sent a frame the front could not use):
        nothing more is sent to it, its frames are ignored and its lease is no longer renewed,
        so it fences itself and fails over like a silent worker."""
        peer = self.by_index[index]
        peer.cut = True
        self.front.links[index].disconnect()

    def on_fatal(self, link: Link, why: str, tb: str) -> None:
        """The worker could not start its handler (its traceback: ``tb``): it gets nothing (the
        pool goes on)."""
        peer = self.by_index[link.index]
        log.error("remote worker %s (%s) could not start its handler: %s\n%s", peer.worker_id,
                  peer.host, why, tb)
        self.fail_over(peer, f"its handler failed to start: {why}")

    def on_bye(self, link: Link) -> None:
        """A remote worker said BYE: it stopped, every call it started acknowledged, and it
        runs nothing more. Asked to (the pool is closing): it is done. Stopped by its own host
        (a service manager's stop): its channels fail over at once, nothing of them in doubt."""
        peer = self.by_index[link.index]
        state = self.front.sup.workers[link.index].state
        if state is WorkerState.STOPPING:
            self.front.sup.remote_ended(link.index)
            self._end_session(peer)
        elif state in (WorkerState.READY, WorkerState.STARTING):
            self.fail_over(peer, "it stopped (BYE)")

    def _end_session(self, peer: Peer) -> None:
        if peer.session is not None:
            self.sessions.pop(peer.session, None)
            peer.session = None
        self.front.links[peer.index].disconnect()
        peer.filling = False
        peer.cut = False

    # -- timers ----------------------------------------------------------------------------------

    def tick(self, now: float, caught_up: Any) -> float | None:
        """Fail over workers silent past the lease and its margin (or that missed their READY
        deadline), and move slots to workers that joined. Seconds until the next check."""
        f = self.front
        limit = self.lease_s + self.margin_s
        due: float | None = None
        for peer in self.by_index.values():
            rec = f.sup.workers[peer.index]
            if rec.state not in (WorkerState.READY, WorkerState.STARTING):
                continue
            silent = now - peer.last_heard
            late = rec.state is WorkerState.STARTING and now > rec.deadline
            if (silent > limit or late) and caught_up() and not self._unread():
                why = (
                    f"no READY within {f.cfg.supervisor.ready_timeout_s} s" if late and
                    silent <= limit else
                    f"silent for {silent:.1f} s (remote.lease_s {self.lease_s:g} + "
                    f"lease_margin_s {self.margin_s:g})"
                )
                self.fail_over(peer, why)
                continue
            left = limit - silent
            due = left if due is None else min(due, left)
        fill = self._fill(now)
        if fill is not None:
            due = fill if due is None else min(due, fill)
        return None if due is None else max(0.0, due)

    def _fill(self, now: float) -> float | None:
        """Move slots to joined workers until each owns its weighted share of the slots, a wave
        of at most ``pool.max_concurrent_moves`` slots at a time."""
        f = self.front
        filling = [p for p in self.by_index.values() if p.filling]
        if not filling or f.state != PoolState.RUNNING:
            return None
        if now < self._next_fill:
            return self._next_fill - now
        table = f.channels.router.table
        ready = [
            i for i in range(len(f.links))
            if f.sup.workers[i].state is WorkerState.READY and i not in f.resizer.retiring
        ]
        weights = {i: self.by_index[i].weight if i in self.by_index else 1.0 for i in ready}
        total = sum(weights.values())
        owned: dict[int, list[int]] = {i: [] for i in ready}
        for s, w in enumerate(table):
            if w in owned and s not in f.channels.moving:
                owned[w].append(s)
        counts = {i: table.count(i) for i in ready}
        plan: dict[tuple[int, int], list[int | bytes]] = {}
        for peer in filling:
            if peer.index not in weights:
                peer.filling = False
                continue
            target = int(len(table) * weights[peer.index] / total)
            need = target - counts[peer.index]
            if need <= 0:
                peer.filling = False
                continue
            while need > 0:
                donor = max(
                    (i for i in ready if i != peer.index and owned[i]),
                    key=lambda i: counts[i] / weights[i] - (
                        len(table) * weights[i] / total
                    ) / weights[i],
                    default=None,
                )
                if donor is None or counts[donor] <= int(len(table) * weights[donor] / total):
                    break
                s = owned[donor].pop()
                plan.setdefault((donor, peer.index), []).append(s)
                counts[donor] -= 1
                counts[peer.index] += 1
                need -= 1
            if not any(dst == peer.index for _, dst in plan):
                peer.filling = False
        refused = False
        if plan:
            refused = start_wave(f, plan, "join")[1]
        # The next wave as soon as there is room for it; after a refusal, a pause.
        wait = RETRY_S if refused else 0.05
        self._next_fill = now + wait
        return wait

    # -- failover --------------------------------------------------------------------------------

    def fail_over(self, peer: Peer, why: str) -> None:
        """``peer`` is lost (its lease is surely over): give its slots and pins to the ready
        workers and replay its window to their new owners, in order (lock held)."""
        f = self.front
        ch = f.channels
        index = peer.index
        link = f.links[index]
        silent_since = peer.last_heard
        f.sup.remote_lost(index, why)
        self._end_session(peer)
        peer.last_lost = why
        f.mover.on_death(index)  # its moves are off: their held messages are in its window now
        if link.said_bye:
            link.window.worker_died(-1, True, False)  # it ran nothing it did not acknowledge
        # An operator's skip it never acted on is settled here, or a new owner would run the
        # skipped message.
        f.io.settle_skips(link, self.outcomes)
        ready = [
            i for i in range(len(f.links))
            if i != index and f.sup.workers[i].state is WorkerState.READY
            and i not in f.resizer.retiring
        ]
        if not ready:
            # Nowhere to go: everything waits in its window for its return (replayed then,
            # what it may have run flagged redelivered).
            link.window.worker_died(link.window.next_wseq, False, False)
            log.error("remote worker %s lost (%s); no other worker is ready: its channels wait "
                      "for it", peer.worker_id, why)
            f.cv.notify_all()
            return
        entries = link.window.take_all()
        table = ch.router.table
        weights = {i: self.by_index[i].weight if i in self.by_index else 1.0 for i in ready}
        counts = {i: table.count(i) for i in ready}
        now = time.monotonic()
        for s, w in enumerate(table):
            if w == index:
                dst = min(ready, key=lambda i: (counts[i] + 1) / weights[i])
                table[s] = dst
                counts[dst] += 1
                f.mover.moved_at[s] = now
        for cid in [c for c, w in ch.pins.items() if w == index]:
            del ch.pins[cid]  # back with its slot
        for cid, route in ch.routes.items():
            if route.window is link.window:
                route.window = f.links[ch.pins.get(cid, table[route.slot])].window
        by_dst: dict[int, list[tuple[list[Any], Any, bool, float]]] = {}
        for entry in entries:
            found = ch.routes.get(entry[0][0])
            dst = found.window.index if found is not None else ch.worker_of(entry[0][0])
            by_dst.setdefault(dst, []).append(entry)
        redelivered = 0
        for dst, todo in by_dst.items():
            redelivered += self._hand_over(f.links[dst], todo)
        f.counters["replayed"] += redelivered
        self.counters["failovers"] += 1
        peer.failovers += 1
        took = time.monotonic() - silent_since
        peer.failover_s = [*peer.failover_s[-19:], took]
        log.warning(
            "remote worker %s (%s) lost: %s; its slots went to workers %s, %d messages replayed "
            "(%d may have run: flagged redelivered), %.2f s after it was last heard",
            peer.worker_id, peer.host, why, sorted(by_dst) or sorted(set(ready)), len(entries),
            redelivered, took,
        )
        f.cv.notify_all()
        f.release_room_waiters()

    def _hand_over(self, dst: Link, todo: list[tuple[list[Any], Any, bool, float]]) -> int:
        """Append a lost worker's messages to ``dst``'s window in order, in batches of one kind
        (may have run: redelivered; never sent: fresh), after re-halting the halted channels
        among them. Returns how many were redelivered."""
        f = self.front
        ch = f.channels
        if dst.window.parts:
            dst.flush()
        for cid in sorted({item[0] for item, _, _, _ in todo if ch.is_halted(item[0])}):
            dst.send(ToWorker.CONTROL, "halt", cid)
        size = f.cfg.transport.batch_size
        redelivered = 0
        run: list[tuple[list[Any], Any, float]] = []
        flag = todo[0][2]
        for item, waiter, ran, at in [*todo, (None, None, not todo[-1][2], 0.0)]:
            if ran != flag or len(run) == size or item is None:
                if run:
                    batch = dst.window.add_resent(dst.epoch, flag, run)
                    if dst.sock is not None:
                        dst.sock.send(batch.frame)
                        batch.sent = True
                    redelivered += len(run) if flag else 0
                    run = []
                flag = ran
            if item is not None:
                run.append((item, waiter, at))
        dst.window.count_parked(ch.is_halted)
        return redelivered

    # -- stopping, reporting -----------------------------------------------------------------------

    def stop(self, index: int) -> None:
        """Ask a remote worker to stop (in band: it cannot be signalled)."""
        self.front.links[index].send(ToWorker.STOP)

    def report(self, index: int) -> dict[str, Any]:
        """Host, link state, lease age (seconds since it was last heard) and round trip."""
        peer = self.by_index[index]
        rec = self.front.sup.workers[index]
        up = peer.session is not None
        return {
            "remote": True,
            "worker_id": peer.worker_id,
            "host": peer.host or "?",
            "pid": peer.pid,
            "version": peer.version or None,
            "link": "up" if up else "away",
            "lease_age_s": time.monotonic() - peer.last_heard if up else None,
            "rtt_s": peer.rtt_s,
            "weight": peer.weight,
            "failovers": peer.failovers,
            "failover_s": list(peer.failover_s),
            "last_lost": peer.last_lost or None,
            "state": rec.state.value,
        }

    def summary(self) -> dict[str, Any]:
        """The endpoint, the counters, and each remote worker's report by index."""
        return {
            "endpoint": self.endpoint,
            **self.counters,
            "workers": {i: self.report(i) for i in self.by_index},
        }

    def close(self) -> None:
        """Close the ROUTER, its monitor and the authenticator (the I/O thread has ended)."""
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.sock.close(linger=0)
        self.mon.close(linger=0)
        if self.auth is not None:
            self.auth.stop()





def _authenticator(ctx: zmq.Context[Any], keys: RemoteKeys) -> Any:
    """pyzmq's ZAP thread for the remote workers' socket, started: it admits only the pinned
    keys, and names each connection (its User-Id) by the worker id its key is pinned to."""
    from zmq.auth.thread import ThreadAuthenticator  # (only where CURVE is used)

    class PinnedAuthenticator(ThreadAuthenticator):
        def curve_user_id(self, client_public_key: bytes) -> str:
            return keys.pinned.get(z85.encode(client_public_key), "")

    auth = PinnedAuthenticator(ctx, log=logging.getLogger("shardpool.front.auth"))
    auth.start()
    auth.configure_curve_callback(domain=_ZAP_DOMAIN, credentials_provider=keys)
    return auth


def _is_time(value: Any) -> bool:
    """A number of seconds a worker may send (finite, no bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        -1e12 < value < 1e12
    )


def _hello(msg: list[Any]) -> codec.Hello | None:
    """A HELLO's fields when each has its type and a sane size, else None."""
    if not isinstance(msg, list) or len(msg) != 7:
        return None
    hello = codec.Hello._make(msg[1:])
    ok = (
        isinstance(hello.worker_id, str) and len(hello.worker_id) <= 64
        and isinstance(hello.nonce, bytes) and len(hello.nonce) == 16
        and isinstance(hello.version, str) and len(hello.version) <= 64
        and isinstance(hello.protocol, int) and not isinstance(hello.protocol, bool)
        and -(2**31) < hello.protocol < 2**31
        and isinstance(hello.pid, int) and not isinstance(hello.pid, bool)
        and 0 <= hello.pid < 2**31
        and isinstance(hello.host, str) and len(hello.host) <= 255
    )
    return hello if ok else None
