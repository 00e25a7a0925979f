"""Dead letters: a durable record of the messages that ended failed under the ``skip`` policy
or skipped by an operator (``[deadletters]`` in the config; off by default).

* :class:`DeadLetterStore` is the SQLite file (WAL; one table, ``id`` in arrival order), bounded
  by ``max_entries``: past it the oldest entries are dropped and counted.
* :class:`DeadLetters` is what the front calls, with its lock held, for every such failure:
  :meth:`DeadLetters.record` only appends to a list; a background thread writes the entries in
  batches, so the front's I/O thread never waits on the disk. A failed write is logged
  (rate-limited) and counted, never fatal.
* :func:`replay` re-submits stored entries through a pool in id order (so per channel in their
  original order) and removes each once its new message is answered ok; one that fails again
  stays, with the new error.

The payload stored is what the producer sent (the CBOR bytes), so a replay submits exactly that.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .config import Config
from .control import BadRequest
from .errors import ConfigError, HandlerError
from .ratelog import RateLimitedLog
from .security import runtime_dir

__all__ = [
    "DEFAULT_FILENAME",
    "DeadLetter",
    "DeadLetterStore",
    "DeadLetters",
    "ReplayWaiter",
    "list_entries",
    "open_sink",
    "purge_entries",
    "replay",
    "replay_entries",
]

log = logging.getLogger("shardpool.deadletters")

DEFAULT_FILENAME = "shardpool-deadletters.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    channel BLOB NOT NULL,
    seq INTEGER NOT NULL,
    payload BLOB NOT NULL,
    error_type TEXT NOT NULL,
    error TEXT NOT NULL,
    action TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_channel ON dead_letters (channel, id);
"""
_COLUMNS = "id, time, channel, seq, payload, error_type, error, action"


@dataclass(frozen=True)
class DeadLetter:
    """One stored entry (``id`` is 0 until written)."""

    id: int
    time: float
    channel: bytes
    seq: int
    payload: bytes
    error_type: str
    error: str
    action: str

    def to_json(self) -> dict[str, Any]:
        """Plain values (channel and payload in hex), as ``dead-letters list --json`` prints."""
        return {
            "id": self.id,
            "time": self.time,
            "channel": self.channel.hex(),
            "seq": self.seq,
            "payload": self.payload.hex(),
            "error_type": self.error_type,
            "error": self.error,
            "action": self.action,
        }


def _row(row: tuple[Any, ...]) -> DeadLetter:
    return DeadLetter(
        int(row[0]), float(row[1]), bytes(row[2]), int(row[3]), bytes(row[4]),
        str(row[5]), str(row[6]), str(row[7]),
    )


class DeadLetterStore:
    """The SQLite file (thread-safe: one connection behind a lock).

    Raises:
        sqlite3.Error / OSError: on construction, when the file cannot be opened or created.
    """

    def __init__(self, path: str | Path, max_entries: int) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self.dropped = 0  # entries dropped to keep the bound, since this store was opened
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.commit()
        (stored,) = self._db.execute("SELECT count(*) FROM dead_letters").fetchone()
        self._count = int(stored)  # kept in step by every change: status reads it often
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    def close(self) -> None:
        """Close the file (what was written stays)."""
        with self._lock:
            self._db.close()

    def add(self, entries: Iterable[DeadLetter]) -> int:
        """Append ``entries`` (in order), then drop the oldest past the bound; returns how many
        were dropped."""
        rows = [
            (e.time, e.channel, e.seq, e.payload, e.error_type, e.error, e.action) for e in entries
        ]
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO dead_letters (time, channel, seq, payload, error_type, error, action)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            excess = max(0, self._count + len(rows) - self.max_entries)
            if excess:
                self._db.execute(
                    "DELETE FROM dead_letters WHERE id IN "
                    "(SELECT id FROM dead_letters ORDER BY id LIMIT ?)",
                    (excess,),
                )
            self._count += len(rows) - excess
            self.dropped += excess
        return excess

    def entries(
        self, channel: bytes | None = None, ids: Iterable[int] | None = None, limit: int = 0
    ) -> list[DeadLetter]:
        """Stored entries in id order: all, one channel's, or those of ``ids`` (at most
        ``limit`` when above 0)."""
        sql = f"SELECT {_COLUMNS} FROM dead_letters"
        where: list[str] = []
        params: list[Any] = []
        if channel is not None:
            where.append("channel = ?")
            params.append(channel)
        if ids is not None:
            wanted = sorted(set(ids))
            where.append(f"id IN ({', '.join('?' * len(wanted))})" if wanted else "0")
            params.extend(wanted)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        if limit > 0:
            sql += " LIMIT ?"
            params.append(limit)
        with self._lock:
            return [_row(r) for r in self._db.execute(sql, params).fetchall()]

    def count(self) -> int:
        """How many entries are stored."""
        return self._count

    def remove(self, ids: Iterable[int]) -> int:
        """Delete the entries of ``ids``; returns how many there were."""
        rows = [(i,) for i in ids]
        with self._lock, self._db:
            before = self._db.total_changes
            self._db.executemany("DELETE FROM dead_letters WHERE id = ?", rows)
            removed = self._db.total_changes - before
            self._count -= removed
            return removed

    def set_error(self, entry_id: int, error_type: str, error: str, action: str) -> None:
        """Record the newest error of an entry (a replay that failed again)."""
        with self._lock, self._db:
            self._db.execute(
                "UPDATE dead_letters SET time = ?, error_type = ?, error = ?, action = ? "
                "WHERE id = ?",
                (time.time(), error_type, error, action, entry_id),
            )

    def purge(self, channel: bytes | None = None) -> int:
        """Delete every entry (or one channel's); returns how many."""
        with self._lock, self._db:
            if channel is None:
                cur = self._db.execute("DELETE FROM dead_letters")
            else:
                cur = self._db.execute("DELETE FROM dead_letters WHERE channel = ?", (channel,))
            self._count -= cur.rowcount
            return cur.rowcount


class ReplayWaiter:
    """The ``on_done`` of a replayed message: the front does not record its failure as a new
    dead letter (the entry it came from stays, with the new error)."""

    def __init__(self, entry_id: int) -> None:
        self.entry_id = entry_id
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def __call__(self, value: Any, error: BaseException | None) -> None:
        if self.future.done():
            return  # the halt notice came first
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(value)


    def halted(self, error: HandlerError) -> None:
        """Its channel halted on it (halt policy): counted as failed again at once."""
        if not self.future.done():
            self.future.set_exception(error)


class DeadLetters:
    """The front's sink: :meth:`record` (front lock held) queues; a thread writes in batches."""

    def __init__(self, store: DeadLetterStore, retry_s: float = 1.0) -> None:
        self.store = store
        self.write_errors = 0
        self._pending: list[DeadLetter] = []
        self._cv = threading.Condition()
        self._writing = False
        self._closed = False
        self._retry_s = retry_s
        self._log = RateLimitedLog(log, 30.0)
        self._thread = threading.Thread(target=self._run, name="shardpool-deadletters", daemon=True)
        self._thread.start()

    def record(
        self,
        channel: bytes,
        seq: int,
        payload: Any,
        error_type: str,
        error: str,
        action: str,
        waiter: Any = None,
    ) -> None:
        """Queue one entry (never blocks on the disk); a replayed message's failure
        (``waiter`` a :class:`ReplayWaiter`) is not recorded again."""
        if isinstance(waiter, ReplayWaiter) or not isinstance(payload, bytes):
            return
        entry = DeadLetter(0, time.time(), channel, seq, payload, error_type, error, str(action))
        with self._cv:
            self._pending.append(entry)
            self._cv.notify()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until what was recorded so far is written (or given up); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending or self._writing:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    def figures(self) -> dict[str, Any]:
        """``{"count", "dropped", "write_errors", "path"}`` for status and metrics (``count``:
        entries stored, those still queued for the writer included)."""
        with self._cv:
            queued = len(self._pending)
        return {
            "count": self.store.count() + queued,
            "dropped": self.store.dropped,
            "write_errors": self.write_errors,
            "path": str(self.store.path),
        }

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (within ``timeout``), stop the thread, close the file."""
        self.flush(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.store.close()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
                self._writing = True
            self._write(batch)
            with self._cv:
                self._writing = False
                self._cv.notify_all()

    def _write(self, batch: list[DeadLetter]) -> None:
        try:
            self.store.add(batch)
        except (sqlite3.Error, OSError) as exc:
            self.write_errors += 1
            self._log.error(
                "write", "dead-letter store %s: %d entries not written: %r",
                self.store.path, len(batch), exc,
            )


class Submitter(Protocol):
    """What :func:`replay` submits through (a :class:`~shardpool.pool.ShardPool`)."""

    def submit_bytes(
        self, channel_id: bytes, payload: bytes, *, block: bool = ..., on_done: Any = ...
    ) -> int: ...


def replay(
    pool: Submitter,
    sink: DeadLetters,
    *,
    channel: bytes | None = None,
    ids: Iterable[int] | None = None,
    timeout: float = 60.0,
    stopping: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Re-submit the stored entries (all, one channel's, or those of ``ids``) in id order; each
    answered ok is removed, each that fails again keeps its entry with the new error. Waits up to
    ``timeout`` seconds for the answers; those still open then stay stored (``pending``).

    Returns ``{"submitted", "replayed", "failed", "pending", "errors": [{"id", "error"}]}``."""
    sink.flush()
    entries = sink.store.entries(channel=channel, ids=ids)
    waiters: list[ReplayWaiter] = []
    errors: list[dict[str, Any]] = []
    for entry in entries:
        waiter = ReplayWaiter(entry.id)
        try:
            pool.submit_bytes(entry.channel, entry.payload, on_done=waiter)
        except Exception as exc:  # noqa: BLE001 - pool closed, draining: the rest stay stored
            errors.extend({"id": e.id, "error": f"not submitted: {exc}"}
                          for e in entries[len(waiters):])
            break
        waiters.append(waiter)
    deadline = time.monotonic() + timeout
    done: list[int] = []
    pending = 0
    for waiter in waiters:
        left = max(0.0, deadline - time.monotonic())
        try:
            waiter.future.result(0.0 if stopping() else left)
        except concurrent.futures.TimeoutError:
            pending += 1
        except HandlerError as exc:
            sink.store.set_error(waiter.entry_id, exc.exc_type, str(exc), str(exc.policy))
            errors.append({"id": waiter.entry_id, "error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - handed back unfinished, pool closed, ...
            errors.append({"id": waiter.entry_id, "error": str(exc)})
        else:
            done.append(waiter.entry_id)
    sink.store.remove(done)
    return {
        "submitted": len(entries),
        "replayed": len(done),
        "failed": len(errors),
        "pending": pending,
        "errors": errors,
    }


def open_sink(cfg: Config, env: Mapping[str, str] | None = None) -> DeadLetters | None:
    """The sink ``[deadletters]`` asks for (None when off): ``path``, or
    :data:`DEFAULT_FILENAME` in the runtime directory.

    Raises:
        ConfigError: the store cannot be opened (naming ``deadletters.path``).
    """
    section = cfg.deadletters
    if not section.enabled:
        return None
    path = Path(section.path) if section.path else runtime_dir(cfg, env) / DEFAULT_FILENAME
    try:
        store = DeadLetterStore(path, section.max_entries)
    except (sqlite3.Error, OSError) as exc:
        raise ConfigError(
            f"deadletters.path: the dead-letter store {str(path)!r} cannot be opened: {exc}"
        ) from exc
    return DeadLetters(store)


def _channel_arg(args: Mapping[str, Any]) -> bytes | None:
    text = args.get("channel")
    if text is None:
        return None
    try:
        if not isinstance(text, str):
            raise ValueError
        return bytes.fromhex(text)
    except ValueError:
        raise BadRequest(f"channel must be a channel id in hex, got {text!r}") from None


def _ids_arg(args: Mapping[str, Any]) -> list[int] | None:
    ids = args.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids
    ):
        raise BadRequest(f"ids must be a list of entry ids (1 or more), got {ids!r}")
    return ids


def _count_arg(args: Mapping[str, Any], key: str, default: float) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise BadRequest(f"{key} must be a number, 0 or more, got {value!r}")
    return value


def list_entries(sink: DeadLetters, args: Mapping[str, Any]) -> dict[str, Any]:
    """The control op ``dead-letters`` with ``action: list``: ``{"entries", "count",
    "dropped", "write_errors", "path"}``."""
    sink.flush()
    channel = _channel_arg(args)
    limit = int(_count_arg(args, "limit", 0))
    entries = sink.store.entries(channel=channel, ids=_ids_arg(args), limit=limit)
    return {"entries": [e.to_json() for e in entries], **sink.figures()}


def purge_entries(sink: DeadLetters, args: Mapping[str, Any]) -> dict[str, Any]:
    """``action: purge``: one channel's entries (``channel``) or, with ``all``, every one."""
    sink.flush()
    channel = _channel_arg(args)
    if channel is None and args.get("all") is not True:
        raise BadRequest("purge needs a channel or all: true")
    return {"purged": sink.store.purge(channel)}


def replay_entries(
    pool: Submitter, sink: DeadLetters, args: Mapping[str, Any],
    stopping: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """``action: replay`` (see :func:`replay`), waiting up to ``timeout`` seconds (default 60)."""
    timeout = _count_arg(args, "timeout", 60.0)
    return replay(
        pool, sink, channel=_channel_arg(args), ids=_ids_arg(args), timeout=float(timeout),
        stopping=stopping,
    )
