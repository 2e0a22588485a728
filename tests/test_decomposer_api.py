"""The public helpers decomposer plugins are built on: SingleMatrixDecomposer, the output
projection, tail sums, dtype names, and plugin entry points that load no torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import harness
from harness.linalg import tail_sums

M, N, T = 12, 7, 40
NAME = "model.layers.0.mlp.up_proj"
CTX = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)


def test_tail_sums_closed_form():
    assert tail_sums(torch.tensor([3.0, 2.0, 1.0])) == [6.0, 3.0, 1.0, 0.0]
    assert tail_sums(torch.zeros(0)) == [0.0]


def test_float_dtype_names():
    assert harness.float_dtype("float32") is torch.float32
    assert harness.float_dtype("float64") is torch.float64
    with pytest.raises(ValueError, match="float16"):
        harness.float_dtype("float16")


def test_single_matrix_decomposer_gets_one_weight_on_device_and_its_stats():
    seen = []

    class Probe(harness.SingleMatrixDecomposer):
        name = "probe"

        def factorize_matrix(self, name, weight, stats, options, ctx):
            seen.append((name, weight, stats))
            U, s, Vt = torch.linalg.svd(weight.double(), full_matrices=False)
            return harness.SVDLikeFactorization(name, U, s, Vt, out_dtype=weight.dtype)

    W = torch.randn(M, N, dtype=torch.float16)
    stats = harness.LayerStats(tokens=3)
    fac = Probe().factorize({NAME: W}, {NAME: stats}, harness.NoOptions(), CTX)
    assert seen[0][0] == NAME and seen[0][1].dtype == torch.float16 and torch.equal(seen[0][1], W)
    assert seen[0][2] is stats
    assert fac.names == (NAME,) and fac.materialize(N)[NAME].A.dtype == torch.float16
    Probe().factorize({NAME: W}, {}, harness.NoOptions(), CTX)
    assert seen[1][2] is None
    assert Probe().groups([harness.LayerInfo(NAME, "up_proj", 0, (M, N))], None) == [(NAME,)]


def test_output_projection_against_svd_of_the_outputs():
    """Planted: Y = X W^T; the rank-k projection is the top-k left singular space of W X^T."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(M, N, generator=g, dtype=torch.float64)
    X = torch.randn(T, N, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, N, dtype=torch.float64)
    Y = X @ W.T
    fac = harness.ProjectionFactorization.from_output_covariance(NAME, W.float(), Y.T @ Y)
    P, sigma, _ = torch.linalg.svd(Y.T, full_matrices=False)  # W X^T = P diag(sigma) Q^T
    assert list(fac.ranks) == list(range(min(M, N) + 1))
    for k in fac.ranks:
        expected = float((sigma[k:] ** 2).sum())
        assert fac.error(k) == pytest.approx(expected, rel=1e-9, abs=1e-9 * float((sigma**2).sum()))
        low = fac.materialize(k)[NAME]
        assert low.A.dtype == torch.float32 and low.A.shape == (M, k) and low.B.shape == (k, N)
        projected = P[:, :k] @ P[:, :k].T @ W
        assert torch.allclose((low.A.double() @ low.B.double()), projected.float().double(), atol=1e-5)
    assert fac.error(min(M, N)) == pytest.approx(0.0, abs=1e-8 * float((sigma**2).sum()))


def test_uncentred_lord_and_sfsd_give_the_same_factors():
    from harness_lord import LoRD
    from harness_sfsd import SFSD

    g = torch.Generator().manual_seed(1)
    W = torch.randn(M, N, generator=g)
    Y = torch.randn(T, N, generator=g, dtype=torch.float64) @ W.double().T
    stats = {NAME: harness.LayerStats(tokens=T, out_cov=Y.T @ Y)}
    a = LoRD().factorize({NAME: W}, stats, LoRD.Options(centre=False), CTX).materialize(3)[NAME]
    b = SFSD().factorize({NAME: W}, stats, SFSD.Options(centre=False), CTX).materialize(3)[NAME]
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


def test_svdllm_default_jitter_is_the_core_constant():
    from harness_svdllm import SVDLLMOptions

    assert SVDLLMOptions().jitter_eps == harness.CHOLESKY_EPS


PLUGINS = ["svd", "asvd", "fwsvd", "svdllm", "lord", "sfsd", "trawl", "bitstack"]


def test_decomposer_entry_points_load_no_torch():
    imports = "; ".join(f"import harness_{p}" for p in PLUGINS)
    code = f"import sys; {imports}; print(sorted(m for m in ('torch', 'tensorly') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_decomposer_options_and_descriptions_without_torch():
    """What ``harness validate`` reads: names, options (with defaults checked) and descriptions."""
    code = (
        "import sys, harness_svd, harness_svdllm, harness_trawl, harness_bitstack;"
        "[c.Options() for c in (harness_svd.SVD, harness_svdllm.SVDLLM, harness_trawl.TrawlCP,"
        " harness_bitstack.BitStack)];"
        "print(harness_svdllm.SVDLLM.name, harness_svd.SVD.description != '', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["svd-llm", "True", "False"]


DETERMINISM = """
import hashlib, sys, torch
import harness
from harness.provenance import seed_everything
from harness.options import parse_options
from harness_asvd import ASVD
from harness_bitstack import BitStack
from harness_trawl import TrawlCP

torch.set_num_threads(1)
torch.manual_seed(int(sys.argv[1]))  # a global RNG state that must not matter (the harness seeds before factorizing)
ctx = harness.FactorizeContext(seed=int(sys.argv[2]), device=torch.device("cpu"), log=lambda msg: None)
gen = torch.Generator().manual_seed(0)
W = torch.randn(24, 16, generator=gen)
X = torch.randn(64, 16, generator=gen) * torch.logspace(-1, 1, 16)
name = "model.layers.0.mlp.up_proj"
stats = {name: harness.LayerStats(tokens=64, abs_mean=X.abs().mean(0), sq_mean=X.square().mean(0))}
digest = hashlib.sha256()
asvd = ASVD().factorize({name: W}, stats, parse_options(ASVD.Options, {"svd": "lowrank"}, "m"), ctx)
for k in (5, 3):
    digest.update(b"".join(t.numpy().tobytes() for t in asvd.factors(k)))
seed_everything(ctx.seed)  # what the runner does before a method's factorizations
bits_options = parse_options(BitStack.Options, {"niter": 3, "k": 2, "svd": "lowrank", "statistic": "l2"}, "m")
bits = BitStack().factorize({name: W}, stats, bits_options, ctx)
digest.update(bits.blocks.packed.numpy().tobytes() + bits.blocks.u.numpy().tobytes())
mlp = {f"model.layers.0.mlp.{k}": torch.randn(*s, generator=gen) for k, s in
       (("gate_proj", (20, 8)), ("up_proj", (20, 8)), ("down_proj", (8, 20)))}
cp = TrawlCP().factorize(mlp, {}, parse_options(TrawlCP.Options, {"ranks": [3], "n_iter_max": 5}, "m"), ctx)
digest.update(cp.decomposition(3).left.numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.slow  # three child processes importing torch: ~10 s of CPU, 40 s on a busy 2-core machine
def test_randomized_methods_give_identical_factors_across_processes():
    """ASVD's ``svd = "lowrank"``, BitStack's ``svd = "lowrank"`` and TRAWL's random init depend on the seed
    and nothing else: not on the process (hash seed), nor on the global RNG state before the call (ASVD,
    TRAWL: private generators), nor on the order ranks are asked for; another seed gives other factors."""

    def digest(global_seed: int, seed: int, hash_seed: str) -> str:
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, "-c", DETERMINISM, str(global_seed), str(seed)],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        return out.stdout.split()[-1]

    first = digest(1, 0, "1")
    assert digest(2, 0, "2") == first
    assert digest(1, 1, "1") != first
