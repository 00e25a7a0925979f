"""Fault injection on real pools under load: crashes, hangs, handler failures, bad frames.

Every case runs 2 workers and 2,000 channels with a durable ledger handler (``handlers.Ledger``)
and then checks, for every channel: each message applied exactly once, in order, the final state
equal to serial application, duplicates only where marked redelivered, and the cause reported.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import handlers
import psutil
import pytest
import zmq

from shardpool import HandlerError, PoolBroken, ShardPool, WorkerStartError, launch

pytestmark = pytest.mark.multiprocess

CHANNELS = 2000
PER_CHANNEL = 12


def cid(c: int) -> bytes:
    return c.to_bytes(4, "big") * 8


def value(c: int, i: int) -> int:
    return (c * 7919 + i * 104729 + 1) % 1_000_003


@dataclass
class Outcome:
    stats: dict[str, Any]
    failures: list[HandlerError]
    ledger: dict[str, list[tuple[str, int, int, int]]]
    pool: ShardPool | None = None


@dataclass
class Load:
    """Interleaved traffic for every channel; ``faults`` marks (channel, index) → message extras;
    ``midway`` runs once half of the messages are submitted (from the producer thread)."""

    faults: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    midway: Callable[[ShardPool], None] | None = None

    def produce(self, pool: ShardPool) -> None:
        half = CHANNELS * PER_CHANNEL // 2
        n = 0
        for i in range(PER_CHANNEL):
            for c in range(CHANNELS):
                msg = {"v": value(c, i), **self.faults.get((c, i), {})}
                pool.submit(cid(c), msg)
                n += 1
                if n == half and self.midway is not None:
                    self.midway(pool)


def run_load(
    tmp_path: Path, load: Load, *, after: Callable[[ShardPool], None] | None = None, **options: Any
) -> Outcome:
    failures: list[HandlerError] = []
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    opts = dict(workers=2, heartbeat_interval_s=0.1, restart_backoff_s=0.01)
    opts.update(options)
    with ShardPool(
        "handlers:Ledger",
        handler_options={"dir": str(ledger_dir)},
        on_failure=failures.append,
        **opts,
    ) as pool:
        producer = threading.Thread(target=load.produce, args=(pool,))
        producer.start()
        producer.join(120)
        assert not producer.is_alive()
        pool.drain(timeout=120)
        if after is not None:
            after(pool)
            pool.drain(timeout=120)
        stats = pool.stats()
    return Outcome(stats, failures, handlers.read_ledgers(str(ledger_dir)))


def verify(out: Outcome, skipped: frozenset[tuple[int, int]] = frozenset()) -> tuple[int, int]:
    """Check every channel; return (recognised duplicates, redelivered deliveries logged)."""
    assert len(out.ledger) == CHANNELS
    duplicates = redelivered = 0
    for c in range(CHANNELS):
        lines = out.ledger[cid(c).hex()]
        assert [x for x in lines if x[0] == "V"] == [], f"channel {c}: unmarked duplicate"
        for _, seq, last, _ in (x for x in lines if x[0] == "G"):
            assert all((c, i) in skipped for i in range(last + 1, seq)), f"channel {c}: gap"
        applied = [x for x in lines if x[0] == "A"]
        expect = [i for i in range(PER_CHANNEL) if (c, i) not in skipped]
        assert [x[1] for x in applied] == expect, f"channel {c}"
        assert applied[-1][2] == handlers.ledger_digest([value(c, i) for i in expect])
        dups = [x for x in lines if x[0] == "D"]
        assert all(x[3] == 1 for x in dups)  # a duplicate is always marked redelivered
        duplicates += len(dups)
        redelivered += sum(x[3] for x in lines)
    for w in out.stats["workers"]:
        assert (w["gaps"], w["duplicates"], w["reorders"]) == (0, 0, 0), w
    return duplicates, redelivered


def _signal_worker(sig: int) -> Callable[[ShardPool], None]:
    def inject(pool: ShardPool) -> None:
        pid = pool.worker_pids()[0]
        assert pid is not None
        os.kill(pid, sig)

    return inject


CRASHES = {
    "sigkill": (Load(midway=_signal_worker(signal.SIGKILL)), "killed by SIGKILL", {}),
    "os_exit": (Load(faults={(5, PER_CHANNEL // 2): {"fault": "exit"}}), "exited with code 70", {}),
    "segfault": (Load(faults={(5, PER_CHANNEL // 2): {"fault": "segv"}}), "killed by SIGSEGV", {}),
    "handler_sys_exit": (
        Load(faults={(5, PER_CHANNEL // 2): {"fault": "sysexit"}}),
        "exited with code 75 (SystemExit: 75)",
        {},
    ),
    "sigstop_hang": (
        Load(midway=_signal_worker(signal.SIGSTOP)),
        "no heartbeat",
        {"heartbeat_timeout_s": 1.5},
    ),
}


@pytest.mark.parametrize("case", sorted(CRASHES))
def test_worker_crash_is_recovered_in_order(tmp_path: Path, case: str) -> None:
    load, cause, options = CRASHES[case]
    out = run_load(tmp_path, load, **options)
    duplicates, redelivered = verify(out)
    assert duplicates <= redelivered
    assert out.failures == []
    restarted = [w for w in out.stats["workers"] if w["restarts"]]
    assert len(restarted) == 1 and restarted[0]["restarts"] == 1
    assert cause in restarted[0]["last_exit"]
    assert restarted[0]["epoch"] == 2 and restarted[0]["state"] == "ready"
    assert out.stats["replayed"] >= redelivered - duplicates
    for c, i in load.faults:
        # The message that crashed its worker came back, marked, and was applied exactly once.
        [applied] = [x for x in out.ledger[cid(c).hex()] if x[0] == "A" and x[1] == i]
        assert applied[3] == 1


def test_fork_server_killed_under_load_takes_every_worker_and_the_pool_replaces_them(
    tmp_path: Path,
) -> None:
    """The fork server is every worker's parent: its death ends them all at once (their parent
    guard), and their successors come from a fresh one, with nothing lost or reordered."""
    servers: list[int] = []

    def kill_fork_server(pool: ShardPool) -> None:
        pid = pool.worker_pids()[0]
        assert pid is not None
        server = psutil.Process(pid).parent()
        assert "multiprocess.forkserver" in " ".join(server.cmdline())
        servers.append(server.pid)
        server.kill()

    out = run_load(tmp_path, Load(midway=kill_fork_server))
    duplicates, redelivered = verify(out)
    assert duplicates <= redelivered and out.failures == []
    for w in out.stats["workers"]:
        # Gone with its parent (PR_SET_PDEATHSIG, or the watchdog thread): once, then a successor.
        assert w["restarts"] == 1 and w["state"] == "ready", w
        assert w["last_exit"] == (
            "left because its parent (the front, or its fork server) disappeared"
        ), w
    assert not psutil.pid_exists(servers[0]) or (
        psutil.Process(servers[0]).status() == psutil.STATUS_ZOMBIE
    )


def test_a_stopped_fork_server_is_given_up_and_workers_are_spawned_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork server that stops answering (here SIGSTOP) must not hold the front: the start of a
    successor gives up on it after launch.START_TIMEOUT_S, kills it (its workers go with it) and
    spawns every successor; nothing is lost or reordered."""
    monkeypatch.setattr(launch, "START_TIMEOUT_S", 1.0)

    def stop_fork_server_then_kill_a_worker(pool: ShardPool) -> None:
        pid = pool.worker_pids()[0]
        assert pid is not None
        server = psutil.Process(pid).parent()
        assert "multiprocess.forkserver" in " ".join(server.cmdline())
        server.suspend()
        os.kill(pid, signal.SIGKILL)

    parents: list[int] = []

    def parents_of_workers(pool: ShardPool) -> None:
        parents.extend(psutil.Process(pid).ppid() for pid in pool.worker_pids() if pid)

    try:
        out = run_load(
            tmp_path, Load(midway=stop_fork_server_then_kill_a_worker), after=parents_of_workers
        )
        assert parents == [os.getpid(), os.getpid()]  # every successor spawned by the front
        duplicates, redelivered = verify(out)
        assert duplicates <= redelivered and out.failures == []
        assert all(w["state"] == "ready" and w["restarts"] >= 1 for w in out.stats["workers"])
    finally:
        launch.reset()  # the next tests may use a fork server again


def test_exception_skip_policy_reports_and_continues(tmp_path: Path) -> None:
    out = run_load(tmp_path, Load(faults={(5, 3): {"fault": "raise"}}), failure_policy="skip")
    verify(out, skipped=frozenset({(5, 3)}))
    [err] = out.failures
    assert (err.channel_id, err.seq, err.policy, err.exc_type) == (cid(5), 3, "skip", "ValueError")
    assert "injected failure on seq 3" in err.traceback


@pytest.mark.parametrize("decision", ["resume", "skip"])
def test_exception_halt_policy_parks_only_its_channel(tmp_path: Path, decision: str) -> None:
    seen: dict[str, Any] = {}

    def operator(pool: ShardPool) -> None:
        # drain() returned: every other channel finished while channel 5 stayed parked.
        seen["halted"] = pool.halted_channels()
        seen["ledger"] = handlers.read_ledgers(str(tmp_path / "ledger"))
        getattr(pool, decision)(cid(5))

    out = run_load(
        tmp_path, Load(faults={(5, 3): {"fault": "raise"}}), after=operator, failure_policy="halt"
    )
    assert seen["halted"] == {cid(5): 3}
    parked = [x[1] for x in seen["ledger"][cid(5).hex()] if x[0] == "A"]
    assert parked == [0, 1, 2]
    others = [
        k for k, v in seen["ledger"].items() if len([x for x in v if x[0] == "A"]) == PER_CHANNEL
    ]
    assert len(others) == CHANNELS - 1
    verify(out, skipped=frozenset({(5, 3)}) if decision == "skip" else frozenset())
    assert out.failures[0].policy == "halt" and out.failures[0].seq == 3
    assert "injected failure on seq 3" in out.failures[0].traceback
    if decision == "skip":
        assert [f.policy for f in out.failures] == ["halt", "skipped"]
    else:
        assert len(out.failures) == 1


def test_exception_retry_policy_succeeds_within_the_limit(tmp_path: Path) -> None:
    out = run_load(
        tmp_path,
        Load(faults={(5, 3): {"fault": "raise_n", "n": 2}}),
        failure_policy="retry",
        retry_limit=3,
        retry_backoff_ms=1,
    )
    verify(out)
    assert out.failures == []
    assert sum(w["retried"] for w in out.stats["workers"]) == 2


def test_exception_retry_policy_halts_when_exhausted(tmp_path: Path) -> None:
    out = run_load(
        tmp_path,
        Load(faults={(5, 3): {"fault": "raise_n", "n": 5}}),
        after=lambda pool: pool.resume(cid(5)),
        failure_policy="retry",
        retry_limit=2,
        retry_backoff_ms=1,
    )
    verify(out)
    [err] = out.failures
    assert (err.seq, err.policy) == (3, "halt")
    assert "injected failure 3 of 5" in str(err)


def test_handler_that_fails_to_import_is_reported_with_its_cause() -> None:
    with pytest.raises(WorkerStartError) as info:
        ShardPool(handlers.BROKEN_IMPORT, workers=2, ready_timeout_s=60)
    assert "ModuleNotFoundError" in str(info.value)
    assert "tests_missing_module_for_shardpool" in str(info.value.__cause__)


def test_bad_frame_to_a_worker_is_dropped_and_counted(tmp_path: Path) -> None:
    def garbage(pool: ShardPool) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        try:
            endpoint = f"ipc://{pool._front.rundir}/w0.1"
            sock.connect(endpoint)
            for frame in (b"\xff\x00garbage", b"\x83\x00\x01", b""):
                sock.send(frame, flags=zmq.NOBLOCK)
        finally:
            sock.close(linger=1000)
            ctx.term()

    out = run_load(tmp_path, Load(midway=garbage))
    verify(out)
    w0 = out.stats["workers"][0]
    assert w0["restarts"] == 0
    assert w0["bad_frames"] == 3


POISONS = {
    "exit": ("always_exit", "WorkerDied", "exited with code 71", {}),
    "segfault": ("always_segv", "WorkerDied", "killed by SIGSEGV", {}),
    "hang": ("always_hang", "WorkerHung", "no heartbeat", {"heartbeat_timeout_s": 1.0}),
}


@pytest.mark.parametrize("case", sorted(POISONS))
def test_poison_message_quarantines_its_channel_and_the_pool_goes_on(
    tmp_path: Path, case: str
) -> None:
    fault, exc_type, cause, options = POISONS[case]
    seen: dict[str, Any] = {}

    def operator(pool: ShardPool) -> None:
        # drain() returned: every other channel finished while channel 5 stayed quarantined.
        seen["halts"] = pool.halts()
        seen["stats"] = pool.stats()
        pool.skip(cid(5))

    out = run_load(
        tmp_path, Load(faults={(5, 6): {"fault": fault}}), after=operator, max_restarts=2, **options
    )
    verify(out, skipped=frozenset({(5, 6)}))
    [halt] = seen["halts"].values()
    assert list(seen["halts"]) == [cid(5)] and halt.seq == 6 and halt.quarantined
    [quarantine, skipped] = out.failures
    assert (quarantine.channel_id, quarantine.seq) == (cid(5), 6)
    assert (quarantine.policy, quarantine.exc_type) == ("quarantine", exc_type)
    assert cause in str(quarantine) and "2 times" in str(quarantine)
    assert halt.error is quarantine or str(halt.error) == str(quarantine)
    assert skipped.policy == "skipped"
    # One death no message could explain (many were in flight), then two with the poison message
    # in its handler during careful replays: within max_restarts = 2 only because the explained
    # deaths do not count towards it.
    assert seen["stats"]["quarantined"] == 1 and seen["stats"]["state"] == "running"
    assert sum(w["restarts"] for w in seen["stats"]["workers"]) == 3
    assert [h["quarantined"] for h in seen["stats"]["halted"]] == [True]


def test_poison_message_of_an_async_handler_is_found_among_concurrent_calls() -> None:
    """With an async handler many calls are in flight when the worker dies, so the death cannot
    be pinned on one; the careful replay runs them one at a time and finds the poison."""
    failures: list[HandlerError] = []
    with ShardPool(
        handlers.poison_async,
        workers=2,
        restart_backoff_s=0.01,
        max_restarts=2,
        on_failure=failures.append,
    ) as pool:
        poison = cid(7)
        futs = {
            (c, i): pool.request(cid(c), {"i": i, "die": (c, i) == (7, 3)})
            for i in range(10)
            for c in range(40)
        }
        for (c, i), fut in futs.items():
            if c != 7:
                assert fut.result(timeout=60) == [i, i]
        for i in range(3):
            assert futs[(7, i)].result(timeout=60) == [i, i]
        pool.drain(timeout=60)
        assert pool.halted_channels() == {poison: 3}
        [err] = failures
        assert (err.policy, err.exc_type, err.seq) == ("quarantine", "WorkerDied", 3)
        assert "exited with code 73" in str(err)
        assert not any(futs[(7, i)].done() for i in range(3, 10))
        pool.skip(poison)
        for i in range(4, 10):
            assert futs[(7, i)].result(timeout=60) == [i, i]
        with pytest.raises(HandlerError, match="skipped"):
            futs[(7, 3)].result(timeout=60)


def test_crash_loop_not_explained_by_a_message_breaks_the_pool(tmp_path: Path) -> None:
    pool = ShardPool(
        "handlers:DiesOnRestart",
        handler_options={"dir": str(tmp_path)},
        workers=2,
        max_restarts=2,
        restart_backoff_s=0.01,
    )
    try:
        assert pool.call(cid(1), {"v": 1}, timeout=30) == 0
        victim = pool.worker_of(cid(1))
        pid = pool.worker_pids()[victim]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # every restart then dies in its setup, before READY
        pool.submit(cid(1), {"v": 2})  # waits for a successor that never comes
        with pytest.raises(PoolBroken) as info:
            pool.drain(timeout=60)
        assert "keeps dying" in str(info.value)
        assert "exited with code 72" in str(info.value)
        assert 72 in info.value.exitcodes.values()
        with pytest.raises(PoolBroken):
            pool.submit(cid(2), {"v": 3})
        assert pool.broken
    finally:
        report = pool.close(timeout=5)
    # Nothing vanishes: the message no successor ever received is handed back (unfinished, or
    # in doubt if it was sent before the front saw the kill), exactly once.
    assert [(c, s) for c, s, _ in report.unfinished + report.in_doubt] == [(cid(1), 1)]


@pytest.mark.timeout(300)
def test_chaos_repeated_sigkill_under_20000_channels(tmp_path: Path) -> None:
    """A worker is SIGKILLed every 300 ms for 3 s while 20,000 channels stream. Every channel's
    durable state ends equal to applying its messages serially; every extra delivery the handler
    saw was flagged redelivered."""
    channels, per_channel = 20_000, 6
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    stop = threading.Event()
    kills: list[int] = []

    def killer(pool: ShardPool) -> None:
        n = 0
        while not stop.wait(0.3) and n < 10:
            pid = pool.worker_pids()[n % 2]
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass
            n += 1

    with ShardPool(
        "handlers:Ledger",
        handler_options={"dir": str(ledger_dir)},
        workers=2,
        max_restarts=100,
        restart_backoff_s=0.01,
        restart_backoff_max_s=0.05,
        heartbeat_interval_s=0.1,
    ) as pool:
        chaos = threading.Thread(target=killer, args=(pool,))
        chaos.start()
        try:
            # Keep streaming for as long as the killer runs (at least per_channel rounds).
            rounds = 0
            while rounds < per_channel or (chaos.is_alive() and rounds < 200):
                for c in range(channels):
                    pool.submit(cid(c), {"v": value(c, rounds)})
                rounds += 1
            chaos.join(60)
            pool.drain(timeout=180)
        finally:
            stop.set()
            chaos.join(10)
        stats = pool.stats()
    ledger = handlers.read_ledgers(str(ledger_dir))
    assert len(kills) >= 8
    assert stats["restarts"] >= 8
    assert len(ledger) == channels
    deliveries = duplicates = 0
    for c in range(channels):
        lines = ledger[cid(c).hex()]
        applied = [x for x in lines if x[0] == "A"]
        assert [x[1] for x in applied] == list(range(rounds)), f"channel {c}: {lines}"
        assert applied[-1][2] == handlers.ledger_digest([value(c, i) for i in range(rounds)])
        assert [x for x in lines if x[0] in "VG"] == [], f"channel {c}"
        dups = [x for x in lines if x[0] == "D"]
        assert all(x[3] == 1 for x in dups)
        deliveries += len(applied) + len(dups)
        duplicates += len(dups)
    # Every delivery beyond the first of a message is a recognised, flagged duplicate.
    assert deliveries - channels * rounds == duplicates
    assert stats["replayed"] > 0
    assert stats["submitted"] == stats["acknowledged"] == channels * rounds


def test_failure_policy_by_message_type(tmp_path: Path) -> None:
    # Pool policy halt, but a failing "fee" message is skipped: its channel goes on, while the
    # channel whose untyped message fails is halted.
    load = Load(
        faults={
            (5, 3): {"fault": "raise", "type": "fee"},
            (6, 3): {"fault": "raise"},
        }
    )
    out = run_load(
        tmp_path,
        load,
        failure_policy="halt",
        failure_policy_by_type={"fee": "skip"},
        after=lambda pool: pool.skip(cid(6)),
    )
    verify(out, skipped=frozenset({(5, 3), (6, 3)}))
    policies = {(f.channel_id, f.policy) for f in out.failures}
    assert policies == {(cid(5), "skip"), (cid(6), "halt"), (cid(6), "skipped")}


@pytest.mark.timeout(60)
def test_a_long_batch_of_slow_calls_does_not_read_as_a_hung_worker() -> None:
    # 60 calls of 25 ms on one worker: 1.5 s of work in one batch, three times the heartbeat
    # timeout. The worker hands a batch of slow calls over in slices and beats in between.
    with ShardPool(
        handlers.sleepy, workers=1, heartbeat_interval_s=0.05, heartbeat_timeout_s=0.5
    ) as pool:
        futs = [pool.request(b"slow-%02d" % (i % 6), {"ms": 25}) for i in range(60)]
        got = [f.result(timeout=30) for f in futs]
        stats = pool.stats()
    assert got == [i // 6 for i in range(60)]  # each channel's seqs, in order
    assert stats["restarts"] == 0 and stats["replayed"] == 0
