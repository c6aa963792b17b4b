"""A search space for fault injection: trial n proposes candidate n (a distinct split each);
trials 3 and 6 are poison, each with a split of its own."""
from dynaflow.runtime import Schedule

name = "faulty"
POISON = {3: ("poison-exit", 1), 6: ("poison-hang", 2)}


def suggest(trial, ctx):
    n = ctx.layout.num_requests
    if trial.number in POISON:
        label, last = POISON[trial.number]
        return Schedule(split_sizes=(n - last, last), label=label)
    k = trial.number
    return Schedule(split_sizes=(k + 1, n - k - 1), label=f"cand{k}")
