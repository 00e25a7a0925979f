"""shardpool: a multiprocess sharded worker pool with strict per-channel order.

Every message of one channel is handled by one handler call at a time, in arrival order, while
channels are spread over worker processes (one asyncio event loop each) by a stable hash.
"""

from .errors import (
    AccessDenied,
    BackendLost,
    ChannelIdError,
    ConfigError,
    ControlError,
    DrainTimeout,
    EndpointInUse,
    FrameError,
    HandlerError,
    InDoubt,
    InputError,
    InsecurePathError,
    MoveRefused,
    NotHalted,
    NotRunning,
    PayloadTooLarge,
    PoolBroken,
    PoolClosed,
    ReplyClosed,
    ReplyError,
    ReplyFailed,
    ReplyInDoubt,
    ReplyRejected,
    ShardPoolError,
    StateNotRestored,
    WorkerStartError,
)
from .front import CloseReport
from .handler import Channel
from .pool import ShardPool

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "BackendLost",
    "Channel",
    "ChannelIdError",
    "CloseReport",
    "ConfigError",
    "ControlError",
    "DrainTimeout",
    "EndpointInUse",
    "FrameError",
    "HandlerError",
    "InDoubt",
    "InputError",
    "InsecurePathError",
    "MoveRefused",
    "NotHalted",
    "NotRunning",
    "PayloadTooLarge",
    "PoolBroken",
    "PoolClosed",
    "ReplyClosed",
    "ReplyError",
    "ReplyFailed",
    "ReplyInDoubt",
    "ReplyRejected",
    "ShardPool",
    "ShardPoolError",
    "StateNotRestored",
    "WorkerStartError",
    "__version__",
]
