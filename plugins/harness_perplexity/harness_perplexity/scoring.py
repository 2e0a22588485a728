"""Perplexity of token windows (imports torch: loaded by ``Perplexity.evaluate`` only)."""

from __future__ import annotations

import math

import torch


def windows(stream: torch.Tensor, seqlen: int, cap: int | None) -> torch.Tensor:
    count = len(stream) // seqlen
    if cap is not None:
        count = min(count, cap)
    return stream[: count * seqlen].view(count, seqlen)


@torch.no_grad()
def perplexity(model, batches: torch.Tensor, device, batch_size: int) -> tuple[float, int]:
    """(perplexity, tokens predicted) of ``batches`` (windows, seqlen)."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(batches), batch_size):
        chunk = batches[start : start + batch_size].to(device)
        logits = model(input_ids=chunk).logits[:, :-1].float()
        targets = chunk[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens), total_tokens
