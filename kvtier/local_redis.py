"""Real ``redis-server`` processes for tests, benchmarks and demos: one server, or a 3-node cluster.

Everything listens on 127.0.0.1 unless given another address (a node in a network namespace,
``kvtier.local_netns``), keeps no data on disk (``--save ''``,
``--appendonly no``) and runs in its own temp directory. Processes are stopped by the
fixtures' finalizers; an ``atexit`` hook kills whatever is left as a backstop.

    with RedisServer() as srv:      # srv.url == "redis://127.0.0.1:PORT"
        srv.kill(); srv.restart()   # a crash, then the same server back on the same port
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence

import redis

from kvtier.local_proc import HOST, LocalProcess, free_port  # noqa: F401 - free_port: for importers



def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer(LocalProcess):
    """One ``redis-server`` on 127.0.0.1:``port`` (a free port unless given).

    ``host`` and ``wrap``: listen on ``host`` instead, started under the command prefix ``wrap``
    (``ip netns exec NAME``: a server on another "host", see :mod:`kvtier.local_netns`); such a
    server needs its ``port`` given (the free-port probe sees only this namespace)."""

    what = "redis"
    log_name = "redis.log"

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = (), workdir: str | None = None,
                 start: bool = True, host: str = HOST, wrap: Sequence[str] = ()) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        if port is None and (wrap or host != HOST):
            raise ValueError(f"a redis-server on {host} (wrap={list(wrap)}) needs its port given")
        cluster = "--cluster-enabled" in extra_args
        self.port = port or free_port(cluster_bus=cluster)
        super().__init__(host, workdir, wrap, dir_prefix=f"kvtier-redis-{self.port}-")
        self.binary = binary
        self.extra_args = tuple(extra_args)
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def client(self, **kw) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_connect_timeout=1, socket_timeout=5, **kw)

    def start(self, timeout_s: float = 10.0) -> None:
        if self.alive():
            return
        args = [self.binary, "--bind", self.host, "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--dir", self.workdir, "--daemonize", "no",
                # Protected mode refuses every non-loopback client; a namespace's address is
                # reached only over this machine's private bridge.
                "--protected-mode", "yes" if self.host == HOST else "no",
                "--logfile", self.log_path, *self.extra_args]
        self._spawn(args, log=False)  # it writes its own log file
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}; "
                                   f"log: {self.log_tail()}")
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {timeout_s}s")
            time.sleep(0.02)

class RedisClusterProcs:
    """A Redis Cluster of ``n`` nodes on loopback ports: ``n`` primaries, or with ``replicas=1``
    ``n/2`` primaries each with a replica (redis-cli puts a replica on another host than its
    primary when it can).

    Started with ``cluster-require-full-coverage no`` so that, with one node down, the
    others keep serving their slots (what a tier-failure test needs to observe).

    ``hosts``: (address, command prefix) pairs; node ``i`` runs on ``hosts[i % len(hosts)]``
    at port ``base_port + i`` (nodes in network namespaces, :mod:`kvtier.local_netns`).
    """

    def __init__(self, n: int = 3, node_timeout_ms: int = 2000, hosts: Sequence[tuple[str, Sequence[str]]] = (),
                 replicas: int = 0, base_port: int = 7000) -> None:
        self.root = tempfile.mkdtemp(prefix="kvtier-cluster-")
        self.nodes: list[RedisServer] = []
        try:
            for i in range(n):
                d = os.path.join(self.root, f"node{i}")
                args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", str(node_timeout_ms),
                        "--cluster-require-full-coverage", "no")
                where = {}
                if hosts:
                    addr, wrap = hosts[i % len(hosts)]
                    where = dict(host=addr, wrap=wrap, port=base_port + i)
                self.nodes.append(RedisServer(extra_args=args, workdir=d, **where))
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is not installed (it comes with apt-get install redis-server)")
            out = subprocess.run([cli, "--cluster", "create", *[f"{s.host}:{s.port}" for s in self.nodes],
                                  "--cluster-replicas", str(replicas), "--cluster-yes"],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
            self.wait_ok()
            if replicas:
                self.wait_replicas(n - n // (1 + replicas))
        except BaseException:
            self.stop()
            raise

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.nodes]

    def _wait_every_node(self, ready, timeout_s: float, what: str) -> None:
        """Wait until ``ready(client)`` holds on every running node."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if all(ready(c) for c in self._clients_of_running()):
                    return
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster: {what} in {timeout_s}s")
            time.sleep(0.05)

    def _clients_of_running(self):
        for s in self.nodes:
            if s.alive():
                with s.client() as c:
                    yield c

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Wait until every running node reports cluster_state:ok and knows all slots."""
        def ok(c: redis.Redis) -> bool:
            info = c.execute_command("CLUSTER INFO")
            info = info.decode() if isinstance(info, bytes) else info
            state = info.get("cluster_state") if isinstance(info, dict) else None
            return state == "ok" or "cluster_state:ok" in str(info)

        self._wait_every_node(ok, timeout_s, "cluster_state:ok not reached")

    def wait_replicas(self, count: int, timeout_s: float = 30.0) -> None:
        """Wait until every running node sees ``count`` replicas and each replica's link to its
        primary is up (its first sync done): ``cluster create`` returns before both."""
        def linked(c: redis.Redis) -> bool:
            nodes = c.execute_command("CLUSTER NODES")
            seen = sum("slave" in v["flags"] for v in nodes.values()) if isinstance(nodes, dict) else 0
            info = c.info("replication")
            return seen == count and (info.get("role") != "slave" or info.get("master_link_status") == "up")

        self._wait_every_node(linked, timeout_s, f"{count} replicas not all linked to their primaries")

    def node_of(self, key: bytes) -> int:
        """Index in ``nodes`` of the node that owns ``key``'s slot."""
        slot = redis.crc.key_slot(key)
        with next(s for s in self.nodes if s.alive()).client() as c:
            for entry in c.execute_command("CLUSTER SLOTS"):
                start, end, primary = entry[0], entry[1], entry[2]
                if start <= slot <= end:
                    host, port = primary[0], int(primary[1])
                    host = host.decode() if isinstance(host, bytes) else str(host)
                    return next(i for i, s in enumerate(self.nodes) if s.port == port and s.host == host)
        raise KeyError(slot)

    def flushall(self) -> None:
        for s in self.nodes:
            if s.alive():
                with s.client() as c:
                    c.flushall()

    def stop(self) -> None:
        for s in self.nodes:
            s.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "RedisClusterProcs":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
