"""The authors' release's four networks under our names, and its tensors in our layout.

dtql_fast/nets.py mirrors the release's layers one for one, so each network's tensors are the same in the
same order under other parameter names: they are mapped by position. Used by profiling.drift (the release
fed in step with ours) and profiling.learning (its checkpoints scored by our evaluation, and back).
"""
from __future__ import annotations

import torch

# ours -> the release's attribute on its agents.dtql.DTQL
RELEASE_NETS = {"diffusion": "bc_actor", "critic": "critic", "critic_target": "critic_target", "policy": "distill_actor"}


def ours_from_release(theirs: dict[str, dict[str, torch.Tensor]], state_dim: int, action_dim: int,
                      max_action: float, hidden: int = 256) -> dict[str, torch.nn.Module]:
    """dtql_fast.nets modules holding the release's tensors; `theirs` maps our network names to the release's
    state dicts."""
    from dtql_fast.nets import Critic, DiffusionNet, GaussianPolicy

    ours = {"diffusion": DiffusionNet(state_dim, action_dim, hidden), "critic": Critic(state_dim, action_dim, hidden),
            "critic_target": Critic(state_dim, action_dim, hidden),
            "policy": GaussianPolicy(state_dim, action_dim, hidden, max_action)}
    for k, m in ours.items():
        m.load_state_dict(dict(zip(m.state_dict(), theirs[k].values())))
    return ours


def load_into_release(agent, ours: dict[str, dict[str, torch.Tensor]]):
    """Our-layout state dicts (by our network names) loaded into a release agent's networks."""
    for k, state in ours.items():
        m = getattr(agent, RELEASE_NETS[k])
        m.load_state_dict(dict(zip(m.state_dict(), state.values())))
