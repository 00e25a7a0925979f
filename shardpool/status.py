"""What ``shardpool status`` shows: the backend's snapshot (:class:`Figures`) and its table
(:func:`render_status`).

The snapshot is what the control op ``status`` answers and what the Prometheus endpoint reads:
plain values, channel ids in hex, rates computed against an earlier sample. Rendering is pure: no
I/O, and no terminal control codes except the colours asked for; it fits a given width (columns
dropped in :data:`DROP_ORDER`, long lines continued, ids never cut); the CLI redraws it in place.
Where some workers are remote, the table shows each worker's host, link (ipc, up or away), lease
age and round trip (:data:`REMOTE_COLUMNS`, not shown for a local-only pool), and a ``remote:``
line with the endpoint and the remote counters.

The worker count changes with a resize, and a worker's counters start again from 0 when it is
restarted: the order-violation totals keep what each worker incarnation that is gone had counted
when last sampled, so a resize or a restart never makes a violation disappear from them.
"""

from __future__ import annotations

import collections
import heapq
import ipaddress
import re
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from .channelid import format_channel_hex

__all__ = [
    "DROP_ORDER", "HALTED_SHOWN", "HOT_TOP_K", "PLACEMENT_SHOWN", "REMOTE_COLUMNS", "Figures",
    "remote_summary", "render_status", "worker_rows",
]

HALTED_SHOWN = 10
"""Halted channels listed in the table (``--json`` has all of them)."""
HOT_TOP_K = 10
"""Hottest channels in a snapshot."""
PLACEMENT_SHOWN = 8
"""Moves in progress, plan steps, pins and saturated channels listed in the table, each (``--json``
has all of them)."""
RATE_MIN_AGE_S = 0.5
"""Rates are computed against a sample at least this old (seconds)."""
ORDER_COUNTERS = ("gaps", "duplicates", "reorders")

Snapshot = dict[str, Any]


class _Sample(NamedTuple):
    at: float  # time.monotonic() seconds
    acknowledged: int
    accepted: int
    workers: dict[int, tuple[int, int | None, int]]  # index -> (epoch, pid, processed)


class _Incarnation(NamedTuple):
    epoch: int
    pid: int | None
    order: dict[str, int]  # its order counters when last seen


def _same(a: tuple[int, int | None], b: tuple[int, int | None]) -> bool:
    """The same worker incarnation: same epoch, and the same pid where both are known (a worker
    removed by a resize and a new one at its index both start at epoch 1)."""
    return a[0] == b[0] and (a[1] is None or b[1] is None or a[1] == b[1])


class Figures:
    """Builds snapshots from the pool's and the ingress's stats, keeping the last few samples so
    that each snapshot carries rates (per second) over the last second or so. Thread-safe: the
    control thread, the metrics server and the backend's main loop all ask for snapshots.

    ``keep`` samples are kept; ``clock`` gives the time in seconds (monotonic).
    """

    def __init__(self, keep: int = 32, clock: Callable[[], float] = time.monotonic) -> None:
        self._samples: collections.deque[_Sample] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._clock = clock
        self._seen: dict[int, _Incarnation] = {}  # worker index -> its incarnation last seen
        self._departed = dict.fromkeys(ORDER_COUNTERS, 0)  # incarnations gone since

    def snapshot(
        self,
        service: dict[str, Any],
        pool: dict[str, Any],
        ingress: dict[str, Any],
        demo_load: dict[str, Any] | None,
    ) -> Snapshot:
        """Everything ``shardpool status`` shows, as plain values.

        Args:
            service: identity and endpoints of the backend (with ``uptime_s``).
            pool: :meth:`ShardPool.stats` (taken over: its ``workers`` and their
                ``hot_channels`` are moved out, halted channel ids turned to hex).
            ingress: :meth:`Ingress.stats`.
            demo_load: the demo producer's counters, or None.

        Returns keys ``service``, ``pool`` (front counters; ``halted`` lists every halted or
        quarantined channel: hex id, seq, since, error), ``workers`` (per-worker figures +
        ``processed_per_s``, and from the placement ``slots``, ``load`` (share of a core) and
        ``load_share`` (of the pool's measured load)), ``order`` (gaps/duplicates/reorders summed
        over the workers, and over the worker incarnations gone since the first snapshot, as
        last seen), ``hot_channels`` (``[hex id, messages, worker]``, top :data:`HOT_TOP_K`),
        ``placement`` (:meth:`ShardPool.placement`, taken out of ``pool``; None if the pool
        gave none), ``ingress``, ``rates`` (``processed_per_s``, ``ingress_per_s``) and
        ``demo_load``.
        """
        for halt in pool["halted"]:
            halt["channel"] = bytes(halt["channel"]).hex()
        workers: list[dict[str, Any]] = pool.pop("workers")
        placement: dict[str, Any] | None = pool.pop("placement", None)
        if placement is not None:
            _place_workers(workers, placement)
        hot = [
            (count, bytes(cid).hex(), w["index"])
            for w in workers
            for cid, count in w.pop("hot_channels", None) or ()
        ]
        return {
            "service": service,
            "pool": pool,
            "workers": workers,
            "order": self._order(workers),
            "hot_channels": [[cid, n, w] for n, cid, w in heapq.nlargest(HOT_TOP_K, hot)],
            "placement": placement,
            "ingress": ingress,
            "rates": self._rates(pool["acknowledged"], ingress["accepted"], workers),
            "demo_load": demo_load,
        }

    def _order(self, workers: list[dict[str, Any]]) -> dict[str, int]:
        """Order-violation totals: the workers' counters plus those of every incarnation seen
        before and gone since (removed by a resize, or restarted)."""
        now = {
            w["index"]: _Incarnation(
                int(w.get("epoch", 0)),
                w.get("pid"),
                {k: int(w.get(k, 0)) for k in ORDER_COUNTERS},
            )
            for w in workers
        }
        with self._lock:
            for index, old in self._seen.items():
                new = now.get(index)
                if new is None or not _same(old[:2], new[:2]):
                    for k in ORDER_COUNTERS:
                        self._departed[k] += old.order[k]
            self._seen = now
            departed = dict(self._departed)
        return {k: departed[k] + sum(inc.order[k] for inc in now.values()) for k in ORDER_COUNTERS}

    def _rates(
        self, acknowledged: int, accepted: int, workers: list[dict[str, Any]]
    ) -> dict[str, float]:
        """Pool and ingress rates since a sample at least :data:`RATE_MIN_AGE_S` old; sets each
        worker's ``processed_per_s`` (counted from 0 for a worker restarted since: a new epoch).
        Records this sample."""
        now = self._clock()
        current = {
            w["index"]: (w.get("epoch", 0), w.get("pid"), w.get("processed", 0)) for w in workers
        }
        rates = {"processed_per_s": 0.0, "ingress_per_s": 0.0}
        prev = self._sample_before(now - RATE_MIN_AGE_S)
        for w in workers:
            w["processed_per_s"] = 0.0
        if prev is not None:
            dt = now - prev.at
            rates["processed_per_s"] = max(0.0, (acknowledged - prev.acknowledged) / dt)
            rates["ingress_per_s"] = max(0.0, (accepted - prev.accepted) / dt)
            for w in workers:
                epoch, pid, processed = current[w["index"]]
                old = prev.workers.get(w["index"])
                base = old[2] if old is not None and _same(old[:2], (epoch, pid)) else 0
                w["processed_per_s"] = max(0.0, (processed - base) / dt)
        with self._lock:
            self._samples.append(_Sample(now, acknowledged, accepted, current))
        return rates

    def _sample_before(self, t: float) -> _Sample | None:
        with self._lock:
            for sample in reversed(self._samples):
                if sample.at <= t:
                    return sample
        return None


def _place_workers(workers: list[dict[str, Any]], placement: dict[str, Any]) -> None:
    """Each worker's ``slots``, ``load`` and ``load_share`` from the placement (by index)."""
    slots = placement.get("slots_per_worker") or []
    levelling = placement.get("levelling") or {}
    load = levelling.get("load") or []
    share = levelling.get("load_share") or []
    for w in workers:
        i = w["index"]
        w["slots"] = slots[i] if i < len(slots) else 0
        w["load"] = load[i] if i < len(load) else None
        w["load_share"] = share[i] if i < len(share) else None


def _si(n: float) -> str:
    """1234567 → '1.23M' (for per-second rates and counts in a narrow column)."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.{2 if abs(n) < 10 * div else 1}f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() or abs(n) >= 100 else f"{n:.1f}"


def _duration(s: float) -> str:
    """Seconds as ``HH:MM:SS``."""
    whole = int(s)
    return f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _summary(snap: Snapshot) -> list[str]:
    """The lines above the worker table: identity, messages, ingress, order, demo load."""
    svc, pool, ing = snap["service"], snap["pool"], snap["ingress"]
    order = snap["order"]
    lines = [
        f"shardpool {svc['version']}  pid {svc['pid']}  up {_duration(svc['uptime_s'])}  "
        f"state {svc['state']}  pool {pool['state']}  workers {len(snap['workers'])}",
        f"endpoints: ingress {svc['ingress']}  control {svc['control']}"
        + (f"  metrics {svc['metrics']}" if svc.get("metrics") else ""),
        *_remote_line(snap),
        f"messages:  submitted {pool['submitted']}  acknowledged {pool['acknowledged']}  "
        f"in flight {pool['inflight']}  rate {_si(snap['rates']['processed_per_s'])}/s",
        _Line(
            f"           failures {pool['failures']}  halted channels {pool['halted_channels']}  "
            f"quarantined {pool.get('quarantined', 0)}  restarts {pool['restarts']}  "
            f"replayed {pool['replayed']}",
            style=_RED if pool["halted_channels"] or pool.get("quarantined") else
            _YELLOW if pool["failures"] else "",
        ),
        f"ingress:   producers {ing['producers']}  accepted {ing['accepted']}  rejected "
        f"{ing['rejected']}  frame errors {ing['frame_errors']}  "
        f"rate {_si(snap['rates']['ingress_per_s'])}/s",
        f"           replies {ing['replies']}  backpressure waits {ing['backpressure_waits']}  "
        f"auth failures {ing['auth_failures']}" + ("" if ing["accepting"] else "  (intake closed)"),
        f"           unread replies held {ing.get('held_replies', 0)} for "
        f"{ing.get('stalled_producers', 0)} producers  frames refused whole "
        f"{ing.get('refused_frames', 0)}  internal errors {ing.get('internal_errors', 0)}",
    ]
    if ing.get("errors"):
        lines.append(
            "  rejections by code: "
            + ", ".join(f"{k} {v}" for k, v in sorted(ing["errors"].items()))
        )
    lines.append(
        _Line(
            f"order violations: gaps {order['gaps']}  duplicates {order['duplicates']}  "
            f"reorders {order['reorders']}"
            + ("" if not any(order.values()) else "   <-- should all be 0"),
            style=_RED if any(order.values()) else "",
        )
    )
    demo = snap.get("demo_load")
    if demo:
        pace = f"target {_si(demo['rate'])}/s" if demo["rate"] else "(unpaced)"
        lines.append(
            _Line(
                f"demo load: sent {demo['sent']}  replies {demo['replies']}  protocol "
                f"violations {demo['violations']}  {pace}",
                style=_RED if demo["violations"] else "",
            )
        )
    dead = snap.get("dead_letters")
    if dead:
        lines.append(
            _Line(
                f"dead letters: {dead['count']} stored, {dead['dropped']} dropped, "
                f"{dead['write_errors']} write errors (shardpool dead-letters list)",
                style=_YELLOW if dead["count"] or dead["write_errors"] else "",
            )
        )
    return lines


def remote_summary(snap: Snapshot) -> dict[str, Any] | None:
    """The remote workers' summary (endpoint, counters, a report per worker index), from the
    pool's stats or else from the placement; None when no remote workers are configured."""
    remote = (snap.get("pool") or {}).get("remote")
    if remote is None:
        remote = (snap.get("placement") or {}).get("remote")
    return remote if isinstance(remote, dict) else None


def worker_rows(snap: Snapshot) -> list[dict[str, Any]]:
    """The snapshot's workers, each with its remote report where the worker lacks one (the
    summary's ``workers`` keyed by index, as an int or, through JSON, a string); a worker with
    no report at all is local (``remote`` False, ``host`` "local", ``link`` "ipc")."""
    reports = (remote_summary(snap) or {}).get("workers") or {}
    rows = []
    for w in snap["workers"]:
        report = reports.get(w["index"]) or reports.get(str(w["index"])) or {}
        rows.append({"remote": False, "host": "local", "link": "ipc", **report, **w})
    return rows


def _remote_line(snap: Snapshot) -> list[str]:
    """The remote workers' line: endpoint, how many are away, and the counters."""
    remote = remote_summary(snap)
    if remote is None:
        return []
    rows = [w for w in worker_rows(snap) if w.get("remote")]
    away = sum(1 for w in rows if w.get("link") == "away")
    alarming = remote.get("auth_failures", 0) or remote.get("impersonations", 0)
    return [
        _Line(
            f"remote:    endpoint {remote.get('endpoint', '-')}  workers {len(rows)}"
            + (f" ({away} away)" if away else "")
            + f"  joins {remote.get('joins', 0)}  failovers {remote.get('failovers', 0)}  "
            f"refused {remote.get('refused', 0)}  auth failures {remote.get('auth_failures', 0)}  "
            f"impersonations {remote.get('impersonations', 0)}  "
            f"stray frames {remote.get('stray_frames', 0)}",
            style=_RED if alarming else _YELLOW if away or remote.get("refused", 0) else "",
        )
    ]


def _dash_or(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ms_or_dash(seconds: float | None) -> str:
    return _dash_or(None if seconds is None else seconds * 1000, ".1f")


def _pct(share: float | None) -> str:
    return _dash_or(None if share is None else share * 100, ".1f")


def _mb(rss: float | None) -> str:
    return _dash_or(None if rss is None else rss / 1e6, ".1f")


_HOST_WIDTH = 12


def _host(host: Any) -> str:
    """A host name that fits its column: whole if it fits, else its first label (not for an IP
    address), else cut with "…"."""
    name = str(host or "")
    if len(name) <= _HOST_WIDTH:
        return name
    try:
        ipaddress.ip_address(name)
    except ValueError:
        short = name.split(".", 1)[0]
        if short and len(short) <= _HOST_WIDTH:
            return short
    return name[: _HOST_WIDTH - 1] + "…"


def _age(seconds: float | None) -> str:
    """A lease age: ``0.2s``, ``12.3s``, ``345s``; "-" for None (away, or a local worker)."""
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 100 else f"{seconds:.0f}s"


class _Column(NamedTuple):
    heading: str
    width: int  # negative: left-aligned
    value: Callable[[dict[str, Any]], Any]


# The worker table's columns, in the order shown; a row is a worker's figures, or the front's.
_COLUMNS: dict[str, _Column] = {
    c.heading: c
    for c in (
        _Column("W", 5, lambda w: w["index"]),
        _Column("PID", 7, lambda w: w.get("pid") or "-"),
        _Column("STATE", -8, lambda w: w["state"]),
        _Column("HOST", -_HOST_WIDTH, lambda w: _host(w.get("host", ""))),
        _Column("LINK", -4, lambda w: w.get("link", "")),
        _Column("LEASE", 6, lambda w: _age(w.get("lease_age_s")) if w.get("remote") else
                ("-" if "remote" in w else "")),
        _Column("RTT ms", 7, lambda w: _ms_or_dash(w.get("rtt_s")) if w.get("remote") else
                ("-" if "remote" in w else "")),
        _Column("EPOCH", 5, lambda w: w.get("epoch", "")),
        _Column("RST", 3, lambda w: w.get("restarts", "")),
        _Column("SLOTS", 5, lambda w: w.get("slots", "-")),
        _Column("LOAD%", 5, lambda w: _pct(w.get("load_share"))),
        _Column("CHANNELS", 8, lambda w: w.get("channels", 0)),
        _Column("QUEUED", 7, lambda w: w.get("queued", 0)),
        _Column("INFLIGHT", 8, lambda w: w.get("inflight", "")),
        _Column("PROC/S", 7, lambda w: _si(w.get("processed_per_s", 0.0))),
        _Column("PROCESSED", 10, lambda w: w.get("processed", 0)),
        _Column("FAILED", 6, lambda w: w.get("failed", 0)),
        _Column("REDELIV", 7, lambda w: w.get("redelivered", 0)),
        _Column("LAG ms", 7, lambda w: _ms_or_dash(w.get("loop_lag_s"))),
        _Column("CPU%", 6, lambda w: _dash_or(w.get("cpu_percent"), ".1f")),
        _Column("RSS MB", 7, lambda w: _mb(w.get("rss_bytes"))),
    )
}
REMOTE_COLUMNS = ("HOST", "LINK", "LEASE", "RTT ms")
"""Columns shown only when some worker is remote (a local-only pool's table is as before)."""
DROP_ORDER = (
    "RTT ms", "LEASE", "EPOCH", "SLOTS", "REDELIV", "PROCESSED", "HOST", "CHANNELS", "LOAD%",
    "LAG ms", "RST", "QUEUED", "RSS MB", "LINK", "PROC/S", "INFLIGHT", "CPU%", "FAILED",
)
"""The worker table's columns dropped, first to last, until the table fits the width (W, PID and
STATE stay); a column not shown (:data:`REMOTE_COLUMNS` without remote workers) is skipped."""


def _columns(width: int | None, remote: bool = False) -> list[_Column]:
    """The columns that fit ``width`` (all of them for None), dropped in :data:`DROP_ORDER`;
    :data:`REMOTE_COLUMNS` only if ``remote``."""
    shown = [c for c in _COLUMNS if remote or c not in REMOTE_COLUMNS]
    if width is None:
        return [_COLUMNS[c] for c in shown]
    for name in DROP_ORDER:
        if sum(abs(_COLUMNS[c].width) + 1 for c in shown) - 1 <= width:
            break
        if name in shown:
            shown.remove(name)
    return [_COLUMNS[c] for c in shown]


def _row(columns: list[_Column], values: list[Any]) -> str:
    return " ".join(
        f"{str(v):{'<' if c.width < 0 else '>'}{abs(c.width)}}"
        for c, v in zip(columns, values, strict=True)
    )


def _worker_table(snap: Snapshot, width: int | None) -> list[str]:
    """The per-worker table, heading first, then the front's row and one row per worker; only
    the columns that fit ``width`` (host, link, lease age and round trip only when some worker
    is remote). A worker with failures, not ready, or remote and away is marked."""
    workers = worker_rows(snap)
    columns = _columns(width, any(w.get("remote") for w in workers))
    lines = [_row(columns, [c.heading for c in columns])]
    svc = snap["service"]
    front = svc.get("front") or {"pid": svc.get("pid")}
    pool = snap["pool"]
    front_row = {
        **front,
        "index": "front",
        "state": svc.get("state", "-"),
        "channels": "",
        "queued": "",
        "inflight": pool.get("inflight", ""),
        "processed_per_s": snap["rates"]["processed_per_s"],
        "processed": pool.get("acknowledged", ""),
        "failed": pool.get("failures", 0),
        "redelivered": pool.get("replayed", ""),
        "restarts": pool.get("restarts", ""),
    }
    lines.append(_Line(_row(columns, [c.value(front_row) for c in columns]), style=_BOLD))
    for w in workers:
        text = _row(columns, [c.value(w) for c in columns])
        bad = (
            w.get("failed", 0) or w["state"] not in ("ready", "starting")
            or w.get("link") == "away"
        )
        lines.append(_Line(text, style=_RED if w.get("failed", 0) else _YELLOW) if bad else text)
    return lines


def _halted(halted: list[dict[str, Any]]) -> list[str]:
    """The halted and quarantined channels, at most :data:`HALTED_SHOWN` of them."""
    if not halted:
        return []
    lines: list[str] = [
        "",
        _Line(f"halted channels ({len(halted)}; shardpool resume|skip CHANNEL):", style=_RED),
    ]
    for h in halted[:HALTED_SHOWN]:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"]))
        what = "QUARANTINED" if h["quarantined"] else "halted"
        lines.append(
            _with_id("  ", h["channel"], f"  seq {h['seq']}  {what} since {since}", _RED)
        )
        lines.append(f"      {h['error'].splitlines()[0] if h['error'] else h['type']}")
    if len(halted) > HALTED_SHOWN:
        lines.append(f"  … {len(halted) - HALTED_SHOWN} more (shardpool status --json)")
    return lines


_RED = "1;31"
_YELLOW = "33"
_BOLD = "1"


class _Line(str):
    """A table line with what fitting and colour need: ``keep``, the end of a channel id in it
    (never cut before: a cut id could not be pasted into ``shardpool resume`` / ``pin`` / ...),
    and ``style``, an SGR code for the whole line when colour is on ("" for none)."""

    keep: int
    style: str

    def __new__(cls, text: str, keep: int = 0, style: str = "") -> _Line:
        line = super().__new__(cls, text)
        line.keep = keep
        line.style = style
        return line


def _with_id(before: str, hex_id: str, after: str = "", style: str = "") -> _Line:
    """``before`` + the channel id (whole, in the form the commands accept: see
    :func:`shardpool.channelid.format_channel`) + ``after``."""
    shown = format_channel_hex(hex_id)
    return _Line(before + shown + after, len(before) + len(shown), style)


_FIELDS = re.compile(r" {2,}")


def _fit(line: str, width: int) -> list[str]:
    """``line`` in lines of at most ``width`` columns: its fields (separated by two spaces or
    more) flowed onto indented continuation lines rather than cut; a channel id is kept whole
    (the only thing that may pass ``width``: an id longer than the line), any other field too
    long for a line is abbreviated with "…"."""
    if len(line) <= width:
        return [line]
    keep = line.keep if isinstance(line, _Line) else 0
    style = line.style if isinstance(line, _Line) else ""
    indent = len(line) - len(line.lstrip(" "))
    head = line[:keep] if keep else line[:indent]
    fields = [f for f in _FIELDS.split(line[len(head):].strip()) if f]
    cont = " " * (indent + 4 if indent else 11)
    out: list[str] = []
    current = head
    for field in fields:
        sep = "  " if current.strip() else ""
        if len(current) + len(sep) + len(field) <= width or not current.strip():
            current += sep + field
        else:
            out.append(current)
            current = cont + field
        if len(current) > width and not (keep and current == head):
            current = current[: width - 1] + "…"
    out.append(current)
    return [_Line(text, style=style) for text in out]


def _paint(line: str, colour: bool) -> str:
    style = line.style if isinstance(line, _Line) else ""
    return f"\x1b[{style}m{line}\x1b[0m" if colour and style else str(line)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _more(items: list[Any], what: str) -> list[str]:
    extra = len(items) - PLACEMENT_SHOWN
    return [f"  … {extra} more {what} (shardpool status --json)"] if extra > 0 else []


def _moves(under_way: list[dict[str, Any]]) -> list[str]:
    """The moves in progress: slots, or the channel (whole) of a pin."""
    if not under_way:
        return []
    lines = [f"moves in progress ({len(under_way)}):"]
    for m in under_way[:PLACEMENT_SHOWN]:
        rest = (
            f"  worker {m['src']} → {m['dst']}  {m['reason']}  "
            f"{m['state']}  age {m['age_s']:.1f} s  held {m['held']}"
        )
        if m["slots"]:
            n = len(m["slots"])
            lines.append(f"  move {m['gen']}  {n} slot{'s' if n != 1 else ''}{rest}")
        else:
            lines.append(_with_id(f"  move {m['gen']}  channel ", m["channels"][0], rest))
    return lines + _more(under_way, "moves")


def _plan(levelling: dict[str, Any]) -> list[str]:
    """The levelling plan: slot moves, and channel pins (the channel whole)."""
    plan = levelling.get("plan") or []
    if not plan:
        return []
    how = "shown, not carried out" if levelling.get("mode") == "advise" else "carried out"
    lines = [f"levelling plan ({levelling.get('mode')}: {how}):"]
    for step in plan[:PLACEMENT_SHOWN]:
        rest = f"  worker {step['src']} → {step['dst']}  load {step['load']:.3f}"
        if step["kind"] == "move":
            lines.append(f"  move {len(step.get('slots') or [])} slot(s){rest}")
        else:
            lines.append(_with_id(f"  {step['kind']} channel ", str(step.get("channel")), rest))
    return lines + _more(plan, "steps")


def _roll(roll: dict[str, Any] | None) -> list[str]:
    """A rolling restart in progress (or the one called off last)."""
    if not roll:
        return []
    if roll["in_progress"]:
        worker = "" if roll["worker"] is None else f", worker {roll['worker']} {roll['phase']}"
        return [f"roll:      {roll['rolled']} of {roll['total']} workers replaced{worker}"]
    if roll.get("error"):
        return [f"roll:      called off: {roll['error']}"]
    return []

def _placement(place: dict[str, Any] | None) -> list[str]:
    """Slots, moves, the resize, the levelling plan, pins and saturated channels."""
    if not place:
        return []
    moves, resize = place["moves"], place["resize"]
    levelling = place.get("levelling") or {}
    pins: dict[str, int] = place.get("pins") or {}
    lines = [
        "",
        f"placement: {sum(place['slots_per_worker'])} slots on {place['workers']} workers  "
        f"pinned channels {len(pins)}  levelling {levelling.get('mode', '-')}  "
        f"moves committed {moves['committed']}  aborted {moves['aborted']}  "
        f"pause p50 {_ms(moves['pause_p50_s'])}  p99 {_ms(moves['pause_p99_s'])}",
    ]
    if resize["in_progress"]:
        retiring = resize["retiring"]
        lines.append(
            f"resize:    to {resize['target']} workers in progress"
            + (f" (retiring {', '.join(map(str, retiring))})" if retiring else "")
        )
    elif resize.get("error"):
        lines.append(f"resize:    called off: {resize['error']}")
    lines += _roll(place.get("roll"))
    lines += _moves(moves["in_progress"])
    lines += _plan(levelling)
    dedicated = {str(c): int(w) for w, c in (levelling.get("dedicated") or {}).items()}
    if pins:
        lines.append(f"pinned channels ({len(pins)}; shardpool unpin CHANNEL):")
        for cid, w in list(pins.items())[:PLACEMENT_SHOWN]:
            own = "  (dedicated worker)" if dedicated.get(cid) == w else ""
            lines.append(_with_id("  ", cid, f"  worker {w}{own}"))
        lines += _more(list(pins), "pins")
    saturated = levelling.get("saturated") or []
    if saturated:
        lines.append(
            f"saturated channels ({len(saturated)}; each keeps a core busy: order forbids "
            "splitting one):"
        )
        lines += [_with_id("  ", cid) for cid in saturated[:PLACEMENT_SHOWN]]
        lines += _more(saturated, "saturated channels")
    return lines


def _hottest(hot: list[list[Any]]) -> list[str]:
    """The hottest channels: ``[hex id, messages, worker]`` each."""
    if not hot:
        return []
    lines = [
        "",
        f"hottest channels (top {len(hot)}, messages since worker start):",
        f" {'MESSAGES':>9} {'W':>3}  CHANNEL",
    ]
    # The id last, after fixed-width columns: a 32-byte id (64 hex digits) fits 80 columns.
    lines += [_with_id(f" {count:>9} {worker:>3}  ", cid) for cid, count, worker in hot]
    return lines


def render_status(snap: Snapshot, width: int | None = None, colour: bool = False) -> str:
    """The ``shardpool status`` table for one snapshot, as text.

    ``width``: None gives whole lines (as for a pipe or a file); else every line fits ``width``
    columns: the worker table drops columns in :data:`DROP_ORDER` until it fits, other lines
    flow their fields onto continuation lines (a field too long for any line is abbreviated
    with "…"). A channel id is never cut: ids are printed whole, in a form ``shardpool
    resume``/``skip``/``pin``/``unpin`` accept (an id longer than the width passes it).
    ``colour``: ANSI colours for halted channels, failures, workers not ready and order
    violations (the layout is the same; the caller decides: a terminal, and no ``NO_COLOR``).
    """
    lines = [
        *_summary(snap),
        "",
        *_worker_table(snap, width),
        *_placement(snap.get("placement")),
        *_halted(snap["pool"].get("halted") or []),
        *_hottest(snap.get("hot_channels") or []),
    ]
    if width is not None:
        lines = [part for line in lines for part in _fit(line, width)]
    return "\n".join(_paint(line, colour) for line in lines)
