"""``calibration.inputs = "propagated"``: each block's statistics on the outputs of the compressed earlier blocks.

The references are computed here by hand on the tiny random Llama of
conftest.py (2 blocks): block 0's layers factorized from the whole-model
statistics (``collect_stats``, tests/test_calibration.py), materialized at the
ranks a ``rank = 0.5`` target keeps of every matrix (round(0.5 * min(m, n))),
swapped in with ``harness.surgery.replaced``; then the hidden states entering
block 1 (a forward pre-hook) and block 1's statistics and factorizations on
that model. Also: the suite option's checks, cell ids (only the cells it
changes move), a run end to end with resume, the planner's streams term, and
factorizations freed once their method's (or cell's) cells are computed.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from harness.api import FactorizeContext
from harness.errors import HarnessError
from harness.factorization import break_even_rank
from harness.plugins import get_plugins
from harness.run import pipeline
from harness.run import propagated as propagated_pass
from harness.run.calibration import collect_stats
from harness.run.runner import RunOptions, SuiteRunner, run_suite
from harness.suite import load_suite
from harness.surgery import replaced, weights_of
from tests.conftest import write_suite

CPU = torch.device("cpu")
RANK = 0.5
EVALUATOR = '[[evaluators]]\nname = "perplexity"\noptions = { seqlen = 16, max_windows = 2 }'


def suite_text(model_dir, inputs: str | None = "propagated", targets: str = f"[{{rank = {RANK}}}]", **extra) -> str:
    methods = extra.get("methods", ["svd-llm"])  # allocators, calibration, evaluate: see below
    option = f'inputs = "{inputs}"' if inputs else ""
    options = extra.get("options", {})  # method -> its options table, as TOML
    blocks = "\n".join(
        f'[[methods]]\nname = "{m}"' + (f"\noptions = {options[m]}" if m in options else "") for m in methods
    )
    return f"""
        name = "prop"
        device = "cpu"
        models = ["{model_dir}"]
        targets = {targets}
        allocators = {extra.get("allocators", '["uniform"]')}
        {blocks}
        {EVALUATOR if extra.get("evaluate", True) else ""}
        [calibration]
        samples = 5
        seqlen = 24
        batch_size = 2
        {extra.get("calibration", "")}
        {option}
        """


def open_session(tmp_path, model_dir, name="s", **kwargs):
    suite = load_suite(write_suite(tmp_path / f"{name}.toml", suite_text(model_dir, **kwargs)))
    options = RunOptions(tmp_path / name, progress=False, calibration_cache=tmp_path / f"cache-{name}")
    return suite, SuiteRunner(suite, options).open_session(str(model_dir))


def block_inputs(model, block, batches, batch_size=2) -> torch.Tensor:
    """The hidden states entering ``block`` for ``batches``, through ``model`` as it is now."""
    seen = []

    class Stop(Exception):
        pass

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        raise Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for chunk in batches.split(batch_size):
                with pytest.raises(Stop):
                    model(input_ids=chunk, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen)


def ref_rank(shape) -> int:
    return max(1, round(RANK * min(shape)))


# ---------------------------------------------------------------- against a hand-compressed model
@pytest.fixture(scope="module")
def propagated(tiny_model_dir, tmp_path_factory):
    """A propagated-mode factorization of the svd-llm cell under rank = 0.5, with the inputs block 1 received."""
    tmp_path = tmp_path_factory.mktemp("prop")
    suite, session = open_session(tmp_path, tiny_model_dir)
    (cell,) = session.cells()[1:]
    model = session.loaded.model
    calls = []
    handle = model.model.layers[1].register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0] if args else kwargs["hidden_states"]).detach().clone()),
        with_kwargs=True,
    )
    try:
        session.prepared.expect(suite.methods, [cell])
        facts, _ = session.prepared.factorize_cell(cell)
    finally:
        handle.remove()
    job = session.prepared.blocks._streams[cell.id]
    return session, cell, facts, job, calls


def hand_compressed_block0(session):
    """Block 0's layers at the reference ranks, factorized by svd-llm from the uncompressed model's statistics."""
    model, layers = session.loaded.model, session.layers
    batches = session.prepared.batches()
    first = [x for x in layers if ".layers.0." in x.name]
    stats = collect_stats(model, first, batches, {"gram"}, CPU, batch_size=2, progress=False)
    svdllm = get_plugins().get("decomposer", "svd-llm")
    ctx = FactorizeContext(seed=0, device=CPU, log=lambda m: None)
    replacements, ranks = {}, {}
    for layer in first:
        fact = svdllm.factorize(weights_of(model, [layer.name]), {layer.name: stats[layer.name]}, svdllm.Options(), ctx)
        ranks[layer.name] = ref_rank(layer.shape)
        replacements.update(fact.materialize(ranks[layer.name]))
    return replacements, ranks


def test_block1_inputs_are_those_of_the_model_with_block0_compressed_by_hand(propagated):
    session, _, _, job, calls = propagated
    model, batches = session.loaded.model, session.prepared.batches()
    replacements, ranks = hand_compressed_block0(session)
    # the reference ranks the pass used for block 0 are the rank target's per matrix
    by_name = {name: job.ranks[i] for i, group in enumerate(job.groups) for name in group if i in job.ranks}
    assert {n: r for n, r in by_name.items() if ".layers.0." in n} == ranks
    with replaced(model, replacements):
        expected = block_inputs(model, model.model.layers[1], batches)
    original = block_inputs(model, model.model.layers[1], batches)
    # block 1 ran once per batch for its statistics (it is the last block: no compressed forward after it)
    assert len(calls) == 3
    got = torch.cat(calls)
    assert got.shape == expected.shape == (5, 24, model.config.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - original).abs().max() > 1e-3  # not the uncompressed model's inputs


def test_block1_factorization_is_that_of_statistics_on_the_hand_compressed_model(propagated):
    session, _, facts, job, _ = propagated
    model, layers, batches = session.loaded.model, session.layers, session.prepared.batches()
    replacements, _ = hand_compressed_block0(session)
    second = [x for x in layers if ".layers.1." in x.name]
    with replaced(model, replacements):
        stats = collect_stats(model, second, batches, {"gram"}, CPU, batch_size=2, progress=False)
    plain = collect_stats(model, second, batches, {"gram"}, CPU, batch_size=2, progress=False)
    svdllm = get_plugins().get("decomposer", "svd-llm")
    ctx = FactorizeContext(seed=0, device=CPU, log=lambda m: None)
    index = {group[0]: i for i, group in enumerate(job.groups)}
    for layer in second:
        weights = weights_of(model, [layer.name])
        hand = svdllm.factorize(weights, {layer.name: stats[layer.name]}, svdllm.Options(), ctx)
        unpropagated = svdllm.factorize(weights, {layer.name: plain[layer.name]}, svdllm.Options(), ctx)
        piped = facts[index[layer.name]]
        assert piped.names == (layer.name,)
        r = ref_rank(layer.shape)
        assert piped.stored_rank == max(r, break_even_rank(*layer.shape))  # what uniform can choose for it
        ((a,),) = [piped.materialize(r).values()]
        ((b,),) = [hand.materialize(r).values()]
        ((c,),) = [unpropagated.materialize(r).values()]
        product, expected, other = a.A @ a.B, b.A @ b.B, c.A @ c.B
        scale = expected.abs().max()
        torch.testing.assert_close(product, expected, rtol=1e-4, atol=1e-5 * scale)
        assert piped.error(r) == pytest.approx(hand.error(r), rel=1e-4)
        assert (product - other).abs().max() > 1e-3 * scale, layer.name  # original inputs give another one


def test_reference_ranks_are_the_cells_allocator_on_each_block_with_its_share_of_the_budget(tmp_path, tiny_model_dir):
    from harness.run.allocate import compress

    dense_bytes = 4 * sum(m * n for m, n in (x.shape for x in find_layers(tmp_path, tiny_model_dir)))
    budget = 0.5 * dense_bytes
    _, session = open_session(
        tmp_path,
        tiny_model_dir,
        targets=f"[0.6, {{bytes = {budget}}}]",
        allocators='["uniform", "global-greedy"]',
        evaluate=False,
    )
    cells = {(c.allocator.label, c.target.kind): c for c in session.cells()[1:]}
    session.prepared.expect([], list(cells.values()))
    # uniform is local: its reference ranks for block 0 are its own choice on the whole model
    cell = cells["uniform", "params"]
    facts, seconds = session.prepared.factorize_cell(cell)
    job = session.prepared.blocks._streams[cell.id]
    chosen = compress(session.env, session.prepared, cell, facts, seconds).ranks
    block0 = {i: g[0] for i, g in enumerate(job.groups) if ".layers.0." in g[0]}
    assert len(block0) == 7 and {job.ranks[i] for i in block0} != {None}
    assert {g: job.ranks[i] for i, g in block0.items()} == {g: chosen[g] for g in block0.values()}
    # a bytes budget is the whole model's: block 0 (half the parameters) gets half of it, and greedy fills it
    cell = cells["global-greedy", "bytes"]
    facts, _ = session.prepared.factorize_cell(cell)
    job = session.prepared.blocks._streams[cell.id]
    spent = sum(
        facts[i].bytes(job.ranks[i], 4) if job.ranks[i] is not None else 4 * facts[i].dense_params for i in block0
    )
    assert 0.9 * budget / 2 < spent <= budget / 2


def find_layers(tmp_path, model_dir):
    from harness.models import load_model
    from harness.surgery import find_linears

    return find_linears(load_model(str(model_dir), "float32", "cpu").model)


# ---------------------------------------------------------------- groups spanning blocks
class Truncated:
    """A minimal factorization of a group: each member's truncated SVD (all the pass materializes)."""

    def __init__(self, names, weights):
        self.names, self.weights = tuple(names), weights

    def materialize(self, rank):
        return {n: truncated(self.weights[n], rank) for n in self.names}


def truncated(weight: torch.Tensor, rank: int):
    from harness.factorization import LowRank

    U, s, Vt = torch.linalg.svd(weight.double(), full_matrices=False)
    return LowRank((U[:, :rank] * s[:rank]).float(), Vt[:rank].float())


def test_a_group_spanning_blocks_passes_on_uncompressed_until_its_last_block():
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.surgery import find_linears

    torch.manual_seed(4)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    batches = torch.randint(0, 96, (5, 12), generator=torch.Generator().manual_seed(5))
    layers = find_linears(model)
    o0, o1 = "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"
    groups = [[o0, o1], *([x.name] for x in layers if x.name not in (o0, o1))]
    weights = {x.name: model.get_submodule(x.name).weight.detach().clone() for x in layers}
    job = pipeline.Job(
        "pairs",
        frozenset({"gram"}),
        groups,
        lambda g, s: Truncated(g, {n: weights[n] for n in g}),
        method="pairs",
        reference=lambda job, indices: [2] * len(indices),
    )
    calls, said = [], []
    hook = model.model.layers[2].register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True
    )
    try:
        propagated_pass.run_propagated(
            model, layers, batches, [job], device=CPU, batch_size=2, progress=False, log=said.append
        )
    finally:
        hook.remove()
    assert job.error is None and len(calls) == 3  # block 2, the last: its statistics forward only
    # every group complete before the last block got its reference rank (the pair at block 1)
    assert job.ranks == {i: 2 for i, g in enumerate(groups) if ".layers.2." not in g[-1]} and 0 in job.ranks
    assert said == [
        "calibration: propagated inputs: pairs: 1 layer in groups that span blocks pass on uncompressed through "
        "their own blocks (a group is compressed from its last block on)"
    ]
    got = torch.cat(calls)

    def inputs_of_block2(compressed):
        with replaced(model, {n: truncated(weights[n], 2) for n in compressed}):
            return block_inputs(model, model.model.layers[2], batches)

    before_block2 = [x.name for x in layers if ".layers.2." not in x.name]
    expected = inputs_of_block2(
        [n for n in before_block2 if n != o0]
    )  # o_proj of block 0 uncompressed, of block 1 compressed
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - inputs_of_block2(before_block2)).abs().max() > 1e-3  # not block 0 o_proj compressed too
    assert (got - inputs_of_block2([n for n in before_block2 if n not in (o0, o1)])).abs().max() > 1e-3


# ---------------------------------------------------------------- the suite option
def test_bad_inputs_values_are_refused_with_file_key_and_value(tmp_path, tiny_model_dir):
    path = write_suite(tmp_path / "bad.toml", suite_text(tiny_model_dir, inputs="forward"))
    with pytest.raises(HarnessError, match=r"bad.toml: calibration: inputs: expected 'original' or 'propagated', "):
        load_suite(path)
    with pytest.raises(HarnessError, match="got 'forward'"):
        load_suite(path)
    whole = write_suite(
        tmp_path / "whole.toml", suite_text(tiny_model_dir, calibration='pipeline = "whole"', inputs="propagated")
    )
    with pytest.raises(HarnessError, match=r"whole.toml: calibration: inputs: expected 'original' with pipeline = "):
        load_suite(whole)


def test_ray_refuses_propagated_inputs_with_one_line(tmp_path, tiny_model_dir):
    suite, session = open_session(tmp_path, tiny_model_dir)
    with pytest.raises(HarnessError, match=r"calibration\.inputs: expected 'original' where one method's"):
        session.factorize(suite.methods[0])  # what a Ray factorize task asks


def test_only_the_cells_it_changes_get_new_ids(tmp_path, tiny_model_dir):
    methods = ["svd-llm", "svd", "fwsvd"]
    ids = {}
    for inputs in (None, "original", "propagated"):
        suite, session = open_session(tmp_path, tiny_model_dir, name=str(inputs), inputs=inputs, methods=methods)
        ids[inputs] = {c.label: c.id for c in session.cells()}
        if inputs == "propagated":
            served = {m.label: session.prepared.propagated(m) for m in suite.methods}
            assert served == {"svd-llm": True, "svd": False, "fwsvd": False}
            calib = {c.label: c.config.get("calibration", {}).get("inputs") for c in session.cells()}
    assert ids[None] == ids["original"]  # the default is "original", left out of every cell's config
    moved = {label for label in ids[None] if ids[None][label] != ids["propagated"][label]}
    assert moved == {label for label in ids[None] if " svd-llm " in label}
    assert {label: v for label, v in calib.items() if v} == dict.fromkeys(moved, "propagated")


def test_fisher_methods_keep_original_inputs_and_say_so(tmp_path, tiny_model_dir, capsys):
    facts = {}
    for inputs in ("original", "propagated"):
        # (each mode collects its own statistics: open_session gives each its own calibration cache)
        suite, session = open_session(tmp_path, tiny_model_dir, name=inputs, inputs=inputs, methods=["fwsvd"])
        facts[inputs], _ = session.factorize(suite.methods[0])
    err = capsys.readouterr().err
    assert err.count("calibration: fwsvd needs fisher: the whole-model pass on original inputs") == 1
    for a, b in zip(facts["original"], facts["propagated"], strict=True):
        ((x,),), ((y,),) = [a.materialize(4).values()], [b.materialize(4).values()]
        assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B)


# ---------------------------------------------------------------- end to end
def test_a_propagated_run_changes_only_its_cells_and_resumes_per_cell(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from harness.cli import main

    streams = []
    real = propagated_pass.run_propagated
    monkeypatch.setattr(propagated_pass, "run_propagated", lambda *a, **k: streams.append(len(a[3])) or real(*a, **k))
    results, options = tmp_path / "results", RunOptions(tmp_path / "results", limit=2, progress=False)

    def suite(inputs: str, targets: str = f"[{{rank = {RANK}}}]"):
        return write_suite(
            tmp_path / f"{inputs}.toml", suite_text(tiny_model_dir, inputs, targets, methods=["svd-llm", "svd"])
        )

    before = run_suite(load_suite(suite("original")), options)
    assert before.computed == 3 and not before.failed
    # the same results directory: only the svd-llm cell is computed anew, the baseline and plain svd are reused
    assert main(["run", str(suite("propagated")), "--results", str(results), "--no-progress", "--limit", "2"]) == 0
    assert streams == [1]
    assert "calibration: propagated inputs, 1 stream: gram block by block" in capsys.readouterr().err
    after = run_suite(load_suite(suite("propagated")), options)  # a rerun: nothing to compute
    assert after.computed == 0 and after.skipped == 3 and not after.failed and streams == [1]
    old = {(r.method or {}).get("label", "-"): r for r in before.results}
    new = {(r.method or {}).get("label", "-"): r for r in after.results}
    assert new["svd-llm"].ok and new["svd-llm"].cell_id != old["svd-llm"].cell_id
    assert new["svd-llm"].metrics["perplexity"] != old["svd-llm"].metrics["perplexity"]
    assert new["svd-llm"].ranks == old["svd-llm"].ranks  # the rank target's ranks, other factors
    assert new["svd-llm"].calibration["inputs"] == "propagated" and "inputs" not in old["svd-llm"].calibration
    for label in ("-", "svd"):
        assert new[label].cell_id == old[label].cell_id and new[label].metrics == old[label].metrics
    # a new target: only its cells (svd-llm's stream, svd's cell) are computed
    grown = run_suite(load_suite(suite("propagated", f"[{{rank = {RANK}}}, 0.6]")), options)
    assert grown.computed == 2 and grown.skipped == 3 and not grown.failed
    assert streams == [1, 1]


# ---------------------------------------------------------------- the plan
def test_plan_counts_activations_and_kept_factors_once_per_stream(tmp_path, tiny_model_dir):
    from harness.plan import activations_bytes, kept_bytes, linear_layers, model_config, plan_model, refusal

    targets = "[0.6, 0.8, {rank = 0.5}]"
    plans = {}
    for inputs in ("original", "propagated"):
        text = suite_text("random:tiny-llama", inputs, targets, methods=["svd-llm", "svd", "fwsvd"])
        text = text.replace('allocators = ["uniform"]', 'allocators = ["uniform", "energy"]')
        suite = load_suite(write_suite(tmp_path / f"{inputs}.toml", text))
        plan = plan_model(suite, "random:tiny-llama", "cpu")
        plans[inputs] = {s.name: s for s in plan.stages}
    plan.host_memory = plans["propagated"]["load"].host  # the calibration stage does not fit
    assert 'fewer targets x allocators, or calibration.inputs = "original"' in refusal(plan, suite)
    streams = 3 * 2  # svd-llm's targets x allocators; svd needs no statistics, fwsvd keeps the whole-model pass
    config = model_config("random:tiny-llama", None, False)
    activations = activations_bytes(5, 24, config["hidden_size"], 4)
    assert "propagated inputs: 6 streams" in plans["propagated"]["calibration"].note
    plugins = get_plugins()
    layers = linear_layers(config, None, False)
    allocators = [plugins.get("allocator", a) for a in ("uniform", "energy")]
    method_targets = suite.methods[0].targets
    shared = kept_bytes(layers, method_targets, allocators, 4)
    own = sum(kept_bytes(layers, [t], [a], 4) for t in method_targets for a in allocators)
    # the second (last) of tiny-llama's 2 blocks collects with the first block's factors alive (half of each
    # job's: every stream's own under propagated inputs, the method's shared ones under original), and
    # between its groups' factorizations holds up to all of them: the difference lies between the two
    calibration = plans["propagated"]["calibration"].host - plans["original"]["calibration"].host
    extra = calibration - (streams - 1) * activations
    assert (own - shared) // 2 <= extra <= own - shared
    factorization = plans["propagated"]["factorization"].host - plans["original"]["factorization"].host
    assert own > shared and 0 < factorization <= own - shared  # the groups kept before the costliest one


# ---------------------------------------------------------------- memory: factorizations freed after their cells
def test_a_methods_factorizations_are_freed_once_its_cells_are_computed(tmp_path, tiny_model_dir):
    suite, session = open_session(
        tmp_path, tiny_model_dir, inputs=None, targets="[0.6]", methods=["svd-llm", "asvd"], evaluate=False
    )
    cells = session.cells()[1:]
    session.prepared.expect(suite.methods)
    refs = {}
    real = session.compute_cell

    def compute(cell, factorizations, seconds):
        refs[cell.method.label] = weakref.ref(factorizations[0].A)
        return real(cell, factorizations, seconds)

    session.compute_cell = compute
    first, second = suite.methods
    session.run_method(first, [c for c in cells if c.method is first])
    gc.collect()
    assert refs.keys() == {"svd-llm"} and refs["svd-llm"]() is None  # freed once svd-llm's cell is done
    waiting = session.prepared.blocks._jobs["asvd"].factorizations[0].A  # the one pass computed asvd's too
    waiting = weakref.ref(waiting)
    assert waiting() is not None  # still waiting for its cells
    session.run_method(second, [c for c in cells if c.method is second])
    gc.collect()
    assert refs["asvd"]() is None and waiting() is None
    assert not session.prepared.blocks._jobs


def test_a_cells_propagated_factorizations_are_freed_after_it(tmp_path, tiny_model_dir):
    suite, session = open_session(tmp_path, tiny_model_dir, targets="[0.6, 0.8]", evaluate=False)
    cells = session.cells()[1:]
    session.prepared.expect(suite.methods, cells)
    forwards = [0, 0]
    handles = [
        block.register_forward_hook(lambda *a, i=i: forwards.__setitem__(i, forwards[i] + 1))
        for i, block in enumerate(session.loaded.model.model.layers)
    ]
    refs, seen = [], []
    real = session.compute_cell

    def compute(cell, factorizations, seconds):  # (an assertion here would only fail the cell)
        refs.append(weakref.ref(factorizations[0].A))
        gc.collect()
        waiting = [c for c in cells if c is not cell and c.id in session.prepared.blocks._streams]
        seen.append(([r() is None for r in refs[:-1]], len(waiting)))
        return real(cell, factorizations, seconds)

    session.compute_cell = compute
    try:
        session.run_method(suite.methods[0], cells)
    finally:
        for handle in handles:
            handle.remove()
    gc.collect()
    # 3 batches: block 0's statistics once for both streams (the same inputs), then its compressed forward per
    # stream (their ranks differ); block 1 (the last) once per stream, for its statistics only
    assert forwards == [3 + 2 * 3, 2 * 3]
    # during the first cell the second one's factorizations wait; during the second the first's are gone
    assert seen == [([], 1), ([True], 0)]
    assert len(refs) == 2 and all(r() is None for r in refs)
    assert not session.prepared.blocks._streams


def test_ray_refuses_propagated_inputs_before_anything_runs(tmp_path, capsys):
    from harness.cli import main

    path = tmp_path / "ray.toml"
    path.write_text(
        'models = ["random:tiny-llama"]\nmethods = ["svd-llm"]\ntargets = [0.5]\n[calibration]\ninputs = "propagated"\n'
    )
    assert main(["run", str(path), "--executor", "ray", "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "calibration.inputs: expected 'original' under --executor ray" in err
    assert not (tmp_path / "r").exists()
