"""Block-wise offload (harness.offload): blocks kept off the run device, brought to it per forward.

On a CPU ``offload = "disk"`` exercises the whole mechanism (parameters on the
meta device outside their forward, accelerate's hooks, memory-mapped weights),
so these tests run without a GPU: the numbers must be those of the model kept
whole, the weights must really be gone between forwards, and the plan must
count one block on the device.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from harness import plan as plan_mod
from harness.errors import HarnessError
from harness.models import load_model
from harness.offload import device_map_for, materialized, offload_blocks, offload_like
from harness.run.runner import RunOptions, run_suite
from harness.suite import load_suite
from harness.surgery import FactoredLinear, replaced
from tests.conftest import write_suite


def suite_text(model_dir, offload: str | None, methods: str = '["svd", "svd-llm", "asvd"]') -> str:
    line = f'offload = "{offload}"' if offload else ""
    return textwrap.dedent(
        f"""
        name = "offload"
        models = ["{model_dir}"]
        {line}
        targets = [0.8, 0.5]
        methods = {methods}
        [[evaluators]]
        name = "perplexity"
        options = {{ source = "wiki-passages", seqlen = 64, max_windows = 2 }}
        [calibration]
        samples = 4
        seqlen = 32
        batch_size = 2
        """
    )


def test_every_block_is_offloaded_and_everything_else_stays(tmp_path):
    model = load_model("random:tiny-llama", "float32", "cpu").model
    placement = device_map_for(model, "disk", torch.device("cpu"))
    assert [k for k, v in placement.items() if v == "disk"] == [f"model.layers.{i}" for i in range(2)]
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= {k for k, v in placement.items() if v == "cpu"}
    ids = torch.randint(0, 4096, (2, 24))
    expected = model(input_ids=ids).logits
    offload_blocks(model, "disk", "cpu", tmp_path / "off")
    q = model.model.layers[1].self_attn.q_proj
    assert q.weight.device.type == "meta"  # gone between forwards
    assert torch.equal(model(input_ids=ids).logits, expected)
    assert q.weight.device.type == "meta"
    with materialized([q]):
        assert q.weight.device.type == "cpu" and q.weight.abs().sum() > 0
    assert any((tmp_path / "off").iterdir())


def test_a_replacement_is_offloaded_like_the_linear_it_replaces(tmp_path):
    model = load_model("random:tiny-llama?layers=2", "float32", "cpu").model
    offload_blocks(model, "disk", "cpu", tmp_path / "off")
    name = "model.layers.0.mlp.down_proj"
    original = model.get_submodule(name)
    m, n = original.weight.shape
    from harness.factorization import LowRank

    factors = LowRank(torch.randn(m, 3), torch.randn(3, n))
    ids = torch.randint(0, 4096, (1, 16))
    with replaced(model, {name: factors}):
        swapped = model.get_submodule(name)
        assert isinstance(swapped, FactoredLinear) and swapped.A.device.type == "meta"
        model(input_ids=ids)
    assert model.get_submodule(name) is original
    plain = torch.nn.Linear(4, 4)
    assert offload_like(plain, torch.nn.Linear(4, 4)) is plain  # not offloaded: left as it is


def test_a_run_with_offloaded_blocks_records_the_numbers_of_the_whole_model(tiny_model_dir, tmp_path):
    records = {}
    for mode in (None, "disk"):
        suite = load_suite(write_suite(tmp_path / f"{mode}.toml", suite_text(tiny_model_dir, mode)))
        summary = run_suite(suite, RunOptions(tmp_path / str(mode), progress=False))
        assert not summary.failed and summary.computed == 7
        records[mode] = {r.cell_id: r for r in summary.results}
    assert records[None].keys() == records["disk"].keys()  # offload is not part of a cell's identity
    for cell_id, whole in records[None].items():
        assert records["disk"][cell_id].metrics == whole.metrics
        assert records["disk"][cell_id].ranks == whole.ranks
    leftovers = [p for p in (tmp_path / "disk" / "offload").iterdir() if p.name.startswith("offload-")]
    assert leftovers == []  # the offload folder goes with the model
    provenance = json.loads(next((tmp_path / "disk" / "offload" / "cells").glob("*.json")).read_text())
    assert provenance["provenance"]["suite"]["offload"] == "disk"


@pytest.mark.parametrize(
    "line, expected",
    [
        ('offload = "gpu"', "offload: expected 'cpu' or 'disk' (or no key: the whole model on the device), got 'gpu'"),
        ('offload = "cpu"\ndevice_map = "auto"', "offload: expected either offload or device_map, got both"),
    ],
)
def test_bad_offload_settings_are_one_line_errors(tmp_path, line, expected):
    path = write_suite(tmp_path / "bad.toml", f'{line}\nmethods = ["svd"]\ntargets = [0.5]\n')
    with pytest.raises(HarnessError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_suite(path)


def test_methods_that_need_weight_gradients_are_refused_under_offload(tmp_path):
    path = write_suite(tmp_path / "fisher.toml", 'offload = "cpu"\nmethods = ["svd", "fwsvd"]\ntargets = [0.5]\n')
    with pytest.raises(HarnessError, match=r"methods\[1\]: expected a method without the fisher statistic"):
        load_suite(path)


def test_the_plan_keeps_one_block_on_the_device(tmp_path):
    text = 'models = ["random:llama-2-7b"]\nmethods = ["svd-llm"]\ntargets = [0.8]\n'
    whole = load_suite(write_suite(tmp_path / "whole.toml", text))
    off = load_suite(write_suite(tmp_path / "off.toml", f'offload = "cpu"\n{text}'))
    disk = load_suite(write_suite(tmp_path / "disk.toml", f'offload = "disk"\n{text}'))
    stages = {
        name: {s.name: s for s in plan_mod.plan_model(suite, "random:llama-2-7b", "cuda").stages}
        for name, suite in (("whole", whole), ("cpu", off), ("disk", disk))
    }
    # Llama-2-7B by hand: 32 blocks of 4*4096^2 + 3*4096*11008 + 2*4096 parameters, bfloat16
    block = (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) * 2
    for stage in ("calibration", "factorization", "evaluation"):
        saved = stages["whole"][stage].device - stages["cpu"][stage].device
        if stage == "evaluation":  # the replacements leave the device too
            assert saved > 31 * block
        else:
            assert saved == 31 * block, stage
        assert stages["cpu"][stage].host - stages["whole"][stage].host >= 32 * block
        assert stages["disk"][stage].disk - stages["whole"][stage].disk == 32 * block
    assert stages["cpu"]["load"].device == 0  # loaded on the host, then dispatched
