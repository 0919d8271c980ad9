"""Three hosts on one machine (network namespaces on a bridge) sharing a 3-node Redis Cluster or a
Mooncake pool with a segment holder on each host.

A tier on each host (tests/multihost_peer.py, one process per namespace): what host A writes, B
and C read byte for byte. Redis: a node killed (SIGKILL) makes its chunks misses, never errors
or wrong bytes, while the other nodes keep answering; the node back (empty) takes writes again; a
host cut off the network costs one timeout, then nothing. Mooncake: a segment holder killed makes
its chunks misses (the rest still hit), the master drops its segment, rewritten chunks land in the
others. The engine flow over the same setup is benchmarks/multihost.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require_mooncake, require_redis
from kvtier.local_netns import Hosts, namespaces_supported
from kvtier.local_redis import RedisClusterProcs

sys.path.insert(0, str(Path(__file__).parent))
from multihost_peer import key_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RETRY_AFTER_S = 1.0


class Peer:
    """A multihost_peer.py process on one host."""

    def __init__(self, wrap: list[str], **args: object) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        args = json.dumps({**args, "retry_after_s": RETRY_AFTER_S})
        self.proc = subprocess.Popen([*wrap, sys.executable, str(Path(__file__).parent / "multihost_peer.py"), args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)

    def wait_ready(self) -> None:
        assert self._read("start", 120.0).get("ready"), "the peer did not set its tier up"

    def call(self, op: str, seeds: list[int] | None = None, timeout_s: float = 120.0) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, "seeds": seeds or []}) + "\n")
        self.proc.stdin.flush()
        return self._read(op, timeout_s)

    def _read(self, op: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:  # lines that are not ours (a library printing to stdout) are skipped
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"peer gave no answer to {op} in {timeout_s}s (exit code {self.proc.poll()})"
            line = self.proc.stdout.readline()
            assert line, f"peer exited during {op} (exit code {self.proc.wait(10)})"
            if line.startswith("{"):
                break
        reply = json.loads(line)
        assert "error" not in reply, reply["error"]
        return reply

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def three_hosts():
    require_redis()
    reason = namespaces_supported()
    if reason:
        pytest.skip(f"three hosts need network namespaces: {reason}")
    with Hosts(3, tag="kvtt", subnet="10.78.0") as hosts:
        yield hosts


def test_three_hosts_share_a_cluster_and_lose_a_node(three_hosts):
    hosts = three_hosts
    with RedisClusterProcs(3, hosts=[(hosts.addr(i), hosts.wrap(i)) for i in range(3)]) as cluster:
        peers = [Peer(hosts.wrap(i), urls=cluster.urls) for i in range(3)]
        try:
            for p in peers:
                p.wait_ready()
            run_scenario(hosts, cluster, peers)
        finally:
            for p in peers:
                p.close()


def owner_of(cluster: RedisClusterProcs, seed: int) -> int:
    return cluster.node_of(b"mh:" + key_of(seed).hex().encode())


def run_scenario(hosts: Hosts, cluster: RedisClusterProcs, peers: list[Peer]) -> None:
    a, b, c = peers
    seeds = list(range(48))
    owner = [owner_of(cluster, s) for s in seeds]
    assert set(owner) == {0, 1, 2}, "the chunks should be spread over all three nodes"
    assert all(a.call("put", seeds)["ok"])
    for peer in (b, c):  # what A wrote, B and C read, byte for byte
        got = peer.call("get", seeds)
        assert all(got["ok"]) and all(got["same"])

    # Node 2 (on host C) crashes: its chunks miss on every host, the others still hit.
    cluster.nodes[2].kill()
    for peer in (b, c):
        got = peer.call("get", seeds)
        assert got["ok"] == [o != 2 for o in owner]
        assert all(got["same"])
    fresh = list(range(100, 148))
    fresh_owner = [owner_of(cluster, s) for s in fresh]
    assert a.call("put", fresh)["ok"] == [o != 2 for o in fresh_owner]
    assert b.call("stats")["errors"] > 0  # the failure was seen (and answered as misses)

    # Node 2 back, empty (no persistence): its chunks stay lost until written again.
    cluster.nodes[2].start()
    cluster.wait_ok()
    time.sleep(RETRY_AFTER_S + 0.2)  # the peers' breakers let a probe through
    got = b.call("get", seeds)
    assert got["ok"] == [o != 2 for o in owner] and all(got["same"])
    lost = [s for s, o in zip(seeds, owner) if o == 2]
    assert all(a.call("put", lost)["ok"])  # an engine would write them back after recomputing
    assert all(c.call("get", seeds)["ok"])

    # Host B drops off the network: its node's chunks miss within about one timeout, then at once.
    hosts.link_down(1)
    try:
        for peer in (a, c):
            got = peer.call("get", seeds)
            assert got["ok"] == [o != 1 for o in owner] and all(got["same"])
            assert got["s"] < 6.0, f"a lost host cost a call {got['s']:.2f}s (op_timeout_s is 2 s)"
            again = peer.call("get", seeds)  # the breaker is open: no network wait
            assert again["ok"] == got["ok"]
            assert again["s"] < 1.0, f"a call with the lost host's breaker open took {again['s']:.2f}s"
    finally:
        hosts.link_up(1)


@contextlib.contextmanager
def mooncake_pool(hosts: Hosts, holders_on: list[int], peers_on: list[int], master_args: tuple = ()):
    """A mooncake_master on host A, a segment holder on each host of ``holders_on`` and a peer
    process on each of ``peers_on`` (ready); all stopped on exit."""
    require_mooncake()
    from kvtier.local_mooncake import MooncakeMaster, MooncakeSegment

    master = MooncakeMaster(host=hosts.addr(0), wrap=hosts.wrap(0), extra_args=master_args)
    holders, peers = [], []
    try:
        holders = [MooncakeSegment(master, 64 << 20, host=hosts.addr(i), wrap=hosts.wrap(i)) for i in holders_on]
        peers = [Peer(hosts.wrap(i), master=master.address, metadata=master.metadata_url) for i in peers_on]
        for p in peers:
            p.wait_ready()
        yield master, holders, peers
    finally:
        for p in peers:
            p.close()
        for h in holders:
            h.stop()
        master.stop()


def test_three_hosts_share_a_mooncake_pool_and_lose_a_segment(three_hosts):
    # A silent holder's segment is dropped after 2 s (the master's default is 10).
    with mooncake_pool(three_hosts, [0, 1, 2], [0, 1, 2], ("--client_ttl=2",)) as (_, holders, peers):
        lose_a_segment(holders, peers)


def lose_a_segment(holders: list, peers: list[Peer]) -> None:
    a, b, c = peers
    seeds = list(range(48))
    assert all(a.call("put", seeds)["ok"])
    for peer in (b, c):
        got = peer.call("get", seeds)
        assert all(got["ok"]) and all(got["same"])

    holders[2].kill()  # host C's holder: its share of the pool is gone
    got = b.call("get", seeds)
    assert all(got["same"]) and got["s"] < 10.0
    kept = got["ok"]
    assert 0 < kept.count(False) < len(seeds), f"{kept.count(False)} of {len(seeds)} chunks lost with one holder"
    assert c.call("get", seeds)["ok"] == kept  # every host sees the same loss

    deadline = time.monotonic() + 30  # the master drops the segment: lookups stop finding its chunks
    while b.call("contains", seeds)["ok"] != kept:
        assert time.monotonic() < deadline, "the master did not drop the lost segment"
        time.sleep(0.3)
    lost = [s for s, ok in zip(seeds, kept) if not ok]
    assert all(a.call("put", lost)["ok"])  # rewritten (an engine's recompute): into the live segments
    for peer in (b, c):
        got = peer.call("get", seeds)
        assert all(got["ok"]) and all(got["same"])


def test_mooncake_calls_to_a_host_cut_off_are_bounded(three_hosts):
    """Mooncake's calls take no timeout of their own: a lookup while the master's host is cut
    off waited its 30 s RPC timeout, a read from a holder whose host is cut off 47-60 s. The
    tier sets MC_RPC_TIMEOUT_MS from op_timeout_s (2 s) and the store stops waiting for a read
    after the tier's deadline (kvtier/tiers/calls.py): each costs about 2 s, then misses."""
    hosts = three_hosts
    with mooncake_pool(hosts, [1, 2], [0, 1]) as (_, _, (near, far)):  # near: on the master's host
        seeds = list(range(24))
        assert all(near.call("put", seeds)["ok"])
        hosts.link_down(2)  # host C's holder: the reads of its chunks hang in Mooncake
        try:
            got = near.call("store_get", seeds, timeout_s=30)
            assert got["s"] < 4.0, f"a read from a host cut off took {got['s']:.1f} s"
            assert 0 < got["ok"].count(False), "no chunk was on the holder cut off"
        finally:
            hosts.link_up(2)
        hosts.link_down(0)  # the master's host
        try:
            got = far.call("contains", seeds, timeout_s=60)
            assert got["ok"] == [False] * len(seeds) and got["s"] < 4.0, f"lookup took {got['s']:.1f} s"
            assert far.call("contains", seeds)["s"] < 0.5  # the breaker: misses without calling Mooncake
        finally:
            hosts.link_up(0)
