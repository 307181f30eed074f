"""The random draws of one DTQL step, as one object that any implementation can be fed.

The reference and the fast step both take a `Draws`, so a test or the bench can hand the same
numbers to two implementations and compare what they compute.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .edm import sample_sigma


@dataclass
class Draws:
    """Shapes for one agent (the reference's); FastDTQL's agents put their agent dimension in front of each."""
    idx: torch.Tensor       # (B,) int64: batch rows, uniform with replacement
    sigma_bc: torch.Tensor  # (B, K) noise levels for the behaviour-cloning loss
    noise_bc: torch.Tensor  # (B, K, A)
    eps: torch.Tensor       # (B, A) the policy's reparameterisation noise
    sigma_tr: torch.Tensor  # (B, K) noise levels for the trust-region loss
    noise_tr: torch.Tensor  # (B, K, A)

    def to(self, device) -> "Draws":
        return Draws(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def as_group(self) -> "Draws":
        """One agent's draws as a group of one's, what FastDTQL's step takes (views: no copy)."""
        return Draws(*(t[None] for t in self.tensors()))

    @staticmethod
    def stack(per_agent: list["Draws"]) -> "Draws":
        """One step's draws of N agents, agent i's the i-th: what FastDTQL's step takes."""
        return Draws(*(torch.stack(ts) for ts in zip(*(d.tensors() for d in per_agent))))


def sample_draws(n: int | torch.Tensor, batch: int, action_dim: int, noise_levels: int = 1,
                 generator: torch.Generator | None = None, device=None, groups: int | None = None) -> Draws:
    """One step's draws; with `groups` (one per agent) every tensor gets a leading dimension of
    that size, each group's draws independent of the others'. `n`: the rows to draw from, or
    (groups, 1) per-agent counts where the agents' datasets differ in size (transitions.AgentData):
    then a 62-bit draw modulo each count (bias below 1e-12 for any dataset)."""
    B, K, A = batch, noise_levels, action_dim
    lead = () if groups is None else (groups,)
    # No generator=None: given, inductor keeps randint as an ATen fallback call (a launch of its own on a
    # GPU, and one its C++ wrapper cannot make); left out, randint is generated like rand and randn.
    g = dict(device=device) if generator is None else dict(generator=generator, device=device)
    if isinstance(n, torch.Tensor):
        idx = torch.randint(0, 2 ** 62, (*lead, B), **g) % n
    else:
        idx = torch.randint(0, n, (*lead, B), **g)
    return Draws(
        idx=idx,
        sigma_bc=sample_sigma((*lead, B, K), **g),
        noise_bc=torch.randn((*lead, B, K, A), **g),
        eps=torch.randn((*lead, B, A), **g),
        sigma_tr=sample_sigma((*lead, B, K), **g),
        noise_tr=torch.randn((*lead, B, K, A), **g),
    )
