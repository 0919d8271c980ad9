"""Real Mooncake processes for tests, benchmarks and demos: a master, and segment holders.

``mooncake_master`` keeps the object index; with ``--enable_http_metadata_server`` it also
serves the transfer engine's metadata over HTTP, so nothing else (etcd) is needed. Data
lives in *segments*: memory that clients mount into the pool. A kvtier tier may mount one
itself (``mooncake_segment_bytes``), or a separate ``mooncake_client`` process holds one
(:class:`MooncakeSegment`): killing that process is losing a node's share of the cache.

Both binaries ship in the ``mooncake-transfer-engine-non-cuda`` wheel (``pip install
kvtier[mooncake]``; they need the system library libibverbs1 even for TCP).

    with MooncakeMaster() as m:          # on 127.0.0.1, free ports
        m.address, m.metadata_url        # "127.0.0.1:PORT", "http://127.0.0.1:PORT/metadata"
        m.kill(); m.restart()            # a crash, then a master on the same ports

``host`` binds everything to another address (a network namespace's, for multi-host runs).
Note: the master's metadata HTTP server and a client's transfer port listen on all
interfaces whatever ``host`` says (Mooncake 0.3.13); use them on trusted networks only.
Processes are stopped by the callers' ``stop``; an ``atexit`` hook kills what is left.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence

from kvtier.local_proc import LocalProcess, free_port, port_open

HOST = "127.0.0.1"


def mooncake_binary(name: str) -> str | None:
    """Path of ``mooncake_master`` / ``mooncake_client``: beside the installed ``mooncake``
    package (where the wheel puts them), else on PATH."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("mooncake")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


class _Proc(LocalProcess):
    """A Mooncake process, ready once its ports accept connections."""

    def _args(self) -> list[str]:
        raise NotImplementedError

    def _ports(self) -> list[int]:
        """Ports that must accept connections before the process counts as ready."""
        raise NotImplementedError

    def start(self, timeout_s: float = 20.0) -> None:
        if self.alive():
            return
        deadline = time.monotonic() + timeout_s
        while True:
            # Their full log in the log file (a kvtier tier in this process may have turned
            # Mooncake's log down in os.environ; readiness checks read this log).
            self._spawn(self._args(), env=dict(os.environ, MC_LOG_LEVEL="INFO"))
            while not all(port_open(self.host, p) for p in self._ports()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return
            code = self.proc.poll()
            self.kill()
            # A killed process's port may not be free yet (the master exits at once when its
            # metadata port is taken): try again until the deadline.
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.what} did not listen on {self.host}:{self._ports()} in {timeout_s}s "
                                   f"(exit code {code}); log: {self.log_tail()}")
            time.sleep(0.2)


class MooncakeMaster(_Proc):
    """``mooncake_master`` on ``host`` with its HTTP metadata server, on free ports unless given."""

    what = "mooncake-master"

    def __init__(self, host: str = HOST, port: int | None = None, metadata_port: int | None = None,
                 admin_port: int | None = None, extra_args: tuple[str, ...] = (), workdir: str | None = None,
                 start: bool = True, wrap: Sequence[str] = ()) -> None:
        """``extra_args``: more master flags, e.g. ``("--client_ttl=3",)`` (seconds after which a
        silent client's segment is dropped; 10 by default). ``wrap``: a command prefix, e.g.
        ``("ip", "netns", "exec", "hostA")`` (``host`` must then be reachable from here)."""
        binary = mooncake_binary("mooncake_master")
        if binary is None:
            raise RuntimeError("mooncake_master not found: pip install 'kvtier[mooncake]' "
                               "(and apt-get install -y libibverbs1)")
        super().__init__(host, workdir, wrap)
        self.binary = binary
        self.port = port or free_port()
        self.metadata_port = metadata_port or free_port()
        self.admin_port = admin_port or free_port()
        self.extra_args = tuple(extra_args)
        if start:
            self.start()

    @property
    def address(self) -> str:
        """What a client's ``master_server_addr`` (kvtier: ``mooncake_master``) is."""
        return f"{self.host}:{self.port}"

    @property
    def metadata_url(self) -> str:
        """What a client's ``metadata_server`` (kvtier: ``mooncake_metadata``) is."""
        return f"http://{self.host}:{self.metadata_port}/metadata"

    @property
    def admin_url(self) -> str:
        """The master's admin/metrics HTTP server (``/get_all_keys``, ``/metrics``)."""
        return f"http://{self.host}:{self.admin_port}"

    def _ports(self) -> list[int]:
        return [self.port, self.metadata_port, self.admin_port]

    def _args(self) -> list[str]:
        h = self.host
        return [self.binary, f"--rpc_address={h}", f"--rpc_port={self.port}",
                "--enable_http_metadata_server=true", f"--http_metadata_server_host={h}",
                f"--http_metadata_server_port={self.metadata_port}", f"--metrics_host={h}",
                f"--metrics_port={self.admin_port}", "--rpc_thread_num=2", *self.extra_args]


class MooncakeSegment(_Proc):
    """A ``mooncake_client`` process holding ``size`` bytes of the pool (a "segment holder")."""

    what = "mooncake-segment"

    def __init__(self, master: MooncakeMaster, size: int = 1 << 30, host: str | None = None,
                 port: int | None = None, workdir: str | None = None, start: bool = True,
                 wrap: Sequence[str] = ()) -> None:
        """``host``: the address the holder listens on and others reach it at (default the master's);
        ``wrap``: a command prefix as for :class:`MooncakeMaster`."""
        binary = mooncake_binary("mooncake_client")
        if binary is None:
            raise RuntimeError("mooncake_client not found: pip install 'kvtier[mooncake]'")
        super().__init__(host or master.host, workdir, wrap)
        self.binary = binary
        self.master = master
        self.size = size
        self.port = port or free_port()
        if start:
            self.start()

    def _ports(self) -> list[int]:
        return [self.port]

    def _args(self) -> list[str]:
        return [self.binary, f"--host={self.host}", f"--port={self.port}",
                f"--global_segment_size={self.size}", f"--master_server_address={self.master.address}",
                f"--metadata_server={self.master.metadata_url}", "--protocol=tcp"]

    def start(self, timeout_s: float = 20.0) -> None:
        before = self._log_size()
        super().start(timeout_s)
        # The service port opens before the segment is mounted; wait until this run logs it.
        deadline = time.monotonic() + timeout_s
        while "Mounting segment" not in self._log_since(before) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""
