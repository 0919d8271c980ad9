"""The shared stores of benchmarks/multihost.py, spread over its three hosts, and how each loses a node.

- :class:`RedisStore`: a Redis Cluster with a node per host (``replicas=1``: a primary and a
  replica per host, each replica on another host than its primary); the primary on host C is lost
  (``loss="kill"``: SIGKILL), or host C's network (``loss="link"``: its veth down, so its peers'
  packets go unanswered and host C's own engine is cut off too).
- :class:`MooncakeStore`: a mooncake_master on host A and a segment holder (``mooncake_client``)
  on each host; the engines are pure clients (no segment of their own), so losing a holder loses
  a third of the pool and no engine. The holder on host C is lost (``loss="kill"``), or host C's
  network (``loss="link"``: transfers from its segment hang instead of failing; back after
  ``down_s``).

Each gives the engines' kvtier settings (:meth:`kvtier`), kills its victim (:meth:`lose`), then
waits for what follows the loss (:meth:`after_loss`: a failover, a node back, the master dropping
the segment) and returns its times.
"""

from __future__ import annotations

import time
import urllib.request

from kvtier.local_netns import Hosts
from kvtier.local_redis import RedisClusterProcs


class RedisStore:
    tier = "redis"

    def __init__(self, hosts: Hosts, replicas: int, node_timeout_ms: int, down_s: float, loss: str = "kill") -> None:
        self.hosts, self.replicas, self.down_s, self.loss = hosts, replicas, down_s, loss
        where = [(hosts.addr(i), hosts.wrap(i)) for i in range(3)]
        self.cluster = RedisClusterProcs(3 * (1 + replicas), hosts=where, replicas=replicas,
                                         node_timeout_ms=node_timeout_ms)
        self.roles = replica_of(self.cluster)
        self.victim = next(i for i, m in self.roles.items()
                           if m is None and self.cluster.nodes[i].host == hosts.addr(2))
        self.node_timeout_ms = node_timeout_ms

    def kvtier(self) -> dict:
        return {"redis_url": self.cluster.urls[:3], "redis_cluster": True}

    def describe(self) -> dict:
        nodes = self.cluster.nodes
        return {"nodes": [f"{s.host}:{s.port}" for s in nodes], "node_timeout_ms": self.node_timeout_ms,
                "replica_of": {nodes[i].url: None if m is None else nodes[m].url
                               for i, m in sorted(self.roles.items())}}

    def lose(self) -> str:
        if self.loss == "link":
            self.hosts.link_down(2)
            return f"host C's network ({self.hosts.addr(2)})"
        self.cluster.nodes[self.victim].kill()  # SIGKILL: a crash
        return self.cluster.nodes[self.victim].url

    def after_loss(self, t0: float) -> dict:
        if self.replicas:
            return {"failover_s": wait_failover(self.cluster, self.victim, t0)}
        time.sleep(self.down_s)
        if self.loss == "link":
            self.hosts.link_up(2)  # the partition heals: the node is back with what it held
        else:
            self.cluster.nodes[self.victim].start()  # same port and nodes.conf: it rejoins with its slots, empty
        self.cluster.wait_ok()
        return {"back_s": round(time.monotonic() - t0, 3)}

    def close(self) -> None:
        self.cluster.stop()


def replica_of(cluster: RedisClusterProcs) -> dict[int, int | None]:
    """Node index -> index of the node it replicates (None for a primary), as a live node sees it."""
    node = next(s for s in cluster.nodes if s.alive())  # node 0: host A, reachable in every run here
    with node.client() as c:
        view = c.execute_command("CLUSTER NODES")
    ids = {v["node_id"]: addr for addr, v in view.items()}
    index = {f"{s.host}:{s.port}": i for i, s in enumerate(cluster.nodes)}
    out: dict[int, int | None] = {}
    for addr, v in view.items():
        addr = addr.split("@")[0]
        if "master" in v["flags"] and "fail" not in v["flags"]:
            out[index[addr]] = None
        elif "slave" in v["flags"]:
            out[index[addr]] = index.get(ids.get(v["master_id"], "").split("@")[0])
    return out


def wait_failover(cluster: RedisClusterProcs, victim: int, t0: float, timeout_s: float = 60.0) -> float | None:
    """Seconds (since ``t0``) at which a replica of ``victim`` became a primary, as the cluster says."""
    deadline = time.monotonic() + timeout_s
    replicas = [i for i, m in replica_of(cluster).items() if m == victim]
    while time.monotonic() < deadline:
        try:
            if any(replica_of(cluster).get(i, 0) is None for i in replicas):
                return round(time.monotonic() - t0, 3)
        except Exception:  # noqa: BLE001 - a node mid-election may not answer
            pass
        time.sleep(0.05)
    return None


class MooncakeStore:
    tier = "mooncake"

    def __init__(self, hosts: Hosts, segment_bytes: int, client_ttl_s: int, down_s: float = 8.0,
                 loss: str = "kill") -> None:
        from kvtier.local_mooncake import MooncakeMaster, MooncakeSegment

        self.hosts, self.down_s, self.loss = hosts, down_s, loss
        self.client_ttl_s = client_ttl_s
        self.segments: list = []
        self.master = MooncakeMaster(host=hosts.addr(0), extra_args=(f"--client_ttl={client_ttl_s}",),
                                     wrap=hosts.wrap(0))
        try:
            for i in range(3):
                self.segments.append(MooncakeSegment(self.master, segment_bytes, host=hosts.addr(i),
                                                     wrap=hosts.wrap(i)))
        except BaseException:
            self.close()
            raise
        self.victim = 2
        self.segment_bytes = segment_bytes

    def kvtier(self) -> dict:
        return {"mooncake_master": self.master.address, "mooncake_metadata": self.master.metadata_url,
                "mooncake_segment_bytes": 0}

    def describe(self) -> dict:
        return {"master": self.master.address, "segments": [f"{s.host}:{s.port}" for s in self.segments],
                "segment_bytes": self.segment_bytes, "client_ttl_s": self.client_ttl_s}

    def lose(self) -> str:
        if self.loss == "link":
            self.hosts.link_down(self.victim)
            return f"host C's network ({self.hosts.addr(self.victim)})"
        self.segments[self.victim].kill()  # SIGKILL: the holder and its third of the pool gone
        return f"segment holder {self.segments[self.victim].host}:{self.segments[self.victim].port}"

    def after_loss(self, t0: float) -> dict:
        """When the master's metrics stop counting the lost segment's bytes (it dropped it); with
        ``loss="link"``, host C's network back ``down_s`` after that."""
        total = self._mounted()
        deadline = time.monotonic() + 3 * self.client_ttl_s + 30
        out: dict = {"segment_dropped_s": None}
        while time.monotonic() < deadline:
            now = self._mounted()
            if total is not None and now is not None and now < total:
                out["segment_dropped_s"] = round(time.monotonic() - t0, 3)
                break
            time.sleep(0.1)
        if self.loss == "link":
            time.sleep(self.down_s)
            self.hosts.link_up(self.victim)
            out["link_back_s"] = round(time.monotonic() - t0, 3)
        return out

    def _mounted(self) -> float | None:
        """Bytes of segments the master counts (its Prometheus ``/metrics``), or None."""
        try:
            text = urllib.request.urlopen(self.master.admin_url + "/metrics", timeout=2).read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("master_total_capacity_bytes "):
                return float(line.split()[-1])
        return None

    def close(self) -> None:
        for s in self.segments:
            s.stop()
        self.master.stop()
