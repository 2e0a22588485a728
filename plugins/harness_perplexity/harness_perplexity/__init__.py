"""Perplexity on non-overlapping windows of a text source.

The source's texts are joined and tokenized into one stream, cut into
non-overlapping windows of ``seqlen`` tokens (the last partial window is
dropped) and scored with teacher forcing; perplexity = exp(total NLL / tokens
predicted). Offline default: BoolQ's Wikipedia passages, de-duplicated
(``wiki-passages``); online: ``wikitext2`` (test) or ``c4``. The scoring
(torch) is in ``harness_perplexity.scoring``, imported when a model is evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import harness

__version__ = "0.1.0"


@dataclass(frozen=True)
class PerplexityOptions:
    source: str = "wiki-passages"
    seqlen: int = field(default=256, metadata={"minimum": 2})
    """Tokens per window (the papers use 2048; SFSD 128)."""
    max_windows: int | None = field(default=32, metadata={"minimum": 1})
    """Cap on windows (the CLI's --limit caps it further); None: the whole stream."""
    batch_size: int = field(default=4, metadata={"minimum": 1})

    def __post_init__(self) -> None:
        if self.source not in harness.TEXT_SOURCES:
            raise ValueError(f"source: expected one of {', '.join(harness.TEXT_SOURCES)}, got {self.source!r}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen: expected at least 2 tokens, got {self.seqlen}")


class Perplexity(harness.Evaluator):
    name = "perplexity"
    Options = PerplexityOptions
    description = "perplexity on non-overlapping windows"

    def data_fingerprint(self, options: PerplexityOptions) -> dict[str, str]:
        """Source -> sha256 of its texts."""
        text = harness.text_source(options.source, "perplexity")
        return {options.source: harness.sha256_texts(text.texts)}

    def evaluate(self, model, tokenizer, options, ctx):
        from harness_perplexity.scoring import perplexity, windows

        text = harness.text_source(options.source, "perplexity")
        cap = min(v for v in (options.max_windows, ctx.limit, 10**12) if v is not None)
        batches = windows(harness.tokenize_stream(tokenizer, text.texts), options.seqlen, cap)
        if len(batches) == 0:
            raise harness.HarnessError(f"perplexity: source {options.source!r} is shorter than seqlen={options.seqlen}")
        ppl, tokens = perplexity(model, batches, ctx.device, options.batch_size)
        info = {
            "data": f"{text.note}, split {text.split}, {len(batches)} windows x {options.seqlen} tokens",
            "source": options.source,
            "split": text.split,
            "windows": len(batches),
            "seqlen": options.seqlen,
            "tokens": tokens,
        }
        return harness.EvalResult({"perplexity": ppl}, info, {"perplexity": False})


@harness.hookimpl
def register_evaluators(register):
    register(Perplexity())
