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


class _Tier:
    """A tier's surface call_tier uses: its name, a deadline per op (None: none), its ops."""

    name = "t"

    def __init__(self, limit: float | None, put) -> None:
        self.limit, self.put = limit, put

    def deadline(self, op: str, nbytes: int) -> float | None:
        return self.limit


@pytest.mark.parametrize("limit", [None, 5.0])
def test_call_tier_runs_on_return_once_with_or_without_a_deadline(limit):
    """The store and the writer child call a tier through call_tier: on its thread where the tier
    sets no deadline, through call() where it does; the hook runs once either way, raising too."""
    calls, _ = _calls()
    ran: list[int] = []
    assert calls.call_tier(_Tier(limit, lambda keys: [True] * len(keys)), "put", ([b"k"],), 1,
                           on_return=lambda: ran.append(1)) == [True]

    def broken(keys) -> list:
        raise RuntimeError("a tier bug")

    with pytest.raises(RuntimeError):
        calls.call_tier(_Tier(limit, broken), "put", ([b"k"],), 1, on_return=lambda: ran.append(2))
    calls.close()  # the threads finish what they hold: each call's hook has run
    for t in calls._threads:
        t.join(5)
    assert sorted(ran) == [1, 2]
