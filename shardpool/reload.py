"""What ``shardpool run`` does on SIGHUP (re-read the config) and SIGUSR1 (reopen log files).

SIGHUP: the config is loaded again from where it came from (:func:`plan_reload` compares it with
the running one). Keys in :data:`LIVE_KEYS` are applied at once: the front reads them afresh
each time it uses them (levelling at each period, a move when it starts, the drain deadline at
shutdown), so the running configuration is replaced by a copy with only those keys changed,
under the front's lock. Every other changed key is logged as needing a restart and is *not*
applied: the workers (and any restarted one) keep the configuration they were started with, so
a worker restarted later never runs with settings its siblings do not have. A config that does
not validate changes nothing. Handler *code* is never reloaded: a new handler version needs a
restart (the rolling reload of workers is not implemented).

SIGUSR1: every :class:`logging.FileHandler` is reopened (logrotate's ``postrotate``). The
``shardpool`` command itself logs to stderr only (the journal under systemd), so there it only
logs that it was asked; a program that adds file handlers gets them reopened.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

from .config import Config

__all__ = ["LIVE_KEYS", "ReloadPlan", "plan_reload", "reopen_log_files"]

LIVE_KEYS: frozenset[str] = frozenset(
    {
        "pool.rebalance",
        "pool.rebalance_threshold",
        "pool.rebalance_grace_s",
        "pool.hot_channel_share",
        "pool.move_timeout_s",
        "supervisor.stop_timeout_s",
    }
)
"""Dotted keys a SIGHUP applies to a running backend (see the module docstring)."""

RESTART_HINTS: dict[str, str] = {
    "pool.workers": "or change the count live with `shardpool resize N` / SIGTTIN / SIGTTOU",
    "pool.handler": "handler changes need a restart; workers are not reloaded one by one",
    "pool.handler_options": "handler changes need a restart; workers are not reloaded one by one",
}
"""An extra word for some keys that need a restart."""


class Change(NamedTuple):
    """One key whose value differs between the running and the re-read config."""

    key: str  # dotted, e.g. "pool.rebalance"
    old: Any
    new: Any


class ReloadPlan(NamedTuple):
    """The outcome of comparing a re-read config with the running one."""

    applied: list[Change]  # live keys: in ``effective``
    restart: list[Change]  # need a restart: not in ``effective``
    effective: Config  # the running config with the live changes applied

    def log(self, logger: logging.Logger) -> None:
        """One line per changed key, as applied or as needing a restart."""
        for c in self.applied:
            logger.info("reload: %s = %r (was %r): applied", c.key, c.new, c.old)
        for c in self.restart:
            hint = RESTART_HINTS.get(c.key)
            logger.warning(
                "reload: %s = %r (was %r): needs a restart, not applied%s",
                c.key,
                c.new,
                c.old,
                f" ({hint})" if hint else "",
            )


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    """Compare ``new`` with ``running``, key by key: live keys go into the effective config,
    others are listed as needing a restart (and left as they run)."""
    applied: list[Change] = []
    restart: list[Change] = []
    sections: dict[str, Any] = {}
    for sf in dataclasses.fields(running):
        if sf.name == "source":
            continue
        old_sec, new_sec = getattr(running, sf.name), getattr(new, sf.name)
        live: dict[str, Any] = {}
        for kf in dataclasses.fields(old_sec):
            old, value = getattr(old_sec, kf.name), getattr(new_sec, kf.name)
            if old == value:
                continue
            key = f"{sf.name}.{kf.name}"
            change = Change(key, _plain(old), _plain(value))
            if key in LIVE_KEYS:
                applied.append(change)
                live[kf.name] = value
            else:
                restart.append(change)
        if live:
            # Validated as part of ``new`` already; replace() runs the section's checks again.
            sections[sf.name] = dataclasses.replace(old_sec, **live)
    effective = dataclasses.replace(running, **sections) if sections else running
    return ReloadPlan(applied, restart, effective)


def _plain(value: Any) -> Any:
    thaw = getattr(value, "thaw", None)
    return thaw() if callable(thaw) else value


def reopen_log_files(loggers: Iterable[logging.Logger] | None = None) -> list[str]:
    """Reopen the file of every :class:`logging.FileHandler` of ``loggers`` (default: the root
    logger and every logger created so far), so that a rotated file is let go and a new one
    written. Returns the paths reopened; a file that cannot be reopened is logged and its handler
    keeps the old one."""
    if loggers is None:
        manager = logging.Logger.manager
        found = [x for x in manager.loggerDict.values() if isinstance(x, logging.Logger)]
        loggers = [logging.getLogger(), *found]
    seen: set[int] = set()
    reopened: list[str] = []
    for logger in loggers:
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler) or id(handler) in seen:
                continue
            seen.add(id(handler))
            if "w" in handler.mode:
                handler.mode = handler.mode.replace("w", "a")  # never truncate on reopen
            try:
                stream = handler._open()
            except OSError as exc:
                logging.getLogger("shardpool.service").error(
                    "SIGUSR1: cannot reopen log file %s: %s", handler.baseFilename, exc
                )
                continue
            old = handler.setStream(stream)
            if old is not None:
                old.close()
            reopened.append(handler.baseFilename)
    return reopened
