"""AA-SVD's block-level refinement (a weight optimization): a compressed block's factors trained so that
its outputs on the shifted inputs X' match the original block's outputs on the original inputs X.

As the official code's ``finetune_layer`` (github.com/atulkumarin/AA-SVD, ``llama_adapter.py``, called with
``num_steps=25, lr=1e-4, loss_type='mse'`` by ``compress.py``): mean squared error, AdamW (weight decay 0.01),
``epochs`` passes over the calibration batches in order, one step per batch, the learning rate rising
linearly from 0 over the first 10 % of the steps, then a cosine from lr down to 0.1 lr, gradients clipped
to norm 1.0. Deviation: only the factors A and B of the block's replaced layers are trained (the official
code trains every parameter of the block, norms and the factors' bias included); the loss is computed in
float32 (the official code: in the model's dtype).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import harness


def lr_factor(step: int, total: int, warmup: int, final: float) -> float:
    """The learning rate's multiplier at optimizer step ``step`` (0-based) of ``total``: ``step / warmup``
    during the warm-up, then ``final + (1 - final) (1 + cos(pi p)) / 2`` with p the progress after it."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def block_mse(forward, inputs: Sequence[Any], targets: Sequence[Any]) -> float:
    """The refinement's objective: the mean over batches of each batch's mean squared output error."""
    import torch

    with torch.no_grad():
        losses = [float(torch.nn.functional.mse_loss(forward(x).float(), t.float())) for x, t in zip(inputs, targets)]
    return sum(losses) / max(1, len(losses))


def refine_block(replacements: dict, inputs: Sequence[Any], targets: Sequence[Any], options, ctx) -> dict:
    """``replacements`` (``harness.LowRank``, the block's layers at their ranks) trained on ``inputs`` to
    ``targets`` (see the module docstring); the trained factors as ``harness.LowRank``s of the same ranks."""
    import torch

    lows = {n: r for n, r in replacements.items() if isinstance(r, harness.LowRank)}
    if not lows or not inputs:
        return replacements
    with ctx.swapped(lows) as modules:
        params = [p for name in lows for p in (modules[name].A, modules[name].B)]
        for p in params:
            p.requires_grad_(True)
        before = block_mse(ctx.forward, inputs, targets)
        optimizer = torch.optim.AdamW(params, lr=options.refine_lr, weight_decay=options.refine_weight_decay)
        total = options.refine_epochs * len(inputs)
        warmup = int(options.refine_warmup * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, warmup, options.refine_final_lr)
        )
        for _ in range(options.refine_epochs):
            for batch, target in zip(inputs, targets, strict=True):
                loss = torch.nn.functional.mse_loss(ctx.forward(batch).float(), target.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_norm=options.refine_clip)
                optimizer.step()
                schedule.step()
        after = block_mse(ctx.forward, inputs, targets)
        out = {
            name: harness.LowRank(modules[name].A.detach().clone(), modules[name].B.detach().clone(), low.bias)
            for name, low in lows.items()
        }
    prefix = next(iter(lows)).rsplit(".", 2)[0]
    ctx.log(f"aa-svd: refined {prefix}: block output mse {before:.4g} -> {after:.4g} ({total} steps)")
    return {**replacements, **out}
