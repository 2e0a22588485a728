"""Run a suite: per model, load once, calibrate once, factorize each method once,
then allocate, truncate, evaluate and record every cell of the grid.

Every finished cell is written to the results store at once (atomically), so a
crash or kill loses no finished cell; a rerun skips the cells already there. A
cell whose plugin raises is recorded as failed with its error and the others
go on; the run's exit status says so at the end.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import harness
from harness import data as data_mod
from harness.api import AllocationContext, FactorizeContext, LayerInfo, RunContext
from harness.errors import HarnessError, first_line
from harness.factorization import Factorization
from harness.models import LoadedModel, cache_dir, load_model, resolve_device
from harness.options import options_dict
from harness.plugins import Plugins, get_plugins
from harness.provenance import git_revision, hardware, library_versions, seed_everything
from harness.run.cells import Cell, expand
from harness.run.record import SCHEMA_VERSION
from harness.store import ResultStore
from harness.suite import Component, Method, Suite
from harness.surgery import count_layers, count_model, find_linears, replaced, weights_of


def log(message: str) -> None:
    print(f"[harness] {message}", file=sys.stderr, flush=True)


@dataclass
class RunOptions:
    results_root: Path = Path("results")
    force: bool = False
    limit: int | None = None
    progress: bool = True
    command: str = ""
    model_key: str | None = None
    """How errors name a model: None for the suite's ``models[i]``, '--model' where the CLI replaced them."""
    calibration_cache: Path | None = None
    """Where calibration statistics are cached: None for ``cache_dir()/calibration`` (the Ray executor shares
    them through the results store)."""


@dataclass
class RunSummary:
    results_dir: Path
    results: list[dict] = field(default_factory=list)
    computed: int = 0
    skipped: int = 0
    leaderboard: str | None = None
    """The leaderboard's markdown, once written (with plots and report.html) at the end of the run."""

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.results if r.get("status") != "ok"]


def run_suite(suite: Suite, options: RunOptions) -> RunSummary:
    return SuiteRunner(suite, options).run()


class SuiteRunner:
    def __init__(self, suite: Suite, options: RunOptions) -> None:
        self.suite = suite
        self.options = options
        self.plugins = get_plugins()
        self.store = ResultStore(Path(options.results_root) / suite.name)
        self.device = self.resolve_device()
        self.summary = RunSummary(self.store.root)
        self.trackers = [(t, self.plugins.get("tracker", t.name)) for t in suite.trackers]
        self.trackers_off: set[str] = set()
        """Labels of trackers that failed once: not called again in this run (the store has every result)."""

    def resolve_device(self) -> torch.device:
        return resolve_device(self.suite.device)

    # ------------------------------------------------------------ suite
    def run(self) -> RunSummary:
        for name, error in self.plugins.failures.items():
            log(f"warning: plugin {name!r} failed to load and is skipped: {error}")
        self._tracker_call("start", self.suite, None, self.store.root)
        self.plugins.pm.hook.harness_suite_start(suite=self.suite, results_dir=self.store.root)
        try:
            for model in self.suite.models:
                self.run_model(model)
            self.write_reports()
        finally:
            self.plugins.pm.hook.harness_suite_end(suite=self.suite, results=self.summary.results)
            self._tracker_call("end", self.suite, self.summary.results, self.store.root)
        return self.summary

    def write_reports(self) -> None:
        """Leaderboard, Pareto plots and report.html, written before the trackers end (so they can log them)."""
        from harness.report import html as report

        title = f"Leaderboard: {self.suite.name}"
        try:
            self.summary.leaderboard = report.write_all(self.summary.results, self.store.root, title)
        except Exception as exc:  # a report must never cost the results: `harness report` can redo it
            log(f"warning: writing the report failed: {type(exc).__name__}: {exc}")

    def _tracker_call(self, method: str, *args: Any) -> None:
        for component, tracker in self.trackers:
            if component.label in self.trackers_off:
                continue
            call_args = list(args)
            if method == "start":
                call_args[1] = component.options
            try:
                getattr(tracker, method)(*call_args)
            except Exception as exc:  # a tracker must never cost a result
                self.trackers_off.add(component.label)
                later = f"; log them later with: harness sync {self.store.root}" if component.name == "mlflow" else ""
                log(
                    f"warning: tracker {component.label!r} failed in {method}: {first_line(exc, 300)}; "
                    f"it is off for the rest of this run, results stay in the local store {self.store.cells}{later}"
                )

    # ------------------------------------------------------------ model
    def model_key(self, model_spec: str) -> str:
        """'suite.toml: models[i]' (or '--model' where the command line replaced the suite's models)."""
        if self.options.model_key:
            return self.options.model_key
        return f"{self.suite.file}: models[{self.suite.models.index(model_spec)}]"

    def run_model(self, model_spec: str) -> None:
        self.open_session(model_spec).run()

    def open_session(self, model_spec: str) -> ModelSession:
        """Load ``model_spec`` and find its decomposable layers; bad input is a HarnessError naming the model."""
        log(f"loading model {model_spec}")
        key = self.model_key(model_spec)
        try:
            loaded = load_model(model_spec, self.suite.dtype, str(self.device), self.suite.trust_remote_code)
        except HarnessError as exc:
            message = str(exc).removeprefix("model: ")
            raise HarnessError(f"{key}: {message}") from None
        layers = find_linears(loaded.model, self.suite.surgery.kinds, self.suite.surgery.lm_head)
        if not layers:
            kinds = "surgery.kinds " + ", ".join(self.suite.surgery.kinds) if self.suite.surgery.kinds else "surgery"
            raise HarnessError(
                f"{key}: expected a model with torch.nn.Linear layers in its transformer blocks to decompose "
                f"({kinds}), got {model_spec!r} with none ({type(loaded.model).__name__})"
            )
        return ModelSession(self, loaded, layers)

    # ------------------------------------------------------------ cells
    def pending(self, cell: Cell) -> bool:
        """True where ``cell`` is to be computed: not done yet, or ``--force``."""
        return self.options.force or not self.store.done(cell.id)

    def skip(self, cell: Cell) -> None:
        result = self.store.load(cell.id)
        self.summary.results.append(result)
        self.summary.skipped += 1
        log(f"skip {cell.label} (done: {self.store.path(cell.id)})")

    def collect(self, cell: Cell, result: dict, path: Path) -> None:
        """A computed cell's result, saved at ``path``: into the summary, then to the hooks and trackers."""
        self.summary.results.append(result)
        self.summary.computed += 1
        self.plugins.pm.hook.harness_cell_end(cell=cell, result=result)
        self._tracker_call("log_cell", cell, result, path)


def _metric_name(component: Component, metric: str) -> str:
    return metric if component.label == component.name else f"{component.label}/{metric}"


class ModelSession:
    """Everything computed once per model: fingerprints, calibration, factorizations."""

    def __init__(self, runner: SuiteRunner, loaded: LoadedModel, layers: list[LayerInfo]) -> None:
        self.runner = runner
        self.suite = runner.suite
        self.loaded = loaded
        self.layers = layers
        self.layer_by_name = {layer.name: layer for layer in layers}
        self.plugins = runner.plugins
        self._batches: torch.Tensor | None = None
        self._stats: dict | None = None
        self.dense_params, self.dense_bytes = count_layers(loaded.model, [la.name for la in layers])

    # ------------------------------------------------------------ identity
    def calibration_identity(self) -> dict[str, Any]:
        config = dataclasses.asdict(self.suite.calibration)
        config["data"] = self.calibration_data_fingerprint()
        return config

    def calibration_data_fingerprint(self) -> str:
        text = data_mod.text_source(self.suite.calibration.source, "calibration")
        return data_mod.sha256_texts(text.texts)

    def needs_calibration(self, method: Method, allocator: Component) -> bool:
        decomposer = self.plugins.get("decomposer", method.name)
        return bool(decomposer.needs) or self.plugins.get("allocator", allocator.name).uses_calibration

    def versions(self) -> dict[str, str]:
        return used_versions(self.suite, self.plugins)

    def data_fingerprints(self) -> dict[str, Any]:
        prints = {}
        for component in self.suite.evaluators:
            evaluator = self.plugins.get("evaluator", component.name)
            fingerprint = getattr(evaluator, "data_fingerprint", None)
            if fingerprint is not None:
                prints[component.label] = fingerprint(component.options)
        return prints

    # ------------------------------------------------------------ run
    def cells(self) -> list[Cell]:
        """The model's grid: baseline first, then every method x allocator x target in suite order."""
        needs_any = any(self.needs_calibration(m, a) for m in self.suite.methods for a in m.allocators)
        fingerprints = {"model": self.loaded.fingerprint, "data": self.data_fingerprints()}
        return expand(
            self.suite,
            self.loaded.model_id,
            fingerprints,
            self.versions(),
            self.runner.options.limit,
            calibrated=self.needs_calibration,
            calibration=self.calibration_identity() if needs_any else None,
        )

    def run(self) -> None:
        baseline, *method_cells = self.cells()
        self.run_or_skip(baseline, lambda: self.compute_baseline(baseline))
        for method in self.suite.methods:
            mine = [c for c in method_cells if c.method is method]
            pending = [c for c in mine if self.runner.pending(c)]
            for cell in mine:
                if cell not in pending:
                    self.runner.skip(cell)
            if pending:
                self.run_method(method, pending)

    def run_or_skip(self, cell: Cell, compute) -> None:
        if not self.runner.pending(cell):
            self.runner.skip(cell)
            return
        self.record(cell, compute)

    def record(self, cell: Cell, compute) -> dict:
        self.plugins.pm.hook.harness_cell_start(cell=cell)
        result = self.attempt(cell, compute)
        path = self.runner.store.save(result)
        self.runner.collect(cell, result, path)
        return result

    def attempt(self, cell: Cell, compute) -> dict:
        """``compute()``'s result, or the cell's failed result where a plugin raised; timed in ``cell_s``."""
        log(f"cell {cell.label} [{cell.id}]")
        started = time.perf_counter()
        try:
            result = compute()
        except HarnessError:
            raise
        except Exception as exc:  # a plugin's failure costs one cell, not the suite
            result = self.failed_result(cell, exc)
            log(f"cell {cell.label} FAILED: {type(exc).__name__}: {exc}")
        result.setdefault("timing", {})["cell_s"] = time.perf_counter() - started
        return result

    def run_method(self, method: Method, cells: Sequence[Cell]) -> None:
        try:
            factorizations, seconds = self.factorize(method)
        except HarnessError:
            raise
        except Exception as exc:
            for cell in cells:
                self.record(cell, lambda cell=cell, exc=exc: self.failed_result(cell, exc))
            return
        for cell in cells:
            self.record(cell, lambda cell=cell: self.compute_cell(cell, factorizations, seconds))

    # ------------------------------------------------------------ calibration
    def batches(self) -> torch.Tensor:
        if self._batches is None:
            config = self.suite.calibration
            text = data_mod.text_source(config.source, "calibration")
            self._batches = data_mod.calibration_batches(
                self.loaded.tokenizer, text, config.samples, config.seqlen, self.suite.seed
            )
        return self._batches

    def stats(self, needs: set[str]) -> dict:
        from harness.run.calibration import load_or_collect

        key = {
            "model": self.loaded.fingerprint,
            "calibration": self.calibration_identity(),
            "dtype": self.suite.dtype,
            "seed": self.suite.seed,
        }
        try:
            return load_or_collect(
                self.loaded.model,
                self.layers,
                self.batches(),
                needs,
                key=key,
                cache_dir=self.runner.options.calibration_cache or cache_dir() / "calibration",
                device=self.runner.device,
                batch_size=self.suite.calibration.batch_size,
                log=log,
            )
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            config = self.suite.calibration
            free_memory()
            raise OutOfMemory(
                f"calibration ({', '.join(sorted(needs))}) ran out of memory on {self.runner.device}: "
                f"lower calibration.batch_size (now {config.batch_size}), calibration.samples ({config.samples}) "
                f"or calibration.seqlen ({config.seqlen}) in {self.suite.file} [{first_line(exc)}]"
            ) from exc

    # ------------------------------------------------------------ factorize
    def factorize(self, method: Method) -> tuple[list[Factorization], float]:
        decomposer = self.plugins.get("decomposer", method.name)
        stats = self.stats(set(decomposer.needs)) if decomposer.needs else {}
        groups = decomposer.groups(self.layers, method.options)
        ctx = FactorizeContext(seed=self.suite.seed, device=self.runner.device, log=log)
        seed_everything(self.suite.seed)
        started = time.perf_counter()
        factorizations = []
        for group in tqdm(groups, desc=f"factorize {method.label}", disable=not self.runner.options.progress):
            weights = weights_of(self.loaded.model, group)
            group_stats = {name: stats[name] for name in group if name in stats}
            factorizations.append(decomposer.factorize(weights, group_stats, method.options, ctx))
        return factorizations, time.perf_counter() - started

    def calibration_loss(self, factorizations: Sequence[Factorization]):
        samples = self.suite.calibration.loss_samples

        def loss(assignment: Sequence[int | None]) -> float:
            replacements = materialize(factorizations, assignment)
            with replaced(self.loaded.model, replacements, self.suite.surgery.mode == "dense"):
                return lm_loss(self.loaded.model, self.batches()[:samples], self.runner.device)

        return loss

    # ------------------------------------------------------------ cells
    def compute_baseline(self, cell: Cell) -> dict:
        return self.measure(cell, {}, ranks={}, extra={})

    def oom_message(self, kind: str, component: Component, exc: BaseException) -> str:
        items = self.suite.evaluators if kind == "evaluator" else self.suite.profilers
        key = f"{kind}s[{items.index(component)}].options"
        has_batch = hasattr(component.options, "batch_size")
        lower = f"lower {key}.batch_size (now {component.options.batch_size})" if has_batch else "lower its options"
        return (
            f"{kind} {component.label!r} ran out of memory on {self.runner.device}: {lower} or cap examples "
            f"with --limit, in {self.suite.file} [{first_line(exc)}]"
        )

    def target_key(self, cell: Cell) -> str:
        index = self.suite.methods.index(cell.method)
        return f"{self.suite.file}: methods[{index}].targets[{cell.method.targets.index(cell.target)}]"

    def check_reachable(self, cell: Cell, factorizations: Sequence[Factorization], dtype_bytes: int) -> None:
        """A params, bytes or bits target below the smallest model (every matrix at rank 1, or at its smallest
        positive rank) is bad input: only removing whole matrices (rank 0) could meet it."""
        from harness import budget

        target = cell.target
        if target.kind == "rank" or not factorizations:
            return
        smallest = [min((r for r in f.ranks if r > 0), default=None) for f in factorizations]
        if target.kind == "params":
            least = sum(min(budget.group_params(f, r), f.dense_params) for f, r in zip(factorizations, smallest))
            allowed, unit = target.value * budget.dense_total(factorizations), "parameters"
        else:
            least = sum(
                min(budget.group_bytes(f, r, dtype_bytes), budget.group_bytes(f, None, dtype_bytes))
                for f, r in zip(factorizations, smallest)
            )
            allowed, unit = target.budget_bytes(budget.dense_total(factorizations)), "bytes"
        if allowed + 1e-9 < least:
            raise HarnessError(
                f"{self.target_key(cell)}: expected a target of at least {least:,} {unit} of decomposable weights "
                f"(every matrix of {self.loaded.model_id} at its smallest rank under {cell.method.label}), "
                f"got {target.label} ({allowed:,.0f} {unit})"
            )

    def compute_cell(self, cell: Cell, factorizations: list[Factorization], factorize_s: float) -> dict:
        self.check_reachable(cell, factorizations, self.loaded.model.dtype.itemsize)
        allocator = self.plugins.get("allocator", cell.allocator.name)
        uses_data = bool(self.plugins.get("decomposer", cell.method.name).needs) or allocator.uses_calibration
        ctx = AllocationContext(
            seed=self.suite.seed,
            layers=self.layer_by_name,
            calibration_loss=self.calibration_loss(factorizations) if uses_data or allocator.uses_calibration else None,
            dtype_bytes=self.loaded.model.dtype.itemsize,
            log=log,
        )
        seed_everything(self.suite.seed)
        started = time.perf_counter()
        assignment = allocator.allocate(factorizations, cell.target, cell.allocator.options, ctx)
        allocate_s = time.perf_counter() - started
        if len(assignment) != len(factorizations):
            raise RuntimeError(f"allocator returned {len(assignment)} ranks for {len(factorizations)} groups")
        replacements = materialize(factorizations, assignment)
        ranks = layer_ranks(factorizations, assignment)
        info = {f"{'+'.join(f.names)}": f.info for f in factorizations if f.info}
        extra = {
            "timing": {"factorize_s": factorize_s, "allocate_s": allocate_s},
            "factorization_info": info,
            "artifacts": self.rank_report(cell, ranks),
        }
        return self.measure(cell, replacements, ranks=ranks, extra=extra)

    def rank_report(self, cell: Cell, ranks: dict[str, int | None]) -> list[str]:
        """The rank chosen for every matrix: CSV and heat map under ranks/, paths relative to the results dir."""
        from harness.report.ranks import rank_heatmap, rank_rows, write_rank_csv

        rows = rank_rows(self.layer_by_name, ranks)
        folder = self.runner.store.root / "ranks"
        csv_path = write_rank_csv(rows, folder / f"{cell.id}.csv")
        png_path = rank_heatmap(rows, folder / f"{cell.id}.png", f"{cell.label}: kept rank fraction")
        return [str(p.relative_to(self.runner.store.root)) for p in (csv_path, png_path)]

    def measure(self, cell: Cell, replacements: dict, ranks: dict, extra: dict) -> dict:
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        work_dir = self.runner.store.work_dir(cell.id)
        ctx = RunContext(
            seed=self.suite.seed,
            device=self.runner.device,
            model_id=self.loaded.model_id,
            limit=self.runner.options.limit,
            work_dir=work_dir,
            dense_params=self.dense_params,
            decomposable=[layer.name for layer in self.layers],
            log=log,
            extra={"dense_bytes": self.dense_bytes, "progress": self.runner.options.progress},
        )
        metrics: dict[str, float] = {}
        higher: dict[str, bool] = {}
        infos: dict[str, Any] = {}
        hardware_metrics: list[str] = []
        timing = dict(extra.get("timing", {}))
        with replaced(model, replacements, self.suite.surgery.mode == "dense"):
            for kind, components in (("evaluator", self.suite.evaluators), ("profiler", self.suite.profilers)):
                for component in components:
                    plugin = self.plugins.get(kind, component.name)
                    seed_everything(self.suite.seed)
                    started = time.perf_counter()
                    run = plugin.evaluate if kind == "evaluator" else plugin.profile
                    try:
                        outcome = run(model, tokenizer, component.options, ctx)
                    except (torch.OutOfMemoryError, RuntimeError) as exc:
                        if not is_out_of_memory(exc):
                            raise
                        free_memory()
                        raise OutOfMemory(self.oom_message(kind, component, exc)) from exc
                    timing[f"{component.label}_s"] = time.perf_counter() - started
                    for name, value in outcome.metrics.items():
                        metrics[_metric_name(component, name)] = float(value)
                    for name, value in outcome.higher_is_better.items():
                        higher[_metric_name(component, name)] = value
                    infos[component.label] = outcome.info
                    if kind == "profiler" and getattr(plugin, "hardware_bound", False):
                        hardware_metrics += [_metric_name(component, name) for name in outcome.metrics]
            params, nbytes = count_model(model)
        extra = {**extra, "hardware_metrics": sorted(hardware_metrics)}
        return self.result(
            cell, "ok", metrics, higher, infos, ranks, timing, extra, model_params=params, model_bytes=nbytes
        )

    # ------------------------------------------------------------ records
    def result(self, cell: Cell, status: str, metrics, higher, infos, ranks, timing, extra, **sizes) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "cell_id": cell.id,
            "suite": cell.suite,
            "status": status,
            "error": extra.get("error"),
            "model": {
                "id": self.loaded.model_id,
                "fingerprint": self.loaded.fingerprint,
                "files": self.loaded.files,
                "note": self.loaded.note,
                "dtype": self.suite.dtype,
            },
            "method": None
            if cell.method is None
            else {**cell.method.to_dict(), "needs": sorted(self.plugins.get("decomposer", cell.method.name).needs)},
            "allocator": None if cell.allocator is None else cell.allocator.to_dict(),
            "target": None if cell.target is None else {**cell.target.to_dict(), "label": cell.target.label},
            "surgery": dataclasses.asdict(self.suite.surgery),
            "calibration": cell.config.get("calibration"),
            "ranks": ranks,
            "metrics": metrics,
            "higher_is_better": higher,
            "hardware_metrics": extra.get("hardware_metrics", []),
            "evaluations": infos,
            "sizes": {
                "dense_decomposable_params": self.dense_params,
                "dense_decomposable_bytes": self.dense_bytes,
                **sizes,
            },
            "timing": timing,
            "factorization_info": extra.get("factorization_info", {}),
            "artifacts": extra.get("artifacts", []),
            "provenance": self.provenance(cell),
            "config": cell.config,
        }

    def failed_result(self, cell: Cell, exc: BaseException) -> dict:
        return self.failed_with(cell, error_record(exc))

    def failed_with(self, cell: Cell, error: dict | None) -> dict:
        """The cell's failed result with ``error`` (type, message, traceback)."""
        return self.result(cell, "failed", {}, {}, {}, {}, {}, {"error": error})

    def suite_sha256(self) -> str | None:
        """sha256 of the suite file as read (None where it is gone)."""
        try:
            return data_mod.sha256_file(self.suite.file)
        except OSError:
            return None

    def data_provenance(self, cell: Cell) -> dict[str, Any]:
        """Every dataset the cell read: evaluators' fingerprints (e.g. lm-eval task file sha256),
        and for each text source (calibration, perplexity) its text sha256 and its files' sha256."""
        texts = {}
        if cell.config.get("calibration"):
            texts["calibration"] = data_mod.text_provenance(self.suite.calibration.source, "calibration")
        for component in self.suite.evaluators:
            source = getattr(component.options, "source", None)
            if source in data_mod.TEXT_SOURCES:
                texts[component.label] = data_mod.text_provenance(source, "perplexity")
        return {"evaluators": cell.config.get("fingerprints", {}).get("data", {}), "texts": texts}

    def provenance(self, cell: Cell) -> dict[str, Any]:
        return {
            "seed": self.suite.seed,
            "seeding": "random, numpy and torch seeded with seed before each factorization, allocation, "
            "evaluator and profiler; calibration windows drawn with random.Random(seed)",
            "torch_deterministic": torch.are_deterministic_algorithms_enabled(),
            "suite_file": self.suite.file,
            "suite_sha256": self.suite_sha256(),
            "suite": self.suite.to_dict(),
            "model_files": self.loaded.files,
            "data": self.data_provenance(cell),
            "command": self.runner.options.command,
            "limit": self.runner.options.limit,
            "harness": harness.__version__,
            "plugins": self.plugins.versions(),
            "libraries": library_versions(),
            "hardware": hardware(self.runner.device),
            "git": git_revision(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def used_versions(suite: Suite, plugins: Plugins) -> dict[str, str]:
    """Versions of the harness and of every plugin the suite uses (part of each cell's id)."""
    used = {
        plugins.plugin_of(kind, c.name)
        for kind, items in (
            ("decomposer", suite.methods),
            ("evaluator", suite.evaluators),
            ("profiler", suite.profilers),
        )
        for c in items
    }
    used |= {plugins.plugin_of("allocator", a.name) for m in suite.methods for a in m.allocators}
    all_versions = plugins.versions()
    return {"harness": harness.__version__, **{name: all_versions[name] for name in sorted(used)}}


def error_record(exc: BaseException) -> dict:
    """How a result records an exception: type, message and traceback lines."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__),
    }


class OutOfMemory(RuntimeError):
    """A step ran out of memory; the message names the setting to lower."""


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "failed to allocate" in text


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def materialize(factorizations: Sequence[Factorization], assignment: Sequence[int | None]) -> dict:
    replacements = {}
    for fact, rank in zip(factorizations, assignment, strict=True):
        if rank is not None:
            replacements.update(fact.materialize(rank))
    return replacements


def layer_ranks(factorizations: Sequence[Factorization], assignment: Sequence[int | None]) -> dict[str, int | None]:
    return {name: rank for fact, rank in zip(factorizations, assignment, strict=True) for name in fact.names}


@torch.no_grad()
def lm_loss(model: torch.nn.Module, batches: torch.Tensor, device: torch.device) -> float:
    """Mean next-token loss over ``batches`` (samples, seqlen)."""
    losses = [model(input_ids=row[None].to(device), labels=row[None].to(device)).loss.item() for row in batches]
    return sum(losses) / len(losses)


def describe_options(component: Component) -> str:
    options = options_dict(component.options)
    return ", ".join(f"{k}={v}" for k, v in options.items())
