"""The `kvtier` command line, run in-process through click's runner on real files and a real Redis."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kvtier.cli import main
from kvtier.config import KVTierConfig
from kvtier.keys import Namespace, chunk_keys
from kvtier.layout import ChunkLayout
from kvtier.store import Store

LAYOUT = ChunkLayout(2, 16, 32, torch.float16)


def run(*args, env=None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.mark.parametrize("cmd", [[], ["demo"], ["bench"], ["bench", "tiers"], ["bench", "vllm"], ["inspect"],
                                 ["config"], ["serve"], ["health"], ["make-model"]])
def test_every_command_has_help(cmd):
    r = run(*cmd, "--help")
    assert r.exit_code == 0
    assert "Usage: " in r.output and "--help" in r.output


def fill(store: Store, model: str, n: int) -> None:
    keys = chunk_keys(Namespace(model, "float16", 2, 1, 32), np.arange(16 * n), 16)
    for i, k in enumerate(keys):
        assert store.put(k, np.full(LAYOUT.nbytes, i, dtype=np.uint8))
    assert store.flush(10)


def test_inspect_disk_counts_chunks_per_model(tmp_path):
    for model, n in (("model-a", 3), ("model-b", 2)):
        config = KVTierConfig(tiers=("cpu", "disk"), cpu_bytes=16 * LAYOUT.nbytes, disk_path=str(tmp_path))
        with Store(config, LAYOUT, label=model, pin=False) as s:
            fill(s, model, n)
    (tmp_path / "not-a-chunk.txt").write_text("hello")
    r = run("inspect", "--disk-path", str(tmp_path), "--json")
    assert r.exit_code == 0, r.output
    rows = {row["model"]: row for row in json.loads(r.output)}
    assert rows["model-a"]["chunks"] == 3 and rows["model-b"]["chunks"] == 2
    assert rows["model-a"]["bytes"] == 3 * LAYOUT.nbytes
    table = run("inspect", "--disk-path", str(tmp_path)).output
    assert "model-a" in table and "model-b" in table


def test_inspect_redis(redis_server):
    config = KVTierConfig(tiers=("cpu", "redis"), cpu_bytes=16 * LAYOUT.nbytes, redis_url=(redis_server.url,))
    with Store(config, LAYOUT, label="model-r", pin=False) as s:
        fill(s, "model-r", 4)
    r = run("inspect", "--redis-url", redis_server.url, "--json")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)
    assert row["model"] == "model-r" and row["chunks"] == 4


def test_inspect_needs_a_source():
    r = CliRunner().invoke(main, ["inspect"])
    assert r.exit_code == 2 and "--disk-path" in r.output


@pytest.mark.parametrize("url", ["redis://h:abc", "unix://relative.sock", "http://x"])
def test_inspect_reports_a_bad_redis_url_in_one_line(url):
    """Issue 29.9: `kvtier inspect --redis-url redis://h:abc` printed a traceback (exit 1)."""
    r = CliRunner().invoke(main, ["inspect", "--redis-url", url])
    assert r.exit_code == 2 and "--redis-url" in r.output and "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_config_shows_env_and_reports_bad_values():
    r = run("config", env={"KVTIER_CHUNK_SIZE": "512"})
    assert r.exit_code == 0 and json.loads(r.output)["chunk_size"] == 512
    bad = CliRunner().invoke(main, ["config"], env={"KVTIER_TIERS": "cpu,tape"})
    assert bad.exit_code == 2 and "unknown tier 'tape'" in bad.output


def test_bench_tiers_writes_json_with_ratios(tmp_path, redis_server):
    out = tmp_path / "tiers.json"
    r = run("bench", "tiers", "--shape", "small", "--chunk-size", "16", "--chunks", "2", "--rounds", "1",
            "--disk-path", str(tmp_path), "--redis-url", redis_server.url, "--json", str(out))
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["command"].startswith("kvtier bench tiers")
    got = {(x["tier"], x["op"]) for x in data["results"]}
    assert {("cpu", "put+get"), ("disk", "write"), ("disk", "read"), ("redis", "write"), ("redis", "read")} <= got
    assert all(x["ratio"] > 0 for x in data["results"])
    assert "ratio" in r.output


def test_bench_tiers_plot_draws_a_png(tmp_path):
    png = tmp_path / "tiers.png"
    r = run("bench", "tiers", "--shape", "small", "--chunk-size", "16", "--chunks", "2", "--rounds", "1",
            "--tiers", "cpu,disk", "--disk-path", str(tmp_path), "--plot", str(png))
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path):
    """Checked before the benchmark runs, not after."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['matplotlib'] = None; from kvtier.cli import main; "
            f"main(['bench', 'tiers', '--tiers', 'cpu', '--plot', {str(tmp_path / 'x.png')!r}])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "pip install 'kvtier[plot]'" in p.stderr, p.stderr
    assert "MiB chunks" not in p.stderr  # no progress bar: nothing ran


LAYOUT_ARGS = ["--num-layers", "2", "--kv-heads", "1", "--head-size", "8", "--dtype", "float16", "--chunk-size", "16"]


def _bad_inputs(tmp_path):
    """(args, env, what the one-line error must name) for issue 14.9's cases."""
    import os

    nested = tmp_path / "nested.yaml"
    nested.write_text("tiers: {a: 1}\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("extra: 5\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    afile = tmp_path / "afile"
    afile.write_text("x")
    sock = f"ipc:///tmp/kvs-cli-{os.getpid()}/s.sock"
    return [
        (["config"], {"KVTIER_CPU_BYTES": "4ib"}, "cpu_bytes='4ib'"),
        (["config", "--file", str(nested)], {}, "tiers="),
        (["config", "--file", str(extra)], {}, "extra=5"),
        (["config", "--file", str(binary)], {}, "config_file="),
        (["config"], {"KVTIER_TIERS": "cpu,redis", "KVTIER_REDIS_URL": "redis://host:abc"}, "redis_url="),
        (["config"], {"KVTIER_OP_TIMEOUT_S": "nan"}, "op_timeout_s='nan'"),
        (["config"], {"KVTIER_OP_TIMEOUT_S": "inf"}, "op_timeout_s='inf'"),
        (["serve", "--address", sock, "--tiers", "cpu", "--cpu-bytes", "1000", *LAYOUT_ARGS], {}, "cpu_bytes=1000"),
        (["serve", "--address", sock, "--tiers", "cpu,disk", "--disk-path", str(afile), "--cpu-bytes", "8MiB",
          *LAYOUT_ARGS], {}, "disk_path="),
        (["inspect", "--redis-url", "redis://127.0.0.1:1"], {}, "127.0.0.1:1"),
        # a directory that cannot be made (root ignores file modes here, so not a read-only one)
        (["serve", "--address", "ipc:///proc/kvtier-none/s.sock", "--tiers", "cpu", "--cpu-bytes", "8MiB"], {},
         "address="),
        (["serve", "--address", f"ipc:///tmp/{'x' * 120}/s.sock", "--tiers", "cpu", "--cpu-bytes", "8MiB"], {},
         "address="),
    ]


def test_user_errors_are_one_line_with_exit_status_2(tmp_path):
    """Issue 14.9: each of these printed a raw traceback (KeyError, TypeError, UnicodeDecodeError,
    ValueError, ProtocolError, ConnectionError) or was accepted (nan, inf)."""
    import os
    import subprocess
    import sys

    bad = []
    for args, env, names in _bad_inputs(tmp_path):
        r = subprocess.run([sys.executable, "-m", "kvtier.cli", *args], capture_output=True, text=True,
                           timeout=60, env={**os.environ, **env}, cwd=tmp_path)
        err = r.stderr.strip()
        if r.returncode != 2 or "Traceback" in err or names not in err or len(err.splitlines()) != 1:
            bad.append((args, env, r.returncode, err[-600:]))
    assert not bad, bad
