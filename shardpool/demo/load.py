"""``shardpool run --demo-load``: the Lightning traffic generator as one producer on the ingress.

It runs in its own thread (with its own ZeroMQ context, through
:class:`~shardpool.client.Client`) inside the backend process, sends seeded BOLT #2 traffic
(:func:`~shardpool.demo.traffic.iter_encoded`) at a target rate, and counts the replies and the
protocol violations the demo handler reports (a violation means a channel's messages arrived out
of order). Each round of :data:`DemoLoad.ROUND` messages uses a fresh seed, so its channels are
new to the backend.

It sends the *synthetic* traffic (CBOR dicts shaped like BOLT #2 messages) on purpose, not the
real wire traffic of :mod:`~shardpool.demo.realtraffic`: signing costs ~100 µs a message and
checking ~90 µs, so the default 10,000 msgs/s would take about one core for this thread alone —
inside the backend process, sharing its GIL with the front's I/O thread — and about one more for
the workers: the whole of a 2-core laptop. The synthetic traffic costs ~4 µs a message to make
and keeps the demo light; ``shardpool bench --workload lightning-real`` measures the real work.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from ..client import Client, Reply
from .traffic import iter_encoded

__all__ = ["DEMO_DEFAULT_RATE", "DemoLoad"]

log = logging.getLogger("shardpool.demo.load")

DEMO_DEFAULT_RATE = 10_000.0
"""Messages per second ``--demo-load`` sends when no rate is given."""

_LOG_EVERY_S = 10.0
_POLL_EVERY = 256  # messages sent between reading replies (and pacing)


class DemoLoad:
    """The demo producer thread.

    Args:
        endpoint: the ingress to send to.
        rate: target messages per second; 0 sends as fast as the pool takes them.
    """

    PEERS = 50
    CHANNELS_PER_PEER = 20
    ROUND = 1_000_000  # messages per generated stream; each round uses fresh channels

    def __init__(self, endpoint: str, rate: float) -> None:
        self.endpoint = endpoint
        self.rate = rate
        self.sent = 0
        self.replies = 0
        self.violations = 0
        self.not_ok = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seed = 0  # the next round's seed: a restart goes on with fresh channels
        self._t0 = 0.0
        self._sent0 = 0  # self.sent when this run began (pacing counts from there)
        self._next_log = 0.0

    def start(self) -> None:
        """Start the thread (it connects, then sends until :meth:`stop`); after :meth:`stop`,
        start it again (``shardpool undrain``): it goes on with a fresh round, so with channels
        new to the backend (the stopped round's channels are left where they were). Nothing
        happens while the thread still runs."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="shardpool-demo-load", daemon=True
        )
        self._thread.start()

    @property
    def running(self) -> bool:
        """True while the sending thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop sending and join the thread (5 s at most). Idempotent; safe from any thread."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and threading.current_thread() is not thread:
            thread.join(5.0)

    def stats(self) -> dict[str, Any]:
        """Counters for the status snapshot: sent, replies, violations, not_ok, rate (msgs/s)."""
        return {
            "sent": self.sent,
            "replies": self.replies,
            "violations": self.violations,
            "not_ok": self.not_ok,
            "rate": self.rate,
        }

    def _run(self) -> None:
        try:
            client = Client(self.endpoint, timeout=5.0)
        except Exception:  # noqa: BLE001 - the demo must not take the backend down
            log.exception("demo load could not connect to %s", self.endpoint)
            return
        log.info(
            "demo load: %s msg/s of Lightning traffic over %d channels through the ingress",
            f"{self.rate:g}" if self.rate else "as many",
            self.PEERS * self.CHANNELS_PER_PEER,
        )
        self._t0 = time.monotonic()
        self._sent0 = self.sent
        self._next_log = self._t0 + _LOG_EVERY_S
        try:
            while not self._stop.is_set():
                seed = self._seed
                self._seed += 1
                self._send_round(client, iter_encoded(
                    self.PEERS, self.CHANNELS_PER_PEER, self.ROUND, seed
                ))
        except Exception:  # noqa: BLE001 - the demo must not take the backend down
            if not self._stop.is_set():
                log.exception("demo load stopped")
        finally:
            # Closing anyway; the counts are only figures.
            with contextlib.suppress(Exception):
                self._count(client.poll())
            client.close(0)

    def _send_round(self, client: Client, stream: Iterable[tuple[bytes, bytes]]) -> None:
        """Send ``stream`` until it ends or :meth:`stop` is called."""
        for cid, payload in stream:
            if not self._send(client, cid, payload):
                return
            self.sent += 1
            if self.sent % _POLL_EVERY == 0:
                self._count(client.poll())
                self._pace_and_log()

    def _send(self, client: Client, cid: bytes, payload: bytes) -> bool:
        """Send one message, waiting out flow control; False if stopped first."""
        while not self._stop.is_set():
            try:
                client.send_bytes(cid, payload, timeout=0.5)
                return True
            except TimeoutError:
                continue  # the pool is behind: flow control; try again
        return False

    def _pace_and_log(self) -> None:
        now = time.monotonic()
        if self.rate:
            # Pacing, not synchronisation: wake early on stop.
            ahead = self._t0 + (self.sent - self._sent0) / self.rate - now
            if ahead > 0:
                self._stop.wait(ahead)
        if now >= self._next_log:
            self._next_log = now + _LOG_EVERY_S
            log.info(
                "demo load: %d sent (%.0f/s), %d replies, %d protocol violations",
                self.sent,
                (self.sent - self._sent0) / (now - self._t0),
                self.replies,
                self.violations,
            )

    def _count(self, replies: list[Reply]) -> None:
        for r in replies:
            self.replies += 1
            if not r.ok:
                self.not_ok += 1
            elif isinstance(r.value, dict) and "violation" in r.value:
                self.violations += 1
