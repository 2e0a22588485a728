"""A suite's checks across its sections, once every section has parsed (``harness.suite.SuiteParser``):
each method's targets against its allocators, and what offload, weight optimization after surgery and
block refinement need of the rest of the suite. Each failure is one ``HarnessError`` line naming the key."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from harness.api import GRADIENT_KINDS
from harness.errors import HarnessError
from harness.options import shown
from harness.targets import Target

if TYPE_CHECKING:
    from harness.plugins import Plugins
    from harness.suite import Suite

Fail = Callable[[str, str], HarnessError]
"""``fail(key, message)``: the error naming the suite file and ``key``."""


def check(suite: Suite, plugins: Plugins, fail: Fail) -> None:
    """Every cross-section check, in the order a user fixes them (first failure raised)."""
    check_targets(suite, plugins, fail)
    check_offload(suite, plugins, fail)
    check_tuning(suite, plugins, fail)
    check_refine(suite, plugins, fail)


def check_targets(suite: Suite, plugins: Plugins, fail: Fail) -> None:
    for i, method in enumerate(suite.methods):
        for allocator in method.allocators:
            component = plugins.get("allocator", allocator.name)
            for target in method.targets:
                if not component.takes(target.kind):
                    raise fail(
                        f"methods[{i}].targets",
                        f"allocator {shown(allocator.name)} takes {', '.join(component.target_kinds)} targets, "
                        f"got a {target.kind} target",
                    )


def check_tuning(suite: Suite, plugins: Plugins, fail: Fail) -> None:
    """A method that optimizes weights after surgery (``Decomposer.tunes``) trains the factored layers of the
    whole model: it needs ``surgery.mode = "factored"`` and every block's weights in place (no offload)."""
    for i, method in enumerate(suite.methods):
        if not plugins.get("decomposer", method.name).tunes(method.options):
            continue
        if suite.surgery.mode != "factored":
            raise fail(
                "surgery.mode",
                f"expected 'factored' for {shown(method.label)} (methods[{i}] trains its factors after "
                f"surgery), got {shown(suite.surgery.mode)}",
            )
        if suite.offload:
            raise fail(
                f"methods[{i}]",
                f"expected a method without weight optimization under offload = {shown(suite.offload)}, got "
                f"{shown(method.label)} (it trains through every block; remove offload or run it in another suite)",
            )


def check_refine(suite: Suite, plugins: Plugins, fail: Fail) -> None:
    """A method that refines its blocks (``Decomposer.refines``) trains each block's factors at the cell's
    reference ranks and keeps them at those ranks: it needs propagated inputs, and ranks that the cell's
    allocator gives each group alone, whatever the rest of the model (``uniform`` with a target that has a
    per-matrix rule: params, rank), so that the reference ranks are the cell's final ones."""
    for i, method in enumerate(suite.methods):
        if not plugins.get("decomposer", method.name).refines(method.options):
            continue
        what = f"block refinement ({shown(method.label)} refines its blocks at the reference ranks)"
        if suite.calibration.inputs != "propagated":
            raise fail("calibration.inputs", f"expected 'propagated' for {what}, got {shown(suite.calibration.inputs)}")
        for allocator in method.allocators:
            if allocator.name != "uniform":
                raise fail(
                    f"methods[{i}].allocators",
                    f"expected only 'uniform' for {what}: another allocator's final ranks may differ from "
                    f"the reference ranks the blocks were refined at, got {shown(allocator.name)}",
                )
        for target in method.targets:
            if type(target).per_matrix is Target.per_matrix:
                raise fail(
                    f"methods[{i}].targets",
                    f"expected per-matrix targets (params or rank) for {what}: a whole-model budget's "
                    f"uniform ranks differ from a block's, got a {target.kind} target",
                )


def check_offload(suite: Suite, plugins: Plugins, fail: Fail) -> None:
    """Offloaded blocks keep their weights only during a forward: no gradients for ``fisher`` or ``grad``
    methods."""
    if not suite.offload:
        return
    for i, method in enumerate(suite.methods):
        if needs := sorted(plugins.get("decomposer", method.name).needs & GRADIENT_KINDS):
            raise fail(
                f"methods[{i}]",
                f"expected a method without the {'/'.join(needs)} statistic under offload = "
                f"{shown(suite.offload)}, got {shown(method.label)} (it needs weight gradients; remove offload "
                "or run it in another suite)",
            )
