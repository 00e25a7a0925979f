"""How ``shardpool run`` logs: ``--log-format text`` (the default, one human-readable line per
record) or ``--log-format json`` (one JSON object per line, for log shippers).

A JSON line has these keys, always, in this order:

* ``ts`` — when, ISO 8601 in UTC with milliseconds (``2026-11-28T13:20:01.123Z``);
* ``level`` — ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or ``CRITICAL``;
* ``logger`` — the logger's name (``shardpool.service``, ``shardpool.demo.load``, ...);
* ``message`` — the formatted message;
* ``pid`` — the process id;

then ``exc`` (the traceback text) when the record has one, ``stack`` when a stack was asked for,
and every ``extra`` field the log call passed (``log.info("...", extra={"worker": 2})`` →
``"worker": 2``; values JSON cannot hold are written as their ``str()``; an extra named like one of
the keys above is written as ``extra_<name>`` so the stable keys always mean the same).

In JSON mode every line on the backend's stderr is such an object: uncaught exceptions (of any
thread) and Python warnings go through logging, and anything else written to ``sys.stderr`` (a
start-up error message, for one) becomes one ``ERROR`` record per line from the logger
``shardpool.stderr``. Output a handler writes straight to file descriptor 2 inside a worker
process is not Python's ``sys.stderr`` of this process and is left as it is.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

__all__ = ["LOG_FORMATS", "STABLE_KEYS", "TEXT_FORMAT", "JsonFormatter", "configure_logging"]

LOG_FORMATS = ("text", "json")
"""What ``--log-format`` accepts."""
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
"""The text format's line layout."""
STABLE_KEYS = ("ts", "level", "logger", "message", "pid", "exc", "stack")
"""Keys a JSON line may have besides the ``extra`` fields (``exc``, ``stack``: only when set)."""

# Attributes every LogRecord has: anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message or the traceback are
    escaped by JSON): see the module's docstring for the keys."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process if record.process is not None else os.getpid(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key in _RECORD_ATTRS or key.startswith("_"):
                continue
            doc[f"extra_{key}" if key in STABLE_KEYS else key] = value
        return json.dumps(doc, ensure_ascii=False, default=str)


class _StderrLines(io.TextIOBase):
    """Stands in for ``sys.stderr`` in JSON mode: each line written becomes one ``ERROR``
    record of ``logger`` (so even a plain ``print(..., file=sys.stderr)`` comes out as JSON)."""

    def __init__(self, logger: logging.Logger, real: TextIO) -> None:
        super().__init__()
        self._logger = logger
        self._real = real
        self._buf = ""
        self._lock = threading.Lock()
        self._inside = threading.local()

    def write(self, s: str) -> int:
        if getattr(self._inside, "active", False):
            # Logging itself complaining (Handler.handleError): straight out, no loop.
            self._real.write(s)
            return len(s)
        with self._lock:
            self._buf += s
            *lines, self._buf = self._buf.split("\n")
        self._inside.active = True
        try:
            for line in lines:
                if line.strip():
                    self._logger.error(line.rstrip())
        finally:
            self._inside.active = False
        return len(s)

    def flush(self) -> None:
        with self._lock:
            rest, self._buf = self._buf, ""
        if rest.strip():
            self.write(rest + "\n")

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._real.fileno()


def configure_logging(level: str, fmt: str = "text") -> Callable[[], None]:
    """Log records at ``level`` and above to stderr, as ``fmt`` (``text`` or ``json``). In JSON
    mode also route uncaught exceptions, warnings and other stderr writes through logging.
    Returns a function that puts ``sys.stderr`` and the exception hooks back (the handler
    stays, as :func:`logging.basicConfig`'s does).

    Raises:
        ValueError: ``fmt`` is not one of :data:`LOG_FORMATS`.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    real = sys.stderr
    handler = logging.StreamHandler(real)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    if fmt == "text":
        return lambda: None

    log = logging.getLogger("shardpool")
    old_hook, old_thread_hook = sys.excepthook, threading.excepthook

    def excepthook(
        kind: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        log.critical("uncaught exception: %s", exc, exc_info=(kind, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        exc = args.exc_value if args.exc_value is not None else args.exc_type()
        log.critical("uncaught exception in thread %s: %s", name, exc,
                     exc_info=(args.exc_type, exc, args.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_hook
    logging.captureWarnings(True)
    sys.stderr = _StderrLines(logging.getLogger("shardpool.stderr"), real)

    def restore() -> None:
        stray = sys.stderr
        if isinstance(stray, _StderrLines):
            stray.flush()
        sys.stderr = real
        sys.excepthook, threading.excepthook = old_hook, old_thread_hook
        logging.captureWarnings(False)

    return restore
