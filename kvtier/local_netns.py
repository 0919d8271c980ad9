"""Several "hosts" on one machine: Linux network namespaces joined by a bridge (tests, benchmarks).

Each host is a namespace ``{tag}-h{i}`` with one veth ``eth0`` at ``{subnet}.{i+1}/24``; the
other ends of the veths sit on a bridge ``{tag}-br`` in the root namespace, which gets
``{subnet}.254`` so that the parent process (root namespace) reaches every host too. A process
runs on host ``i`` when started under :meth:`Hosts.wrap` (``ip netns exec NAME ...``, which
``exec``s the command: the process id is the command's own).

Needs root (CAP_NET_ADMIN) and the ``ip`` tool. :func:`namespaces_supported` says why not when
they are missing. Everything named after ``tag`` is removed on exit, and at start (what a crashed
run left behind), processes still in those namespaces first (they are this tool's own: nothing
else is started in a namespace it named).

    with Hosts(3, tag="kvtmh", subnet="10.77.0") as hosts:
        subprocess.run([*hosts.wrap(0), "redis-server", "--bind", hosts.addr(0)])
        hosts.link_down(1)   # host 1 drops off the network (its processes keep running)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {out.stderr.strip()}")
    return out


def namespaces_supported() -> str | None:
    """None if network namespaces can be made here, else why not (a skip reason)."""
    if shutil.which("ip") is None:
        return "the ip tool (iproute2) is not installed: apt-get install -y iproute2"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run as root"
    name = f"kvtprobe{os.getpid()}"
    out = _ip("netns", "add", name, check=False)
    if out.returncode != 0:
        return f"ip netns add is not permitted here: {out.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class Hosts:
    """``n`` network namespaces on one bridge; removed on :meth:`close` (and at start if left over)."""

    def __init__(self, n: int = 3, tag: str = "kvtmh", subnet: str = "10.77.0") -> None:
        if not 1 <= n <= 250:
            raise ValueError(f"n={n}: between 1 and 250 hosts")
        if len(tag) > 8:  # interface names are at most 15 characters: TAG-v250 / TAG-br
            raise ValueError(f"tag={tag!r}: at most 8 characters (Linux interface names are short)")
        self.n, self.tag, self.subnet = n, tag, subnet
        self.bridge = f"{tag}-br"
        self.names = [f"{tag}-h{i}" for i in range(n)]
        cleanup(tag)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{subnet}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, ns in enumerate(self.names):
                veth = self._veth(i)
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def _veth(self, i: int) -> str:
        return f"{self.tag}-v{i}"

    def addr(self, i: int) -> str:
        """The address of host ``i`` on the bridge."""
        return f"{self.subnet}.{i + 1}"

    def wrap(self, i: int) -> list[str]:
        """The command prefix that runs a program on host ``i``."""
        return ["ip", "netns", "exec", self.names[i]]

    def link_down(self, i: int) -> None:
        """Cut host ``i`` off the bridge (a host lost: its peers' packets go unanswered)."""
        _ip("link", "set", self._veth(i), "down")

    def link_up(self, i: int) -> None:
        _ip("link", "set", self._veth(i), "up")

    def close(self) -> None:
        cleanup(self.tag)

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cleanup(tag: str) -> None:
    """Remove the namespaces, veths and bridge named after ``tag``, killing processes left in them."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    names = [line.split()[0] for line in listed if line.split() and line.split()[0].startswith(f"{tag}-h")]
    for ns in names:
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline and _ip("netns", "pids", ns, check=False).stdout.strip():
            time.sleep(0.05)
        _ip("netns", "del", ns, check=False)  # takes its veth ends with it
    links = _ip("-o", "link", "show", check=False).stdout.splitlines()
    for line in links:
        parts = line.split(": ")
        if len(parts) > 1 and parts[1].split("@")[0].startswith(f"{tag}-"):
            _ip("link", "del", parts[1].split("@")[0], check=False)
