"""One uncompressed stream serves ``anchor_cross`` (aa-svd) and ``gram_original`` (svd-llm's closed-form
update) in one propagated pass: each method's statistics are bitwise those of a pass serving it alone.

A pass that serves both keeps the uncompressed model's activations at block
b's inputs while the streams pair with them (``anchor_cross``) and takes
their Gram (``gram_original``) before they move on: advancing them early, or
twice, would give every later block's statistics of the wrong inputs.
"""

from __future__ import annotations

import torch
from harness_aasvd import AASVD
from harness_svdllm import SVDLLM

from harness.run.runner import RunOptions, SuiteRunner
from harness.suite import load_suite
from tests.conftest import write_suite

METHODS = {
    "aa": '[[methods]]\nname = "aa-svd"\n',
    "cf": '[[methods]]\nname = "svd-llm"\nlabel = "cf"\noptions = { update = "closed-form" }\n',
}
SUITE = """
name = "{name}"
device = "cpu"
models = ["{model}"]
targets = [{{rank = 0.5}}]
allocators = ["uniform"]
{methods}
[calibration]
samples = 5
seqlen = 24
batch_size = 2
inputs = "propagated"
"""


def statistics(tmp_path, model_dir, monkeypatch, names: list[str]) -> dict:
    """The statistics each method's decomposer received, by (class, layer), from one pass serving ``names``."""
    name = "-".join(names)
    text = SUITE.format(name=name, model=model_dir, methods="\n".join(METHODS[n] for n in names))
    suite = load_suite(write_suite(tmp_path / f"{name}.toml", text))
    session = SuiteRunner(suite, RunOptions(tmp_path / name, progress=False)).open_session(str(model_dir))
    seen = {}
    for cls in (AASVD, SVDLLM):
        real = cls.factorize_matrix

        def spy(self, layer, weight, stats, options, ctx, real=real, cls=cls):
            seen[cls.__name__, layer] = stats
            return real(self, layer, weight, stats, options, ctx)

        monkeypatch.setattr(cls, "factorize_matrix", spy)
    cells = session.cells()[1:]
    session.prepared.expect(suite.methods, cells)
    session.prepared.factorize_cell(cells[0])  # the one pass: every expected cell's stream
    monkeypatch.undo()
    return seen


def test_both_kinds_in_one_pass_are_those_of_each_alone(tmp_path, tiny_model_dir, monkeypatch):
    together = statistics(tmp_path, tiny_model_dir, monkeypatch, ["aa", "cf"])
    alone = {
        **statistics(tmp_path, tiny_model_dir, monkeypatch, ["aa"]),
        **statistics(tmp_path, tiny_model_dir, monkeypatch, ["cf"]),
    }
    assert together.keys() == alone.keys() and any(".layers.1." in layer for _, layer in together)
    for key, stats in together.items():
        for field in ("gram", "anchor_cross", "gram_original"):
            mine, theirs = getattr(stats, field), getattr(alone[key], field)
            assert (mine is None) == (theirs is None), (key, field)
            if mine is not None:
                assert torch.equal(mine, theirs), (key, field)
    aa = [s for (cls, _), s in together.items() if cls == "AASVD"]
    cf = [s for (cls, _), s in together.items() if cls == "SVDLLM"]
    assert all(s.anchor_cross is not None for s in aa) and all(s.gram_original is not None for s in cf)
