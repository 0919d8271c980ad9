import pytest

from kvtier.config import ConfigError, KVTierConfig, parse_size


def test_defaults_are_valid_and_documented():
    c = KVTierConfig()
    assert c.chunk_size == 256 and c.tiers == ("cpu", "disk") and c.hash == "blake3"


def test_sources_merge_in_order(tmp_path):
    y = tmp_path / "kvtier.yaml"
    y.write_text("chunk_size: 512\ncpu_bytes: 1GiB\ntiers: [cpu]\nwrite_threads: 3\n")
    env = {"KVTIER_CPU_BYTES": "2GiB", "KVTIER_TIERS": "cpu,disk", "OTHER": "x"}
    c = KVTierConfig.from_sources({"tiers": ["cpu", "redis"], "redis_url": "redis://127.0.0.1:1"},
                                  env=env, yaml_path=y)
    assert c.chunk_size == 512          # yaml
    assert c.cpu_bytes == 2 * 2**30     # env beats yaml
    assert c.tiers == ("cpu", "redis")  # extra beats env
    assert c.redis_url == ("redis://127.0.0.1:1",)
    assert c.write_threads == 3


def test_config_file_from_extra_and_env(tmp_path):
    y = tmp_path / "k.yaml"
    y.write_text("chunk_size: 128\n")
    assert KVTierConfig.from_sources({"config_file": str(y)}, env={}).chunk_size == 128
    assert KVTierConfig.from_sources({}, env={"KVTIER_CONFIG_FILE": str(y)}).chunk_size == 128


def test_engine_prefixed_keys_pass_through():
    c = KVTierConfig.from_sources({"vllm_async_load": True}, env={})
    assert c.extra == {"vllm_async_load": True}


@pytest.mark.parametrize("value,expected", [
    (1024, 1024), ("4GiB", 4 * 2**30), ("512MB", 512 * 10**6), ("1g", 10**9), ("2 MiB", 2 * 2**20), ("1.5KiB", 1536),
])
def test_sizes(value, expected):
    assert parse_size("cpu_bytes", value) == expected


@pytest.mark.parametrize("extra,needle", [
    ({"chunk_size": 0}, "chunk_size=0"),
    ({"chunk_size": 100}, "multiple of 16"),
    ({"chunk_size": "abc"}, "chunk_size='abc'"),
    ({"tiers": ["cpu", "tape"]}, "unknown tier 'tape'"),
    ({"tiers": ["disk", "cpu"]}, "cpu must come first"),
    ({"tiers": []}, "at least one tier"),
    ({"tiers": ["cpu", "cpu"]}, "only once"),
    ({"cpu_bytes": "lots"}, "cpu_bytes='lots'"),
    ({"cpu_bytes": -5}, "negative"),
    ({"tiers": ["cpu", "redis"]}, "redis_url"),
    ({"redis_url": "http://x"}, "redis_url='http://x'"),
    ({"redis_url": "unix://relative.sock"}, "unix:///absolute"),  # issue 29.9: passed, then Store() raised TypeError
    ({"redis_url": "unix:///"}, "unix:///absolute"),
    ({"hash": "md5"}, "blake3, xxh3_128"),
    ({"write_queue_depth": 0}, "write_queue_depth=0"),
    ({"op_timeout_s": -1}, "op_timeout_s=-1"),
    ({"redis_cluster": "maybe"}, "true or false"),
    ({"chunk_sise": 256}, "Did you mean 'chunk_size'"),
])
def test_bad_values_name_key_value_and_allowed(extra, needle):
    with pytest.raises(ConfigError) as e:
        KVTierConfig.from_sources(extra, env={})
    assert needle in str(e.value)


def test_bad_env_value_is_reported():
    with pytest.raises(ConfigError, match="chunk_size='big'"):
        KVTierConfig.from_sources({}, env={"KVTIER_CHUNK_SIZE": "big"})


def test_trace_variables_are_not_settings():
    """KVTIER_TRACE and KVTIER_TRACE_SAMPLE_MS configure kvtier.trace; an engine started with them
    must not refuse them as unknown settings (gpu_async --trace's CPU dry run did, for the second)."""
    c = KVTierConfig.from_sources({}, env={"KVTIER_TRACE": "/tmp/t.jsonl", "KVTIER_TRACE_SAMPLE_MS": "5",
                                           "KVTIER_CHUNK_SIZE": "128"})
    assert c.chunk_size == 128


def test_bad_yaml(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("chunk_size: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        KVTierConfig.from_sources({}, env={}, yaml_path=y)
    with pytest.raises(ConfigError, match="cannot read"):
        KVTierConfig.from_sources({}, env={}, yaml_path=tmp_path / "missing.yaml")


def test_sizes_as_strings_in_python_too():
    """KVTierConfig(cpu_bytes="2GiB") works like the YAML/env spelling; a wrong type is a ConfigError."""
    c = KVTierConfig(cpu_bytes="2GiB", disk_bytes="512MB")
    assert c.cpu_bytes == 2 * 2**30 and c.disk_bytes == 512 * 10**6
    with pytest.raises(ConfigError, match="cpu_bytes"):
        KVTierConfig(cpu_bytes=[1])
    with pytest.raises(ConfigError, match="disk_bytes"):
        KVTierConfig(disk_bytes="lots")


GiB = 2**30


@pytest.mark.parametrize("total, available, gpus, expected", [
    (64 * GiB, 60 * GiB, 1, 16 * GiB),           # a quarter of the memory
    (64 * GiB, 12 * GiB, 0, 8 * GiB),            # what is available, less the 4 GiB reserve
    (1024 * GiB, 900 * GiB, 8, 32 * GiB),        # shared among the engine processes of 8 GPUs
    (int(23.5 * GiB), 20 * GiB, 0, 5 * GiB),     # rounded down to GiB
    (4 * GiB, 3 * GiB, 0, 1 * GiB),              # a short host still gets 1 GiB
])
def test_auto_cpu_bytes_rule(total, available, gpus, expected):
    from kvtier.config import HostMemory, auto_cpu_bytes

    size, why = auto_cpu_bytes(HostMemory(total, available, gpus))
    assert size == expected
    assert "25%" in why and "available" in why and ("GPUs" in why) == (gpus > 1)


def test_default_cpu_bytes_is_sized_from_this_host_and_logged_once(caplog):
    from kvtier import config as cfgmod

    cfgmod._host_cpu_bytes.cache_clear()
    with caplog.at_level("INFO", logger="kvtier.config"):
        a, b = KVTierConfig(), KVTierConfig.from_sources({}, env={"KVTIER_CPU_BYTES": "auto"})
    expected, _ = cfgmod.auto_cpu_bytes(cfgmod.read_host_memory())
    assert a.cpu_bytes == b.cpu_bytes == expected and expected % GiB == 0 and expected >= GiB
    lines = [r.getMessage() for r in caplog.records if "cpu_bytes: auto" in r.getMessage()]
    assert len(lines) == 1 and f"cpu tier of {expected // GiB} GiB" in lines[0] and "25%" in lines[0]
    assert KVTierConfig.from_dict(a.to_dict()) == a  # resolved to bytes: round-trips, as the writer child reads it
    assert KVTierConfig(cpu_bytes=0).cpu_bytes == expected


def test_an_explicit_cpu_bytes_wins_and_no_cpu_tier_needs_none():
    assert KVTierConfig(cpu_bytes="3GiB").cpu_bytes == 3 * GiB
    assert KVTierConfig.from_sources({}, env={"KVTIER_CPU_BYTES": "100MiB"}).cpu_bytes == 100 * 2**20
    assert KVTierConfig(tiers=("disk",)).cpu_bytes == 0
    with pytest.raises(ConfigError, match="cpu_bytes"):
        KVTierConfig(cpu_bytes="lots")


def test_host_memory_reads_meminfo_cgroups_and_gpus(tmp_path):
    from kvtier.config import read_host_memory

    (tmp_path / "proc/driver/nvidia/gpus/0000:01:00.0").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/gpus/0000:02:00.0").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text("MemTotal:       67108864 kB\nMemFree: 1 kB\n"
                                           "MemAvailable:   50331648 kB\n")
    mem = read_host_memory(str(tmp_path))
    assert (mem.total, mem.available, mem.gpus) == (64 * GiB, 48 * GiB, 2)
    (tmp_path / "dev").mkdir()  # a container given one GPU of the host: its own device only
    for name in ("nvidia3", "nvidiactl", "nvidia-uvm"):
        (tmp_path / "dev" / name).touch()
    assert read_host_memory(str(tmp_path)).gpus == 1
    cg = tmp_path / "sys/fs/cgroup"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text("max\n")  # cgroup v2 without a limit: the host's numbers
    assert read_host_memory(str(tmp_path)).total == 64 * GiB
    (cg / "memory.max").write_text(f"{16 * GiB}\n")  # a container limited to 16 GiB, 10 in use
    (cg / "memory.current").write_text(f"{10 * GiB}\n")
    mem = read_host_memory(str(tmp_path))
    assert (mem.total, mem.available) == (16 * GiB, 6 * GiB)
    (cg / "memory.max").unlink()
    (cg / "memory").mkdir()  # cgroup v1, "no limit" written as a huge number
    (cg / "memory/memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert read_host_memory(str(tmp_path)).total == 64 * GiB
