"""Loading user handlers: ``"module:attr"`` or an object, normalised into one :class:`HandlerSpec`.

A handler is called as ``handle(channel, seq, message, redelivered)`` where ``channel`` is the
per-channel :class:`Channel` (``channel.id`` and a free ``channel.state`` slot), ``seq`` the
per-channel sequence number, ``message`` the decoded payload and ``redelivered`` is True when the
message is re-sent after a worker crash (it may have been handled before: use ``seq`` to tell).
It may be a plain or an ``async`` function. The target may be:

* a function — used as is;
* a class — instantiated once per worker with ``handler_options`` as keyword arguments;
* an object with a ``handle`` method.

An object (or class instance) may define ``setup(worker_index)`` and ``teardown()``, called once
per worker process (either may be ``async``).

When the pool moves a channel to another worker (a resize, load levelling, a pin), its state goes
with it. For a handler without hooks that is ``channel.state``, CBOR-encoded: keep it
to CBOR-encodable values (dicts, lists, bytes, str, ints, floats, bools, None) or the move is
refused, naming the channel and the type. A class handler may instead define
``snapshot(channel) -> bytes | None`` and ``restore(channel, data)``: ``snapshot`` runs on the old
worker once the channel is idle, ``restore`` on the new one before the channel's next message.
The default ``pool.move_state = "auto"`` uses the hooks when the handler has both, else
``"cbor"``; ``"hooks"`` insists on them (a worker without both fails to start), ``"cbor"`` ignores
them. With ``"none"`` a move drops handler state, as a crash does.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

HandleFn = Callable[[Any, int, Any, bool], Any]


class Channel:
    """What the handler sees of one channel: its ``id``, a ``state`` slot it may use freely, and
    :meth:`end`.

    The worker also keeps its queue and order-check bookkeeping here (underscore attributes).
    """

    __slots__ = (
        "id",
        "state",
        "_queue",
        "_busy",
        "_halted",
        "_expect",
        "_first",
        "_mark",
        "_idle_sweeps",
        "_ending",
        "_ended",
        "_slot",
        "_reported",
    )

    def __init__(self, channel_id: bytes, ended: list[Channel] | None = None) -> None:
        self.id = channel_id
        self.state: Any = None
        # None exactly while the channel is idle and not halted (the worker's inline fast path);
        # otherwise the deque of messages waiting their turn, the one in progress first.
        self._queue: Any = None
        self._busy = False  # a handler call (or a retry wait) is in progress
        self._halted = False  # parked after a failure under the halt policy
        self._expect = -1  # next expected cseq; -1 until the first message of this incarnation
        self._first = 0  # first cseq seen by this incarnation (messages seen = _expect - _first)
        self._mark = -2  # _expect at the last idle sweep (see Worker._sweep)
        self._idle_sweeps = 0
        self._ending = False
        self._ended = ended  # the worker's list of ended channels (None outside a worker)
        self._slot = -1  # its routing slot (set by the worker)
        self._reported = 0  # messages seen (_expect - _first) at the last load report

    def end(self) -> None:
        """Say this channel is over (closed on chain, forgotten by the node): once its last
        queued message is done, the worker drops the channel and its ``state``, and the front
        forgets it too. A later message of the same id starts a fresh channel (``state`` None;
        ``seq`` restarts at 0 unless that message was already on its way)."""
        if not self._ending:
            self._ending = True
            if self._ended is not None:
                self._ended.append(self)

    def __repr__(self) -> str:
        return f"Channel(id={self.id.hex()}, state={self.state!r})"


@dataclass(frozen=True)
class HandlerSpec:
    """A resolved handler: the call, whether it is a coroutine function, and the hooks
    (``setup``/``teardown`` per worker, ``snapshot``/``restore`` per moved channel)."""

    handle: HandleFn
    is_async: bool
    setup: Callable[[int], Any] | None
    teardown: Callable[[], Any] | None
    snapshot: Callable[[Channel], bytes | None] | None = None
    restore: Callable[[Channel, bytes | None], None] | None = None


def resolve(target: str | object) -> object:
    """Import ``"package.module:attr.path"`` or return ``target`` as is.

    Raises:
        ImportError / AttributeError: the module or attribute does not exist.
        ValueError: the string is not of the ``module:attr`` form.
    """
    if not isinstance(target, str):
        return target
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"handler must be 'module:attr', got {target!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def load_handler(target: str | object, options: Mapping[str, Any] | None = None) -> HandlerSpec:
    """Resolve ``target`` into a :class:`HandlerSpec`, instantiating a class with ``options``.

    Raises:
        ImportError, AttributeError, ValueError: see :func:`resolve`.
        TypeError: the target is not callable and has no ``handle`` method, or ``options`` were
            given for a plain function.
    """
    obj = resolve(target)
    options = dict(options or {})
    if inspect.isclass(obj):
        obj = obj(**options)
    elif options:
        raise TypeError(f"handler_options given, but handler {target!r} is not a class")
    handle = getattr(obj, "handle", None)
    if handle is None:
        if not callable(obj):
            raise TypeError(f"handler {target!r} is neither callable nor has a handle() method")
        handle = obj

    def hook(name: str) -> Any:
        return getattr(obj, name, None) if handle is not obj else None

    return HandlerSpec(
        handle=handle,
        # An object with an ``async def __call__`` is awaited like an async function.
        is_async=inspect.iscoroutinefunction(handle)
        or inspect.iscoroutinefunction(type(handle).__call__),
        setup=hook("setup"),
        teardown=hook("teardown"),
        snapshot=hook("snapshot"),
        restore=hook("restore"),
    )


def move_state_of(mode: str, spec: HandlerSpec, target: object) -> str:
    """How this handler's state moves: ``pool.move_state`` with ``"auto"`` settled (``"hooks"``
    for a handler that has both ``snapshot`` and ``restore``, else ``"cbor"``).

    Raises:
        TypeError: ``"hooks"`` for a handler without both hooks (the missing ones named).
    """
    missing = [name for name in ("snapshot", "restore") if getattr(spec, name) is None]
    if mode == "auto":
        return "cbor" if missing else "hooks"
    if mode == "hooks" and missing:
        raise TypeError(
            f"pool.move_state = 'hooks' needs a handler object with snapshot(channel) and "
            f"restore(channel, data); {target!r} has no {' and no '.join(missing)}"
        )
    return mode


async def maybe_await(value: Any) -> Any:
    """Await ``value`` if it is awaitable (hooks may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


__all__ = [
    "Channel",
    "HandlerSpec",
    "HandleFn",
    "move_state_of",
    "load_handler",
    "maybe_await",
    "resolve",
]
