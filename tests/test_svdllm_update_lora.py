"""SVD-LLM's sequential LoRA update (U, then V) on a tiny random Llama, on CPU.

Independent checks: the LM loss is computed by the model itself before and
after (on the same windows, eval mode); the factors are compared with their
values before training; every other parameter must come back bitwise.
"""

from __future__ import annotations

import torch
from harness_svdllm.lora import LoRAConfig, sequential_lora

from harness.factorization import LowRank
from harness.surgery import FactoredLinear, replaced

RANK = 4


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def windows(samples=8, seqlen=16):
    """Token windows with structure to learn: each token is the previous one plus 1 (mod 48)."""
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, 48, (samples, 1), generator=g)
    return (start + torch.arange(seqlen)) % 48


def factored(model):
    """Every Linear of the decoder blocks as a rank-RANK truncated SVD (A = U s^1/2, B = s^1/2 V^T)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            U, s, Vt = torch.linalg.svd(module.weight.detach(), full_matrices=False)
            root = s[:RANK].sqrt()
            out[name] = LowRank(A=U[:, :RANK] * root, B=root[:, None] * Vt[:RANK])
    return out


def lm_loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


def test_sequential_lora_lowers_the_loss_and_changes_u_then_v_only():
    model, ids = tiny_llama(), windows()
    config = LoRAConfig(r=2, lr=3e-2, epochs=4, batch_size=4, micro_batch_size=2, warmup_steps=0, dropout=0.0)
    with replaced(model, factored(model)):
        names = [n for n, m in model.named_modules() if isinstance(m, FactoredLinear)]
        assert len(names) == 14
        before = {n: (model.get_submodule(n).A.clone(), model.get_submodule(n).B.clone()) for n in names}
        others = {n: p.clone() for n, p in model.named_parameters() if not n.endswith((".A", ".B"))}
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        loss0 = lm_loss(model, ids)
        losses = sequential_lora(model, names, ids, config, log=lambda _: None)
        loss1 = lm_loss(model, ids)
        assert set(losses) == {"U", "V"} and len(losses["U"]) == len(losses["V"]) == 4 * 4
        assert loss1 < loss0 - 0.05, (loss0, loss1)
        assert losses["U"][-1] < losses["U"][0] and losses["V"][-1] < losses["U"][0]
        for n in names:
            A, B = model.get_submodule(n).A, model.get_submodule(n).B
            assert type(model.get_submodule(n)) is FactoredLinear  # the adapters are gone, merged
            assert (A - before[n][0]).abs().max() > 1e-4 and (B - before[n][1]).abs().max() > 1e-4, n
            assert A.shape == (before[n][0].shape) and B.shape == before[n][1].shape  # rank unchanged
        for n, p in model.named_parameters():
            assert p.requires_grad == flags[n]
            if n in others:
                assert torch.equal(p, others[n]), n
    assert not model.training


def test_stage_u_alone_changes_only_a():
    """With no epoch of V (a zero learning rate there is not offered: train U, then check V's start)."""
    model, ids = tiny_llama(), windows()
    config = LoRAConfig(r=2, lr=3e-2, epochs=1, batch_size=2, micro_batch_size=2, warmup_steps=0, dropout=0.0)
    from harness_svdllm import lora

    with replaced(model, factored(model)):
        names = [n for n, m in model.named_modules() if isinstance(m, FactoredLinear)]
        B0 = {n: model.get_submodule(n).B.clone() for n in names}
        with lora._frozen(model), lora._adapters(model, names, "A", config) as adapters:
            lora._train_stage(model, adapters, ids, config, lambda _: None)
            for adapter in adapters:
                adapter.merge()
        assert all(torch.equal(model.get_submodule(n).B, B0[n]) for n in names)
