"""Suite config: TOML -> frozen dataclasses, every key validated before any model loads.

A suite is data, never code: components are named by their registered names
and their options are checked against the options each plugin declares.
Errors name the file, the key, what was expected and what was received.
See docs/suite-format.md for the format.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from harness import suite_checks
from harness.errors import HarnessError, did_you_mean
from harness.options import OMIT_DEFAULT, check_value, key_name, one_line, options_dict, parse_options, shown
from harness.plugins import Plugins, get_plugins
from harness.targets import Target, parse_target

TOP_KEYS = {
    "name": str,
    "description": str,
    "seed": int,
    "device": str,
    "dtype": str,
    "device_map": str,
    "offload": str,
    "models": list[str],
    "trust_remote_code": bool,
    "targets": list,
    "allocators": list[str | dict[str, Any]],
    "methods": list[str | dict[str, Any]],
    "evaluators": list[str | dict[str, Any]],
    "profilers": list[str | dict[str, Any]],
    "trackers": list[str | dict[str, Any]],
    "calibration": dict[str, Any],
    "surgery": dict[str, Any],
    "factorization": dict[str, Any],
}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICE_MAPS = ("auto",)
OFFLOADS = ("cpu", "disk")


def resolve_dtype(dtype: str, device: str) -> str:
    """``dtype`` as a run uses it: ``auto`` is bfloat16 on CUDA, float32 on the CPU (and MPS).

    Torch-free unless both are ``auto`` (then whether CUDA is available decides,
    as it decides the device: ``harness.models.resolve_device``).
    """
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    if device in ("cpu", "mps"):
        return "float32"
    from harness.models import resolve_dtype as resolve_on_device

    return resolve_on_device("auto", device)


def with_layers(models: tuple[str, ...], layers: int, key: str = "--layers") -> tuple[str, ...]:
    """``models`` with every ``random:`` spec cut to ``layers`` blocks (the ``--layers`` flag).

    HarnessError (naming ``key``) where a model is not a ``random:<shape>`` spec
    or ``layers`` is outside 1..the shape's blocks.
    """
    from harness import shapes

    cut = []
    for model in models:
        if not shapes.is_random(model):
            raise HarnessError(f"{key}: applies to random:<shape> models only, got {shown(model)}")
        try:
            cut.append(shapes.with_layers(model, layers))
        except HarnessError as exc:
            raise HarnessError(f"{key}: {str(exc).removeprefix('model: ')}") from None
    return tuple(cut)


def check_device(value: str, key: str) -> str:
    """``value`` if it names a device the harness can run on, else HarnessError naming ``key``."""
    if not DEVICE.match(value):
        raise HarnessError(f"{key}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {shown(value)}")
    return value


@dataclass(frozen=True)
class Component:
    """A named plugin component with its parsed options."""

    kind: str
    name: str
    options: Any
    label: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "options": options_dict(self.options)}


@dataclass(frozen=True)
class Method(Component):
    targets: tuple[Target, ...] = ()
    allocators: tuple[Component, ...] = ()


@dataclass(frozen=True)
class CalibrationConfig:
    source: str = "lambada"
    """Text source (harness.data.TEXT_SOURCES); offline default: LAMBADA passages."""
    samples: int = field(default=32, metadata={"minimum": 1})
    """Number of windows (ASVD: 32; SVD-LLM: 256)."""
    seqlen: int = field(default=256, metadata={"minimum": 2})
    """Tokens per window (the papers use 2048)."""
    batch_size: int = field(default=4, metadata={"minimum": 1})
    loss_samples: int = field(default=8, metadata={"minimum": 1})
    """Windows used to score a calibration loss for allocators (sensitivity, BitStack order)."""
    pipeline: str = "blocks"
    """"blocks": statistics and factorizations block by block (harness/run/pipeline.py), one block's
    statistics alive at a time; "whole": every layer's statistics at once (disk-cached), then factorize.
    The same numbers either way, so not part of any cell's identity."""
    inputs: str = "original"
    """What each block's statistics are collected on under ``pipeline = "blocks"``: "original": the
    uncompressed model's activations (the same numbers as "whole"); "propagated": the outputs of the earlier
    blocks with their layers already compressed (SFSD's code, SVD-LLM's update), one activation stream per
    cell of the methods the pipeline serves (harness/run/pipeline.py). Part of those cells' identity only
    when "propagated" (harness/run/identity.py)."""
    draws: int = field(default=1, metadata={OMIT_DEFAULT: True, "minimum": 1})
    """Calibration draws K: every calibrated cell is computed K times, draw d on windows drawn with seed
    ``seed + d`` (statistics, factorizations and evaluation per draw); the leaderboard shows their mean and
    spread. Draw 0 is the suite as with one draw (same ids, same numbers); not part of any cell's identity,
    the draw index is (``Suite.draw``, harness/run/identity.py)."""

    def __post_init__(self) -> None:
        from harness.data import TEXT_SOURCES

        if self.pipeline not in ("whole", "blocks"):
            raise ValueError(f"pipeline: expected 'whole' or 'blocks', got {shown(self.pipeline)}")
        if self.inputs not in ("original", "propagated"):
            raise ValueError(f"inputs: expected 'original' or 'propagated', got {shown(self.inputs)}")
        if self.inputs == "propagated" and self.pipeline != "blocks":
            raise ValueError(
                f"inputs: expected 'original' with pipeline = {shown(self.pipeline)} ('propagated' needs the "
                f"layer-sequential pipeline, pipeline = 'blocks'), got 'propagated'"
            )

        if self.draws <= 0:
            raise ValueError(f"draws: expected a positive integer (calibration draws), got {self.draws}")
        if self.source not in TEXT_SOURCES:
            raise ValueError(f"source: expected one of {', '.join(TEXT_SOURCES)}, got {shown(self.source)}")
        for name in ("samples", "batch_size", "loss_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen: expected at least 2 tokens, got {self.seqlen}")


@dataclass(frozen=True)
class SurgeryConfig:
    kinds: tuple[str, ...] | None = field(default=None, metadata={"min_items": 1, "unique": True, "model": "kinds"})
    """Linear layers to decompose by last name component; default: all in the transformer blocks."""
    lm_head: bool = False
    mode: str = "factored"
    """"factored": two matmuls (parameters saved); "dense": the product written back."""
    offload_originals: bool | Literal["auto"] = "auto"
    """While a cell's replacements are in, the replaced Linears' dense weights wait in host memory (pinned on
    CUDA) and their device memory is freed, restored bit for bit afterwards (``harness.surgery.replaced``).
    "auto": on for weights on an accelerator, off on the CPU (where host and device are one). The same numbers
    either way, so never part of a cell's identity (``SurgeryConfig.identity``)."""

    def identity(self) -> dict[str, Any]:
        """What of the surgery settings identifies a cell: every setting but ``offload_originals``."""
        config = asdict(self)
        del config["offload_originals"]
        return config


@dataclass(frozen=True)
class FactorizationConfig:
    storage_dtype: Literal["float32", "float64"] = "float32"
    """dtype factors are kept in between factorizing and the cells (the math stays as each method does it)."""
    keep: Literal["memory", "disk"] = "memory"
    """Where factorizations wait for their cells: "memory" (host memory), or "disk": one memory-mapped
    safetensors file per group under ``<results>/<suite>/factors/`` (``harness.factorfiles``), each cell reading
    only the ranks it uses, reused by a rerun of the same factorizations. The same numbers either way, so not
    part of any cell's identity."""


@dataclass(frozen=True)
class Suite:
    """A validated suite (``harness.Suite``): what ``harness_suite_start`` and the trackers receive.

    ``models`` are model specs as written (HF ids, local paths, ``embedded``,
    ``random:<shape>``); ``dtype`` is the dtype the run uses (``dtype_setting``,
    as written, with ``auto`` resolved against the device: ``resolve_dtype``);
    ``methods`` each carry their targets and allocators; evaluators,
    profilers and trackers are ``Component`` (name, parsed options, label).
    """

    name: str
    file: str
    description: str = ""
    seed: int = 0
    device: str = "auto"
    dtype_setting: str = "auto"
    """The suite's ``dtype`` as written (``auto``, ``float32``, ``float16``, ``bfloat16``)."""
    models: tuple[str, ...] = ("embedded",)
    trust_remote_code: bool = False
    methods: tuple[Method, ...] = ()
    evaluators: tuple[Component, ...] = ()
    profilers: tuple[Component, ...] = ()
    trackers: tuple[Component, ...] = ()
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    device_map: str | None = None
    """``auto``: accelerate places a local/hub model across the GPUs where it does not fit one (CUDA only)."""
    offload: str | None = None
    """``cpu`` / ``disk``: the decoder blocks stay in host memory / memory-mapped files, each brought to the
    device for its forward (``harness.offload``); None: the whole model on the device."""

    @property
    def dtype(self) -> str:
        """The dtype the run loads, hashes and records: ``dtype_setting`` with ``auto`` resolved."""
        return resolve_dtype(self.dtype_setting, self.device)

    factorization: FactorizationConfig = field(default_factory=FactorizationConfig)
    draw: int = 0
    """Which calibration draw this view of the suite computes (``for_draw``; never read from a suite file):
    its calibration windows are drawn with ``calibration_seed``. 0: the suite as written."""

    @property
    def calibration_seed(self) -> int:
        """The seed of this draw's calibration windows: ``seed + draw`` (``seed`` itself for draw 0)."""
        return self.seed + self.draw

    def for_draw(self, draw: int) -> Suite:
        """The suite as calibration draw ``draw`` (0 .. calibration.draws - 1) computes it."""
        return replace(self, draw=draw)

    def with_models(self, models: list[str]) -> Suite:
        return replace(self, models=tuple(models))

    def to_dict(self) -> dict[str, Any]:
        """The resolved suite (every default filled in), as recorded in each result's provenance."""
        return {
            "name": self.name,
            "file": self.file,
            "description": self.description,
            "seed": self.seed,
            "device": self.device,
            "dtype": self.dtype,
            "models": list(self.models),
            "trust_remote_code": self.trust_remote_code,
            "methods": [
                {
                    **m.to_dict(),
                    "targets": [t.to_dict() for t in m.targets],
                    "allocators": [a.to_dict() for a in m.allocators],
                }
                for m in self.methods
            ],
            "evaluators": [c.to_dict() for c in self.evaluators],
            "profilers": [c.to_dict() for c in self.profilers],
            "trackers": [c.to_dict() for c in self.trackers],
            "calibration": options_dict(self.calibration),
            **({"draw": self.draw} if self.draw else {}),
            "surgery": asdict(self.surgery),
            **({"device_map": self.device_map} if self.device_map else {}),
            **({"offload": self.offload} if self.offload else {}),
            "factorization": asdict(self.factorization),
        }


def load_suite(path: str | Path, plugins: Plugins | None = None) -> Suite:
    """Read and validate a suite file; raises HarnessError on any problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HarnessError(f"{path}: suite file does not exist") from None
    except IsADirectoryError:
        raise HarnessError(f"{path}: expected a suite file (TOML), got a directory") from None
    except UnicodeDecodeError as exc:
        raise HarnessError(f"{path}: expected a UTF-8 TOML file, got undecodable bytes at offset {exc.start}") from None
    except OSError as exc:
        raise HarnessError(f"{path}: cannot read suite file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise HarnessError(f"{path}: not valid TOML: {exc}") from None
    return SuiteParser(str(path), plugins or get_plugins()).parse(raw)


class SuiteParser:
    def __init__(self, file: str, plugins: Plugins) -> None:
        self.file = file
        self.plugins = plugins

    def fail(self, key: str, message: str) -> HarnessError:
        return HarnessError(f"{self.file}: {key}: {message}")

    def check(self, value: Any, annotation: Any, key: str) -> Any:
        return check_value(value, annotation, f"{self.file}: {key}")

    def parse(self, raw: dict[str, Any]) -> Suite:
        """The validated suite, or a HarnessError on one line (keys and values from the file are escaped)."""
        try:
            return self._parse(raw)
        except HarnessError as exc:
            raise HarnessError(one_line(str(exc))) from None

    def _parse(self, raw: dict[str, Any]) -> Suite:
        for key in raw:
            if key not in TOP_KEYS:
                raise self.fail(
                    key_name(key), f"unknown key{did_you_mean(key, TOP_KEYS)}; known keys: {', '.join(TOP_KEYS)}"
                )
        values = {key: self.check(value, TOP_KEYS[key], key) for key, value in raw.items()}
        name = values.get("name", Path(self.file).stem)
        if not SAFE_NAME.match(name):
            raise self.fail("name", f"expected letters, digits, '.', '_' or '-' (no path), got {shown(name)}")
        if values.get("dtype", "auto") not in DTYPES:
            expected = ", ".join(repr(d) for d in DTYPES)
            raise self.fail("dtype", f"expected one of {expected}, got {shown(values['dtype'])}")
        if values.get("device_map", "auto") not in DEVICE_MAPS:
            raise self.fail("device_map", f"expected 'auto' (or no key: one device), got {shown(values['device_map'])}")
        if values.get("offload", "cpu") not in OFFLOADS:
            expected = " or ".join(repr(o) for o in OFFLOADS)
            raise self.fail(
                "offload",
                f"expected {expected} (or no key: the whole model on the device), got {shown(values['offload'])}",
            )
        if values.get("offload") and values.get("device_map"):
            raise self.fail(
                "offload",
                "expected either offload or device_map, got both: offload keeps the blocks "
                'off the device, device_map = "auto" spreads the model over the GPUs',
            )
        if not values.get("models", ["embedded"]):
            raise self.fail("models", "expected at least one model, got an empty list")
        for i, model in enumerate(values.get("models", [])):
            if not model.strip():
                raise self.fail(
                    f"models[{i}]", f"expected a hub id, a local path, 'embedded' or 'random:<shape>', got {model!r}"
                )
            self.check_random(model, f"models[{i}]")
        check_device(values.get("device", "auto"), f"{self.file}: device")
        if not 0 <= values.get("seed", 0) < 2**32:
            raise self.fail("seed", f"expected an integer from 0 to 2**32 - 1, got {shown(values['seed'])}")
        targets = self.targets(values.get("targets", []), "targets")
        allocators = self.components("allocator", values.get("allocators", ["uniform"]), "allocators")
        methods = tuple(
            self.method(entry, f"methods[{i}]", targets, allocators)
            for i, entry in enumerate(values.get("methods", []))
        )
        self.unique_labels(methods, "methods")
        suite = Suite(
            name=name,
            file=self.file,
            description=values.get("description", ""),
            seed=values.get("seed", 0),
            device=values.get("device", "auto"),
            dtype_setting=values.get("dtype", "auto"),
            device_map=values.get("device_map"),
            offload=values.get("offload"),
            models=tuple(values.get("models", ["embedded"])),
            trust_remote_code=values.get("trust_remote_code", False),
            methods=methods,
            evaluators=self.components("evaluator", values.get("evaluators", []), "evaluators"),
            profilers=self.components("profiler", values.get("profilers", ["params"]), "profilers"),
            trackers=self.components("tracker", values.get("trackers", []), "trackers"),
            calibration=parse_options(CalibrationConfig, values.get("calibration"), "calibration", self.file),
            surgery=self.surgery(values.get("surgery")),
            factorization=parse_options(FactorizationConfig, values.get("factorization"), "factorization", self.file),
        )
        suite_checks.check(suite, self.plugins, self.fail)
        return suite

    def check_random(self, model: str, key: str) -> None:
        """A ``random:`` spec must name a known shape with valid keys (torch-free)."""
        from harness import shapes

        if shapes.is_random(model):
            try:
                shapes.parse_random_spec(model)
            except HarnessError as exc:
                raise self.fail(key, str(exc).removeprefix("model: ")) from None

    def targets(self, raw: list, key: str) -> tuple[Target, ...]:
        return tuple(parse_target(value, f"{self.file}: {key}[{i}]") for i, value in enumerate(raw))

    def components(self, kind: str, raw: list, key: str) -> tuple[Component, ...]:
        items = tuple(self.component(kind, entry, f"{key}[{i}]") for i, entry in enumerate(raw))
        self.unique_labels(items, key)
        return items

    def component(self, kind: str, entry: Any, key: str, extra: tuple[str, ...] = ()) -> Component:
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise self.fail(key, f"expected a name or a table with 'name', got {shown(entry)}")
        allowed = ("name", "label", "options", *extra)
        for sub in entry:
            if sub not in allowed:
                raise self.fail(f"{key}.{sub}", f"unknown key{did_you_mean(sub, allowed)}; known: {', '.join(allowed)}")
        if "name" not in entry:
            raise self.fail(f"{key}.name", f"missing: every {kind} entry needs a name")
        name = self.check(entry["name"], str, f"{key}.name")
        component = self.plugins.get(kind, name, f"{self.file}: {key}.name")
        options = parse_options(
            component.Options, self.check(entry.get("options", {}), dict, f"{key}.options"), f"{key}.options", self.file
        )
        label = self.check(entry.get("label", name), str, f"{key}.label")
        if not SAFE_NAME.match(label):
            raise self.fail(f"{key}.label", f"expected letters, digits, '.', '_' or '-', got {shown(label)}")
        return Component(kind, name, options, label)

    def method(self, entry: Any, key: str, targets: tuple, allocators: tuple) -> Method:
        base = self.component("decomposer", entry, key, extra=("targets", "allocators"))
        own = entry if isinstance(entry, dict) else {}
        method_targets = (
            self.targets(self.check(own["targets"], list, f"{key}.targets"), f"{key}.targets")
            if "targets" in own
            else targets
        )
        method_allocators = (
            self.components("allocator", self.check(own["allocators"], list, f"{key}.allocators"), f"{key}.allocators")
            if "allocators" in own
            else allocators
        )
        if not method_targets:
            raise self.fail(f"{key}.targets", "expected at least one target (here or at the top level), got none")
        if not method_allocators:
            raise self.fail(f"{key}.allocators", "expected at least one allocator, got none")
        return Method(base.kind, base.name, base.options, base.label, method_targets, method_allocators)

    def unique_labels(self, items: tuple[Component, ...], key: str) -> None:
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.label in seen:
                raise self.fail(f"{key}[{i}].label", f"duplicate label {item.label!r}: give each entry its own label")
            seen.add(item.label)

    def surgery(self, raw: dict | None) -> SurgeryConfig:
        config = parse_options(SurgeryConfig, raw, "surgery", self.file)
        if config.mode not in ("factored", "dense"):
            raise self.fail("surgery.mode", f"expected 'factored' or 'dense', got {shown(config.mode)}")
        return config
