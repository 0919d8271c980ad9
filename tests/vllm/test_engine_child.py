"""kvtier.vllm.phases.run_engine_child: the result line of a child process, with the lines of its
log that time a part of the engine's start-up."""

import json
import sys

import pytest

from kvtier.vllm.phases import MARK, run_engine_child

CHILD = f"""
import json, sys
spec = json.loads(sys.stdin.read())
print("(Worker pid=1) INFO [default_loader.py:501] Loading weights took 0.02 seconds")
print("(EngineCore pid=2) INFO [monitor.py:34] torch.compile takes 23.4 s in total")
print("(EngineCore pid=2) INFO [core.py:1635] [shutdown] EngineCore: start mode=abort timeout=0s")
print({MARK!r} + json.dumps({{"echo": spec["x"]}}))
"""


def test_the_result_carries_the_timed_start_up_lines():
    got = run_engine_child([sys.executable, "-c", CHILD], {"x": 7}, MARK, timeout=60)
    assert got["echo"] == 7
    assert got["startup_lines"] == ["(Worker pid=1) INFO [default_loader.py:501] Loading weights took 0.02 seconds",
                                    "(EngineCore pid=2) INFO [monitor.py:34] torch.compile takes 23.4 s in total"]


def test_a_child_without_a_result_line_is_an_error_with_its_log():
    with pytest.raises(RuntimeError, match="no result here"):
        run_engine_child([sys.executable, "-c", "print('no result here')"], {}, MARK, timeout=60)
