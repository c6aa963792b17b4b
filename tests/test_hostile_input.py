"""Bad input never gives a traceback or escapes the store: one test per case reported in issue 15.
Each ends in one line naming the file, flag or field and the rule (exit 2 for usage errors), or
in a documented fallback."""
import contextlib
import dataclasses
import io
import json
import logging
import os
import subprocess
import sys

import pytest

from dynaflow.runtime import Schedule, StreamSpec, Workload, detect
from dynaflow.runtime.loading import ScheduleMap, load_schedule
from dynaflow.runtime.store import ScheduleStore, StoreConfig, StoredSchedule
from dynaflow.tuner.cli import main
from fakes import A100, H100
from cli_output import error_lines

W = Workload(model="llama3-8b", num_decode=256, context_len=2048, prefill_tokens=512, dtype="bfloat16", device="cuda")
DEEP = "[" * 100_000 + "]" * 100_000


def record(hardware=H100, workload=W, sizes=(128, 129)) -> StoredSchedule:
    return StoredSchedule(hardware=hardware, workload=workload, schedule=Schedule(split_sizes=sizes, streams=(
        StreamSpec(), StreamSpec()), label="x"), verdict="winner", tokens_per_s=1e5, baseline_tokens_per_s=8e4,
        speedup=1.25, speedup_spread=0.02, efficiency=0.7, space="nanoflow")


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_line(err: str, *words: str) -> None:
    assert len(error_lines(err)) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


@pytest.fixture
def store(tmp_path):
    ScheduleStore(StoreConfig(root=tmp_path)).save(record())
    return tmp_path


def record_path(store):
    return store / "schedules" / H100.key / f"{W.key}.json"


# --- deeply nested JSON ----------------------------------------------------------------------------

def test_deep_nesting_is_one_error_naming_the_file_everywhere(store, tmp_path):
    path = record_path(store)
    path.write_text(DEEP)
    for load in (lambda: ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100),
                 lambda: load_schedule(store, W, hardware=H100), lambda: load_schedule(path, W, hardware=H100)):
        with pytest.raises(ValueError, match=f"{path} nests JSON deeper"):
            load()
    code, out, err = run_cli("list", "--store", store)
    assert code == 0 and "nests JSON deeper" in out and err == ""
    schedule = tmp_path / "deep.json"
    schedule.write_text(DEEP)
    code, _, err = run_cli("measure", "--workload", "d4x16", "--model", "llama-tiny", "--schedule", schedule)
    assert code == 2
    one_line(err, str(schedule), "nests JSON deeper")


def test_a_deep_pack_is_ignored_with_a_warning_and_the_files_answer(store, caplog):
    ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100)  # writes the pack
    s = ScheduleStore(StoreConfig(root=store))
    s.pack_path(H100.key).write_text(DEEP)
    with caplog.at_level(logging.WARNING, logger="dynaflow"):
        smap = ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100)
    assert len(smap.raw) == 1 and "ignoring the pack" in caplog.text and "nests JSON deeper" in caplog.text


# --- the store never reads or writes outside its root ----------------------------------------------

def test_a_record_symlinked_outside_the_store_is_not_read(store, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.json"
    d64 = Workload(model="llama3-8b", num_decode=64, context_len=2048, dtype="bfloat16", device="cuda")
    outside.write_text(json.dumps(record(workload=d64).to_dict()))
    link = record_path(store).with_name("llama3-8b_d64x2048_p0_bf16.json")
    link.symlink_to(outside)
    with pytest.raises(ValueError, match=f"{link} resolves to {outside}, outside the store"):
        ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100)
    smap = ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100, on_error="warn")
    assert [r["workload"]["num_decode"] for r in smap.raw] == [256]  # the link was skipped
    code, out, _ = run_cli("list", "--store", store)
    assert code == 0 and "outside the store" in out


def test_tune_refuses_a_hardware_folder_symlinked_outside_before_measuring(tmp_path, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (tmp_path / "schedules").mkdir()
    (tmp_path / "schedules" / detect("cpu").key).symlink_to(elsewhere, target_is_directory=True)
    code, _, err = run_cli("tune", "--model", "llama-tiny", "--workload", "d4x16", "--trials", "1", "--no-progress",
                           "--store", tmp_path, "--storage", f"sqlite:///{tmp_path}/s.db")
    assert code == 2
    one_line(err, "outside the store")
    assert list(elsewhere.iterdir()) == []
    assert not (tmp_path / "s.db").exists()  # refused before the study was opened


def test_save_refuses_a_path_through_a_symlink(tmp_path, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (tmp_path / "schedules").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the store"):
        ScheduleStore(StoreConfig(root=tmp_path)).save(record())
    assert list(elsewhere.iterdir()) == []


# --- records validated whole, packs included -------------------------------------------------------

def test_a_record_with_a_null_speedup_is_listed_as_invalid_not_a_crash(store):
    path = record_path(store)
    path.write_text(path.read_text().replace('"speedup": 1.25', '"speedup": null'))
    code, out, err = run_cli("list", "--store", store)
    assert code == 0 and err == "" and "record.speedup must be a finite number > 0, but got None" in out


def test_a_current_pack_whose_records_were_edited_is_not_trusted(store, caplog):
    """A pack's records are trusted only as written: edited afterwards (the stamp still matching
    the folder), the digest in its header tells, and the record files answer."""
    ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100)
    s = ScheduleStore(StoreConfig(root=store))
    header, body = s.pack_path(H100.key).read_text().split("\n", 1)
    records = json.loads(body)
    del records[0]["workload"]
    s.pack_path(H100.key).write_text(f"{header}\n{json.dumps(records)}\n")
    with caplog.at_level(logging.WARNING, logger="dynaflow"):
        smap = ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100)
    assert len(smap.raw) == 1 and "ignoring the pack" in caplog.text and "SHA-256 differs" in caplog.text
    assert smap.pick_counts(256, 1, 512, 2048).split_sizes  # the file's record answers


def test_a_pack_written_with_a_record_missing_its_workload_is_not_trusted(store, caplog):
    """A pack whose digest matches but whose record lacks what start-up reads before parsing it
    (written by hand or by a broken tool) is ignored with a warning."""
    ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100)
    s = ScheduleStore(StoreConfig(root=store))
    raw = record().to_dict()
    del raw["workload"]
    s.write_pack(H100.key, [raw])
    with caplog.at_level(logging.WARNING, logger="dynaflow"):
        smap = ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100)
    assert len(smap.raw) == 1 and "not a list of records with a hardware and a workload" in caplog.text


def test_a_packed_record_invalid_at_its_first_use_is_skipped_with_a_warning_not_a_crash(store, caplog):
    """A pack's records are parsed at their first use: one that fails there (a pack written by hand
    with a current digest) is one WARNING and the next candidate answers; the server goes on."""
    s = ScheduleStore(StoreConfig(root=store))
    bad = record(sizes=(100, 157)).to_dict()
    bad["speedup"] = None
    s.write_pack(H100.key, [bad, record(workload=dataclasses.replace(W, num_decode=240), sizes=(120, 121)).to_dict()])
    with caplog.at_level(logging.INFO, logger="dynaflow"):
        smap = ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100)
        got = [smap.pick_counts(256, 1, 512, 2048) for _ in range(3)]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "record.speedup must be a finite number > 0" in warned[0] and "skipped" in warned[0]
    assert all(g.split_sizes == got[0].split_sizes for g in got) and smap.answers()  # the other record answered
    assert list(smap.answers().values()) == ["nearest"]


def test_a_pack_of_another_hardware_is_refused(store):
    ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100)
    s = ScheduleStore(StoreConfig(root=store))
    s.write_pack(H100.key, [record(hardware=A100).to_dict()])  # its digest and stamp current
    with pytest.raises(ValueError, match="was tuned on .*a100"):
        ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100)


def test_a_pack_of_an_older_store_is_rewritten_without_a_word(store, caplog):
    """A pack in the one-object format of an older version: the files are read, no warning, and the
    pack rewritten in this version's format."""
    s = ScheduleStore(StoreConfig(root=store))
    s.pack_path(H100.key).write_text(json.dumps({"pack_schema": 4, "stamp": s._stamp(H100.key),
                                                 "records": [record().to_dict()]}))
    with caplog.at_level(logging.WARNING, logger="dynaflow"):
        smap = ScheduleMap.load(store, model=W.model, dtype=W.dtype, hardware=H100)
    assert len(smap.raw) == 1 and "pack" not in caplog.text
    assert json.loads(s.pack_path(H100.key).read_text().split("\n", 1)[0])["pack_format"] == 2


# --- --model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, words", [
    ("os:system", "names Python's standard library"),
    ("../evil:make", "dotted Python module name"),
    ("user_models:not_a_case", "must return a dynaflow.runtime.Case"),
    ("user_models:broken_factory", "raised RuntimeError: the weights folder is empty (" + __file__.rsplit("/", 1)[0]),
    ("user_models:missing", "cannot import 'missing'"),
])
def test_bad_model_specs_are_one_line(model, words):
    code, _, err = run_cli("measure", "--model", model, "--workload", "d4x16")
    assert code == 2
    one_line(err, f"model {model!r}", words)


# --- storage URLs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("url, read_words, tune_words", [
    ("sqlite:///{tmp}/afile/studies.db", "does not exist (nothing was tuned there yet)", "afile is a file, not a folder"),
    ("sqlite:////proc/dynaflow/studies.db", "does not exist", "is under /proc, a kernel interface"),
    ("sqlite:///", "names no file", "names no file"),
    ("postgresql://user@127.0.0.1:1/db", "cannot be opened: OperationalError", "cannot be opened: OperationalError"),
    ("journal:", "names no file", "names no file"),
    ("sqlite:///{tmp}/no/such/dir/studies.db", "does not exist", "does not exist, from {tmp}/no on; create it first"),
    ("bogus://x", "'bogus' is no database SQLAlchemy knows; give sqlite:///PATH",
     "'bogus' is no database SQLAlchemy knows; give sqlite:///PATH"),
])
def test_storage_urls_that_cannot_be_opened_are_one_line(tmp_path, url, read_words, tune_words):
    (tmp_path / "afile").write_text("")
    url = url.format(tmp=tmp_path)
    for argv, words in ((["studies", "--storage", url], read_words),
                        (["tune", "--model", "llama-tiny", "--workload", "d4x16", "--trials", "1", "--no-progress",
                          "--store", tmp_path, "--storage", url], tune_words)):
        code, _, err = run_cli(*argv)
        assert code == 2
        one_line(err, f"--storage {url!r}", words.format(tmp=tmp_path))
    assert not (tmp_path / "no").exists()  # a mistyped path is refused, not made


# --- the rest --------------------------------------------------------------------------------------

def test_measure_schedule_applies_the_loaders_checks(tmp_path, caplog):
    foreign = tmp_path / "a100.json"
    foreign.write_text(json.dumps(record(hardware=A100).to_dict()))
    code, _, err = run_cli("measure", "--model", "llama-tiny", "--workload", "d4x16", "--schedule", foreign)
    assert code == 2
    one_line(err, str(foreign), "was tuned on cuda-nvidia-a100", f"this is {detect('cpu').key}")
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**record().to_dict(), "record_schema": 5}))
    code, _, err = run_cli("measure", "--model", "llama-tiny", "--workload", "d4x16", "--schedule", newer)
    assert code == 2
    one_line(err, str(newer), "record_schema must be 1 to 4, but got 5")
    here = detect("cpu")
    drifted = tmp_path / "drifted.json"
    workload = Workload(model="llama-tiny", num_decode=4, context_len=16)
    rec = record(hardware=dataclasses.replace(here, software={"torch": "0.1"}), workload=workload, sizes=(2, 2))
    drifted.write_text(json.dumps(rec.to_dict()))
    with caplog.at_level(logging.WARNING, logger="dynaflow"):
        code, out, _ = run_cli("measure", "--model", "llama-tiny", "--workload", "d4x16", "--schedule", drifted,
                               "--repeats", "1", "--warmup", "0", "--store", tmp_path)
    assert code == 0 and "measured with other software" in caplog.text


def test_records_are_readable_by_other_users(store):
    assert oct(record_path(store).stat().st_mode & 0o777) == "0o644"


def test_a_closed_pipe_ends_quietly():
    """`dynaflow-tune ops | head -1`: the reader is gone before the output is written."""
    read, write = os.pipe()
    os.close(read)
    done = subprocess.run([sys.executable, "-m", "dynaflow.tuner.cli", "ops", "--model", "llama-tiny",
                           "--workload", "d4x16"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    # nothing on stderr but the tool's own warnings (a busy machine's peaks say so on one line)
    assert done.returncode == 141 and all(line.startswith("dynaflow-tune: warning: ")
                                          for line in done.stderr.splitlines()), done.stderr


def test_zero_trials_is_a_usage_error_not_a_strange_bar(tmp_path):
    code, _, err = run_cli("tune", "--trials", "0", "--store", tmp_path, "--storage", f"sqlite:///{tmp_path}/s.db")
    assert code == 2
    one_line(err, "--trials must be >= 1")


def test_measure_refuses_a_record_in_the_store_symlinked_outside_it(store, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.json"
    outside.write_text(json.dumps(record().to_dict()))
    link = record_path(store).with_name("linked.json")
    link.symlink_to(outside)
    code, _, err = run_cli("measure", "--workload", "d4x16", "--model", "llama-tiny", "--store", store,
                           "--schedule", link)
    assert code == 2
    one_line(err, f"{link} resolves to {outside}, outside the store")


def _closed_port() -> int:
    import socket
    with socket.socket() as s:  # bound, never listening: a connection to it is refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, words", [
    ("HEAD_IP:6379", ["--ray-address 'HEAD_IP:6379': no Ray cluster answers there", "ray start --head"]),
    ("nonsense", ["--ray-address 'nonsense' is not HOST:PORT"]),
    ("refused", ["no Ray cluster answers there (connection refused)"]),
])
def test_a_ray_address_nothing_answers_at_is_one_line_at_once(address, words, tmp_path, monkeypatch):
    """Ray would retry an unreachable head for minutes, a warning every few seconds; the tuner
    refuses the address before Ray is imported."""
    if address == "refused":
        address = f"127.0.0.1:{_closed_port()}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # importing Ray would fail: it is never reached
    code, out, err = run_cli("tune", "--workers", "2", "--ray-address", address, "--trials", "1", "--no-progress",
                             "--store", tmp_path, "--storage", f"sqlite:///{tmp_path}/s.db")
    assert code == 2 and out == ""
    one_line(err, *words)
    assert not (tmp_path / "s.db").exists()  # refused before the study opens


def test_a_ray_client_address_without_ray_client_is_one_line_naming_the_install(tmp_path, monkeypatch):
    """`ray://HOST:10001` needs Ray Client (grpcio), which `pip install ray` does not bring."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "grpc", None)  # as where ray[client] is not installed
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else real(name, *a))
    code, out, err = run_cli("tune", "--workers", "2", "--ray-address", "ray://127.0.0.1:10001", "--trials", "1",
                             "--no-progress", "--store", tmp_path, "--storage", f"sqlite:///{tmp_path}/s.db")
    assert code == 2 and out == ""
    one_line(err, "is a Ray Client address, and Ray Client is not installed", "pip install 'ray[client]'",
             "HOST:6379")


def test_the_ray_address_variable_is_checked_too(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    code, _, err = run_cli("tune", "--workers", "2", "--trials", "1", "--no-progress", "--store", tmp_path,
                           "--storage", f"sqlite:///{tmp_path}/s.db")
    assert code == 2
    one_line(err, "RAY_ADDRESS '127.0.0.1:", "no Ray cluster answers there")


@pytest.mark.parametrize("argv, words", [
    (("tune", "--bogus"), "unrecognized arguments: --bogus"),
    (("tune", "--trials", "ten"), "argument --trials: invalid int value: 'ten'"),
    (("frob",), "invalid choice: 'frob'"),
    (("measure",), "the following arguments are required: --workload"),
])
def test_argparse_usage_errors_are_one_line_too(argv, words):
    """An unknown flag or a value of the wrong type: one line naming it and where the help is,
    not argparse's usage lines first."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 2
    one_line(err.getvalue(), words, "--help)")


def test_an_address_where_something_else_answers_is_one_line_at_once(tmp_path, monkeypatch):
    """An HTTP server at the address (not Ray): refused within seconds by a handshake Ray's gRPC
    servers answer and an HTTP/1 server does not, before Ray is imported (Ray itself would retry
    "Failed to get cluster ID" for minutes)."""
    import http.server
    import threading
    import time

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the server's own log is not the tool's output
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # importing Ray would fail: it is never reached
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        start = time.monotonic()
        code, out, err = run_cli("tune", "--workers", "all", "--ray-address", address, "--trials", "1",
                                 "--no-progress", "--store", tmp_path, "--storage", f"sqlite:///{tmp_path}/s.db")
        assert time.monotonic() - start < 30
    finally:
        server.shutdown()
    assert code == 2 and out == ""
    one_line(err, f"--ray-address '{address}': something answers there, but not Ray")
    assert not (tmp_path / "s.db").exists()


def test_a_grpc_server_passes_the_handshake():
    """What a gRPC server (Ray's GCS) sends first: a SETTINGS frame on stream 0."""
    import socket
    import threading

    from dynaflow.tuner.ray_fanout import HTTP2_PREFACE, _speaks_http2

    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            got = b""
            while len(got) < len(HTTP2_PREFACE):
                got += conn.recv(64)
            conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64")  # SETTINGS, one entry
    threading.Thread(target=serve, daemon=True).start()
    with socket.create_connection(listener.getsockname(), timeout=5) as conn:
        assert _speaks_http2(conn)
    listener.close()
