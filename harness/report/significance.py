"""Paired significance of an accuracy difference between two cells on the same examples.

lm-eval's per-example correctness is kept per cell
(``evaluations[label]["tasks"][task]["per_example"]``: doc_id -> {acc: 0/1, ...}).
Two cells evaluated on the same documents give paired outcomes, and two
tests of the difference of their accuracies:

- McNemar's exact test: under H0 the discordant pairs (right in one cell,
  wrong in the other) split 50/50; the two-sided p-value is
  ``min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])``, computed exactly.
- A paired bootstrap: resample the documents with replacement (seeded) and
  take the percentile interval of the mean difference (drawn as multinomial
  counts of the distinct per-document differences: the same distribution).

The leaderboard marks a compressed cell whose McNemar p-value is at least
``ALPHA`` (no significant difference from its model's baseline) with ``MARK``,
but only where the examples could have shown a difference of ``RESOLVE``
(5 points of accuracy): ``resolvable_difference`` is the smallest difference
the test detects with ``POWER`` (80 %) at the observed discordance, from the
normal approximation of McNemar's test (Connor 1987, Biometrics 43:207),
never below what the exact test can reach at all (``d`` one-sided discordant
pairs with ``2 * 0.5**d < alpha``, i.e. ``d / n``). Where it exceeds
``RESOLVE``, "no significant difference" says nothing, and the mark is
``FEW`` (too few examples) instead; the footer says what the examples resolve.

Calibration draws (``[calibration] draws = K``) are not more examples: each
draw's cell is the same examples evaluated on a model calibrated on other
windows. ``against_baseline`` tests every draw's record on its own; the
leaderboard keeps those tests per draw in its row (``draws.tests_over_draws``)
and marks the row ``≈`` only where no draw differs significantly.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from harness.run.record import CellRecord

ALPHA = 0.05
MARK = "≈"
FEW = "(few)"
POWER = 0.8
RESOLVE = 0.05
RESAMPLES = 1000
SEED = 0
TEST = "McNemar's exact test"


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided exact McNemar test of paired 0/1 outcomes ``a`` and ``b`` (same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    if n == 0:
        return {"only_a": 0, "only_b": 0, "p_value": 1.0}
    tail = sum(comb(n, k) for k in range(min(only_a, only_b) + 1))
    p_value = min(1.0, 2 * tail / 2**n)  # exact integer arithmetic, then one division
    return {"only_a": only_a, "only_b": only_b, "p_value": p_value}


def resolvable_difference(n: int, discordant: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest accuracy difference McNemar's test detects with ``power`` on ``n`` paired examples of
    which ``discordant`` disagree (two-sided ``alpha``); 1.0 where no difference of any size would do.

    Connor's approximation: ``n = (z_a sqrt(p) + z_b sqrt(p - d^2))^2 / d^2`` for discordance ``p``
    and difference ``d``. A difference ``d`` needs a discordance of at least ``d`` (every discordant
    pair one way), so ``p = max(observed, d)``; the right side then falls as ``d`` grows, and the
    smallest ``d`` with ``n`` enough is found by bisection. Never below the exact test's own floor.
    """
    from statistics import NormalDist

    if n <= 0:
        return 1.0
    floor = 1
    while 2 * 0.5**floor >= alpha:  # one-sided discordant pairs the exact test needs to reject at all
        floor += 1
    exact = min(1.0, floor / n)
    observed = discordant / n
    z_a, z_b = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)

    def needed(d: float) -> float:
        p = max(observed, d)
        return (z_a * p**0.5 + z_b * max(p - d * d, 0.0) ** 0.5) ** 2 / (d * d)

    if needed(1.0) > n:
        return 1.0
    low, high = 1e-9, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if needed(mid) > n else (low, mid)
    return max(high, exact)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED, level: float = 0.95
) -> dict[str, float]:
    """Mean of ``b - a`` and its percentile bootstrap interval over resampled documents."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if diff.size == 0:
        return {"diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan")}
    # Resampling n documents with replacement draws each distinct difference (-1, 0, 1 for 0/1
    # outcomes) a multinomial number of times: drawing those counts is the same bootstrap
    # distribution at a cost that does not grow with n.
    values, counts = np.unique(diff, return_counts=True)
    rng = np.random.default_rng(seed)
    means = rng.multinomial(diff.size, counts / diff.size, size=resamples) @ values / diff.size
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    # two-sided: how often the resampled difference lands on the other side of 0
    p_value = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return {"diff": float(diff.mean()), "ci_low": float(low), "ci_high": float(high), "p_value": p_value}


def paired_outcomes(base: dict[str, dict], other: dict[str, dict], metric: str) -> tuple[list[float], list[float]]:
    """0/1 outcomes of ``metric`` on the documents both cells have, in doc_id order."""
    docs = sorted(set(base) & set(other), key=lambda d: (len(d), d))
    docs = [d for d in docs if metric in base[d] and metric in other[d]]
    return [float(base[d][metric]) for d in docs], [float(other[d][metric]) for d in docs]


def per_example_metrics(result: CellRecord) -> dict[str, dict[str, dict]]:
    """Metric name in ``result.metrics`` -> (task's per-example outcomes, its per-example key)."""
    found: dict[str, dict] = {}
    metrics = result.metrics
    for label, info in result.evaluations.items():
        if not isinstance(info, dict):
            continue
        for task, task_info in (info.get("tasks") or {}).items():
            per_example = (task_info or {}).get("per_example") if isinstance(task_info, dict) else None
            if not per_example:
                continue
            keys = {k for outcome in per_example.values() for k in outcome}
            keys = {k for k in keys if all(_binary(o.get(k, 0)) for o in per_example.values())}
            for key in keys:
                for name in (f"{task}/{key}", f"{label}/{task}/{key}"):
                    if name in metrics:
                        found[name] = {"per_example": per_example, "key": key}
    return found


def _binary(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1))


def compare(
    base: CellRecord, other: dict, alpha: float = ALPHA, resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, dict[str, Any]]:
    """Per accuracy metric both cells have per-example outcomes for: both tests and ``significant``."""
    base_metrics, other_metrics = per_example_metrics(base), per_example_metrics(other)
    out = {}
    for name in sorted(set(base_metrics) & set(other_metrics)):
        key = base_metrics[name]["key"]
        a, b = paired_outcomes(base_metrics[name]["per_example"], other_metrics[name]["per_example"], key)
        if not a:
            continue
        test = mcnemar_exact(a, b)
        boot = paired_bootstrap(a, b, resamples, seed)
        out[name] = {
            "n": len(a),
            "diff": boot["diff"],
            "ci_low": boot["ci_low"],
            "ci_high": boot["ci_high"],
            "bootstrap_p": boot["p_value"],
            "mcnemar_p": test["p_value"],
            "only_baseline": test["only_a"],
            "only_cell": test["only_b"],
            "significant": test["p_value"] < alpha,
            "resolvable": resolvable_difference(len(a), test["only_a"] + test["only_b"], alpha),
        }
    return out


def mark_of(test: dict[str, Any], resolve: float = RESOLVE) -> str | None:
    """``MARK`` (no significant difference), ``FEW`` (nor could there have been one of ``resolve``), None."""
    if test["significant"]:
        return None
    return FEW if test.get("resolvable", 0.0) > resolve else MARK


def against_baseline(results: Sequence[dict], alpha: float = ALPHA) -> list[dict[str, dict[str, Any]]]:
    """For each result (in order): ``compare`` with its model's baseline ({} for baselines and failures)."""
    baselines = {r.model_id: r for r in results if r.is_baseline and r.ok and r.model}
    out = []
    for result in results:
        base = baselines.get(result.model_id)
        if base is None or result is base or result.is_baseline or not result.ok:
            out.append({})
            continue
        out.append(compare(base, result, alpha))
    return out


def footer_line(alpha: float = ALPHA) -> str:
    return (
        f"{MARK}: accuracy not significantly different from the model's baseline on the same examples "
        f"({TEST}, two-sided, α = {alpha:g}; paired bootstrap 95% intervals, {RESAMPLES} seeded resamples, "
        f"in leaderboard.json and report.html); {FEW}: not significant, and too few examples to show a "
        f"difference of {RESOLVE * 100:g} points ({POWER:.0%} power)"
    )


def resolution_lines(tests: Sequence[dict[str, dict[str, Any]]]) -> list[str]:
    """Per metric: the examples compared and the smallest difference they resolve (the range over cells)."""
    spans: dict[str, list[tuple[int, float]]] = {}
    for row in tests:
        for name, test in row.items():
            spans.setdefault(name, []).append((test["n"], test.get("resolvable", float("nan"))))
    lines = []
    for name, values in sorted(spans.items()):
        counts = sorted({n for n, _ in values})
        low, high = min(r for _, r in values), max(r for _, r in values)
        span = f"{low * 100:.1f}" if abs(high - low) < 5e-4 else f"{low * 100:.1f}-{high * 100:.1f}"
        shown = "/".join(str(c) for c in counts)
        lines.append(f"{name}: n = {shown} paired examples resolve differences of {span} points or more")
    return lines
