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
``ALPHA`` (no significant difference from its model's baseline) with ``MARK``.
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
        }
    return out


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
        "in leaderboard.json and report.html)"
    )
