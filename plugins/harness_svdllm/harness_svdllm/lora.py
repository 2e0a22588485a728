"""SVD-LLM's parameter update with sequential low-rank approximation (ICLR 2025 version): LoRA on U, then on V.

The compressed model holds each decomposed Linear as two factors, y = A (B x)
(``harness.FactoredLinear``-like modules with parameters ``A`` (m, k), the
paper's U Σ^1/2, and ``B`` (k, n), Σ^1/2 Vᵀ). Stage "U": every A gets a LoRA
branch ΔA = (α/r) P_up P_down (P_up zero-initialised, so training starts at
the compressed model), trained with the LM loss on calibration windows while
everything else is frozen, then merged into A; stage "V": the same for every
B. (The repo: ``utils/LoRA.py`` with peft on the ``*_u_proj`` modules, then on
the ``*_v_proj`` ones; README step 2: lora_r 8, 2 epochs, lr 1e-4, batch 64,
AdamW, 100 warm-up steps, LoRA α 16 and dropout 0.05 from its ``apply_lora``.)

A run does this per cell with ``update = "lora"``: ``tune_cell`` is what
``SVDLLM.after_surgery`` calls on the cell's compressed model (the core's
per-cell hook after surgery) with the suite's calibration windows. Adapters
train in float32 whatever the model's dtype; the merged factors are cast back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    """LoRA rank (README step 2: --lora_r 8)."""
    alpha: float = 16.0
    """Scale α: the branch is (α / r) P_up P_down (apply_lora's lora_alpha)."""
    dropout: float = 0.05
    """Dropout on the branch's input (apply_lora's lora_dropout)."""
    lr: float = 1e-4
    """AdamW learning rate (README step 2)."""
    epochs: int = 2
    """Passes over the windows per stage (README step 2)."""
    batch_size: int = 64
    """Windows per optimizer step (gradient accumulation over ``micro_batch_size``)."""
    micro_batch_size: int = 4
    warmup_steps: int = 100
    """Linear warm-up, then linear decay to 0 (transformers.Trainer's default schedule)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1 or self.epochs < 1 or self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("r, epochs, batch_size and micro_batch_size must be positive")


class _Adapted(nn.Module):
    """A factored layer with a LoRA branch on one factor: ``"A"`` (the paper's U) or ``"B"`` (V)."""

    def __init__(self, base: nn.Module, factor: str, config: LoRAConfig) -> None:
        super().__init__()
        self.base, self.factor, self.scale = base, factor, config.alpha / config.r
        rows, cols = getattr(base, factor).shape
        device = base.A.device
        self.down = nn.Parameter(torch.empty(config.r, cols, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # peft's lora_A init
        self.up = nn.Parameter(torch.zeros(rows, config.r, dtype=torch.float32, device=device))
        self.drop = nn.Dropout(config.dropout)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.linear(self.drop(x.to(torch.float32)), self.down)
        return (self.scale * nn.functional.linear(h, self.up)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        h = nn.functional.linear(x, base.B)
        if self.factor == "B":
            h = h + self.branch(x)
        y = nn.functional.linear(h, base.A, base.bias)
        return y + self.branch(h) if self.factor == "A" else y

    @torch.no_grad()
    def merge(self) -> None:
        weight = getattr(self.base, self.factor)
        weight += (self.scale * self.up @ self.down).to(weight.dtype)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


@contextmanager
def _adapters(model: nn.Module, names: list[str], factor: str, config: LoRAConfig) -> Iterator[list[_Adapted]]:
    """Each named factored layer wrapped with a LoRA branch on ``factor``; the layers return on exit."""
    adapted = []
    try:
        for name in names:
            parent, child = _parent(model, name)
            wrapper = _Adapted(getattr(parent, child), factor, config)
            setattr(parent, child, wrapper)
            adapted.append((parent, child, wrapper))
        yield [w for _, _, w in adapted]
    finally:
        for parent, child, wrapper in adapted:
            setattr(parent, child, wrapper.base)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _schedule(config: LoRAConfig, total: int) -> Callable[[int], float]:
    warm = max(config.warmup_steps, 0)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def _train_stage(
    model: nn.Module, adapters: list[_Adapted], windows: torch.Tensor, config: LoRAConfig, log
) -> list[float]:
    params = [p for a in adapters for p in (a.down, a.up)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    accumulate = max(1, config.batch_size // config.micro_batch_size)
    per_epoch = math.ceil(windows.shape[0] / config.micro_batch_size)
    total = math.ceil(per_epoch / accumulate) * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, total))
    generator = torch.Generator().manual_seed(config.seed)
    device = next(iter(params)).device
    losses: list[float] = []
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(windows.shape[0], generator=generator)
        chunks = windows[order].split(config.micro_batch_size)
        for i, chunk in enumerate(chunks):
            ids = chunk.to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / accumulate).backward()
            losses.append(float(loss.detach()))
            if (i + 1) % accumulate == 0 or i == len(chunks) - 1:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        mean = sum(losses[-len(chunks) :]) / len(chunks)
        log(f"svd-llm lora: epoch {epoch + 1}/{config.epochs}: mean loss {mean:.4f}")
    return losses


def sequential_lora(
    model: nn.Module,
    names: list[str] | Mapping[str, nn.Module],
    windows: torch.Tensor,
    config: LoRAConfig = LoRAConfig(),
    log: Callable[[str], None] = print,
) -> dict[str, list[float]]:
    """Fine-tune the factored layers ``names`` of ``model`` in place: LoRA on every A (U), merged, then on
    every B (V), merged; ``windows`` (samples, seqlen) token ids, the LM loss (labels = inputs). Returns
    each stage's per-micro-batch losses ({"U": [...], "V": [...]}). Every other parameter stays as it was
    (frozen during training); ``requires_grad`` flags and the train/eval mode are restored."""
    names = list(names)
    for name in names:
        module = model.get_submodule(name)
        if not all(isinstance(getattr(module, f, None), torch.Tensor) for f in ("A", "B")):
            raise TypeError(f"{name}: expected a factored layer with A and B, got {type(module).__name__}")
    losses = {}
    with torch.random.fork_rng(devices=[]), _frozen(model):
        torch.manual_seed(config.seed)  # the adapters' initialisation and dropout, not the caller's stream
        for stage, factor in (("U", "A"), ("V", "B")):
            with _adapters(model, names, factor, config) as adapters:
                losses[stage] = _train_stage(model, adapters, windows, config, log)
                for adapter in adapters:
                    adapter.merge()
    return losses


# ---------------------------------------------------------------- one cell of a run
def config_of(options, ctx) -> LoRAConfig:
    """The ``LoRAConfig`` of svd-llm's ``lora_*`` options; the micro-batch defaults to the calibration batch."""
    micro = options.lora_micro_batch_size or ctx.batch_size
    return LoRAConfig(
        r=options.lora_r,
        alpha=options.lora_alpha,
        dropout=options.lora_dropout,
        lr=options.lora_lr,
        epochs=options.lora_epochs,
        batch_size=max(options.lora_batch_size, micro),
        micro_batch_size=micro,
        warmup_steps=options.lora_warmup_steps,
        seed=ctx.seed,
    )


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, batch: int, device) -> float:
    """The mean over windows of their mean token loss, in eval mode (no dropout): before and after tuning."""
    training = model.training
    model.eval()
    try:
        total = 0.0
        for chunk in windows.split(batch):
            ids = chunk.to(device)
            total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * chunk.shape[0]
        return total / windows.shape[0]
    finally:
        model.train(training)


def tune_cell(model: nn.Module, names, windows: torch.Tensor, options, ctx) -> dict:
    """``sequential_lora`` on one cell's factored layers with the options' config; the record's summary:
    the calibration loss before and after (eval mode), optimizer steps and each stage's first and last loss."""
    config = config_of(options, ctx)
    before = mean_loss(model, windows, config.micro_batch_size, ctx.device)
    losses = sequential_lora(model, list(names), windows, config, log=ctx.log)
    after = mean_loss(model, windows, config.micro_batch_size, ctx.device)
    accumulate = max(1, config.batch_size // config.micro_batch_size)
    per_epoch = math.ceil(math.ceil(windows.shape[0] / config.micro_batch_size) / accumulate)
    ctx.log(f"svd-llm lora: calibration loss {before:.4f} -> {after:.4f}")
    return {
        "update": "lora",
        "stages": {k: {"first_loss": v[0], "last_loss": v[-1], "micro_batches": len(v)} for k, v in losses.items()},
        "steps": 2 * per_epoch * config.epochs,
        "windows": int(windows.shape[0]),
        "micro_batch_size": config.micro_batch_size,
        "calibration_loss_before": before,
        "calibration_loss_after": after,
    }
