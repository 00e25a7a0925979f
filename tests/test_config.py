"""Unit tests for shardpool.config: loading, layering, validation messages, immutability."""

from __future__ import annotations

import dataclasses
import json
import pickle
import typing
from pathlib import Path
from typing import Any

import psutil
import pytest

from shardpool import config as config_mod
from shardpool.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    FrozenDict,
    PoolConfig,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    find_config_path,
    load_config,
    with_overrides,
)
from shardpool.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "shardpool.toml"
EXAMPLE = REPO / "config" / "example-production.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.toml"
    p.write_text(text, encoding="utf-8")
    return p


def problems_of(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, tuple[Any, str]]:
    return {key: (value, allowed) for key, value, allowed in exc.value.problems}


def assert_problem(
    exc: pytest.ExceptionInfo[ConfigError], key: str, value: Any, *fragments: str
) -> None:
    """The error names ``key`` and ``value`` (both in .problems and in the message text)."""
    probs = problems_of(exc)
    assert key in probs, f"{key} not among {list(probs)}"
    got_value, allowed = probs[key]
    assert got_value == value and type(got_value) is type(value)
    text = str(exc.value)
    assert key in text and repr(value) in text
    for frag in fragments:
        assert frag in allowed, f"{frag!r} not in {allowed!r}"


# ------------------------------------------------------------------------------------- defaults


def test_defaults_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 6 if logical else 3)
    cfg = load_config(env={})
    assert cfg.source == "<defaults>"
    assert cfg.pool.workers == 3
    assert cfg.pool.handler == "shardpool.demo.handler:LightningHandler"
    assert cfg.pool.handler_options == {}
    assert (cfg.pool.slots, cfg.pool.failure_policy, cfg.pool.payload) == (4096, "halt", "cbor")
    assert (cfg.pool.retry_limit, cfg.pool.retry_backoff_ms) == (3, 50.0)
    assert cfg.transport == config_mod.TransportConfig(
        runtime_dir="",
        batch_size=256,
        batch_linger_ms=0.5,
        max_inflight=16384,
        max_message_bytes=1_048_576,
    )
    assert cfg.supervisor.heartbeat_timeout_s == 10.0
    assert cfg.supervisor.restart_backoff_max_s == 2.0
    assert (cfg.ingress.endpoint, cfg.ingress.max_producers) == ("", 1024)
    assert cfg.ingress.max_pending_per_producer == 10_000
    assert cfg.control.endpoint == ""
    assert (cfg.metrics.enabled, cfg.metrics.host, cfg.metrics.port) == (False, "127.0.0.1", 9464)


def test_float_fields_hold_floats_and_int_fields_ints() -> None:
    cfg = load_config(env={}, overrides={"supervisor.ready_timeout_s": 5})
    assert cfg.supervisor.ready_timeout_s == 5.0
    assert type(cfg.supervisor.ready_timeout_s) is float
    for section in dataclasses.fields(cfg):
        if section.name == "source":
            continue
        sec = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(sec))
        for f in dataclasses.fields(sec):
            assert isinstance(getattr(sec, f.name), hints[f.name]), f.name


@pytest.mark.parametrize("path", [SHIPPED, EXAMPLE], ids=["shardpool.toml", "example-production"])
def test_shipped_files_load(path: Path) -> None:
    cfg = load_config(path, env={})
    assert cfg.source == str(path)
    assert cfg.pool.handler == "shardpool.demo.handler:LightningHandler"


def test_shipped_file_lists_every_key_and_matches_defaults() -> None:
    import tomllib

    data = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
    defaults = config_to_dict(load_config(env={}))
    assert set(data) == set(defaults)
    for section, values in defaults.items():
        assert set(data[section]) == set(values), section
        for key, value in values.items():
            if (section, key) != ("pool", "workers"):
                assert data[section][key] == value, f"{section}.{key}"
    assert data["pool"]["workers"] == "auto"


def test_production_example_lists_every_key() -> None:
    # It says it is a complete record of a deployment: a new key must appear there too.
    import tomllib

    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    for section, values in config_to_dict(load_config(env={})).items():
        assert set(data[section]) == set(values), section


def test_shipped_file_comments_every_key() -> None:
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            assert lines[i - 1].startswith("#"), f"key without a comment above it: {line}"


def test_example_production_is_tcp_loopback_with_metrics() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.ingress.endpoint.startswith("tcp://127.0.0.1:")
    assert cfg.metrics.enabled is True
    assert isinstance(cfg.pool.workers, int)
    assert "workers = " in EXAMPLE.read_text() and 'workers = "auto"' not in EXAMPLE.read_text()


# -------------------------------------------------------------------------------- file problems


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as exc:
        load_config(missing, env={})
    assert str(missing) in str(exc.value)
    assert "config file not found" in str(exc.value)


def test_bad_toml_names_file_and_position(tmp_path: Path) -> None:
    p = write(tmp_path, "[pool]\nworkers = 4\nslots = = 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    msg = str(exc.value)
    assert str(p) in msg and "invalid TOML" in msg
    assert "line 3" in msg


def test_unknown_section(tmp_path: Path) -> None:
    p = write(tmp_path, "[pol]\nworkers = 4\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    assert_problem(exc, "pol", {"workers": 4}, "unknown section", "pool, transport", "[pool]")


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    p = write(tmp_path, "pool = 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    assert_problem(exc, "pool", 3, "a table [pool]", "workers")


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    p = write(tmp_path, "[transport]\nbatch_sise = 64\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    assert_problem(
        exc,
        "transport.batch_sise",
        64,
        "unknown key",
        "batch_size, batch_linger_ms",
        "did you mean",
    )


# ------------------------------------------------------------------------------------ type rules


@pytest.mark.parametrize(
    ("toml_value", "value", "got"),
    [("4.0", 4.0, "float"), ('"4"', "4", "string"), ("true", True, "boolean")],
    ids=["float", "string", "bool"],
)
def test_wrong_type_for_int(tmp_path: Path, toml_value: str, value: Any, got: str) -> None:
    p = write(tmp_path, f"[transport]\nbatch_size = {toml_value}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    assert_problem(exc, "transport.batch_size", value, "an integer from 1 to 65536", got)


def test_bool_never_counts_as_int_even_via_overrides() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"pool.workers": True})
    assert_problem(exc, "pool.workers", True, "an integer from 1 to 1024")


def test_int_accepted_for_float(tmp_path: Path) -> None:
    p = write(tmp_path, "[transport]\nbatch_linger_ms = 2\n")
    cfg = load_config(p, env={})
    assert cfg.transport.batch_linger_ms == 2.0 and type(cfg.transport.batch_linger_ms) is float


def test_bool_rejected_for_float() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"transport.batch_linger_ms": False})
    assert_problem(exc, "transport.batch_linger_ms", False, "a number from 0 to 1000", "boolean")


def test_string_for_bool_rejected(tmp_path: Path) -> None:
    p = write(tmp_path, '[metrics]\nenabled = "yes"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    assert_problem(exc, "metrics.enabled", "yes", "true or false")


# ----------------------------------------------------------------------------------- range rules


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("pool.workers", 0, "an integer from 1 to 1024"),
        ("pool.workers", 1025, "an integer from 1 to 1024"),
        ("pool.slots", 0, "an integer from 1 to 1048576"),
        ("pool.retry_limit", -1, "an integer from 0 to 1000"),
        ("pool.retry_backoff_ms", 60000.5, "a number from 0 to 60000 (milliseconds)"),
        ("transport.batch_size", 65537, "an integer from 1 to 65536"),
        ("transport.batch_linger_ms", -0.1, "a number from 0 to 1000 (milliseconds)"),
        ("transport.max_message_bytes", 67_108_865, "an integer from 1 to 67108864"),
        ("supervisor.ready_timeout_s", 0.0, "a number > 0 and <= 600 (seconds)"),
        ("supervisor.heartbeat_interval_s", 61.0, "a number > 0 and <= 60 (seconds)"),
        ("supervisor.max_restarts", 10001, "an integer from 0 to 10000"),
        ("supervisor.restart_window_s", float("inf"), "a number > 0 and <= 86400"),
        ("ingress.max_producers", 0, "an integer from 1 to 1000000"),
        ("ingress.max_pending_per_producer", 0, "an integer from 1 to 10000000"),
        ("ingress.max_pending_per_producer", 10_000_001, "an integer from 1 to 10000000"),
        ("metrics.port", 65536, "an integer from 1 to 65535"),
        ("metrics.port", 0, "an integer from 1 to 65535"),
    ],
)
def test_out_of_range(key: str, value: Any, allowed: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={key: value})
    assert_problem(exc, key, value, allowed)
    assert "(got" not in problems_of(exc)[key][1]  # a range problem is not called a type problem


def test_out_of_range_in_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[transport]\nbatch_size = 0\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={})
    assert_problem(exc, "transport.batch_size", 0, "an integer from 1 to 65536")
    assert "transport.batch_size = 0: an integer from 1 to 65536" in str(exc.value)


def test_nan_rejected() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"supervisor.stop_timeout_s": float("nan")})
    assert "supervisor.stop_timeout_s = nan" in str(exc.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pool.failure_policy", "ignore"),
        ("pool.payload", "json"),
        ("pool.handler", "no_colon"),
        ("pool.handler", "mod:"),
        ("pool.handler", ":attr"),
        ("pool.handler", "a..b:c"),
        ("pool.handler", "a.b:c:d"),
        ("pool.handler", "class:X"),
        ("ingress.endpoint", "http://x"),
        ("ingress.endpoint", "tcp://127.0.0.1"),
        ("ingress.endpoint", "tcp://127.0.0.1:99999"),
        ("control.endpoint", "ipc://"),
        ("metrics.host", ""),
    ],
)
def test_bad_strings(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={key: value})
    assert_problem(exc, key, value)


def test_choice_message_lists_choices() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"pool.failure_policy": "ignore"})
    assert_problem(exc, "pool.failure_policy", "ignore", '"halt", "skip", "retry"')


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pool.handler", "my_pkg.handlers:Node.handle"),
        ("ingress.endpoint", "tcp://*:7400"),
        ("ingress.endpoint", "tcp://[::1]:7400"),
        ("ingress.endpoint", "tcp://127.0.0.1:*"),
        ("control.endpoint", "ipc:///run/shardpool/control.sock"),
    ],
)
def test_good_strings(key: str, value: str) -> None:
    cfg = load_config(env={}, overrides={key: value})
    section, _, name = key.partition(".")
    assert getattr(getattr(cfg, section), name) == value


def test_all_problems_collected_in_one_error(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "[pool]\nworkers = 0\nbogus = 1\n[transport]\nbatch_size = 2.5\n[metrics]\nport = 0\n[x]\n",
    )
    with pytest.raises(ConfigError) as exc:
        load_config(p, env={"SHARDPOOL_POOL_SLOTS": "0"})
    assert set(problems_of(exc)) == {
        "pool.workers",
        "pool.bogus",
        "transport.batch_size",
        "metrics.port",
        "x",
        "pool.slots",
    }
    assert len(str(exc.value).splitlines()) == 6


# ----------------------------------------------------------------------------- cross-field rules


def test_max_inflight_below_batch_size() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"transport.batch_size": 512, "transport.max_inflight": 100})
    assert_problem(exc, "transport.max_inflight", 100, "at least transport.batch_size", "512")


def test_heartbeat_timeout_not_above_interval() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(
            env={},
            overrides={"supervisor.heartbeat_interval_s": 2, "supervisor.heartbeat_timeout_s": 2},
        )
    assert_problem(
        exc, "supervisor.heartbeat_timeout_s", 2.0, "greater than supervisor.heartbeat_interval_s"
    )


def test_slots_below_workers() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"pool.workers": 8, "pool.slots": 4})
    assert_problem(exc, "pool.slots", 4, "at least pool.workers", "8")


def test_restart_backoff_max_below_backoff() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(
            env={},
            overrides={"supervisor.restart_backoff_s": 5, "supervisor.restart_backoff_max_s": 1},
        )
    assert_problem(exc, "supervisor.restart_backoff_max_s", 1.0, "supervisor.restart_backoff_s")


def test_cross_rule_skipped_when_a_side_is_invalid() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"transport.batch_size": 0, "transport.max_inflight": 1})
    assert list(problems_of(exc)) == ["transport.batch_size"]


# ----------------------------------------------------------------------------------------- auto


def test_auto_workers_uses_physical_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []

    def cpu_count(logical: bool = True) -> int:
        calls.append(logical)
        return 16 if logical else 7

    monkeypatch.setattr(psutil, "cpu_count", cpu_count)
    cfg = load_config(env={}, overrides={"pool.workers": "auto"})
    assert cfg.pool.workers == 7
    assert calls == [False]


def test_auto_workers_falls_back_to_logical_then_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 5 if logical else None)
    assert load_config(env={}).pool.workers == 5
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: None)
    assert load_config(env={}).pool.workers == 1


def test_auto_workers_matches_real_psutil() -> None:
    expected = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    assert load_config(env={}).pool.workers == min(expected, 1024)


def test_other_strings_are_not_auto() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"pool.workers": "AUTO"})
    assert_problem(exc, "pool.workers", "AUTO", '"auto"')


# ------------------------------------------------------------------------------------------ env


def test_env_overrides_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[pool]\nworkers = 2\n[transport]\nbatch_size = 128\n")
    cfg = load_config(
        p,
        env={
            "SHARDPOOL_POOL_WORKERS": "4",
            "SHARDPOOL_TRANSPORT_BATCH_SIZE": "64",
            "SHARDPOOL_TRANSPORT_BATCH_LINGER_MS": "2",
            "SHARDPOOL_METRICS_ENABLED": "true",
            "SHARDPOOL_METRICS_HOST": "localhost",  # not TOML: taken as a bare string
            "SHARDPOOL_TRANSPORT_RUNTIME_DIR": "1234",  # TOML int, but a string key: kept as text
            "SHARDPOOL_INGRESS_ENDPOINT": '"tcp://127.0.0.1:7400"',
            "SHARDPOOL_POOL_HANDLER_OPTIONS": '{ fee_ppm = 10, peers = ["a", "b"] }',
            "SHARDPOOL_CONFIG": "/ignored/by/load_config.toml",
            "PATH": "/usr/bin",
        },
    )
    assert cfg.pool.workers == 4
    assert cfg.transport.batch_size == 64
    assert cfg.transport.batch_linger_ms == 2.0
    assert cfg.metrics.enabled is True
    assert cfg.metrics.host == "localhost"
    assert cfg.transport.runtime_dir == "1234"
    assert cfg.ingress.endpoint == "tcp://127.0.0.1:7400"
    assert cfg.pool.handler_options == {"fee_ppm": 10, "peers": ("a", "b")}


def test_env_value_with_extra_lines_is_a_bare_string() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"SHARDPOOL_POOL_WORKERS": "4\nslots = 1"})
    assert_problem(exc, "pool.workers", "4\nslots = 1", "SHARDPOOL_POOL_WORKERS")


def test_env_section_and_key_case_insensitive() -> None:
    cfg = load_config(env={"SHARDPOOL_Pool_Workers": "3", "SHARDPOOL_pool_slots": "9"})
    assert (cfg.pool.workers, cfg.pool.slots) == (3, 9)


def test_env_auto_workers_as_bare_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 2)
    p = Path(EXAMPLE)
    assert load_config(p, env={"SHARDPOOL_POOL_WORKERS": "auto"}).pool.workers == 2


def test_env_bad_value_names_variable_and_key() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"SHARDPOOL_TRANSPORT_BATCH_SIZE": "lots"})
    assert_problem(
        exc, "transport.batch_size", "lots", "an integer", "SHARDPOOL_TRANSPORT_BATCH_SIZE"
    )


def test_env_float_for_int_reported() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"SHARDPOOL_POOL_WORKERS": "2.5"})
    assert_problem(exc, "pool.workers", 2.5, "float", "environment variable SHARDPOOL_POOL_WORKERS")


@pytest.mark.parametrize(
    ("var", "fragment"),
    [
        ("SHARDPOOL_POOL_WORKRS", "unknown key in [pool]"),
        ("SHARDPOOL_NOPE_X", "unknown section [nope]"),
        ("SHARDPOOL_POOL", "unknown key in [pool]"),
    ],
)
def test_env_unknown_names_variable(var: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={var: "1"})
    assert_problem(exc, var, "1", fragment, "SHARDPOOL_<SECTION>_<KEY>")


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDPOOL_SUPERVISOR_MAX_RESTARTS", "7")
    assert load_config().supervisor.max_restarts == 7


# ------------------------------------------------------------------------------------ overrides


def test_overrides_win_over_env_and_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[pool]\nworkers = 2\n")
    cfg = load_config(p, env={"SHARDPOOL_POOL_WORKERS": "3"}, overrides={"pool.workers": 5})
    assert cfg.pool.workers == 5


def test_overrides_bad_value_says_where_it_came_from() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"metrics.port": "9464"})
    assert_problem(exc, "metrics.port", "9464", "string", "overrides")


@pytest.mark.parametrize(
    ("key", "fragment"),
    [("pool", "dotted"), ("nope.x", "unknown section"), ("pool.x", "unknown key in [pool]")],
)
def test_overrides_unknown_key(key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={key: 1})
    assert_problem(exc, key, 1, fragment)


def test_with_overrides_revalidates_and_keeps_source() -> None:
    base = load_config(SHIPPED, env={}, overrides={"pool.workers": 2})
    cfg = with_overrides(base, {"pool.workers": 4, "transport.batch_size": 32})
    assert (cfg.pool.workers, cfg.transport.batch_size) == (4, 32)
    assert cfg.source == str(SHIPPED)
    assert base.pool.workers == 2  # the original is untouched
    with pytest.raises(ConfigError) as exc:
        with_overrides(base, {"pool.slots": 1})
    assert_problem(exc, "pool.slots", 1, "at least pool.workers")


def test_config_from_dict() -> None:
    cfg = config_from_dict({"pool": {"workers": 3}})
    assert cfg.pool.workers == 3 and cfg.source == "<dict>"
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"pool": {"workers": "x"}})
    assert_problem(exc, "pool.workers", "x")


# ---------------------------------------------------------------------------------- immutability


def test_frozen() -> None:
    cfg = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.pool.workers = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.pool = PoolConfig()  # type: ignore[misc]


def test_handler_options_read_only_hashable_picklable(tmp_path: Path) -> None:
    p = write(tmp_path, '[pool]\nhandler_options = { fee_ppm = 10, peers = ["a"], t = {x = 1} }\n')
    cfg = load_config(p, env={})
    opts = cfg.pool.handler_options
    assert isinstance(opts, FrozenDict)
    with pytest.raises(TypeError):
        opts["fee_ppm"] = 11  # type: ignore[index]
    assert dict(opts) == {"fee_ppm": 10, "peers": ("a",), "t": {"x": 1}}
    assert opts.thaw() == {"fee_ppm": 10, "peers": ["a"], "t": {"x": 1}}
    assert hash(cfg) == hash(pickle.loads(pickle.dumps(cfg)))
    assert pickle.loads(pickle.dumps(cfg)) == cfg

    def factory(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    assert factory(**opts)["fee_ppm"] == 10


def test_handler_options_must_be_table() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"pool.handler_options": [1, 2]})
    assert_problem(exc, "pool.handler_options", [1, 2], "table", "array")


def test_direct_construction_and_replace_validate() -> None:
    with pytest.raises(ConfigError) as exc:
        PoolConfig(workers=0)
    assert exc.value.key == "pool.workers"
    pool = PoolConfig(workers=2)
    assert dataclasses.replace(pool, slots=8).slots == 8
    with pytest.raises(ConfigError):
        dataclasses.replace(pool, slots=1)
    assert Config().pool.handler == pool.handler


# --------------------------------------------------------------------------------- path & output


def test_find_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_config_path(None, env={}) is None
    assert find_config_path("x.toml", env={"SHARDPOOL_CONFIG": "y.toml"}) == Path("x.toml")
    assert find_config_path(None, env={"SHARDPOOL_CONFIG": "y.toml"}) == Path("y.toml")
    (tmp_path / "config").mkdir()
    DEFAULT_CONFIG_PATH.write_text("")
    assert find_config_path(None, env={}) == DEFAULT_CONFIG_PATH
    monkeypatch.setenv("SHARDPOOL_CONFIG", "z.toml")
    assert find_config_path(None) == Path("z.toml")


def test_config_to_dict_is_plain_and_json_serialisable() -> None:
    cfg = load_config(env={}, overrides={"pool.handler_options": {"a": [1, {"b": 2}]}})
    d = config_to_dict(cfg)
    assert d["pool"]["handler_options"] == {"a": [1, {"b": 2}]}
    assert type(d["pool"]["handler_options"]) is dict
    assert json.loads(json.dumps(d)) == d


def test_config_to_toml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        env={},
        overrides={
            "pool.workers": 3,
            "pool.handler_options": {"a b": 'q"uote\\', "n": [1.5, True], "t": {"x": 1}},
            "transport.runtime_dir": "/tmp/ü\tx",
            "metrics.enabled": True,
        },
    )
    p = write(tmp_path, config_to_toml(cfg))
    assert load_config(p, env={}) == cfg


def test_failure_policy_by_type_accepts_policies_and_names_a_bad_one() -> None:
    cfg = load_config(None, env={}, overrides={"pool.failure_policy_by_type": {"fee": "skip"}})
    assert dict(cfg.pool.failure_policy_by_type) == {"fee": "skip"}
    with pytest.raises(ConfigError) as info:
        load_config(None, env={}, overrides={"pool.failure_policy_by_type": {"fee": "ignore"}})
    assert info.value.key == "pool.failure_policy_by_type"
    assert "'ignore'" in str(info.value) and '"halt", "skip" or "retry"' in str(info.value)
