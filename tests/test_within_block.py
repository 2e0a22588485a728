"""Sequential statistics within a block (``Decomposer.sequential_within_block``, aa-svd's default) under
propagated inputs: the stages found from the block's forward, every stage's statistics against a model
compressed by hand stage by stage (q/k/v, then o, then gate/up, then down), the anchored objective on the
inputs a layer really gets, streams of both kinds in one pass, and the cells' identity.

The references are computed here with forward hooks on the whole tiny random Llama of conftest.py (2
blocks), each stage's X from the uncompressed model and X' from the model with the stages before it
replaced by hand (``harness.surgery.replaced``) at the rank target's ranks."""

from __future__ import annotations

import pytest
import torch

import harness
from harness.plugins import get_plugins
from harness.run import pipeline
from harness.run.blocks import capture_inputs
from harness.run.stages import block_stages
from harness.surgery import replaced, weights_of
from tests.test_aasvd import layer_inputs
from tests.test_pipeline_propagated import open_session, ref_rank

CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)
STAGES = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
STAGES += [["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
TOGETHER = {"aa-svd": "{ sequential = false }"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pass_factorizations(tmp_path, model_dir, name: str, methods=("aa-svd",), **kwargs):
    """The session and, per cell label, its factorizations by first group member, from one propagated pass."""
    suite, session = open_session(tmp_path, model_dir, name=name, methods=list(methods), **kwargs)
    cells = [c for c in session.cells() if c.method is not None]
    session.prepared.expect(suite.methods, cells)
    found = {}
    for cell in cells:
        facts, _ = session.prepared.factorize_cell(cell)
        groups = session.prepared.blocks._streams[cell.id].groups
        found[cell.method.label] = {group[0]: fact for group, fact in zip(groups, facts, strict=True)}
    return session, found


def anchored(X: torch.Tensor, Xs: torch.Tensor) -> harness.LayerStats:
    return harness.LayerStats(tokens=X.shape[0], gram=Xs.T @ Xs, anchor_cross=X.T @ Xs)


def hand_sequential(session, prefixes: list[str], given: dict | None = None) -> tuple[dict, dict]:
    """aa-svd's factorizations of the blocks ``prefixes``, stage after stage, each stage's X' with every
    earlier stage (of this block and the blocks before) replaced at its reference rank (by the factors
    ``given``, where given, else by those computed here); and those inputs."""
    model, batches = session.loaded.model, session.prepared.batches()
    shapes = {x.name: x.shape for x in session.layers}
    decomposer = get_plugins().get("decomposer", "aa-svd")
    replacements, facts, inputs = {}, {}, {}
    for prefix in prefixes:
        for stage in STAGES:
            names = [prefix + s for s in stage]
            original = layer_inputs(model, names, batches)
            with replaced(model, replacements):
                shifted = layer_inputs(model, names, batches)
            for name in names:
                stats = anchored(original[name], shifted[name])
                facts[name] = decomposer.factorize(weights_of(model, [name]), {name: stats}, decomposer.Options(), CTX)
                inputs[name] = original[name], shifted[name]
            for name in names:
                replacements.update((given or facts)[name].materialize(ref_rank(shapes[name])))
    return facts, inputs


def product(fact, rank: int) -> torch.Tensor:
    ((low,),) = [fact.materialize(rank).values()]
    return (low.A @ low.B).double()


def test_a_llama_block_has_four_stages_in_forward_order(tmp_path, tiny_model_dir):
    _, session = open_session(tmp_path, tiny_model_dir, methods=["aa-svd"])
    plan = session.prepared.blocks.block_plan()

    batches = session.prepared.batches()[:2]
    batch = capture_inputs(session.loaded.model, plan.blocks[0], batches, 2, torch.device("cpu"))[0]
    for b in (0, 1):
        stages = block_stages(plan.blocks[b], session.loaded.model, plan.members[b], batch, torch.device("cpu"))
        assert stages == [[f"model.layers.{b}.{name}" for name in stage] for stage in STAGES]
    # a layer the forward never reaches is a stage of its own, last
    names = [*plan.members[0], "model.layers.1.mlp.down_proj"]
    stages = block_stages(plan.blocks[0], session.loaded.model, names, batch, torch.device("cpu"))
    assert stages[-1] == ["model.layers.1.mlp.down_proj"] and len(stages) == 5


def test_each_stage_sees_the_blocks_earlier_stages_compressed(tmp_path, tiny_model_dir, capsys):
    session, found = pass_factorizations(tmp_path, tiny_model_dir, "seq")
    assert "stage by stage: q_proj/k_proj/v_proj -> o_proj -> gate_proj/up_proj -> down_proj" in capsys.readouterr().err
    piped = found["aa-svd"]
    # each stage's X' through the pass's own factors of the stages before it (so that rounding does not compound)
    facts, _ = hand_sequential(session, ["model.layers.0.", "model.layers.1."], given=piped)
    shapes = {x.name: x.shape for x in session.layers}
    for name, fact in facts.items():
        rank = ref_rank(shapes[name])
        expected = product(fact, rank)  # float32 factors; sums in another order: relative error, not bits
        error = torch.linalg.norm(product(piped[name], rank) - expected) / torch.linalg.norm(expected)
        assert error < 1e-5, (name, error.item())
    # the first stage of block 0 sees no shift; every later stage does (its own block's compressed layers)
    assert not piped["model.layers.0.self_attn.q_proj"].info["shifted"]
    assert all(piped[f"model.layers.0.{s}"].info["shifted"] for stage in STAGES[1:] for s in stage)


def test_sequential_factors_are_no_worse_on_the_inputs_a_layer_really_gets(tmp_path, tiny_model_dir):
    """aa-svd's own objective ||W X^T - W' X'^T|| on the inputs X' each layer of block 0 receives once the
    layers before it are compressed: the stage-by-stage factors are its minimizer at that rank; those from one
    forward through the uncompressed block (X' without this block's shift) are not."""
    session, sequential = pass_factorizations(tmp_path, tiny_model_dir, "seq")
    _, together = pass_factorizations(tmp_path, tiny_model_dir, "together", options=TOGETHER)
    _, inputs = hand_sequential(session, ["model.layers.0."])
    model, shapes = session.loaded.model, {x.name: x.shape for x in session.layers}
    gaps = {}
    for name, (X, Xs) in inputs.items():
        W = weights_of(model, [name])[name].double()
        rank = ref_rank(shapes[name])
        error = {
            how: torch.linalg.norm(W @ X.T - product(facts["aa-svd"][name], rank) @ Xs.T) ** 2
            for how, facts in (("sequential", sequential), ("together", together))
        }
        assert error["sequential"] <= error["together"] * (1 + 1e-6), name
        gaps[name] = (error["together"] - error["sequential"]) / error["together"]
    assert all(gaps[f"model.layers.0.{s}"] == 0 for s in STAGES[0])  # stage 1: the same statistics
    assert max(gaps.values()) > 1e-3  # the later stages: strictly better


def test_streams_of_both_kinds_share_a_pass_without_touching_each_other(tmp_path, tiny_model_dir):
    session, alone = pass_factorizations(tmp_path, tiny_model_dir, "alone", methods=("svd-llm",))
    _, both = pass_factorizations(tmp_path, tiny_model_dir, "both", methods=("svd-llm", "aa-svd"))
    _, seq = pass_factorizations(tmp_path, tiny_model_dir, "seq")
    shapes = {x.name: x.shape for x in session.layers}
    for method, reference in (("svd-llm", alone), ("aa-svd", seq)):
        for name, fact in reference[method].items():
            rank = ref_rank(shapes[name])
            assert torch.equal(product(both[method][name], rank), product(fact, rank)), (method, name)


def test_a_group_spanning_stages_waits_for_its_last_stage():
    job = pipeline.Job("j", frozenset({"gram"}), [("a.q", "a.o"), ("a.k",)], lambda group, stats: tuple(group))
    done_at = {"a.q": 0, "a.k": 0, "a.o": 0}
    pending = pipeline._Pending([job], done_at, lambda msg: None)
    pipeline._start([job], lambda: None)
    pending.held.update({n: harness.LayerStats() for n in ("a.q", "a.k")})
    assert pending.ready(0, {"a.q", "a.k"}) == [(job, 1)] and job.factorizations == [None, ("a.k",)]
    pending.held["a.o"] = harness.LayerStats()
    assert pending.ready(0, {"a.q", "a.k", "a.o"}) == [(job, 0)] and job.factorizations[0] == ("a.q", "a.o")
    assert pending.schedule == {} and pending.held == {}


def test_cells_carry_the_order_in_their_identity_only_under_propagated_inputs(tmp_path, tiny_model_dir):
    def calibration(name, **kwargs):
        _, session = open_session(tmp_path, tiny_model_dir, name=name, methods=["aa-svd", "svd-llm"], **kwargs)
        return {c.method.label: (c.id, c.config["calibration"]) for c in session.cells() if c.method is not None}

    seq, together = calibration("seq"), calibration("together", options=TOGETHER)
    original = calibration("original", inputs="original")
    assert seq["aa-svd"][1]["within_block"] == "sequential" and "within_block" not in together["aa-svd"][1]
    assert seq["aa-svd"][0] != together["aa-svd"][0]
    assert "within_block" not in seq["svd-llm"][1] and seq["svd-llm"][0] == together["svd-llm"][0]
    assert "within_block" not in original["aa-svd"][1]


def test_offloaded_blocks_give_the_same_stage_by_stage_numbers(tmp_path, tiny_model_dir):
    """Under ``offload = "disk"`` (accelerate's hooks, weights on the meta device between forwards) each
    stage's forward is cut short after its layers: the cells' numbers are those of the model kept whole."""
    from harness.run.runner import RunOptions, run_suite
    from harness.suite import load_suite
    from tests.conftest import write_suite
    from tests.test_pipeline_propagated import suite_text

    records = {}
    for mode in (None, "disk"):
        text = (f'offload = "{mode}"\n' if mode else "") + suite_text(tiny_model_dir, methods=["aa-svd"])
        suite = load_suite(write_suite(tmp_path / f"{mode}.toml", text))
        summary = run_suite(suite, RunOptions(tmp_path / str(mode), limit=2, progress=False))
        assert not summary.failed and summary.computed == 2
        records[mode] = {r.cell_id: (r.metrics, r.ranks) for r in summary.results}
    assert records["disk"] == records[None]
