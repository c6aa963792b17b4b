"""Hostile and careless files through every entry point that reads one: only the project's own
one-line errors come out (ValueError naming the file, or exit 2 with one line on stderr).

Valid records and schedules are mutated (truncated, a value swapped for another type, a huge or
negative number, deep nesting, an unknown key, a key written twice, bytes that are not UTF-8) and handed to the store
reader, start-up loading (record files and the pack), `load_schedule`, `measure --schedule`'s
reader and `dynaflow-tune list`.
"""
import contextlib
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynaflow.runtime import Schedule, Step, StreamSpec, Workload
from dynaflow.runtime.loading import ScheduleMap, load_schedule
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule
from dynaflow.tuner.cli import main
from dynaflow.tuner.commands import load_schedule_file
from fakes import H100
from cli_output import error_lines

W = Workload(model="llama3-8b", num_decode=256, context_len=2048, prefill_tokens=512, dtype="bfloat16", device="cuda")
SCHEDULE = Schedule(split_sizes=(128, 129), streams=(StreamSpec(sm_share=96), StreamSpec(sm_share=32, priority=-1)),
                    order=(Step(op="a", nano=0, stream=0), Step(op="a", nano=1, stream=1)), label="x")
RECORD = StoredSchedule(hardware=H100, workload=W, schedule=SCHEDULE, verdict="winner", tokens_per_s=1e5,
                        baseline_tokens_per_s=8e4, speedup=1.25, speedup_spread=0.02, efficiency=0.7,
                        space="nanoflow", speedup_interval=(1.1, 1.3), params={"num_nano": 2},
                        study="s", storage="sqlite:///x.db", trial=7).to_dict()
DEEP = "__deep__"


def paths(obj, at=()):
    """Every path into a JSON value: keys of objects, indices of lists."""
    yield at
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, (*at, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, (*at, i))


def put(obj, at, value):
    if not at:
        return value
    obj = json.loads(json.dumps(obj))
    target = obj
    for k in at[:-1]:
        target = target[k]
    target[at[-1]] = value
    return obj


ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                      st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                      st.just(DEEP))


@st.composite
def mutated(draw, base):
    """The bytes of a damaged file made from `base`."""
    kind = draw(st.sampled_from(["swap", "swap", "unknown", "truncate", "bytes", "twice"]))
    if kind == "twice":  # a top-level key written twice, the second value another's: JSON keeps the last
        key = draw(st.sampled_from(sorted(base)))
        other = draw(ANY_VALUE.filter(lambda v: v != DEEP))
        return ("{" + json.dumps(key) + ": " + json.dumps(other) + ", " + json.dumps(base)[1:]).encode()
    if kind in ("swap", "unknown"):
        at = draw(st.sampled_from(list(paths(base))))
        value = draw(ANY_VALUE)
        if kind == "unknown":
            parent = at[:-1] if at else ()
            obj = base
            for k in parent:
                obj = obj[k]
            at = (*parent, draw(st.text(min_size=1, max_size=6))) if isinstance(obj, dict) else at
        text = json.dumps(put(base, at, value))
        depth = draw(st.sampled_from([50, 5_000, 200_000]))
        return text.replace(f'"{DEEP}"', "[" * depth + "]" * depth).encode()
    text = json.dumps(base).encode()
    cut = draw(st.integers(0, len(text)))
    if kind == "truncate":
        return text[:cut]
    return text[:cut] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc"])) + text[cut:]


def only_own_errors(fn):
    """fn() returns, or raises the project's one-line ValueError."""
    try:
        fn()
    except ValueError as e:
        assert "\n" not in str(e) and str(e), repr(e)


def cli_is_one_line(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code in (0, 2), (code, err.getvalue())
    assert len(error_lines(err.getvalue())) <= 1 and "Traceback" not in err.getvalue(), err.getvalue()


FUZZ = settings(max_examples=260, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def scratch():
    """A fresh folder per example (pytest's tmp_path is one per test, shared by its examples)."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


@FUZZ
@given(data=mutated(RECORD))
def test_mutated_records_through_every_reader(data):
    with scratch() as root:
        path = root / "schedules" / H100.key / f"{W.key}.json"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        only_own_errors(lambda: ScheduleStore(StoreConfig(root=root)).read(path))
        only_own_errors(lambda: ScheduleMap.load(root, model=W.model, dtype=W.dtype, hardware=H100).pick_counts(256, 1, 512, 2048))
        only_own_errors(lambda: ScheduleMap.load(root, model=W.model, dtype=W.dtype, hardware=H100, on_error="warn"))
        only_own_errors(lambda: load_schedule(path, W, hardware=H100))
        only_own_errors(lambda: load_schedule_file(path, hardware=H100))
        cli_is_one_line(["list", "--store", str(root)])


@FUZZ
@given(data=mutated({"pack_schema": 2, "stamp": "", "records": [RECORD]}))
def test_mutated_packs_with_a_current_stamp(data):
    """A pack whose stamp matches its folder is read instead of the files: its records are still
    validated whole."""
    with scratch() as root:
        store = ScheduleStore(StoreConfig(root=root))
        (store.root / H100.key).mkdir(parents=True)
        text = data.replace(b'"stamp": ""', f'"stamp": "{store._stamp(H100.key)}"'.encode())
        store.pack_path(H100.key).write_bytes(text)
        only_own_errors(lambda: ScheduleMap.load(root, model=W.model, dtype=W.dtype, hardware=H100).pick_counts(256, 1, 512, 2048))


@FUZZ
@given(data=mutated(SCHEDULE.to_dict()))
def test_mutated_schedules(data):
    with scratch() as root:
        path = root / "s.json"
        path.write_bytes(data)
        only_own_errors(lambda: load_schedule_file(path))
        only_own_errors(lambda: Schedule.from_json(data.decode("utf-8", "replace")))


@FUZZ
@given(data=mutated(put(RECORD, ("schedule",), SCHEDULE.to_dict())))
def test_mutated_records_as_measure_schedule_files(data):
    with scratch() as root:
        path = root / "r.json"
        path.write_bytes(data)
        only_own_errors(lambda: load_schedule_file(path))


@FUZZ
@given(spec=st.text(alphabet=st.sampled_from("dxpc+0123456789\u0661\u0666\uff12\u00b2 "), max_size=14))
def test_workload_specs_take_ascii_digits_only(spec):
    """Any spec either parses (ASCII digits only, each number as written) or is one ValueError."""
    from dynaflow.tuner.workloads import parse_workload

    try:
        w = parse_workload(spec, model="llama-tiny", dtype="float32", device="cpu")
    except ValueError as e:
        assert "\n" not in str(e)
        return
    assert spec.strip().isascii(), (spec, w)
