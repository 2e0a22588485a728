"""``harness plan`` (harness/plan.py): the figures against what the code allocates, and the run's refusal.

The layer list and parameter count are checked against a model built from the
same config (meta device); the statistics figure against the pipeline's own
count of live statistics tensors (``harness.run.pipeline.LiveStats``) on
``random:tiny-llama``; the kept ranks against ``harness.run.factors.max_rank``
on real factorizations; the calibration stage's host figure against the peak
RSS of a one-block Llama-2-7B-shaped pass in a child process (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness import plan as plan_mod
from harness import shapes

ROOT = Path(__file__).resolve().parent.parent
HARNESS = [sys.executable, "-m", "harness.cli"]


def write(tmp_path: Path, methods: str = 'name = "svd-llm"', extra: str = "", model: str = "random:tiny-llama") -> Path:
    text = f"""
name = "plan_test"
device = "cpu"
dtype = "float32"
models = ["{model}"]
targets = [0.8]
allocators = ["uniform"]
{extra}
[calibration]
samples = 4
seqlen = 256
batch_size = 4

[[methods]]
{methods}

[[evaluators]]
name = "perplexity"
options = {{ source = "wiki-passages", seqlen = 64, max_windows = 2 }}
"""
    path = tmp_path / "suite.toml"
    path.write_text(text)
    return path


def meta_model(shape: str, layers: int | None = None):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = shapes.parse_random_spec(f"random:{shape}", layers).config()
    settings = dict(config)
    built = AutoConfig.for_model(settings.pop("model_type"), **settings)
    with init_empty_weights():
        return config, AutoModelForCausalLM.from_config(built)


@pytest.mark.parametrize("shape", ["tiny-llama", "llama-3-8b", "qwen2.5-7b"])
def test_layers_and_parameters_are_those_of_the_built_model(shape):
    from harness.surgery import find_linears

    config, model = meta_model(shape, 2)
    for lm_head in (False, True):
        assert plan_mod.linear_layers(config, None, lm_head) == find_linears(model, None, lm_head)
    assert plan_mod.linear_layers(config, ["q_proj", "down_proj"]) == find_linears(model, ["q_proj", "down_proj"])
    assert plan_mod.param_count(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "kinds", [{"gram"}, {"abs_mean"}, {"out_cov"}, {"gram", "abs_mean"}, {"gram", "abs_mean", "out_cov"}]
)
def test_statistics_figure_is_the_pipelines_live_peak(kinds):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.run import pipeline
    from harness.surgery import find_linears

    config = shapes.parse_random_spec("random:tiny-llama").config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})).eval()
    layers = find_linears(model, None, include_lm_head="out_cov" not in kinds)
    batches = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(1))
    tracker = pipeline.LiveStats()
    job = pipeline.Job("count", frozenset(kinds), [[x.name] for x in layers], lambda group, stats: None)
    pipeline.run_blocks(model, layers, batches, [job], device=torch.device("cpu"), progress=False, tracker=tracker)
    assert job.error is None
    planned = plan_mod.linear_layers(config, None, "out_cov" not in kinds)
    assert plan_mod.pipeline_stats_peak(planned, frozenset(kinds)) == tracker.peak > 0


def test_statistics_closed_form_for_a_llama_7b_block():
    """bench/README.md: one Llama-2-7B block's gram statistics are 3 · 4096² + 11008² float64 values
    (q/k/v share one Gram, gate/up one), plus the per-channel sums and means."""
    layers = plan_mod.linear_layers(shapes.parse_random_spec("random:llama-2-7b", 1).config())
    inputs = (4096, 4096, 4096, 11008)  # attention in, o_proj in, mlp in, down_proj in
    expected = 8 * sum(n * n + 2 * n for n in inputs)  # the Gram, the x² sums, sq_mean
    assert plan_mod.pipeline_stats_peak(layers, frozenset({"gram"})) == expected
    assert round(sum(8 * n * n for n in inputs) / 2**30, 3) == 1.278


def test_kept_ranks_are_those_the_session_keeps():
    import torch

    from harness.factorization import SVDLikeFactorization
    from harness.plugins import get_plugins
    from harness.run.factors import max_rank
    from harness.targets import parse_target

    plugins = get_plugins()
    uniform, order = plugins.get("allocator", "uniform"), plugins.get("allocator", "bitstack-order")
    torch.manual_seed(0)
    for m, n in ((24, 40), (40, 24), (30, 30)):
        U, s, Vt = torch.linalg.svd(torch.randn(m, n, dtype=torch.float64), full_matrices=False)
        fact = SVDLikeFactorization("w", U, s, Vt)
        for targets in ([parse_target(0.8, "t")], [parse_target({"rank": 0.9}, "t")], [parse_target(0.5, "t")]):
            for allocators in ([uniform], [order], [uniform, order]):
                assert plan_mod.kept_rank(m, n, targets, allocators) == max_rank(fact, targets, allocators)


def test_a_cells_replaced_layers():
    from harness.targets import parse_target

    layers = plan_mod.linear_layers(shapes.parse_random_spec("random:tiny-llama").config())
    dense = sum(m * n for m, n in (x.shape for x in layers))  # 2 blocks of 64/176-wide Llama layers
    assert dense == 2 * (64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 176)
    assert plan_mod.replaced_bytes(layers, parse_target(0.5, "t"), [], 4) == 4 * dense // 2
    # rank 0.5: 32 of 64 (q, o), 16 of 32 (k, v), 32 of 64 (gate, up, down), times m + n
    per_block = 32 * 128 * 2 + 16 * 96 * 2 + 32 * 240 * 3
    assert plan_mod.replaced_bytes(layers, parse_target({"rank": 0.5}, "t"), [], 2) == 2 * 2 * per_block


def test_plan_command_prints_every_stage_without_torch(tmp_path):
    suite = write(tmp_path)
    code = (
        "import sys; from harness.cli import main; rc = main(sys.argv[1:]); "
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code, "plan", str(suite)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for stage in plan_mod.STAGES:
        assert f"\n{stage} " in out.stdout
    assert "fits (host" in out.stdout
    assert out.stdout.strip().endswith("NO-TORCH")
    small = subprocess.run(
        [*HARNESS, "plan", str(suite), "--model", "random:llama-2-7b", "--memory", "4"], capture_output=True, text=True
    )
    assert small.returncode == 1
    assert "does NOT fit: load needs 25.47 GiB of host memory" in small.stdout


def test_run_refuses_a_plan_over_the_memory_before_loading_weights(tmp_path):
    suite = write(tmp_path)
    started = time.perf_counter()
    out = subprocess.run(
        [*HARNESS, "run", str(suite), "--model", "random:llama-2-7b?layers=1", "--memory", "3", "--results", "res"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    elapsed = time.perf_counter() - started
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "stage calibration needs" in lines[0] and "3.00 GiB available" in lines[0]
    assert "calibration.samples (4)" in lines[0] and "--no-plan-check" in lines[0]
    assert not (tmp_path / "res").exists()  # no cells/, nothing written
    assert elapsed < 3.0  # interpreter start and the plugins; a one-block 7B load alone takes ~4 s


def test_no_plan_check_runs_anyway(tmp_path, monkeypatch):
    from harness import cli
    from harness.run import runner

    class Reached(Exception):
        pass

    def run_suite(suite, options):
        raise Reached

    monkeypatch.setattr(runner, "run_suite", run_suite)
    argv = ["run", str(write(tmp_path)), "--memory", "0.01", "--results", str(tmp_path / "res")]
    assert cli.main(argv) == 2
    with pytest.raises(Reached):
        cli.main([*argv, "--no-plan-check"])


def test_refusal_names_the_setting_per_stage(tmp_path):
    from harness.suite import load_suite

    suite = load_suite(write(tmp_path, extra="", model="random:llama-2-7b"))
    plan = plan_mod.plan_model(suite, "random:llama-2-7b", "cpu")
    load, calibration, factorization = (s.host for s in plan.stages[:3])
    assert load < calibration < factorization
    plan.host_memory = (load + calibration) // 2  # the model loads; its calibration does not fit
    line = plan_mod.refusal(plan, suite)
    assert line.startswith("plan: random:llama-2-7b: stage calibration needs")
    assert "lower calibration.samples (4), calibration.seqlen (256) or calibration.batch_size (4)" in line
    plan.host_memory = (calibration + factorization) // 2
    assert "stage factorization needs" in plan_mod.refusal(plan, suite)
    plan.host_memory = 1000 * 2**30
    assert plan_mod.refusal(plan, suite) is None
    cuda = plan_mod.plan_model(suite, "random:llama-2-7b", "cuda")
    assert (
        cuda.dtype == "float32"
        and cuda.stages[0].device == plan_mod.param_count(shapes.parse_random_spec("random:llama-2-7b").config()) * 4
    )


def block_kept_bytes_by_hand() -> int:
    """One Llama-2-7B block's svd-llm factors at keep 0.8 (params, uniform): break-even K = (mn - 1) // (m + n)
    of each shape, K (m + n) float32 values: q, k, v, o 4096 x 4096 (K 2047), gate, up, down 4096 x 11008 (2985)."""
    return 4 * (4 * 2047 * 8192 + 3 * 2985 * 15104)


def test_block_path_counts_the_factors_kept_for_earlier_blocks(tmp_path):
    """Calibration on the block path: the last block collects with every earlier block's kept factors alive,
    so one block more adds its weights and one block's factors; under keep = "disk" only its weights (the
    factors are memory-mapped files, on disk)."""
    from harness.suite import load_suite

    def stages(layers: int, keep: str = "memory") -> dict:
        extra = f'[factorization]\nkeep = "{keep}"\n'
        suite = load_suite(write(tmp_path, extra=extra, model="random:llama-2-7b"))
        return {s.name: s for s in plan_mod.plan_model(suite, "random:llama-2-7b", "cpu", layers).stages}

    weights = plan_mod.block_params(shapes.parse_random_spec("random:llama-2-7b").config()) * 4
    kept = block_kept_bytes_by_hand()
    one, three = stages(1), stages(3)
    assert three["calibration"].host - one["calibration"].host == 2 * weights + 2 * kept
    assert "earlier blocks" in three["calibration"].note and "earlier blocks" not in one["calibration"].note
    assert three["factorization"].host - one["factorization"].host == 2 * weights + 2 * kept
    disk_one, disk_three = stages(1, "disk"), stages(3, "disk")
    assert disk_three["calibration"].host - disk_one["calibration"].host == 2 * weights
    assert disk_one["calibration"].host == one["calibration"].host  # one block: nothing kept before it
    assert disk_three["factor storage"].disk == 3 * kept
    assert one["factor storage"].disk == 0
    # factorization at one block: down_proj's working set with the block's factors (its own: being kept)
    assert one["factorization"].host - disk_one["factorization"].host == kept


CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from harness import shapes
    from harness.models import random_parameters
    from harness.run import pipeline
    from harness.surgery import find_linears

    torch.set_num_threads(1)
    settings = shapes.parse_random_spec("random:llama-2-7b?layers=1").config()
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    random_parameters(model, 0, torch.device("cpu"))
    model.eval().requires_grad_(False)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    layers = find_linears(model)
    batches = torch.randint(0, 32000, (4, 256), generator=torch.Generator().manual_seed(0))
    job = pipeline.Job("svd-llm", frozenset({"gram"}), [[x.name] for x in layers], lambda group, stats: None)
    started = time.perf_counter()
    pipeline.run_blocks(model, layers, batches, [job], device=torch.device("cpu"), batch_size=4, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"loaded": loaded, "peak": peak, "seconds": time.perf_counter() - started}))
    """
)


@pytest.mark.memory
def test_calibration_host_figure_within_15_percent_of_the_measured_peak_rss(tmp_path):
    from harness.suite import load_suite

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    suite = load_suite(write(tmp_path, model="random:llama-2-7b?layers=1"))
    plan = plan_mod.plan_model(suite, "random:llama-2-7b?layers=1", "cpu")
    # the bare child reads no calibration text: the plan's figure for it, without CALIBRATION_DATA_BYTES
    load, calibration = plan.stages[0].host, plan.stages[1].host - plan_mod.CALIBRATION_DATA_BYTES
    print(f"measured: loaded {measured['loaded'] / 2**30:.3f} GiB, calibration peak {measured['peak'] / 2**30:.3f} GiB")
    print(f"plan: load {load / 2**30:.3f} GiB, calibration {calibration / 2**30:.3f} GiB")
    assert abs(calibration - measured["peak"]) <= 0.15 * measured["peak"]
    assert abs(load - measured["loaded"]) <= 0.15 * measured["loaded"]


STAGES_CHILD = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from harness import shapes
    from harness.api import AllocationContext, FactorizeContext
    from harness.models import random_parameters
    from harness.plugins import get_plugins
    from harness.run import pipeline
    from harness.run.factors import factorize_group, keep
    from harness.suite import load_suite
    from harness.surgery import find_linears, replaced
    from harness_perplexity.scoring import perplexity

    def hwm():  # the peak resident set since the last reset (VmHWM)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def reset():  # the peak back to the resident set now (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    torch.set_num_threads(1)
    suite, spec = load_suite(sys.argv[1]), sys.argv[2]
    settings = shapes.parse_random_spec(spec).config()
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    random_parameters(model, 0, torch.device("cpu"))
    model.eval().requires_grad_(False)
    peaks = {"load": hwm()}
    layers = find_linears(model, suite.surgery.kinds, suite.surgery.lm_head)
    cal, method, plugins = suite.calibration, suite.methods[0], get_plugins()
    vocab = config.vocab_size
    decomposer = plugins.get("decomposer", method.name)
    allocators = [plugins.get("allocator", a.name) for a in method.allocators]
    ctx = FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda message: None)

    def factorize(group, stats):  # as harness.run.blockwise does
        if "calibration" not in peaks:  # one block: its statistics are complete
            peaks["calibration"] = hwm()
            reset()
        raw = factorize_group(decomposer, model, group, stats, method.options, ctx)
        return keep(raw, method.targets, allocators, suite.factorization.storage_dtype)

    groups = decomposer.groups(layers, method.options)
    job = pipeline.Job(method.label, frozenset(decomposer.needs), groups, factorize)
    batches = torch.randint(0, vocab, (cal.samples, cal.seqlen), generator=torch.Generator().manual_seed(0))
    reset()
    pipeline.run_blocks(model, layers, batches, [job], device=torch.device("cpu"), batch_size=cal.batch_size,
                        progress=False)
    assert job.error is None, job.error
    peaks["factorization"] = hwm()
    gc.collect()
    reset()  # a cell: the allocator's ranks, the factored layers in place, perplexity (the factors stay alive)
    allocation = AllocationContext(seed=0, layers={x.name: x for x in layers}, dtype_bytes=4)
    ranks = allocators[0].allocate(job.factorizations, method.targets[0], method.allocators[0].options, allocation)
    replacements = {}
    for fact, rank in zip(job.factorizations, ranks):
        replacements.update(fact.materialize(rank))
    evaluator = suite.evaluators[0].options  # one batch of the perplexity evaluator's windows
    shape = (evaluator.batch_size, evaluator.seqlen)
    windows = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))
    with replaced(model, replacements):
        perplexity(model, windows, torch.device("cpu"), evaluator.batch_size)
    peaks["evaluation"] = hwm()
    print(json.dumps(peaks))
    """
)


@pytest.mark.memory
@pytest.mark.parametrize("method", ["svd-llm", "sfsd"])
def test_factorization_and_evaluation_figures_within_15_percent_of_the_measured_peaks(tmp_path, method):
    """One block of a Llama-2-7B shape at half width (2048 wide, intermediate 5504; down_proj only, the layer
    with the widest input and so the largest statistics and factorization), the block pipeline factorizing
    with the method's plugin and keeping what its cells can use, then one cell's perplexity on one batch of
    the evaluator's windows with the factored layer in place and the kept factors alive: each stage's peak
    resident set (VmHWM, reset between stages) against the plan's host figure."""
    from harness.suite import load_suite

    spec = "random:llama-2-7b?layers=1&scale=2"
    suite_file = write(tmp_path, f'name = "{method}"', extra='[surgery]\nkinds = ["down_proj"]', model=spec)
    text = suite_file.read_text().replace(
        "seqlen = 64, max_windows = 2", "seqlen = 512, max_windows = 4, batch_size = 4"
    )
    suite_file.write_text(text)  # an evaluation batch of 4 x 512 tokens: 0.75 GiB of logits at 12 bytes a value
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", STAGES_CHILD, str(suite_file), spec], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    plan = {s.name: s.host for s in plan_mod.plan_model(load_suite(suite_file), spec, "cpu").stages}
    for stage in ("calibration", "factorization"):  # the bare child reads no calibration text
        plan[stage] -= plan_mod.CALIBRATION_DATA_BYTES
    for stage in ("load", "calibration", "factorization", "evaluation"):
        print(f"{stage}: measured {measured[stage] / 2**30:.3f} GiB, plan {plan[stage] / 2**30:.3f} GiB")
    for stage in ("calibration", "factorization", "evaluation"):  # load: the test above, at full width
        assert abs(plan[stage] - measured[stage]) <= 0.15 * measured[stage], stage
