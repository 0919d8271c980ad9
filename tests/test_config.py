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
