"""Block refinement (``Decomposer.refine_block``, a weight optimization) on the core's side: the refined
factors as a cell's factorization of their group, and the block with trainable replacements in place.

Under propagated inputs (``harness.run.propagated.run_propagated``) a refining method's block is
materialized at the cell's reference ranks, trained by its ``refine_block`` and the result fixed at that
rank: ``RefinedFactorization`` keeps what allocators read of the original (ranks, params, errors) and
materializes the refined factors at the refined rank only. That is the cell's own rank where its
allocator decides each group alone (``uniform`` with a per-matrix target, the only combination a suite
may pair with refinement: ``harness.suite``); any other rank is refused (ValueError naming the group).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from harness.factorization import Factorization, LowRank, Replacement


class RefinedFactorization(Factorization):
    """A group's factors after block refinement, at the one rank they were trained at.

    ``ranks``, ``params`` and ``error`` are the original factorization's (so that an allocator chooses as
    it did for the reference ranks; ``error`` is the original's objective, not the refined one's);
    ``materialize(rank)`` gives the refined ``LowRank`` replacements at ``rank`` and refuses any other rank.
    The factors are kept in host memory in the dtype they were trained in; ``info`` is the original's plus
    ``refined`` (the rank). Stored with ``keep = "disk"`` through the general encoding (``.pt``).
    """

    def __init__(self, base: Factorization, rank: int, replacements: dict[str, LowRank]) -> None:
        self.names, self.shapes = tuple(base.names), tuple(base.shapes)
        self._ranks = list(base.ranks)
        self._params = [base.params(r) for r in self._ranks]
        self._errors = [float(base.error(r)) for r in self._ranks]
        self.rank = int(rank)
        self.home = str(_device_of(replacements))
        self.factors = {n: _host(replacements[n]) for n in self.names}
        self.info = {**base.info, "refined": self.rank}

    @property
    def ranks(self) -> Sequence[int]:
        return self._ranks

    @property
    def stored_rank(self) -> int:
        return self.rank

    @property
    def nested(self) -> bool:
        return False

    def params(self, rank: int) -> int:
        return self._params[self._ranks.index(rank)]

    def error(self, rank: int) -> float:
        return self._errors[self._ranks.index(rank)]

    def materialize(self, rank: int) -> dict[str, Replacement]:
        if rank != self.rank:
            raise ValueError(
                f"{'+'.join(self.names)}: rank {rank} asked of factors refined at rank {self.rank} (block "
                f"refinement fixes each group at its reference rank; the cell's allocator chose another)"
            )
        device = torch.device(self.home)
        return {
            n: LowRank(f.A.to(device), f.B.to(device), None if f.bias is None else f.bias.to(device))
            for n, f in self.factors.items()
        }


def _device_of(replacements: dict[str, LowRank]) -> torch.device:
    return next(iter(replacements.values())).A.device if replacements else torch.device("cpu")


def _host(low: Any) -> LowRank:
    if not isinstance(low, LowRank):
        raise TypeError(f"block refinement returned a {type(low).__name__}, expected harness.LowRank")
    detach = lambda t: None if t is None else t.detach().to("cpu").clone()  # noqa: E731
    return LowRank(detach(low.A), detach(low.B), detach(low.bias))


def refined_groups(
    factorizations: list, indices: Sequence[int], ranks: Sequence[int | None], refined: dict[str, Any]
) -> dict[int, RefinedFactorization]:
    """The groups of ``indices`` (at ``ranks``) that the refinement covers (every member returned, as a
    ``LowRank`` of the same rank), as ``RefinedFactorization``s by index; dense groups stay as they are."""
    out = {}
    for index, rank in zip(indices, ranks, strict=True):
        fact = factorizations[index]
        if rank is None or not all(n in refined for n in fact.names):
            continue
        for name in fact.names:
            low = refined[name]
            if not isinstance(low, LowRank) or low.A.shape[1] != rank:
                got = type(low).__name__ if not isinstance(low, LowRank) else f"rank {low.A.shape[1]}"
                raise RuntimeError(f"block refinement: {name}: expected a LowRank of rank {rank}, got {got}")
        out[index] = RefinedFactorization(fact, rank, {n: refined[n] for n in fact.names})
    return out


@contextmanager
def swapped(model: nn.Module, replacements: dict[str, Replacement]) -> Iterator[dict[str, nn.Module]]:
    """``replacements`` in ``model`` (factored, on copies of their tensors: training changes no stored factor),
    the swapped-in modules by name; the originals back on exit. The originals' weights stay where they are."""
    from harness.surgery import replaced

    copies = {n: _copy(r) for n, r in replacements.items()}
    with replaced(model, copies, dense=False, offload=False):
        yield {n: model.get_submodule(n) for n in copies}


def _copy(replacement: Replacement) -> Replacement:
    if isinstance(replacement, LowRank):
        bias = None if replacement.bias is None else replacement.bias.detach().clone()
        return LowRank(replacement.A.detach().clone(), replacement.B.detach().clone(), bias)
    return replacement
