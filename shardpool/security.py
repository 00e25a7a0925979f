"""Socket security: the private runtime directory, endpoint resolution, CURVE keys, endpoint locks.

* ipc:// sockets live in a runtime directory only the owner can enter (mode 0700): by default
  ``$XDG_RUNTIME_DIR/shardpool`` (systemd's per-user tmpfs) or ``<tmp>/shardpool-<uid>``, unless
  ``transport.runtime_dir`` names one. A socket file is also chmod-ed to 0600 right after bind.
  An existing directory that is a symlink or owned by someone else is refused (another user could
  otherwise pre-create it and watch or replace our sockets).
* A tcp ingress on a non-loopback address must use ZeroMQ CURVE (encryption + authentication)
  with an explicit list of authorised client keys; :func:`check_endpoints` refuses anything else
  before a socket exists. The control socket (which can stop the backend) never leaves the host.
* ``shardpool keys DIR`` (:func:`generate_keys`) writes a server and a client keypair;
  ``shardpool keys --worker ID DIR`` (:func:`generate_worker_keys`) a remote worker's keypair,
  pinned for the front, and the front's keypair if the directory has none yet.
* ZeroMQ's ipc bind silently replaces a socket file another process is listening on, so
  :func:`lock_endpoint` takes an ``flock`` on ``<socket>.lock`` first: a second ``shardpool run``
  on the same endpoint fails with a clear error instead of stealing the first one's socket.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from .config import WORKER_ID_RE, Config, IngressConfig
from .errors import ConfigError, EndpointInUse, InsecurePathError

__all__ = [
    "CurveServerKeys",
    "EndpointInUse",
    "EndpointLock",
    "InsecurePathError",
    "KeyFiles",
    "RemoteKeys",
    "WorkerKeyFiles",
    "check_endpoints",
    "check_ipc_path",
    "claim_endpoints",
    "default_runtime_dir",
    "ensure_private_dir",
    "generate_keys",
    "generate_worker_keys",
    "ipc_path",
    "is_loopback_endpoint",
    "load_client_keys",
    "load_public_key",
    "load_remote_keys",
    "lock_endpoint",
    "monitor_events",
    "resolve_endpoints",
    "runtime_dir",
    "secure_socket_file",
]

# sockaddr_un.sun_path is 108 bytes on Linux including the terminating NUL.
MAX_IPC_PATH_BYTES = 107


# ------------------------------------------------------------------------------ runtime directory


def default_runtime_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_RUNTIME_DIR/shardpool`` if that variable names an absolute directory, else
    ``<tempdir>/shardpool-<uid>``. Pure: creates nothing."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return Path(xdg) / "shardpool"
    return Path(tempfile.gettempdir()) / f"shardpool-{os.getuid()}"


def runtime_dir(cfg: Config, env: Mapping[str, str] | None = None) -> Path:
    """The directory for the default ipc endpoints: ``transport.runtime_dir`` or the default."""
    if cfg.transport.runtime_dir:
        return Path(cfg.transport.runtime_dir)
    return default_runtime_dir(env)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check an existing one; tighten it to 0700 if it is ours.

    Raises:
        InsecurePathError: ``path`` is a symlink, not a directory, or owned by another user.
        OSError: it cannot be created.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise InsecurePathError(f"runtime directory {path} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise InsecurePathError(f"runtime directory {path} exists and is not a directory")
    if st.st_uid != os.getuid():
        raise InsecurePathError(
            f"runtime directory {path} belongs to uid {st.st_uid}, not to this user "
            f"(uid {os.getuid()}); set transport.runtime_dir to a directory of your own"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def resolve_endpoints(cfg: Config, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(ingress, control)`` endpoints: the configured ones, or ipc sockets in the runtime dir.

    ``shardpool run`` and ``shardpool status`` both call this on the same config, which is how a
    ``status`` with no flags finds a ``run`` started with no flags. Creates nothing.
    """
    rundir = runtime_dir(cfg, env)
    ingress = cfg.ingress.endpoint or f"ipc://{rundir}/ingress"
    control = cfg.control.endpoint or f"ipc://{rundir}/control"
    return ingress, control


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ``ipc://`` endpoint, else None."""
    if endpoint.startswith("ipc://"):
        return Path(endpoint[len("ipc://") :])
    return None


def check_ipc_path(endpoint: str, key: str) -> None:
    """Check that an ipc endpoint's path fits in a unix socket address (nothing to check for
    other transports). Pure: ``shardpool check-config`` applies it too.

    Raises:
        ConfigError: the path is too long (naming ``key``).
    """
    path = ipc_path(endpoint)
    if path is not None and len(os.fsencode(path)) > MAX_IPC_PATH_BYTES:
        raise ConfigError(
            [
                (
                    key,
                    endpoint,
                    f"an ipc path of at most {MAX_IPC_PATH_BYTES} bytes (unix socket limit)",
                )
            ]
        )


def prepare_ipc(endpoint: str, key: str) -> None:
    """Before binding an ipc endpoint: check the path (:func:`check_ipc_path`) and create its
    directory privately (when it is missing, or is our runtime directory).

    Raises:
        ConfigError: the path is too long (naming ``key``).
        InsecurePathError: as :func:`ensure_private_dir`.
    """
    check_ipc_path(endpoint, key)
    path = ipc_path(endpoint)
    if path is None:
        return
    parent = path.parent
    if not parent.exists():
        ensure_private_dir(parent)


def secure_socket_file(endpoint: str) -> None:
    """chmod a freshly bound ipc socket file to 0600 (connecting to a unix socket needs write
    permission, so only the owner can connect whatever directory it is in)."""
    path = ipc_path(endpoint)
    if path is not None and path.exists():
        os.chmod(path, 0o600)


# ------------------------------------------------------------------------------ endpoint checks


def _tcp_host(endpoint: str) -> str | None:
    if not endpoint.startswith("tcp://"):
        return None
    host = endpoint[len("tcp://") :].rpartition(":")[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    # ZeroMQ allows "interface;address" source forms in connect only; bind takes host or iface.
    return host


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc/inproc endpoints and tcp endpoints bound to a loopback address or ``lo``."""
    host = _tcp_host(endpoint)
    if host is None:
        return True
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # "*", "0.0.0.0"-like wildcards, interface names and host names are all reachable from
        # elsewhere as far as we can tell.
        return False


@dataclass(frozen=True)
class CurveServerKeys:
    """The ingress socket's CURVE keypair (Z85 text) and the directory of authorised client
    public keys (``None``: any client that knows the server's public key)."""

    public: bytes
    secret: bytes
    clients_dir: str | None


def _read_keypair(
    section: str, pub_path: str, sec_path: str, problems: list[tuple[str, object, str]]
) -> tuple[bytes, bytes] | None:
    """The CURVE keypair of ``section``'s ``curve_public_key`` / ``curve_secret_key`` files
    (None when neither is set, or on a problem, which is appended)."""
    if not pub_path and not sec_path:
        return None
    if not pub_path or not sec_path:
        missing = f"{section}.curve_public_key" if not pub_path else f"{section}.curve_secret_key"
        problems.append(
            (missing, "", "both CURVE key files must be set, or neither (see `shardpool keys`)")
        )
        return None
    try:
        public = load_public_key(pub_path)
    except (OSError, ValueError) as exc:
        problems.append(
            (f"{section}.curve_public_key", pub_path, f"a readable CURVE key file ({exc})")
        )
        return None
    try:
        pub2, secret = zmq.auth.load_certificate(sec_path)
    except (OSError, ValueError) as exc:
        problems.append(
            (f"{section}.curve_secret_key", sec_path, f"a readable CURVE secret key file ({exc})")
        )
        return None
    if secret is None:
        problems.append(
            (f"{section}.curve_secret_key", sec_path, "a CURVE *secret* key file (*.key_secret)")
        )
        return None
    if pub2 != public:
        problems.append(
            (f"{section}.curve_secret_key", sec_path, f"the secret key matching {pub_path}")
        )
        return None
    return public, secret


def _read_server_keys(
    ing: IngressConfig, problems: list[tuple[str, object, str]]
) -> CurveServerKeys | None:
    pair = _read_keypair("ingress", ing.curve_public_key, ing.curve_secret_key, problems)
    if pair is None:
        return None
    clients = ing.curve_clients_dir or None
    if clients is not None and not os.path.isdir(clients):
        problems.append(
            ("ingress.curve_clients_dir", clients, "a directory of authorised client *.key files")
        )
        return None
    return CurveServerKeys(pair[0], pair[1], clients)


@dataclass(frozen=True)
class RemoteKeys:
    """The front's CURVE keypair for remote workers (Z85) and the pinned worker keys: public key
    (Z85) → worker id. Also the ZAP credentials provider: only a pinned key gets in."""

    public: bytes
    secret: bytes
    pinned: dict[bytes, str]

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's ZAP callback: is ``key`` (Z85) one of the pinned worker keys?"""
        return key in self.pinned


def load_remote_keys(cfg: Config) -> RemoteKeys | None:
    """Validate ``[remote]`` on the front's side and return its CURVE keys (None: plain tcp,
    allowed on a loopback ``bind`` only).

    Rules: ``bind`` and ``workers`` are set together; ``lease_s`` is at least twice the heartbeat
    interval; a non-loopback ``bind`` needs
    ``curve_public_key``, ``curve_secret_key`` and ``workers_dir``; with CURVE every worker id of
    ``workers`` has its public key pinned in ``workers_dir/<id>.key`` (the file name binds the
    id to the key), and no key is pinned to two ids.

    Raises:
        ConfigError: naming each offending key, its value and what is required.
    """
    r = cfg.remote
    problems: list[tuple[str, object, str]] = []
    if bool(r.bind) != bool(r.workers):
        problems.append(
            ("remote.workers" if r.bind else "remote.bind", dict(r.workers) if r.bind else "",
             "remote.bind and remote.workers are set together (an address for remote workers "
             "to connect to, and their ids)")
        )
    beat = cfg.supervisor.heartbeat_interval_s
    if r.workers and r.lease_s < 2 * beat:
        problems.append(("remote.lease_s", r.lease_s,
                         f"at least twice supervisor.heartbeat_interval_s ({beat:g} s): the lease "
                         "is renewed by the answers to the workers' heartbeats"))
    if "front" in r.workers:
        problems.append(("remote.workers", dict(r.workers),
                         'worker ids other than "front" (front.key is the front\'s own key)'))
    pair = _read_keypair("remote", r.curve_public_key, r.curve_secret_key, problems)
    keys: RemoteKeys | None = None
    if pair is not None:
        if not r.workers_dir or not os.path.isdir(r.workers_dir):
            problems.append(("remote.workers_dir", r.workers_dir,
                             "a directory of pinned worker public keys, <id>.key each "
                             "(`shardpool keys --worker ID DIR` writes DIR/workers/ID.key)"))
        else:
            pinned: dict[bytes, str] = {}
            for worker_id in r.workers:
                path = os.path.join(r.workers_dir, f"{worker_id}.key")
                try:
                    key = load_public_key(path)
                except (OSError, ValueError) as exc:
                    problems.append(("remote.workers_dir", r.workers_dir,
                                     f"the public key of worker {worker_id!r} in {path} ({exc})"))
                    continue
                if key in pinned:
                    problems.append(("remote.workers_dir", r.workers_dir,
                                     f"one key per worker: {path} is also worker "
                                     f"{pinned[key]!r}'s key"))
                pinned[key] = worker_id
            keys = RemoteKeys(pair[0], pair[1], pinned)
    elif r.bind and not problems and not is_loopback_endpoint(r.bind):
        problems.append((
            "remote.bind", r.bind,
            "a loopback address unless CURVE is set up: a non-loopback remote.bind requires "
            "remote.curve_public_key, remote.curve_secret_key and remote.workers_dir (run "
            "`shardpool keys --worker ID DIR`): a worker runs the pool's messages and an "
            "unauthenticated peer must never be one",
        ))
    if problems:
        raise ConfigError(problems)
    return keys


def check_endpoints(cfg: Config) -> CurveServerKeys | None:
    """Validate the security of the configured endpoints before anything is bound; return the
    ingress CURVE keys (None: no CURVE).

    Rules: a tcp ingress on a non-loopback address needs ``ingress.curve_public_key``,
    ``ingress.curve_secret_key`` and ``ingress.curve_clients_dir`` (an unauthenticated peer must
    not be able to inject channel messages); the control endpoint must be ipc or loopback tcp;
    ``[remote]`` as :func:`load_remote_keys` says.

    Raises:
        ConfigError: naming each offending key, its value and what is required.
    """
    problems: list[tuple[str, object, str]] = []
    keys = _read_server_keys(cfg.ingress, problems)
    endpoint = cfg.ingress.endpoint
    if not problems and not is_loopback_endpoint(endpoint):
        if keys is None:
            problems.append(
                (
                    "ingress.endpoint",
                    endpoint,
                    "a loopback address (tcp://127.0.0.1:PORT) or ipc, unless CURVE is set up: a "
                    "non-loopback ingress requires ingress.curve_public_key, "
                    "ingress.curve_secret_key and ingress.curve_clients_dir (run `shardpool keys "
                    "DIR` to create them)",
                )
            )
        elif keys.clients_dir is None:
            problems.append(
                (
                    "ingress.curve_clients_dir",
                    "",
                    "a directory of authorised client public keys: required for a non-loopback "
                    f"ingress ({endpoint}), or any peer that knows the server's public key could "
                    "send messages",
                )
            )
    if not is_loopback_endpoint(cfg.control.endpoint):
        problems.append(
            (
                "control.endpoint",
                cfg.control.endpoint,
                '"" (ipc in the runtime directory), "ipc://PATH" or a loopback tcp address: '
                "the control socket can drain and stop the backend, so it never listens beyond "
                "this host",
            )
        )
    try:
        load_remote_keys(cfg)  # the remote workers' link: CURVE beyond loopback, pinned keys
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return keys


def monitor_events(mon: zmq.Socket[bytes]) -> Iterator[int]:
    """The events waiting on a socket monitor (``get_monitor_socket``), read without blocking; a
    message that cannot be parsed is skipped."""
    from zmq.utils.monitor import parse_monitor_message

    while True:
        try:
            frames = mon.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            yield int(parse_monitor_message(frames)["event"])
        except Exception:  # noqa: BLE001 - a monitor message we cannot read changes nothing
            continue


# ------------------------------------------------------------------------------ CURVE key files


@dataclass(frozen=True)
class KeyFiles:
    """What :func:`generate_keys` wrote."""

    server_public: Path
    server_secret: Path
    client_public: Path
    client_secret: Path
    clients_dir: Path


def generate_keys(directory: Path, *, force: bool = False) -> KeyFiles:
    """Write a server and a client CURVE keypair into ``directory`` (created 0700), and authorise
    the client by copying its public key into ``directory/authorized_clients``.

    Files: ``server.key`` (public), ``server.key_secret``, ``client.key``, ``client.key_secret``
    (secret files mode 0600) and ``authorized_clients/client.key``.

    Raises:
        FileExistsError: a key file exists and ``force`` is false (keys are never overwritten by
            accident: a running backend or deployed producers may depend on them).
        InsecurePathError: as :func:`ensure_private_dir`.
    """
    ensure_private_dir(directory)
    clients = ensure_private_dir(directory / "authorized_clients")
    authorised = clients / "client.key"
    if not force:
        _refuse_existing(
            [directory / f"{n}{ext}" for n in ("server", "client") for ext in _KEY_SUFFIXES]
            + [authorised]
        )
    with _private_umask():
        server_public, server_secret = _new_keypair(directory, "server")
        client_public, client_secret = _new_keypair(directory, "client")
        authorised.write_bytes(client_public.read_bytes())
    return KeyFiles(server_public, server_secret, client_public, client_secret, clients)


_KEY_SUFFIXES = (".key", ".key_secret")


def _refuse_existing(paths: Iterable[Path]) -> None:
    """Raises FileExistsError for the first of ``paths`` that exists."""
    for path in paths:
        if path.exists():
            raise FileExistsError(
                errno.EEXIST, f"{path} exists (use --force to replace the keys)"
            )


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    """Umask 077 while key files are written: a secret file must never exist with looser
    permissions, not even for a moment."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _new_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``directory/<name>.key`` and ``<name>.key_secret`` (0600); call under
    :func:`_private_umask`. Existing files are removed first, since rewriting a file in place
    would keep its old (perhaps looser) mode. Returns ``(public, secret)``."""
    for ext in _KEY_SUFFIXES:
        (directory / f"{name}{ext}").unlink(missing_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key from a ZeroMQ certificate file (public or secret).

    Raises:
        OSError: unreadable. ValueError: not a certificate file.
    """
    public, _ = zmq.auth.load_certificate(os.fspath(path))
    if not public:
        raise ValueError(f"{path}: no public-key in this file")
    return public


def load_client_keys(secret_path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a client's ``*.key_secret`` file.

    Raises:
        OSError: unreadable. ValueError: not a secret certificate file.
    """
    public, secret = zmq.auth.load_certificate(os.fspath(secret_path))
    if not secret:
        raise ValueError(f"{secret_path}: not a secret key file (expected *.key_secret)")
    return public, secret


# ------------------------------------------------------------------------------ endpoint locks


class EndpointLock:
    """An exclusive ``flock`` on ``<socket path>.lock``, held while the socket is bound."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        # The lock file stays: unlinking it could let two processes lock two different inodes.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_endpoint(endpoint: str) -> EndpointLock | None:
    """Lock an ipc endpoint for this process (None for other transports, which fail to bind
    twice on their own).

    Raises:
        EndpointInUse: another live process holds it (its pid is named).
        OSError: the lock file cannot be created.
    """
    path = ipc_path(endpoint)
    if path is None:
        return None
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise EndpointInUse(
            f"{endpoint} is in use by another shardpool run (pid {owner}); stop it first "
            "(`shardpool stop`) or configure another endpoint"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return EndpointLock(lock, fd)


def claim_endpoints(
    cfg: Config, endpoints: Mapping[str, str], env: Mapping[str, str] | None = None
) -> list[EndpointLock]:
    """Ready the ipc endpoints of ``shardpool run`` before anything binds: the private runtime
    directory when a default endpoint lives there, each path checked (:func:`prepare_ipc`) and
    locked (:func:`lock_endpoint`). ``endpoints`` maps each config key to its endpoint. Returns
    the locks, to be released at shutdown; on failure, releases those taken and re-raises.

    Raises:
        as :func:`ensure_private_dir`, :func:`prepare_ipc` and :func:`lock_endpoint`.
    """
    locks: list[EndpointLock] = []
    try:
        if not cfg.ingress.endpoint or not cfg.control.endpoint:
            ensure_private_dir(runtime_dir(cfg, env))
        for key, endpoint in endpoints.items():
            prepare_ipc(endpoint, key)
            lock = lock_endpoint(endpoint)
            if lock is not None:
                locks.append(lock)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


# ------------------------------------------------------------------------------ remote worker keys


@dataclass(frozen=True)
class WorkerKeyFiles:
    """What :func:`generate_worker_keys` wrote or found: the worker's keypair, the front's pinned
    copy of its public key, and the front's keypair (``front_created``: made by this call)."""

    public: Path
    secret: Path
    pinned: Path
    front_public: Path
    front_secret: Path
    front_created: bool


_FRONT_KEY_NAME = "front"
_WORKER_ID_ALLOWED = "1-64 letters, digits, '_', '-', '.', not starting with '.', and not 'front'"


def _check_worker_id(worker_id: str) -> None:
    """Raises ValueError naming ``worker_id`` and what an id may be."""
    if WORKER_ID_RE.fullmatch(worker_id) is None or worker_id == _FRONT_KEY_NAME:
        # 'front' would name the front's own key files in the same directory.
        raise ValueError(f"worker id {worker_id!r} is not allowed: expected {_WORKER_ID_ALLOWED}")


def _front_keypair(directory: Path) -> tuple[Path, Path, bool]:
    """The front's keypair in ``directory``, created (under :func:`_private_umask`) when neither
    file exists. Returns ``(public, secret, created)``.

    Raises:
        FileNotFoundError: only one of the two files exists.
        ValueError: the secret file is not a secret key, or does not match the public one.
        OSError: a file is unreadable.
    """
    public = directory / f"{_FRONT_KEY_NAME}.key"
    secret = directory / f"{_FRONT_KEY_NAME}.key_secret"
    have_public, have_secret = public.exists(), secret.exists()
    if not have_public and not have_secret:
        public, secret = _new_keypair(directory, _FRONT_KEY_NAME)
        return public, secret, True
    if not (have_public and have_secret):
        # Never replace half a pair: workers may already trust this front.key.
        present, missing = (public, secret) if have_public else (secret, public)
        raise FileNotFoundError(
            errno.ENOENT,
            f"{missing} is missing but {present} exists; restore the pair or remove {present} "
            "to create a new front keypair (every worker then needs the new front.key)",
        )
    pub, _ = load_client_keys(secret)
    if pub != load_public_key(public):
        raise ValueError(f"{secret} does not match {public}")
    return public, secret, False


def generate_worker_keys(
    directory: Path, worker_id: str, *, force: bool = False
) -> WorkerKeyFiles:
    """Write a remote worker's CURVE keypair into ``directory`` (created 0700) and pin its public
    key for the front; create the front's keypair there too when it has none yet, so that one
    directory holds the keys of a small cluster.

    Files: ``<id>.key``, ``<id>.key_secret`` (0600), ``workers/<id>.key`` (a copy of the public
    key: ``remote.workers_dir`` is ``directory/workers``) and, once, ``front.key`` and
    ``front.key_secret`` (0600). An existing front keypair is reused, never replaced, even with
    ``force``: every deployed worker trusts it. The worker host needs ``<id>.key_secret`` and
    ``front.key``; the front host keeps ``front.key_secret`` and ``workers/``.

    Raises:
        ValueError: ``worker_id`` is not 1-64 characters of ``[A-Za-z0-9_.-]``, starts with
            ``'.'`` or is ``'front'`` (the message names it); or the existing front keypair does
            not match or is not a keypair.
        FileExistsError: one of the worker's files exists and ``force`` is false.
        FileNotFoundError: only one of ``front.key`` and ``front.key_secret`` exists.
        InsecurePathError: as :func:`ensure_private_dir`.
        OSError: a file cannot be read or written.
    """
    _check_worker_id(worker_id)
    ensure_private_dir(directory)
    pinned_dir = ensure_private_dir(directory / "workers")
    pinned = pinned_dir / f"{worker_id}.key"
    if not force:
        _refuse_existing([directory / f"{worker_id}{ext}" for ext in _KEY_SUFFIXES] + [pinned])
    with _private_umask():
        front_public, front_secret, created = _front_keypair(directory)
        public, secret = _new_keypair(directory, worker_id)
        pinned.unlink(missing_ok=True)
        pinned.write_bytes(public.read_bytes())
    return WorkerKeyFiles(public, secret, pinned, front_public, front_secret, created)
