"""Remote workers on this host (loopback tcp): the handshake, joining by live moves, a clean
leave, refusals, the lease; the rules of ``[remote]``. The tests across simulated hosts
(namespaces: partitions, CURVE beyond loopback) are in ``test_multihost.py``."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import handlers
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from remote_tools import (
    TESTS,
    HostService,
    Results,
    check_journal,
    check_results,
    front_config,
    joined,
    wait_until,
    worker_argv,
)

from shardpool import ShardPool
from shardpool.config import config_from_dict
from shardpool.errors import ConfigError
from shardpool.exitcodes import EXIT_CONFIG, EXIT_FENCED, EXIT_OK
from shardpool.front.window import Window
from shardpool.security import load_remote_keys
from shardpool.worker.lease import Lease
from shardpool.worker.remote import options_from_config

# -- the rules, without processes --------------------------------------------------------------


def _problems(data: dict[str, Any], check: Any) -> list[tuple[str, object, str]]:
    with pytest.raises(ConfigError) as err:
        check(config_from_dict(data))
    return list(err.value.problems)


def test_a_non_loopback_bind_without_curve_is_refused_naming_the_key() -> None:
    problems = _problems(
        {"remote": {"bind": "tcp://10.1.2.3:5557", "workers": {"h2": 1}}}, load_remote_keys
    )
    assert [p[0] for p in problems] == ["remote.bind"]
    assert "CURVE" in problems[0][2] and problems[0][1] == "tcp://10.1.2.3:5557"


def test_bind_and_workers_go_together_and_front_is_not_a_worker_id() -> None:
    assert _problems({"remote": {"workers": {"h2": 1}}}, load_remote_keys)[0][0] == "remote.bind"
    assert _problems({"remote": {"bind": "tcp://127.0.0.1:1"}}, load_remote_keys)[0][0] == (
        "remote.workers"
    )
    problems = _problems(
        {"remote": {"bind": "tcp://127.0.0.1:1", "workers": {"front": 1}}}, load_remote_keys
    )
    assert problems[0][0] == "remote.workers" and '"front"' in problems[0][2]


@pytest.mark.parametrize(
    "workers",
    [{".hidden": 1}, {"a/b": 1}, {"ok": 0}, {"ok": -1}, {"ok": float("nan")}, {"ok": True},
     {"x" * 65: 1}, {"ok": "1"}],
)
def test_bad_worker_tables_are_refused_at_load(workers: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"remote": {"bind": "tcp://127.0.0.1:1", "workers": workers}})
    assert err.value.problems[0][0] == "remote.workers"


def test_every_listed_worker_needs_its_pinned_key(tmp_path: Path) -> None:
    from remote_tools import make_keys

    keys = make_keys(tmp_path, ["h2"])
    problems = _problems(
        {"remote": {"bind": "tcp://10.1.2.3:5557", "workers": {"h2": 1, "h3": 1}, **keys}},
        load_remote_keys,
    )
    assert [p[0] for p in problems] == ["remote.workers_dir"]
    assert "'h3'" in problems[0][2]
    ok = load_remote_keys(config_from_dict(
        {"remote": {"bind": "tcp://10.1.2.3:5557", "workers": {"h2": 1}, **keys}}
    ))
    assert ok is not None and sorted(ok.pinned.values()) == ["h2"]


def test_worker_options_need_an_address_an_id_and_curve_beyond_loopback(tmp_path: Path) -> None:
    problems = _problems({}, options_from_config)
    assert [p[0] for p in problems] == ["remote.connect", "remote.worker_id"]
    problems = _problems(
        {"remote": {"connect": "tcp://10.1.2.3:5557", "worker_id": "h2"}}, options_from_config
    )
    assert [p[0] for p in problems] == ["remote.connect"] and "CURVE" in problems[0][2]
    problems = _problems(
        {"remote": {"connect": "tcp://10.1.2.3:5557", "worker_id": "h2",
                    "front_public_key": str(tmp_path / "missing.key")}},
        options_from_config,
    )
    assert [p[0] for p in problems] == ["remote.worker_secret_key"]
    opts = options_from_config(config_from_dict(
        {"remote": {"connect": "tcp://127.0.0.1:5557", "worker_id": "h2"}}
    ))
    assert (opts.worker_id, opts.secret_key) == ("h2", None)


# -- units -------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_the_lease_fences_at_its_deadline_and_only_extends_from_when_a_beat_was_sent() -> None:
    now = time.monotonic()
    lease = Lease(0.3, now, grace_s=60.0)
    fenced: list[float] = []
    lease.start(lambda: fenced.append(time.monotonic()))
    while time.monotonic() < now + 0.1:  # a heartbeat sent 0.1 s later
        pass
    sent = time.monotonic()
    lease.renew(sent)  # its answer: the lease runs until sent + 0.3
    lease.renew(now)  # an older answer never shortens it
    lease.renew(time.monotonic() + 3600)  # not a time of ours: ignored
    wait_until(lambda: bool(fenced), 5, "the fence")
    lease.close()
    assert fenced[0] >= sent + 0.3 and lease.expired
    assert fenced[0] - (sent + 0.3) < 0.2
    assert lease.rtt_s < 0.2


def test_take_all_empties_a_window_in_order_and_marks_what_may_have_run() -> None:
    win = Window(0)
    waiters = []
    for i in range(5):
        done = lambda v, e, i=i: None  # noqa: E731
        waiters.append(done)
        win.place(b"\x83" + b"\x41c", i, b"\xf6", done)
        if i == 2:
            batch = win.seal(1)
            batch.sent = True
    win.finish_range(1, 2, [])  # message 1 finished
    taken = win.take_all()
    assert [(item[1], ran) for item, _, ran, _ in taken] == [(0, True), (2, True), (3, False),
                                                              (4, False)]
    assert [w for _, w, _, _ in taken] == [waiters[0], waiters[2], waiters[3], waiters[4]]
    assert (win.inflight, win.batches, win.parts, win.waiters) == (0, {}, [], {})
    assert win.next_wseq == 5  # numbering goes on: no wseq is ever reused


# -- one process, loopback ---------------------------------------------------------------------

def _service(endpoint: str, wid: str) -> HostService:
    return HostService(
        lambda: subprocess.Popen(worker_argv(endpoint, wid, None), cwd=TESTS)  # noqa: S603
    )


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_a_remote_worker_joins_takes_its_share_and_leaves_cleanly(tmp_path: Path) -> None:
    results = Results()
    cfg = front_config("tcp://127.0.0.1:*", ["w1"], tmp_path)
    with ShardPool(config=cfg, on_result=results) as pool:
        endpoint = pool._front.remote.endpoint  # type: ignore[union-attr]
        service = _service(endpoint, "w1")
        try:
            wait_until(lambda: joined(pool, 1), 30, "the remote worker to join")
            stats = pool.stats()
            remote = stats["workers"][1]
            assert (remote["remote"], remote["worker_id"], remote["link"]) == (True, "w1", "up")
            assert stats["placement"]["slots_per_worker"] == [2048, 2048]
            sent = {b"lb-%03d" % c: 0 for c in range(200)}
            for _ in range(20):
                for cid in sent:
                    pool.submit(cid, {"i": sent[cid]})
                    sent[cid] += 1
            pool.drain(30)
            assert pool.stats()["workers"][1]["processed"] > 0
            # Stopped by its own host: it says BYE, its channels fail over at once, none in doubt.
            assert service.stop() == EXIT_OK
            wait_until(lambda: remote_state(pool) == "away", 10, "the clean leave")
            assert pool.stats()["placement"]["slots_per_worker"] == [4096, 0]
            for cid in sent:
                pool.submit(cid, {"i": sent[cid]})
                sent[cid] += 1
            pool.drain(30)
        finally:
            service.stop()
    check_results(results, sent)
    stats = check_journal(tmp_path, sent)
    assert stats["redelivered_dups"] == 0


@contextlib.contextmanager
def loopback(
    tmp_path: Path, results: Results | None = None, **kw: Any
) -> Iterator[tuple[ShardPool, HostService]]:
    """A front with one local worker and remote worker w1 (a ``shardpool worker`` process on
    loopback), once w1 has joined; everything stops on exit."""
    cfg = front_config("tcp://127.0.0.1:*", ["w1"], tmp_path, **kw)
    with ShardPool(config=cfg, on_result=results) as pool:
        service = _service(pool._front.remote.endpoint, "w1")  # type: ignore[union-attr]
        try:
            wait_until(lambda: joined(pool, 1), 30, "the remote worker to join")
            yield pool, service
        finally:
            service.stop()


def remote_state(pool: ShardPool) -> str:
    return str(pool.placement()["remote"]["workers"][1]["state"])


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_an_unknown_worker_id_is_refused_for_good(tmp_path: Path) -> None:
    cfg = front_config("tcp://127.0.0.1:*", ["w1"], tmp_path)
    with ShardPool(config=cfg) as pool:
        endpoint = pool._front.remote.endpoint  # type: ignore[union-attr]
        proc = subprocess.Popen(worker_argv(endpoint, "stranger", None), cwd=TESTS,
                                stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        assert proc.returncode == EXIT_CONFIG
        assert b"unknown worker id" in err
        assert pool.placement()["remote"]["refused"] == 1


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_second_incarnation_is_refused_until_the_first_is_failed_over(tmp_path: Path) -> None:
    cfg = front_config("tcp://127.0.0.1:*", ["w1"], tmp_path, lease_s=0.5, margin_s=0.3)
    with ShardPool(config=cfg) as pool:
        endpoint = pool._front.remote.endpoint  # type: ignore[union-attr]
        first = _service(endpoint, "w1")
        second = None
        try:
            wait_until(lambda: joined(pool, 1), 30, "the first worker to join")
            second = _service(endpoint, "w1")
            wait_until(lambda: pool.placement()["remote"]["refused"] >= 1, 10, "the refusal")
            assert pool.stats()["workers"][1]["failovers"] == 0
            first.stop()  # the first leaves (BYE): the second gets in
            wait_until(lambda: pool.placement()["remote"]["joins"] == 2, 20, "the second to join")
        finally:
            first.stop()
            if second is not None:
                second.stop()


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_closing_the_pool_stops_a_connected_remote_worker_and_settles_every_message(
    tmp_path: Path,
) -> None:
    results = Results()
    cfg = front_config("tcp://127.0.0.1:*", ["w1"], tmp_path)
    pool = ShardPool(config=cfg, on_result=results)
    service = None
    try:
        service = _service(pool._front.remote.endpoint, "w1")  # type: ignore[union-attr]
        wait_until(lambda: joined(pool, 1), 30, "the remote worker to join")
        sent = {b"cl-%03d" % c: 0 for c in range(50)}
        for _ in range(40):
            for cid in sent:
                pool.submit(cid, {"i": sent[cid], "ms": 5})
                sent[cid] += 1
        report = pool.close(1.0)  # far less than the 5 s of work queued
        assert service.proc.poll() is None  # it said BYE and waits for a front to come back
    finally:
        pool.close()
        if service is not None:
            assert service.stop() == EXIT_OK
    total = sum(sent.values())
    assert results.count + len(report.unfinished) + len(report.in_doubt) == total
    assert report.unfinished and not report.in_doubt  # both workers stopped cleanly
    journal = {
        (key, call[0]) for key, calls in handlers.read_host_journal(str(tmp_path)).items()
        for call in calls
    }
    assert not [e for e in report.unfinished if (e[0].hex(), e[1]) in journal], (
        "a message handed back as unfinished had run"
    )
    for cid, got in results.by_channel.items():
        assert [seq for seq, _ in got] == list(range(len(got))), cid


def test_a_lease_shorter_than_two_heartbeats_is_refused() -> None:
    problems = _problems(
        {"supervisor": {"heartbeat_interval_s": 0.5},
         "remote": {"bind": "tcp://127.0.0.1:1", "workers": {"h2": 1}, "lease_s": 0.8}},
        load_remote_keys,
    )
    assert [p[0] for p in problems] == ["remote.lease_s"] and "heartbeat" in problems[0][2]


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_a_call_that_outlives_the_lease_ends_its_worker_before_the_channel_moves(
    tmp_path: Path,
) -> None:
    # A sync call holds the remote worker's event loop past its lease: no heartbeat, no renewal.
    # The lease thread ends the process (EXIT_FENCED) before the front moves the channel, and
    # the message runs again elsewhere, flagged redelivered, after the first call was cut short.
    results = Results()
    with loopback(tmp_path, results, lease_s=0.5, margin_s=0.4) as (pool, service):
        cid = next(c for c in (b"hang-%03d" % i for i in range(500)) if pool.worker_of(c) == 1)
        local_pid = pool.worker_pids()[0]
        fut = pool.request(cid, {"i": 0, "ms": 2000})
        assert fut.result(timeout=30) == [0, 1]  # counted once: the state was lost with it
        wait_until(lambda: service.exits == [EXIT_FENCED], 10, "the fenced exit")
        assert pool.placement()["remote"]["failovers"] == 1
    calls = handlers.read_host_journal(str(tmp_path))[cid.hex()]
    assert [(c[0], c[2], c[3]) for c in calls] == [(0, True, local_pid)]  # the cut call left none


# -- arbitrary frames on the remote socket -------------------------------------------------------

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=6),
    st.binary(max_size=20),
)
_junk = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    | st.builds(cbor2.CBORTag, st.integers(0, 2**16), inner),
    max_leaves=12,
)
_hellos = st.one_of(
    _junk,
    st.lists(_junk, min_size=7, max_size=7).map(lambda x: [11, *x[1:]]),
    st.tuples(st.sampled_from(["w2", "w9", "", "w2" * 40]), st.binary(min_size=16, max_size=16),
              _junk, st.sampled_from([1, 2, -1, 2**70]), st.integers(-5, 2**40), _junk)
    .map(lambda t: [11, t[0], t[1], "0", t[3], t[4], "h"]),
    st.just([11, "w2", b"n" * 16, "0", 1, 4242, "fuzzer"]),  # a well-formed one: welcomed
)
# Frames of a session: any kind but READY (a worker that never says READY gets no channels, so
# what it claims cannot touch real messages), with arbitrary fields; or not CBOR at all.
_session_frames = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 99, -1]),
                  st.lists(_junk, max_size=6)),
        st.binary(max_size=30),
    ),
    max_size=12,
)


def _await_state(pool: ShardPool, index: int, state: str, timeout: float) -> None:
    wait_until(
        lambda: pool.placement()["remote"]["workers"][index]["state"] == state
        and not pool.placement()["moves"]["in_progress"],
        timeout,
        f"worker {index} to be {state}",
    )


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_arbitrary_frames_on_the_remote_socket_stop_nothing(tmp_path: Path) -> None:
    results = Results()
    cfg = front_config("tcp://127.0.0.1:*", ["w1", "w2"], tmp_path, lease_s=0.5, margin_s=0.3)
    sent = {b"fz-%03d" % c: 0 for c in range(60)}
    ctx = zmq.Context()
    with ShardPool(config=cfg, on_result=results) as pool:
        endpoint = pool._front.remote.endpoint  # type: ignore[union-attr]
        service = _service(endpoint, "w1")
        examples: list[int] = []
        try:
            _await_state(pool, 1, "ready", 30)

            @settings(max_examples=15, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(hello=_hellos, frames=_session_frames)
            def one(hello: Any, frames: list[Any]) -> None:
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                try:
                    sock.connect(endpoint)
                    sock.send(cbor2.dumps(hello))
                    examples.append(1)
                    welcome = cbor2.loads(sock.recv()) if sock.poll(500) else None
                    if welcome is not None and welcome[0] == 7:  # WELCOME: a session as w2
                        epoch, index = welcome[1], welcome[2]
                        for frame in frames:
                            if isinstance(frame, bytes):
                                sock.send(frame)
                            else:
                                sock.send(cbor2.dumps([frame[0], index, epoch, *frame[1]]))
                    for cid in sent:  # real traffic all along
                        pool.submit(cid, {"i": sent[cid]})
                        sent[cid] += 1
                finally:
                    sock.close()
                # The session (if any) ends by silence: w2 fails over, w1 and worker 0 go on.
                _await_state(pool, 2, "away", 10)

            one()
            pool.drain(60)
            counters = pool.placement()["remote"]
            # Every HELLO was answered (refused, or welcomed) or, not a HELLO at all, counted.
            answered = counters["refused"] + counters["joins"] - 1 + counters["stray_frames"]
            assert answered >= len(examples) > 0
            assert pool.placement()["remote"]["workers"][1]["state"] == "ready"
        finally:
            service.stop()
            ctx.term()
    check_results(results, sent)
    check_journal(tmp_path, sent)


def test_a_remote_worker_never_runs_past_a_missing_frame() -> None:
    from shardpool.codec import ToWorker
    from shardpool.worker import Worker, WorkerSpec

    spec = WorkerSpec(index=1, epoch=3, data_endpoint="", front_endpoint="", handler="x:y")
    worker = Worker(spec, None, Lease(1.0, time.monotonic(), grace_s=1.0))
    batch = lambda first, n: [ToWorker.BATCH, 3, first, False, *([[b"c", 0, b""]] * n)]  # noqa: E731
    assert worker._in_sequence(ToWorker.BATCH, batch(40, 3))  # the first sets the base
    assert worker._in_sequence(ToWorker.INSTALL, [ToWorker.INSTALL, 3, 43, 1, []])
    assert worker._in_sequence(ToWorker.STATS, [ToWorker.STATS, 3, 9])  # not a window entry
    assert worker._in_sequence(ToWorker.BATCH, batch(44, 2)) and not worker.stop
    assert not worker._in_sequence(ToWorker.BATCH, batch(47, 1))  # 46 never came
    assert worker.stop == [-1]  # fenced: this incarnation ends, nothing after the gap runs


class _Lines:
    """A process's stderr lines, read by a thread (so a test can wait for one with a deadline)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        stream = proc.stderr
        self._thread = threading.Thread(
            target=lambda: self.lines.extend(line.decode() for line in stream), daemon=True
        )
        self._thread.start()

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_remote_worker_leaves_a_dead_front_at_once_and_joins_the_next(
    tmp_path: Path,
) -> None:
    from service_handlers import subprocess_env

    with socket.socket() as s:  # a free loopback port for the fronts, one after the other
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    cfg = tmp_path / "front.toml"
    cfg.write_text(
        f'[pool]\nworkers = 1\n[transport]\nruntime_dir = "{rundir}"\n'
        f'[supervisor]\nheartbeat_interval_s = 0.2\n'
        f'[remote]\nbind = "tcp://127.0.0.1:{port}"\nworkers = {{ "w1" = 1.0 }}\n'
        f"lease_s = 3.0\nlease_margin_s = 1.0\n"
    )
    env = subprocess_env()

    def front() -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "shardpool", "run", "-c", str(cfg)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    first = front()
    worker = subprocess.Popen(  # noqa: S603
        [*worker_argv(f"tcp://127.0.0.1:{port}", "w1", None)[:-2], "--log-level", "INFO"],
        env=env, stderr=subprocess.PIPE,
    )
    second = None
    try:
        log = _Lines(worker)
        wait_until(lambda: log.count("joined") == 1, 30, "the worker to join the first front")
        first.kill()
        killed = time.monotonic()
        first.wait(10)
        wait_until(lambda: log.count("closed the connection") == 1, 10, "the worker to leave")
        left_after = time.monotonic() - killed
        # The dead process's connection closed: the worker stopped without waiting for its
        # 3 s lease (its monitor is read every 50 ms).
        assert left_after < 1.0, left_after
        assert worker.poll() is None  # the process stays, a service waiting for its front
        second = front()
        wait_until(lambda: log.count("joined") == 2, 30, "the worker to join the next front")
    finally:
        for proc in (first, second, worker):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
    assert worker.returncode == EXIT_OK


def test_remote_workers_need_a_handler_they_can_import(tmp_path: Path) -> None:
    cfg = front_config("tcp://127.0.0.1:*", ["w1"], tmp_path)
    with pytest.raises(ConfigError) as err:
        ShardPool(handlers.record, config=cfg)
    assert err.value.problems[0][0] == "pool.handler"


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_remote_worker_whose_handler_cannot_start_is_left_out_with_its_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = front_config("tcp://127.0.0.1:*", ["w1"], tmp_path, pool={
        "handler": "handlers:FailsToStartFrom", "handler_options": {"index": 1},
    })
    with ShardPool(config=cfg) as pool:
        proc = subprocess.Popen(  # noqa: S603
            worker_argv(pool._front.remote.endpoint, "w1", None), cwd=TESTS,  # type: ignore[union-attr]
            stderr=subprocess.DEVNULL,
        )
        try:
            assert proc.wait(30) == 3  # EXIT_START_FAILED: its service manager decides
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        assert pool.placement()["remote"]["workers"][1]["state"] == "away"
        assert pool.call(b"still-fine", {"i": 0}, timeout=10) == [0, 1]  # the pool goes on
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "could not start its handler" in logged and "no database connection" in logged
    assert "Traceback" in logged


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_a_long_batch_of_slow_calls_costs_a_remote_worker_neither_its_lease_nor_a_prompt_stop(
    tmp_path: Path,
) -> None:
    # 150 calls of 20 ms in few batches: 3 s of work, six times the lease. The worker serves a
    # batch a slice at a time and reads the front's LEASE answers between slices.
    results = Results()
    with loopback(tmp_path, results, lease_s=0.5, margin_s=0.3) as (pool, service):
        remote = [c for c in (b"sl-%03d" % i for i in range(400)) if pool.worker_of(c) == 1]
        sent = dict.fromkeys(remote[:30], 0)
        for _ in range(5):
            for cid in sent:
                pool.submit(cid, {"i": sent[cid], "ms": 20})
                sent[cid] += 1
        pool.drain(60)
        assert pool.placement()["remote"]["failovers"] == 0
        assert service.exits == []
    check_results(results, sent)
    assert check_journal(tmp_path, sent)["redelivered_dups"] == 0
