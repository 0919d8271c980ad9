"""The `kvtier` command line: demo, bench, inspect, config."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable
from typing import Any

import click

from kvtier.config import ConfigError, KVTierConfig


def _table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    body = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(b) for b in body])


def _command_line() -> str:
    """The current command with every option as it took effect, so a result can be reproduced."""
    ctx = click.get_current_context()
    words = ["kvtier", *ctx.command_path.split()[1:]]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if value is None or value is False or not p.opts:
            continue
        words.append(p.opts[0] if value is True else f"{p.opts[0]} {value}")
    return " ".join(words)


def _write_json(path: str, payload: dict[str, Any]) -> None:
    payload = {"command": _command_line(), **payload}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    click.echo(f"wrote {path}")


class _UserError(click.ClickException):
    """A problem the user can fix (a setting, a path, a server not there): one line, exit status 2."""

    exit_code = 2


class _Group(click.Group):
    """Every command: errors a user can fix end it with one line naming the problem, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        import redis

        try:
            return super().invoke(ctx)
        except ConfigError as e:
            raise _UserError(str(e)) from e
        except click.ClickException as e:
            if type(e) is click.ClickException:  # our own one-line errors: a user's to fix
                raise _UserError(e.message) from e
            raise
        except (OSError, redis.exceptions.RedisError) as e:
            raise _UserError(f"{type(e).__name__}: {e}") from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvtier")
def main() -> None:
    """kvtier: keep the KV cache of prompt prefixes in CPU memory, on disk and in Redis."""


@main.command("make-model")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--size", type=click.Choice(["demo", "tiny"]), default="demo", show_default=True,
              help="demo: ~82M-parameter random Llama; tiny: ~0.4M.")
def make_model(path: str, size: str) -> None:
    """Write the demo's random-weight Llama and a word tokenizer to PATH, for `vllm serve PATH`."""
    from kvtier.models import SIZES, make_random_llama, write_word_tokenizer

    make_random_llama(path, size)
    write_word_tokenizer(path, SIZES[size]["vocab_size"])
    click.echo(path)


@main.command()
@click.option("--size", type=click.Choice(["demo", "tiny"]), default="demo", show_default=True,
              help="demo: ~82M-parameter random Llama (prefill costs real time); tiny: seconds.")
@click.option("--doc-tokens", default=2048, show_default=True, help="Tokens of the shared document.")
@click.option("--questions", default=4, show_default=True, help="Requests about the document per phase.")
@click.option("--disk-path", default=None, help="Keep kvtier's disk tier here (default: a temp dir, removed).")
@click.option("--lower", type=click.Choice(["disk", "mooncake"]), default="disk", show_default=True,
              help="The tier below cpu; mooncake starts a master and a 1 GiB segment holder on loopback.")
def demo(size: str, doc_tokens: int, questions: int, disk_path: str | None, lower: str) -> None:
    """Real vLLM on CPU with kvtier: a document computed once, loaded after an engine restart."""
    from kvtier.vllm.demo import run_demo

    result = run_demo(size=size, doc_tokens=doc_tokens, questions=questions, disk_path=disk_path, out=click.echo,
                      lower=lower)
    if not result["all_match"]:
        raise click.ClickException("outputs with kvtier differ from outputs without it: please report this bug")


@main.group()
def bench() -> None:
    """Benchmarks that print ratios against a baseline measured in the same run."""


@bench.command("tiers")
@click.option("--shape", type=click.Choice(["llama8b", "small"]), default="llama8b", show_default=True,
              help="llama8b: 32 layers x 8 KV heads x 128, bf16, 32 MiB chunks; small: 4 layers, 4 MiB chunks.")
@click.option("--chunk-size", default=256, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", default=16, show_default=True, help="Chunks per round.")
@click.option("--rounds", default=5, show_default=True, help="Alternating baseline/kvtier rounds (median).")
@click.option("--tiers", "tier_names", default="cpu,disk,redis,lookup", show_default=True,
              help="Comma-separated subset of cpu,disk,redis,lookup.")
@click.option("--disk-path", default=None, help="Directory for the disk benchmark (default: system temp).")
@click.option("--redis-url", default=None,
              help="Redis to benchmark against; default: start a private redis-server on 127.0.0.1.")
@click.option("--json", "json_path", default=None, help="Also write the results as JSON here.")
@click.option("--plot", "plot_path", default=None, help="Also draw the bandwidths as a PNG here (needs matplotlib).")
def bench_tiers(shape: str, chunk_size: int, chunks: int, rounds: int, tier_names: str, disk_path: str | None,
                redis_url: str | None, json_path: str | None, plot_path: str | None) -> None:
    """Each tier vs the raw operation under it: memcpy, file I/O, redis-py."""
    import torch
    from tqdm import tqdm

    from kvtier import bench_tiers as bt
    from kvtier.layout import ChunkLayout

    spec = bt.LLAMA8B if shape == "llama8b" else bt.SMALL
    layout = ChunkLayout(spec["num_layers"], chunk_size, spec["width"], spec["dtype"])
    names = [t.strip() for t in tier_names.split(",") if t.strip()]
    unknown = set(names) - {"cpu", "disk", "redis", "lookup"}
    if unknown:
        raise click.BadParameter(f"unknown {sorted(unknown)}; choose from cpu,disk,redis,lookup", param_hint="--tiers")
    if plot_path:
        from kvtier.plots import pyplot

        pyplot()  # a missing matplotlib is said before the benchmark, not after
    steps = rounds * (("cpu" in names) + 2 * ("disk" in names) + 2 * ("redis" in names))
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    with tqdm(total=steps, desc=f"bench tiers ({layout.nbytes / 2**20:.0f} MiB chunks)", unit="round",
              file=sys.stderr) as bar:
        tick = lambda: bar.update(1)  # noqa: E731
        if "cpu" in names:
            results.append(bt.bench_cpu(layout, chunks, rounds, tick))
        if "disk" in names:
            results += bt.bench_disk(layout, chunks, rounds, tick, disk_path)
        if "redis" in names:
            from kvtier.local_redis import RedisServer, redis_server_binary

            if redis_url:
                results += bt.bench_redis(layout, chunks, rounds, tick, redis_url)
            elif redis_server_binary():
                with RedisServer() as server:
                    results += bt.bench_redis(layout, chunks, rounds, tick, server.url)
            else:
                notes.append("redis skipped: no redis-server on PATH and no --redis-url")
        if "lookup" in names:
            results.append(bt.bench_lookup(chunk_size=chunk_size))
    click.echo(_table(results, ["tier", "op", "baseline", "baseline_GBps", "kvtier_GBps", "ratio", "goal"]))
    for r in results:
        if r["tier"] == "keys+lookup":
            click.echo(f"keys+lookup of {r['op']}: keys {r['keys_ms']:.3f} ms + lookup {r['lookup_ms']:.3f} ms "
                       f"= {r['total_ms']:.3f} ms (budget {r['budget_ms']:.3f} ms = 1% of loading at 50 GB/s)")
    for n in notes:
        click.echo(n)
    doc = {"layout": layout.describe(), "chunk_bytes": layout.nbytes, "chunks": chunks, "rounds": rounds,
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "results": results, "notes": notes}
    if json_path:
        _write_json(json_path, doc)
    if plot_path:
        from kvtier.plots import plot_tiers

        plot_tiers(doc, plot_path)
        click.echo(f"wrote {plot_path}")


@bench.command("vllm")
@click.option("--size", type=click.Choice(["demo", "tiny"]), default="demo", show_default=True,
              help="Random Llama to serve (demo: ~82M parameters).")
@click.option("--lengths", default="1024,4096", show_default=True, help="Prompt lengths for the TTFT table.")
@click.option("--docs", default=4, show_default=True, help="Documents in the workload.")
@click.option("--requests", default=16, show_default=True, help="Requests in the workload.")
@click.option("--reps", default=3, show_default=True, type=click.IntRange(1, 20),
              help="Hits timed per prompt length (the median is reported).")
@click.option("--arrivals", is_flag=True,
              help="Instead: requests decode while cached prompts arrive; ITL of the running ones and TTFT of "
                   "the arrivals per load_mode (sync, async, auto), from the cpu tier and from disk.")
@click.option("--json", "json_path", default=None, help="Also write the results as JSON here.")
@click.option("--plot", "plot_path", default=None,
              help="Also draw TTFT by prompt length as a PNG here (needs matplotlib; not with --arrivals).")
def bench_vllm_cmd(size: str, lengths: str, docs: int, requests: int, reps: int, arrivals: bool,
                   json_path: str | None, plot_path: str | None) -> None:
    """TTFT cold / vLLM hit / kvtier hit, and a shared-prefix workload, on a real vLLM (CPU)."""
    from kvtier.vllm.bench import bench_arrivals_cpu, bench_vllm

    if plot_path and arrivals:
        raise click.UsageError("--plot draws the TTFT table; leave it out with --arrivals")
    if plot_path:
        from kvtier.plots import pyplot

        pyplot()  # a missing matplotlib is said before minutes of benchmark, not after
    if arrivals:
        result = bench_arrivals_cpu(size=size, out=click.echo)
    else:
        result = bench_vllm(size=size, lengths=tuple(int(x) for x in lengths.split(",")), docs=docs,
                            requests=requests, reps=reps, out=click.echo)
    if json_path:
        _write_json(json_path, {"cpu_count": os.cpu_count(), **result})
    if plot_path:
        from kvtier.plots import plot_ttft

        plot_ttft(result, plot_path)
        click.echo(f"wrote {plot_path}")


@main.command()
@click.option("--disk-path", default=None, help="A disk tier directory to inspect.")
@click.option("--redis-url", default=None, help="A Redis server (or cluster seed) to inspect.")
@click.option("--redis-cluster", is_flag=True, help="Treat --redis-url as a Redis Cluster seed.")
@click.option("--redis-prefix", default="kvtier:", show_default=True, help="Key prefix kvtier uses in Redis.")
@click.option("--mooncake-master", default=None, help="A Mooncake master (HOST:PORT) whose pool to inspect.")
@click.option("--mooncake-metadata", default=None,
              help="Its metadata server (default http://MASTER_HOST:8080/metadata).")
@click.option("--mooncake-admin", default=None,
              help="Its admin HTTP server, which lists the names (default http://MASTER_HOST:9003).")
@click.option("--mooncake-prefix", default="kvtier:", show_default=True, help="Name prefix kvtier uses in Mooncake.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(disk_path: str | None, redis_url: str | None, redis_cluster: bool, redis_prefix: str,
            mooncake_master: str | None, mooncake_metadata: str | None, mooncake_admin: str | None,
            mooncake_prefix: str, as_json: bool) -> None:
    """What a disk directory, Redis namespace or Mooncake pool holds: chunks, bytes, models."""
    if not disk_path and not redis_url and not mooncake_master:
        raise click.UsageError("give --disk-path DIR, --redis-url redis://HOST:PORT and/or --mooncake-master HOST:PORT")
    if redis_url:
        from kvtier.config import check_redis_url

        check_redis_url(redis_url, "--redis-url")  # a one-line error, not a traceback
    mooncake = None
    if mooncake_master:
        from kvtier.config import check_host_port

        try:
            check_host_port(mooncake_master, "--mooncake-master")
        except ConfigError as e:
            raise click.BadParameter(str(e), param_hint="--mooncake-master") from e
        host = mooncake_master.rpartition(":")[0]
        mooncake = (mooncake_master, mooncake_metadata or f"http://{host}:8080/metadata",
                    mooncake_admin or f"http://{host}:9003", mooncake_prefix)
    rows = []
    for name, chunks in _scan_sources(disk_path, redis_url, redis_cluster, redis_prefix, mooncake):
        per_model: Counter[str] = Counter()
        size: Counter[str] = Counter()
        for c in chunks:
            per_model[c.label or "?"] += 1
            size[c.label or "?"] += c.nbytes
        for label in sorted(per_model):
            rows.append({"source": name, "model": label, "chunks": per_model[label], "bytes": size[label]})
        if not per_model:
            rows.append({"source": name, "model": "(empty)", "chunks": 0, "bytes": 0})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(_table(rows, ["source", "model", "chunks", "bytes"]))


def _scan_sources(disk_path: str | None, redis_url: str | None, cluster: bool, prefix: str,
                  mooncake: tuple[str, str, str, str] | None = None):
    from kvtier.tiers.scan import scan_disk, scan_redis

    if disk_path:
        if not os.path.isdir(disk_path):
            raise click.BadParameter(f"{disk_path!r} is not a directory", param_hint="--disk-path")
        yield f"disk:{disk_path}", scan_disk(disk_path)
    if redis_url:
        yield f"redis:{redis_url}", scan_redis(redis_url, cluster, prefix)
    if mooncake:
        yield f"mooncake:{mooncake[0]}", _scan_mooncake(*mooncake)


def _scan_mooncake(master: str, metadata: str, admin: str, prefix: str):
    """The pool's chunks; a master, metadata or admin server not there is a one-line error."""
    try:
        from kvtier.tiers.mooncake import scan_pool

        yield from scan_pool(master, metadata, admin, prefix)
    except ImportError as e:
        raise _UserError(str(e)) from e
    except (ConnectionError, OSError) as e:
        raise _UserError(f"mooncake at {master} (admin {admin}): {e}") from e


@main.command("config")
@click.option("--file", "yaml_path", default=None, help="A YAML config file to merge.")
def show_config(yaml_path: str | None) -> None:
    """Print the configuration kvtier resolves from defaults, YAML and KVTIER_* variables."""
    try:
        config = KVTierConfig.from_sources(yaml_path=yaml_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(config.to_dict(), indent=2))



@main.command()
@click.option("--address", default=None,
              help="ipc:///path (default: server setting, else ipc:///tmp/kvtier-UID/server.sock) or tcp://127.0.0.1:PORT.")
@click.option("--config-file", default=None, help="YAML config (cpu_bytes, tiers, disk_path, server_token, ...).")
@click.option("--cpu-bytes", default=None, help="Shared host memory for chunks, e.g. 64GiB (overrides config).")
@click.option("--tiers", default=None, help="Tiers, e.g. cpu,disk (overrides config; cpu is always first).")
@click.option("--disk-path", default=None, help="Disk tier directory (overrides config).")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on 127.0.0.1:PORT.")
@click.option("--num-layers", type=int, default=None, help="Model layout: layers (omit the layout to learn it "
              "from the first client).")
@click.option("--kv-heads", type=int, default=None, help="Model layout: KV heads per TP rank.")
@click.option("--head-size", type=int, default=None, help="Model layout: head size.")
@click.option("--dtype", default="bfloat16", show_default=True, help="Model layout: KV cache dtype.")
@click.option("--mla", is_flag=True, help="Model layout: MLA ([L, T, head_size] chunks).")
@click.option("--chunk-size", type=int, default=None, help="Tokens per chunk (default: config chunk_size).")
@click.option("--label", default="", help="Accept only clients whose namespace label is exactly this.")
@click.option("--client-timeout", type=float, default=10.0, show_default=True,
              help="Seconds of silence after which a client is presumed dead and its slots released.")
@click.option("--max-refs-per-client", type=int, default=0, help="Slots one client may hold (0: half of them).")
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback TCP address.")
@click.option("--log-level", default="INFO", show_default=True)
def serve(address, config_file, cpu_bytes, tiers, disk_path, metrics_port, num_layers, kv_heads, head_size,
          dtype, mla, chunk_size, label, client_timeout, max_refs_per_client, allow_remote, log_level) -> None:
    """Serve one shared host-memory cache to many engine processes on this host (until SIGTERM)."""
    import logging

    from kvtier.layout import ChunkLayout, dtype_from_name
    from kvtier.server.server import Server, run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = {k: v for k, v in (("cpu_bytes", cpu_bytes), ("tiers", tiers), ("disk_path", disk_path),
                               ("chunk_size", chunk_size)) if v is not None}
    try:
        config = KVTierConfig.from_sources(extra=extra, yaml_path=config_file)
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    layout = None
    if num_layers or kv_heads or head_size:
        if not num_layers or not head_size or (not kv_heads and not mla):
            raise click.UsageError("a layout needs --num-layers, --head-size and --kv-heads (or --mla)")
        try:
            width = head_size if mla else kv_heads * head_size
            layout = ChunkLayout(num_layers, config.chunk_size, width, dtype_from_name(dtype), mla)
        except ValueError as e:
            raise click.BadParameter(str(e)) from e
    try:
        server = Server(config, address, layout=layout, label=label, metrics_port=metrics_port,
                        client_timeout_s=client_timeout, max_refs_per_client=max_refs_per_client,
                        allow_remote=allow_remote)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    try:
        run(server)
    except (RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e


@main.command()
@click.option("--prefill", "prefill", multiple=True, required=True,
              help="URL of a prefill instance (vLLM, kv_role kv_producer); repeat for several (round robin).")
@click.option("--decode", "decode", multiple=True, required=True,
              help="URL of a decode instance (vLLM, kv_role kv_consumer); repeat for several (round robin).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds an upstream request may take before the client gets a 502.")
@click.option("--log-level", default="INFO", show_default=True)
def proxy(prefill: tuple[str, ...], decode: tuple[str, ...], host: str, port: int, timeout: float,
          log_level: str) -> None:
    """Prefill/decode disaggregation: each OpenAI request goes to a prefill instance (max_tokens=1),
    then to a decode instance, whose answer is returned (docs/deployments.md)."""
    import logging

    try:
        from kvtier.proxy import serve as serve_proxy
        import aiohttp  # noqa: F401
    except ImportError as e:
        raise _UserError(f"kvtier proxy needs aiohttp (pip install aiohttp; vLLM installs it): {e}") from e
    for url in prefill + decode:
        if not url.startswith(("http://", "https://")):
            raise click.BadParameter(f"{url!r}: expected http://HOST:PORT")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve_proxy(prefill, decode, host, port, timeout)
    except OSError as e:  # the port is taken, the host is not ours
        raise _UserError(f"kvtier proxy cannot listen on {host}:{port}: {e}") from e


@main.command()
@click.argument("address", required=False)
@click.option("--timeout", type=float, default=2.0, show_default=True, help="Seconds to wait for an answer.")
def health(address: str | None, timeout: float) -> None:
    """Exit 0 when a kvtier server answers at ADDRESS (default: the configured or default address)."""
    from kvtier.server.server import default_address, ping

    try:
        address = address or KVTierConfig.from_sources().server or default_address()
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    if ping(address, timeout):
        click.echo(f"ok {address}")
        return
    click.echo(f"no answer from {address}", err=True)
    sys.exit(1)

if __name__ == "__main__":
    main()
