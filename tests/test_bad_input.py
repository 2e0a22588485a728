"""A corpus of bad inputs: each gives one line naming the file (or flag), the key, what
was expected and what was received; exit status 2; never a traceback.

The CLI runs in a subprocess: one driver process calls ``harness.cli.main`` for
every case in turn (a fresh plugin manager each time, stdout and stderr captured,
``SystemExit`` caught as the exit status), so that importing torch and
transformers is paid once, not once per case. tests/test_plugins_and_suites.py
covers a few more (unknown top-level key and method, fractions above 1, option
types, unknown options, path names, TOML syntax, byte sizes, --limit zero).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT

BASE = """
name = "bad"
device = "cpu"
models = ["{tiny}"]
targets = [0.5]
[[methods]]
name = "svd"
[[evaluators]]
name = "perplexity"
options = { seqlen = 16, max_windows = 1 }
"""
RUN = ["run", "{dir}/suite.toml", "--results", "{dir}/r", "--no-progress"]
VALIDATE = ["validate", "{dir}/suite.toml"]
SUITE = r"suite\.toml: "


@dataclass
class Case:
    id: str
    expect: str
    """Regex the one error line must match (after 'harness[ cmd]: error: ')."""
    suite: str | None = BASE
    argv: list[str] = field(default_factory=lambda: list(VALIDATE))
    setup: str | None = None
    """Name of a function below that prepares files in the case's directory."""


def edit(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


CASES = [
    # ---------------------------------------------------------------- files and TOML
    Case(
        "toml-duplicate-key",
        r"suite\.toml: not valid TOML: Cannot overwrite a value \(at line 2",
        suite="seed = 1\nseed = 2\n" + BASE,
    ),
    Case("toml-not-utf8", SUITE + r"expected a UTF-8 TOML file, got undecodable bytes", setup="latin1_suite"),
    Case(
        "suite-is-a-directory",
        r"sub: expected a suite file \(TOML\), got a directory",
        argv=["validate", "{dir}/sub"],
        setup="directory",
    ),
    Case("python-code-as-suite", r"code\.py: not valid TOML", argv=["run", "{dir}/code.py"], setup="python_suite"),
    # ---------------------------------------------------------------- top-level keys and values
    Case(
        "methods-not-a-list",
        SUITE + r"methods: expected a list of a string or a table, got 'svd'",
        suite=edit("targets = [0.5]", 'targets = [0.5]\nmethods = "svd"', BASE.split("[[methods]]")[0]),
    ),
    Case(
        "model-not-a-string",
        SUITE + r"models: expected a list of a string, got \[3\]",
        suite=edit('models = ["{tiny}"]', "models = [3]"),
    ),
    Case(
        "model-empty-string",
        SUITE + r"models\[0\]: expected a hub id, a local path, 'embedded' or 'random:<shape>', got ''",
        suite=edit('models = ["{tiny}"]', 'models = [""]'),
    ),
    Case(
        "models-empty",
        SUITE + r"models: expected at least one model, got an empty list",
        suite=edit('models = ["{tiny}"]', "models = []"),
    ),
    Case("seed-string", SUITE + r"seed: expected an integer, got 'zero'", suite='seed = "zero"\n' + BASE),
    Case(
        "seed-negative", SUITE + r"seed: expected an integer from 0 to 2\*\*32 - 1, got -1", suite="seed = -1\n" + BASE
    ),
    Case(
        "trust-remote-code-string",
        SUITE + r"trust_remote_code: expected true or false, got 'yes'",
        suite='trust_remote_code = "yes"\n' + BASE,
    ),
    Case(
        "dtype-unknown",
        SUITE + r"dtype: expected one of 'auto', 'float32', 'float16', 'bfloat16', got 'float8'",
        suite='dtype = "float8"\n' + BASE,
    ),
    Case(
        "device-unknown",
        SUITE + r"device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'",
        suite=edit('device = "cpu"', 'device = "tpu"'),
    ),
    # ---------------------------------------------------------------- plugin names and options
    Case(
        "unknown-allocator",
        SUITE + r"allocators\[0\]\.name: unknown allocator 'uniformm' \(did you mean 'uniform'",
        suite=edit("targets = [0.5]", 'targets = [0.5]\nallocators = ["uniformm"]'),
    ),
    Case(
        "unknown-evaluator",
        SUITE + r"evaluators\[0\]\.name: unknown evaluator 'perplexityy'.*known: .*perplexity",
        suite=edit('name = "perplexity"', 'name = "perplexityy"'),
    ),
    Case(
        "unknown-profiler",
        SUITE + r"profilers\[0\]\.name: unknown profiler 'paramz'.*did you mean 'params'",
        suite=BASE + '[[profilers]]\nname = "paramz"\n',
    ),
    Case(
        "unknown-tracker",
        SUITE + r"trackers\[0\]\.name: unknown tracker 'mlflw'.*did you mean 'mlflow'",
        suite=BASE + '[[trackers]]\nname = "mlflw"\n',
    ),
    Case(
        "unknown-lm-eval-task",
        SUITE + r"evaluators\[1\]\.options: tasks: no embedded data for task 'hellaswagg'",
        suite=BASE + '[[evaluators]]\nname = "lm-eval"\noptions = { tasks = ["hellaswagg"] }\n',
    ),
    Case(
        "unknown-method-key",
        SUITE + r"methods\[0\]\.targetz: unknown key \(did you mean 'targets'",
        suite=edit('name = "svd"', 'name = "svd"\ntargetz = [0.5]'),
    ),
    Case(
        "option-not-allowed-value",
        SUITE + r"methods\[0\]\.options\.dtype: expected 'float32' or 'float64', got 'int8'",
        suite=edit('name = "svd"', 'name = "svd"\noptions = { dtype = "int8" }'),
    ),
    Case(
        "perplexity-seqlen-too-short",
        SUITE + r"evaluators\[0\]\.options: seqlen: expected at least 2 tokens, got 1",
        suite=edit("seqlen = 16", "seqlen = 1"),
    ),
    Case(
        "perplexity-unknown-source",
        SUITE + r"evaluators\[0\]\.options: source: expected one of .*got 'wikitext3'",
        suite=edit("seqlen = 16", 'source = "wikitext3", seqlen = 16'),
    ),
    Case(
        "label-with-path",
        SUITE + r"methods\[0\]\.label: expected letters, digits.*got '\.\./x'",
        suite=edit('name = "svd"', 'name = "svd"\nlabel = "../x"'),
    ),
    Case(
        "duplicate-labels",
        SUITE + r"methods\[1\]\.label: duplicate label 'svd'",
        suite=BASE + '[[methods]]\nname = "svd"\n',
    ),
    Case(
        "method-without-targets",
        SUITE + r"methods\[0\]\.targets: expected at least one target",
        suite=edit("targets = [0.5]\n", ""),
    ),
    # ---------------------------------------------------------------- targets
    Case("target-zero", SUITE + r"targets\[0\]: expected a fraction in \(0, 1\], got 0", suite=edit("[0.5]", "[0]")),
    Case(
        "target-negative",
        SUITE + r"targets\[0\]: expected a fraction in \(0, 1\], got -0\.5",
        suite=edit("[0.5]", "[-0.5]"),
    ),
    Case(
        "target-rank-zero",
        SUITE + r"targets\[0\]: expected a fraction in \(0, 1\], got 0",
        suite=edit("[0.5]", "[{ rank = 0 }]"),
    ),
    Case(
        "target-bits-too-many",
        SUITE + r"targets\[0\]: expected bits per weight in \(0, 32\], got 64",
        suite=edit("[0.5]", "[{ bits = 64 }]"),
    ),
    Case(
        "target-unknown-kind",
        SUITE + r"targets\[0\]: expected one of params, rank, bytes, bits, got 'size'",
        suite=edit("[0.5]", "[{ size = 3 }]"),
    ),
    Case(
        "target-boolean",
        SUITE + r"targets\[0\]: expected a number in \(0, 1\].*got True",
        suite=edit("[0.5]", "[true]"),
    ),
    Case(
        "target-zero-bytes",
        SUITE + r"targets\[0\]: expected a positive number of bytes, got 0",
        suite=edit("[0.5]", "[{ bytes = 0 }]"),
    ),
    Case(
        "bytes-below-smallest-model",
        SUITE + r"methods\[0\]\.targets\[0\]: expected a target of at least [\d,]+ bytes.*got bytes=0\.001MB",
        suite=edit("[0.5]", '[{ bytes = "1KB" }]'),
        argv=RUN,
    ),
    Case(
        "keep-below-smallest-model",
        SUITE + r"methods\[0\]\.targets\[0\]: expected a target of at least [\d,]+ parameters.*got keep=0\.0001",
        suite=edit("[0.5]", "[0.0001]"),
        argv=RUN,
    ),
    # ---------------------------------------------------------------- calibration and surgery
    Case(
        "calibration-zero-samples",
        SUITE + r"calibration: samples: expected a positive integer, got 0",
        suite=BASE + "[calibration]\nsamples = 0\n",
    ),
    Case(
        "calibration-seqlen-one",
        SUITE + r"calibration: seqlen: expected at least 2 tokens, got 1",
        suite=BASE + "[calibration]\nseqlen = 1\n",
    ),
    Case(
        "calibration-unknown-source",
        SUITE + r"calibration: source: expected one of .*got 'books'",
        suite=BASE + '[calibration]\nsource = "books"\n',
    ),
    Case(
        "calibration-unknown-key",
        SUITE + r"calibration\.sample: unknown option \(did you mean 'samples'",
        suite=BASE + "[calibration]\nsample = 8\n",
    ),
    Case(
        "surgery-unknown-mode",
        SUITE + r"surgery\.mode: expected 'factored' or 'dense', got 'sparse'",
        suite=BASE + '[surgery]\nmode = "sparse"\n',
    ),
    # ---------------------------------------------------------------- models
    Case(
        "model-path-missing",
        SUITE + r"models\[0\]: expected an existing model directory .*'/nonexistent/model-dir'",
        suite=edit("{tiny}", "/nonexistent/model-dir"),
        argv=RUN,
    ),
    Case(
        "model-gguf-missing",
        SUITE + r"models\[0\]: expected an existing \.gguf file, got '.*missing\.gguf'",
        suite=edit("{tiny}", "{dir}/missing.gguf"),
        argv=RUN,
    ),
    Case(
        "model-gguf-garbage",
        SUITE + r"models\[0\]: expected a readable GGUF file, got '.*garbage\.gguf'",
        suite=edit("{tiny}", "{dir}/garbage.gguf"),
        argv=RUN,
        setup="garbage_gguf",
    ),
    Case(
        "model-gguf-truncated",
        SUITE + r"models\[0\]: expected a readable GGUF file, got '.*truncated\.gguf'",
        suite=edit("{tiny}", "{dir}/truncated.gguf"),
        argv=RUN,
        setup="truncated_gguf",
    ),
    Case(
        "model-safetensors-corrupt",
        SUITE + r"models\[0\]: expected a causal LM with safetensors weights, got '.*corrupt'",
        suite=edit("{tiny}", "{dir}/corrupt"),
        argv=RUN,
        setup="corrupt_safetensors",
    ),
    Case(
        "model-without-weights",
        SUITE + r"models\[0\]: expected a causal LM with safetensors weights, got '.*noweights'",
        suite=edit("{tiny}", "{dir}/noweights"),
        argv=RUN,
        setup="no_weights",
    ),
    Case(
        "model-pickle-weights-only",
        SUITE + r"models\[0\]: expected a causal LM with safetensors weights, got '.*pickled'",
        suite=edit("{tiny}", "{dir}/pickled"),
        argv=RUN,
        setup="pickle_weights",
    ),
    Case(
        "model-without-linear-layers",
        SUITE + r"models\[0\]: expected a model with torch\.nn\.Linear layers .*got '.*gpt2' with none",
        suite=edit("{tiny}", "{dir}/gpt2"),
        argv=RUN,
        setup="gpt2_conv1d",
    ),
    Case(
        "surgery-kinds-match-nothing",
        # checked against the model's config before any weight loads (harness/modelcheck.py)
        SUITE
        + r"surgery\.kinds\[0\]: expected a layer kind of .*\(q_proj, .*\), "
        + r"got 'nope_proj' \(did you mean 'o_proj'\?\)",
        suite=BASE + '[surgery]\nkinds = ["nope_proj"]\n',
        argv=RUN,
    ),
    # ---------------------------------------------------------------- results directory and flags
    Case(
        "results-dir-is-a-file",
        r"results directory .*afile/bad cannot be written",
        argv=["run", "{dir}/suite.toml", "--results", "{dir}/afile"],
        setup="plain_file",
    ),
    Case(
        "flag-limit-float", r"argument --limit: expected a positive integer, got '1\.5'", argv=[*RUN, "--limit", "1.5"]
    ),
    Case("flag-limit-negative", r"argument --limit: expected a positive integer, got '-3'", argv=[*RUN, "--limit=-3"]),
    Case("flag-unknown", r"unrecognized arguments: --frobnicate", argv=[*RUN, "--frobnicate"]),
    Case(
        "flag-device-unknown",
        r"--device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'quantum'",
        argv=[*RUN, "--device", "quantum"],
    ),
    Case(
        "flag-model-missing",
        r"--model: expected an existing model directory .*got '/nonexistent/m'",
        argv=[*RUN, "--model", "/nonexistent/m"],
    ),
    Case("run-without-suite", r"the following arguments are required: suite", argv=["run"]),
    Case(
        "show-id-not-hex",
        r"cell id: expected hexadecimal digits .*got '\.\./etc'",
        argv=["show", "../etc", "--results", "{dir}"],
    ),
    Case(
        "show-no-such-cell",
        r"cell id: expected the id of a cell under .*got 'abcdef': no such cell",
        argv=["show", "abcdef", "--results", "{dir}"],
    ),
    Case(
        "check-baseline-missing",
        r"nobase\.json: baseline file does not exist",
        argv=["check", "{dir}/results", "--baseline", "{dir}/nobase.json"],
        setup="results_dir",
    ),
    Case(
        "check-baseline-not-json",
        r"base\.json: expected a baseline file \(JSON\), got invalid JSON",
        argv=["check", "{dir}/results", "--baseline", "{dir}/base.json"],
        setup="broken_baseline",
    ),
    Case(
        "check-baseline-bad-rule",
        r"base\.json: tolerances\[0\]\.abss: unknown option \(did you mean 'abs'",
        argv=["check", "{dir}/results", "--baseline", "{dir}/base.json"],
        setup="bad_rule_baseline",
    ),
    Case(
        "check-without-baseline-flag",
        r"the following arguments are required: --baseline",
        argv=["check", "{dir}/results"],
    ),
    Case(
        "check-not-a-results-dir",
        r"nowhere: not a results directory \(no cells/ folder\)",
        argv=["check", "{dir}/nowhere", "--baseline", "{dir}/base.json"],
    ),
    Case("sync-not-a-results-dir", r"nowhere: not a results directory", argv=["sync", "{dir}/nowhere"]),
]


# ---------------------------------------------------------------- file set-ups
def latin1_suite(folder: Path, ctx: dict) -> None:
    (folder / "suite.toml").write_bytes(b'name = "caf\xe9"\n')


def directory(folder: Path, ctx: dict) -> None:
    (folder / "sub").mkdir()


def python_suite(folder: Path, ctx: dict) -> None:
    (folder / "code.py").write_text(f"import pathlib\npathlib.Path({str(folder / 'pwned')!r}).write_text('x')\n")


def garbage_gguf(folder: Path, ctx: dict) -> None:
    (folder / "garbage.gguf").write_bytes(b"GGUF" + os.urandom(200))


def truncated_gguf(folder: Path, ctx: dict) -> None:
    with open(ctx["gguf"], "rb") as handle:
        (folder / "truncated.gguf").write_bytes(handle.read(1 << 16))


def _copy_tiny(folder: Path, ctx: dict, name: str) -> Path:
    return Path(shutil.copytree(ctx["tiny"], folder / name))


def corrupt_safetensors(folder: Path, ctx: dict) -> None:
    weights = _copy_tiny(folder, ctx, "corrupt") / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])


def no_weights(folder: Path, ctx: dict) -> None:
    (_copy_tiny(folder, ctx, "noweights") / "model.safetensors").unlink()


def pickle_weights(folder: Path, ctx: dict) -> None:
    import torch
    from safetensors.torch import load_file

    path = _copy_tiny(folder, ctx, "pickled")
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


def gpt2_conv1d(folder: Path, ctx: dict) -> None:
    """A tiny GPT-2: its projections are transformers' Conv1D, not torch.nn.Linear."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(ctx["tiny"])
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder / "gpt2")
    tokenizer.save_pretrained(folder / "gpt2")


def plain_file(folder: Path, ctx: dict) -> None:
    (folder / "afile").write_text("not a directory\n")


def results_dir(folder: Path, ctx: dict) -> None:
    (folder / "results" / "cells").mkdir(parents=True)


def broken_baseline(folder: Path, ctx: dict) -> None:
    results_dir(folder, ctx)
    (folder / "base.json").write_text('{"format": "harness-baseline/1", "rows": [\n')


def bad_rule_baseline(folder: Path, ctx: dict) -> None:
    results_dir(folder, ctx)
    document = {"format": "harness-baseline/1", "tolerances": [{"metric": "*", "abss": 0.1}], "rows": []}
    (folder / "base.json").write_text(json.dumps(document))


DRIVER = r"""
import contextlib, io, json, os, sys, traceback
from harness.cli import main
from harness.plugins import set_plugins

cases = json.load(open(sys.argv[1]))
outcomes = {}
for case in cases:
    os.chdir(case["cwd"])
    set_plugins(None)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(case["argv"])
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = "exception"
    outcomes[case["id"]] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
json.dump(outcomes, open(sys.argv[2], "w"))
"""


def fill(text: str, ctx: dict, folder: Path) -> str:
    return text.replace("{tiny}", ctx["tiny"]).replace("{dir}", str(folder))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_model_dir) -> dict[str, dict]:
    from harness.models import embedded_gguf

    root = tmp_path_factory.mktemp("bad-input")
    ctx = {"tiny": str(tiny_model_dir), "gguf": str(embedded_gguf())}
    specs = []
    for case in CASES:
        folder = root / case.id
        folder.mkdir()
        if case.suite is not None:
            (folder / "suite.toml").write_text(fill(case.suite, ctx, folder))
        if case.setup:
            globals()[case.setup](folder, ctx)
        specs.append({"id": case.id, "cwd": str(folder), "argv": [fill(arg, ctx, folder) for arg in case.argv]})
    (root / "cases.json").write_text(json.dumps(specs))
    (root / "driver.py").write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(root / "driver.py"), str(root / "cases.json"), str(root / "outcomes.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads((root / "outcomes.json").read_text())
    found["_root"] = str(root)
    return found


ERROR_LINE = re.compile(r"^harness(?: [a-z]+)?: error: (.*)$")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_exit_2(outcomes, case):
    outcome = outcomes[case.id]
    stderr = outcome["stderr"]
    assert "Traceback" not in stderr, stderr
    assert outcome["code"] == 2, (outcome["code"], stderr[-2000:])
    errors = [m.group(1) for line in stderr.splitlines() if (m := ERROR_LINE.match(line))]
    assert len(errors) == 1, stderr
    assert re.search(case.expect, errors[0]), errors[0]
    others = [line for line in stderr.splitlines() if not ERROR_LINE.match(line)]
    assert not [line for line in others if re.search(r"Error\b|Exception\b", line)], others


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.slow
def test_a_suite_is_never_executed(outcomes):
    assert not (Path(outcomes["_root"]) / "python-code-as-suite" / "pwned").exists()
