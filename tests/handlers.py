"""Handlers used by the multi-process tests (imported by the spawned workers by reference)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import cbor2


def record(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Sync: check the producer's per-channel index follows the last one; return (seq, index)."""
    last = channel.state if channel.state is not None else -1
    i = message["i"]
    if i != last + 1 and not (redelivered and i <= last):
        raise AssertionError(f"channel {channel.id!r}: got index {i} after {last}")
    channel.state = max(last, i)
    return [seq, i]


async def record_async(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Async: awaits a random short delay between reading and writing the channel state, so an
    interleaving of two calls of one channel would be caught."""
    last = channel.state if channel.state is not None else -1
    delay = random.choice((0.0, 0.0, 0.0001, 0.0005, 0.001))
    await asyncio.sleep(delay)  # sleep-ok: the handler's own work, in a worker
    i = message["i"]
    if i != last + 1:
        raise AssertionError(f"channel {channel.id!r}: got index {i} after {last}")
    if channel.state != (last if last >= 0 else None):
        raise AssertionError(f"channel {channel.id!r}: state changed during an await")
    channel.state = i
    return [seq, i]


async def gated(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Async: waits (polling, inside the worker) until the file named by the message exists;
    messages without a gate return at once."""
    gate = message.get("gate")
    while gate and not os.path.exists(gate):
        await asyncio.sleep(0.002)  # sleep-ok - the handler's own work, in a worker
    return [seq, message.get("i")]


def sleepy(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Sync: burns ``message["ms"]`` milliseconds of wall time (a blocking, slow handler)."""
    time.sleep(message.get("ms", 0) / 1000.0)  # sleep-ok - the handler's own work, in a worker
    return seq


def fail_on(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Sync: raises ValueError when the message says so; otherwise returns its index."""
    if message.get("fail"):
        raise ValueError(f"refusing message {message.get('i')}")
    return message.get("i")


def env_var(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """The worker's value of the environment variable the message names (None: unset), and the
    worker's parent pid."""
    return [os.environ.get(message["name"]), os.getppid()]


def echo_bytes(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Returns what it got (used with payload = "raw" and for decode checks)."""
    return message


class Counting:
    """A class handler: instantiated once per worker with handler_options; hooks record calls."""

    def __init__(self, start: int = 0) -> None:
        self.start = start
        self.worker = -1
        self.calls = 0

    def setup(self, worker_index: int) -> None:
        self.worker = worker_index

    def teardown(self) -> None:
        pass

    def handle(self, channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
        self.calls += 1
        return [self.worker, self.start + self.calls]


BROKEN_IMPORT = "tests_missing_module_for_shardpool:handle"


class Ledger:
    """A durable per-worker ledger, the model of a node's channel database.

    Each applied message appends ``A <cid> <seq> <digest> <redelivered>`` to ``<dir>/w<i>.log``
    with one ``os.write`` (the kernel keeps it even if the process is SIGKILLed right after), and
    the log is reloaded by the next incarnation of the same worker, so handler-side state survives
    crashes. A channel moved in appends ``R`` (its position, taken over through the
    snapshot/restore hooks, ``pool.move_state = "hooks"``). A redelivered message whose ``seq``
    was already applied is a recognised duplicate (``D`` line); an unmarked duplicate is a
    violation (``V`` line) and a gap is logged (``G`` line: seq and the last applied seq).

    ``message["ms"]`` (default: the ``ms`` option) is the wall time the message takes before it
    is applied. ``message["fault"]`` injects a fault before the message is applied:
    ``exit`` (os._exit(70)), ``segv`` (read address 0) and ``raise`` fire once per message (a
    marker file makes the replayed copy succeed); ``raise_n`` raises ``message["n"]`` times;
    ``always_exit``, ``always_segv`` and ``always_hang`` (a busy loop) fire every time: a poison
    message.
    """

    def __init__(self, dir: str, ms: float = 0.0) -> None:
        self.dir = dir
        self.ms = ms  # wall time each message takes before it is applied (a slow handler)
        self.applied: dict[str, tuple[int, int]] = {}
        self.attempts: dict[tuple[str, int], int] = {}
        self.fd = -1

    def setup(self, worker_index: int) -> None:
        path = os.path.join(self.dir, f"w{worker_index}.log")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 5 and parts[0] in ("A", "R"):
                        self.applied[parts[1]] = (int(parts[2]), int(parts[3]))
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def teardown(self) -> None:
        os.close(self.fd)

    def snapshot(self, channel: Any) -> bytes | None:
        """A moving channel's ledger position (``pool.move_state = "hooks"``)."""
        rec = self.applied.get(channel.id.hex())
        return None if rec is None else cbor2.dumps(list(rec))

    def restore(self, channel: Any, data: bytes | None) -> None:
        """Take over a moved channel's position, durably (an ``R`` line: a restart reloads it)."""
        if data is None:
            return
        seq, digest = cbor2.loads(data)
        key = channel.id.hex()
        self.applied[key] = (seq, digest)
        os.write(self.fd, f"R {key} {seq} {digest} 0\n".encode())

    def _once(self, name: str) -> bool:
        try:
            os.close(os.open(os.path.join(self.dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def _inject(self, fault: str, key: str, seq: int, message: Any) -> None:
        """Fire ``fault`` before the message is applied (see the class docstring)."""
        if fault in ("exit", "segv", "raise", "sysexit") and self._once(f"fault-{key}-{seq}"):
            if fault == "exit":
                os._exit(70)
            if fault == "sysexit":
                raise SystemExit(75)
            if fault == "segv":
                _segfault()
            raise ValueError(f"injected failure on seq {seq}")
        if fault == "always_exit":
            os._exit(71)
        if fault == "always_segv":
            _segfault()
        if fault == "always_hang":
            while True:  # a CPU-bound handler that never returns: no heartbeat gets out
                pass
        if fault == "raise_n":
            n = self.attempts.get((key, seq), 0)
            self.attempts[(key, seq)] = n + 1
            if n < message["n"]:
                raise ValueError(f"injected failure {n + 1} of {message['n']} on seq {seq}")

    def handle(self, channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
        key = channel.id.hex()
        last, digest = self.applied.get(key, (-1, 0))
        if seq <= last:
            kind = "D" if redelivered else "V"
            os.write(self.fd, f"{kind} {key} {seq} 0 {int(redelivered)}\n".encode())
            return None
        if seq != last + 1:
            # A gap: legitimate only where the missing messages were skipped by policy.
            os.write(self.fd, f"G {key} {seq} {last} {int(redelivered)}\n".encode())
        fault = message.get("fault")
        if fault:
            self._inject(fault, key, seq, message)
        ms = message.get("ms", self.ms)
        if ms:
            time.sleep(ms / 1000.0)  # sleep-ok - the handler's own work, in a worker
        digest = (digest * 1_000_003 + message["v"]) % (1 << 61)
        os.write(self.fd, f"A {key} {seq} {digest} {int(redelivered)}\n".encode())
        self.applied[key] = (seq, digest)
        return None


def _segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def ledger_digest(values: list[int]) -> int:
    """The state a channel must end in: its messages' values applied serially."""
    digest = 0
    for v in values:
        digest = (digest * 1_000_003 + v) % (1 << 61)
    return digest


def read_ledgers(dir: str) -> dict[str, list[tuple[str, int, int, int]]]:
    """Every ledger line of every worker, per channel, in the order written."""
    out: dict[str, list[tuple[str, int, int, int]]] = {}
    for name in sorted(os.listdir(dir)):
        if not name.endswith(".log"):
            continue
        with open(os.path.join(dir, name)) as f:
            for line in f:
                kind, key, seq, digest, redelivered = line.split()
                out.setdefault(key, []).append((kind, int(seq), int(digest), int(redelivered)))
    return out


def none_or_value(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Returns None, a value, or fails, in turn: acknowledgements then mix all three kinds."""
    i = message["i"]
    if i % 3 == 2:
        raise ValueError(f"message {i} fails by design")
    return i if i % 3 == 1 else None


class DiesOnRestart:
    """Starts once per worker index; every later incarnation exits (72) in its setup, before
    READY: a crash loop that no message explains."""

    def __init__(self, dir: str) -> None:
        self.dir = dir

    def setup(self, worker_index: int) -> None:
        try:
            os.close(
                os.open(
                    os.path.join(self.dir, f"started-{worker_index}"),
                    os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                )
            )
        except FileExistsError:
            os._exit(72)

    def handle(self, channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
        return seq


def hold(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Sync and CPU-bound for up to ``message["s"]`` seconds (default 60): writes this worker's
    pid to the file ``message["marker"]`` first (the test's handshake that the call has begun),
    then spins in pure Python, never returning to the event loop."""
    with open(message["marker"] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(message["marker"] + ".tmp", message["marker"])
    end = time.monotonic() + message.get("s", 60)
    while time.monotonic() < end:
        pass
    return seq


def lifecycle(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Returns ``[seq, state before]``. ``{"keep": x}`` stores ``x`` as the channel's state;
    ``{"end": true}`` stores 1 and then ends the channel."""
    before = channel.state
    if "keep" in message:
        channel.state = message["keep"]
    if message.get("end"):
        channel.state = 1
        channel.end()
    return [seq, before]


async def poison_async(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Async: awaits, then ``{"die": true}`` kills the worker (exit code 73) every time, while
    other channels' calls are in flight on the same event loop."""
    await asyncio.sleep(0.001)  # sleep-ok - the handler's own work, in a worker
    if message.get("die"):
        os._exit(73)
    return [seq, message["i"]]


def counter(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """Stateful: counts the messages of its channel in ``channel.state`` and checks that
    ``message["i"]`` is that count (a state lost or restored wrong in a move shows at once).
    Returns ``[seq, count]``; with ``message["ms"]`` it first sleeps (a slow call); with
    ``message["fail"]`` it raises (counting nothing)."""
    if message.get("ms"):
        time.sleep(message["ms"] / 1000.0)  # sleep-ok - the handler's own work, in a worker
    if message.get("fail"):
        raise ValueError(f"refusing message {message['i']}")
    count = (channel.state or 0) + 1
    if message["i"] != count - 1 and not redelivered:
        raise AssertionError(f"channel {channel.id!r}: message {message['i']} at count {count}")
    channel.state = count
    return [seq, count]


async def gated_counter(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """:func:`counter`, async, and with ``message["gate"]`` it first awaits (inside the worker)
    until that file exists: a call that keeps its channel busy for as long as a test wants."""
    gate = message.get("gate")
    while gate and not os.path.exists(gate):
        await asyncio.sleep(0.002)  # sleep-ok - the handler's own work, in a worker
    return counter(channel, seq, message, redelivered)


class Unmovable:
    """Keeps a state that CBOR cannot encode on channels whose message says so."""

    def handle(self, channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
        channel.state = object() if message.get("opaque") else (channel.state or 0) + 1
        return seq


class Hooked:
    """Counts each channel's messages in ``channel.state`` and moves the count through the
    snapshot/restore hooks; a channel told ``{"corrupt": True}`` keeps a count its ``restore``
    refuses (a state that cannot be restored on the new worker)."""

    def handle(self, channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
        channel.state = -1 if message.get("corrupt") else (channel.state or 0) + 1
        return channel.state

    def snapshot(self, channel: Any) -> bytes:
        return cbor2.dumps(channel.state)

    def restore(self, channel: Any, data: bytes | None) -> None:
        count = cbor2.loads(data) if data is not None else None
        if count == -1:
            raise ValueError("the moved count is corrupt")
        channel.state = count


class FailsToStartFrom:
    """A class handler whose ``setup`` fails on worker indexes from ``index`` on (a worker
    added by a resize that cannot start)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def setup(self, worker_index: int) -> None:
        if worker_index >= self.index:
            raise RuntimeError(f"worker {worker_index} has no database connection")

    def handle(self, channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
        return counter(channel, seq, message, redelivered)


def spin(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """CPU-bound: burns ``message["us"]`` microseconds of CPU, then counts like :func:`counter`
    (the load that levelling measures is CPU time)."""
    end = time.thread_time() + message["us"] / 1e6
    while time.thread_time() < end:
        pass
    return counter(channel, seq, message, redelivered)


class Journal:
    """The handler of the model test (``tests/test_moves_model.py``): each channel's ledger of
    applied messages, ``[[seq, redelivered], ...]``, lives in ``channel.state`` (CBOR: it moves
    with its slot) and is returned with each message as ``[seq, ledger]``. Every call is also
    journalled to ``<dir>/journal``, one file shared by all workers, with one ``os.write`` each
    (O_APPEND: the lines of all processes stay whole and in the order written, and a SIGKILL
    right after keeps them): ``A`` (applied) or ``F`` (refused), channel, seq, the producer's
    index ``message["i"]``, redelivered and the worker's pid.

    ``message["fail"]``: refuse (raise) until the file ``<dir>/fix-<channel hex>-<seq>`` exists
    (the operator's fix before a resume). ``message["ms"]``: first sleep that long (a slow call);
    ``message["hold_ms"]``: sleep that long after applying it, unless redelivered (applied, not
    yet acknowledged: a worker killed then leaves it to its successor).
    """

    def __init__(self, dir: str) -> None:
        self.dir = dir
        self.fd = -1
        self.pid = 0

    def setup(self, worker_index: int) -> None:
        self.fd = os.open(
            os.path.join(self.dir, "journal"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
        )
        self.pid = os.getpid()

    def teardown(self) -> None:
        os.close(self.fd)

    def handle(self, channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
        key = channel.id.hex()
        line = f"{key} {seq} {message['i']} {int(redelivered)} {self.pid}\n"
        if message.get("ms"):
            time.sleep(message["ms"] / 1000.0)  # sleep-ok - the handler's own work, in a worker
        if message.get("fail") and not os.path.exists(
            os.path.join(self.dir, f"fix-{key}-{seq}")
        ):
            os.write(self.fd, f"F {line}".encode())
            raise ValueError(f"refusing seq {seq} until it is fixed")
        ledger = [*(channel.state or []), [seq, redelivered]]
        channel.state = ledger
        os.write(self.fd, f"A {line}".encode())
        if message.get("hold_ms") and not redelivered:
            time.sleep(message["hold_ms"] / 1000.0)  # sleep-ok - the handler's own work
        return [seq, ledger]


class HostJournal(Journal):
    """The handler of the multi-host tests (``tests/test_multihost.py``): counts each channel's
    applied messages in ``channel.state`` (CBOR: it moves with its slot; lost with a lost
    worker) and returns ``[seq, count]``; journals every call to ``<dir>/journal`` (one file,
    shared by all simulated hosts, which share the file system), one ``os.write`` each:
    channel, seq, the producer's index ``message["i"]``, redelivered, pid, and the call's start
    and end (``time.time()``: the hosts share one clock), so that order, duplicates and calls of
    one channel on two hosts at once can be checked afterwards. ``message["ms"]``: the call takes
    that long (a slow handler)."""

    def handle(self, channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
        start = time.time()
        if message.get("ms"):
            time.sleep(message["ms"] / 1000.0)  # sleep-ok - the handler's own work, in a worker
        count = (channel.state or 0) + 1
        channel.state = count
        end = time.time()
        os.write(
            self.fd,
            f"{channel.id.hex()} {seq} {message['i']} {int(redelivered)} {self.pid} "
            f"{start:.6f} {end:.6f}\n".encode(),
        )
        return [seq, count]


def read_host_journal(dir: str) -> dict[str, list[tuple[int, int, bool, int, float, float]]]:
    """``<dir>/journal`` by channel: ``(seq, i, redelivered, pid, start, end)`` per call, in the
    order the calls started."""
    out: dict[str, list[tuple[int, int, bool, int, float, float]]] = {}
    with open(os.path.join(dir, "journal")) as f:
        for line in f:
            key, seq, i, red, pid, start, end = line.split()
            out.setdefault(key, []).append(
                (int(seq), int(i), red == "1", int(pid), float(start), float(end))
            )
    for calls in out.values():
        calls.sort(key=lambda c: c[4])
    return out
