"""A search space for fault injection: trial n proposes candidate n % 5; trials 3 and 6 are poison."""
from dynaflow.runtime import Schedule

name = "faulty"
POISON = {3: "poison-exit", 6: "poison-hang"}


def suggest(trial, ctx):
    n = ctx.layout.num_requests
    if trial.number in POISON:
        return Schedule(split_sizes=(n - 1, 1), label=POISON[trial.number])
    k = trial.number % 5
    return Schedule(split_sizes=(k + 1, n - k - 1), label=f"cand{k}")
