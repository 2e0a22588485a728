"""Calibration statistics of the decomposable Linear layers, and their disk cache.

``collect_stats`` makes one pass over the calibration windows, whatever the
``needs`` (``harness.STAT_KINDS``):

- ``gram``, ``abs_mean``, ``l2_seq``, ``out_cov``, ``out_mean``: forward hooks on each target
  Linear sum X^T X, |x|, x^2 (per input channel), each sequence's L2 norm per input channel
  (over its tokens, before the batch is flattened), Y^T Y and Y in float64, batch by batch,
  under ``torch.no_grad``. Layers fed the same tensor (q/k/v, gate/up) share
  one computation of the input sums. The forward stops once every target layer
  has seen its batch, so the LM head runs only where it is itself a target.
- ``gram_original``: on these (original) inputs it is ``gram``: collected and
  cached as ``gram``, served as the same tensor (``ORIGINAL_ALIASES``).
- ``fisher``: each window alone (micro-batch 1) goes forward with the LM loss
  (labels = the input ids) and backward; as each target weight's gradient G is
  accumulated, its squares are reduced on the spot to ``fisher_in`` = sum_i G_ij^2
  (n,) and ``fisher_out`` = sum_j G_ij^2 (m,) and the gradient is freed, so no
  full-size Fisher is ever held. The empirical Fisher is thus
  sum over windows s of (dL_s/dW)^2, L_s the mean token loss of window s.
  Only the target weights require grad during the pass; every parameter's
  ``requires_grad`` is restored afterwards. Forward statistics asked for at the
  same time are collected in that same pass.
- ``grad``: the same backward pass; each window's gradient is added (float32)
  to an m x n sum, divided by the window count at the end: the gradient of
  the calibration loss (mean over windows of their mean token loss).

Memory: one n x n (and m x m) float64 accumulator per layer and kind, on the
collection device; results are returned on the CPU.

This is the ``calibration.pipeline = "whole"`` path, and the one of every
``fisher`` method; ``harness.run.pipeline`` collects the same forward
statistics (bitwise) one decoder block at a time.

``load_or_collect`` caches the statistics under ``cache_dir/<sha256 of the key
and layer names>/<kind>.pt``, one file per kind, so that asking later for one
more kind collects only that kind.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.api import GRADIENT_KINDS, STAT_KINDS, LayerInfo, LayerStats
from harness.errors import HarnessError
from harness.store import atomic_write, canonical_json

FORWARD_KINDS = frozenset({"gram", "abs_mean", "l2_seq", "out_cov", "out_mean", "anchor_cross", "gram_original"})
INPUT_KINDS = frozenset({"gram", "abs_mean", "l2_seq", "anchor_cross"})
GRAM_KINDS = frozenset({"gram", "anchor_cross"})
"""Kinds whose sums need X^T X per batch (on original inputs ``anchor_cross`` is the Gram itself)."""
OUTPUT_KINDS = frozenset({"out_cov", "out_mean"})
CACHE_FORMAT = 1
KIND_FIELDS = {
    "gram": ("tokens", "gram", "sq_mean"),
    "abs_mean": ("tokens", "abs_mean", "sq_mean"),
    "l2_seq": ("tokens", "sequences", "l2_seq"),
    "out_cov": ("tokens", "out_cov"),
    "out_mean": ("tokens", "out_mean"),
    "fisher": ("fisher_in", "fisher_out"),
    "grad": ("grad",),
    "anchor_cross": ("tokens", "anchor_cross", "sq_mean"),
    "gram_original": ("tokens", "gram_original"),
}
"""LayerStats fields stored in each kind's cache file (``gram_original`` has none: it is ``gram``'s)."""
ORIGINAL_ALIASES = {"gram_original": "gram"}
"""On original inputs a kind that IS another kind's statistic: collected (and cached) as that kind, then
served under both names (the same tensor). Only propagated inputs make ``gram_original`` its own statistic
(``harness.run.propagated.run_propagated``)."""


def collected_kinds(needs: set[str] | frozenset[str]) -> frozenset[str]:
    """``needs`` with each alias replaced by the kind collected for it on original inputs."""
    return frozenset(ORIGINAL_ALIASES.get(kind, kind) for kind in needs)


def serve_aliases(stats: dict[str, LayerStats], needs: set[str] | frozenset[str]) -> dict[str, LayerStats]:
    """``stats`` (of original inputs) with each alias in ``needs`` set to its kind's tensor, in place."""
    for alias, kind in ORIGINAL_ALIASES.items():
        if alias in needs:
            for layer in stats.values():
                setattr(layer, alias, getattr(layer, kind))
    return stats


class _ForwardDone(Exception):
    """Raised by a hook once every target layer has seen the batch: the rest of the forward is not needed."""


def check_needs(needs: set[str] | frozenset[str]) -> frozenset[str]:
    unknown = set(needs) - set(STAT_KINDS)
    if unknown:
        raise HarnessError(f"unknown calibration statistics {sorted(unknown)}; known: {', '.join(STAT_KINDS)}")
    return frozenset(needs)


# ---------------------------------------------------------------- accumulation
class _LayerSums:
    """Running float64 sums of one Linear layer's statistics.

    ``anchor_cross``: unless ``paired`` (propagated inputs, fed by ``add_cross``) the inputs are the original
    ones, X' = X, and it is the Gram's accumulator itself (one n x n sum, the same tensor in both fields)."""

    def __init__(
        self, kinds: frozenset[str], shape: tuple[int, int], device: torch.device, paired: bool = False
    ) -> None:
        m, n = shape
        zeros = lambda *size: torch.zeros(*size, dtype=torch.float64, device=device)  # noqa: E731
        self.kinds = kinds
        self.tokens = 0
        cross = "anchor_cross" in kinds
        self.gram = zeros(n, n) if "gram" in kinds or (cross and not paired) else None
        self.cross = (zeros(n, n) if paired else self.gram) if cross else None
        self.abs_sum = zeros(n) if "abs_mean" in kinds else None
        self.sequences = 0
        self.l2_sum = zeros(n) if "l2_seq" in kinds else None
        self.sq_sum = zeros(n) if kinds & INPUT_KINDS else None
        self.out_cov = zeros(m, m) if "out_cov" in kinds else None
        self.out_sum = zeros(m) if "out_mean" in kinds else None
        self.fisher_in = zeros(n) if "fisher" in kinds else None
        self.fisher_out = zeros(m) if "fisher" in kinds else None
        # float32: the per-window gradients come in the model's dtype, and m x n float64 would double the model
        self.grad = torch.zeros(m, n, dtype=torch.float32, device=device) if "grad" in kinds else None
        self.grad_windows = 0

    # Sums computed where the layer ran are added on the accumulators' device: under device_map = "auto"
    # a block may run on another GPU than the collection device (``.to`` is a no-op on the same device).
    def add_input(self, sums: dict[str, Any]) -> None:
        self.tokens += sums["tokens"]
        self.sq_sum += sums["sq"].to(self.sq_sum.device)
        if self.gram is not None:
            self.gram += sums["gram"].to(self.gram.device)
        if self.abs_sum is not None:
            self.abs_sum += sums["abs"].to(self.abs_sum.device)
        if self.l2_sum is not None:
            self.sequences += sums["sequences"]
            self.l2_sum += sums["l2"].to(self.l2_sum.device)

    def add_cross(self, cross: torch.Tensor) -> None:
        """Add one batch's X^T X' (original inputs against propagated ones; ``paired`` sums only)."""
        self.cross += cross.to(self.cross.device)

    def add_output(self, y: torch.Tensor) -> None:
        if not self.kinds & INPUT_KINDS:
            self.tokens += y.shape[0]
        if self.out_cov is not None:
            self.out_cov += (y.T @ y).to(self.out_cov.device)
        if self.out_sum is not None:
            self.out_sum += y.sum(0).to(self.out_sum.device)

    def add_grad(self, grad: torch.Tensor) -> None:
        if self.fisher_in is not None:
            squared = grad.to(torch.float64).square()
            self.fisher_in += squared.sum(0).to(self.fisher_in.device)
            self.fisher_out += squared.sum(1).to(self.fisher_out.device)
        if self.grad is not None:
            self.grad += grad.to(self.grad.device, torch.float32)
            self.grad_windows += 1

    def finish(self) -> LayerStats:
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        tokens = max(self.tokens, 1)
        gram = cpu(self.gram)
        return LayerStats(
            tokens=self.tokens,
            gram=gram if "gram" in self.kinds else None,
            anchor_cross=gram if self.cross is not None and self.cross is self.gram else cpu(self.cross),
            abs_mean=None if self.abs_sum is None else cpu(self.abs_sum / tokens),
            sequences=self.sequences,
            l2_seq=None if self.l2_sum is None else cpu(self.l2_sum / max(self.sequences, 1)),
            sq_mean=None if self.sq_sum is None else cpu(self.sq_sum / tokens),
            out_cov=cpu(self.out_cov),
            out_mean=None if self.out_sum is None else cpu(self.out_sum / tokens),
            fisher_in=cpu(self.fisher_in),
            fisher_out=cpu(self.fisher_out),
            grad=None if self.grad is None else cpu(self.grad / max(self.grad_windows, 1)),
        )


def _input_sums(x: torch.Tensor, gram: bool, absolute: bool, l2: bool = False) -> dict[str, Any]:
    x = x.detach().to(torch.float64)
    # l2: each sequence's norm per channel (x is (..., seqlen, n): over its tokens), summed over sequences
    norms = x.square().sum(-2).sqrt().reshape(-1, x.shape[-1]) if l2 else None
    x = x.reshape(-1, x.shape[-1])
    sums: dict[str, Any] = {"tokens": x.shape[0], "sq": x.square().sum(0)}
    if norms is not None:
        sums["sequences"], sums["l2"] = norms.shape[0], norms.sum(0)
    if gram:
        sums["gram"] = x.T @ x
    if absolute:
        sums["abs"] = x.abs().sum(0)
    return sums


def _flags(kinds: frozenset[str]) -> tuple[bool, bool, bool]:
    """``_input_sums``'s (gram, absolute, l2) for ``kinds``."""
    return bool(kinds & GRAM_KINDS), "abs_mean" in kinds, "l2_seq" in kinds


class _Collector:
    """Forward hooks that feed each layer's ``_LayerSums``."""

    def __init__(self, sums: dict[str, _LayerSums], kinds: frozenset[str]) -> None:
        self.sums = sums
        self.kinds = kinds
        self.stop_early = False
        self.pending: set[str] = set()
        self._last: tuple[torch.Tensor, dict[str, Any]] | None = None

    def start_batch(self, stop_early: bool) -> None:
        self.stop_early = stop_early
        self.pending = set(self.sums)
        self._last = None

    def end_batch(self) -> None:
        self._last = None

    def hook(self, name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.record(name, inputs[0], output)

        return record

    def record(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        sums = self.sums[name]
        if self.kinds & INPUT_KINDS:
            # q/k/v (gate/up) receive the very same tensor object: compute its sums once
            if self._last is None or self._last[0] is not x:
                self._last = (x, _input_sums(x, *_flags(self.kinds)))
            sums.add_input(self._last[1])
        if self.kinds & OUTPUT_KINDS:
            sums.add_output(y.detach().reshape(-1, y.shape[-1]).to(torch.float64))
        self.pending.discard(name)
        if self.stop_early and not self.pending:
            raise _ForwardDone


@contextmanager
def _hooked(modules: dict[str, nn.Module], collector: _Collector) -> Iterator[None]:
    handles = [module.register_forward_hook(collector.hook(name)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


@contextmanager
def _fisher_grads(model: nn.Module, modules: dict[str, nn.Module], sums: dict[str, _LayerSums]) -> Iterator[None]:
    """Only the target weights require grad; each gradient is reduced into ``sums`` and freed at once."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for name, module in modules.items():
            weight = module.weight
            weight.requires_grad_(True)

            def reduce(param: torch.Tensor, layer: _LayerSums = sums[name]) -> None:
                layer.add_grad(param.grad)
                param.grad = None

            handles.append(weight.register_post_accumulate_grad_hook(reduce))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in modules.values():
            module.weight.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)


def _progress(chunks: Sequence[torch.Tensor], enabled: bool, what: str):
    from tqdm import tqdm

    return tqdm(chunks, desc=f"calibration ({what})", unit="batch", disable=not enabled)


def _forward_pass(model, chunks, collector, device, progress) -> None:
    with torch.no_grad():
        for chunk in _progress(chunks, progress, "forward"):
            collector.start_batch(stop_early=True)
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _ForwardDone:
                pass
            finally:
                collector.end_batch()


def _fisher_pass(model, windows, collector, device, progress, what: str = "fisher") -> None:
    for window in _progress(windows, progress, what):
        ids = window.to(device)
        collector.start_batch(stop_early=False)
        try:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        finally:
            collector.end_batch()


def collect_stats(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: torch.Tensor,
    needs: set[str],
    device: torch.device,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Calibration statistics of every layer in ``layers`` on ``batches`` (samples, seqlen) of token ids.

    One pass over the data: forward-only in batches of ``batch_size`` where
    ``needs`` has no ``fisher`` nor ``grad``, else forward and backward per window. See the
    module docstring for what each kind holds.
    """
    asked = check_needs(needs)
    needs = collected_kinds(asked)
    if not needs or not layers:
        return {}
    if batches.dim() != 2:
        raise ValueError(f"batches: expected (samples, seqlen) token ids, got shape {tuple(batches.shape)}")
    device = torch.device(device)
    modules = {layer.name: model.get_submodule(layer.name) for layer in layers}
    sums = {layer.name: _LayerSums(needs, tuple(layer.shape), device) for layer in layers}
    forward_kinds = needs & FORWARD_KINDS
    collector = _Collector({n: sums[n] for n in modules} if forward_kinds else {}, forward_kinds)
    hooks = _hooked(modules, collector) if forward_kinds else _no_hooks()
    with _eval_mode(model), hooks:
        if needs & GRADIENT_KINDS:
            with _fisher_grads(model, modules, sums):
                what = "+".join(sorted(needs & GRADIENT_KINDS))
                _fisher_pass(model, batches.split(1), collector, device, progress, what)
        else:
            _forward_pass(model, batches.split(max(1, batch_size)), collector, device, progress)
    return serve_aliases({name: layer.finish() for name, layer in sums.items()}, asked)


@contextmanager
def _no_hooks() -> Iterator[None]:
    yield


# ---------------------------------------------------------------- disk cache
def cache_digest(key: dict, layers: Sequence[LayerInfo]) -> str:
    """sha256 of the canonical JSON of ``key`` plus the layer names (and the cache format)."""
    identity = {"format": CACHE_FORMAT, "key": key, "layers": [layer.name for layer in layers]}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def _payload(stats: dict[str, LayerStats], kind: str) -> dict[str, dict[str, Any]]:
    return {name: {f: getattr(s, f) for f in KIND_FIELDS[kind]} for name, s in stats.items()}


def _load_kind(path: Path, names: Sequence[str], log: Callable[[str], None]) -> dict | None:
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file is a miss, not a failure
        log(f"calibration cache: ignoring unreadable {path} ({type(exc).__name__}: {exc})")
        return None
    if not isinstance(payload, dict) or set(payload) != set(names):
        log(f"calibration cache: ignoring {path} (its layers differ)")
        return None
    return payload


def _merge(names: Sequence[str], payloads: dict[str, dict]) -> dict[str, LayerStats]:
    merged = {}
    for name in names:
        stats = LayerStats()
        for kind in sorted(payloads):
            for field, value in payloads[kind][name].items():
                setattr(stats, field, value)
        merged[name] = stats
    return merged


def load_or_collect(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: torch.Tensor,
    needs: set[str],
    *,
    key: dict,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 4,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """``collect_stats`` behind a disk cache keyed by ``key`` (model and data fingerprints, ...) and the layers.

    Each kind lives in its own file; kinds already cached are loaded, the
    others collected in one pass and saved (atomically: temporary file, then
    ``os.replace``). ``gram_original`` is loaded (or collected) as ``gram``: on these inputs it is ``gram``.
    """
    asked = check_needs(needs)
    needs = collected_kinds(asked)
    if not needs or not layers:
        return {}
    names = [layer.name for layer in layers]
    folder = Path(cache_dir) / cache_digest(key, layers)
    payloads = {}
    for kind in sorted(needs):
        if (payload := _load_kind(folder / f"{kind}.pt", names, log)) is not None:
            payloads[kind] = payload
    if payloads:
        log(f"calibration cache hit: {', '.join(sorted(payloads))} from {folder}")
    missing = needs - payloads.keys()
    if missing:
        windows = f"{batches.shape[0]} windows of {batches.shape[1]} tokens"
        log(f"calibration: collecting {', '.join(sorted(missing))} on {windows}")
        fresh = collect_stats(model, layers, batches, set(missing), device, batch_size, progress)
        meta = {"format": CACHE_FORMAT, "key": key, "layers": names}
        atomic_write(folder / "key.json", lambda s: s.write(json.dumps(meta, indent=1, default=str).encode()))
        for kind in sorted(missing):
            payloads[kind] = _payload(fresh, kind)
            atomic_write(folder / f"{kind}.pt", lambda s, p=payloads[kind]: torch.save(p, s))
        log(f"calibration: saved {', '.join(sorted(missing))} to {folder}")
    return serve_aliases(_merge(names, payloads), asked)
