"""A run's agents from its config, built one way for training and for python -m dtql_fast.evaluate:
one FastDTQL for the whole group (a group too large for the device refused before it is built), and
its state restored from a checkpoint of the same task and network shapes."""
from __future__ import annotations

import torch

from . import checkpoint, footprint
from .config import TrainConfig, kernels_of
from .tasks import Hyper
from .update import FastDTQL


def net_shapes(agent: FastDTQL) -> dict:
    """The network shapes a checkpoint records, and a resume must match."""
    return {"state_dim": agent.state_dim, "action_dim": agent.action_dim, "hidden": agent.hyper.hidden,
            "noise_levels": agent.hyper.noise_levels}


def build_agent(cfg: TrainConfig, data, hyper: Hyper, bases: list[Hyper], device: torch.device,
                eval_episodes: int = 0) -> FastDTQL:
    """The run's agents (one step for all; `hyper` what they share, each with its task's table (`bases`) and its
    grid cell's settings), their initial weights drawn here; a run too large for the device (its step, and
    acting in `eval_episodes` episodes per agent) refused before it is built."""
    # one agent's weights (hidden width fixed, batch 1) tell what the run needs, before it is built
    one = FastDTQL(data.state_dim, data.action_dim, hyper.replace(batch_size=1), "cpu")
    footprint.check_group_fits(len(cfg.agents), footprint.weight_bytes_of(one.params()), hyper.batch_size,
                               hyper.hidden, device, noise_levels=hyper.noise_levels, eval_episodes=eval_episodes,
                               candidates=hyper.num_candidates)
    del one
    return FastDTQL(data.state_dim, data.action_dim, hyper, device, kernels=kernels_of(cfg, device), seeds=cfg.agents,
                    hypers=cfg.agent_hypers(bases), datasets=cfg.task_of_agent)



def restore(agent: FastDTQL, ckpt: dict, task: str, where: str):
    """The agents' state from checkpoint `ckpt`; refused (checkpoint.CheckpointError, naming `where`) when it
    is of another task or other network shapes."""
    checkpoint.check_compatible(ckpt, task, net_shapes(agent), where=where)
    agent.load_state_dict(checkpoint.agent_state(ckpt))
