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
``update = "lora"``: the ICLR version's sequential LoRA of U then V
(``harness_svdllm.lora.sequential_lora``), run per cell after surgery through
``Decomposer.after_surgery`` on the suite's calibration windows; the
factorization itself is step 1's whitening (the cell id carries ``update``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

import harness

__version__ = "0.1.0"

LORA_OPTIONS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_lr",
    "lora_epochs",
    "lora_batch_size",
    "lora_micro_batch_size",
    "lora_warmup_steps",
)
"""The LoRA stage's hyper-parameters: they apply to ``update = "lora"`` only."""


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
    "lora": whitening, then per cell the sequential LoRA fine-tune of U then V on the calibration windows
    (``lora_*`` below; the official repo's defaults)."""
    lora_r: int = field(default=8, metadata={"omit_default": True, "minimum": 1})
    """LoRA rank (the repo's README step 2: --lora_r 8)."""
    lora_alpha: float = field(default=16.0, metadata={"omit_default": True, "exclusive_minimum": 0})
    """The branch's scale is lora_alpha / lora_r (the repo's apply_lora: lora_alpha 16)."""
    lora_dropout: float = field(default=0.05, metadata={"omit_default": True, "minimum": 0, "exclusive_maximum": 1})
    """Dropout on the branch's input (apply_lora: lora_dropout 0.05)."""
    lora_lr: float = field(default=1e-4, metadata={"omit_default": True, "exclusive_minimum": 0})
    """AdamW learning rate (README step 2: 1e-4)."""
    lora_epochs: int = field(default=2, metadata={"omit_default": True, "minimum": 1})
    """Passes over the calibration windows per stage (README step 2: 2 epochs)."""
    lora_batch_size: int = field(default=64, metadata={"omit_default": True, "minimum": 1})
    """Windows per optimizer step (the repo's batch_size 64, by gradient accumulation)."""
    lora_micro_batch_size: int | None = field(default=None, metadata={"omit_default": True, "minimum": 1})
    """Windows per forward and backward; None: the suite's ``calibration.batch_size`` (what the planner counts;
    the repo's micro_batch_size is 4: the same optimizer steps, another memory peak)."""
    lora_warmup_steps: int = field(default=100, metadata={"omit_default": True, "minimum": 0})
    """Optimizer steps of linear warm-up, then linear decay to 0 (the repo's Trainer: warmup_steps 100)."""

    def __post_init__(self) -> None:
        if self.jitter_eps <= 0:
            raise ValueError(f"jitter_eps must be positive, got {self.jitter_eps}")
        changed = [f.name for f in fields(self) if f.name in LORA_OPTIONS and getattr(self, f.name) != f.default]
        if changed and self.update != "lora":
            raise ValueError(f"{', '.join(changed)}: apply to update = 'lora' only, got update = {self.update!r}")


class SVDLLM(harness.SingleMatrixDecomposer):
    name = "svd-llm"
    needs = frozenset({"gram", "gram_original"})
    """``gram_original`` feeds ``update = "closed-form"`` only (``needs_for``): under ``inputs = "original"``
    it is ``gram`` itself, under ``"propagated"`` one more (uncompressed) activation stream in the pass."""
    Options = SVDLLMOptions
    description = "SVD of W S with S the Cholesky factor of X^T X (truncation-aware whitening)"

    def tunes(self, options) -> bool:
        return options.update == "lora"

    def after_surgery(self, model, replaced_names, windows, options, ctx):
        """SVD-LLM's sequential LoRA (U, then V) of the cell's factored layers on the calibration windows."""
        from harness_svdllm.lora import tune_cell

        return tune_cell(model, replaced_names, windows, options, ctx)

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
