"""SVD-LLM: truncation-aware data whitening (Wang et al., ICLR 2025; AIoT-MLSys-Lab/SVD-LLM).

With G = X^T X the Gram of the layer's calibration inputs and S its lower
Cholesky factor (G = S S^T), take the SVD W S = U diag(s) V^T; at rank k,
A = U_k diag(s_k)^1/2 and B = diag(s_k)^1/2 V_k^T S^-1. Since
||(W - AB) X^T||_F^2 = ||(W - AB) S||_F^2, truncating the smallest s_i is
optimal for the layer's output:

.. math:: \\min_{\\operatorname{rank}(AB) \\le k} \\|(W - AB) X^\\top\\|_F^2 = \\sum_{i>k} s_i^2

Where G is singular the Cholesky gets jitter on its diagonal (``jitter``:
the harness's guarded rule or the repo's exact one); the objective is then
that of G + jitter I, and the jitter is recorded in ``Factorization.info``.
One SVD serves every rank.

``update = "closed-form"``: the paper's v1 step 2 (the repo's ``--step 2``): the
right factor whitened on ``gram_original`` (the uncompressed model's inputs X),
the left factor re-fitted by least squares on ``gram`` (the compressed model's
inputs X' under ``[calibration] inputs = "propagated"``). Under ``"original"``
the two Grams are one and the update is the identity (README): whitening.
``update = "direct"``: the repo's update-only mode (``--step 3``): the plain
SVD's right factor, the least-squares left factor on ``gram``.
``update = "lora"`` is refused at suite load: the ICLR version's LoRA stage
fine-tunes the compressed model per cell (``harness_svdllm.lora`` has the loop;
the core has no per-cell hook to run it, README).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import harness

__version__ = "0.1.0"

LORA_REFUSAL = (
    "update = 'lora' is not offered: SVD-LLM's LoRA stage fine-tunes each cell's compressed model (U, then V, "
    "through the whole model with the LM loss; harness_svdllm.lora.sequential_lora), and the core has no per-cell "
    "hook after surgery to run it: a decomposer receives one layer's weight and statistics before any rank is chosen"
)


@dataclass(frozen=True)
class SVDLLMOptions:
    dtype: Literal["float32", "float64"] = "float64"
    """Precision of the SVD (the Cholesky is always float64; factors are cast to the model's dtype)."""
    jitter_eps: float = field(default=1e-6, metadata={"exclusive_minimum": 0})
    """Added on top of -lambda_min to the Gram's diagonal where Cholesky fails (SVD-LLM's 1e-6,
    ``harness.CHOLESKY_EPS``; written out here so that reading the options needs no torch)."""
    jitter: Literal["harness", "repo"] = field(default="harness", metadata={"omit_default": True})
    """Where Cholesky fails: "harness" adds max(-lambda_min, 0) + eps and grows it tenfold while it still
    fails; "repo" adds -lambda_min + eps once, as the official code (a second failure fails the layer)."""
    update: Literal["none", "closed-form", "direct", "lora"] = field(default="none", metadata={"omit_default": True})
    """"none": whitening alone (step 1). "closed-form": whitening on the uncompressed model's inputs, then the
    least-squares left factor on the cell's (propagated) inputs (v1 step 2). "direct": the plain SVD's right
    factor and the least-squares left factor on the cell's inputs (the repo's update-only mode, step 3).
    "lora": refused (``LORA_REFUSAL``)."""

    def __post_init__(self) -> None:
        if self.jitter_eps <= 0:
            raise ValueError(f"jitter_eps must be positive, got {self.jitter_eps}")
        if self.update == "lora":
            raise ValueError(LORA_REFUSAL)


class SVDLLM(harness.SingleMatrixDecomposer):
    name = "svd-llm"
    needs = frozenset({"gram", "gram_original"})
    """``gram_original`` feeds ``update = "closed-form"`` only (``needs_for``): under ``inputs = "original"``
    it is ``gram`` itself, under ``"propagated"`` one more (uncompressed) activation stream in the pass."""
    Options = SVDLLMOptions
    description = "SVD of W S with S the Cholesky factor of X^T X (truncation-aware whitening)"

    def needs_for(self, options) -> frozenset[str]:
        return self.needs if options.update == "closed-form" else frozenset({"gram"})

    def factorize_matrix(self, name, weight, stats, options, ctx):
        if options.update == "direct":
            return _direct(name, weight, stats, options)
        if options.update == "closed-form" and not _one_gram(stats):
            return _closed_form(name, weight, stats, options, ctx)
        if options.update == "closed-form":  # one Gram (original inputs: gram_original IS gram)
            ctx.log(f"svd-llm: {name}: the update on the whitening's own Gram is the identity: whitening alone")
        return _whitening(name, weight, stats, options, ctx)


def _one_gram(stats) -> bool:
    """True where the cell has one Gram: ``gram_original`` absent or ``gram``'s very tensor (original inputs)."""
    return stats.gram_original is None or stats.gram_original is stats.gram


def _whitening(name, weight, stats, options, ctx) -> harness.SVDLikeFactorization:
    """Step 1: the SVD of W S, S the Cholesky factor of ``gram``."""
    from harness_svdllm.decompose import whitened_svd

    dtype = harness.float_dtype(options.dtype)
    U, s, Vt, S_inv, jitter = whitened_svd(
        weight, stats.gram, eps=options.jitter_eps, dtype=dtype, jitter=options.jitter
    )
    if jitter:
        ctx.log(f"svd-llm: {name}: Gram not positive definite, added {jitter:.3g} to its diagonal")
    info = {"jitter": jitter, "tokens": stats.tokens}
    return harness.SVDLikeFactorization(name, U, s, Vt, right=S_inv, out_dtype=weight.dtype, info=info)


def _closed_form(name, weight, stats, options, ctx) -> harness.SVDLikeFactorization:
    """v1 step 2 at every rank (nested, one Cholesky of B G' B^T): B the whitening's right factor on
    ``gram_original``, A the least squares on ``gram``; ``error(k)`` is the output error on the cell's inputs."""
    from harness_svdllm.decompose import orthogonalized_update, svd_like, whitened_right

    dtype = harness.float_dtype(options.dtype)
    original = stats.gram_original.to(weight.device)
    B, jitter = whitened_right(weight, original, eps=options.jitter_eps, jitter=options.jitter, dtype=dtype)
    if jitter:
        ctx.log(f"svd-llm: {name}: original Gram not positive definite, added {jitter:.3g} to its diagonal")
    Q, C, update_jitter = orthogonalized_update(weight, B, stats.gram.to(weight.device))
    U, s, Vt = (t.to(dtype) for t in svd_like(Q, C))
    info = {"update": "closed-form", "jitter": jitter, "update_jitter": update_jitter, "tokens": stats.tokens}
    return harness.SVDLikeFactorization(name, U, s, Vt, out_dtype=weight.dtype, info=info)


def _direct(name, weight, stats, options) -> harness.SVDLikeFactorization:
    """The plain SVD's right factor with the closed-form left factor at every rank (nested, one Cholesky of
    B G B^T); ``error(k)`` is the output error ||(W - A_k B_k) X^T||^2 on the cell's inputs."""
    from harness_svdllm.decompose import orthogonalized_update, plain_right, svd_like

    dtype = harness.float_dtype(options.dtype)
    gram = stats.gram.to(weight.device)
    Q, C, jitter = orthogonalized_update(weight, plain_right(weight, dtype), gram)
    U, s, Vt = (t.to(dtype) for t in svd_like(Q, C))
    info = {"update": "direct", "update_jitter": jitter, "tokens": stats.tokens}
    return harness.SVDLikeFactorization(name, U, s, Vt, out_dtype=weight.dtype, info=info)


@harness.hookimpl
def register_decomposers(register):
    register(SVDLLM())
