"""FastDTQL's weights in the reference's layout: the nn.Modules of ReferenceDTQL (nets.py) and their state
dicts, to and from the packed parameters the fast step updates (fastnets.py).

The agents start from the reference's initial weights (the same per seed), hand their networks out as
its modules, and write their state, checkpoints included, as lists over the agents of the reference's
module state dicts and Adam moments in its parameter order: checkpoints and the reference stay
interchangeable.
"""
from __future__ import annotations

import torch

from . import fastnets
from .nets import Critic, DiffusionNet, GaussianPolicy
from .tasks import Hyper

NETWORKS = ("diffusion", "critic", "critic_target", "policy")
# The packed layout of each network; the target critic shares the critic's.
PACKED_AS = {"diffusion": "diffusion", "critic": "critic", "critic_target": "critic", "policy": "policy"}
MOMENTS = ("exp_avg", "exp_avg_sq")


def reference_modules(state_dim: int, action_dim: int, hyper: Hyper) -> dict[str, torch.nn.Module]:
    """The four networks as ReferenceDTQL builds them, in its order (so the same weights per seed)."""
    h, S, A = hyper, state_dim, action_dim
    return {"diffusion": DiffusionNet(S, A, h.hidden), "critic": Critic(S, A, h.hidden),
            "critic_target": Critic(S, A, h.hidden), "policy": GaussianPolicy(S, A, h.hidden, h.max_action)}


def key_order(state_dim: int, action_dim: int, hyper: Hyper) -> dict[str, list[str]]:
    """Each network's state-dict keys in the reference module's order (the global RNG left as it was)."""
    with torch.random.fork_rng(devices=[]):
        return {k: list(m.state_dict()) for k, m in reference_modules(state_dim, action_dim, hyper).items()}


def initial_modules(state_dim: int, action_dim: int, hyper: Hyper, seed: int) -> dict[str, torch.nn.Module]:
    """The weights an agent of `seed` starts from: the reference's modules under torch.manual_seed(seed), the
    target critic a copy of the critic (the global RNG left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init = reference_modules(state_dim, action_dim, hyper)
    init["critic_target"].load_state_dict(init["critic"].state_dict())
    return init


def initial_weights(state_dim: int, action_dim: int, hyper: Hyper, layout: dict,
                    seeds: list[int]) -> dict[str, dict[str, torch.Tensor]]:
    """The agents' packed weights by network, a leading agent dimension on each: agent i's are
    initial_modules(seeds[i])."""
    members = []
    for seed in seeds:
        init = initial_modules(state_dim, action_dim, hyper, seed)
        members.append({net: fastnets.pack(layout[PACKED_AS[net]], init[net].state_dict()) for net in NETWORKS})
    return {net: {k: torch.stack([m[net][k] for m in members]) for k in members[0][net]} for net in NETWORKS}


def _members(agent, packed: dict) -> list[dict[str, torch.Tensor]]:
    """A packed dict split into one dict per agent (views)."""
    return [{k: v[i] for k, v in packed.items()} for i in range(len(agent.seeds))]


def _unpack(agent, name: str, packed: dict) -> dict[str, torch.Tensor]:
    """One agent's packed tensors of network `name` -> the reference's state dict, in its key order."""
    ref = fastnets.unpack(agent.layout[PACKED_AS[name]], packed)
    return {k: ref[k] for k in agent.ref_keys[name]}


def _pack(agent, name: str, refs: list[dict]) -> list[torch.Tensor]:
    """Reference state dicts (one per agent) -> packed tensors with the agent dimension, in order."""
    if len(refs) != len(agent.seeds):
        raise ValueError(f"{len(refs)} agents' states for {len(agent.seeds)} agents (seeds {agent.seeds})")
    packed = [fastnets.pack(agent.layout[PACKED_AS[name]], ref) for ref in refs]
    return [torch.stack([p[k] for p in packed]) for k in packed[0]]


def modules(agent, i: int = 0) -> dict[str, torch.nn.Module]:
    """The four networks of agent number `i` as the reference's nn.Modules (copies of the current weights)."""
    mods = reference_modules(agent.state_dim, agent.action_dim, agent.hyper)
    for k, m in mods.items():
        m.to(agent.device).load_state_dict(_unpack(agent, k, _members(agent, agent.params()[k])[i]))
    return mods


def load_modules(agent, modules: list[dict[str, torch.nn.Module]] | dict[str, torch.nn.Module]):
    """The agents' weights set in place from reference-layout modules: a list of such dicts, one per agent
    (one dict: a group of one's)."""
    mods = [modules] if isinstance(modules, dict) else list(modules)
    with torch.no_grad():
        for k, packed in agent.params().items():
            torch._foreach_copy_(list(packed.values()), _pack(agent, k, [m[k].state_dict() for m in mods]))


def state_dict(agent) -> dict:
    """The agents' state in the reference's layout, a list over the agents: module state dicts, and Adam
    moments listed in the order of the reference module's parameters (as torch.optim.Adam would list them);
    "seeds" names the agents."""
    def per_agent(name, packed):
        return [_unpack(agent, name, m) for m in _members(agent, packed)]

    opts = {}
    for k, o in agent.optimizers().items():
        sd = o.state_dict()
        opts[k] = {**sd, **{m: [list(d.values()) for d in per_agent(k, dict(zip(o.names, sd[m])))] for m in MOMENTS}}
    return {"modules": {k: per_agent(k, p) for k, p in agent.params().items()}, "optimizers": opts,
            "lr_step": agent.lr_step, "metric_sum": agent.metric_sum, "metric_count": agent.metric_count,
            "seeds": list(agent.seeds)}


def load_state_dict(agent, sd: dict):
    """The agents' state from state_dict's format, in place; refused when it is of other seeds."""
    if sd.get("seeds") != list(agent.seeds):
        raise ValueError(f"this state is of seeds {sd.get('seeds')}, the agent's are {agent.seeds}")
    with torch.no_grad():
        for k, packed in agent.params().items():
            torch._foreach_copy_(list(packed.values()), _pack(agent, k, sd["modules"][k]))
        for k, o in agent.optimizers().items():
            osd = dict(sd["optimizers"][k])
            for m in MOMENTS:
                refs = [dict(zip(agent.ref_keys[k], lst)) for lst in osd[m]]
                osd[m] = _pack(agent, k, refs)
            o.load_state_dict(osd)
        agent.lr_step.copy_(sd["lr_step"])
        agent.metric_sum.copy_(sd["metric_sum"]); agent.metric_count.copy_(sd["metric_count"])
