"""First-order loss scores of whitened singular values (ZS-SVD, Section 3 of the paper).

With G_x = X^T X = L L^T (lower Cholesky factor L) and the SVD of the
whitened weight W L = U diag(sigma) V^T, the weight is

.. math:: W = \\sum_i \\sigma_i\\, u_i v_i^\\top L^{-1},
          \\qquad \\frac{\\partial \\mathcal L}{\\partial \\sigma_i}
          = \\langle \\nabla_W \\mathcal L,\\; u_i v_i^\\top L^{-1} \\rangle
          = u_i^\\top (\\nabla_W \\mathcal L)\\, L^{-\\top} v_i ,

so every score comes from the one accumulated weight gradient (the ``grad``
statistic): no backward per singular value. Setting sigma_i to zero changes
the loss by, to first order, Delta L_i = -sigma_i dL/dsigma_i (signed: a
removal can be predicted to lower the loss). The formula holds for any
right transform T^-1 folded into B (``right``): it is the pairing of the
gradient with the rank-one term that sigma_i scales. Delta L_i does not
depend on the scale of L (sigma scales with it, the gradient against it).
"""

from __future__ import annotations

import torch


def sigma_gradients(U: torch.Tensor, Vt: torch.Tensor, right: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
    """dL/dsigma_i = u_i^T G R^T v_i for W = U diag(sigma) Vt R, as a (r,) float64 vector.

    ``U`` (m, r), ``Vt`` (r, n), ``right`` R (n, n) or None (identity),
    ``grad`` G = dL/dW (m, n). Computed as the row sums of (U^T G) * (Vt R),
    never forming an r x r matrix.
    """
    G = grad.to(U.device, torch.float64)
    left = U.to(torch.float64).T @ G  # (r, n)
    rows = Vt.to(torch.float64)
    if right is not None:
        rows = rows @ right.to(torch.float64)
    return (left * rows).sum(1)


def predicted_changes(s: torch.Tensor, sigma_grad: torch.Tensor) -> list[float]:
    """Delta L_i = -sigma_i dL/dsigma_i per component, largest singular value first (plain floats)."""
    return (-(s.to(torch.float64) * sigma_grad.to(torch.float64))).tolist()
