"""The options of one bench scenario, and the ``shardpool bench`` flags made from them.

Each field of :class:`BenchOptions` carries, in its metadata, its allowed range and — for those
offered on the command line — its help text; :func:`add_arguments` turns those into argparse
flags (the type and the choices come from the field's annotation, the default from the field),
and :meth:`BenchOptions.check` into one range check. A default is written once, here.
"""

from __future__ import annotations

import argparse
import math
import os
import types
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

__all__ = ["LEVELLING_PHASES", "LEVELLING_WINDOW", "WORKLOAD_DEFAULTS", "BenchOptions", "Mode",
           "Workload", "add_arguments", "available_cpus", "default_workers", "from_arguments"]

Mode = Literal["closed", "open"]
Workload = Literal["synthetic", "lightning-real", "levelling"]

WORKLOAD_DEFAULTS: dict[str, tuple[int, int]] = {
    "synthetic": (200_000, 2_000),
    "lightning-real": (20_000, 300),
    "levelling": (0, 1_000),
}
"""Messages and channels of each workload when not given: the real traffic costs ~100 µs a
message to generate and as much to check, so it runs a tenth of the messages over fewer, longer-
lived channels (each opens with three messages). The levelling runs last ``run_s`` seconds each
(no message count)."""

LEVELLING_WINDOW = 1024
"""The levelling workload's in-flight window per worker: ~0.1 s of work at 100 µs a message. A
move's pause is its old worker's backlog (DRAIN travels in band, behind every message sent
before it), so the pool's default of 16,384 would hold each move for seconds in a saturated
closed loop."""

LEVELLING_PHASES = ("zipf", "hot", "pause")
"""The levelling workload's phases, in the order they run (see :mod:`shardpool.bench.levelling`)."""


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """The CPUs available, at most the physical cores (a worker is CPU-bound), at least 1."""
    from ..config import physical_cores

    return max(1, min(available_cpus(), physical_cores()))


def _meta(
    help: str | None = None,
    *,
    lo: float | None = None,
    above: bool = False,
    hi: float | None = None,
    flag: str | None = None,
    short: str | None = None,
    metavar: str | None = None,
    shown: str | None = None,
) -> dict[str, Any]:
    """A field's metadata.

    Args:
        help: the flag's help text (without its default); None keeps the field off the command
            line (library use only).
        lo, above, hi: the range: ``>= lo`` (``> lo`` with ``above``) and ``<= hi``.
        flag: the flag when not ``--<field-name-with-dashes>``; ``--no-…`` for a bool that the
            flag turns off.
        short: a one-letter form of the flag too (``-c``), as the other commands have it.
        metavar: the value's name in the help.
        shown: the default as the help states it, where the value itself would not say it.
    """
    given = {"help": help, "lo": lo, "hi": hi, "flag": flag, "short": short, "metavar": metavar,
             "shown": shown}
    return {k: v for k, v in given.items() if v is not None} | ({"above": True} if above else {})


@dataclass(frozen=True)
class BenchOptions:
    """One bench scenario. Units are in the names; defaults run in well under a minute on 2 cores.

    The fields offered as ``shardpool bench`` flags are described by their help (metadata); the
    others, for library use:

    * ``close_fraction``: share of channels that close cooperatively within the stream.
    * ``bytype_delay_s``: per-message handling time in the by-type workers and in shardpool's
      same-delay comparison run (seconds).
    * ``latency_seconds``: length of the closed mode's open-loop latency phase (seconds of
      traffic at its rate).
    * ``sample_every``: in closed-loop runs, one message in this many is timed.
    * ``rtt_rounds``: round trips per round of the ceilings' ``pool.call`` and ping-pong rows.
    * ``recovery_kills``, ``recovery_interval_s``: SIGKILLs of the ceilings' recovery row and the
      seconds between them.
    """

    workers: int = field(
        default_factory=default_workers,
        metadata=_meta("worker processes", lo=1, metavar="N",
                       shown="the CPUs available, at most the physical cores"),
    )
    workload: Workload = field(
        default="synthetic",
        metadata=_meta("synthetic: CBOR dicts shaped like BOLT #2 messages, a trivial or "
                       "calibrated-CPU handler, every ceiling and baseline; lightning-real: BOLT "
                       "#2 wire messages with real secp256k1 signatures checked per message, "
                       "messages/s and verifications/s per worker count against one process "
                       "doing the same work serially; levelling: Zipf-skewed CPU-bound traffic "
                       "with pool.rebalance off vs auto, a hot channel's neighbours' latency "
                       "before and after its pin, the pause per slot move"),
    )
    messages: int | None = field(
        default=None,
        metadata=_meta("messages in the traffic", lo=1, metavar="N",
                       shown="200,000; lightning-real: 20,000; levelling: runs by time, "
                       "--run-seconds"),
    )
    channels: int | None = field(
        default=None,
        metadata=_meta("channels in the traffic", lo=1, metavar="N",
                       shown="2,000; lightning-real: 300; levelling: 1,000"),
    )
    peers: int | None = field(
        default=None,
        metadata=_meta("peer connections the channels are spread over", lo=1, metavar="N",
                       shown="channels / 10"),
    )
    repeats: int = field(
        default=3,
        metadata=_meta("repeats of each throughput run; medians are reported", lo=1,
                       metavar="N"),
    )
    cpu_cost_us: float = field(
        default=0.0,
        metadata=_meta("CPU microseconds the handler burns per commitment_signed, modelling "
                       "signature checks", lo=0.0, metavar="US"),
    )
    mode: Mode = field(
        default="closed",
        metadata=_meta("closed: submit as fast as backpressure allows; open: pace the Lightning "
                       "runs at --rate and time every message"),
    )
    rate: float = field(
        default=20_000.0,
        metadata=_meta("open-loop target rate", lo=0.0, above=True, metavar="MSGS_PER_S"),
    )
    latency_load: float = field(
        default=0.3,
        metadata=_meta("closed mode: the latency phase runs open-loop at this fraction of the "
                       "measured throughput", lo=0.0, above=True, metavar="FRACTION"),
    )
    seed: int = field(default=1, metadata=_meta("traffic seed"))
    bytype_messages: int = field(
        default=6_000,
        metadata=_meta("messages run through the by-type dispatch baseline, 0 to skip", lo=0,
                       metavar="N"),
    )
    baselines: bool = field(
        default=True,
        metadata=_meta("skip the trivial-handler, zmq harness and mp.Queue runs and the "
                       "ceilings section",
                       flag="--no-baselines"),
    )
    ceiling_messages: int = field(
        default=50_000,
        metadata=_meta("synthetic: messages per throughput run of the ceilings section (at most "
                       "--messages; each row's shardpool figure against its baseline, same "
                       "run), 0 to skip the section", lo=0, metavar="N"),
    )
    batch_size: int = field(
        default=256,
        metadata=_meta("messages per frame, pool and bare harness", lo=1, metavar="N"),
    )
    max_inflight: int | None = field(
        default=None,
        metadata=_meta("pool in-flight window per worker", lo=1, metavar="N",
                       shown="16,384; levelling: 1,024, so that a move, which waits for its old "
                       "worker's backlog, is not held for seconds in a saturated closed loop"),
    )
    config: str | None = field(
        default=None,
        metadata=_meta("pool config file", short="-c", metavar="PATH", shown="built-in defaults"),
    )
    timeout_s: float = field(
        default=120.0,
        metadata=_meta("deadline of each single run", lo=0.0, above=True, flag="--timeout",
                       metavar="SECONDS"),
    )
    run_s: float = field(
        default=12.0,
        metadata=_meta("levelling: seconds of traffic in each Zipf run (rebalance off and auto "
                       "alike) and in each half of a hot-channel run", lo=0.0, above=True,
                       flag="--run-seconds", metavar="SECONDS"),
    )
    phases: str = field(
        default=",".join(LEVELLING_PHASES),
        metadata=_meta("levelling: the phases to run, comma-separated: zipf (off vs auto), hot "
                       "(a hot channel pinned), pause (moves of 1 and 64 slots)",
                       metavar="LIST"),
    )
    zipf_s: float = field(
        default=1.1,
        metadata=_meta("levelling: Zipf exponent of the channels' message rates", lo=0.0,
                       metavar="S"),
    )
    message_cost_us: float = field(
        default=100.0,
        metadata=_meta("levelling: CPU microseconds the handler burns per message", lo=0.0,
                       above=True, metavar="US"),
    )
    hot_share: float = field(
        default=0.4,
        metadata=_meta("levelling: the hot channel's share of the traffic", lo=0.0, above=True,
                       hi=0.95, metavar="FRACTION"),
    )
    hot_load: float = field(
        default=0.8,
        metadata=_meta("levelling: share of a CPU the hot channel's worker is kept busy before "
                       "the pin; the open-loop rate is calibrated to it in each run, within what "
                       "the machine has free", lo=0.0, above=True, hi=1.0, metavar="FRACTION"),
    )
    pause_moves: int = field(
        default=20,
        metadata=_meta("levelling: moves of each size (1 and 64 slots) in the pause phase",
                       lo=1, metavar="N"),
    )
    rebalance_interval_s: float = field(
        default=0.5,
        metadata=_meta("levelling: pool.rebalance_interval_s of the bench's pools", lo=0.0,
                       above=True, metavar="SECONDS"),
    )
    rebalance_grace_s: float = field(
        default=5.0,
        metadata=_meta("levelling: pool.rebalance_grace_s of the bench's pools", lo=0.0,
                       metavar="SECONDS"),
    )
    rtt_rounds: int = field(default=1_000, metadata=_meta(lo=1))
    recovery_kills: int = field(default=5, metadata=_meta(lo=1))
    recovery_interval_s: float = field(default=0.3, metadata=_meta(lo=0.0))
    close_fraction: float = field(default=0.05, metadata=_meta(lo=0.0, hi=1.0))
    bytype_delay_s: float = field(default=0.0002, metadata=_meta(lo=0.0))
    latency_seconds: float = field(default=2.0, metadata=_meta(lo=0.0))
    sample_every: int = field(default=64, metadata=_meta(lo=1))

    def check(self) -> None:
        """Raises ValueError naming the first option out of range (or of the wrong type)."""
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            wanted = _wanted(_Kind.of(hints[f.name]), f.metadata, value)
            if wanted is not None:
                raise ValueError(f"{f.name} must be {wanted}, got {value!r}")
        unknown = [p for p in self.phase_list if p not in LEVELLING_PHASES]
        if unknown or not self.phase_list:
            raise ValueError(
                f"phases must be a comma-separated list of {', '.join(LEVELLING_PHASES)}, "
                f"got {self.phases!r}"
            )

    @property
    def phase_list(self) -> list[str]:
        """The levelling phases asked for, in the order they run."""
        asked = {p.strip() for p in self.phases.split(",") if p.strip()}
        return [p for p in LEVELLING_PHASES if p in asked] + sorted(
            asked - set(LEVELLING_PHASES))

    @property
    def window(self) -> int:
        """The pool's in-flight window per worker: ``max_inflight``, or the workload's default."""
        return self.max_inflight or (LEVELLING_WINDOW if self.workload == "levelling" else 16_384)

    @property
    def n_messages(self) -> int:
        """Messages: ``messages``, or the workload's default."""
        return self.messages or WORKLOAD_DEFAULTS[self.workload][0]

    @property
    def n_channels(self) -> int:
        """Channels: ``channels``, or the workload's default."""
        return self.channels or WORKLOAD_DEFAULTS[self.workload][1]

    @property
    def n_peers(self) -> int:
        """Peer connections: ``peers``, or one per ten channels (at least 1)."""
        return self.peers if self.peers is not None else max(1, self.n_channels // 10)

    @property
    def channels_per_peer(self) -> int:
        """Channels per peer, rounded up so that every channel has a slot."""
        return max(1, -(-self.n_channels // self.n_peers))


class _Kind:
    """What a field's annotation says: its base type, whether None is allowed, its choices."""

    def __init__(self, base: type, optional: bool, choices: tuple[Any, ...]) -> None:
        self.base = base
        self.optional = optional
        self.choices = choices

    @classmethod
    def of(cls, hint: Any) -> _Kind:
        args = get_args(hint)
        if get_origin(hint) in (Union, types.UnionType):
            (inner,) = [a for a in args if a is not type(None)]
            kind = cls.of(inner)
            return cls(kind.base, True, kind.choices)
        if get_origin(hint) is Literal:
            return cls(type(args[0]), False, args)
        return cls(hint, False, ())


def _wanted(kind: _Kind, meta: Mapping[str, Any], value: Any) -> str | None:
    """What ``value`` should be, or None when it is fine."""
    if value is None and kind.optional:
        return None
    if kind.choices:
        return None if value in kind.choices else "one of " + ", ".join(map(repr, kind.choices))
    lo, hi, above = meta.get("lo"), meta.get("hi"), bool(meta.get("above"))
    if kind.base is int:
        ok = type(value) is int
        wanted = "an integer"
    elif kind.base is float:
        ok = type(value) in (int, float) and math.isfinite(value)
        wanted = "a finite number"
    else:
        return None if isinstance(value, kind.base) else f"a {kind.base.__name__}"
    if lo is not None:
        ok = ok and (value > lo if above else value >= lo)
        wanted += f" {'>' if above else '>='} {lo:g}"
    if hi is not None:
        ok = ok and value <= hi
        wanted += f" and <= {hi:g}"
    return None if ok else wanted


# ------------------------------------------------------------------------------- command line


def _flag(f: Field[Any]) -> str:
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every :class:`BenchOptions` field that has help. Flags given land in the
    namespace under the field's name; flags not given are left out, so that
    :func:`from_arguments` takes the field's own default."""
    hints = get_type_hints(BenchOptions)
    for f in fields(BenchOptions):
        if "help" not in f.metadata:
            continue
        kind = _Kind.of(hints[f.name])
        options: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if kind.base is bool:
            off = _flag(f).startswith("--no-")
            options["action"] = "store_false" if off else "store_true"
            options["help"] = f.metadata["help"]
        else:
            shown = f.metadata.get("shown", f.default)
            options["type"] = kind.base
            options["help"] = f"{f.metadata['help']} (default: {shown})"
            if kind.choices:
                options["choices"] = kind.choices
            if "metavar" in f.metadata:
                options["metavar"] = f.metadata["metavar"]
        flags = [f.metadata["short"]] if "short" in f.metadata else []
        parser.add_argument(*flags, _flag(f), **options)


def from_arguments(namespace: argparse.Namespace) -> BenchOptions:
    """The options given in ``namespace`` (parsed with :func:`add_arguments`); defaults for the
    rest. Does not check them (:meth:`BenchOptions.check` does)."""
    given = {f.name: getattr(namespace, f.name) for f in fields(BenchOptions)
             if hasattr(namespace, f.name)}
    return BenchOptions(**given)
