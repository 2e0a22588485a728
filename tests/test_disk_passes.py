"""``[factorization] keep = "disk"`` and the layer-sequential pass: what a pass computes and where it keeps it.

- Propagated inputs: each cell's factorizations are written group by group as
  the pass factorizes them (``<method>@<cell id>``) and kept memory-mapped, so
  a pass serving many cells holds none of their factors in memory; the numbers
  are those of ``keep = "memory"``; a rerun whose cell results are lost (a
  crash after the pass) reads them back and runs no pass.
- Original inputs: a method whose files a run wrote is left out of the one
  pass that serves the suite's methods (it is read back), so the pass computes
  only the methods that need it.
"""

from __future__ import annotations

import shutil

from harness.factorfiles import MappedLowRank
from harness.run import pipeline, propagated
from harness.run.runner import RunOptions, run_suite
from harness.suite import load_suite
from tests.conftest import write_suite
from tests.test_pipeline_propagated import suite_text


def run(tmp_path, model_dir, keep: str, inputs: str, methods: list[str], targets: str = "[{rank = 0.5}, 0.6]"):
    text = suite_text(model_dir, inputs, targets, methods=methods) + f'\n[factorization]\nkeep = "{keep}"\n'
    suite = load_suite(write_suite(tmp_path / f"{keep}-{inputs}.toml", text))
    results = tmp_path / f"results-{keep}"
    return run_suite(suite, RunOptions(results, limit=2, progress=False)), results / suite.name


def numbers(result) -> dict:
    return {r.cell_id: (r.status, r.metrics, r.ranks) for r in result.results}


def test_propagated_cells_are_written_per_group_and_read_back_without_a_pass(tmp_path, tiny_model_dir, monkeypatch):
    kept, streams = [], []
    real = propagated.run_propagated

    def spy(model, layers, batches, jobs, **kwargs):
        streams.append(len(jobs))
        real(model, layers, batches, jobs, **kwargs)
        kept.extend(f for job in jobs for f in job.factorizations)

    monkeypatch.setattr(propagated, "run_propagated", spy)
    memory, _ = run(tmp_path, tiny_model_dir, "memory", "propagated", ["svd-llm"])
    assert streams == [2] and not any(isinstance(f, MappedLowRank) for f in kept)
    kept.clear()
    disk, root = run(tmp_path, tiny_model_dir, "disk", "propagated", ["svd-llm"])
    assert streams == [2, 2]
    assert kept and all(isinstance(f, MappedLowRank) for f in kept)  # written as factorized, memory-mapped
    assert numbers(disk) == numbers(memory) and not disk.failed
    folders = sorted(p.name for p in (root / "factors").glob("*/svd-llm@*"))
    cells = [r for r in disk.results if r.method]
    assert folders == sorted(f"svd-llm@{r.cell_id[:16]}" for r in cells)
    assert all(len(list((root / "factors").glob(f"*/{name}/group-*.safetensors"))) == 14 for name in folders)

    for record in cells:  # a crash after the pass, before the cells were saved
        (root / "cells" / f"{record.cell_id}.json").unlink()
    again, _ = run(tmp_path, tiny_model_dir, "disk", "propagated", ["svd-llm"])
    assert streams == [2, 2], "the cells' files are read back: no pass"
    assert again.computed == 2 and numbers(again) == numbers(disk)


def test_a_method_with_stored_files_is_left_out_of_the_pass(tmp_path, tiny_model_dir, monkeypatch):
    passes = []
    real = pipeline.run_blocks

    def spy(model, layers, batches, jobs, **kwargs):
        passes.append(sorted(job.label for job in jobs))
        return real(model, layers, batches, jobs, **kwargs)

    monkeypatch.setattr(pipeline, "run_blocks", spy)
    first, root = run(tmp_path, tiny_model_dir, "disk", "original", ["svd-llm", "asvd"], "[0.6]")
    assert passes == [["asvd", "svd-llm"]] and not first.failed
    for record in first.results:
        if record.method:
            (root / "cells" / f"{record.cell_id}.json").unlink()
    shutil.rmtree(next((root / "factors").glob("*/svd-llm")))  # the first method asked: its pass is the one
    second, _ = run(tmp_path, tiny_model_dir, "disk", "original", ["svd-llm", "asvd"], "[0.6]")
    assert passes == [["asvd", "svd-llm"], ["svd-llm"]], "asvd's files are read back, not recomputed"
    assert second.computed == 2 and numbers(second) == numbers(first)
