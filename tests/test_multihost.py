"""Workers on other hosts, simulated with network namespaces (``tests/netns.py``: one namespace
per host, veth links to a bridge holding the front's address, nothing routed anywhere else).

Every link is beyond loopback, so CURVE is on, with keys pinned per worker. Each remote worker
runs ``shardpool worker`` inside its namespace under a small stand-in for systemd's
``Restart=on-failure`` (``remote_tools.HostService``). Every call of every channel is journalled
with its start and end time and pid (the hosts share one clock and one file system), which lets
the tests check order, flagged duplicates and that no channel ever ran on two hosts at once.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import handlers
import pytest
from netns import Hosts, require_netns
from remote_tools import (
    TESTS,
    HostService,
    Results,
    check_journal,
    check_results,
    front_config,
    joined,
    make_keys,
    wait_until,
    worker_argv,
)

from shardpool import MoveRefused, ShardPool
from shardpool.exitcodes import EXIT_CONFIG
from shardpool.security import generate_worker_keys

pytestmark = [pytest.mark.multiprocess, pytest.mark.netns]

PORT = 5557
LEASE_S = 1.0
MARGIN_S = 0.5


@pytest.fixture(autouse=True)
def _netns() -> None:
    require_netns()


def cid(c: int) -> bytes:
    return b"mh-%05d" % c


def _services(
    hosts: Hosts, endpoint: str, keys_dir: Path, ids: list[str]
) -> list[HostService]:
    """One ``shardpool worker`` per id, in the namespace of host 1, 2, ..."""
    return [
        HostService(
            lambda n=n, wid=wid: hosts.popen(  # type: ignore[misc]
                n, worker_argv(endpoint, wid, keys_dir), cwd=TESTS
            )
        )
        for n, wid in enumerate(ids, 1)
    ]


class Stream:
    """Sends ``per_channel`` messages to each of ``channels`` channels, interleaved, from a
    thread; ``ms``: each call's handler time."""

    def __init__(
        self,
        pool: ShardPool,
        channels: int,
        per_channel: int,
        ms: float = 0,
        after: dict[bytes, int] | None = None,
    ) -> None:
        self.pool = pool
        # Messages sent per channel; ``after``: an earlier stream's, whose indexes this continues.
        self.sent = {cid(c): (after or {}).get(cid(c), 0) for c in range(channels)}
        self.per_channel = per_channel
        self.ms = ms
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for _ in range(self.per_channel):
                for c in self.sent:
                    msg: dict[str, Any] = {"i": self.sent[c]}
                    if self.ms:
                        msg["ms"] = self.ms
                    self.pool.submit(c, msg)
                    self.sent[c] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc

    def start(self) -> Stream:
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the producer did not finish"
        if self.error is not None:
            raise self.error

    def progress(self) -> int:
        return sum(self.sent.values())


def _pool(tmp_path: Path, hosts: Hosts, ids: list[str], results: Results, **kw: Any) -> ShardPool:
    keys = make_keys(tmp_path / "keys", ids)
    journal = tmp_path / "journal"
    journal.mkdir(exist_ok=True)
    kw.setdefault("lease_s", LEASE_S)
    kw.setdefault("margin_s", MARGIN_S)
    cfg = front_config(f"tcp://{hosts.front_addr}:{PORT}", ids, journal, keys=keys, **kw)
    return ShardPool(config=cfg, on_result=results)


@contextlib.contextmanager
def cluster(
    tmp_path: Path, ids: list[str], results: Results, local: int = 1, **kw: Any
) -> Iterator[tuple[Hosts, ShardPool, list[HostService]]]:
    """One simulated host per id, a front with ``local`` local workers, a ``shardpool worker``
    in each host; returns once every remote worker has joined. Everything stops on exit."""
    with Hosts(len(ids)) as hosts, _pool(tmp_path, hosts, ids, results, local=local,
                                         **kw) as pool:
        services = _services(hosts, f"tcp://{hosts.front_addr}:{PORT}", tmp_path / "keys", ids)
        try:
            wait_until(lambda: joined(pool, len(ids)), 60, "the remote workers to join")
            yield hosts, pool, services
        finally:
            for service in services:
                service.stop()


def _remote_pids(pool: ShardPool) -> set[int]:
    return {w["pid"] for w in pool.placement()["remote"]["workers"].values() if w["pid"]}


@pytest.mark.timeout(300)
def test_order_across_hosts_with_two_local_and_two_remote_workers(tmp_path: Path) -> None:
    channels, per_channel = 1000, 200  # 200,000 messages
    rates = {}
    # The all-local run first, same traffic, in the same test: the ratio is what is reported.
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    results = Results()
    cfg = front_config("", [], local_dir, local=4)
    with ShardPool(config=cfg, on_result=results) as pool:
        t0 = time.perf_counter()
        stream = Stream(pool, channels, per_channel).start()
        stream.join(120)
        pool.drain(120)
        rates["local"] = stream.progress() / (time.perf_counter() - t0)
    check_results(results, stream.sent)
    results = Results()
    # The default lease: this test is about order and cost, not failures (a slow machine must not
    # turn a scheduling hiccup into a failover).
    with cluster(tmp_path, ["h1", "h2"], results, local=2, lease_s=3.0, margin_s=1.0) as (
        _, pool, _
    ):
        t0 = time.perf_counter()
        stream = Stream(pool, channels, per_channel).start()
        stream.join(180)
        pool.drain(180)
        rates["remote"] = stream.progress() / (time.perf_counter() - t0)
        stats = pool.stats()
        processed = [w["processed"] for w in stats["workers"]]
        assert all(p > 0 for p in processed), processed  # every host took part
        for w in stats["workers"]:
            assert (w["gaps"], w["duplicates"], w["reorders"]) == (0, 0, 0), w
            assert w["redelivered"] == 0
    check_results(results, stream.sent)
    counts = check_journal(tmp_path / "journal", stream.sent)
    assert counts["calls"] == channels * per_channel and counts["redelivered_dups"] == 0
    print(
        f"\n2 local + 2 remote (CURVE over veth) vs 4 local: {rates['remote']:,.0f} vs "
        f"{rates['local']:,.0f} msgs/s, ratio {rates['remote'] / rates['local']:.2f}; "
        f"processed per worker {processed}"
    )


@pytest.mark.timeout(180)
def test_a_remote_worker_killed_is_replayed_in_order_elsewhere(tmp_path: Path) -> None:
    results = Results()
    with cluster(tmp_path, ["h1"], results) as (hosts, pool, (service,)):
        local_pid = pool.worker_pids()[0]
        stream = Stream(pool, 200, 100, ms=0.5).start()
        # Killed with a backlog: its window holds thousands of messages by then.
        wait_until(lambda: stream.progress() > 5000, 60, "traffic")
        killed_at = time.monotonic()
        service.kill()  # kill -9; the service restarts it
        wait_until(lambda: pool.placement()["remote"]["failovers"] == 1, 30,
                   "the failover")
        failover_s = time.monotonic() - killed_at
        stream.join(120)
        pool.drain(120)
        # The restarted worker came back empty and got its share back by live moves.
        wait_until(lambda: joined(pool, 1), 60, "the restarted worker to rejoin")
        stats = pool.stats()
        assert stats["remote"]["joins"] == 2
        assert stats["workers"][0]["restarts"] == 0 and pool.worker_pids()[0] == local_pid
        assert stats["replayed"] > 0
        assert service.exits == [-9]
    check_results(results, stream.sent)
    counts = check_journal(tmp_path / "journal", stream.sent)
    print(f"\nkill -9 → slots served elsewhere in {failover_s:.2f} s "
          f"(lease {LEASE_S} + margin {MARGIN_S}); {stats['replayed']} replayed, "
          f"{counts['redelivered_dups']} applied twice (flagged redelivered)")


@pytest.mark.timeout(180)
def test_a_partition_longer_than_the_lease_fails_over_without_two_hosts_at_once(
    tmp_path: Path,
) -> None:
    results = Results()
    with cluster(tmp_path, ["h1"], results) as (hosts, pool, (service,)):
        remote_pids = _remote_pids(pool)
        stream = Stream(pool, 200, 50, ms=0.5).start()
        wait_until(lambda: stream.progress() > 5000, 60, "traffic")
        down_at, down_mono = time.time(), time.monotonic()
        hosts.link_down(1)
        wait_until(lambda: pool.placement()["remote"]["failovers"] == 1, 30,
                   "the failover")
        failover_s = time.monotonic() - down_mono
        # (the front last heard it up to a heartbeat interval, 0.2 s, before the cut)
        assert failover_s >= LEASE_S + MARGIN_S - 0.25
        stream.join(120)
        pool.drain(120)  # served by the local worker alone: the remote is cut off
        up_at = time.time()
        hosts.link_up(1)
        wait_until(lambda: pool.placement()["remote"]["joins"] == 2, 60,
                   "the healed worker to rejoin")
        wait_until(lambda: joined(pool, 1), 60, "its share of the slots back")
        more = Stream(pool, 200, 5, after=stream.sent).start()
        more.join(60)
        pool.drain(60)
        assert service.exits == []  # it fenced itself and joined again, never restarted
    sent = more.sent  # (it continued stream's indexes)
    check_results(results, sent)
    journal = handlers.read_host_journal(str(tmp_path / "journal"))
    late = [
        (key, call) for key, calls in journal.items() for call in calls
        if call[3] in remote_pids and down_at + LEASE_S + 0.05 < call[4] < up_at
    ]
    assert not late, f"the cut-off worker ran calls after its lease ran out: {late[:3]}"
    check_journal(tmp_path / "journal", sent)
    print(f"\npartition → slots served again after {failover_s:.2f} s (lease {LEASE_S} + "
          f"margin {MARGIN_S})")


@pytest.mark.timeout(180)
def test_a_flapping_link_keeps_order_and_moves_abort_cleanly(tmp_path: Path) -> None:
    results = Results()
    moves = {"pool": {"move_timeout_s": 0.5}}
    with cluster(tmp_path, ["h1"], results, **moves) as (hosts, pool, _):
        netem = True
        try:
            hosts.netem(1, "delay 50ms loss 30%")
        except RuntimeError:
            netem = False  # no sch_netem here: the link flaps by going down and up only
        stream = Stream(pool, 100, 100, ms=0.2).start()
        done = threading.Event()

        def flap() -> None:
            rng = random.Random(7)
            while not done.is_set():
                hosts.link_down(1)
                done.wait(rng.choice((0.05, 0.2, 0.4, 0.8, 1.8)))  # the link's down time
                hosts.link_up(1)
                done.wait(rng.choice((0.1, 0.3, 0.6)))

        flapper = threading.Thread(target=flap, daemon=True)
        flapper.start()
        outcomes = {"committed": 0, "refused": 0}
        reasons: dict[str, int] = {}
        deadline = time.monotonic() + 8
        try:
            while time.monotonic() < deadline:
                # Slots back and forth between the hosts, whatever the link is doing (after a
                # failover the remote worker owns nothing until it rejoins: then to it).
                src, dst = (0, 1) if outcomes["committed"] % 2 == 0 else (1, 0)
                slots = [s for s in range(4096) if pool.worker_of_slot(s) == src][:20]
                if not slots:
                    src, dst = dst, src
                    slots = [s for s in range(4096) if pool.worker_of_slot(s) == src][:20]
                try:
                    pool.move_slots(slots, dst, timeout=3)
                    outcomes["committed"] += 1
                except MoveRefused as exc:
                    outcomes["refused"] += 1
                    why = str(exc).split(":")[0][:40]
                    reasons[why] = reasons.get(why, 0) + 1
                    time.sleep(0.05)  # sleep-ok: pacing the next attempt
        finally:
            done.set()
            flapper.join(10)
            hosts.link_up(1)
        if netem:
            hosts.netem(1, None)
        stream.join(120)
        pool.drain(120)
        failovers = pool.placement()["remote"]["failovers"]
    check_results(results, stream.sent)
    check_journal(tmp_path / "journal", stream.sent)
    assert outcomes["committed"] + outcomes["refused"] > 2
    print(f"\nflapping link (netem: {netem}): moves {outcomes}, failovers {failovers}, "
          f"refusals {reasons}")


@pytest.mark.timeout(180)
def test_live_moves_local_to_remote_and_back_keep_handler_state_exact(tmp_path: Path) -> None:
    results = Results()
    with cluster(tmp_path, ["h1"], results, lease_s=3.0, margin_s=1.0) as (_, pool, _):
        slots = [s for s in range(4096) if pool.worker_of_slot(s) == 0][:100]
        stream = Stream(pool, 400, 60).start()
        there = pool.move_slots(slots, 1)
        back = pool.move_slots(slots, 0)
        stream.join(120)
        pool.drain(120)
        assert (there.state, back.state) == ("committed", "committed")
        assert all(pool.worker_of_slot(s) == 0 for s in slots)
    check_results(results, stream.sent)
    for c, got in results.by_channel.items():
        # [seq, count]: the state counted every message once, across both moves and hosts.
        assert [v for _, v in got] == [[i, i + 1] for i in range(len(got))], c
    check_journal(tmp_path / "journal", stream.sent)


@pytest.mark.timeout(120)
def test_unknown_wrong_and_missing_keys_are_refused(tmp_path: Path) -> None:
    results = Results()
    with Hosts(1) as hosts, _pool(tmp_path, hosts, ["h1", "h2"], results) as pool:
        endpoint = f"tcp://{hosts.front_addr}:{PORT}"
        keys = tmp_path / "keys"
        stranger = tmp_path / "stranger"
        generate_worker_keys(stranger, "h1")  # a key nobody pinned, claiming id h1

        def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
            proc = hosts.popen(1, argv, cwd=TESTS, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate(timeout=5)
            return subprocess.CompletedProcess(argv, proc.returncode, out, err)

        def counters() -> dict[str, Any]:
            return dict(pool.placement()["remote"])

        # An unknown key: the CURVE handshake fails, counted; it never joins.
        before = counters()["auth_failures"]
        r = run([*worker_argv(endpoint, "h1", None), "--front-key", str(keys / "front.key"),
                 "--secret-key", str(stranger / "h1.key_secret")], timeout=4)
        assert r.returncode != 0 and counters()["auth_failures"] > before
        # A pinned key speaking as another worker: refused for good (exit 2), counted.
        r = run([*worker_argv(endpoint, "h1", None), "--front-key", str(keys / "front.key"),
                 "--secret-key", str(keys / "h2.key_secret")], timeout=30)
        assert r.returncode == EXIT_CONFIG, r.stderr
        assert b"pinned to worker 'h2'" in r.stderr
        assert counters()["impersonations"] >= 1
        # The worker that pins another front key never completes the handshake either.
        other = tmp_path / "other"
        generate_worker_keys(other, "x")
        r = run([*worker_argv(endpoint, "h1", None), "--front-key", str(other / "front.key"),
                 "--secret-key", str(keys / "h1.key_secret")], timeout=4)
        assert r.returncode != 0
        # Plain tcp: `shardpool worker` refuses to go beyond loopback without CURVE ...
        r = run(worker_argv(endpoint, "h1", None), timeout=30)
        assert r.returncode == EXIT_CONFIG and b"remote.connect" in r.stderr
        # ... and a plain ZeroMQ peer saying HELLO gets no answer, only a counted failure.
        before = counters()["auth_failures"]
        probe = (
            "import sys, zmq, cbor2; s = zmq.Context().socket(zmq.DEALER); s.linger = 0; "
            "s.connect(sys.argv[1]); s.send(cbor2.dumps([11, 'h1', b'n' * 16, '0', 1, 1, 'x']));"
            "sys.exit(0 if s.poll(2000) else 3)"
        )
        r = run([sys.executable, "-c", probe, endpoint], timeout=30)
        assert r.returncode == 3
        wait_until(lambda: counters()["auth_failures"] > before, 10, "the counted failure")
        stats = pool.stats(timeout=2)
        assert stats["remote"]["joins"] == 0
        assert all(w["state"] == "away" for w in stats["workers"] if w["remote"])
