import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/user_models.py as `user_models`

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


# The quick tier (`sh scripts/test.sh --quick`, `pytest -m quick`): each layer's main path once, for
# every change. A test id here is a prefix: a file, a test, or one parametrization of it.
QUICK = (
    "tests/test_layers.py",  # every module imports, and only downward
    "tests/test_schedule.py",  # a schedule: its rules and its JSON
    "tests/test_equivalence.py::test_random_schedules_equal_sequential[llama-tiny-cpu]",  # plans run, joined, verified
    "tests/test_equivalence.py::test_mixing_model_is_caught_by_verification",
    "tests/test_equivalence.py::test_copy_join_fallback_is_correct",  # the executor's join by copies
    "tests/test_measure.py::test_ok_measurement_has_consistent_numbers",  # measured: verified, timed, reported
    "tests/test_measure.py::test_invalid_schedule_is_a_result",
    "tests/test_steady.py::test_after_any_candidate_the_sequential_run_sees_the_full_count_and_the_same_state",
    "tests/test_steady.py::test_a_round_in_different_states_is_never_evidence",
    "tests/test_paired.py::test_round_figures_and_intervals",  # the paired statistics
    "tests/test_verdicts.py::test_three_verdicts_from_the_rounds",
    "tests/test_verdicts.py::test_busy_rounds_are_no_evidence_for_a_winner",
    "tests/test_verdicts.py::test_sequential_best_needs_every_candidate_excluded",
    "tests/test_verdicts.py::test_an_inconclusive_run_never_replaces_a_conclusive_record",  # the store's replace rule
    "tests/test_store.py::test_round_trip_and_path",  # a record stored and read
    "tests/test_store.py::test_one_replace_rule_for_tuning_and_importing",
    "tests/test_loading.py::test_exact_bucket",  # ... and loaded at start-up
    "tests/test_loading.py::test_nearest_bucket_is_rescaled_to_the_live_batch",
    "tests/test_tuner.py::test_search_reaches_the_optimum_within_budget",  # a tune on a fake target
    "tests/test_tuner.py::test_every_failure_type_is_recorded_and_the_study_goes_on",
    "tests/test_perfmodel.py::test_interference_of_unequal_tasks_follows_the_fluid_model",  # the simulator
    "tests/test_perfmodel.py::test_a_task_reading_from_another_stream_waits_for_it_and_for_the_wake_up",
    "tests/test_perfmodel.py::test_a_rescaled_line_takes_its_intercept_and_per_token_part_from_the_new_batch",  # one profile per model
    "tests/test_guide.py::test_a_workload_where_nothing_could_gain_measures_only_the_models_top_few",  # the model's screen
    "tests/test_remote.py::test_a_station_answers_every_request_and_never_raises",  # the remote protocol
    "tests/test_remote.py::test_vllms_worker_keeps_the_rules",  # ... and its lost-worker path
    "tests/test_remote.py::test_the_inline_pool_keeps_the_rules_in_this_process",
    "tests/test_hostile_input.py::test_bad_model_specs_are_one_line",  # the CLI's bad-input rule
)


# The longest files first (docs/testing.md's table of the slowest tests): with two workers taking a
# file each, a long file started last would leave one worker alone at the end.
SLOW_FIRST = (
    "tests/test_readme_commands.py",
    "tests/test_ray_cluster.py",  # its own cluster, in its own TMPDIR: beside the rest (mostly waiting on Ray)
    "tests/test_tolerance.py",
    "tests/test_remote.py",
    "tests/test_dynamo.py",
    "tests/test_storage.py",
    "tests/test_tp.py",
    "tests/test_serve_loop.py",
    "tests/test_ray_pool.py",
    "tests/test_tune_e2e.py",
    "tests/test_resume.py",
    "tests/test_readme_models.py",
)


def _slow_first(item) -> int:
    return next((i for i, f in enumerate(SLOW_FIRST) if item.nodeid.startswith(f)), len(SLOW_FIRST))


def pytest_collection_modifyitems(config, items):
    items.sort(key=_slow_first)  # stable: each file's own order is kept
    for item in items:
        if item.nodeid.startswith(QUICK):
            item.add_marker(pytest.mark.quick)
    if config.getoption("markexpr") == "quick":  # a renamed test must not leave the tier silently
        lost = [q for q in QUICK if not any(item.nodeid.startswith(q) for item in items)]
        if lost:
            raise pytest.UsageError(f"tests/conftest.py's QUICK names tests that do not exist: {lost}")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none visible to torch")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
