"""The profilers' options (imported by ``harness validate``: no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LatencyOptions:
    prompt_len: int = field(default=128, metadata={"minimum": 1})
    """Prompt length in tokens."""
    new_tokens: int = field(default=32, metadata={"minimum": 2})
    """Tokens generated per decode measurement (at least 2)."""
    batch_sizes: list[int] = field(default_factory=lambda: [1], metadata={"minimum": 1, "min_items": 1})
    """Batch sizes measured; each gets its own metrics (suffix ``_b<size>``)."""
    warmup: int = field(default=2, metadata={"minimum": 0})
    """Untimed runs before each measurement."""
    min_runs: int = field(default=5, metadata={"minimum": 1})
    """Timed runs at least..."""
    min_seconds: float = field(default=1.0, metadata={"minimum": 0})
    """...and at least this long (both must be met)."""
    max_runs: int = field(default=1000, metadata={"minimum": 1})
    """Upper bound on timed runs per measurement."""
    threads: int | None = field(default=None, metadata={"minimum": 1})
    """torch CPU threads while measuring (default: unchanged). On a shared, loaded CPU, 1 avoids
    intra-op threads stalling at barriers (measured: a 30x slowdown of small kernels)."""

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len: expected at least 1, got {self.prompt_len}")
        if self.new_tokens < 2:
            raise ValueError(
                f"new_tokens: expected at least 2 (decode needs tokens after the first), got {self.new_tokens}"
            )
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes: expected positive integers, got {self.batch_sizes}")
        if self.min_runs < 1 or self.max_runs < self.min_runs:
            raise ValueError(
                f"min_runs/max_runs: expected 1 <= min_runs <= max_runs, got {self.min_runs}/{self.max_runs}"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected at least 1, got {self.threads}")
        if self.warmup < 0 or self.min_seconds < 0:
            raise ValueError("warmup and min_seconds: expected non-negative values")


@dataclass(frozen=True)
class MemoryOptions:
    prompt_len: int = field(default=128, metadata={"minimum": 1})
    """Prompt length in tokens."""
    batch_size: int = field(default=1, metadata={"minimum": 1})
    new_tokens: int = field(default=0, metadata={"minimum": 0})
    """0: one forward pass of the prompt; more: greedy generation of that many tokens (KV cache included)."""

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.batch_size < 1 or self.new_tokens < 0:
            raise ValueError(
                "prompt_len, batch_size: expected at least 1, new_tokens: at least 0; "
                f"got {self.prompt_len}, {self.batch_size}, {self.new_tokens}"
            )


@dataclass(frozen=True)
class EnergyOptions:
    prompt_len: int = field(default=128, metadata={"minimum": 1})
    new_tokens: int = field(default=64, metadata={"minimum": 1})
    batch_size: int = field(default=1, metadata={"minimum": 1})
    warmup: int = field(default=1, metadata={"minimum": 0})
    min_seconds: float = field(default=2.0, metadata={"minimum": 0})
    """Measure for at least this long (the counter's resolution is tens of ms)."""
    min_runs: int = field(default=3, metadata={"minimum": 1})

    def __post_init__(self) -> None:
        if min(self.prompt_len, self.new_tokens, self.batch_size, self.min_runs) < 1:
            raise ValueError("prompt_len, new_tokens, batch_size, min_runs: expected at least 1")
        if self.min_seconds < 0 or self.warmup < 0:
            raise ValueError("min_seconds and warmup: expected non-negative values")
