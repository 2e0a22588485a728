"""Property-based fuzzing of the suite parser (hypothesis): no input is ever a traceback.

Generated suites (random keys, types, nesting, unicode, huge and non-finite
numbers) and mutations of the real suites under suites/ go through
``SuiteParser.parse`` directly (fast); every suite it accepts then goes through
``check_model_names`` against a 2-block Llama's layers. Each is either accepted
or refused with one ``HarnessError`` line naming the file. A few dozen text
mutations of the real suites go through ``harness validate`` in one subprocess:
exit 0 or 2, and on 2 exactly one ``harness: error:`` line, never a traceback.

Reproducible: ``derandomize=True`` (examples from a fixed seed), no example database.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import subprocess
import sys
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import HarnessError
from harness.modelcheck import check_model_names, config_layers
from harness.plan.layout import model_config
from harness.plugins import get_plugins
from harness.suite import TOP_KEYS, SuiteParser
from tests.conftest import ROOT

FILE = "fuzz.toml"
REAL = {path.name: tomllib.loads(path.read_text()) for path in sorted((ROOT / "suites").glob("*.toml"))}
EXAMPLES = {"random": 1000, "mutated": 1200}
"""Examples per property: 2,200 generated suites a run (measured: ~25 s on a 2-core CPU)."""
FUZZ = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
HUGE = [2**63, -(2**63) - 1, 10**30, -(10**30), 2**1000, 1e308, -0.0, 5e-324]
VAST = st.sampled_from([4400, 6000]).map(lambda digits: 10**digits)  # no str(): over Python's 4300 digits


def known_keys() -> list[str]:
    """Every key a suite may hold: top level, component entries, calibration/surgery and plugin options."""
    import dataclasses

    from harness.suite import CalibrationConfig, FactorizationConfig, SurgeryConfig

    plugins = get_plugins()
    names = set(TOP_KEYS) | {"name", "label", "options", "targets", "allocators", "params", "rank", "bytes", "bits"}
    names |= {"scope", "keep"}
    for cls in (CalibrationConfig, SurgeryConfig, FactorizationConfig):
        names |= {f.name for f in dataclasses.fields(cls)}
    for table in plugins.registry.values():
        for name, entry in table.items():
            names.add(name)
            options = getattr(entry.component, "Options", None)
            if options is not None and dataclasses.is_dataclass(options):
                names |= {f.name for f in dataclasses.fields(options)}
    return sorted(names)


KEYS = known_keys()
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12))
scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.sampled_from(HUGE),
    VAST,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(KEYS),
    st.sampled_from(["auto", "cpu", "cuda:0", "embedded", "random:tiny-llama", "random:tiny-llama?layers=9"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
random_suites = st.dictionaries(keys, values, max_size=8)


def paths(node, prefix=()):
    """Every path into a nested suite (dict keys and list indices), the root included."""
    yield prefix
    if isinstance(node, dict):
        for key, child in node.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from paths(child, (*prefix, i))


def mutate(suite: dict, path: tuple, action: str, value, key: str) -> dict:
    """``suite`` (deep-copied) with one change at ``path``: replaced, deleted, a key added or renamed."""
    suite = copy.deepcopy(suite)
    if not path:
        suite[key] = value
        return suite
    parent = suite
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent[last], dict):
        parent[last][key] = value
    elif action == "rename" and isinstance(last, str):
        parent[key if key != last else key + "_"] = parent.pop(last)
    else:
        parent[last] = value
    return suite


@st.composite
def mutated_suites(draw):
    name = draw(st.sampled_from(sorted(REAL)))
    suite = REAL[name]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(suite))))
        action = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        suite = mutate(suite, path, action, draw(values), draw(keys))
    return suite


TINY = config_layers(model_config("random:tiny-llama"), lm_head=False)


def parse_or_refuse(raw: dict) -> None:
    """The property: accepted, or one HarnessError line naming the file; any other exception fails."""
    try:
        suite = SuiteParser(FILE, get_plugins()).parse(raw)
        check_model_names(suite, TINY, "random:tiny-llama")
    except HarnessError as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message, message
        assert message.startswith(FILE) or "--layers" in message, message
        assert len(message) < 2000, message[:300]


def test_a_seed_past_str_limit_is_refused_in_one_line():
    """Found by the fuzz run: ``str`` of an integer over 4300 digits raises ValueError (Python's limit), so
    the seed's message, which printed the value raw, became a traceback."""
    with pytest.raises(HarnessError, match=r"seed: expected .*got an integer of about 4401 digits"):
        SuiteParser(FILE, get_plugins()).parse({"seed": 10**4400, "models": ["random:tiny-llama"]})


def test_random_suites_are_accepted_or_refused_in_one_line():
    seen = []

    @settings(max_examples=EXAMPLES["random"], **FUZZ)
    @given(random_suites)
    def prop(raw):
        seen.append(1)
        parse_or_refuse(raw)

    prop()
    print(f"random suites: {len(seen)} generated, 0 tracebacks")
    assert len(seen) >= EXAMPLES["random"]


def test_mutated_real_suites_are_accepted_or_refused_in_one_line():
    seen = []

    @settings(max_examples=EXAMPLES["mutated"], **FUZZ)
    @given(mutated_suites())
    def prop(raw):
        seen.append(1)
        parse_or_refuse(raw)

    prop()
    print(f"mutated suites: {len(seen)} generated, 0 tracebacks")
    assert len(seen) >= EXAMPLES["mutated"]


def test_the_real_suites_parse():
    for name, raw in REAL.items():
        SuiteParser(name, get_plugins()).parse(raw)


# ---------------------------------------------------------------- through the CLI
TEXT_EDITS = ["-1", "1e999", "nan", "inf", "0", "99999999999999999999999999", '"\\u00e9\\n"', "[]", "{}", '"x"']
DRIVER = r"""
import contextlib, io, json, sys, traceback
from harness.cli import main
from harness.plugins import set_plugins

outcomes = []
for path in json.load(open(sys.argv[1])):
    set_plugins(None)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(["validate", path])
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = "exception"
    outcomes.append({"path": path, "code": code, "stderr": err.getvalue()})
json.dump(outcomes, open(sys.argv[2], "w"))
"""


def text_mutations(count: int, seed: int = 0) -> list[str]:
    """``count`` suite texts: a real suite with one value, character or line changed (fixed seed)."""
    rng = random.Random(seed)
    texts = [path.read_text() for path in sorted((ROOT / "suites").glob("*.toml"))]
    out = []
    while len(out) < count:
        lines = rng.choice(texts).splitlines()
        i = rng.randrange(len(lines))
        kind = rng.choice(["value", "char", "line", "unicode"])
        if kind == "value" and "=" in lines[i]:
            lines[i] = lines[i].split("=", 1)[0] + "= " + rng.choice(TEXT_EDITS)
        elif kind == "char" and lines[i]:
            j = rng.randrange(len(lines[i]))
            lines[i] = lines[i][:j] + lines[i][j + 1 :]
        elif kind == "line":
            lines.insert(i, lines[rng.randrange(len(lines))])
        else:
            lines[i] = lines[i].replace('"', '"\u00e9\u4e2d\U0001f600', 1)
        out.append("\n".join(lines) + "\n")
    return out


def test_cli_validate_of_mutated_suites_is_exit_0_or_one_line_exit_2(tmp_path):
    files = []
    for i, text in enumerate(text_mutations(40)):
        path = tmp_path / f"m{i:02d}.toml"
        path.write_text(text, encoding="utf-8")
        files.append(str(path))
    (tmp_path / "files.json").write_text(json.dumps(files))
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "files.json"), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads((tmp_path / "out.json").read_text())
    refused = 0
    for outcome in outcomes:
        stderr = outcome["stderr"]
        assert "Traceback" not in stderr, (outcome["path"], stderr)
        assert outcome["code"] in (0, 2), outcome
        if outcome["code"] == 2:
            refused += 1
            errors = [line for line in stderr.splitlines() if re.match(r"^harness(?: [a-z]+)?: error: ", line)]
            assert len(errors) == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert refused >= 10  # the mutations do break suites (the test is not vacuous)
