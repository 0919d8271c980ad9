"""One validated configuration for kvtier.

Sources, later ones winning: defaults < YAML file < ``KVTIER_*`` environment
variables < the engine's extra config dict. Every value is checked at start-up;
a bad one raises :class:`ConfigError` naming the key, the value and what is
allowed, so a user fixes it before the first request rather than after.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

TIER_NAMES = ("cpu", "disk", "redis", "mooncake")
MOONCAKE_PROTOCOLS = ("tcp", "rdma")
SIZE_KEYS = ("cpu_bytes", "disk_bytes", "mooncake_segment_bytes", "mooncake_buffer_bytes")
HASH_NAMES = ("blake3", "xxh3_128")
LOAD_MODES = ("auto", "sync", "async")
LOAD_POLICIES = ("auto", "always")
WRITERS = ("auto", "threads", "process")
ENV_PREFIX = "KVTIER_"
# KVTIER_* variables that are not settings: the config file, and kvtier.trace's output file and sampling.
ENV_NOT_SETTINGS = (ENV_PREFIX + "CONFIG_FILE", ENV_PREFIX + "TRACE", ENV_PREFIX + "TRACE_SAMPLE_MS")
# cpu_bytes 0 or "auto": sized from the host (see auto_cpu_bytes; docs/config.md, cpu_bytes).
AUTO_CPU_SHARE = 0.25  # of the host's memory (the container's limit when lower)
AUTO_CPU_RESERVE = 4 * 2**30  # of the memory available now, left to everything else
AUTO_CPU_MIN = 2**30
_GiB = 2**30

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(key: str, value: Any) -> int:
    """Bytes from an int or a string such as ``"4GiB"``, ``"512MB"``, ``"1g"``; ``"auto"`` is 0
    for ``cpu_bytes`` (sized from the host)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected a byte size such as 4GiB or 1073741824")
    if key == "cpu_bytes" and isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ConfigError(f"{key}={value!r}: expected a byte size such as 4GiB, 512MB or 1073741824")
        unit = (m.group(2) or "").lower().rstrip("b")
        if unit not in _SIZE_UNITS:
            raise ConfigError(f"{key}={value!r}: unknown unit; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
        n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n < 0:
        raise ConfigError(f"{key}={value!r}: a size cannot be negative")
    return n


@dataclass(frozen=True)
class HostMemory:
    """What the automatic ``cpu_bytes`` is computed from, in bytes."""

    total: int
    """Physical memory, or the container's (cgroup) limit when lower."""
    available: int
    """Memory available now (MemAvailable), or what the cgroup limit leaves when less."""
    gpus: int
    """NVIDIA GPUs this host (container) has: each may run an engine process with a cpu tier of its own."""


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2: no limit) reads as None


def _meminfo(root: str) -> dict[str, int]:
    out = {}
    try:
        with open(os.path.join(root, "proc/meminfo")) as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def read_host_memory(root: str = "/") -> HostMemory:
    """This host's :class:`HostMemory` (``root``: where /proc and /sys are, for tests)."""
    info = _meminfo(root)
    page = os.sysconf("SC_PAGE_SIZE")
    total = info.get("MemTotal") or os.sysconf("SC_PHYS_PAGES") * page
    available = info.get("MemAvailable") or os.sysconf("SC_AVPHYS_PAGES") * page
    cg = os.path.join(root, "sys/fs/cgroup")
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2, then v1
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit = _read_int(os.path.join(cg, limit_file))
        if limit is not None and limit < total:  # v1 writes "no limit" as a huge number
            total = limit
            available = min(available, limit - (_read_int(os.path.join(cg, usage_file)) or 0))
            break
    return HostMemory(total, max(0, available), _gpus(root))


def _gpus(root: str) -> int:
    """NVIDIA GPUs this container sees (/dev/nvidiaN: a container given one GPU of an 8-GPU host has
    one, and the memory limit of that one container), else those the driver lists."""
    try:
        dev = [n for n in os.listdir(os.path.join(root, "dev")) if re.fullmatch(r"nvidia\d+", n)]
    except OSError:
        dev = []
    if dev:
        return len(dev)
    try:
        return len(os.listdir(os.path.join(root, "proc/driver/nvidia/gpus")))
    except OSError:
        return 0


def auto_cpu_bytes(mem: HostMemory) -> tuple[int, str]:
    """The automatic ``cpu_bytes`` for ``mem`` and why, in words: min(25 % of the memory, what is
    available minus 4 GiB), shared among the GPUs, rounded down to GiB, at least 1 GiB."""
    share = int(mem.total * AUTO_CPU_SHARE)
    spare = mem.available - AUTO_CPU_RESERVE
    per_gpu = max(1, mem.gpus)
    size = max(AUTO_CPU_MIN, min(share, spare) // per_gpu // _GiB * _GiB)
    why = (f"min({AUTO_CPU_SHARE:.0%} of {mem.total / _GiB:.1f} GiB memory = {share / _GiB:.1f} GiB, "
           f"{mem.available / _GiB:.1f} GiB available - {AUTO_CPU_RESERVE // _GiB} GiB reserve = "
           f"{spare / _GiB:.1f} GiB)")
    if mem.gpus > 1:
        why += f" / {mem.gpus} GPUs (an engine process with its own cpu tier on each)"
    why += f", rounded down to GiB, at least {AUTO_CPU_MIN // _GiB} GiB"
    return size, why


@functools.cache
def _host_cpu_bytes() -> int:
    """:func:`auto_cpu_bytes` of this host, decided once per process (every config made here then
    agrees, e.g. the two halves of an engine sharing a store) and logged once."""
    mem = read_host_memory()
    size, why = auto_cpu_bytes(mem)
    short = size > min(mem.total * AUTO_CPU_SHARE, mem.available - AUTO_CPU_RESERVE) / max(1, mem.gpus)
    (log.warning if short else log.info)(
        "kvtier: cpu tier of %d GiB (cpu_bytes: auto): %s%s; set cpu_bytes to choose another size",
        size // _GiB, why, " -- this host is short of memory" if short else "")
    return size


@dataclass(frozen=True)
class KVTierConfig:
    """All settings of kvtier, with their defaults. See docs/config.md."""

    chunk_size: int = 256
    """Tokens per chunk; a multiple of the engine's block size."""
    tiers: tuple[str, ...] = ("cpu", "disk")
    """Tiers in lookup order, fastest first; any of cpu, disk, redis, mooncake ("cpu" always first when present)."""
    cpu_bytes: int = 0
    """Host memory for the cpu tier (one allocation, cut into chunk slots); 0 or "auto": sized from
    the host when the config is made (:func:`auto_cpu_bytes`), so the field always holds bytes."""
    disk_path: str = "./kvtier-data"
    """Directory of the disk tier (one file per chunk)."""
    disk_bytes: int = 64 * 2**30
    """Size cap of the disk tier; least recently used chunks are removed beyond it."""
    disk_read_threads: int = 16
    """Threads reading the chunks of one load from the disk tier at once (they hold no GIL while reading)."""
    redis_url: tuple[str, ...] = ()
    """redis://host:port[/db] URLs; several URLs (or redis_cluster) mean a Redis Cluster."""
    redis_cluster: bool = False
    """Treat redis_url as seed nodes of a Redis Cluster."""
    redis_prefix: str = "kvtier:"
    """Key prefix in Redis, so kvtier shares a server with other data."""
    redis_ttl_s: int = 0
    """Expiry of chunks written to Redis (0 = none; rely on the server's maxmemory policy)."""
    mooncake_master: str = ""
    """HOST:PORT of a mooncake_master (the mooncake tier's object index)."""
    mooncake_metadata: str = ""
    """Mooncake's metadata server, http://HOST:PORT/metadata ("" = the master's built-in one,
    http://MASTER_HOST:8080/metadata, when the master runs with --enable_http_metadata_server)."""
    mooncake_protocol: str = "tcp"
    """How Mooncake moves chunks: tcp, or rdma (with mooncake_rdma_devices)."""
    mooncake_rdma_devices: str = ""
    """RDMA devices for protocol rdma, e.g. mlx5_0,mlx5_1 ("" = Mooncake picks)."""
    mooncake_host: str = ""
    """This host's address as other Mooncake clients reach it ("" = the local address on the route to the master)."""
    mooncake_segment_bytes: int = 4 * 2**30
    """Memory this process adds to the Mooncake pool (0 = none: a pure client of segments held elsewhere)."""
    mooncake_buffer_bytes: int = 16 * 2**20
    """Mooncake's own transfer buffer in this process (kvtier moves chunks from its registered slots instead)."""
    mooncake_prefix: str = "kvtier:"
    """Object name prefix in Mooncake, so kvtier shares a pool with other data."""
    hash: str = "blake3"
    """Hash of chunk keys: blake3 or xxh3_128."""
    write_queue_depth: int = 256
    """Chunks whose host slots writes to lower tiers may hold (at most half the cpu tier's slots);
    past it chunks wait in the cpu tier unwritten, and one evicted before its turn is dropped (counted)."""
    write_threads: int = 2
    """Background threads writing chunks down to lower tiers."""
    writer: str = "auto"
    """Where those threads run: "process" (a child process, so they never hold the engine
    process's GIL), "threads" (this process), "auto" (process when CUDA is present)."""
    connect_timeout_s: float = 1.0
    """Timeout to connect to a remote tier."""
    op_timeout_s: float = 2.0
    """Timeout of one remote operation; a slower answer is treated as a miss."""
    retry_after_s: float = 2.0
    """After a remote tier failed, how long to answer misses before trying it again."""
    load_mode: str = "auto"
    """How loads reach the engine: auto, sync or async (see docs/config.md)."""
    load_policy: str = "auto"
    """Which hits to load: "auto" loads a chunk only when reading it is expected to be faster than
    computing it (both measured online, kvtier/costs.py); "always" loads every hit."""
    consumer_saves: bool = False
    """Under vLLM's kv_role "kv_consumer" (the decode instance of prefill/decode disaggregation):
    save the chunks this engine computes too. Off: a consumer only loads (the producer saves)."""
    prefill_gbps: float = 0.0
    """The engine's prefill speed in GB/s of KV computed, until measured (0: 5 on a GPU, 0.05 on CPU)."""
    lease_ttl_s: float = 60.0
    """A leased chunk (found by a lookup, not yet loaded) is kept from eviction this long at most."""
    server: str = ""
    """Address of a `kvtier serve` process (ipc:///path or tcp://127.0.0.1:PORT); empty = in-process store."""
    server_token: str = ""
    """Shared secret a client presents to a TCP server."""
    model: str = ""
    """Model name folded into chunk keys (the connector fills it in from the engine)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Settings for an engine adapter that the core does not interpret."""

    def __post_init__(self) -> None:
        for key in SIZE_KEYS:  # "4GiB" in Python too, as in YAML and env
            object.__setattr__(self, key, parse_size(key, getattr(self, key)))
        if self.cpu_bytes == 0 and "cpu" in self.tiers:
            object.__setattr__(self, "cpu_bytes", _host_cpu_bytes())
        _validate(self)

    @classmethod
    def from_sources(
        cls,
        extra: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        yaml_path: str | os.PathLike | None = None,
    ) -> "KVTierConfig":
        """Merge defaults, an optional YAML file, ``KVTIER_*`` env vars and ``extra``.

        ``yaml_path`` may also come from ``extra["config_file"]`` or ``KVTIER_CONFIG_FILE``.
        Keys not known to the core go to ``.extra`` only when prefixed by an engine name
        (``vllm_*``); any other unknown key is an error, so a typo is never silently ignored.
        """
        env = os.environ if env is None else env
        extra = dict(extra or {})
        merged: dict[str, Any] = {}
        yaml_path = yaml_path or extra.pop("config_file", None) or env.get(ENV_PREFIX + "CONFIG_FILE")
        if yaml_path:
            merged.update(_load_yaml(yaml_path))
        for name, value in env.items():
            if name.startswith(ENV_PREFIX) and name not in ENV_NOT_SETTINGS:
                merged[name[len(ENV_PREFIX):].lower()] = value
        merged.update(extra)
        return cls.from_dict(merged)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "KVTierConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        extra = values.get("extra", {}) or {}
        if not isinstance(extra, Mapping):
            raise ConfigError(f"extra={extra!r}: expected a mapping of engine-adapter settings")
        adapter: dict[str, Any] = dict(extra)
        for key, value in values.items():
            if not isinstance(key, str):
                raise ConfigError(f"setting {key!r}: setting names are strings such as chunk_size")
            if key == "extra":
                continue
            if key not in known:
                if key.startswith(("vllm_", "engine_")):
                    adapter[key] = value
                    continue
                close = [k for k in known if k.split("_")[0] == key.split("_")[0]]
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"unknown kvtier setting {key!r}.{hint} Known settings: {', '.join(sorted(known))}"
                )
            kwargs[key] = _coerce(key, known[key].type, value)
        kwargs["extra"] = adapter
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tiers"] = list(self.tiers)
        out["redis_url"] = list(self.redis_url)
        out["extra"] = dict(self.extra)
        return out


def _load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"config_file={str(path)!r}: cannot read it ({e.strerror})") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config_file={str(path)!r}: not valid YAML text ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config_file={str(path)!r}: expected a mapping of settings at the top level")
    return data


def _split_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return tuple(str(v).strip() for v in value)
    raise ConfigError(f"{key}={value!r}: expected a list or a comma-separated string")


def _coerce(key: str, type_name: Any, value: Any) -> Any:
    """Turn strings from env/YAML into the field's type; leave type errors to _validate."""
    t = str(type_name)
    try:
        if key in SIZE_KEYS:
            return parse_size(key, value)
        if t.startswith("tuple"):
            return _split_list(key, value)
        if t == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off", ""):
                return False
            raise ConfigError(f"{key}={value!r}: expected true or false")
        if t == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t == "float":
            if isinstance(value, bool):
                raise ValueError
            f = float(value)
            if not math.isfinite(f):
                raise ConfigError(f"{key}={value!r}: expected a finite number")
            return f
        if t == "str":
            if not isinstance(value, (str, os.PathLike)):
                raise ValueError
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}={value!r}: expected a value of type {t}") from e
    return value


def check_redis_url(url: str, name: str = "redis_url") -> None:
    """ConfigError unless ``url`` is a Redis URL redis-py can connect with (also for ``kvtier
    inspect --redis-url``, which printed a traceback for a bad port, issue 29.9)."""
    if not re.match(r"^(redis|rediss|unix)://", url):
        raise ConfigError(f"{name}={url!r}: expected redis://HOST:PORT[/DB], rediss://... or unix:///path")
    parsed = urlparse(url)
    if url.startswith("unix://"):
        # unix://relative.sock parses as a host with no path: Store() then raised TypeError.
        if parsed.netloc or not parsed.path.startswith("/") or parsed.path == "/":
            raise ConfigError(f"{name}={url!r}: expected unix:///absolute/path/to/redis.sock")
        return
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if port == -1 or not parsed.hostname:
        raise ConfigError(f"{name}={url!r}: expected redis://HOST:PORT[/DB] with a numeric port")


def _validate(c: KVTierConfig) -> None:
    def bad(key: str, allowed: str) -> ConfigError:
        return ConfigError(f"{key}={getattr(c, key)!r}: {allowed}")

    if not isinstance(c.chunk_size, int) or c.chunk_size <= 0 or c.chunk_size % 16:
        raise bad("chunk_size", "must be a positive multiple of 16 (and of the engine's block size), e.g. 256")
    if not c.tiers:
        raise bad("tiers", f"list at least one tier of {', '.join(TIER_NAMES)}")
    for t in c.tiers:
        if t not in TIER_NAMES:
            raise bad("tiers", f"unknown tier {t!r}; allowed: {', '.join(TIER_NAMES)}")
    if len(set(c.tiers)) != len(c.tiers):
        raise bad("tiers", "a tier may appear only once")
    if "cpu" in c.tiers and c.tiers[0] != "cpu":
        raise bad("tiers", "cpu must come first: lower tiers are filled from it")
    if "cpu" in c.tiers and c.cpu_bytes <= 0:
        raise bad("cpu_bytes", "must be > 0 when the cpu tier is enabled, e.g. 4GiB")
    if "disk" in c.tiers:
        if not c.disk_path:
            raise bad("disk_path", "set a directory for the disk tier")
        if c.disk_bytes <= 0:
            raise bad("disk_bytes", "must be > 0 when the disk tier is enabled, e.g. 64GiB")
    if "redis" in c.tiers and not c.redis_url:
        raise bad("redis_url", "set redis://HOST:PORT (or several for a cluster) when the redis tier is enabled")
    for url in c.redis_url:
        check_redis_url(url)
        if url.startswith("unix://") and (c.redis_cluster or len(c.redis_url) > 1):
            raise ConfigError(f"redis_url={url!r}: a Redis Cluster is reached over TCP (redis://HOST:PORT); "
                              f"a unix socket serves one standalone server")
    _validate_mooncake(c)
    if c.hash not in HASH_NAMES:
        raise bad("hash", f"allowed: {', '.join(HASH_NAMES)}")
    if c.load_mode not in LOAD_MODES:
        raise bad("load_mode", f"allowed: {', '.join(LOAD_MODES)}")
    if c.load_policy not in LOAD_POLICIES:
        raise bad("load_policy", f"allowed: {', '.join(LOAD_POLICIES)}")
    if not isinstance(c.prefill_gbps, (int, float)) or not math.isfinite(c.prefill_gbps) or c.prefill_gbps < 0:
        raise bad("prefill_gbps", "must be a number >= 0 (GB/s of KV; 0 = a default by device)")
    if c.writer not in WRITERS:
        raise bad("writer", f"allowed: {', '.join(WRITERS)}")
    for key in ("write_queue_depth", "write_threads", "disk_read_threads"):
        v = getattr(c, key)
        if not isinstance(v, int) or v < 1:
            raise bad(key, "must be an integer >= 1")
    for key in ("connect_timeout_s", "op_timeout_s", "retry_after_s", "lease_ttl_s"):
        v = getattr(c, key)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise bad(key, "must be a number of seconds > 0")
    if c.server and not re.match(r"^(ipc|tcp)://", c.server):
        raise bad("server", "expected ipc:///path/to/socket or tcp://127.0.0.1:PORT")
    if not isinstance(c.redis_ttl_s, int) or c.redis_ttl_s < 0:
        raise bad("redis_ttl_s", "must be an integer >= 0 (0 = no expiry)")


def check_host_port(value: str, name: str) -> None:
    """ConfigError unless ``value`` is HOST:PORT with a port in 1..65535."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in value) \
            or "/" in value:
        raise ConfigError(f"{name}={value!r}: expected HOST:PORT, e.g. 10.0.0.5:50051 (no scheme)")


def _validate_mooncake(c: KVTierConfig) -> None:
    if "mooncake" in c.tiers and not c.mooncake_master:
        raise ConfigError("mooncake_master='': set HOST:PORT of a running mooncake_master when the mooncake "
                          "tier is enabled (mooncake_master --enable_http_metadata_server=true starts one)")
    if c.mooncake_master:
        check_host_port(c.mooncake_master, "mooncake_master")
    if c.mooncake_metadata:
        parsed = urlparse(c.mooncake_metadata)
        try:
            port = parsed.port
        except ValueError:
            port = None
        if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None:
            raise ConfigError(f"mooncake_metadata={c.mooncake_metadata!r}: expected http://HOST:PORT/metadata "
                              f"(the master's --http_metadata_server_port), or empty for the master's default")
    if c.mooncake_protocol not in MOONCAKE_PROTOCOLS:
        raise ConfigError(f"mooncake_protocol={c.mooncake_protocol!r}: allowed: {', '.join(MOONCAKE_PROTOCOLS)}")
    if c.mooncake_rdma_devices and c.mooncake_protocol != "rdma":
        raise ConfigError(f"mooncake_rdma_devices={c.mooncake_rdma_devices!r}: only used with "
                          f"mooncake_protocol: rdma; remove it or set the protocol")
    if c.mooncake_host and (any(ch.isspace() or ch in "/:" for ch in c.mooncake_host)):
        raise ConfigError(f"mooncake_host={c.mooncake_host!r}: expected a host name or IP address "
                          f"(no port, no scheme), or empty to use the address on the route to the master")
    if not c.mooncake_prefix or any(ch.isspace() for ch in c.mooncake_prefix):
        raise ConfigError(f"mooncake_prefix={c.mooncake_prefix!r}: expected a non-empty name prefix without "
                          f"spaces, e.g. kvtier:")
    if "mooncake" in c.tiers and c.mooncake_buffer_bytes < 2**20:
        raise ConfigError(f"mooncake_buffer_bytes={c.mooncake_buffer_bytes}: Mooncake needs a transfer buffer "
                          f"of at least 1MiB, e.g. 16MiB")
