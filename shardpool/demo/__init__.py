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
