"""Surgery frees the dense originals (issue 16, point 2): while a cell's replacements are in, the replaced
Linears' weights wait in host memory and their device storage is released; on exit (also on an exception)
they come back bit for bit, into the same parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.factorization import LowRank
from harness.surgery import replaced, wants_offload

NAMES = ("blocks.0.up", "blocks.0.down")


class Tiny(nn.Module):
    def __init__(self, device: str = "cpu", tied: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([nn.ModuleDict({"up": nn.Linear(8, 16), "down": nn.Linear(16, 8)})])
        self.head = nn.Linear(8, 10, bias=False)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen)
        if tied:
            self.head.weight = self.embed.weight
        self.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        block = self.blocks[0]
        return self.head(block["down"](torch.relu(block["up"](h))))


def low_rank(model: nn.Module, names=NAMES, rank: int = 2) -> dict[str, LowRank]:
    out = {}
    for name in names:
        W = model.get_submodule(name).weight.detach()
        U, s, Vt = torch.linalg.svd(W, full_matrices=False)
        out[name] = LowRank((U[:, :rank] * s[:rank]).contiguous(), Vt[:rank].contiguous())
    return out


def snapshot(model: nn.Module, names) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    return {n: (model.get_submodule(n).weight, model.get_submodule(n).weight.detach().clone()) for n in names}


def assert_restored(model: nn.Module, before: dict) -> None:
    for name, (param, copy) in before.items():
        now = model.get_submodule(name).weight
        assert now is param and now.device == copy.device and torch.equal(now, copy), name
        assert now.untyped_storage().nbytes() == copy.numel() * copy.element_size()


def test_forced_offload_releases_the_originals_storage_and_restores_it_bitwise():
    model = Tiny()
    x = torch.tensor([[1, 2, 3]])
    before = snapshot(model, NAMES)
    replacements = low_rank(model)
    with torch.no_grad(), replaced(model, replacements, offload=False):
        expected = model(x)
    with torch.no_grad(), replaced(model, replacements, offload=True):
        for _, (param, _) in before.items():
            assert param.untyped_storage().nbytes() == 0 and param.numel() == 0  # the device storage is gone
        assert torch.equal(model(x), expected)  # the factored layers never read the originals
    assert_restored(model, before)


def test_originals_come_back_after_an_exception():
    model = Tiny()
    before = snapshot(model, NAMES)
    with pytest.raises(RuntimeError, match="cell failed"), replaced(model, low_rank(model), offload=True):
        assert before[NAMES[0]][0].untyped_storage().nbytes() == 0
        raise RuntimeError("cell failed")
    assert_restored(model, before)
    assert isinstance(model.get_submodule(NAMES[0]), nn.Linear)


def test_auto_and_false_keep_cpu_weights_where_they_are():
    model = Tiny()
    pointers = {n: model.get_submodule(n).weight.data_ptr() for n in NAMES}
    weights = [model.get_submodule(n).weight for n in NAMES]
    for offload in ("auto", False):
        with replaced(model, low_rank(model), offload=offload):
            assert all(w.untyped_storage().nbytes() == w.numel() * 4 for w in weights)  # host and device are one
        assert {n: model.get_submodule(n).weight.data_ptr() for n in NAMES} == pointers
    assert not wants_offload(nn.Parameter(torch.ones(1)), "auto")
    assert wants_offload(nn.Parameter(torch.ones(1)), True)
    assert not wants_offload(nn.Parameter(torch.ones(1, device="meta")), True)
    with pytest.raises(ValueError, match="offload: expected true, false or 'auto'"):
        wants_offload(nn.Parameter(torch.ones(1)), "yes")


def test_a_weight_still_in_the_model_stays():
    """An LM head tied to its embedding: parking it would free nothing and restoring a copy would untie it."""
    model = Tiny(tied=True)
    head = model.head.weight
    with replaced(model, low_rank(model, ("head",)), offload=True):
        assert head.untyped_storage().nbytes() == 10 * 8 * 4
    assert model.head.weight is model.embed.weight


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_frees_device_memory_on_cuda():
    model = Tiny("cuda")
    model.blocks[0]["up"] = nn.Linear(1024, 4096, device="cuda")  # 16 MiB: well above the allocator's rounding
    names = ("blocks.0.up",)
    before = snapshot(model, names)
    replacements = low_rank(model, names, rank=4)
    torch.cuda.synchronize()
    with replaced(model, replacements, offload="auto"):
        torch.cuda.synchronize()
        during = torch.cuda.memory_allocated()
        assert before[names[0]][0].untyped_storage().nbytes() == 0
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    assert after - during >= 4096 * 1024 * 4  # the original's weight came back to the device
    assert_restored(model, before)
