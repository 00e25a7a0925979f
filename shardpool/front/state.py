"""The pool's states, as the front reports them (``stats()["state"]``)."""

from __future__ import annotations

import enum

__all__ = ["PoolState"]


class PoolState(enum.StrEnum):
    RUNNING = "running"  # taking work
    CLOSING = "closing"  # close() began: no new work, draining
    CLOSED = "closed"
    BROKEN = "broken"  # a worker could not start or kept dying: see Front.broken
