"""The CUDA backend's bounded cache of stream sets (green contexts), checked without a GPU."""
from dynaflow.runtime.backends.green_ctx import StreamSet, StreamSets


def make_sets(capacity: int):
    log = []

    def make(key):
        log.append(("make", key))
        return StreamSet(streams=[key], notes={}, close=lambda: log.append(("close", key)))

    return StreamSets(make=make, synchronize=lambda: log.append(("sync",)), capacity=capacity), log


def test_a_set_is_made_once_and_reused():
    sets, log = make_sets(4)
    a = sets.acquire("a")
    sets.release("a")
    assert sets.acquire("a") is a and log == [("make", "a")]


def test_past_capacity_the_least_recently_used_idle_set_is_closed_after_a_sync():
    sets, log = make_sets(2)
    for key in "ab":
        sets.acquire(key)
        sets.release(key)
    sets.acquire("a")  # a is now the most recent
    sets.release("a")
    sets.acquire("c")
    assert log[-3:] == [("sync",), ("close", "b"), ("make", "c")]
    assert len(sets) == 2


def test_a_set_in_use_is_never_closed_even_past_capacity():
    sets, log = make_sets(1)
    sets.acquire("a")  # held by a runner
    sets.acquire("b")
    assert ("close", "a") not in log and len(sets) == 2
    sets.release("a")
    sets.release("b")
    sets.acquire("c")  # now both idle: closed oldest first until there is room
    assert [e for e in log if e[0] == "close"] == [("close", "a"), ("close", "b")]
    assert len(sets) == 1


def test_extra_releases_do_not_free_a_set_another_runner_holds():
    sets, log = make_sets(1)
    sets.acquire("a")
    sets.acquire("a")
    sets.release("a")
    sets.release("x")  # unknown keys are ignored
    sets.acquire("b")
    assert ("close", "a") not in log
