"""Socket security: private runtime directory and socket files, endpoint locks, the tcp/CURVE
rules, and that a producer without the right key gets nothing processed."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from service_handlers import in_process_backend, toml_config

from shardpool.client import AsyncClient, Client
from shardpool.config import config_from_dict
from shardpool.control import ControlClient
from shardpool.errors import AccessDenied, ConfigError, EndpointInUse, InsecurePathError
from shardpool.security import (
    check_endpoints,
    claim_endpoints,
    default_runtime_dir,
    ensure_private_dir,
    generate_keys,
    is_loopback_endpoint,
    lock_endpoint,
    resolve_endpoints,
)
from shardpool.service import Service

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# ------------------------------------------------------------------------- runtime dir and ipc


def test_default_runtime_dir_is_per_user_and_shared_by_run_and_status(tmp_path: Path) -> None:
    assert default_runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "shardpool"
    fallback = default_runtime_dir({})
    assert fallback.name == f"shardpool-{os.getuid()}"
    cfg = config_from_dict({})
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    # `run` and `status` resolve the same defaults from the same config.
    assert resolve_endpoints(cfg, env) == (
        f"ipc://{tmp_path}/shardpool/ingress",
        f"ipc://{tmp_path}/shardpool/control",
    )


def test_private_dir_is_created_0700_tightened_and_foreign_or_symlinked_refused(
    tmp_path: Path,
) -> None:
    new = ensure_private_dir(tmp_path / "a" / "run")
    assert _mode(new) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o777)
    ensure_private_dir(loose)
    assert _mode(loose) == 0o700
    link = tmp_path / "link"
    link.symlink_to(new)
    with pytest.raises(InsecurePathError, match="symlink"):
        ensure_private_dir(link)
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(InsecurePathError, match="not a directory"):
        ensure_private_dir(afile)
    if os.getuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 12345, 12345)
        with pytest.raises(InsecurePathError, match="belongs to uid 12345"):
            ensure_private_dir(foreign)


@pytest.mark.multiprocess
def test_running_backend_sockets_are_owner_only(tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    cfg = config_from_dict(
        {
            "pool": {"workers": 1, "handler": "service_handlers:ordered"},
            "transport": {"runtime_dir": str(rundir)},
        }
    )
    svc = Service(cfg, env={})
    svc.start()
    try:
        assert svc.ingress_endpoint == f"ipc://{rundir}/ingress"
        assert svc.control_endpoint == f"ipc://{rundir}/control"
        assert _mode(rundir) == 0o700
        for name in ("ingress", "control"):
            sock = rundir / name
            assert stat.S_ISSOCK(os.lstat(sock).st_mode)
            assert _mode(sock) & 0o077 == 0, f"{name} socket is {oct(_mode(sock))}"
        # The worker sockets of the front live in their own private directory below it.
        for sub in rundir.iterdir():
            if sub.is_dir():
                assert _mode(sub) & 0o077 == 0
        # A second backend on the same endpoints refuses to start instead of stealing them.
        with pytest.raises(EndpointInUse, match=str(os.getpid())):
            Service(cfg, env={}).start()
        with Client(svc.ingress_endpoint, timeout=20.0) as client:
            assert client.call(b"c", {"p": 0, "i": 0}, timeout=20.0) == [0, 0]
    finally:
        assert svc.stop() == 0


def test_endpoint_lock_is_released(tmp_path: Path) -> None:
    ep = f"ipc://{tmp_path}/x"
    lock = lock_endpoint(ep)
    assert lock is not None
    with pytest.raises(EndpointInUse):
        lock_endpoint(ep)
    lock.release()
    again = lock_endpoint(ep)
    assert again is not None
    again.release()
    assert lock_endpoint("tcp://127.0.0.1:5555") is None


def test_claim_endpoints_releases_what_it_took_when_one_is_in_use(tmp_path: Path) -> None:
    cfg = config_from_dict({"transport": {"runtime_dir": str(tmp_path / "run")}})
    free, held = f"ipc://{tmp_path}/free", f"ipc://{tmp_path}/held"
    holder = lock_endpoint(held)
    assert holder is not None
    try:
        with pytest.raises(EndpointInUse):
            claim_endpoints(cfg, {"ingress.endpoint": free, "control.endpoint": held}, env={})
        locks = claim_endpoints(cfg, {"ingress.endpoint": free}, env={})  # free again
        assert len(locks) == 1 and _mode(tmp_path / "run") == 0o700
        for lock in locks:
            lock.release()
    finally:
        holder.release()


def test_moved_errors_keep_their_old_import_paths() -> None:
    import shardpool.control
    import shardpool.errors
    import shardpool.security

    for module, names in (
        (shardpool.control, ("ControlError", "NotRunning")),
        (shardpool.security, ("EndpointInUse", "InsecurePathError")),
    ):
        for name in names:
            cls = getattr(module, name)
            assert cls is getattr(shardpool.errors, name)
            assert issubclass(cls, shardpool.errors.ShardPoolError)


# ------------------------------------------------------------------------- tcp and CURVE rules


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("", True),
        ("ipc:///tmp/x", True),
        ("tcp://127.0.0.1:7400", True),
        ("tcp://127.3.4.5:7400", True),
        ("tcp://localhost:7400", True),
        ("tcp://[::1]:7400", True),
        ("tcp://0.0.0.0:7400", False),
        ("tcp://*:7400", False),
        ("tcp://10.1.2.3:7400", False),
        ("tcp://[::]:7400", False),
        ("tcp://eth0:7400", False),
        ("tcp://node.example:7400", False),
    ],
)
def test_loopback_classification(endpoint: str, loopback: bool) -> None:
    assert is_loopback_endpoint(endpoint) is loopback


def test_non_loopback_ingress_needs_curve_keys_and_client_list(tmp_path: Path) -> None:
    for endpoint in ("tcp://0.0.0.0:7400", "tcp://*:7400"):
        with pytest.raises(ConfigError) as exc:
            check_endpoints(config_from_dict({"ingress": {"endpoint": endpoint}}))
        assert exc.value.key == "ingress.endpoint"
        assert "curve" in str(exc.value).lower() and "shardpool keys" in str(exc.value)
    keys = generate_keys(tmp_path / "keys")
    with_keys = {
        "endpoint": "tcp://0.0.0.0:7400",
        "curve_public_key": str(keys.server_public),
        "curve_secret_key": str(keys.server_secret),
    }
    with pytest.raises(ConfigError) as exc:
        check_endpoints(config_from_dict({"ingress": with_keys}))
    assert exc.value.key == "ingress.curve_clients_dir"
    full = {**with_keys, "curve_clients_dir": str(keys.clients_dir)}
    assert check_endpoints(config_from_dict({"ingress": full})) is not None
    # Half a keypair, a public key where the secret belongs, a control socket beyond loopback.
    with pytest.raises(ConfigError) as exc:
        check_endpoints(
            config_from_dict({"ingress": {"curve_public_key": str(keys.server_public)}})
        )
    assert exc.value.key == "ingress.curve_secret_key"
    with pytest.raises(ConfigError) as exc:
        check_endpoints(
            config_from_dict({"ingress": {**full, "curve_secret_key": str(keys.server_public)}})
        )
    assert exc.value.key == "ingress.curve_secret_key"
    with pytest.raises(ConfigError) as exc:
        check_endpoints(config_from_dict({"control": {"endpoint": "tcp://0.0.0.0:7401"}}))
    assert exc.value.key == "control.endpoint"
    assert (
        check_endpoints(config_from_dict({"ingress": {"endpoint": "tcp://127.0.0.1:7400"}})) is None
    )


def test_run_refuses_a_non_loopback_ingress_without_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "open.toml"
    cfg.write_text(
        toml_config(
            {
                "ingress": {"endpoint": "tcp://0.0.0.0:7400"},
                "control": {"endpoint": f"ipc://{tmp_path}/ctl"},
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(TESTS), str(REPO)))}
    out = subprocess.run(
        [sys.executable, "-m", "shardpool", "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 2, out.stderr
    assert "ingress.endpoint = 'tcp://0.0.0.0:7400'" in out.stderr
    assert "curve" in out.stderr.lower()
    assert not (tmp_path / "ctl").exists()  # refused before anything was bound


def test_keys_command_writes_private_keypairs(tmp_path: Path) -> None:
    from shardpool.cli import main

    target = tmp_path / "k"
    assert main(["keys", str(target)]) == 0
    assert _mode(target) == 0o700
    for name in ("server.key_secret", "client.key_secret"):
        assert _mode(target / name) == 0o600
    for name in ("server.key", "client.key", "authorized_clients/client.key"):
        assert (target / name).is_file()
    assert main(["keys", str(target)]) == 1  # never overwrites by accident
    assert main(["keys", str(target), "--force"]) == 0


@pytest.mark.multiprocess
def test_curve_ingress_processes_only_authorised_producers(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys")
    stranger_pub, stranger_secret = zmq.auth.create_certificates(str(tmp_path), "stranger")
    with in_process_backend(
        tmp_path,
        pool={"workers": 1},
        ingress={
            # Loopback only: the test never sends traffic off this machine.
            "endpoint": "tcp://127.0.0.1:*",
            "curve_public_key": str(keys.server_public),
            "curve_secret_key": str(keys.server_secret),
            "curve_clients_dir": str(keys.clients_dir),
        },
    ) as svc:
        endpoint = svc.ingress_endpoint
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith("*")
        # A producer whose key is not authorised, and one without CURVE: nothing gets through,
        # and each is told so at once (not at its timeout).
        with pytest.raises(AccessDenied, match="not authorised"):
            Client(
                endpoint,
                timeout=20.0,
                server_public_key=keys.server_public,
                client_secret_key=stranger_secret,
            )
        with pytest.raises(AccessDenied, match="handshake failed"):
            Client(endpoint, timeout=20.0)
        with pytest.raises(AccessDenied, match="not authorised"):
            asyncio.run(
                AsyncClient.connect(
                    endpoint,
                    timeout=20.0,
                    server_public_key=keys.server_public,
                    client_secret_key=stranger_secret,
                )
            )
        stranger = Client(
            endpoint,
            timeout=20.0,
            server_public_key=keys.server_public,
            client_secret_key=stranger_secret,
            handshake=False,
        )
        try:
            fut = stranger.request(b"c", {"p": 9, "i": 0})
            with pytest.raises(AccessDenied) as denied:
                fut.result(timeout=20.0)
            assert denied.value.unanswered == 1
        finally:
            stranger.close(0)
        # The authorised producer is served.
        with Client(
            endpoint,
            timeout=20.0,
            server_public_key=keys.server_public,
            client_secret_key=keys.client_secret,
        ) as client:
            assert client.call(b"c", {"p": 0, "i": 0}, timeout=20.0) == [0, 0]
        with ControlClient(svc.control_endpoint) as ctl:
            # Handshake failures are counted from the socket monitor, asynchronously.
            deadline = time.monotonic() + 20
            while (ing := ctl.request("status")["ingress"])["auth_failures"] < 1:
                assert time.monotonic() < deadline, ing
        assert ing["accepted"] == 1 and ing["frames"] == 2  # the authorised HELLO and message
        assert svc.pool.stats()["acknowledged"] == 1
    assert Path(stranger_pub).exists()
