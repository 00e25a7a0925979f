"""Simulated hosts on one machine: Linux network namespaces on a private bridge.

A test helper, not a test file. ``Hosts(count)`` creates, for this run only:

* a Linux bridge in the root namespace holding the "front" address (``.1`` of a private
  ``10.231.X.0/24`` chosen at random per run, never one ``ip -4 addr``/``ip -4 route`` already
  shows);
* one network namespace per simulated host, joined to the bridge by a veth pair, with the
  host's address ``.(N+10)`` on its veth end and ``lo`` up.

Nothing else is touched: no default route in the namespaces, no NAT, no forwarding or other
sysctl changes. Bridged traffic between the front and the hosts is delivered locally by the
bridge, so ``net.ipv4.ip_forward`` does not matter. If ``br_netfilter`` is loaded with
``bridge-nf-call-iptables=1``, iptables rules may filter bridged frames; the helper leaves that
alone and names it in the error if the connectivity check fails.

Everything is removed on exit, even when the body raises: processes started with ``popen`` (and
anything else left in the namespaces) are terminated, waited for and killed if need be; the
veth pairs, namespaces and bridge are deleted.

Every test that uses it should call ``require_netns()`` first (``Hosts`` does too), which skips
the test with a reason where namespaces cannot be created (not root, no ``ip``, ``ip netns add``
refused).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import TracebackType
from typing import Any

import pytest

# Per-run names look like "sp1a2b-br", "sp1a2b-h3" (root side of host 3's veth), "sp1a2b-n3"
# (its peer inside the namespace), "sp1a2b-3" (the namespace): at most 10 characters for
# count <= 99, well under the 15-character limit of interface names.
_MAX_HOSTS = 99
_PREFIX_LEN = 24
_CMD_TIMEOUT_S = 20.0
_CONNECT_CHECK_S = 10.0
_REAP_TIMEOUT_S = 3.0

_netns_skip_reason: str | None = None
_netns_checked = False

# Run inside a namespace by the connectivity check: connect to the front, retrying until a
# deadline, and send one line naming the host.
_CHECK_SCRIPT = """\
import socket, sys, time
addr, port, name, budget = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
deadline = time.monotonic() + budget
while True:
    try:
        with socket.create_connection((addr, port), timeout=1.0) as s:
            s.sendall(name.encode() + b"\\n")
        sys.exit(0)
    except OSError as e:
        if time.monotonic() >= deadline:
            print(f"connect {addr}:{port} failed: {e}", file=sys.stderr)
            sys.exit(1)
        time.sleep(0.05)  # sleep-ok: retry pacing while the link comes up, bounded by deadline
"""


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command, capturing its output; raise with its stderr if it fails."""
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed (rc {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def _probe() -> str | None:
    """Return why namespaces cannot be used here, or None if they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    try:
        if _run(["ip", "-V"], check=False).returncode != 0:
            return "`ip -V` failed"
        name = f"sp{secrets.token_hex(2)}-probe"
        add = _run(["ip", "netns", "add", name], check=False)
        if add.returncode != 0:
            return f"`ip netns add` failed: {add.stderr.strip()}"
        try:
            # The link types the helper needs, made inside the probe namespace so that deleting
            # it removes them and the root namespace is never touched.
            for argv in (
                ["ip", "-n", name, "link", "add", "pbr", "type", "bridge"],
                ["ip", "-n", name, "link", "add", "pva", "type", "veth", "peer", "name", "pvb"],
            ):
                made = _run(argv, check=False)
                if made.returncode != 0:
                    return f"`{' '.join(argv)}` failed: {made.stderr.strip()}"
        finally:
            deleted = _run(["ip", "netns", "del", name], check=False)
        if deleted.returncode != 0:
            return f"`ip netns del` failed: {deleted.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"running `ip` failed: {e}"
    return None


def require_netns() -> None:
    """Skip the calling test unless network namespaces can be created and deleted here.

    Needs root, a working ``ip``, and a probe namespace (with a bridge and a veth pair inside it)
    that can be created and deleted. The probe runs once per process; its result is reused.
    """
    global _netns_checked, _netns_skip_reason
    if not _netns_checked:
        _netns_skip_reason = _probe()
        _netns_checked = True
    if _netns_skip_reason is not None:
        pytest.skip(f"network namespaces unavailable: {_netns_skip_reason}")


def _bridge_netfilter_note() -> str:
    """Name br_netfilter if it makes iptables see bridged traffic (it may be filtering it)."""
    path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    try:
        with open(path) as f:
            on = f.read().strip() == "1"
    except OSError:
        return ""
    if not on:
        return ""
    return (
        "; note: br_netfilter is loaded with net.bridge.bridge-nf-call-iptables=1, so iptables "
        "rules (FORWARD/INPUT) may be dropping the bridged traffic"
    )


class Hosts:
    """``count`` simulated hosts in network namespaces, on a private bridge with a front address.

    Use as a context manager: ``__enter__`` builds everything and checks that every host can
    reach ``front_addr`` over TCP; ``__exit__`` reaps the processes and removes everything.
    """

    front_addr: str
    prefix: str
    subnet: str
    bridge: str

    def __init__(self, count: int) -> None:
        """Describe ``count`` hosts (1..99); nothing is created until ``__enter__``."""
        if not 1 <= count <= _MAX_HOSTS:
            raise ValueError(f"count must be in 1..{_MAX_HOSTS}, not {count}")
        self.count = count
        self.prefix = ""
        self.subnet = ""
        self.front_addr = ""
        self.bridge = ""
        self._base = ""
        self._procs: list[subprocess.Popen[bytes]] = []
        self._netem: set[int] = set()
        self._made_bridge = False
        self._made_ns: list[int] = []
        self._made_veth: list[int] = []
        self._entered = False

    # -- names and addresses ------------------------------------------------------------------

    def _check_host(self, host: int) -> None:
        if not 1 <= host <= self.count:
            raise ValueError(f"host must be in 1..{self.count}, not {host}")

    def addr(self, host: int) -> str:
        """The IPv4 address of ``host`` (1..count): ``.(host+10)`` of this run's /24."""
        self._check_host(host)
        return f"{self._base}.{host + 10}"

    def ns(self, host: int) -> str:
        """The name of ``host``'s network namespace (for ``ip netns exec``/``ip -n``)."""
        self._check_host(host)
        return f"{self.prefix}-{host}"

    def _veth_root(self, host: int) -> str:
        return f"{self.prefix}-h{host}"

    def _veth_ns(self, host: int) -> str:
        return f"{self.prefix}-n{host}"

    # -- setup ---------------------------------------------------------------------------------

    def _pick_names(self) -> None:
        links = _run(["ip", "-o", "link", "show"]).stdout
        spaces = _run(["ip", "netns", "list"]).stdout
        for _ in range(100):
            prefix = f"sp{secrets.token_hex(2)}"
            if not re.search(rf"\b{prefix}-", links + spaces):
                self.prefix = prefix
                self.bridge = f"{prefix}-br"
                return
        raise RuntimeError("no free name prefix found")

    def _pick_subnet(self) -> None:
        used = _run(["ip", "-4", "addr"]).stdout + _run(["ip", "-4", "route"]).stdout
        choices = list(range(1, 251))
        random.shuffle(choices)
        for x in choices:
            base = f"10.231.{x}"
            if f"{base}." not in used:
                self._base = base
                self.subnet = f"{base}.0/{_PREFIX_LEN}"
                self.front_addr = f"{base}.1"
                return
        raise RuntimeError("every 10.231.X.0/24 is already in use here")

    def _build(self) -> None:
        br = self.bridge
        _run(["ip", "link", "add", br, "type", "bridge", "forward_delay", "0", "stp_state", "0"])
        self._made_bridge = True
        _run(["ip", "addr", "add", f"{self.front_addr}/{_PREFIX_LEN}", "dev", br])
        _run(["ip", "link", "set", br, "up"])
        for host in range(1, self.count + 1):
            ns, vr, vn = self.ns(host), self._veth_root(host), self._veth_ns(host)
            _run(["ip", "netns", "add", ns])
            self._made_ns.append(host)
            _run(["ip", "link", "add", vr, "type", "veth", "peer", "name", vn, "netns", ns])
            self._made_veth.append(host)
            _run(["ip", "link", "set", vr, "master", br])
            _run(["ip", "link", "set", vr, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addr(host)}/{_PREFIX_LEN}", "dev", vn])
            _run(["ip", "-n", ns, "link", "set", vn, "up"])

    def _check_connectivity(self) -> None:
        """Every host connects to a listener on ``front_addr`` (retrying to a deadline)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
            srv.bind((self.front_addr, 0))
            srv.listen(self.count + 8)
            port = srv.getsockname()[1]
            checks = {
                host: self.popen(
                    host,
                    [sys.executable, "-c", _CHECK_SCRIPT, self.front_addr, str(port),
                     str(host), str(_CONNECT_CHECK_S)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                for host in range(1, self.count + 1)
            }
            failed: list[str] = []
            deadline = time.monotonic() + _CONNECT_CHECK_S + 5.0
            for host, proc in checks.items():
                try:
                    _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    failed.append(f"host {host}: check timed out")
                    continue
                if proc.returncode != 0:
                    failed.append(f"host {host}: {err.decode(errors='replace').strip()}")
            for proc in checks.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=_REAP_TIMEOUT_S)
                self._procs.remove(proc)
        if failed:
            raise RuntimeError(
                "hosts cannot reach the front: " + "; ".join(failed) + _bridge_netfilter_note()
            )

    def __enter__(self) -> Hosts:
        """Create the bridge, namespaces and veth pairs; return once every host reaches the front.

        Skips the test (``pytest.skip``) where namespaces are unavailable; on any other failure,
        removes whatever was made and raises.
        """
        require_netns()
        if self._entered:
            raise RuntimeError("Hosts is not reentrant")
        self._entered = True
        try:
            self._pick_names()
            self._pick_subnet()
            self._build()
            self._check_connectivity()
        except BaseException:
            self._cleanup(raising=False)
            raise
        return self

    # -- use -----------------------------------------------------------------------------------

    def popen(self, host: int, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host``'s namespace (``ip netns exec NS argv...``).

        ``kw`` goes to ``subprocess.Popen`` (``env``, ``stdout``, ...). The process is reaped on
        exit: terminated, waited for, then killed. (``ip netns exec`` execs ``argv``, so the
        returned process is ``argv`` itself.)
        """
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *argv], **kw
        )
        self._procs.append(proc)
        return proc

    def link_down(self, host: int) -> None:
        """Partition ``host``: set its veth end in the root namespace down."""
        _run(["ip", "link", "set", self._veth_root(host), "down"])

    def link_up(self, host: int) -> None:
        """Heal a partition made by ``link_down``: set the root-side veth end up again."""
        _run(["ip", "link", "set", self._veth_root(host), "up"])

    def netem(self, host: int, spec: str | None) -> None:
        """Impair ``host``'s link both ways with ``tc ... netem <spec>`` (``None`` removes it).

        ``spec`` is netem's argument string, e.g. ``"delay 50ms loss 5%"``; it is applied as the
        root qdisc of both veth ends (the root-side one shapes traffic to the host, the one in
        the namespace traffic from it).
        """
        self._check_host(host)
        sides = (["tc"], ["ip", "netns", "exec", self.ns(host), "tc"])
        devs = (self._veth_root(host), self._veth_ns(host))
        if spec is None:
            if host in self._netem:
                for tc, dev in zip(sides, devs, strict=True):
                    # check=False: one side may never have been set if a replace failed.
                    _run([*tc, "qdisc", "del", "dev", dev, "root"], check=False)
                self._netem.discard(host)
            return
        self._netem.add(host)
        for tc, dev in zip(sides, devs, strict=True):
            _run([*tc, "qdisc", "replace", "dev", dev, "root", "netem", *spec.split()])

    # -- teardown ------------------------------------------------------------------------------

    def _reap(self) -> list[str]:
        errors: list[str] = []
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + _REAP_TIMEOUT_S
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout=_REAP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    errors.append(f"pid {proc.pid} did not die")
        # Anything else still in a namespace (grandchildren of popen'ed processes): kill it, or
        # the namespace would outlive its deletion.
        for host in self._made_ns:
            pids = _run(["ip", "netns", "pids", self.ns(host)], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        return errors

    def _cleanup(self, *, raising: bool) -> None:
        errors: list[str] = []
        try:
            errors += self._reap()
        finally:
            # Delete each veth pair from the root side first: deleting a namespace frees its
            # devices asynchronously, so the root-side end could linger for a moment otherwise.
            for host in self._made_veth:
                r = _run(["ip", "link", "del", self._veth_root(host)], check=False)
                if r.returncode != 0:
                    errors.append(r.stderr.strip())
            self._made_veth = []
            for host in self._made_ns:
                r = _run(["ip", "netns", "del", self.ns(host)], check=False)
                if r.returncode != 0:
                    errors.append(r.stderr.strip())
            self._made_ns = []
            if self._made_bridge:
                r = _run(["ip", "link", "del", self.bridge], check=False)
                if r.returncode != 0:
                    errors.append(r.stderr.strip())
                self._made_bridge = False
            self._netem.clear()
        if errors and raising:
            raise RuntimeError("netns cleanup failed: " + "; ".join(errors))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Reap processes, delete the veth pairs, namespaces and bridge (even after an error).

        A cleanup failure is raised only when the body itself did not raise.
        """
        self._cleanup(raising=exc is None)
