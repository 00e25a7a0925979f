"""The Lightning channel demo: a realistic handler and workload for shardpool.

* :mod:`~shardpool.demo.channel` — :class:`ChannelState`, a compact BOLT #2 state machine (one
  direction of updates) that reports, never raises, a protocol violation; :func:`replay` applies a
  stream serially (the reference result).
* :mod:`~shardpool.demo.traffic` — seeded, fast streams of ``(channel_id, message)`` in which every
  channel's subsequence is valid: :func:`generate`, :func:`iter_stream`, :func:`encode_stream`,
  :func:`iter_encoded`, :func:`encode`.
* :mod:`~shardpool.demo.handler` — :class:`LightningHandler` / :class:`AsyncLightningHandler`, the
  pool handlers (duplicate-aware, optional calibrated CPU cost per ``commitment_signed``).
* :mod:`~shardpool.demo.bytype` — :func:`run_by_type_dispatch`, the naive by-type dispatch that
  reproduces lnd issue 8393: the same valid stream comes out full of violations.
* :mod:`~shardpool.demo.load` — :class:`~shardpool.demo.load.DemoLoad`, ``shardpool run
  --demo-load``: the traffic sent through a running backend's ingress (not imported here: it
  needs the client).

The real Lightning traffic (not imported here either: it loads pyln and libsecp256k1):

* :mod:`~shardpool.demo.wire` — the BOLT #1/#2 wire codec (pyln-bolt2's definitions, compiled;
  pyln-proto as the reference);
* :mod:`~shardpool.demo.crypto` — BOLT #3 secrets and key derivation, signing and verifying with
  coincurve (libsecp256k1);
* :mod:`~shardpool.demo.real` — :class:`~shardpool.demo.real.RealChannelState`, the state machine
  with real signature and secret checks, and ``replay_wire``;
* :mod:`~shardpool.demo.realtraffic` — ``iter_wire``/``generate_wire``: seeded, signed wire
  traffic, with faults to inject on request;
* :class:`~shardpool.demo.handler.WireLightningHandler`, the pool handler for it.

The CBOR dict traffic above is the *synthetic* workload (its optional CPU cost is a calibrated
busy loop); the wire traffic is the *real* one.

Everything here is pure Python apart from :func:`run_by_type_dispatch`, which starts processes,
and :mod:`~shardpool.demo.load`, which sends through ZeroMQ.
"""

from __future__ import annotations

from .bytype import TYPE_GROUPS, run_by_type_dispatch
from .channel import MESSAGE_TYPES, VIOLATION_CODES, ChannelState, replay
from .handler import AsyncLightningHandler, LightningHandler
from .traffic import (
    channel_id,
    encode,
    encode_stream,
    generate,
    iter_encoded,
    iter_stream,
)

__all__ = [
    "MESSAGE_TYPES",
    "TYPE_GROUPS",
    "VIOLATION_CODES",
    "AsyncLightningHandler",
    "ChannelState",
    "LightningHandler",
    "channel_id",
    "encode",
    "encode_stream",
    "generate",
    "iter_encoded",
    "iter_stream",
    "replay",
    "run_by_type_dispatch",
]
