"""The producer clients (sync and asyncio): batching, correlation, errors, timeouts, shutdown."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from service_handlers import in_process_backend

from shardpool.client import AsyncClient, Client, ReplyFailed
from shardpool.control import ControlClient
from shardpool.errors import ChannelIdError, PayloadTooLarge

pytestmark = pytest.mark.multiprocess


def test_sync_client_send_request_call_and_local_checks(tmp_path: Path) -> None:
    with (
        in_process_backend(
            tmp_path,
            pool={"handler": "service_handlers:indexed", "failure_policy": "skip"},
            transport={"max_message_bytes": 100},
        ) as svc,
        Client(svc.ingress_endpoint, timeout=20.0, batch_size=16) as client,
    ):
        assert client.server_info["max_message_bytes"] == 100
        # It keeps within the backend's bound on what one producer may leave unanswered.
        assert client.server_info["max_pending_per_producer"] == 10_000
        assert client.max_outstanding == 10_000
        assert client.server_info["pid"] == svc.info()["pid"]
        corrs = [client.send(b"s%d" % (i % 4), {"i": i}) for i in range(200)]
        fut = client.request(b"r", {"i": 3})
        assert fut.result(timeout=20.0)[1] == 3
        assert client.call(b"r", {"i": 4}, timeout=20.0)[1] == 4
        with pytest.raises(ReplyFailed) as exc:
            client.call(b"r", {"fail": True}, timeout=20.0)
        assert exc.value.status == "failed" and exc.value.info["type"] == "ValueError"
        replies = list(client.results(timeout=20.0))
        assert sorted(r.corr for r in replies) == corrs
        assert all(r.ok and r.final for r in replies)
        for k in range(4):  # each channel's replies in the order its messages were sent
            mine = [r.corr for r in replies if r.corr % 4 == k]
            assert mine == corrs[k::4]
        assert client.poll() == []
        # Refused locally, nothing sent.
        with pytest.raises(ChannelIdError):
            client.send(b"", {"i": 0})
        with pytest.raises(ChannelIdError):
            client.send(b"x" * 65, {"i": 0})
        with pytest.raises(PayloadTooLarge):
            client.send_bytes(b"c", b"x" * 101)
        client.wait(timeout=20.0)
        assert client.outstanding == 0


def test_sync_client_times_out_without_a_backend(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError):
        Client(f"ipc://{tmp_path}/nobody", timeout=0.3)
    client = Client(f"ipc://{tmp_path}/nobody", timeout=0.3, handshake=False)
    try:
        fut = client.request(b"c", {"i": 0})
        with pytest.raises(TimeoutError):
            fut.result(timeout=0.2)
        client.send(b"c", {"i": 1})
        with pytest.raises(TimeoutError):
            list(client.results(timeout=0.2))
        with pytest.raises(TimeoutError):
            client.wait(timeout=0.2)
    finally:
        client.close(0)


def test_async_client(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def main(endpoint: str) -> None:
        async with await AsyncClient.connect(endpoint, timeout=20.0, batch_size=32) as client:
            assert client.max_outstanding == client.server_info["max_pending_per_producer"]
            sent = {}
            for i in range(500):
                cid = b"a%d" % (i % 5)
                sent[await client.send(cid, {"p": 0, "i": i // 5})] = (cid, i // 5)
            futs = [await client.request(b"req", {"p": 1, "i": i}) for i in range(3)]
            assert [v[1] for v in await asyncio.gather(*futs)] == [0, 1, 2]
            assert (await client.call(b"req", {"p": 1, "i": 3}, timeout=20.0))[1] == 3
            nxt: dict[bytes, int] = {}
            n = 0
            async for r in client.results(timeout=20.0):
                assert r.ok
                cid, i = sent[r.corr]
                assert r.value[1] == i == nxt.get(cid, 0)
                nxt[cid] = i + 1
                n += 1
            assert n == 500
            with pytest.raises(ReplyFailed) as exc:
                await client.call(b"req", {"p": 1, "i": 99}, timeout=20.0)  # out of order: raises
            assert exc.value.status == "failed"

        # Flow control: a stuck pool makes send await, then time out; nothing is lost.
        async with await AsyncClient.connect(endpoint, timeout=20.0, max_outstanding=4) as client:
            for i in range(3):
                await client.send(b"gated", {"gate": str(gate), "i": i})
            with pytest.raises(TimeoutError):
                await client.send(b"gated", {"gate": str(gate), "i": 3}, timeout=0.3)
            gate.touch()
            got = [r.value async for r in client.results(timeout=20.0)]
            assert [v[1] for v in got] == [0, 1, 2, 3]

    with in_process_backend(
        tmp_path,
        pool={
            "workers": 1,
            "handler": "service_handlers:gated_or_ordered",
            "failure_policy": "skip",
        },
    ) as svc:
        asyncio.run(main(svc.ingress_endpoint))


def test_unfinished_messages_get_closed_replies_at_shutdown(tmp_path: Path) -> None:
    gate = tmp_path / "never"
    backend = in_process_backend(
        tmp_path,
        pool={"workers": 1, "handler": "handlers:gated"},
        supervisor={"stop_timeout_s": 0.5},
    )
    with backend as svc, Client(svc.ingress_endpoint, timeout=20.0) as client:
        done = client.call(b"free", {"i": 0}, timeout=20.0)
        assert done == [0, 0]
        corrs = [client.send(b"stuck", {"gate": str(gate), "i": i}) for i in range(5)]
        client.flush()
        with ControlClient(svc.control_endpoint) as ctl:  # all five accepted before the stop
            deadline = time.monotonic() + 20
            while ctl.request("status")["ingress"]["accepted"] < 6:
                assert time.monotonic() < deadline
        code = svc.stop()
        assert code == 1  # the drain ran out of time
        replies = list(client.results(timeout=20.0))
        # The first was in its handler when the worker was stopped: it may have been applied.
        # The rest never reached the handler: safe to send again.
        assert [(r.corr, r.status) for r in replies] == [(corrs[0], "in_doubt")] + [
            (c, "closed") for c in corrs[1:]
        ]
        # After shutdown nothing answers any more.
        with pytest.raises(TimeoutError):
            client.hello(timeout=0.3)
