"""Every command line the README shows, in its shell blocks and in its table of measured numbers,
run as a user would, in the README's order, in one scratch folder (so `list` and `show` find what
the README's `tune` stored): none may print a traceback, and each must exit 0 unless the README
predicts otherwise on that line (`exit N` in its comment), or, for `--device cuda` on a machine
without a GPU, the one line and exit 2 the README's rule for bad input promises.

What is not run here is listed with why and where it is tested instead: installs, servers and
daemons, the benchmarks and examples (minutes each: every benchmark must exist and answer --help,
tests/test_small_ones.py), the vLLM loop. Tuning commands run with a smaller budget appended
(`BUDGET`, last flag wins), and a line the README shows again runs once, so the whole README
takes about two minutes. The README's tunes of models of their own (its slowest lines, which no
later line reads) run in tests/test_readme_models.py, on another worker. A relative PYTHONPATH
(`PYTHONPATH=tests`) is the clone's folder, as the README means it."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_output import error_lines

ROOT = Path(__file__).parents[1]
BUDGET = ["--trials", "2", "--confirm-top", "1", "--confirm-rounds", "5", "--repeats", "3", "--warmup", "1",
          "--no-progress"]
NOT_RUN = {  # a command's first word -> why this test does not run it, and what does
    "sh": "the set-up, the tests and CI (scripts/setup.sh, scripts/test.sh, .ci/run): .ci/run runs the README's "
          "two set-up commands in a fresh venv",
    "pip": "installs from the network",
    "jupyter": "an interactive server: tests/test_analysis.py executes the notebook top to bottom",
    "optuna-dashboard": "Optuna's own server, not installed by the set-up",
    "ray": "starts Ray's daemons: tests/test_ray_cluster.py starts a head and a joined node",
    "vllm": "serves with vLLM: tests/test_vllm.py, in the overlay with vLLM's CPU build",
}
VLLM_MODEL = "tuning on vLLM's model needs vLLM and a model folder: tests/test_vllm_tuning.py runs it on one"
PYTHON = {  # `python <what>` -> why not run here
    "-m": "the test suite itself (it runs here as part of it)",
    "benchmarks/": "a benchmark (minutes): each exists and answers --help (tests/test_small_ones.py)",
    "examples/": "an example loop (minutes): tests/test_serve_loop.py and tests/test_vllm.py run them small",
}


def shell_lines(text: str) -> list[tuple[str, str]]:
    """(command, its comment) for each line of the README's ```sh blocks, continuations joined."""
    lines, block, pending = [], False, ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            block = raw.strip() == "```sh"
            continue
        if not block or not raw.strip():
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        command, _, comment = pending.partition("  #")
        if pending.lstrip().startswith("#"):
            command, comment = "", pending
        if command.strip():
            lines.append((command.strip(), comment.strip()))
        pending = ""
    return lines


def table_lines(text: str) -> list[tuple[str, str]]:
    """(command, "") for the command column of the "Measured numbers" table."""
    section = text[text.index("## Measured numbers"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| 20")]
    return [(cells[2].strip().strip("`"), "") for cells in rows]


def parts(command: str) -> list[tuple[dict, list[str]]]:
    """Each `&&`-joined part as (environment assignments, argv)."""
    out = []
    for part in command.split("&&"):
        words = shlex.split(part)
        env = {}
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        out.append((env, words))
    return out


def why_not_run(argv: list[str]) -> str | None:
    if argv[0] in NOT_RUN:
        return NOT_RUN[argv[0]]
    if argv[0] == "python":
        return next((why for start, why in PYTHON.items() if argv[1].startswith(start)), None) or \
            f"python {argv[1]}: a script this test does not know; run it here or say why not"
    if any(a.startswith("vllm:") for a in argv):
        return VLLM_MODEL
    if argv[0] != "dynaflow-tune":
        return f"{argv[0]}: a command this test does not know; run it here or say why not"
    return None


def clone_paths(env: dict) -> dict:
    """A relative PYTHONPATH in the README is the clone's folder (the commands run elsewhere here)."""
    if "PYTHONPATH" in env:
        env = {**env, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in env["PYTHONPATH"].split(os.pathsep))}
    return env


README = (ROOT / "README.md").read_text()
LINES = shell_lines(README) + table_lines(README)


def test_the_readme_shows_command_lines_and_every_kind_is_known():
    ran = [argv for command, _ in LINES for _, argv in parts(command) if why_not_run(argv) is None]
    unknown = [" ".join(argv) for command, _ in LINES for _, argv in parts(command)
               if (why_not_run(argv) or "").endswith("say why not")]
    assert unknown == []
    assert len(ran) >= 10 and ["dynaflow-tune", "tune"] in ran  # the main job is among them
    scripts = [argv[1] for command, _ in LINES for _, argv in parts(command) if argv[0] == "python"
               and argv[1].startswith(("benchmarks/", "examples/"))]
    assert len(scripts) >= 10 and [s for s in scripts if not (ROOT / s).is_file()] == []  # what the README names exists


INSTALLED = pytest.mark.skipif(not (Path(sys.executable).parent / "dynaflow-tune").exists(),
                               reason="dynaflow-tune is not installed beside this Python (pip install -e .)")


def apart(argv: list[str]) -> bool:
    """A tune of a model of its own (an `hf:` architecture, a user module) that no later line reads:
    tests/test_readme_models.py runs these, beside this file's worker (the README's slowest lines)."""
    return argv[1:2] == ["tune"] and any(a.startswith(("hf:", "user_models:")) for a in argv)


def run_lines(folder: Path, select) -> list[str]:
    """The README's command lines that `select(argv)` picks, in its order, in `folder`: each as the
    README says (no traceback; the exit it predicts; bad input one line). Returns the commands run."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    ran, seen = [], set()
    for command, comment in LINES:
        for env, argv in parts(command):
            predicted = re.search(r"\bexit (\d+)", comment)
            expected = int(predicted.group(1)) if predicted else 0
            if why_not_run(argv) is not None or not select(argv) or (repr(env), tuple(argv), expected) in seen:
                continue  # a line shown again (the main job, in the numbers table) runs once
            seen.add((repr(env), tuple(argv), expected))
            if argv[1:2] == ["tune"]:
                argv = argv + BUDGET
            cuda = any(a == "cuda" or a.startswith("cuda:") for a in argv)
            if cuda and not torch.cuda.is_available():
                expected = 2
            elif cuda:
                continue  # a GPU command's time is the GPU kit's, not this test's
            # through a shell, as typed: the README's globs (results/schedules/*/...) expand
            done = subprocess.run(" ".join(shlex.quote(a) if "*" not in a else a for a in argv), shell=True,
                                  cwd=folder, capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "PATH": path, **clone_paths(env)})
            said = done.stdout + done.stderr
            assert "Traceback" not in said, (command, said[-3000:])
            assert done.returncode == expected, (command, done.returncode, said[-3000:])
            if expected == 2:
                assert len(error_lines(done.stderr)) == 1, (command, done.stderr)
            ran.append(argv[1])
    return ran


@INSTALLED
def test_every_command_line_the_readme_shows_runs_as_it_says(tmp_path):
    ran = run_lines(tmp_path, lambda argv: not apart(argv))
    assert "tune" in ran and "show" in ran and "measure" in ran
