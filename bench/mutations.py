"""Mutation check: do the tests catch small, hand-made bugs in the methods' math?

For each method module, a few text substitutions (a flipped sign, a wrong exponent, a transposed or
inverted scale, an off-by-one rank or bound) are applied one at a time; the module's tests run with
``-x -q`` against each mutant, and a table module x mutation -> caught / missed is printed. The
original file is always restored (``try/finally``, also on Ctrl-C), and its bytecode dropped, so a
stale ``.pyc`` of the same size and second can never stand in for either version.

    OMP_NUM_THREADS=1 .venv/bin/python bench/mutations.py            # every module (~15 min on 2 cores)
    .venv/bin/python bench/mutations.py --only bitstack --runner     # one module, with the runner tests too

Not collected by pytest (bench/ is outside ``testpaths``). ``--runner`` adds
tests/test_runner_methods.py (one suite run through the runner, ~1 min) to every module's tests;
by default only the unit tests run, with slow tests deselected.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
P = "plugins"


@dataclass(frozen=True)
class Mutation:
    label: str
    old: str
    new: str


@dataclass(frozen=True)
class Target:
    name: str
    path: str
    tests: tuple[str, ...]
    mutations: tuple[Mutation, ...]


M = Mutation
CALIBRATED = ("tests/test_methods_calibrated.py", "tests/test_linalg_paths.py")

TARGETS = [
    Target(
        "linalg",
        "harness/linalg.py",
        (*CALIBRATED, "tests/test_svd_surgery.py", "tests/test_decomposer_api.py"),
        (
            M("jitter subtracts (repo's shift)", "jitter = max(-lambda_min, 0.0) + eps", "jitter = -lambda_min + eps"),
            M("no tenfold growth", "jitter *= 10", "jitter *= 1"),
            M("gram SVD cut 1e-2", "keep = s > s[0] * 1e-7", "keep = s > s[0] * 1e-2"),
            M(
                "eigh vectors not flipped",
                "return values.flip(0).clamp_min(0), vectors.flip(1)",
                "return values.flip(0).clamp_min(0), vectors",
            ),
            M("tail sums off by one", "return [*tail.tolist(), 0.0]", "return [*tail.tolist()[1:], 0.0, 0.0]"),
        ),
    ),
    Target(
        "factorization",
        "harness/factorization.py",
        ("tests/test_methods_calibrated.py", "tests/test_svd_surgery.py", "tests/test_decomposer_api.py"),
        (
            M("sqrt(s) split: s", "root = self.s[:rank].sqrt()", "root = self.s[:rank]"),
            M(
                "diagonal right inverted",
                "B = B * self.right if self.right.ndim == 1",
                "B = B / self.right if self.right.ndim == 1",
            ),
            M("projection rank off by one", "r = min(m, n, U.shape[1])", "r = min(m, n, U.shape[1]) - 1"),
            M("params k(m+n-1)", "return k * (m + n)", "return k * (m + n - 1)"),
            M("dense right transposed", "else B @ self.right", "else B @ self.right.T"),
        ),
    ),
    Target(
        "svdllm",
        f"{P}/harness_svdllm/harness_svdllm/decompose.py",
        CALIBRATED,
        (
            M("W S transposed", "weight.to(torch.float64) @ S, dtype", "weight.to(torch.float64) @ S.T, dtype"),
            M(
                "S^-1 transposed",
                "harness.lower_triangular_inverse(S).to(dtype)",
                "harness.lower_triangular_inverse(S).T.to(dtype)",
            ),
            M(
                "Gram doubled",
                "S, shift = cholesky(gram.to(weight.device), eps, jitter)",
                "S, shift = cholesky(2 * gram.to(weight.device), eps, jitter)",
            ),
            M(
                "jitter eps ignored",
                "return harness.cholesky_with_jitter(gram, eps=eps)",
                "return harness.cholesky_with_jitter(gram, eps=1e-3)",
            ),
            M(
                "closed form on B G B^T transposed",
                "return torch.linalg.solve(H, B @ G @ W.T).T",
                "return torch.linalg.solve(H.T @ H, B @ G @ W.T).T",
            ),
        ),
    ),
    Target(
        "asvd",
        f"{P}/harness_asvd/harness_asvd/decompose.py",
        ("tests/test_methods_calibrated.py", "tests/test_asvd_fwsvd_options.py"),
        (
            M("exponent 2 alpha", "+ eps).pow(alpha)", "+ eps).pow(2 * alpha)"),
            M("exponent -alpha", "+ eps).pow(alpha)", "+ eps).pow(-alpha)"),
            M("scale divides", "weight.to(torch.float64) * scales", "weight.to(torch.float64) / scales"),
        ),
    ),
    Target(
        "asvd-plugin",
        f"{P}/harness_asvd/harness_asvd/__init__.py",
        ("tests/test_methods_calibrated.py", "tests/test_asvd_fwsvd_options.py"),
        (
            M("rms without sqrt", "else stats.sq_mean.sqrt()", "else stats.sq_mean"),
            M("S^-1 not inverted", "right = (1 / scales).to(dtype)", "right = scales.to(dtype)"),
            M("lowrank scales squared", "weight.float() * s32, s32", "weight.float() * s32 * s32, s32"),
        ),
    ),
    Target(
        "asvd-lowrank",
        f"{P}/harness_asvd/harness_asvd/lowrank.py",
        ("tests/test_asvd_fwsvd_options.py", "tests/test_decomposer_api.py"),
        (
            M("B times scales", "(root[:, None] * V.T) / self.scales", "(root[:, None] * V.T) * self.scales"),
            M(
                "rank off by one",
                "randomized_svd(self.scaled, rank, self.niter",
                "randomized_svd(self.scaled, rank + 1, self.niter",
            ),
            M("seed by hash()", "zlib.crc32(self.names[0].encode())", "(hash(self.names[0]) % 2**31)"),
            M("A = U S (not sqrt)", "A = U * root", "A = U * S"),
        ),
    ),
    Target(
        "fwsvd",
        f"{P}/harness_fwsvd/harness_fwsvd/decompose.py",
        ("tests/test_methods_calibrated.py", "tests/test_asvd_fwsvd_options.py"),
        (
            M("no sqrt of Fisher", "return f.clamp_min(eps * mean).sqrt()", "return f.clamp_min(eps * mean)"),
            M("add guard by mean", "(f + eps * f.max()).sqrt()", "(f + eps * f.mean()).sqrt()"),
            M("D divides", "weight.to(torch.float64) * d", "weight.to(torch.float64) / d"),
            M("floor by max", "f.clamp_min(eps * mean)", "f.clamp_min(eps * f.max())"),
        ),
    ),
    Target(
        "lord",
        f"{P}/harness_lord/harness_lord/centred.py",
        ("tests/test_lord.py",),
        (
            M(
                "scatter sign",
                "out_cov.double() - tokens * torch.outer(mu, mu)",
                "out_cov.double() + tokens * torch.outer(mu, mu)",
            ),
            M(
                "bias sign",
                "bias = self.mean - U64 @ (U64.T @ self.mean)",
                "bias = self.mean + U64 @ (U64.T @ self.mean)",
            ),
            M("bias not counted", "return rank * (m + n) + m", "return rank * (m + n)"),
            M("eigenvectors ascending", "eigvals, U = eigvals.flip(0), U.flip(1)", "eigvals, U = eigvals.flip(0), U"),
            M("tail off by one", "[: r + 1].tolist()", "[1 : r + 2].tolist()"),
        ),
    ),
    Target(
        "bitstack",
        f"{P}/harness_bitstack/harness_bitstack/decompose.py",
        ("tests/test_bitstack.py",),
        (
            M("scales divide", "R = W * s / r", "R = W / s / r"),
            M("u v from sigma (no sqrt)", "root = sigma[:k].sqrt()", "root = sigma[:k]"),
            M(
                "l2 without sqrt",
                "(seqlen * stats.sq_mean.double()).sqrt() + eps",
                "(seqlen * stats.sq_mean.double()) + eps",
            ),
            M("rebuild multiplies scales", "total /= scales.float()", "total *= scales.float()"),
            M("residual adds", "R -= b", "R += b"),
        ),
    ),
    Target(
        "bitstack-storage",
        f"{P}/harness_bitstack/harness_bitstack/factorization.py",
        ("tests/test_bitstack.py",),
        (
            M("u, v bytes k(m+n-1)", "FP16 * k * (m + n)", "FP16 * k * (m + n - 1)"),
            M("row scales not counted", "(FP16 * m if row_scales else 0)", "0"),
            M("params floor", "math.ceil(self.bytes(rank) / FP16)", "self.bytes(rank) // FP16"),
        ),
    ),
    Target(
        "bitstack-packing",
        f"{P}/harness_bitstack/harness_bitstack/packing.py",
        ("tests/test_bitstack.py",),
        (
            M(
                "LSB first",
                "_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)",
                "_SHIFTS = torch.arange(0, 8, dtype=torch.uint8)",
            ),
            M("zero as -1", "bits = (x >= 0)", "bits = (x > 0)"),
            M("size floor", "return math.ceil(numel / 8)", "return numel // 8 + 1"),
        ),
    ),
    Target(
        "bitstack-order",
        f"{P}/harness_bitstack/harness_bitstack/order.py",
        ("tests/test_bitstack.py",),
        (
            M("highest loss first", "key=lambda g: (scores[g], g)", "key=lambda g: (-scores[g], g)"),
            M("budget strict", "if total + step > limit:", "if total + step >= limit:"),
            M("proxy sign", "return -gain / max(", "return gain / max("),
            M(
                "level base off by one",
                "base = [min(level, n) for n in n_blocks]",
                "base = [min(level + 1, n) for n in n_blocks]",
            ),
        ),
    ),
    Target(
        "trawl",
        f"{P}/harness_trawl/harness_trawl/decompose.py",
        ("tests/test_trawl.py",),
        (
            M("rel error squared norm", "residual / norm if norm > 0", "residual / norm**2 if norm > 0"),
            M(
                "Tucker mixing transposed",
                'return torch.einsum("t,tij->ij", self.stack[s], self.core)',
                'return torch.einsum("t,tji->ij", self.stack[s], self.core)',
            ),
            M(
                "CP reconstruction transposed",
                'torch.einsum("sr,mr,nr->smn", self.stack, self.left, self.right)',
                'torch.einsum("sr,nr,mr->smn", self.stack, self.right.flip(0), self.left.flip(0))',
            ),
        ),
    ),
    Target(
        "trawl-storage",
        f"{P}/harness_trawl/harness_trawl/factorization.py",
        ("tests/test_trawl.py",),
        (
            M("CP params without S", "return rank * (S + m + n)", "return rank * (m + n)"),
            M(
                "slice middle transposed",
                "h = h @ (middle if self.transposed else middle.T)",
                "h = h @ (middle.T if self.transposed else middle)",
            ),
            M("shared counted everywhere", "owner=s == 0", "owner=True"),
            M("Tucker core params t r", "t * rank * rank", "t * rank"),
        ),
    ),
    Target(
        "trawl-stacking",
        f"{P}/harness_trawl/harness_trawl/stacking.py",
        ("tests/test_trawl.py",),
        (M("unstack not transposed", "(tensor[s].T if is_transposed(name) else tensor[s])", "tensor[s]"),),
    ),
    Target(
        "trawl-validation",
        f"{P}/harness_trawl/harness_trawl/validation.py",
        ("tests/test_trawl.py",),
        (
            M("highest loss chosen", "loss, rank = min(scored)", "loss, rank = max(scored)"),
            M("budget ignored", "if not target.fits(facts, assignment, ctx.dtype_bytes):", "if False:"),
            M(
                "ties to the larger",
                "loss, rank = min(scored)",
                "loss, rank = min(scored, key=lambda e: (e[0], -e[1]))",
            ),
        ),
    ),
    Target(
        "energy",
        f"{P}/harness_allocators/harness_allocators/energy.py",
        ("tests/test_allocators.py",),
        (
            M(
                "energy over error",
                "min(1.0, (total - error) / total)",
                "min(1.0, (total - error) / max(error, 1e-30))",
            ),
            M(
                "rank off by one",
                "bisect.bisect_left(curve, fraction), len(ranks) - 1",
                "bisect.bisect_left(curve, fraction) + 1, len(ranks) - 1",
            ),
            M("bisect right", "bisect.bisect_left(curve, fraction)", "bisect.bisect_right(curve, fraction)"),
        ),
    ),
    Target(
        "greedy",
        f"{P}/harness_allocators/harness_allocators/greedy.py",
        ("tests/test_allocators.py",),
        (
            M(
                "gain sign",
                "self.gains = [errors[0] - e for e in errors]",
                "self.gains = [e - errors[0] for e in errors]",
            ),
            M("ratio gain*cost", "else gain / cost", "else gain * cost"),
            M("budget strict", "if spent + extra <= limit:", "if spent + extra < limit:"),
            M(
                "hull keeps dents",
                "if (gains[b] - gains[a]) * (costs[i] - costs[a]) > (gains[i] - gains[a]) * (costs[b] - costs[a]):",
                "if True:",
            ),
        ),
    ),
    Target(
        "sensitivity",
        f"{P}/harness_allocators/harness_allocators/sensitivity.py",
        ("tests/test_allocators.py",),
        (
            M("candidate off by one", "key=fact.params) - 1", "key=fact.params) - 2"),
            M(
                "most harmful first",
                "entries.sort(key=lambda e: (e[0], e[1], -e[2]))",
                "entries.sort(key=lambda e: (-e[0], e[1], -e[2]))",
            ),
            M(
                "largest admitted rank",
                "ranks[g] = rank if ranks[g] is None else min(ranks[g], rank)",
                "ranks[g] = rank if ranks[g] is None else max(ranks[g], rank)",
            ),
            M(
                "no top-up",
                "before = threshold_assignment(entries, low - 1, len(facts))",
                "before = threshold_assignment(entries, low, len(facts))",
            ),
        ),
    ),
    Target(
        "welore",
        f"{P}/harness_allocators/harness_allocators/welore.py",
        ("tests/test_allocators.py",),
        (
            M(
                "normalised by max only",
                "return [(v - low) / (high - low) for v in values]",
                "return [v / high for v in values]",
            ),
            M("sigma^2 not sigma", "values += [math.sqrt(drop)] * (high - low)", "values += [drop] * (high - low)"),
            M(
                "bisect right",
                "dropped = bisect.bisect_left(self.sorted, tau)",
                "dropped = bisect.bisect_right(self.sorted, tau)",
            ),
            M("knob inverted", "tau = (1 - knob) * TAU_MAX", "tau = knob * TAU_MAX"),
        ),
    ),
    Target(
        "limits",
        f"{P}/harness_allocators/harness_allocators/limits.py",
        ("tests/test_allocators.py",),
        (
            M(
                "floor rounds down",
                "math.ceil(options.min_rank_fraction * full - EPS)",
                "math.floor(options.min_rank_fraction * full - EPS)",
            ),
            M(
                "ceiling rounds up",
                "math.floor(options.max_rank_fraction * full + EPS)",
                "math.ceil(options.max_rank_fraction * full + EPS)",
            ),
            M(
                "break-even allowed",
                "saving = bisect.bisect_left(inside, fact.dense_params, key=fact.params)",
                "saving = bisect.bisect_right(inside, fact.dense_params, key=fact.params)",
            ),
            M("largest allowed rank dense", "or rank > self.ranks[-1]:", "or rank >= self.ranks[-1]:"),
        ),
    ),
    Target(
        "uniform (budget.keep_fraction)",
        "harness/budget.py",
        ("tests/test_allocators.py", "tests/test_svd_surgery.py"),
        (
            M("keep >= 1 factors", "if keep >= 1:", "if keep > 1:"),
            M(
                "budget keep^2",
                "largest_rank_within(f, keep * f.dense_params)",
                "largest_rank_within(f, keep * keep * f.dense_params)",
            ),
        ),
    ),
    # the methods that landed beside issue 21 (basis sharing, svd-llm v2, sfsd as published)
    Target(
        "basis-sharing",
        f"{P}/harness_basis_sharing/harness_basis_sharing/decompose.py",
        ("tests/test_basis_sharing.py",),
        (
            M("basis without sigma", "basis = (s[:, None] * Qt)", "basis = (Qt)"),
            M("S^-1 not applied", "@ harness.lower_triangular_inverse(S).to(dtype)", "@ S.to(dtype)"),
            M("weights not whitened", "for w in weights]) @ S", "for w in weights])"),
        ),
    ),
    Target(
        "svd-llm-v2",
        f"{P}/harness_svdllm_v2/harness_svdllm_v2/decompose.py",
        ("tests/test_svdllm_v2.py",),
        (
            M("eigenvalues not square-rooted", "values.clamp_min(0).sqrt()", "values.clamp_min(0)"),
            M("eigenvectors ascending", "values, vectors = values.flip(0), vectors.flip(1)", "pass"),
            M("pinv transposed", "inverse_root[:, None] * vectors.T", "inverse_root[:, None] * vectors"),
        ),
    ),
    Target(
        "svd-llm-v2-allocator",
        f"{P}/harness_svdllm_v2/harness_svdllm_v2/allocate.py",
        ("tests/test_svdllm_v2.py",),
        (
            M("score ln not inverted", "return [1.0 / math.log(scale * x)", "return [math.log(scale * x)"),
            M("removed fraction not normalized", "removed * s * total / weighted", "removed * s"),
            M("no rescale below e", "scale = 1.0 if least >= math.e else math.e / least", "scale = 1.0"),
        ),
    ),
    Target(
        "sfsd",
        f"{P}/harness_sfsd/harness_sfsd/feature.py",
        ("tests/test_sfsd.py",),
        (
            M("centring sign", "S - tokens * torch.outer(mu, mu)", "S + tokens * torch.outer(mu, mu)"),
            M("eigenvectors ascending", "U = U.flip(1)  # descending eigenvalues", "U = U"),
            M("bias keeps the projected part", "bias = self.shift - U64 @ (U64.T @ self.shift)", "bias = self.shift"),
            M("bias not counted", "(m if self.compensate else 0)", "(0 if self.compensate else 0)"),
        ),
    ),
    Target(
        "surgical",
        f"{P}/harness_sfsd/harness_sfsd/surgical.py",
        ("tests/test_sfsd.py",),
        (
            M("tolerance strict", "if loss(trial) <= allowed:", "if loss(trial) < allowed - 1e-3:"),
            M("first layer to last", "for i in reversed(range(start, n)):", "for i in range(start, n):"),
            M(
                "candidates off by one",
                "FRACTIONS = tuple(0.1 + i * 0.1 for i in range(10))",
                "FRACTIONS = tuple(0.1 + i * 0.1 for i in range(9))",
            ),
        ),
    ),
    Target(
        "aa-svd",
        f"{P}/harness_aasvd/harness_aasvd/decompose.py",
        ("tests/test_aasvd.py",),
        (
            M("cross not transposed", "(W @ cross.to(", "(W @ cross.T.to("),
            M("L^-1 not transposed", "@ L_inv.T", "@ L_inv"),
            M("shift never seen", "return cross is gram or (", "return True or ("),
        ),
    ),
    Target(
        "zs-svd-scores",
        f"{P}/harness_zssvd/harness_zssvd/scores.py",
        ("tests/test_zssvd.py",),
        (
            M("right transform left out", "rows = rows @ right.to(torch.float64)", "rows = rows"),
            M("change sign", "return (-(s.to(torch.float64)", "return ((s.to(torch.float64)"),
            M("sigma not weighed", "(-(s.to(torch.float64) * sigma_grad", "(-(1.0 * sigma_grad"),
        ),
    ),
    Target(
        "zs-svd-select",
        f"{P}/harness_zssvd/harness_zssvd/select.py",
        ("tests/test_zssvd.py",),
        (
            M(
                "zero-sum rule inverted",
                "heads.pop(prefer_positive=total <= 0)",
                "heads.pop(prefer_positive=total > 0)",
            ),
            M("largest sigma first", "delta = scores[g][ranks[g]]", "delta = scores[g][0]"),
            M(
                "no revert above break-even",
                "return ranks[g] if harness.saves(facts[g], ranks[g]) else None",
                "return ranks[g]",
            ),
        ),
    ),
    Target(
        "l2-seq",
        "harness/run/calibration.py",
        ("tests/test_l2_seq.py",),
        (
            M("pooled over tokens", "norms = x.square().sum(-2).sqrt()", "norms = x.square().sum(-2)"),
            M(
                "mean over tokens",
                "cpu(self.l2_sum / max(self.sequences, 1))",
                "cpu(self.l2_sum / max(self.tokens, 1))",
            ),
        ),
    ),
]
RUNNER = "tests/test_runner_methods.py"


def drop_bytecode(path: Path) -> None:
    for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        pyc.unlink(missing_ok=True)


def run_tests(tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    """(verdict, seconds): caught where pytest exits non-zero (a failure, an error); a mutant that makes the
    tests run past ``timeout`` (a hang: CI would time out) is "caught (timeout)"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    markers = "not memory" if RUNNER in tests else "not slow and not memory"
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", markers, *tests]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "caught (timeout)", time.perf_counter() - started
    return ("caught" if proc.returncode != 0 else "MISSED"), time.perf_counter() - started


def mutate(target: Target, mutation: Mutation, tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    path = ROOT / target.path
    original = path.read_text()
    count = original.count(mutation.old)
    if count == 0:
        return "NOT APPLIED", 0.0
    try:
        path.write_text(original.replace(mutation.old, mutation.new, 1))
        drop_bytecode(path)
        verdict, seconds = run_tests(tests, timeout)
    finally:
        path.write_text(original)
        drop_bytecode(path)
    return verdict, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", help="module names to run (default: all)")
    parser.add_argument("--runner", action="store_true", help=f"also run {RUNNER} against every mutant")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per mutant before it counts as a hang")
    args = parser.parse_args(argv)
    rows, missed = [], 0
    for target in TARGETS:
        if args.only and target.name not in args.only:
            continue
        tests = (*target.tests, RUNNER) if args.runner else target.tests
        for mutation in target.mutations:
            verdict, seconds = mutate(target, mutation, tests, args.timeout)
            missed += not verdict.startswith("caught")
            rows.append((target.name, mutation.label, verdict, seconds))
            print(f"{target.name:32} {mutation.label:34} {verdict:12} {seconds:6.1f}s", flush=True)
    print()
    print("| module | mutation | result |")
    print("|---|---|---|")
    for name, label, verdict, _ in rows:
        print(f"| {name} | {label} | {verdict} |")
    print(f"\n{len(rows) - missed} of {len(rows)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
