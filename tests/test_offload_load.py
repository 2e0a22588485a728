"""Loading under ``offload = "disk"`` (harness.models.load_model): the blocks go to disk as they load.

A ``random:`` model is materialized block by block, each block written to the
offload folder and put back on the meta device; a local directory is loaded by
transformers with a device map that puts each block on ``"disk"``. Either way
the model must be the one ``offload_blocks`` makes of the model loaded whole
(same weights, bit for bit, same logits, same files), and the host's peak
during the load must not grow with the depth (the ``memory`` test, in a child
process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness import plan as plan_mod
from harness.errors import HarnessError
from harness.models import load_model
from harness.offload import is_offloaded, materialized, offload_blocks
from harness.run.runner import RunOptions, run_suite
from harness.suite import load_suite
from tests.conftest import write_suite

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def same_model(offloaded: torch.nn.Module, whole: torch.nn.Module, vocab: int) -> None:
    """Every parameter of ``offloaded`` (materialized where its block is on disk) equal to ``whole``'s, and
    the same logits."""
    params = dict(whole.named_parameters())
    modules = dict(offloaded.named_modules())
    assert [n for n, _ in offloaded.named_parameters()] == list(params)
    for name, _ in offloaded.named_parameters():
        owner = modules[name.rpartition(".")[0]]
        with materialized([owner]):
            value = owner.get_parameter(name.rpartition(".")[2])
            assert value.device.type == "cpu" and torch.equal(value, params[name]), name
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(offloaded(input_ids=ids).logits, whole(input_ids=ids).logits)


@pytest.mark.parametrize("spec, dtype", [("random:tiny-llama", "float32"), ("random:tiny-llama?seed=3", "bfloat16")])
def test_a_random_model_written_block_by_block_is_the_whole_model_offloaded(tmp_path, spec, dtype):
    whole = load_model(spec, dtype, "cpu").model
    folder = tmp_path / "off"
    offloaded = load_model(spec, dtype, "cpu", offload="disk", offload_dir=folder).model
    q = offloaded.model.layers[1].self_attn.q_proj
    assert is_offloaded(offloaded) and q.weight.device.type == "meta"  # on disk between forwards
    assert offloaded.model.embed_tokens.weight.device.type == "cpu"  # the rest stays
    same_model(offloaded, whole, 4096)
    # what offload_blocks writes for the model loaded whole: the same index, the same bytes
    reference = tmp_path / "reference"
    offload_blocks(load_model(spec, dtype, "cpu").model, "disk", "cpu", reference)
    index = json.loads((folder / "index.json").read_text())
    assert index == json.loads((reference / "index.json").read_text())
    assert len(index) == 2 * 9  # two blocks of seven Linears and two norms
    for name in index:
        assert (folder / f"{name}.dat").read_bytes() == (reference / f"{name}.dat").read_bytes(), name


def test_a_local_directory_loads_with_its_blocks_on_disk(tiny_model_dir, tmp_path):
    whole = load_model(str(tiny_model_dir), "float32", "cpu").model
    offloaded = load_model(str(tiny_model_dir), "float32", "cpu", offload="disk", offload_dir=tmp_path / "off").model
    # transformers placed it (the device map at load), nothing dispatched it afterwards
    assert offloaded.hf_device_map == {
        "model.layers.0": "disk",
        "model.layers.1": "disk",
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    assert offloaded.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    assert offloaded.lm_head.weight is offloaded.model.embed_tokens.weight  # still tied
    same_model(offloaded, whole, whole.config.vocab_size)


def test_offload_cpu_loads_the_model_whole_then_dispatches_it(tmp_path):
    """``offload = "cpu"`` keeps its blocks in host memory anyway: loaded whole, then ``offload_blocks`` (on a
    CPU run device that changes nothing: host and device are one)."""
    whole = load_model("random:tiny-llama", "float32", "cpu").model
    same_model(load_model("random:tiny-llama", "float32", "cpu", offload="cpu").model, whole, 4096)
    with pytest.raises(HarnessError, match="offload: expected either offload or device_map, got both"):
        load_model("random:tiny-llama", "float32", "cpu", device_map="auto", offload="cpu")


def test_a_failed_load_under_disk_offload_leaves_no_offload_folder(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    (broken / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "vocab_size": 1000}))
    path = write_suite(
        tmp_path / "broken.toml", f'models = ["{broken}"]\noffload = "disk"\nmethods = ["svd"]\ntargets = [0.5]\n'
    )
    with pytest.raises(HarnessError, match="expected a causal LM with safetensors weights"):
        run_suite(load_suite(path), RunOptions(tmp_path / "results", progress=False))
    assert [p.name for p in (tmp_path / "results" / "broken").iterdir() if p.name.startswith("offload-")] == []


def test_a_random_model_run_under_disk_offload_records_the_numbers_of_the_whole_model(tmp_path):
    records = {}
    for mode in (None, "disk"):
        line = f'offload = "{mode}"\n' if mode else ""
        text = (
            f'name = "random"\nmodels = ["random:tiny-llama"]\n{line}methods = ["svd", "svd-llm"]\ntargets = [0.5]\n'
            '[[evaluators]]\nname = "perplexity"\n'
            'options = { source = "wiki-passages", seqlen = 64, max_windows = 2 }\n'
            "[calibration]\nsamples = 4\nseqlen = 32\nbatch_size = 2\n"
        )
        suite = load_suite(write_suite(tmp_path / f"{mode}.toml", text))
        summary = run_suite(suite, RunOptions(tmp_path / str(mode), progress=False))
        assert not summary.failed and summary.computed == 3
        records[mode] = {r.cell_id: (r.metrics, r.ranks) for r in summary.results}
    assert records["disk"] == records[None]
    assert [p for p in (tmp_path / "disk" / "random").iterdir() if p.name.startswith("offload-")] == []


def test_the_plan_loads_one_block_at_a_time_under_disk_offload(tmp_path):
    text = 'models = ["random:llama-2-7b"]\nmethods = ["svd-llm"]\ntargets = [0.8]\n'
    whole, disk = (
        load_suite(write_suite(tmp_path / f"{name}.toml", f"{line}{text}"))
        for name, line in (("whole", ""), ("disk", 'offload = "disk"\n'))
    )
    # Llama-2-7B by hand, bfloat16: 32 blocks of 4*4096^2 + 3*4096*11008 + 2*4096 parameters; embeddings,
    # LM head (32000 x 4096 each) and the final norm
    block = (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) * 2
    rest = (2 * 32000 * 4096 + 4096) * 2
    on_cuda = plan_mod.plan_model(disk, "random:llama-2-7b", "cuda").stages[0]
    assert (on_cuda.device, on_cuda.host - plan_mod.RUNTIME_BYTES, on_cuda.disk) == (rest, block, 32 * block)
    on_cpu = plan_mod.plan_model(disk, "random:llama-2-7b", "cpu").stages[0]
    assert on_cpu.host - plan_mod.RUNTIME_BYTES == 2 * (rest + block)  # dtype auto: float32 on a CPU
    deeper = plan_mod.plan_model(disk, "random:llama-2-7b", "cpu", layers=8).stages[0]
    assert deeper.host == on_cpu.host  # not the depth
    assert plan_mod.plan_model(whole, "random:llama-2-7b", "cuda").stages[0].device == rest + 32 * block


METHODS = 'methods = ["svd"]\ntargets = [0.5]'
LOAD_CHILD = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path
    import torch
    from harness.models import load_model

    def hwm():  # the peak resident set of this process (VmHWM)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=sys.argv[2]) as folder:
        loaded = load_model(sys.argv[1], "float16", "cpu", offload="disk", offload_dir=Path(folder) / "off")
        print(json.dumps({"peak": hwm()}))
    """
)


@pytest.mark.memory
def test_the_load_peak_under_disk_offload_does_not_grow_with_depth(tmp_path):
    """Llama-2-7B at full width in float16 (0.38 GiB a block, 0.49 GiB of embeddings and LM head), 1 and 4
    blocks loaded under ``offload = "disk"``, each in its own process: the same peak resident set (loaded
    whole, the 4 blocks would add 1.13 GiB), within 15 % of the plan's load figure (one block beside the
    rest)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    peaks, plans = {}, {}
    for layers in (1, 4):
        spec = f"random:llama-2-7b?layers={layers}"
        out = subprocess.run(
            [sys.executable, "-c", LOAD_CHILD, spec, str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT
        )
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[layers] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
        suite = load_suite(
            write_suite(tmp_path / "s.toml", f'offload = "disk"\ndtype = "float16"\nmodels = ["{spec}"]\n{METHODS}')
        )
        plans[layers] = plan_mod.plan_model(suite, spec, "cpu").stages[0].host
        print(f"{layers} blocks: load peak {peaks[layers] / 2**30:.3f} GiB, plan {plans[layers] / 2**30:.3f} GiB")
    block = (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) * 2
    assert peaks[4] - peaks[1] < 0.25 * block  # three more blocks: not even a quarter of one
    assert plans[4] == plans[1]
    assert abs(plans[4] - peaks[4]) <= 0.15 * peaks[4]
