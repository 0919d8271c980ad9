"""kvtier.trace: spans record the thread's CPU time, so a step's host time splits into work and waiting."""

import os
import subprocess
import sys

from kvtier.trace import summarize

SCRIPT = """
import time
from kvtier.trace import span
with span("sleeps"):  # waiting: no CPU
    time.sleep(0.05)
with span("spins"):   # working: all CPU
    t = time.thread_time()
    while time.thread_time() - t < 0.05:
        pass
"""


def test_spans_split_waiting_from_work(tmp_path):
    path = tmp_path / "trace.jsonl"
    subprocess.run([sys.executable, "-c", SCRIPT], check=True, env={**os.environ, "KVTIER_TRACE": str(path)})
    s = summarize(str(path))
    assert s["sleeps"]["median_s"] >= 0.05 and s["sleeps"]["wait_p99_s"] >= 0.045
    assert s["spins"]["median_s"] >= 0.05 and s["spins"]["wait_p99_s"] < 0.5 * s["spins"]["median_s"]


def test_off_by_default_records_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_TRACE"}
    out = subprocess.run([sys.executable, "-c", "from kvtier import trace; print(trace.ON)"], env=env,
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"
    assert not list(tmp_path.iterdir())
