"""The Lightning demo through a real pool: zero violations, and every channel's final state equals
the serial replay. The by-type dispatch's violations on the same traffic are asserted in
``test_demo_bytype.py``; the second test here runs that very traffic and delay through shardpool.
The last two do the same with the real traffic (BOLT #2 wire bytes, real signatures), where the
by-type dispatch runs in the test itself.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from shardpool.bench.handlers import (
    ASYNC_LIGHTNING_HANDLER,
    ASYNC_WIRE_HANDLER,
    LIGHTNING_HANDLER,
    WIRE_HANDLER,
    WIRE_PROBE,
    state_digest,
)
from shardpool.bench.runs import PoolRun, run_pool
from shardpool.demo import generate, replay, run_by_type_dispatch, wire
from shardpool.demo.real import OPENING_TYPES, RealChannelState, replay_wire
from shardpool.demo.realtraffic import generate_wire

pytestmark = pytest.mark.multiprocess


def _reference(stream: list[tuple[bytes, Any]], *, real: bool = False) -> dict[bytes, str]:
    states, violations = replay_wire(stream) if real else replay(stream)
    assert violations == {}  # the generator's promise: valid when applied in arrival order
    return {cid: state_digest(state) for cid, state in states.items()}


def _assert_order_kept(run: PoolRun, reference: dict[bytes, str], messages: int) -> None:
    assert run.violations_by_code == {} and run.violating_channels == 0
    assert run.failures == 0
    assert run.sequence_errors == {"gaps": 0, "duplicates": 0, "reorders": 0}
    assert sum(run.per_worker) == messages
    mismatched = [cid.hex() for cid, digest in reference.items() if run.digests.get(cid) != digest]
    assert mismatched == [], f"{len(mismatched)} channels differ from the serial replay"


def test_thousands_of_channels_on_three_workers_keep_per_channel_order() -> None:
    # 300 peers x 10 channels (plus the replacements of channels that close): ~3,000 channel ids,
    # interleaved burstily per peer, every message type of a channel on the same path.
    stream = generate(300, 10, 30_000, 5)
    reference = _reference(stream)
    assert len(reference) >= 3_000
    encoded = [(cid, cbor2.dumps(msg)) for cid, msg in stream]
    run = run_pool(encoded, 3, handler=LIGHTNING_HANDLER, probe=list(reference),
                   max_inflight=1024, timeout_s=60.0)
    _assert_order_kept(run, reference, len(stream))
    assert all(n > 0 for n in run.per_worker)  # the channels really were spread


def test_the_by_type_baselines_traffic_and_delay_give_zero_violations_here() -> None:
    # Same stream, seed and per-message delay as test_by_type_dispatch_breaks_a_valid_stream,
    # where the by-type dispatch force-closes over a quarter of the channels. Here an async
    # handler awaits that delay per message, so channels of one worker interleave on its loop —
    # and each channel still sees its messages one at a time, in order.
    stream = generate(20, 15, 4_000, 11)
    reference = _reference(stream)
    encoded = [(cid, cbor2.dumps(msg)) for cid, msg in stream]
    run = run_pool(
        encoded, 2, handler=ASYNC_LIGHTNING_HANDLER,
        handler_options={"delay_s": 0.0002}, probe=list(reference), timeout_s=60.0,
    )
    _assert_order_kept(run, reference, len(stream))


def test_the_checks_catch_one_reordered_pair() -> None:
    # The same checks must fail when the order really is broken: swap two messages of different
    # types of one channel before submitting, and compare with the replay of the true order.
    stream = generate(2, 2, 400, 3)
    reference = _reference(stream)
    cid0 = stream[0][0]
    mine = [i for i, (cid, _) in enumerate(stream) if cid == cid0]
    i, j = next(
        (a, b)
        for a, b in zip(mine, mine[1:], strict=False)
        if stream[a][1]["type"] != stream[b][1]["type"]
    )
    swapped = list(stream)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    encoded = [(cid, cbor2.dumps(msg)) for cid, msg in swapped]
    run = run_pool(encoded, 2, handler=LIGHTNING_HANDLER, probe=list(reference), timeout_s=60.0)
    assert run.sequence_errors == {"gaps": 0, "duplicates": 0, "reorders": 0}  # the pool kept it
    assert run.digests[cid0] != reference[cid0]
    assert all(run.digests[c] == d for c, d in reference.items() if c != cid0)


def test_thousands_of_real_channels_through_the_pool_equal_the_serial_replay() -> None:
    stream = generate_wire(200, 10, 10_000, 31)
    reference = _reference(stream, real=True)
    assert len(reference) > 1_900  # nearly every one of the 2,000 slots was visited
    run = run_pool(stream, 2, handler=WIRE_HANDLER, payload="raw", probe=list(reference),
                   probe_message=WIRE_PROBE, timeout_s=60.0)
    _assert_order_kept(run, reference, len(stream))
    assert all(n > 0 for n in run.per_worker)


def test_by_type_dispatch_breaks_the_real_traffic_and_shardpool_does_not() -> None:
    stream = generate_wire(10, 5, 1_500, 32)
    reference = _reference(stream, real=True)
    res = run_by_type_dispatch(stream, delay_s=0.0002, timeout=60.0, seed=1,
                               new_state=RealChannelState, type_of=wire.message_type,
                               inline=OPENING_TYPES)
    assert res["violations"] > 0 and res["force_closed_channels"] > 0
    assert res["reordered_messages"] > 0
    run = run_pool(stream, 2, handler=ASYNC_WIRE_HANDLER, handler_options={"delay_s": 0.0002},
                   payload="raw", probe=list(reference), probe_message=WIRE_PROBE,
                   timeout_s=60.0)
    _assert_order_kept(run, reference, len(stream))
