"""The rules ``shardpool run`` applies to a valid config before it serves, applied without starting
anything: what ``shardpool check-config`` checks after loading a file.

Each rule is the very function ``run`` calls, never a copy of it:

* endpoint security — :func:`~shardpool.security.check_endpoints` (``Service.start`` calls it
  first): a non-loopback tcp ingress needs CURVE keys and authorised clients, the key files must
  be readable and match, the control endpoint stays on this host;
* ipc paths — :func:`~shardpool.security.check_ipc_path` (``claim_endpoints`` calls it before it
  binds): an ipc endpoint, configured or the default one in the runtime directory, must fit a unix
  socket address;
* the handler — :func:`~shardpool.handler.load_handler` and
  :func:`~shardpool.handler.move_state_of` (each worker calls them before READY): the
  ``module:attribute`` imports, a class is instantiated with ``pool.handler_options``, the object
  is callable or has ``handle()``, and ``pool.move_state = "hooks"`` finds both hooks. As
  ``gunicorn --check-config`` does, this imports (and instantiates) the handler here.

What only the moment of starting can tell is not checked: whether a port or an ipc endpoint is
free, whether the runtime directory is safe to use, whether the handler's ``setup`` succeeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import Config
from .errors import ConfigError
from .handler import load_handler, move_state_of, resolve
from .security import check_endpoints, check_ipc_path, resolve_endpoints

__all__ = ["IMPORT_HINT", "check_runnable", "handler_problems"]

Problems = list[tuple[str, Any, str]]

IMPORT_HINT = (
    "the module is searched in the current directory (first, as gunicorn does), the installed "
    "packages and PYTHONPATH: run from the directory holding it, or add that directory to "
    "PYTHONPATH"
)
"""What an import failure of the handler adds to its message."""


def handler_problems(cfg: Config) -> Problems:
    """Import and build the handler as a worker does; the problems, each naming its key."""
    pool = cfg.pool
    try:
        target = resolve(pool.handler)
    except Exception as exc:  # noqa: BLE001 - whatever the import raises is the problem to show
        why = f"{type(exc).__name__}: {exc}"
        hint = f"; {IMPORT_HINT}" if isinstance(exc, ImportError) else ""
        return [("pool.handler", pool.handler, f"an importable module:attribute ({why}){hint}")]
    try:
        spec = load_handler(pool.handler, pool.handler_options)
    except Exception as exc:  # noqa: BLE001 - a constructor may raise anything
        why = f"{type(exc).__name__}: {exc}"
        if isinstance(target, type):
            return [(
                "pool.handler_options",
                dict(pool.handler_options),
                f"keyword arguments that {pool.handler} accepts ({why})",
            )]
        return [("pool.handler", pool.handler, f"a handler function, class or object ({why})")]
    try:
        move_state_of(pool.move_state, spec, pool.handler)
    except TypeError as exc:
        return [("pool.move_state", pool.move_state, f'"auto", "cbor" or "none" ({exc})')]
    return []


def check_runnable(cfg: Config, env: Mapping[str, str] | None = None) -> None:
    """Apply every rule ``shardpool run`` applies to ``cfg`` before it serves (see the module
    docstring); ``env`` as for :func:`~shardpool.security.resolve_endpoints`.

    Raises:
        ConfigError: listing every problem found, each with its key, value and what is allowed.
    """
    problems: Problems = []
    try:
        check_endpoints(cfg)
    except ConfigError as exc:
        problems += exc.problems
    ingress, control = resolve_endpoints(cfg, env)
    for key, endpoint in (("ingress.endpoint", ingress), ("control.endpoint", control)):
        try:
            check_ipc_path(endpoint, key)
        except ConfigError as exc:
            problems += exc.problems
    problems += handler_problems(cfg)
    if problems:
        raise ConfigError(problems)
