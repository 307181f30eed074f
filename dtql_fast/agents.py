"""A run's agents from its config, built one way for training and for python -m dtql_fast.evaluate:
one FastDTQL for the whole group (a group too large for the device refused before it is built), and
its state restored from a checkpoint of the same task and network shapes."""
from __future__ import annotations

import torch

from . import checkpoint, footprint
from .config import TrainConfig, kernels_of
from .tasks import DEFAULT_HYPER, OFFLINE_DATASET_ID, OFFLINE_DEMO_HYPER, TASKS, Hyper
from .update import FastDTQL


def net_shapes(agent: FastDTQL) -> dict:
    """The network shapes a checkpoint records, and a resume must match."""
    return {"state_dim": agent.state_dim, "action_dim": agent.action_dim, "hidden": agent.hyper.hidden,
            "noise_levels": agent.hyper.noise_levels}


def check_fits(cfg: TrainConfig, bases: list[Hyper], widths: tuple[int, int], device: torch.device,
               eval_episodes: int):
    """Refuse (footprint.GroupTooLarge) a run whose agents' step, or acting in `eval_episodes` episodes per
    agent, would not fit the device: the one memory estimate of every run, single seeds included. `bases`:
    its tasks' tables with the command's overrides; its largest grid cell is counted for all agents."""
    hypers = cfg.agent_hypers(bases)
    worst = max(hypers, key=lambda h: h.batch_size * h.noise_levels)
    # one agent's weights (hidden width fixed, batch 1) tell what the run needs, before it is built
    one = FastDTQL(widths[0], widths[1], worst.replace(batch_size=1), "cpu")
    footprint.check_group_fits(len(cfg.agents), footprint.weight_bytes_of(one.params()), worst.batch_size,
                               worst.hidden, device, noise_levels=worst.noise_levels, eval_episodes=eval_episodes,
                               candidates=max(h.num_candidates for h in hypers))


def check_fits_before_data(cfg: TrainConfig, device: torch.device, eval_episodes: int | None):
    """check_fits before a byte of data is read, from what the task table knows: its hyperparameters, widths
    and evaluation episodes (`eval_episodes` None: the table's). Outside the table (Minari ids, the demo
    data) the widths are taken as 1 and the episodes as 10, so this is a lower bound there: it refuses only
    runs that cannot fit whatever the data, and build_agent checks again with the data's widths."""
    tasks = [TASKS.get(name) for name in cfg.tasks]
    bases = [cfg.hyper(t.hyper if t else OFFLINE_DEMO_HYPER if name == OFFLINE_DATASET_ID else DEFAULT_HYPER)
             for name, t in zip(cfg.tasks, tasks)]
    widths = [t.widths if t and t.widths else (1, 1) for t in tasks]
    episodes = eval_episodes if eval_episodes is not None else min(t.eval_episodes if t else 10 for t in tasks)
    check_fits(cfg, bases, min(widths), device, episodes)


def build_agent(cfg: TrainConfig, data, hyper: Hyper, bases: list[Hyper], device: torch.device,
                eval_episodes: int = 0) -> FastDTQL:
    """The run's agents (one step for all; `hyper` what they share, each with its task's table (`bases`) and its
    grid cell's settings), their initial weights drawn here; a run too large for the device (its step, and
    acting in `eval_episodes` episodes per agent) refused before it is built."""
    check_fits(cfg, bases, (data.state_dim, data.action_dim), device, eval_episodes)
    return FastDTQL(data.state_dim, data.action_dim, hyper, device, kernels=kernels_of(cfg, device), seeds=cfg.agents,
                    hypers=cfg.agent_hypers(bases), datasets=cfg.task_of_agent)



def restore(agent: FastDTQL, ckpt: dict, task: str, where: str):
    """The agents' state from checkpoint `ckpt`; refused (checkpoint.CheckpointError, naming `where`) when it
    is of another task or other network shapes."""
    checkpoint.check_compatible(ckpt, task, net_shapes(agent), where=where)
    agent.load_state_dict(checkpoint.agent_state(ckpt))
