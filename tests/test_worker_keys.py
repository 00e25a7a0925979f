"""Remote worker keys (``generate_worker_keys``): the files and their modes, the front's pinned
copy, id validation, overwrite protection, and the front keypair shared by every worker."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq.auth

from shardpool.security import generate_worker_keys


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_worker_keys_are_written_private_pinned_and_loadable(tmp_path: Path) -> None:
    target = tmp_path / "keys"
    keys = generate_worker_keys(target, "host2-0")
    assert keys.public == target / "host2-0.key"
    assert keys.secret == target / "host2-0.key_secret"
    assert keys.pinned == target / "workers" / "host2-0.key"
    assert (keys.front_public, keys.front_secret) == (
        target / "front.key",
        target / "front.key_secret",
    )
    assert keys.front_created
    assert _mode(target) == 0o700 and _mode(target / "workers") == 0o700
    for path in (keys.secret, keys.front_secret):
        assert _mode(path) == 0o600
    for path in (keys.public, keys.pinned, keys.front_public):
        assert path.is_file() and not _mode(path) & 0o077
    assert keys.pinned.read_bytes() == keys.public.read_bytes()

    public, no_secret = zmq.auth.load_certificate(str(keys.public))
    assert public and no_secret is None
    same_public, secret = zmq.auth.load_certificate(str(keys.secret))
    assert same_public == public and secret
    assert zmq.auth.load_certificate(str(keys.pinned))[0] == public
    front_public, front_secret = zmq.auth.load_certificate(str(keys.front_secret))
    assert front_secret and front_public == zmq.auth.load_certificate(str(keys.front_public))[0]
    assert front_public != public


def test_secret_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        keys = generate_worker_keys(tmp_path / "k", "w1")
        assert os.umask(0) == 0  # the caller's umask is restored
    finally:
        os.umask(old)
    assert _mode(keys.secret) == 0o600 and _mode(keys.front_secret) == 0o600


@pytest.mark.parametrize(
    "bad",
    ["", ".hidden", "a/b", "../x", "host 2", "x" * 65, "é", "front", "h:1", "a\n"],
)
def test_bad_worker_ids_are_refused_naming_the_id(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError) as err:
        generate_worker_keys(tmp_path / "k", bad)
    assert repr(bad) in str(err.value)
    assert "1-64" in str(err.value)
    assert not (tmp_path / "k").exists()  # refused before anything was written


@pytest.mark.parametrize("good", ["a", "host2-0", "H_3.b-c", "-x", "_", "x" * 64, "front2"])
def test_good_worker_ids_are_accepted(tmp_path: Path, good: str) -> None:
    assert generate_worker_keys(tmp_path / "k", good).public.name == f"{good}.key"


def test_existing_worker_keys_are_refused_without_force_and_replaced_with_it(
    tmp_path: Path,
) -> None:
    target = tmp_path / "k"
    first = generate_worker_keys(target, "w1")
    old_public = first.public.read_bytes()
    old_front = first.front_public.read_bytes()
    with pytest.raises(FileExistsError, match="w1.key"):
        generate_worker_keys(target, "w1")
    assert first.public.read_bytes() == old_public  # untouched
    # Any one of the three files is enough to refuse.
    first.public.unlink()
    first.secret.unlink()
    with pytest.raises(FileExistsError, match="workers/w1.key"):
        generate_worker_keys(target, "w1")

    os.chmod(first.pinned, 0o644)
    again = generate_worker_keys(target, "w1", force=True)
    assert again.public.read_bytes() != old_public
    assert again.pinned.read_bytes() == again.public.read_bytes()
    assert _mode(again.secret) == 0o600 and not _mode(again.pinned) & 0o077
    # force replaces the worker's keys, never the front's: other workers trust it.
    assert not again.front_created and again.front_public.read_bytes() == old_front


def test_front_keypair_is_created_once_and_shared_by_later_workers(tmp_path: Path) -> None:
    target = tmp_path / "k"
    first = generate_worker_keys(target, "host2-0")
    front = (first.front_public.read_bytes(), first.front_secret.read_bytes())
    second = generate_worker_keys(target, "host3-0")
    assert first.front_created and not second.front_created
    assert (second.front_public, second.front_secret) == (first.front_public, first.front_secret)
    assert (second.front_public.read_bytes(), second.front_secret.read_bytes()) == front
    assert second.public.read_bytes() != first.public.read_bytes()
    assert sorted(p.name for p in (target / "workers").iterdir()) == ["host2-0.key", "host3-0.key"]


def test_half_a_front_keypair_is_refused_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "k"
    first = generate_worker_keys(target, "w1")
    front_public = first.front_public.read_bytes()
    first.front_secret.unlink()
    with pytest.raises(FileNotFoundError, match="front.key_secret"):
        generate_worker_keys(target, "w2")
    assert first.front_public.read_bytes() == front_public
    assert not (target / "w2.key").exists()


def test_mismatched_front_keypair_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "k"
    generate_worker_keys(target, "w1")
    other = generate_worker_keys(tmp_path / "other", "w1")
    (target / "front.key").write_bytes(other.front_public.read_bytes())
    with pytest.raises(ValueError, match="does not match"):
        generate_worker_keys(target, "w2")
    assert not (target / "w2.key").exists()


def test_worker_and_front_keys_authenticate_over_curve(tmp_path: Path) -> None:
    """The files work as a CURVE pair: a worker with its secret and front.key talks to a front
    with front.key_secret (what the remote link does; no authenticator needed for this)."""
    keys = generate_worker_keys(tmp_path / "k", "w1")
    front_pub, front_sec = zmq.auth.load_certificate(str(keys.front_secret))
    w_pub, w_sec = zmq.auth.load_certificate(str(keys.secret))
    assert front_sec is not None and w_sec is not None
    ctx = zmq.Context()
    try:
        server = ctx.socket(zmq.PAIR)
        server.curve_server = True
        server.curve_publickey, server.curve_secretkey = front_pub, front_sec
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client = ctx.socket(zmq.PAIR)
        client.curve_publickey, client.curve_secretkey = w_pub, w_sec
        client.curve_serverkey = zmq.auth.load_certificate(str(keys.front_public))[0]
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"hello")
        assert server.poll(5000) and server.recv() == b"hello"
    finally:
        ctx.destroy(linger=0)
