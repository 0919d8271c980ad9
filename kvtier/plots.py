"""PNG charts of `kvtier bench` results (``--plot FILE.png``); needs matplotlib (``pip install kvtier[plot]``)."""

from __future__ import annotations

from typing import Any

import click


def pyplot():
    """matplotlib.pyplot drawing to files; a clear error where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise click.UsageError("--plot needs matplotlib: pip install 'kvtier[plot]' (or matplotlib)") from e
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    """Grouped bars: one group per label of ``groups``, one bar per series, values over the bars."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        kept = [(x, v) for x, v in zip(xs, values) if v is not None]
        bars = ax.bar([x for x, _ in kept], [v for _, v in kept], width, label=name)
        ax.bar_label(bars, labels=[f"{v:.3g}" for _, v in kept], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.legend(fontsize=8)


def plot_ttft(result: dict[str, Any], path: str) -> None:
    """TTFT by prompt length (``kvtier bench vllm``): cold, vLLM's own hit, kvtier cpu and disk hits."""
    plt = pyplot()
    rows = result["ttft"]
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, [f"{r['tokens']:,} tokens" for r in rows], {
        "cold (vLLM alone)": [r["cold_vllm_s"] for r in rows],
        "vLLM prefix-cache hit": [r["vllm_hit_s"] for r in rows],
        "kvtier hit, cpu tier": [r["kvtier_cpu_hit_s"] for r in rows],
        "kvtier hit, disk tier (restart)": [r["kvtier_disk_hit_s"] for r in rows],
    })
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s, log scale)")
    ax.set_title(f"TTFT, {result.get('model', '')} model on vLLM (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tiers(result: dict[str, Any], path: str) -> None:
    """Each tier's bandwidth beside the raw operation under it (``kvtier bench tiers``)."""
    plt = pyplot()
    rows = [r for r in result["results"] if "kvtier_GBps" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, [f"{r['tier']} {r['op']}" for r in rows], {
        "raw baseline": [r["baseline_GBps"] for r in rows],
        "kvtier": [r["kvtier_GBps"] for r in rows],
    })
    ax.set_ylabel("GB/s")
    ax.set_title(f"kvtier tiers vs the raw operation ({result.get('layout', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
