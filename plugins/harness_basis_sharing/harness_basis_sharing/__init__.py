"""Basis Sharing: cross-layer parameter sharing (J. Wang et al., ICLR 2025; TUDa-HWAI/Basis_Sharing).

The same matrix kind of ``group_size`` consecutive layers shares one basis:
stack the group's weights, whiten them with the Cholesky factor S of the
pooled input Gram G = sum_i X_i^T X_i, take one SVD,

.. math:: [W_1; \\dots; W_L] S = P \\Sigma Q^\\top, \\qquad
          W_i \\approx C_i B, \\quad C_i = P_{i,k}, \\quad B = \\Sigma_k Q_k^\\top S^{-1}

and keep the shared basis B (k, n) and each layer's coefficients C_i (m, k):
k n + L k m parameters at rank k. Kinds not shared (``o_proj``,
``down_proj`` by default, as in the official LLaMA config) are groups of one:
SVD-LLM's whitened SVD. The math is in ``decompose``, the factorization and
the replacement layers in ``factorization``, the grouping in ``grouping``;
importing this module loads no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import harness
from harness_basis_sharing.grouping import DEFAULT_SHARE, share_groups

__version__ = "0.1.0"
__all__ = ["DEFAULT_SHARE", "BasisSharing", "BasisSharingOptions"]


@dataclass(frozen=True)
class BasisSharingOptions:
    group_size: int = field(default=2, metadata={"minimum": 1})
    """Consecutive layers sharing one basis (the official configs: 2); 1 is SVD-LLM for every kind."""
    share: list[str] | None = field(default=None, metadata={"unique": True, "model": "kinds"})
    """Kinds that share a basis across layers; None: the paper's (q, k, v, gate, up; OPT's fc1 for up).
    Every other kind is private (one layer per group)."""
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the SVD (the Cholesky is always float64; factors are cast to the model's dtype)."""
    jitter_eps: float = field(default=7e-6, metadata={"exclusive_minimum": 0})
    """Added on top of -lambda_min to the pooled Gram's diagonal where Cholesky fails (the official
    code's 7e-6; SVD-LLM's is 1e-6)."""

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size: expected an integer of at least 1, got {self.group_size}")
        if self.share is not None and any(not kind or kind != kind.strip() for kind in self.share):
            raise ValueError(f"share: expected a list of layer kinds such as 'q_proj', got {self.share!r}")
        if self.share is not None and len(set(self.share)) != len(self.share):
            raise ValueError(f"share: expected each kind once, got {self.share!r}")
        if not self.jitter_eps > 0:
            raise ValueError(f"jitter_eps: expected a positive number, got {self.jitter_eps}")


class BasisSharing(harness.Decomposer):
    name = "basis-sharing"
    needs = frozenset({"gram"})
    Options = BasisSharingOptions
    description = "one whitened SVD basis shared by a kind over consecutive layers, per-layer coefficients"

    def groups(self, layers, options):
        return share_groups(layers, options.group_size, options.share)

    def factorize(self, weights, stats, options, ctx):
        from harness_basis_sharing.factorization import factorize_group

        return factorize_group(weights, stats, options, ctx)


@harness.hookimpl
def register_decomposers(register):
    register(BasisSharing())
