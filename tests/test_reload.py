"""SIGHUP's comparison of a re-read config with the running one, applying it to a pool, and
SIGUSR1's reopening of log files (unit level; the signals themselves: test_signals.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shardpool.config import config_from_dict
from shardpool.reload import LIVE_KEYS, plan_reload, reopen_log_files


def test_live_keys_are_applied_and_the_rest_need_a_restart() -> None:
    running = config_from_dict({"pool": {"workers": 2, "rebalance": "advise"}})
    new = config_from_dict(
        {
            "pool": {"workers": 4, "rebalance": "auto", "rebalance_threshold": 0.3},
            "supervisor": {"stop_timeout_s": 20.0},
            "transport": {"batch_size": 64},
        }
    )
    plan = plan_reload(running, new)
    assert {c.key for c in plan.applied} == {
        "pool.rebalance", "pool.rebalance_threshold", "supervisor.stop_timeout_s"
    }
    assert {c.key for c in plan.restart} == {"pool.workers", "transport.batch_size"}
    eff = plan.effective
    assert eff.pool.rebalance == "auto" and eff.pool.rebalance_threshold == 0.3
    assert eff.supervisor.stop_timeout_s == 20.0
    # Not applied: the running values stay.
    assert eff.pool.workers == 2 and eff.transport.batch_size == running.transport.batch_size
    assert plan_reload(eff, eff).applied == [] and plan_reload(eff, eff).restart == []
    assert all(k.partition(".")[0] in ("pool", "supervisor") for k in LIVE_KEYS)


def test_plan_logs_each_changed_key(caplog: pytest.LogCaptureFixture) -> None:
    running = config_from_dict({"pool": {"workers": 2}})
    new = config_from_dict({"pool": {"workers": 2, "rebalance": "off",
                                     "handler": "service_handlers:ordered"}})
    with caplog.at_level(logging.INFO, logger="test.reload"):
        plan_reload(running, new).log(logging.getLogger("test.reload"))
    text = caplog.text
    assert "pool.rebalance = 'off' (was 'advise'): applied" in text
    assert "pool.handler = 'service_handlers:ordered'" in text
    assert "needs a restart, not applied (handler changes need a restart" in text


def test_reopen_log_files_lets_a_rotated_file_go(tmp_path: Path) -> None:
    path = tmp_path / "backend.log"
    logger = logging.getLogger(f"test.reopen.{id(tmp_path)}")
    logger.propagate = False
    handler = logging.FileHandler(path, mode="w")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("before")
        path.rename(tmp_path / "backend.log.1")  # logrotate
        assert reopen_log_files([logger]) == [str(path)]
        logger.info("after")
        handler.flush()
        assert "before" in (tmp_path / "backend.log.1").read_text()
        assert path.read_text() == "after\n"
        assert reopen_log_files([logger, logger]) == [str(path)]  # once per handler
        assert path.read_text() == "after\n"  # reopened for appending, never truncated
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert reopen_log_files([logging.getLogger("test.reopen.none")]) == []


@pytest.mark.multiprocess
def test_a_pool_takes_live_keys_and_refuses_the_others(tmp_path: Path) -> None:
    from service_handlers import in_process_backend

    from shardpool.config import with_overrides

    with in_process_backend(tmp_path, pool={"workers": 1, "rebalance": "advise"}) as svc:
        pool = svc.pool
        with pytest.raises(ValueError, match="pool.retry_limit"):
            pool.apply_live_config(with_overrides(pool.config, {"pool.retry_limit": 9}))
        assert pool.placement()["levelling"]["mode"] == "advise"
        pool.apply_live_config(with_overrides(pool.config, {"pool.rebalance": "off"}))
        assert pool.placement()["levelling"]["mode"] == "off"
        assert pool.config.pool.rebalance == "off"
