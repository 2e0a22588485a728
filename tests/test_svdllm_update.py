"""SVD-LLM's closed-form update of the left factor and its jitter rule, on planted data.

The references are computed here independently: least squares by
``torch.linalg.lstsq`` on the token matrices themselves (never through their
Gram), output errors as ||X W^T - X (A B)^T||^2 on those tokens, plain SVDs
and Cholesky factors by ``torch.linalg``. "Propagated" inputs X' are the
original ones X pushed through a perturbation, as the outputs of compressed
earlier blocks differ from the uncompressed model's.
"""

from __future__ import annotations

import pytest
import torch
from harness_svdllm import SVDLLM
from harness_svdllm.decompose import (
    closed_form_left,
    orthogonalized_update,
    repo_cholesky,
    whitened_right,
    whitened_svd,
)

from harness.api import FactorizeContext, LayerStats
from harness.errors import HarnessError
from harness.options import options_dict, parse_options

CTX = FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda _: None)
M, N, TOKENS, K = 14, 10, 300, 4


def planted(seed: int = 0):
    """W (M, N); original tokens X with a decaying spectrum; X' = X P + noise (the compressed model's)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N, generator=g, dtype=torch.float64)
    X = torch.randn(TOKENS, N, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, N, dtype=torch.float64)
    P = torch.eye(N, dtype=torch.float64) + 0.4 * torch.randn(N, N, generator=g, dtype=torch.float64)
    Xp = X @ P + 0.05 * torch.randn(TOKENS, N, generator=g, dtype=torch.float64)
    return W, X, Xp


def out_error(W, A, B, X) -> float:
    """||X W^T - X (A B)^T||_F^2: the layer's output error on the tokens X (rows)."""
    return float(((X @ W.T - X @ (A @ B).T) ** 2).sum())


def lstsq_left(W, B, X):
    """A minimizing ||X W^T - X B^T A^T||: lstsq on the tokens (the repo's l.484-485)."""
    return torch.linalg.lstsq(X @ B.T, X @ W.T).solution.T


def whitening_factors(W, G, k):
    U, s, Vt, S_inv, _ = whitened_svd(W, G)
    root = s[:k].sqrt()
    return U[:, :k] * root, (root[:, None] * Vt[:k]) @ S_inv


# ---------------------------------------------------------------- the update (v1) on two Grams
def test_closed_form_update_lowers_the_error_on_propagated_inputs_below_whitening_alone():
    W, X, Xp = planted()
    A_w, B_w = whitening_factors(W, X.T @ X, K)  # step 1: whitening on the original inputs
    B_full, _ = whitened_right(W, X.T @ X, eps=1e-6, jitter="harness")
    Q, C, _ = orthogonalized_update(W, B_full, Xp.T @ Xp)  # step 2: the update on the propagated inputs
    whitened, updated = out_error(W, A_w, B_w, Xp), out_error(W, Q[:, :K], C[:K], Xp)
    assert updated < 0.9 * whitened
    # and it is the least-squares optimum with B fixed: lstsq on the tokens gives the same product
    assert torch.allclose(Q[:, :K] @ C[:K], lstsq_left(W, B_w, Xp) @ B_w, atol=1e-9)


def test_updated_left_factor_is_the_least_squares_solution():
    W, X, Xp = planted(1)
    _, B = whitening_factors(W, X.T @ X, K)
    A = closed_form_left(W, B, Xp.T @ Xp)
    assert torch.allclose(A, lstsq_left(W, B, Xp), atol=1e-9, rtol=1e-7)
    moved = A + 1e-3 * torch.randn_like(A)  # the optimum: any other A is worse
    assert out_error(W, A, B, Xp) < out_error(W, moved, B, Xp)


def test_the_nested_update_is_the_per_rank_least_squares_at_every_rank():
    W, X, Xp = planted(2)
    B_full, _ = whitened_right(W, X.T @ X, eps=1e-6, jitter="harness")
    Q, C, _ = orthogonalized_update(W, B_full, Xp.T @ Xp)
    total = float(((Xp @ W.T) ** 2).sum())
    for k in range(0, N + 1):
        expect = lstsq_left(W, B_full[:k], Xp) @ B_full[:k] if k else torch.zeros(M, N, dtype=torch.float64)
        assert torch.allclose(Q[:, :k] @ C[:k], expect, atol=1e-8)
        # the error at rank k: tr(W G' W^T) minus the energy of the first k columns of Q
        assert abs(out_error(W, Q[:, :k], C[:k], Xp) - (total - float((Q[:, :k] ** 2).sum()))) < 1e-8 * total


def test_update_on_the_whitening_gram_itself_is_the_identity():
    """Inputs = "original" (or whitening and update on one Gram): A = W G B^T (B G B^T)^-1 = U_k s_k^1/2."""
    W, X, _ = planted(3)
    G = X.T @ X
    for k in (1, K, N):
        A_w, B_w = whitening_factors(W, G, k)
        assert torch.allclose(closed_form_left(W, B_w, G), A_w, atol=1e-9, rtol=1e-8)


# ---------------------------------------------------------------- the plugin's direct update (one Gram)
def factorize(W, G, original=None, **options):
    stats = LayerStats(tokens=TOKENS, gram=G, gram_original=original)
    return SVDLLM().factorize_matrix("w", W, stats, parse_options(SVDLLM.Options, options, "m"), CTX)


def test_plugin_direct_is_the_least_squares_left_factor_of_the_plain_svd():
    W, _, Xp = planted(4)
    fact = factorize(W, Xp.T @ Xp, update="direct")
    U, s, Vt = torch.linalg.svd(W, full_matrices=False)  # independent: the repo's direct_update right factor
    for k in (1, K, 7):
        B = s[:k].sqrt()[:, None] * Vt[:k]
        A, Bk = fact.materialize(k)["w"].A, fact.materialize(k)["w"].B
        expect = lstsq_left(W, B, Xp) @ B
        assert torch.allclose(A @ Bk, expect, atol=1e-9)
        assert fact.error(k) == pytest.approx(out_error(W, A, Bk, Xp), rel=1e-8)
        # better than the plain truncation, never better than whitening on the same Gram (the global optimum)
        plain = out_error(W, U[:, :k] * s[:k].sqrt(), B, Xp)
        best = out_error(W, *whitening_factors(W, Xp.T @ Xp, k), Xp)
        assert best - 1e-9 <= out_error(W, A, Bk, Xp) < plain
    assert fact.error(N) == pytest.approx(0.0, abs=1e-9 * float((W**2).sum()) * TOKENS)


def test_plugin_direct_differs_from_none_and_lora_factorizes_as_whitening():
    W, _, Xp = planted(5)
    none, closed = factorize(W, Xp.T @ Xp), factorize(W, Xp.T @ Xp, update="direct")
    assert not torch.allclose(none.materialize(K)["w"].A, closed.materialize(K)["w"].A)
    lora = factorize(W, Xp.T @ Xp, update="lora")  # its update runs per cell, after surgery
    assert torch.equal(none.materialize(K)["w"].A, lora.materialize(K)["w"].A)
    with pytest.raises(
        HarnessError, match=r"m.update: expected 'none' or 'closed-form' or 'direct' or 'lora', got 'ls'"
    ):
        parse_options(SVDLLM.Options, {"update": "ls"}, "m")


# ---------------------------------------------------------------- jitter
def indefinite_gram(lam_min: float = -0.25, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.tensor([lam_min, 0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)[:n]
    G = Q @ torch.diag(lam) @ Q.T
    return (G + G.T) / 2


def test_repo_jitter_is_minus_lambda_min_plus_eps_once():
    G = indefinite_gram(-0.25)
    L, jitter = repo_cholesky(G, 1e-6)
    assert jitter == pytest.approx(0.25 + 1e-6, abs=1e-12)
    assert torch.allclose(L @ L.T, G + jitter * torch.eye(6, dtype=torch.float64), atol=1e-12)
    # through the decomposer: the jitter it records is the repo's, and W S is whitened by that factor
    W = torch.randn(5, 6, dtype=torch.float64)
    fact = factorize(W, G, jitter="repo")
    assert fact.info["jitter"] == pytest.approx(0.25 + 1e-6, abs=1e-12)
    _, s, _ = torch.linalg.svd(W @ torch.linalg.cholesky(G + (0.25 + 1e-6) * torch.eye(6, dtype=torch.float64)))
    assert torch.allclose(fact.s, s, atol=1e-10)


def test_repo_jitter_leaves_a_positive_definite_gram_alone_and_shifts_only_once(monkeypatch):
    import harness

    assert repo_cholesky(indefinite_gram(0.1))[1] == 0.0  # positive definite: no jitter under either rule
    G = indefinite_gram(-0.25)
    real = torch.linalg.eigvalsh

    def underestimating(a):  # an eigensolver that reports lambda_min = -0.1 for the true -0.25
        return torch.cat([torch.tensor([-0.1], dtype=a.dtype), real(a)[1:]])

    monkeypatch.setattr(torch.linalg, "eigvalsh", underestimating)
    with pytest.raises(torch.linalg.LinAlgError, match=r"after the repo's one shift of 0\.1 "):
        repo_cholesky(G)  # the repo factors once more and stops
    _, jitter = harness.cholesky_with_jitter(G)  # the harness's rule grows the shift tenfold until it factors
    assert jitter == pytest.approx(1.00001, abs=1e-12)


def test_new_options_leave_default_cell_ids_unchanged():
    old = {"dtype": "float64", "jitter_eps": 1e-6}  # what every existing svd-llm cell hashed
    assert options_dict(SVDLLM.Options()) == old
    changed = parse_options(SVDLLM.Options, {"jitter": "repo", "update": "closed-form"}, "m")
    assert options_dict(changed) == {**old, "jitter": "repo", "update": "closed-form"}


# ---------------------------------------------------------------- end to end
def test_tiny_propagated_run_with_closed_form_update(tmp_path):
    from harness.run.runner import RunOptions, run_suite
    from harness.suite import load_suite
    from tests.conftest import write_suite

    text = """
        name = "cf"
        device = "cpu"
        models = ["random:tiny-llama"]
        targets = [{rank = 0.5}]
        allocators = ["uniform"]
        [[methods]]
        name = "svd-llm"
        [[methods]]
        name = "svd-llm"
        label = "svd-llm-cf"
        options = { update = "closed-form" }
        [[methods]]
        name = "svd-llm"
        label = "svd-llm-direct"
        options = { update = "direct" }
        [[evaluators]]
        name = "perplexity"
        options = { seqlen = 16, max_windows = 2 }
        [calibration]
        samples = 5
        seqlen = 24
        batch_size = 2
        inputs = "propagated"
        """
    suite = load_suite(write_suite(tmp_path / "cf.toml", text))
    out = run_suite(suite, RunOptions(tmp_path / "results", limit=2, progress=False))
    assert not out.failed
    by = {(r.method or {}).get("label", "-"): r for r in out.results}
    assert by["svd-llm"].ok and by["svd-llm-cf"].ok
    assert by["svd-llm-cf"].calibration["inputs"] == "propagated"
    ppl = {label: by[label].metrics["perplexity"] for label in ("svd-llm", "svd-llm-cf", "svd-llm-direct")}
    assert len(set(ppl.values())) == 3, ppl
