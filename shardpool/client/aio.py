"""The asyncio client: :class:`AsyncClient`, whose reader task takes replies as they come."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import cbor2
import zmq
import zmq.asyncio

from .. import protocol as P
from ..errors import ShardPoolError
from .connection import Curve, make_socket
from .core import ClientCore
from .replies import Reply

__all__ = ["AsyncClient"]


class AsyncClient(ClientCore):
    """The asyncio producer client. Create it with ``await AsyncClient.connect(...)`` (the
    arguments of :class:`~shardpool.client.Client`) inside the event loop that uses it.

    A reader task receives replies as they come; :meth:`send` awaits (instead of blocking) under
    flow control; :meth:`request` returns an :class:`asyncio.Future`.
    """

    def _open(self, curve: Curve | None, sndhwm: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket = self._ctx.socket(zmq.DEALER)
        self._watch = make_socket(self._sock, self.endpoint, curve, sndhwm)
        self._changed = asyncio.Event()  # set whenever replies (or news of the backend) arrive
        self._lost_event = asyncio.Event()
        self._flush_handle: asyncio.Handle | None = None
        self._flush_lock = asyncio.Lock()
        self._reader = self._loop.create_task(self._read())

    @classmethod
    async def connect(cls, endpoint: str | None = None, **kwargs: Any) -> AsyncClient:
        """Create a client (arguments as :class:`~shardpool.client.Client`) and, unless
        ``handshake=False``, handshake with the backend.

        Raises:
            TimeoutError: no answer to the handshake within ``timeout`` seconds.
            NotRunning: (handshake) the ipc endpoint is left from a backend that is gone.
            AccessDenied: (handshake) the backend refused this client's CURVE handshake.
            ConfigError / OSError / ValueError: bad config or key files.
        """
        client = cls(endpoint, **kwargs)
        if client._handshake:
            try:
                await client.hello()
            except BaseException:
                await client.aclose(0)
                raise
        return client

    async def _read(self) -> None:
        """The reader task: replies as they come, and news of the connection."""
        sock = self._sock
        assert self._watch is not None
        mon: Any = self._watch.monitor  # an asyncio socket: its calls return futures
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        while True:
            # While the connection is down, wake now and then to judge how long it has been.
            wait_ms = 250 if self._watch.down_since is not None else None
            try:
                await poller.poll(wait_ms)
                while True:  # replies first: those sent before a loss are still good
                    try:
                        data = await sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_frame(data)
                disconnections = 0
                while True:
                    try:
                        frames = await mon.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    disconnections += self._watch.feed(frames)
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            if self._link_lost(disconnections) is not None:
                self._lost_event.set()
            self._changed.set()

    async def _wait_for(self, cond: Callable[[], bool], timeout: float | None, what: str) -> None:
        deadline = self._loop.time() + (self.timeout if timeout is None else timeout)
        while not cond():
            if self._lost is not None:
                raise self._lost
            if self._fatal is not None and what != "reply":
                raise self._fatal
            left = deadline - self._loop.time()
            if left <= 0:
                raise TimeoutError(
                    f"no {what} from the backend at {self.endpoint} within the timeout "
                    f"({self.outstanding} messages awaiting replies)"
                )
            self._changed.clear()
            if cond():
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def send(self, channel_id: bytes, message: Any, timeout: float | None = None) -> int:
        """Queue ``message``; returns its correlation id (reply via :meth:`results`). Awaits
        under flow control up to ``timeout`` seconds (then TimeoutError; it stays queued)."""
        return await self.send_bytes(channel_id, cbor2.dumps(message), timeout)

    async def send_bytes(
        self, channel_id: bytes, payload: bytes, timeout: float | None = None
    ) -> int:
        corr = self._add(channel_id, payload)
        await self._after_add(timeout)
        return corr

    async def request(
        self, channel_id: bytes, message: Any, timeout: float | None = None
    ) -> asyncio.Future[Any]:
        """Queue ``message`` and return a future of the handler's result (raises ReplyError)."""
        return await self.request_bytes(channel_id, cbor2.dumps(message), timeout)

    async def request_bytes(
        self, channel_id: bytes, payload: bytes, timeout: float | None = None
    ) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._add(channel_id, payload, fut)
        await self._after_add(timeout)
        return fut

    async def call(self, channel_id: bytes, message: Any, timeout: float | None = None) -> Any:
        """Send one message and await its result, ``timeout`` seconds at most.

        Raises:
            ReplyError. TimeoutError. BackendLost: the backend went away before answering.
        """
        t = self.timeout if timeout is None else timeout
        fut = await self.request(channel_id, message, t)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), t)
        except TimeoutError:
            raise TimeoutError(
                f"no reply from the backend at {self.endpoint} within {t} s"
            ) from None

    async def _after_add(self, timeout: float | None) -> None:
        if self._batch_due():
            await self.flush(timeout)
        elif self._flush_handle is None:
            # Messages added in the same loop turn share a frame; the flush runs right after.
            self._flush_handle = self._loop.call_soon(self._kick)
        if self.outstanding >= self.max_outstanding:
            await self.flush(timeout)
            await self._wait_for(lambda: self.outstanding < self.max_outstanding, timeout, "room")

    def _kick(self) -> None:
        self._flush_handle = None
        if self._buf:
            task = self._loop.create_task(self.flush())
            task.add_done_callback(_ignore_result)

    async def flush(self, timeout: float | None = None) -> None:
        """Send the pending batch, awaiting queue room up to ``timeout`` seconds.

        Raises:
            TimeoutError: the queue stayed full (the batch stays pending).
            BackendLost: the backend went away with messages unanswered.
        """
        async with self._flush_lock:
            if self._lost is not None:
                raise self._lost
            if not self._buf:
                return
            frame = P.encode_submit(self._buf)
            buf = self._buf
            self._sent()
            t = self.timeout if timeout is None else timeout
            sending = asyncio.ensure_future(self._sock.send(frame))
            lost = asyncio.ensure_future(self._lost_event.wait())
            sent = False
            try:
                # A full queue towards a backend that died would hold the send until the
                # timeout: the loss ends the wait.
                await asyncio.wait((sending, lost), timeout=t, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                if not sending.done():
                    sending.cancel()
                sent = not sending.cancelled() and sending.exception() is None
                if not sent:
                    # Not sent: put the batch back in front of anything added meanwhile.
                    self._buf = buf + self._buf
                    self._buf_bytes = sum(len(i[1]) + len(i[2]) + 12 for i in self._buf)
            if sent:
                return
            if not sending.cancelled():
                raise sending.exception()  # type: ignore[misc]
            if self._lost is not None:
                raise self._lost
            raise TimeoutError(
                f"backend at {self.endpoint} did not take more messages within {t} s"
            )

    async def results(self, timeout: float | None = None) -> AsyncIterator[Reply]:
        """Yield replies to :meth:`send` until every message sent so far has its final reply.

        Raises:
            TimeoutError: no reply for ``timeout`` seconds while some are due.
            BackendLost: the backend went away with some still due.
        """
        await self.flush(timeout)
        while True:
            while self._ready:
                yield self._ready.popleft()
            if self._pending_results <= 0:
                return
            await self._wait_for(
                lambda: bool(self._ready) or self._pending_results <= 0, timeout, "reply"
            )

    async def wait(self, timeout: float | None = None) -> None:
        """Flush and await the final reply of everything sent so far.

        Raises:
            TimeoutError. BackendLost: the backend went away with some still due.
        """
        await self.flush(timeout)
        await self._wait_for(lambda: self.outstanding <= 0, timeout, "reply")

    async def hello(self, timeout: float | None = None) -> dict[str, Any]:
        """Handshake / barrier; see :meth:`Client.hello`."""
        token = os.urandom(8)
        await self.flush(timeout)
        await self._sock.send(P.encode_hello(token))
        try:
            await self._wait_for(lambda: token in self._hello, timeout, "handshake answer")
        except TimeoutError:
            raise TimeoutError(f"no answer from a shardpool backend at {self.endpoint}") from None
        info = self._hello.pop(token)
        self._learn(info)
        return info

    async def aclose(self, timeout: float | None = 1.0) -> None:
        """Flush (up to ``timeout`` seconds) and close."""
        if self._sock.closed:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        try:
            if self._buf and timeout and self._lost is None:
                await self.flush(timeout)
        except (TimeoutError, zmq.ZMQError, ShardPoolError):
            pass
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()
        if self._watch is not None:
            self._watch.close()
        linger = 0 if self._lost is not None else int((timeout or 0) * 1000)
        self._sock.close(linger=linger)
        self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved so asyncio does not log it; the next flush raises again
