"""A client's connection: where the backend is, the DEALER socket's set-up, and the judgement of
when the backend counts as lost.

The socket monitor (:class:`~shardpool.control.ConnectionWatch`) sees a closed connection at once
(e.g. the backend process died) and ZeroMQ heartbeats declare a silent tcp peer gone after
:data:`~shardpool.control.HEARTBEAT_TIMEOUT_MS`; :func:`judge_link` turns what it saw into a
:class:`~shardpool.errors.BackendLost` (or :class:`~shardpool.errors.AccessDenied`) when messages
are left unanswered.
"""

from __future__ import annotations

import os
import time
from typing import Any

import zmq

from ..config import Config, find_config_path, load_config
from ..control import (
    HEARTBEAT_TIMEOUT_MS,
    ConnectionWatch,
    apply_heartbeats,
    stale_backend,
)
from ..errors import AccessDenied, BackendLost, NotRunning
from ..security import load_client_keys, load_public_key, resolve_endpoints

__all__ = [
    "Curve",
    "check_not_stale",
    "default_endpoint",
    "judge_link",
    "make_socket",
    "resolve",
]

Curve = tuple[bytes, bytes, bytes]
"""CURVE keys of a client: (server public, client public, client secret), Z85."""

ConfigArg = Config | str | os.PathLike[str] | None
KeyArg = str | os.PathLike[str] | bytes | None


def default_endpoint(config: ConfigArg = None) -> str:
    """The ingress endpoint of the backend started with ``config`` (default: the config
    ``shardpool run`` itself would load).

    Raises:
        ConfigError / OSError: the config cannot be found or read.
    """
    cfg = config if isinstance(config, Config) else load_config(find_config_path(config))
    return resolve_endpoints(cfg)[0]


def resolve(
    endpoint: str | None,
    config: ConfigArg,
    server_public_key: KeyArg,
    client_secret_key: str | os.PathLike[str] | None,
) -> tuple[str, Curve | None]:
    """The endpoint to connect to and the CURVE keys to use (None: no CURVE). The config is
    read only when it is needed: no endpoint given, or the server key may be in it.

    Raises:
        ConfigError / OSError / ValueError: bad config or key files, or only one of the keys.
    """
    cfg = None
    if endpoint is None or (server_public_key is None and config is not None):
        cfg = config if isinstance(config, Config) else load_config(find_config_path(config))
    if endpoint is None:
        assert cfg is not None
        endpoint = resolve_endpoints(cfg)[0]
    return endpoint, _curve_options(cfg, server_public_key, client_secret_key)


def _curve_options(
    config: Config | None,
    server_public_key: KeyArg,
    client_secret_key: str | os.PathLike[str] | None,
) -> Curve | None:
    if server_public_key is None and config is not None and config.ingress.curve_public_key:
        server_public_key = config.ingress.curve_public_key
    if server_public_key is None and client_secret_key is None:
        return None
    if server_public_key is None or client_secret_key is None:
        raise ValueError("CURVE needs both server_public_key and client_secret_key")
    if isinstance(server_public_key, bytes) and len(server_public_key) == 40:
        server = server_public_key
    else:
        server = load_public_key(server_public_key)  # type: ignore[arg-type]
    public, secret = load_client_keys(client_secret_key)
    return server, public, secret


def make_socket(
    sock: zmq.Socket[Any], endpoint: str, curve: Curve | None, sndhwm: int
) -> ConnectionWatch:
    """Configure and connect the client's DEALER; returns the watch on its connection."""
    sock.linger = 0
    sock.sndhwm = sndhwm
    sock.rcvhwm = 0  # replies are bounded by what we sent; never let ZeroMQ drop one
    apply_heartbeats(sock)
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    watch = ConnectionWatch(sock)  # before connect: the first connection is an event too
    sock.connect(endpoint)
    return watch


def check_not_stale(endpoint: str) -> None:
    """Raises NotRunning if ``endpoint`` is an ipc socket left by a backend that is gone."""
    stale = stale_backend(endpoint)
    if stale is not None:
        raise NotRunning(stale)


def judge_link(
    watch: ConnectionWatch, endpoint: str, unanswered: int, unsent: int, disconnections: int
) -> BackendLost | None:
    """The error that ends the client, or None while the connection may still be good.

    ``unanswered`` counts messages handed to the socket without a final reply, ``unsent`` those
    still batched, ``disconnections`` the disconnections just seen (the replies that arrived
    before them already taken). The backend is lost when messages are unanswered and the
    connection closed, or stayed down past the heartbeat timeout; a refused handshake ends the
    client whatever is unanswered, since nothing it sends can get through.
    """
    if watch.refused is not None:
        return AccessDenied(
            f"the shardpool backend at {endpoint} refused this client's connection: "
            f"{watch.refused} (ingress.curve_clients_dir holds the keys it accepts); "
            f"{unanswered} messages were not delivered",
            endpoint=endpoint,
            unanswered=unanswered,
        )
    if unanswered <= 0:
        return None
    down = watch.down_since
    if not disconnections and (
        down is None or time.monotonic() - down <= HEARTBEAT_TIMEOUT_MS / 1000
    ):
        return None
    return BackendLost(
        f"the shardpool backend at {endpoint} went away (its connection closed, or was silent "
        f"for {HEARTBEAT_TIMEOUT_MS / 1000:g} s) with {unanswered} messages unanswered; each may "
        "or may not have been processed"
        + (f"; {unsent} more were never sent" if unsent else "")
        + ". This client is broken: create a new one.",
        endpoint=endpoint,
        unanswered=unanswered,
    )
