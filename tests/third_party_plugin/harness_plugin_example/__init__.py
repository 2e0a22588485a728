"""A third-party plugin as a method author would write it: randomized SVD.

W ~ U_k diag(s_k) V_k^T from torch.svd_lowrank (Halko et al.), seeded.
"""

from dataclasses import dataclass

import torch

import harness


@dataclass(frozen=True)
class RSVDOptions:
    oversample: int = 8
    niter: int = 2


class RandomizedSVD(harness.Decomposer):
    name = "example-rsvd"
    Options = RSVDOptions
    description = "randomized SVD (third-party example)"

    def factorize(self, weights, stats, options, ctx):
        ((name, weight),) = weights.items()
        q = min(weight.shape)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(ctx.seed)
        U, s, V = torch.svd_lowrank(weight.double(), q=q, niter=options.niter)
        torch.random.set_rng_state(generator_state)
        return harness.SVDLikeFactorization(name, U, s, V.T, out_dtype=weight.dtype)


@harness.hookimpl
def register_decomposers(register):
    register(RandomizedSVD())
