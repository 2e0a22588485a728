"""harness.run.quiet: library output to run.log, the harness's own lines to the terminal."""

from __future__ import annotations

import logging
import sys
import warnings

from harness.run.env import log
from harness.run.quiet import run_log


def noisy_plugin() -> None:
    logging.getLogger("lm_eval.models.huggingface").warning("a library warning")
    warnings.warn("a python warning", UserWarning, stacklevel=1)
    print("a library print")
    print("a progress bar", file=sys.stderr)
    log("the harness speaks")


def test_quiet_routes_library_output_to_the_log_file(tmp_path, capsys):
    library = logging.getLogger("lm_eval")
    before = (list(library.handlers), library.propagate)
    runlog = run_log(tmp_path, verbose=False)
    with runlog.open(), runlog.capture("cell x: evaluator e"):
        noisy_plugin()
    out, err = capsys.readouterr()
    assert out == "" and err == "[harness] the harness speaks\n"
    text = (tmp_path / "run.log").read_text()
    for line in (
        "---- cell x: evaluator e",
        "a library warning",
        "a python warning",
        "a library print",
        "a progress bar",
    ):
        assert line in text
    assert (library.handlers, library.propagate) == before  # restored


def test_verbose_leaves_everything_on_the_terminal(tmp_path, capsys):
    runlog = run_log(tmp_path, verbose=True)
    with runlog.open(), runlog.capture("cell x"):
        print("a library print")
        print("a progress bar", file=sys.stderr)
    out, err = capsys.readouterr()
    assert out == "a library print\n" and err == "a progress bar\n"
    assert not (tmp_path / "run.log").exists()
