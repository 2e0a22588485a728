"""``harness run SUITE --executor ray``: every cell a Ray task, results in the same store and trackers.

The driver (this process) is the sequential ``SuiteRunner`` with the model
work moved to Ray tasks (``harness.ray.tasks``): per model, one task plans
the cells; the cells already in the store are reused as in a sequential
run; calibration statistics (one task) and each method's factorizations (one
task per method) are computed once and shared through the results store
(one memory-mapped file per group, ``harness.factorfiles``: a cell reads only
the groups and ranks it materializes);
then one task per pending cell computes it with the sequential runner's code
and writes its result. The driver collects the results as they come, calls
the lifecycle hooks and trackers (MLflow) and writes the leaderboard and
report, as a sequential run does; the numbers are the same.

A task whose worker dies (crash, kill, lost node) is retried up to
``--retries`` times by Ray; after that its cell is recorded as failed with the
reason and the suite goes on. A rerun resumes: done cells are reused.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.provenance import hardware_label
from harness.ray.cluster import RaySettings, connect, import_ray, task_resources
from harness.ray.dispatch import Dispatch
from harness.ray.tasks import Job, Plan, calibrate_task, cell_task, factorize_task, plan_task
from harness.run.cells import Cell
from harness.run.env import RunOptions, log
from harness.run.identity import used_versions
from harness.run.record import CellRecord
from harness.run.runner import RunSummary, SuiteRunner
from harness.suite import Method, Suite

KILL_ONCE_ENV = "HARNESS_RAY_KILL_ONCE"
"""Tests: path of a marker file; the first cell task to create it kills its worker (see ``ray_tasks.kill_once``)."""
RAY_FLAGS = {"address": "--address", "workers": "--workers", "cpus_per_cell": "--cpus-per-cell"}
RAY_FLAGS |= {"accelerator_type": "--accelerator-type", "retries": "--retries"}


def settings_from(args: argparse.Namespace) -> RaySettings | None:
    """The Ray settings of ``harness run`` (None for the sequential executor); Ray flags need ``--executor ray``."""
    given = {key: getattr(args, key) for key in RAY_FLAGS if getattr(args, key, None) is not None}
    if args.executor != "ray":
        if given:
            raise HarnessError(f"{RAY_FLAGS[next(iter(given))]}: only with --executor ray")
        return None
    if args.address and args.workers:
        raise HarnessError("--workers: only for the local Ray runtime, got it with --address (the cluster decides)")
    return RaySettings(**given)


def run_ray(suite: Suite, options: RunOptions, settings: RaySettings) -> RunSummary:
    return RayRunner(suite, options, settings).run()


class RayRunner(SuiteRunner):
    """The sequential runner's suite-level work (skips, hooks, trackers, reports) with cells run as Ray tasks."""

    def __init__(self, suite: Suite, options: RunOptions, settings: RaySettings) -> None:
        root = Path(options.results_root).resolve()  # the same path on every node
        calibration = root / suite.name / "calibration"
        options = replace(options, results_root=root, progress=False, calibration_cache=calibration)
        super().__init__(suite, options)
        self.settings = settings
        self.threads = settings.cpus_per_cell or torch.get_num_threads()
        self.resources: dict[str, Any] = {}
        self.tasks = Dispatch()
        self.factorized: dict[str, Any] = {}
        """Method label -> its factorize task (of the model being run): where its group files are."""
        self.probe = self.store.root / f".ray-probe-{uuid.uuid4().hex}"
        self.job = Job(
            replace(suite, device="cuda" if suite.device.startswith("cuda") else suite.device),
            options,
            self.threads,
            str(self.probe),
            os.environ.get(KILL_ONCE_ENV) or None,
        )

    def resolve_device(self) -> torch.device:
        """The driver computes nothing: each task resolves the suite's device on its own worker."""
        return torch.device("cpu")

    # ------------------------------------------------------------ suite
    def run(self) -> RunSummary:
        started = connect(self.settings, self.threads)
        self.probe.touch()
        try:
            ray = import_ray()
            self.resources = task_resources(
                self.suite.device, ray.cluster_resources(), self.settings.accelerator_type, self.threads
            )
            log(f"ray: every cell asks for {describe(self.resources)}; {self.threads} torch threads per cell")
            tasks = (plan_task, calibrate_task, factorize_task, cell_task)
            self.tasks.declare(tasks, self.resources, self.settings.retries)
            return super().run()
        finally:
            self.stop(started)

    def stop(self, started: bool) -> None:
        self.tasks.cancel_all()
        self.probe.unlink(missing_ok=True)
        if started:
            import_ray().shutdown()

    def write_reports(self) -> None:
        self.check_hardware()
        super().write_reports()

    def check_hardware(self) -> None:
        """Every computed cell should report the same hardware; say so where they do not."""
        labels = Counter(
            hardware_label(r.hardware) for r in self.summary.results if r is not None and r.ok and r.hardware
        )
        if len(labels) > 1:
            kinds = ", ".join(f"{label} ({n} cells)" for label, n in labels.items())
            log(f"warning: the cells of {self.suite.name} ran on different hardware: {kinds}")

    # ------------------------------------------------------------ model
    def run_model(self, model_spec: str) -> None:
        self.run_tasks(model_spec)
        self.settle(lambda: self.run_tasks(model_spec))  # cells other --shared runs computed

    def run_tasks(self, model_spec: str) -> None:
        plan: Plan = self.tasks.fetch(self.tasks.submit(plan_task, self.job, model_spec), self.model_key(model_spec))
        self.check_versions(plan)
        # claimed here, in the driver (the tasks hold no lock): a cell another --shared run has is waited for
        pending = [cell for cell in plan.cells if cell.id in plan.fallbacks and self.env.claim(cell)]
        for cell in plan.cells:
            if cell not in pending:
                self.skip(cell)
        if pending:
            self.gather(self.submit_cells(model_spec, pending), plan.fallbacks)
            self.tidy(plan.cells)

    def check_versions(self, plan: Plan) -> None:
        mine = used_versions(self.suite, self.plugins)
        if plan.versions != mine:
            differ = sorted(k for k in mine.keys() | plan.versions.keys() if mine.get(k) != plan.versions.get(k))
            raise HarnessError(
                f"--executor ray: expected the Ray workers to run the harness and plugins of this machine, got "
                f"other versions of {', '.join(differ)} (workers: {plan.versions}; here: {mine})"
            )

    # ------------------------------------------------------------ cells
    def submit_cells(self, model_spec: str, pending: list[Cell]) -> dict[Any, Cell]:
        methods = [m for m in self.suite.methods if any(c.method and c.method.label == m.label for c in pending)]
        calibrated = self.submit_calibration(model_spec, methods)
        self.factorized = {}
        for method in methods:
            needs = calibrated if self.needs(method) else None
            self.factorized[method.label] = self.tasks.submit(factorize_task, self.job, model_spec, method, needs)
        refs = {}
        for cell in pending:
            self.plugins.pm.hook.harness_cell_start(cell=cell)
            source = None if cell.method is None else self.factorized[cell.method.label]
            refs[self.tasks.submit(cell_task, self.job, model_spec, cell, source)] = cell
        log(f"ray: {len(refs)} cells submitted for {model_spec}")
        return refs

    def needs(self, method: Method) -> list[str]:
        return sorted(self.plugins.get("decomposer", method.name).needs)

    def submit_calibration(self, model_spec: str, methods: Iterable[Method]) -> Any:
        """One task collecting the statistics each method needs, in the sequential runner's order."""
        needs = [self.needs(m) for m in methods if self.needs(m)]
        return self.tasks.submit(calibrate_task, self.job, model_spec, needs) if needs else None

    def gather(self, refs: dict[Any, Cell], fallbacks: dict[str, CellRecord]) -> None:
        for ref in self.tasks.as_done(refs):
            cell = refs[ref]
            record, came_back = self.tasks.record(ref, cell.label, fallbacks[cell.id], self.settings.retries + 1)
            if came_back:
                log(f"done {cell.label}: {record.status}")
            else:
                self.store.save(record)
            self.collect(cell, record, self.store.path(cell.id))

    def tidy(self, cells: list[Cell]) -> None:
        """Remove the group files of methods whose cells are all done (under ``keep = "memory"`` the store is
        the cells' transport only; ``keep = "disk"`` keeps them for reruns)."""
        if self.suite.factorization.keep == "disk":
            return
        ray = import_ray()
        for label, ref in self.factorized.items():
            if all(self.store.done(c.id) for c in cells if c.method is not None and c.method.label == label):
                try:
                    path = ray.get(ref).path
                except Exception:  # the task failed or was refused: it left nothing to remove
                    path = None
                if path:
                    shutil.rmtree(path, ignore_errors=True)
        factors = self.store.root / "factors"
        for folder in [*sorted(factors.glob("*"), reverse=True), factors]:
            with contextlib.suppress(OSError):  # gone, or still holding another method's
                folder.rmdir()


def describe(resources: dict[str, Any]) -> str:
    asked = {"num_cpus": "CPU", "num_gpus": "GPU"}
    parts = [f"{resources[k]:g} {name}" for k, name in asked.items() if resources.get(k)]
    if resources.get("accelerator_type"):
        parts.append(f"accelerator type {resources['accelerator_type']}")
    return ", ".join(parts)
