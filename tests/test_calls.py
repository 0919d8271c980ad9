"""kvtier.tiers.calls.DeadlineCalls: a tier call bounded by a deadline, and the hook a caller gets
when the call is over (the writer child answers for a chunk only once every put of it returned)."""

import threading

import pytest

from kvtier.tiers.calls import DeadlineCalls


def _calls() -> tuple[DeadlineCalls, list[str]]:
    overruns: list[str] = []
    return DeadlineCalls(overruns.append), overruns


def test_on_return_runs_once_for_a_call_in_time():
    calls, overruns = _calls()
    done = threading.Event()
    assert calls.call("t", lambda: [True], (), 5.0, on_return=done.set) == [True]
    assert done.wait(5) and not overruns and not calls.hung("t")
    calls.close()


def test_on_return_runs_for_a_call_that_raised():
    """A tier must not raise; where one does, the caller sees the exception and its hook still runs
    (a writer that counted the put as open would otherwise never answer for the chunk)."""
    calls, _ = _calls()
    done = threading.Event()

    def broken() -> list:
        raise RuntimeError("a tier bug")

    with pytest.raises(RuntimeError):
        calls.call("t", broken, (), 5.0, on_return=done.set)
    assert done.wait(5)
    calls.close()


def test_on_return_runs_when_a_call_past_its_deadline_returns_at_last():
    calls, overruns = _calls()
    gate, done = threading.Event(), threading.Event()
    assert calls.call("t", lambda: gate.wait(10) and [True], (), 0.1, on_return=done.set) is None
    assert overruns == ["t"] and calls.hung("t") and not done.is_set()
    gate.set()
    assert done.wait(5)
    calls.close()
