"""What the ingress is configured with."""

from __future__ import annotations

from dataclasses import dataclass

from ..security import CurveServerKeys

__all__ = ["IngressSettings"]


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs (sizes in bytes, times in seconds)."""

    endpoint: str
    max_message_bytes: int = 1 << 20
    max_items: int = 16_384
    max_producers: int = 1024
    curve: CurveServerKeys | None = None
    # Frames ZeroMQ reads ahead per producer before it pushes back on it. Small: it is memory
    # the backend holds for a producer whatever the ingress does (1000 frames of 200 KB held
    # 135 MB for one producer flooding a busy ingress); 16 frames of 256 messages still keep the
    # ingress fed.
    rcvhwm: int = 16
    # Messages accepted but unanswered plus replies held, per producer (see shardpool.protocol).
    max_pending_per_producer: int = 10_000

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame accepted; ZeroMQ disconnects a peer that sends a larger one."""
        return max(64 << 20, 2 * self.max_message_bytes + (64 << 10))
