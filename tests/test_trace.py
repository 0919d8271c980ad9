"""kvtier.trace: spans record the thread's CPU time, so a step's host time splits into work and waiting."""

import json
import os
import subprocess
import sys

import pytest

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


GARBAGE = """
import gc
from kvtier import trace
trace.GC_MIN_S = 0.0
junk = [[i] for i in range(300_000)]  # many tracked objects: a full collection walks them
gc.collect()
"""


def test_garbage_collections_are_spans(tmp_path):
    """A collection holds the GIL (every thread of an engine stands still): it is a span of its own,
    with its generation, so a stall that no kvtier span explains can be told apart."""
    import json

    path = tmp_path / "trace.jsonl"
    subprocess.run([sys.executable, "-c", GARBAGE], check=True, env={**os.environ, "KVTIER_TRACE": str(path)})
    full = [d for d in map(json.loads, path.read_text().splitlines()) if d["name"] == "gc" and d["generation"] == 2]
    assert full and full[-1]["dur"] > 0 and full[-1]["thread"] == "MainThread"


def test_off_by_default_records_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_TRACE"}
    out = subprocess.run([sys.executable, "-c", "from kvtier import trace; print(trace.ON)"], env=env,
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"
    assert not list(tmp_path.iterdir())


THREADS = """
import threading
from kvtier.trace import span
with span("engine_side"):
    pass
def load():
    with span("load_side"):
        pass
t = threading.Thread(target=load, name="kvtier-load")
t.start(); t.join()
"""


def test_lines_name_their_thread_and_spike_causes_set_kvtier_threads_apart(tmp_path):
    """A span on kvtier's own load thread overlaps an ITL spike without holding up the engine's
    thread: benchmarks/async_causes.py lists it apart (seen on the H100: 2.5 s of `worker.plan_loads`
    in spikes that were recomputed prefills)."""
    import importlib.util
    import json
    from pathlib import Path

    path = tmp_path / "trace.jsonl"
    subprocess.run([sys.executable, "-c", THREADS], check=True, env={**os.environ, "KVTIER_TRACE": str(path)})
    lines = {d["name"]: d for d in map(json.loads, path.read_text().splitlines())}
    assert lines["engine_side"]["thread"] == "MainThread" and lines["load_side"]["thread"] == "kvtier-load"

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "async_causes.py"
    spec = importlib.util.spec_from_file_location("async_causes", script)
    causes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(causes)
    ticks = [0.01 * i for i in range(20)] + [0.5 + 0.01 * i for i in range(20)]  # one 0.31 s gap
    run = {"added": {}, "token_times": {"r0": ticks}}
    spans = [{"t": 0.25, "dur": 0.1, "name": "worker.plan_loads", "thread": "kvtier-load"},
             {"t": 0.30, "dur": 0.01, "name": "hook.get_finished", "thread": "MainThread"},
             {"t": 0.26, "dur": 0.05, "name": "sample", "thread": "MainThread", "stack": ["a.py:f:1"]},
             {"t": 0.26, "dur": 0.05, "name": "sample", "thread": "kvtier-load_0", "stack": ["b.py:g:2"]}]
    got = causes.analyse(run, spans)
    assert set(got["spans_in_spikes"]) == {"worker.plan_loads [kvtier-load]", "hook.get_finished"}
    assert set(got["stacks_in_spikes_ms"]) == {"a.py:f:1", "[kvtier-load_0] b.py:g:2"}
    assert got["spikes"] == 1 and got["before_first_arrival_ms"] == []
    # A gap that began before the first arrival is the running requests' admission: apart.
    got = causes.analyse({"added": {"a0": 0.3}, "token_times": {"r0": ticks, "a0": [0.6]}}, spans)
    assert got["spikes"] == 0 and got["spans_in_spikes"] == {}
    assert got["before_first_arrival_ms"] == [310.0]


SAMPLED = """
import threading, time
from concurrent.futures import ThreadPoolExecutor
from kvtier import trace
assert trace.start_sampling()
def load_waits_in_here():
    time.sleep(0.1)
def not_sampled():
    time.sleep(0.1)
idle = ThreadPoolExecutor(1, thread_name_prefix="kvtier-load-idle")
idle.submit(int).result()  # its thread now waits for work: nothing of interest
def engine_waits_in_here():
    threading.Thread(target=load_waits_in_here, name="kvtier-load_0").start()
    threading.Thread(target=not_sampled, name="engine-helper").start()
    time.sleep(0.12)
trace.mark_step()
engine_waits_in_here()  # a late step: its samples are written
trace.mark_step()
time.sleep(0.01)  # a step on time: nothing written
trace.mark_step()
trace.flush()
"""


def test_a_late_step_writes_what_the_main_and_load_threads_were_doing(tmp_path):
    """KVTIER_TRACE_SAMPLE_MS: the first arrival's 133 ms wait on the H100 had no span of kvtier's on
    any thread; the main thread's sampled stacks of such a gap say where it was."""
    import json

    path = tmp_path / "trace.jsonl"
    subprocess.run([sys.executable, "-c", SAMPLED], check=True,
                   env={**os.environ, "KVTIER_TRACE": str(path), "KVTIER_TRACE_SAMPLE_MS": "2"})
    samples = [d for d in map(json.loads, path.read_text().splitlines()) if d["name"] == "sample"]
    inside = [d for d in samples if any("engine_waits_in_here" in f for f in d["stack"])]
    assert inside, samples
    # Innermost frame first (the first sample may still catch the thread starting its helpers).
    assert any(d["stack"][0].startswith("<string>:engine_waits_in_here:") for d in inside)
    # Lower bounds only tight: on a busy 2-core box (CI beside another suite) the sleeps wake late,
    # and the samples then rightly cover more.
    assert 0.08 <= sum(d["dur"] for d in inside) <= 0.6
    assert {d["thread"] for d in inside} == {"MainThread"}
    # A load thread's wait in the same gap is written apart; threads of no interest are not sampled.
    load = [d for d in samples if any("load_waits_in_here" in f for f in d["stack"])]
    assert load and {d["thread"] for d in load} == {"kvtier-load_0"}
    assert 0.05 <= sum(d["dur"] for d in load) <= 0.6
    assert not [d for d in samples if any("not_sampled" in f for f in d["stack"])]
    assert not [d for d in samples if d["thread"].startswith("kvtier-load-idle")], "an idle pool thread was sampled"
    assert all(d["t"] + d["dur"] <= inside[-1]["t"] + inside[-1]["dur"] + 0.03 for d in samples), \
        "samples of the step on time were written"


def test_sampling_is_off_without_its_setting(tmp_path):
    path = tmp_path / "trace.jsonl"
    script = "from kvtier import trace; print(trace.start_sampling()); trace.mark_step(); trace.flush()"
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_TRACE_SAMPLE_MS"}
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         env={**env, "KVTIER_TRACE": str(path)})
    assert out.stdout.strip() == "False"
    assert not path.exists()


FORKED = """
import os
from kvtier import trace
trace.record("before.fork", 1.0)
pid = os.fork()
if pid == 0:  # vLLM forks its engine process from the one that holds the LLM
    trace.record("in.child", 2.0)
    trace.flush()
    os._exit(0)
os.waitpid(pid, 0)
trace.flush()
"""


def test_a_forked_child_does_not_write_its_parents_buffered_lines_again(tmp_path):
    """On the H100 every line the benchmark's process buffered before vLLM forked its engine was in the
    trace twice: the engine process inherited the buffer and flushed it as its own."""
    path = tmp_path / "t.jsonl"
    subprocess.run([sys.executable, "-c", FORKED], check=True, env={**os.environ, "KVTIER_TRACE": str(path)})
    names = [json.loads(line)["name"] for line in path.read_text().splitlines()]
    assert sorted(names) == ["before.fork", "in.child"]


def test_cold_causes_sets_each_cold_request_against_the_spans_in_it(tmp_path, monkeypatch):
    """benchmarks/cold_causes.py: per length, the first ``reps`` TTFT windows are the cold runs; the
    spans that start inside one count toward it (kvtier's own threads by name apart), the hits and
    what lies outside do not."""
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("cold_causes", bench / "cold_causes.py")
    causes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(causes)

    def ttft(t, dur, tokens=2048):
        return {"t": t, "dur": dur, "name": "phase.ttft", "thread": "MainThread", "tokens": tokens}

    spans = [ttft(0.0, 0.050), ttft(1.0, 0.060), ttft(2.0, 0.020),  # cold, cold, then a hit
             {"t": 0.010, "dur": 0.0, "name": "worker.step", "thread": "MainThread"},
             {"t": 0.011, "dur": 0.002, "name": "step_host.worker", "thread": "MainThread"},
             {"t": 0.020, "dur": 0.030, "name": "worker.wait_saves", "thread": "kvtier-save_0"},
             {"t": 1.010, "dur": 0.0, "name": "worker.step", "thread": "MainThread"},
             {"t": 1.020, "dur": 0.0, "name": "worker.step", "thread": "MainThread"},
             {"t": 1.011, "dur": 0.004, "name": "step_host.worker", "thread": "MainThread"},
             {"t": 2.005, "dur": 0.009, "name": "step_host.worker", "thread": "MainThread"},  # the hit's
             {"t": 0.500, "dur": 0.1, "name": "gc", "thread": "MainThread"}]  # between requests
    path = tmp_path / "trace_kvtier.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in spans))
    row = causes.summarize(path, reps=2)[2048]
    assert row["ttft_ms"] == pytest.approx(55.0) and row["steps"] == 1.5 and row["host_ms"] == pytest.approx(3.0)
    assert row["per_name_ms"]["worker.wait_saves [kvtier-save_0]"] == pytest.approx(15.0)  # median of 30 and 0
    assert "gc" not in row["per_name_ms"]
    assert row["step_starts_ms"] == [[10.0], [10.0, 20.0]]
    hit = causes.summarize(path, reps=2, hits=True)[2048]  # the third TTFT span of the length
    assert hit["ttft_ms"] == pytest.approx(20.0) and hit["host_ms"] == pytest.approx(9.0) and hit["steps"] == 0
