"""Configuration: one TOML file, validated at load into frozen dataclasses.

Layers, later ones winning: built-in defaults, the TOML file, ``SHARDPOOL_<SECTION>_<KEY>``
environment variables, then an ``overrides`` mapping of dotted keys (``{"pool.workers": 2}``).

Every key is declared once, as a dataclass field whose ``metadata["rule"]`` says how to check
and convert it (see :func:`_int`, :func:`_float`, ...). One generic validator walks those fields,
so a new key is one line in its section class and a new section is one class plus one field of
:class:`Config`. Relations between keys of a section (``slots >= workers``) live in the section's
``CHECKS`` tuple.

Invalid input never raises halfway: every problem is collected and a single
:class:`~shardpool.errors.ConfigError` lists them all as ``(key, value, allowed)`` triples, where
``key`` is the full dotted key (``transport.batch_size``). Constructing a section dataclass directly
(or via :func:`dataclasses.replace`) runs the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psutil

from shardpool.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_CONFIG_VAR",
    "ENV_PREFIX",
    "Config",
    "ControlConfig",
    "DeadLettersConfig",
    "FrozenDict",
    "IngressConfig",
    "MetricsConfig",
    "PoolConfig",
    "SupervisorConfig",
    "TransportConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_toml",
    "find_config_path",
    "load_config",
    "load_config_with_origins",
    "physical_cores",
    "with_overrides",
]

#: Relative on purpose: the CLI runs from a checkout or a deployment directory holding ``config/``.
DEFAULT_CONFIG_PATH: Path = Path("config/shardpool.toml")
#: Environment variable naming the config file (read by :func:`find_config_path`, not an override).
ENV_CONFIG_VAR = "SHARDPOOL_CONFIG"
#: Prefix of override variables: ``SHARDPOOL_<SECTION>_<KEY>``.
ENV_PREFIX = "SHARDPOOL_"
DEFAULTS_SOURCE = "<defaults>"


# --------------------------------------------------------------------------------------------------
# Immutable mapping for table-valued keys
# --------------------------------------------------------------------------------------------------


class FrozenDict(Mapping[str, Any]):
    """A read-only, hashable, picklable mapping (nested tables frozen too, arrays become tuples).

    ``types.MappingProxyType`` would be read-only but neither hashable nor picklable, and config
    objects are hashed (frozen dataclasses) and shipped to worker processes.
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data: dict[str, Any] = {k: _deep_freeze(v) for k, v in (data or {}).items()}
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (self._data,))

    def thaw(self) -> dict[str, Any]:
        """A plain, mutable deep copy (tables as ``dict``, arrays as ``list``)."""
        return {k: _deep_thaw(v) for k, v in self._data.items()}


def _deep_freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return value if isinstance(value, FrozenDict) else FrozenDict(value)
    if isinstance(value, (list, tuple)):
        return tuple(_deep_freeze(v) for v in value)
    return value


def _deep_thaw(value: Any) -> Any:
    if isinstance(value, FrozenDict):
        return value.thaw()
    if isinstance(value, tuple):
        return [_deep_thaw(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# Rules: how each key is checked and converted
# --------------------------------------------------------------------------------------------------


# (dotted key or variable name, offending value, what is allowed): ConfigError's problem triples.
_Problems = list[tuple[str, Any, str]]


class _Reject(Exception):
    """Raised by a rule's converter; the rule's ``allowed`` text becomes the problem message."""


@dataclass(frozen=True)
class Rule:
    """How one key is validated.

    ``convert`` takes the raw (TOML-level) value and returns the value to store, or raises
    :class:`_Reject`. ``allowed`` says in words what is accepted. ``textual`` marks keys whose
    environment value should be taken verbatim when it does not parse as a TOML string (so that
    ``SHARDPOOL_METRICS_HOST=localhost`` or a path made of digits just works).
    """

    allowed: str
    convert: Callable[[Any], Any]
    kinds: tuple[type, ...]
    textual: bool = False

    def wrong_type(self, value: Any) -> bool:
        """True when ``value`` fails on its type rather than its range or form."""
        if isinstance(value, bool):
            return bool not in self.kinds
        return not isinstance(value, self.kinds)


def _toml_type(value: Any) -> str:
    """``value``'s type in TOML's words, with an article: "a float", "an array"."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    return f"a {type(value).__name__}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _field(rule: Rule, default: Any, doc: str) -> Any:
    # Typed Any so that e.g. ``workers: int`` may carry the raw default "auto"; __post_init__
    # converts it, so instances always hold the declared type.
    return field(default=default, metadata={"rule": rule, "doc": doc})


def _int(lo: int, hi: int, *, default: Any, doc: str, auto: Callable[[], int] | None = None) -> Any:
    """An integer key in ``lo..hi``; with ``auto``, the string "auto" is resolved by calling it."""
    allowed = f"an integer from {lo} to {hi}"
    if auto is not None:
        allowed += ', or "auto"'

    def convert(v: Any) -> int:
        if auto is not None and v == "auto":
            return max(lo, min(hi, auto()))
        # bool is an int subclass in Python but never a count in a config file.
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Reject
        if not lo <= v <= hi:
            raise _Reject
        return v

    kinds: tuple[type, ...] = (int, str) if auto is not None else (int,)
    return _field(Rule(allowed, convert, kinds), default, doc)


def _float(
    lo: float, hi: float, *, default: float, doc: str, unit: str, lo_open: bool = False
) -> Any:
    """A number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), in ``unit``; ints are accepted."""
    if lo_open:
        allowed = f"a number > {_num(lo)} and <= {_num(hi)} ({unit})"
    else:
        allowed = f"a number from {_num(lo)} to {_num(hi)} ({unit})"

    def convert(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Reject
        f = float(v)
        # Written so that NaN fails both comparisons.
        ok_lo = f > lo if lo_open else f >= lo
        if not (ok_lo and f <= hi):
            raise _Reject
        return f

    return _field(Rule(allowed, convert, (int, float)), default, doc)


def _bool(*, default: bool, doc: str) -> Any:
    def convert(v: Any) -> bool:
        if not isinstance(v, bool):
            raise _Reject
        return v

    return _field(Rule("true or false", convert, (bool,)), default, doc)


def _choice(*choices: str, default: str, doc: str) -> Any:
    allowed = "one of " + ", ".join(f'"{c}"' for c in choices)

    def convert(v: Any) -> str:
        if not isinstance(v, str) or v not in choices:
            raise _Reject
        return v

    return _field(Rule(allowed, convert, (str,)), default, doc)


def _str(
    *,
    default: str,
    doc: str,
    allowed: str = "a string",
    check: Callable[[str], bool] | None = None,
) -> Any:
    def convert(v: Any) -> str:
        if not isinstance(v, str) or (check is not None and not check(v)):
            raise _Reject
        return v

    return _field(Rule(allowed, convert, (str,), textual=True), default, doc)


def _table(*, doc: str) -> Any:
    def convert(v: Any) -> FrozenDict:
        if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
            raise _Reject
        return FrozenDict(v)

    return _field(Rule("a table with string keys", convert, (Mapping,)), FrozenDict(), doc)


def _policy_table(*, doc: str) -> Any:
    policies = ("halt", "skip", "retry")

    def convert(v: Any) -> FrozenDict:
        if not isinstance(v, Mapping) or not all(
            isinstance(k, str) and k and x in policies for k, x in v.items()
        ):
            raise _Reject
        return FrozenDict(v)

    return _field(
        Rule('a table of message type = "halt", "skip" or "retry"', convert, (Mapping,)),
        FrozenDict(),
        doc,
    )


def _is_dotted_name(s: str) -> bool:
    parts = s.split(".")
    return all(p.isidentifier() and not keyword.iskeyword(p) for p in parts)


def _is_handler_ref(s: str) -> bool:
    module, sep, attr = s.partition(":")
    return bool(sep) and _is_dotted_name(module) and _is_dotted_name(attr)


def _is_endpoint(s: str) -> bool:
    if s == "":
        return True
    if s.startswith("ipc://"):
        return len(s) > len("ipc://")
    if s.startswith("tcp://"):
        host, sep, port = s[len("tcp://") :].rpartition(":")
        if not (sep and host):
            return False
        return port == "*" or (port.isdigit() and 1 <= int(port) <= 65535)
    return False


_ENDPOINT_ALLOWED = (
    '"" (an ipc socket in the runtime dir), "ipc://PATH", or "tcp://HOST:PORT" (PORT 1-65535 or *)'
)


def physical_cores() -> int:
    """Physical core count (psutil), else the logical count, else 1."""
    # Hyperthread siblings share execution units, and workers are CPU-bound: one per physical core.
    return psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or 1


@dataclass(frozen=True)
class Check:
    """A relation between two keys of one section: ``key op other`` must hold."""

    key: str
    op: str  # ">=" or ">"
    other: str

    _OPS: ClassVar[dict[str, tuple[str, Callable[[Any, Any], bool]]]] = {
        ">=": ("at least", lambda a, b: a >= b),
        ">": ("greater than", lambda a, b: a > b),
    }

    def holds(self, a: Any, b: Any) -> bool:
        return self._OPS[self.op][1](a, b)

    def describe(self, section: str, other_value: Any) -> str:
        return f"must be {self._OPS[self.op][0]} {section}.{self.other} (which is {other_value!r})"


def _validate_section(obj: Any) -> _Problems:
    """Convert every field of a section in place; return the problems (empty when valid)."""
    section: str = obj.SECTION
    problems: _Problems = []
    bad: set[str] = set()
    for f in dataclasses.fields(obj):
        rule: Rule = f.metadata["rule"]
        raw = getattr(obj, f.name)
        try:
            value = rule.convert(raw)
        except _Reject:
            allowed = rule.allowed
            if rule.wrong_type(raw):
                allowed = f"{allowed} (got {_toml_type(raw)})"
            problems.append((f"{section}.{f.name}", raw, allowed))
            bad.add(f.name)
            continue
        object.__setattr__(obj, f.name, value)
    for check in obj.CHECKS:
        # A relation against an already-invalid value would only add noise.
        if check.key in bad or check.other in bad:
            continue
        a, b = getattr(obj, check.key), getattr(obj, check.other)
        if not check.holds(a, b):
            problems.append((f"{section}.{check.key}", a, check.describe(section, b)))
    return problems


class _Section:
    """Base of the section dataclasses: validates and converts on construction."""

    SECTION: ClassVar[str]
    CHECKS: ClassVar[tuple[Check, ...]] = ()
    # Declared so type checkers accept subclasses (all dataclasses) in dataclasses.fields().
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        problems = _validate_section(self)
        if problems:
            raise ConfigError(problems)


# --------------------------------------------------------------------------------------------------
# Sections. Add a key: one line here (and document it in config/shardpool.toml).
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolConfig(_Section):
    """``[pool]``: how many workers, which handler, and what happens when it fails.

    Raises:
        ConfigError: on construction, when any value is of the wrong type or out of range.
    """

    SECTION: ClassVar[str] = "pool"
    CHECKS: ClassVar[tuple[Check, ...]] = (Check("slots", ">=", "workers"),)

    workers: int = _int(
        1,
        1024,
        default="auto",
        auto=physical_cores,
        doc='worker processes; "auto" = physical cores',
    )
    handler: str = _str(
        default="shardpool.demo.handler:LightningHandler",
        allowed='a "module:attribute" reference, e.g. "shardpool.demo.handler:LightningHandler"',
        check=_is_handler_ref,
        doc="the handler, as module:attribute",
    )
    handler_options: FrozenDict = _table(doc="keyword arguments for the handler class")
    slots: int = _int(1, 1_048_576, default=4096, doc="routing slots (fixed hash space)")
    failure_policy: str = _choice(
        "halt", "skip", "retry", default="halt", doc="what to do when the handler raises"
    )
    failure_policy_by_type: FrozenDict = _policy_table(
        doc='per message["type"] overrides of failure_policy'
    )
    retry_limit: int = _int(0, 1000, default=3, doc="retries before halting (policy retry)")
    retry_backoff_ms: float = _float(
        0, 60_000, default=50.0, unit="milliseconds", doc="wait before each retry"
    )
    payload: str = _choice("cbor", "raw", default="cbor", doc="payload encoding")
    pin_workers: bool = _bool(default=False, doc="pin worker i to CPU i (shardpool run)")
    channel_idle_expiry_s: float = _float(
        0,
        31_536_000,
        default=0.0,
        unit="seconds",
        doc="forget a stateless channel idle this long; 0 = never",
    )
    move_state: str = _choice(
        "auto",
        "cbor",
        "hooks",
        "none",
        default="auto",
        doc="how handler state moves with a channel (auto: hooks if the handler has both)",
    )
    move_timeout_s: float = _float(
        0, 3600, lo_open=True, default=10.0, unit="seconds", doc="drain deadline of one move"
    )
    move_buffer_max: int = _int(
        1, 10_000_000, default=100_000, doc="messages held at the front per move, at most"
    )
    max_concurrent_moves: int = _int(1, 4096, default=64, doc="slots moving at once, at most")
    rebalance: str = _choice(
        "off", "advise", "auto", default="advise", doc="load levelling: off, plan only, or act"
    )
    rebalance_interval_s: float = _float(
        0, 3600, lo_open=True, default=5.0, unit="seconds", doc="load measurement period"
    )
    rebalance_threshold: float = _float(
        0,
        10,
        lo_open=True,
        default=0.10,
        unit="fraction of the mean",
        doc="busiest worker over the mean that triggers levelling",
    )
    rebalance_grace_s: float = _float(
        0, 86_400, default=60.0, unit="seconds", doc="a moved slot stays put at least this long"
    )
    hot_channel_share: float = _float(
        0,
        1,
        default=0.5,
        unit="fraction of a mean worker's load",
        doc="channel load that earns a pin; 0 = never",
    )


@dataclass(frozen=True)
class TransportConfig(_Section):
    """``[transport]``: sockets and batching between the front and the workers.

    Raises:
        ConfigError: on construction, when any value is of the wrong type or out of range.
    """

    SECTION: ClassVar[str] = "transport"
    CHECKS: ClassVar[tuple[Check, ...]] = (Check("max_inflight", ">=", "batch_size"),)

    runtime_dir: str = _str(default="", doc='socket directory; "" = private temp dir')
    batch_size: int = _int(1, 65_536, default=256, doc="messages per frame, at most")
    batch_linger_ms: float = _float(
        0, 1000, default=0.5, unit="milliseconds", doc="wait for a batch to fill"
    )
    max_inflight: int = _int(
        1, 10_000_000, default=16_384, doc="unacknowledged messages per worker"
    )
    max_message_bytes: int = _int(1, 67_108_864, default=1_048_576, doc="encoded payload limit")


@dataclass(frozen=True)
class SupervisorConfig(_Section):
    """``[supervisor]``: start-up, liveness and restart limits (all times in seconds).

    Raises:
        ConfigError: on construction, when any value is of the wrong type or out of range.
    """

    SECTION: ClassVar[str] = "supervisor"
    CHECKS: ClassVar[tuple[Check, ...]] = (
        Check("heartbeat_timeout_s", ">", "heartbeat_interval_s"),
        Check("restart_backoff_max_s", ">=", "restart_backoff_s"),
    )

    ready_timeout_s: float = _float(
        0, 600, lo_open=True, default=20.0, unit="seconds", doc="deadline for a worker's READY"
    )
    heartbeat_interval_s: float = _float(
        0, 60, lo_open=True, default=0.5, unit="seconds", doc="heartbeat period"
    )
    heartbeat_timeout_s: float = _float(
        0, 3600, lo_open=True, default=10.0, unit="seconds", doc="silence before a worker is hung"
    )
    stop_timeout_s: float = _float(
        0, 3600, lo_open=True, default=10.0, unit="seconds", doc="drain deadline at shutdown"
    )
    restart_backoff_s: float = _float(
        0, 60, default=0.05, unit="seconds", doc="first restart delay"
    )
    restart_backoff_max_s: float = _float(
        0, 600, default=2.0, unit="seconds", doc="restart delay cap"
    )
    max_restarts: int = _int(0, 10_000, default=10, doc="restarts per worker per window")
    restart_window_s: float = _float(
        0, 86_400, lo_open=True, default=60.0, unit="seconds", doc="window for max_restarts"
    )
    poison_after_crashes: int = _int(
        1, 1000, default=2, doc="deaths on one message before its channel is quarantined"
    )


@dataclass(frozen=True)
class IngressConfig(_Section):
    """``[ingress]``: the ZeroMQ socket external producers send to.

    Raises:
        ConfigError: on construction, when any value is of the wrong type or out of range.
    """

    SECTION: ClassVar[str] = "ingress"

    endpoint: str = _str(
        default="", allowed=_ENDPOINT_ALLOWED, check=_is_endpoint, doc="ingress address"
    )
    curve_public_key: str = _str(default="", doc="CURVE public key file")
    curve_secret_key: str = _str(default="", doc="CURVE secret key file")
    curve_clients_dir: str = _str(default="", doc="authorised CURVE client keys; \"\" = any")
    max_producers: int = _int(1, 1_000_000, default=1024, doc="connected producers, at most")
    max_pending_per_producer: int = _int(
        1,
        10_000_000,
        default=10_000,
        doc="per producer: messages accepted but unanswered plus replies it has not read",
    )


@dataclass(frozen=True)
class ControlConfig(_Section):
    """``[control]``: the socket ``shardpool status/drain/stop`` talk to.

    Raises:
        ConfigError: on construction, when the endpoint is malformed.
    """

    SECTION: ClassVar[str] = "control"

    endpoint: str = _str(
        default="", allowed=_ENDPOINT_ALLOWED, check=_is_endpoint, doc="control address"
    )


@dataclass(frozen=True)
class MetricsConfig(_Section):
    """``[metrics]``: the Prometheus endpoint.

    Raises:
        ConfigError: on construction, when any value is of the wrong type or out of range.
    """

    SECTION: ClassVar[str] = "metrics"

    enabled: bool = _bool(default=False, doc="serve Prometheus metrics")
    host: str = _str(
        default="127.0.0.1",
        allowed="a non-empty host name or address",
        check=bool,
        doc="bind address",
    )
    port: int = _int(1, 65_535, default=9464, doc="TCP port")


@dataclass(frozen=True)
class DeadLettersConfig(_Section):
    """``[deadletters]``: the durable store of messages that ended skipped or failed under
    ``skip`` (see :mod:`shardpool.deadletters`).

    Raises:
        ConfigError: on construction, when any value is of the wrong type or out of range.
    """

    SECTION: ClassVar[str] = "deadletters"

    enabled: bool = _bool(default=False, doc="keep dead letters")
    path: str = _str(
        default="", doc='SQLite file; "" = shardpool-deadletters.sqlite in the runtime directory'
    )
    max_entries: int = _int(
        1, 100_000_000, default=100_000, doc="entries kept, at most (the oldest are dropped)"
    )


WORKER_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
"""What a remote worker id may be: it names a key file (``<id>.key``) and a systemd instance."""


def _is_worker_id(s: str) -> bool:
    return WORKER_ID_RE.fullmatch(s) is not None


def _weights_table(*, doc: str) -> Any:
    def convert(v: Any) -> FrozenDict:
        if not isinstance(v, Mapping) or not all(
            isinstance(k, str)
            and _is_worker_id(k)
            and not isinstance(w, bool)
            and isinstance(w, (int, float))
            and 0 < w <= 1000
            for k, w in v.items()
        ):
            raise _Reject
        return FrozenDict({k: float(w) for k, w in v.items()})

    return _field(
        Rule(
            "a table of worker id = weight (ids of 1-64 letters, digits, '_', '-', '.', not "
            "starting with '.'; weights > 0 and <= 1000)",
            convert,
            (Mapping,),
        ),
        FrozenDict(),
        doc,
    )


def _is_tcp_endpoint(s: str) -> bool:
    return s == "" or (s.startswith("tcp://") and _is_endpoint(s))


_TCP_ALLOWED = '"" (none) or "tcp://HOST:PORT" (PORT 1-65535, or * to bind any)'


@dataclass(frozen=True)
class RemoteConfig(_Section):
    """``[remote]``: workers on other hosts (see :mod:`shardpool.front.remote`). The front reads
    ``bind`` … ``lease_margin_s``; ``shardpool worker`` reads the lease and ``connect`` …
    ``worker_secret_key``.

    Raises:
        ConfigError: on construction, when any value is of the wrong type or out of range.
    """

    SECTION: ClassVar[str] = "remote"

    bind: str = _str(
        default="", allowed=_TCP_ALLOWED, check=_is_tcp_endpoint,
        doc='where remote workers connect; "" = no remote workers',
    )
    workers: FrozenDict = _weights_table(doc="remote worker id = weight (its share of the slots)")
    curve_public_key: str = _str(default="", doc="the front's CURVE public key file")
    curve_secret_key: str = _str(default="", doc="the front's CURVE secret key file")
    workers_dir: str = _str(default="", doc="pinned worker public keys, one <id>.key per worker")
    lease_s: float = _float(
        0.1, 3600.0, default=3.0, unit="seconds",
        doc="a worker that hears nothing from the front this long stops taking messages",
    )
    lease_margin_s: float = _float(
        0.05, 3600.0, default=1.0, unit="seconds",
        doc="the front fails a silent worker over after lease_s + this",
    )
    connect: str = _str(
        default="", allowed=_TCP_ALLOWED, check=_is_tcp_endpoint,
        doc="(shardpool worker) the front's address",
    )
    worker_id: str = _str(
        default="",
        allowed="\"\" or 1-64 letters, digits, '_', '-', '.', not starting with '.'",
        check=lambda s: s == "" or _is_worker_id(s),
        doc="(shardpool worker) this worker's id",
    )
    front_public_key: str = _str(default="", doc="(shardpool worker) the front's public key file")
    worker_secret_key: str = _str(
        default="", doc="(shardpool worker) this worker's secret key file"
    )


def _section(cls: type[_Section]) -> Any:
    return field(default_factory=cls, metadata={"section": cls})


@dataclass(frozen=True)
class Config:
    """The whole configuration. Add a section: one field here (name = the section's ``SECTION``).

    ``source`` is the file it was loaded from, or ``"<defaults>"``; it is not part of equality.
    """

    pool: PoolConfig = _section(PoolConfig)
    transport: TransportConfig = _section(TransportConfig)
    supervisor: SupervisorConfig = _section(SupervisorConfig)
    ingress: IngressConfig = _section(IngressConfig)
    control: ControlConfig = _section(ControlConfig)
    metrics: MetricsConfig = _section(MetricsConfig)
    deadletters: DeadLettersConfig = _section(DeadLettersConfig)
    remote: RemoteConfig = _section(RemoteConfig)
    source: str = field(default=DEFAULTS_SOURCE, compare=False)


_SECTIONS: dict[str, type[_Section]] = {
    f.name: f.metadata["section"] for f in dataclasses.fields(Config) if "section" in f.metadata
}
for _name, _cls in _SECTIONS.items():
    assert _name == _cls.SECTION, f"Config.{_name} holds section {_cls.SECTION!r}"


def _keys(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_SECTIONS[section])]


def _rule(section: str, key: str) -> Rule:
    rule: Rule = _SECTIONS[section].__dataclass_fields__[key].metadata["rule"]
    return rule


# --------------------------------------------------------------------------------------------------
# Layering raw values and validating them
# --------------------------------------------------------------------------------------------------

# section -> key -> (raw value, where it came from; None for the file or mapping itself)
_Raw = dict[str, dict[str, tuple[Any, str | None]]]


def _unknown_key(section: str, key: str) -> str:
    allowed = _keys(section)
    msg = f"unknown key in [{section}]; allowed keys: {', '.join(allowed)}"
    close = difflib.get_close_matches(key, allowed, n=1)
    return msg + (f" (did you mean {close[0]!r}?)" if close else "")


def _unknown_section(section: str) -> str:
    msg = f"unknown section [{section}]; allowed sections: {', '.join(_SECTIONS)}"
    close = difflib.get_close_matches(section, list(_SECTIONS), n=1)
    return msg + (f" (did you mean [{close[0]}]?)" if close else "")


def _layer_table(raw: _Raw, data: Mapping[str, Any], problems: _Problems) -> None:
    """Merge a nested ``{section: {key: value}}`` mapping (a TOML document) into ``raw``."""
    for section, table in data.items():
        if section not in _SECTIONS:
            problems.append((section, table, _unknown_section(section)))
            continue
        if not isinstance(table, Mapping):
            problems.append(
                (section, table, f"a table [{section}] with keys: {', '.join(_keys(section))}")
            )
            continue
        known = set(_keys(section))
        for key, value in table.items():
            if key not in known:
                problems.append((f"{section}.{key}", value, _unknown_key(section, key)))
            else:
                raw[section][key] = (value, None)


_ENV_HINT = f" (override variables are named {ENV_PREFIX}<SECTION>_<KEY>)"
_ENV_ORIGIN = "environment variable "


def _layer_env(raw: _Raw, env: Mapping[str, str], problems: _Problems) -> None:
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG_VAR:
            continue
        text = env[var]
        # Section names have no underscore, so the first one after the prefix ends the section.
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("_")
        if section not in _SECTIONS:
            problems.append((var, text, f"{_unknown_section(section)}{_ENV_HINT}"))
            continue
        if key not in _keys(section):
            problems.append((var, text, f"{_unknown_key(section, key)}{_ENV_HINT}"))
            continue
        try:
            doc = tomllib.loads(f"v = {text}")
        except tomllib.TOMLDecodeError:
            doc = {}
        # More than one key means the text smuggled in a newline and further lines: not a value.
        value: Any = doc["v"] if len(doc) == 1 else text
        if _rule(section, key).textual and not isinstance(value, str):
            value = text
        raw[section][key] = (value, f"{_ENV_ORIGIN}{var}")


def _layer_overrides(
    raw: _Raw,
    overrides: Mapping[str, Any],
    problems: _Problems,
    labels: Mapping[str, str] | None = None,
) -> None:
    """Merge dotted ``overrides``; ``labels`` names where each came from (``"flag --workers"``),
    else ``"overrides"``."""
    for dotted, value in overrides.items():
        section, sep, key = str(dotted).partition(".")
        if not sep:
            problems.append((dotted, value, 'an override key must be dotted, like "pool.workers"'))
        elif section not in _SECTIONS:
            problems.append((dotted, value, _unknown_section(section)))
        elif key not in _keys(section):
            problems.append((dotted, value, _unknown_key(section, key)))
        else:
            raw[section][key] = (value, (labels or {}).get(dotted, "overrides"))


def _build(raw: _Raw, source: str, problems: _Problems) -> Config:
    """Construct every section, collecting all problems; raise one ConfigError if any."""
    sections: dict[str, _Section] = {}
    for name, cls in _SECTIONS.items():
        values = {k: v for k, (v, _) in raw[name].items()}
        try:
            sections[name] = cls(**values)
        except ConfigError as e:
            for key, value, allowed in e.problems:
                origin = raw[name].get(key.partition(".")[2], (None, None))[1]
                if origin is not None:
                    allowed = f"{allowed} [set by {origin}]"
                problems.append((key, value, allowed))
    if problems:
        raise ConfigError(problems)
    return Config(**sections, source=source)  # type: ignore[arg-type]


def _empty_raw() -> _Raw:
    return {name: {} for name in _SECTIONS}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Config:
    """Load ``path`` (``None``: built-in defaults only), apply env and ``overrides``, validate.

    ``env`` defaults to :data:`os.environ`; pass ``{}`` to ignore the environment.
    ``SHARDPOOL_<SECTION>_<KEY>`` variables (case-insensitive section/key) are parsed as a TOML
    value when they parse, else taken as a bare string. ``SHARDPOOL_CONFIG`` is not an override.
    ``labels`` names where an override came from (``{"pool.workers": "flag --workers"}``): an
    error about it says so, as one about an environment variable names the variable.

    Raises:
        ConfigError: the file is missing, unreadable or not valid TOML (naming the file and the
            line/column), or any value is invalid; in the latter case every problem is listed,
            each as a ``(dotted key or variable, value, what is allowed)`` triple.
    """
    return load_config_with_origins(path, env=env, overrides=overrides, labels=labels)[0]


def load_config_with_origins(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
) -> tuple[Config, dict[str, str]]:
    """:func:`load_config`, and where each value came from: ``{dotted key: origin}`` for every
    key, the origin being ``"default"``, ``"file"``, ``"env SHARDPOOL_<SECTION>_<KEY>"``, or the
    override's label (``"overrides"`` without one).

    Raises:
        ConfigError: as :func:`load_config`.
    """
    raw = _empty_raw()
    problems: _Problems = []
    source = DEFAULTS_SOURCE
    if path is not None:
        source = os.fspath(path)
        _layer_table(raw, _read_toml(Path(path)), problems)
    _layer_env(raw, os.environ if env is None else env, problems)
    if overrides:
        _layer_overrides(raw, overrides, problems, labels)
    return _build(raw, source, problems), _origins(raw)


def _origins(raw: _Raw) -> dict[str, str]:
    out: dict[str, str] = {}
    for section in _SECTIONS:
        for key in _keys(section):
            origin = raw[section][key][1] if key in raw[section] else "default"
            if origin is None:
                origin = "file"
            elif origin.startswith(_ENV_ORIGIN):
                origin = "env " + origin[len(_ENV_ORIGIN) :]
            out[f"{section}.{key}"] = origin
    return out


def config_from_dict(data: Mapping[str, Any], *, source: str = "<dict>") -> Config:
    """Validate a nested ``{section: {key: value}}`` mapping (as TOML would give) into a Config.

    Missing keys take their defaults; the environment is not consulted.

    Raises:
        ConfigError: listing every unknown section/key and invalid value.
    """
    raw = _empty_raw()
    problems: _Problems = []
    _layer_table(raw, data, problems)
    return _build(raw, source, problems)


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted ``overrides`` applied (``{"pool.workers": 4}``), re-validated.

    Raises:
        ConfigError: an override names an unknown key or makes any value or relation invalid.
    """
    raw = _empty_raw()
    problems: _Problems = []
    _layer_table(raw, config_to_dict(cfg), problems)
    _layer_overrides(raw, overrides, problems)
    return _build(raw, cfg.source, problems)


def find_config_path(
    explicit: str | os.PathLike[str] | None, *, env: Mapping[str, str] | None = None
) -> Path | None:
    """The config file to load: ``explicit``, else ``$SHARDPOOL_CONFIG``, else
    :data:`DEFAULT_CONFIG_PATH` if it exists in the current directory, else ``None`` (defaults).

    An explicit or environment path is returned even if missing, so that loading it reports it.
    """
    if explicit is not None and os.fspath(explicit) != "":
        return Path(explicit)
    from_env = (os.environ if env is None else env).get(ENV_CONFIG_VAR, "")
    if from_env:
        return Path(from_env)
    if DEFAULT_CONFIG_PATH.is_file():
        return DEFAULT_CONFIG_PATH
    return None


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` with plain types only (tables as dict, arrays as list)."""
    out: dict[str, dict[str, Any]] = {}
    for name in _SECTIONS:
        sec = getattr(cfg, name)
        out[name] = {f.name: _deep_thaw(getattr(sec, f.name)) for f in dataclasses.fields(sec)}
    return out


def _toml_key(key: str) -> str:
    bare = key != "" and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else _toml_str(key)


def _toml_str(s: str) -> str:
    out = []
    for c in s:
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    # datetime/date/time: TOML's own literal forms are ISO 8601.
    return str(v.isoformat())


def config_to_toml(cfg: Config, origins: Mapping[str, str] | None = None) -> str:
    """The effective config as a TOML document that :func:`load_config` reads back unchanged;
    with ``origins`` (see :func:`load_config_with_origins`), each line's comment ends with where
    its value came from (``[file]``, ``[default]``, ``[env SHARDPOOL_POOL_WORKERS]``, ...)."""
    lines = [f"# effective configuration (source: {cfg.source})"]
    for section, values in config_to_dict(cfg).items():
        docs = {f.name: f.metadata["doc"] for f in dataclasses.fields(_SECTIONS[section])}
        lines.append("")
        lines.append(f"[{section}]")
        for k, v in values.items():
            origin = f"  [{origins[f'{section}.{k}']}]" if origins else ""
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}  # {docs[k]}{origin}")
    return "\n".join(lines) + "\n"
