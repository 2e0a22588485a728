"""Rank allocators (energy, global-greedy, sensitivity, welore) on planted spectra.

Every allocator: meets params/bytes/bits/rank targets without exceeding them
and with less than one step of some group left over, never picks a rank that
saves nothing, respects floors and ceilings. global-greedy equals a brute-force
optimum where theory says it must; sensitivity caches its measurements; welore
recovers a planted τ.
"""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch
from harness_allocators import Energy, GlobalGreedy, Sensitivity, Uniform, WeLore, limits
from harness_allocators.welore import HeavyTail, solve_tau

import harness
from harness import budget, targets
from harness.options import parse_options
from harness.targets import Target

DTYPE_BYTES = 2


class Spectrum(harness.Factorization):
    """A factorization known only by its singular values (cheap at any size)."""

    def __init__(self, name: str, m: int, n: int, s: list[float]) -> None:
        self.names, self.shapes, self.info = (name,), ((m, n),), {}
        tail = [0.0] * (len(s) + 1)
        for i in range(len(s) - 1, -1, -1):
            tail[i] = tail[i + 1] + float(s[i]) ** 2
        self.tail = tail

    @property
    def ranks(self):
        return range(len(self.tail))

    def params(self, rank: int) -> int:
        m, n = self.shapes[0]
        return rank * (m + n)

    def error(self, rank: int) -> float:
        return self.tail[rank]

    def materialize(self, rank: int):
        raise NotImplementedError


def planted(name: str, m: int, n: int, s: torch.Tensor, seed: int) -> harness.SVDLikeFactorization:
    """SVDLikeFactorization of U diag(s) Vt with random orthonormal U (m, r), Vt (r, n), r = len(s)."""
    gen = torch.Generator().manual_seed(seed)
    r = len(s)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
    fact = harness.SVDLikeFactorization(name, U, s.double(), V.T)
    fact.planted = s.double()  # the spectrum, for answers computed without the code under test
    return fact


def hand_error(fact, rank: int | None) -> float:
    """The planted error at ``rank``: sum of the discarded s_i^2 (0 dense)."""
    return 0.0 if rank is None else float(fact.planted[rank:].square().sum())


def hand_choices(fact, min_rank: int = 1, low: float = 0.0, high: float = 1.0) -> list[int | None]:
    """Every rank an allocator may pick, written out: floor = max(min_rank, ceil(low r)), ceiling = floor(high r),
    r = full rank, and only ranks that save, k (m + n) < m n; then dense (None)."""
    (m, n), full = fact.shapes[0], fact.full_rank
    floor, ceiling = max(min_rank, math.ceil(low * full - 1e-9)), math.floor(high * full + 1e-9)
    return [k for k in range(floor, ceiling + 1) if k * (m + n) < m * n] + [None]


def model_facts(layers: int = 4, seed: int = 0) -> list[harness.Factorization]:
    """Llama-shaped groups (attention 32x32, GQA 16x32, MLP 48x32 / 32x48) with varied decays."""
    shapes = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32),
              "gate_proj": (48, 32), "up_proj": (48, 32), "down_proj": (32, 48)}  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    facts = []
    for layer in range(layers):
        for j, (kind, (m, n)) in enumerate(shapes.items()):
            r = min(m, n)
            decay = 0.03 + 0.25 * torch.rand(1, generator=gen).item()
            s = (1 + layer + j) * torch.exp(-decay * torch.arange(r, dtype=torch.float64))
            s = s + 0.01 * torch.rand(r, generator=gen, dtype=torch.float64)
            s = torch.sort(s, descending=True).values
            facts.append(planted(f"model.layers.{layer}.{kind}", m, n, s, seed=100 * layer + j))
    return facts


def fake_loss(facts, calls: list | None = None):
    """Calibration loss: each group's relative error, weighted by a per-group sensitivity."""
    weights = [1.0 + 3.0 * (i % 3) for i in range(len(facts))]

    def loss(assignment):
        if calls is not None:
            calls.append(tuple(assignment))
        return 2.0 + sum(
            w * hand_error(f, r) / max(hand_error(f, 0), 1e-12)
            for w, f, r in zip(weights, facts, assignment, strict=True)
        )

    return loss


def context(loss=None) -> harness.AllocationContext:
    return harness.AllocationContext(
        seed=0, layers={}, calibration_loss=loss, dtype_bytes=DTYPE_BYTES, log=lambda msg: None
    )


ASVD_FRACTIONS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
"""ASVD's candidates in its stable-rank mode (``calib_sensitivity_stable_rank``), so that targets below 0.4 are
reachable here; its perplexity mode (``calib_sensitivity_ppl``), which the plugin follows, measures
0.4 .. 0.9 (the plugin's default ``kept_fractions``), 0.1 .. 1.9 when compressing the KV cache."""


def allocate(allocator, facts, target, loss=None, **options):
    if isinstance(allocator, Sensitivity):
        options.setdefault("kept_fractions", ASVD_FRACTIONS)
        loss = loss or fake_loss(facts)
    opts = parse_options(allocator.Options, options, f"allocators.{allocator.name}")
    return allocator.allocate(facts, target, opts, context(loss))


def max_step(facts, target, options) -> float:
    """The largest cost of one step between consecutive choices of any group."""
    steps = [0.0]
    for fact in facts:
        costs = [target.cost(fact, r, DTYPE_BYTES) for r in hand_choices_of(fact, options)]
        steps += [b - a for a, b in itertools.pairwise(costs)]
    return max(steps)


def hand_choices_of(fact, options) -> list[int | None]:
    return hand_choices(fact, options.min_rank, options.min_rank_fraction, options.max_rank_fraction)


def check_assignment(facts, ranks, target, options=None) -> None:
    options = options or limits.LimitOptions()
    assert len(ranks) == len(facts)
    for fact, rank in zip(facts, ranks, strict=True):
        assert rank in hand_choices_of(fact, options), f"{fact.names}: rank {rank} is not allowed"
    cost = target.assignment_cost(facts, ranks, DTYPE_BYTES)
    limit = target.limit(facts, DTYPE_BYTES)
    assert cost <= limit
    assert target.fits(facts, ranks, DTYPE_BYTES)
    assert limit - cost <= max_step(facts, target, options) + 1e-6, "more than one step of budget left"


ALLOCATORS = [Energy(), GlobalGreedy(), Sensitivity(), WeLore()]
TARGETS = [Target("params", 0.3), Target("params", 0.55), Target("params", 0.8), Target("bits", 5.0),
           Target("bytes", 30_000.0), Target("rank", 0.4), Target("rank", 0.7)]  # fmt: skip


@pytest.fixture(scope="module")
def facts():
    return model_facts()


@pytest.mark.parametrize("allocator", ALLOCATORS, ids=lambda a: a.name)
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.label)
def test_meets_target_within_one_step(allocator, target, facts):
    ranks = allocate(allocator, facts, target)
    check_assignment(facts, ranks, target)
    assert any(r is not None for r in ranks)


@pytest.mark.parametrize("allocator", ALLOCATORS, ids=lambda a: a.name)
def test_floors_and_ceilings(allocator, facts):
    options = {"min_rank_fraction": 0.2, "max_rank_fraction": 0.4}
    for target in (Target("params", 0.5), Target("params", 0.75), Target("rank", 0.5)):
        ranks = allocate(allocator, facts, target, **options)
        opts = parse_options(limits.LimitOptions, options, "x")
        check_assignment(facts, ranks, target, opts)
        for fact, rank in zip(facts, ranks, strict=True):
            if rank is not None:
                assert math.ceil(0.2 * fact.full_rank) <= rank <= math.floor(0.4 * fact.full_rank)


@pytest.mark.parametrize("allocator", ALLOCATORS, ids=lambda a: a.name)
def test_target_below_the_floors_is_an_error(allocator, facts):
    with pytest.raises(harness.HarnessError, match=r"floors|kept_fractions"):
        allocate(allocator, facts, Target("params", 0.05), min_rank_fraction=0.3)


@pytest.mark.parametrize("allocator", ALLOCATORS, ids=lambda a: a.name)
def test_generic_allocators_take_every_registered_kind(allocator):
    assert allocator.target_kinds is None and all(allocator.takes(kind) for kind in targets.KINDS)
    assert allocator.takes("a-kind-registered-later")


def test_an_allocator_that_names_its_kinds_refuses_the_others(facts):
    from harness_bitstack.order import BitStackOrder

    assert BitStackOrder().takes("bytes") and not BitStackOrder().takes("rank")

    class ParamsOnly(Uniform):
        name = "params-only"
        target_kinds = ("params",)

    with pytest.raises(harness.HarnessError, match=r"allocator 'params-only' takes params targets, got a bits"):
        limits.check_kind(ParamsOnly(), Target("bits", 4.0))


@pytest.mark.parametrize("allocator", ALLOCATORS, ids=lambda a: a.name)
def test_options_declared_and_checked(allocator):
    opts = parse_options(allocator.Options, {"min_rank_fraction": 0.1, "max_rank_fraction": 0.9}, "a")
    assert (opts.min_rank_fraction, opts.max_rank_fraction) == (0.1, 0.9)
    with pytest.raises(harness.HarnessError, match="unknown option"):
        parse_options(allocator.Options, {"max_rank_fractoin": 0.5}, "a")
    with pytest.raises(harness.HarnessError, match="min_rank_fraction"):
        parse_options(allocator.Options, {"min_rank_fraction": 0.8, "max_rank_fraction": 0.5}, "a")
    with pytest.raises(AttributeError):
        opts.min_rank = 3  # frozen


def test_full_target_keeps_everything_dense(facts):
    for allocator in ALLOCATORS:
        assert allocate(allocator, facts, Target("params", 1.0)) == [None] * len(facts)


# ---------------------------------------------------------------- global greedy
def brute_force(facts, target, options) -> float:
    """Least total planted error over every combination of the allowed choices (written out) within budget."""
    limit = target.limit(facts, DTYPE_BYTES)
    best = math.inf
    for combo in itertools.product(*(hand_choices_of(f, options) for f in facts)):
        if target.assignment_cost(facts, combo, DTYPE_BYTES) <= limit:
            best = min(best, sum(hand_error(f, r) for f, r in zip(facts, combo, strict=True)))
    return best


def total_error(facts, ranks) -> float:
    return sum(hand_error(f, r) for f, r in zip(facts, ranks, strict=True))


def test_greedy_equals_brute_force_with_equal_steps():
    """Same shape, spectra decaying fast enough that every chain (dense jump included) is concave:
    then any budget is spent on the best unit steps and greedy is optimal at every budget."""
    decays = [0.5, 0.45, 0.4]
    facts = [
        planted(f"g{i}", 6, 6, scale * d ** torch.arange(6.0), seed=i)
        for i, (scale, d) in enumerate(zip([3.0, 2.0, 2.5], decays, strict=True))
    ]
    options = parse_options(GlobalGreedy.Options, {"min_rank": 0}, "a")
    for step in range(1, 21):
        target = Target("params", step / 20)
        ranks = GlobalGreedy().allocate(facts, target, options, context())
        assert total_error(facts, ranks) == pytest.approx(brute_force(facts, target, options), abs=1e-9), target
        check_assignment(facts, ranks, target, options)


def test_greedy_equals_brute_force_at_lagrangian_budgets():
    """Mixed shapes, random spectra, dense jumps that pay: at the budget of each group's
    argmin(error + λ cost) assignment, greedy must find that optimum."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(8, 4), (6, 6), (5, 7), (9, 3)]
    facts = [
        planted(f"g{i}", m, n, torch.sort(3 * torch.rand(min(m, n), generator=gen), descending=True).values, seed=i)
        for i, (m, n) in enumerate(shapes)
    ]
    options = parse_options(GlobalGreedy.Options, {"min_rank": 0}, "a")
    seen = set()
    for lam in torch.logspace(-4, 2, 120).tolist():
        lagrangian = [
            min(hand_choices_of(f, options), key=lambda r, f=f: hand_error(f, r) + lam * budget.group_params(f, r))
            for f in facts
        ]
        cost = budget.assignment_params(facts, lagrangian)
        if cost in seen:
            continue
        seen.add(cost)
        target = Target("params", cost / budget.dense_total(facts))
        optimum = brute_force(facts, target, options)
        assert total_error(facts, lagrangian) == pytest.approx(optimum, abs=1e-9)
        ranks = GlobalGreedy().allocate(facts, target, options, context())
        assert total_error(facts, ranks) == pytest.approx(optimum, abs=1e-9), (lam, ranks, lagrangian)
    assert len(seen) >= 8


def reference_greedy(facts, target) -> list[int | None]:
    """The greedy written naively: from every group's floor, repeatedly take, over all groups, the affordable
    step of best error reduction per unit of cost, a step going from a group's current choice to any later
    affordable one (the best of which is the next vertex of the upper hull over what is affordable; among
    equal slopes the farthest); ties between groups to the first. O(G K^2) per step: tiny cases only."""
    choices = [hand_choices(f) for f in facts]
    costs = [[target.cost(f, r, DTYPE_BYTES) for r in c] for f, c in zip(facts, choices, strict=True)]
    errors = [[hand_error(f, r) for r in c] for f, c in zip(facts, choices, strict=True)]
    at = [0] * len(facts)
    limit = target.limit(facts, DTYPE_BYTES)
    spent = sum(c[0] for c in costs)
    while True:
        best = None  # (slope, -group, j)
        for g, (c, e) in enumerate(zip(costs, errors, strict=True)):
            here = at[g]
            for j in range(here + 1, len(c)):
                if spent + c[j] - c[here] <= limit:
                    slope = (e[here] - e[j]) / (c[j] - c[here])
                    if best is None or (slope, -g, j) > best:
                        best = (slope, -g, j)
        if best is None:
            return [c[a] for c, a in zip(choices, at, strict=True)]
        _, minus_g, j = best
        g = -minus_g
        spent += costs[g][j] - costs[g][at[g]]
        at[g] = j


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_the_naive_greedy_at_every_budget(seed):
    """Mixed shapes, random spectra: at every byte budget from the floors to dense (bytes targets carry no
    tolerance, so a budget spent exactly tests "at most"), the allocator's choices are the naive greedy's."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 8), (16, 8), (8, 16), (12, 5)]
    facts = [
        planted(f"g{i}", m, n, torch.sort(4 * torch.rand(min(m, n), generator=gen) ** 2, descending=True).values, i)
        for i, (m, n) in enumerate(shapes)
    ]
    dense = budget.dense_total(facts)
    floor = sum(hand_choices(f)[0] * sum(f.shapes[0]) for f in facts)
    options = GlobalGreedy.Options()
    for spend in range(floor, dense + 1, 2):
        target = Target("bytes", float(DTYPE_BYTES * spend))
        assert target.limit(facts, DTYPE_BYTES) == DTYPE_BYTES * spend
        ranks = GlobalGreedy().allocate(facts, target, options, context())
        assert ranks == reference_greedy(facts, target), spend


def test_greedy_leaves_no_affordable_step(facts):
    target = Target("params", 0.5)
    ranks = allocate(GlobalGreedy(), facts, target)
    spare = target.limit(facts, DTYPE_BYTES) - budget.assignment_params(facts, ranks)
    for fact, rank in zip(facts, ranks, strict=True):
        if rank is not None:
            choices = hand_choices(fact)
            following = choices[choices.index(rank) + 1]
            assert budget.group_params(fact, following) - fact.params(rank) > spare


def test_greedy_keeps_a_group_dense_when_that_pays_and_counts_it():
    """A flat spectrum is worth keeping whole: its rank would pass break-even before the error falls."""
    flat = planted("flat", 8, 8, torch.full((8,), 5.0), seed=1)
    steep = planted("steep", 8, 8, 4 * 0.3 ** torch.arange(8.0), seed=2)
    target = Target("params", 0.75)
    ranks = GlobalGreedy().allocate([flat, steep], target, GlobalGreedy.Options(), context())
    assert ranks[0] is None
    assert ranks[1] is not None and budget.saves(steep, ranks[1])
    assert budget.assignment_params([flat, steep], ranks) <= 0.75 * 128


def test_greedy_prefers_error_per_parameter():
    big = planted("big", 16, 16, 10 * 0.7 ** torch.arange(16.0), seed=1)
    small = planted("small", 16, 16, 1 * 0.7 ** torch.arange(16.0), seed=2)
    ranks = GlobalGreedy().allocate([big, small], Target("params", 0.25), GlobalGreedy.Options(), context())
    assert ranks[0] > ranks[1]


def test_greedy_scales_to_200_matrices_of_rank_4096():
    gen = torch.Generator().manual_seed(0)
    facts = []
    for i in range(200):
        s = torch.sort(10 * torch.rand(4096, generator=gen, dtype=torch.float64) ** 3, descending=True).values
        facts.append(Spectrum(f"l{i}", 4096, 4096 if i % 2 else 11008, s.tolist()))
    target = Target("params", 0.6)
    started = time.perf_counter()
    ranks = GlobalGreedy().allocate(facts, target, GlobalGreedy.Options(), context())
    assert time.perf_counter() - started < 30
    assert target.fits(facts, ranks, DTYPE_BYTES)
    assert target.limit(facts, DTYPE_BYTES) - budget.assignment_params(facts, ranks) <= 4096 + 11008


# ---------------------------------------------------------------- energy
def test_energy_is_scale_free():
    """Energy fractions ignore scale: two copies of one spectrum at 10x apart get the same rank
    (greedy, on error per parameter, would give the loud one more)."""
    s = 0.8 ** torch.arange(16.0)
    facts = [planted("loud", 16, 16, 10 * s, seed=1), planted("quiet", 16, 16, s, seed=2)]
    ranks = Energy().allocate(facts, Target("params", 0.5), Energy.Options(), context())
    assert abs(ranks[0] - ranks[1]) <= 1
    greedy = GlobalGreedy().allocate(facts, Target("params", 0.5), GlobalGreedy.Options(), context())
    assert greedy[0] > greedy[1]


def test_energy_shares_one_fraction_worked_by_hand():
    """A: s = 4, 2, 1, .5, .25, .1, .05, .01 (energies s^2 / 21.3226: E(1) = .750, E(2) = .938);
    B: eight equal values, E(k) = k / 8. Six ranks of budget (16 x 16, 32 parameters a rank): the largest
    common fraction is f = 5/8 (A: 1, B: 5; at any f above it B needs 6, seven in all), and the budget is
    spent exactly, so nothing is topped up: [1, 5] (greedy, on error per parameter, would favour A)."""
    a = planted("a", 16, 16, torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.01]), seed=0)
    b = planted("b", 16, 16, torch.ones(8), seed=1)
    target = Target("params", 6 * 32 / 512)
    assert Energy().allocate([a, b], target, Energy.Options(), context()) == [1, 5]
    assert GlobalGreedy().allocate([a, b], target, GlobalGreedy.Options(), context())[0] > 1


def test_energy_rank_is_the_smallest_rank_keeping_at_least_the_fraction():
    """Energies 16, 4, 1, 0.25 of 21.25: E = 0, .753, .941, .988, 1. A fraction equal to E(k) is kept by k."""
    from harness_allocators.energy import energy_curve, energy_rank

    fact = planted("g", 8, 8, torch.tensor([4.0, 2.0, 1.0, 0.5]), seed=0)
    ranks, curve = energy_curve(fact)
    assert curve == pytest.approx([0.0, 16 / 21.25, 20 / 21.25, 21 / 21.25, 1.0])
    for k in range(1, 5):
        assert energy_rank(ranks, curve, curve[k]) == k
        assert energy_rank(ranks, curve, curve[k] - 1e-9) == k
    assert energy_rank(ranks, curve, curve[2] + 1e-9) == 3


# ---------------------------------------------------------------- sensitivity
def test_sensitivity_needs_calibration(facts):
    with pytest.raises(harness.HarnessError, match="calibration"):
        Sensitivity().allocate(facts, Target("params", 0.5), Sensitivity.Options(), context())


def test_sensitivity_caches_measurements_across_targets(facts):
    allocator, calls = Sensitivity(), []
    loss = fake_loss(facts, calls)
    first = allocate(allocator, facts, Target("params", 0.5), loss=loss)
    measured = len(calls)
    assert measured == 9 * len(facts)  # one call per group and kept fraction
    assert all(sum(r is not None for r in call) == 1 for call in calls)  # one group truncated at a time
    second = allocate(allocator, facts, Target("params", 0.7), loss=loss)
    allocate(allocator, facts, Target("bits", 6.0), loss=loss)
    assert len(calls) == measured
    assert budget.assignment_params(facts, second) > budget.assignment_params(facts, first)
    allocate(allocator, facts, Target("params", 0.5), loss=loss, kept_fractions=[0.5, 0.8])
    assert len(calls) == measured + 2 * len(facts)  # other candidate ranks: measured anew
    others = model_facts(seed=0)  # equal values, other objects
    allocate(allocator, others, Target("params", 0.5), loss=fake_loss(others, calls))
    assert len(calls) == measured + 11 * len(facts)


def test_sensitivity_target_below_its_fractions_is_an_error(facts):
    with pytest.raises(harness.HarnessError, match="add smaller kept_fractions"):
        Sensitivity().allocate(facts, Target("params", 0.3), Sensitivity.Options(), context(fake_loss(facts)))


def test_sensitivity_spares_the_sensitive_groups(facts):
    ranks = allocate(Sensitivity(), facts, Target("params", 0.5))
    fractions = {0: [], 2: []}
    for i, (fact, rank) in enumerate(zip(facts, ranks, strict=True)):
        if i % 3 in fractions:
            fractions[i % 3].append(budget.group_params(fact, rank) / fact.dense_params)
    assert sum(fractions[2]) / len(fractions[2]) > sum(fractions[0]) / len(fractions[0])


def hand_sensitivity(facts, target, fractions, loss) -> list[int | None]:
    """ASVD's sensitivity rule written out: candidates k = floor(p m n / (m + n)) per kept fraction p; the loss
    with one group at one candidate; entries sorted by (loss, group, -rank); the fewest leading entries
    whose assignment (each group at its smallest admitted rank, dense if none) fits; then the group of the
    last entry admitted raised to the largest allowed rank below its rank without that entry that fits."""
    candidates = [
        sorted({max(1, math.floor(p * f.dense_params / sum(f.shapes[0]))) for p in fractions}, reverse=True)
        for f in facts
    ]
    entries = []
    for g, ranks in enumerate(candidates):
        for rank in ranks:
            one = [None] * len(facts)
            one[g] = rank
            entries.append((loss(one), g, -rank))
    entries.sort()

    def admitted(count):
        ranks = [None] * len(facts)
        for _, g, minus in entries[:count]:
            ranks[g] = -minus if ranks[g] is None else min(ranks[g], -minus)
        return ranks

    limit = target.limit(facts, DTYPE_BYTES)
    count = next(j for j in range(len(entries) + 1) if target.assignment_cost(facts, admitted(j), DTYPE_BYTES) <= limit)
    ranks, before = admitted(count), admitted(count - 1)
    g = entries[count - 1][1]
    above = [r for r in hand_choices(facts[g]) if r is None or r > ranks[g]]
    below = above if before[g] is None else [r for r in above if r is not None and r <= before[g]]
    for choice in reversed(below):
        trial = [*ranks[:g], choice, *ranks[g + 1 :]]
        if target.assignment_cost(facts, trial, DTYPE_BYTES) <= limit:
            return trial
    return ranks


@pytest.mark.parametrize("keep", [0.45, 0.6, 0.8])
def test_sensitivity_is_one_loss_threshold_then_one_group_topped_up(facts, keep):
    target = Target("params", keep)
    ranks = allocate(Sensitivity(), facts, target)
    assert ranks == hand_sensitivity(facts, target, ASVD_FRACTIONS, fake_loss(facts))


# ---------------------------------------------------------------- welore
def test_welore_singular_values_from_error_curve():
    s = torch.tensor([5.0, 3.0, 2.0, 1.0])
    tail = HeavyTail(planted("g", 6, 4, s, seed=0), 0.0)
    assert tail.sorted == pytest.approx(sorted([1.0, 0.5, 0.25, 0.0]))
    # directions with s_hat < tau are dropped: one at exactly tau is kept
    assert [tail.rank(tau) for tau in (0.25, 0.26, 0.5, 1.0)] == [3, 2, 2, 1]
    assert tail.rank(0.0) is None  # nothing dropped: the group stays dense


def hand_welore(fact, tau: float) -> int | None:
    """WeLore's rule on the planted spectrum: s_hat = (s - min) / (max - min); drop s_hat < tau; a group
    losing nothing stays dense, the rest keep at least rank 1 and stay dense where that saves nothing."""
    s = fact.planted
    hat = (s - s.min()) / (s.max() - s.min())
    dropped = int((hat < tau).sum())
    rank = max(1, len(s) - dropped)
    (m, n) = fact.shapes[0]
    return None if dropped == 0 or rank * (m + n) >= m * n else rank


def test_welore_solves_a_planted_tau(facts):
    """WeLore's rule at τ = 0.175 (its LLaMA-2-7B setting for 50%): ask for the rank it keeps, get τ back."""
    tau0 = 0.175
    rule = [hand_welore(f, tau0) for f in facts]
    kept = budget.kept_rank_fraction(facts, rule)
    assert 0.05 < kept < 0.95
    ranks, tau = solve_tau(facts, Target("rank", kept), WeLore.Options(), DTYPE_BYTES)
    assert ranks == rule
    assert tau <= tau0 + 1e-9
    assert [hand_welore(f, tau) for f in facts] == rule


def test_welore_rank_target_is_rank_removed(facts):
    ranks = allocate(WeLore(), facts, Target("rank", 0.5))
    assert 1 - budget.kept_rank_fraction(facts, ranks) >= 0.5 - 1e-9
    check_assignment(facts, ranks, Target("rank", 0.5))


def test_welore_min_removed_fraction_keeps_light_groups_dense(facts):
    ranks = allocate(WeLore(), facts, Target("params", 0.8), min_removed_fraction=0.6)
    for fact, rank in zip(facts, ranks, strict=True):
        assert rank is None or 1 - rank / fact.full_rank > 0.6
