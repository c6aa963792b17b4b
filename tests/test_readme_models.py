"""The README's tunes of models of their own (an `hf:` architecture, a user module), run as it
says: tests/test_readme_commands.py runs every other line, and these here, in another file, so
that the two halves of the README's slowest test run on two workers (nothing the README shows
after these lines reads what they store)."""
from test_readme_commands import INSTALLED, LINES, apart, parts, run_lines


def test_the_readme_shows_tunes_of_models_of_their_own():
    tunes = [argv for command, _ in LINES for _, argv in parts(command) if apart(argv)]
    assert any("hf:llama" in argv for argv in tunes) and any(a.startswith("user_models:") for argv in tunes for a in argv)


@INSTALLED
def test_the_readmes_tunes_of_models_of_their_own_run_as_it_says(tmp_path):
    ran = run_lines(tmp_path, apart)
    assert ran.count("tune") >= 2
