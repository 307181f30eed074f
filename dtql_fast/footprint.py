"""What a group of agents needs in memory, estimated before it is built, and refused where it will
not fit (a --seeds 0-100000 would otherwise allocate until the machine runs out).

Per agent, at a step's peak: its weights (the four networks, target critic included) about six times
over (weights, gradients, two Adam moments, the group's stacking copy), plus the step's saved
activations, about 40 hidden-width float32 vectors per batch row. Both constants are measured: peak
RSS of eager training steps on hopper's widths, groups of 8 and 32 at batch 256 and 1024 (36.9 and
67.8 MB per agent measured; 38.7 and 70.1 MB estimated).
"""
from __future__ import annotations

import torch

WEIGHT_COPIES = 6
ACTIVATIONS_PER_ROW = 40  # hidden-width float32 vectors kept per batch row and agent


class GroupTooLarge(ValueError):
    pass


def per_agent_bytes(weight_bytes: int, batch_size: int, hidden: int, noise_levels: int = 1) -> int:
    """A training step's peak per agent: its weights' copies, and the activations of its batch rows (each row's
    K noise levels are rows of the losses' batch: draws.sample_draws)."""
    return WEIGHT_COPIES * weight_bytes + ACTIVATIONS_PER_ROW * batch_size * noise_levels * hidden * 4


def acting_bytes(episodes: int, candidates: int, hidden: int) -> int:
    """A lower bound of one agent's evaluation peak: every live episode scores `candidates` actions per env step,
    each through at least one hidden-width float32 layer, all at once."""
    return episodes * candidates * hidden * 4


def free_bytes(device: torch.device) -> int | None:
    """What the device can still give: CUDA's free memory, or on a CPU the available RAM (within
    the cgroup's limit where one is set); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = int(open(limit).read().strip()) - int(open(used).read().strip())
        except (OSError, ValueError):  # absent, or "max"
            continue
        return min(avail, max(cap, 0))
    return avail


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_group_fits(n_agents: int, weight_bytes: int, batch_size: int, hidden: int, device: torch.device,
                     free: int | None = None, noise_levels: int = 1, eval_episodes: int = 0, candidates: int = 1024):
    """Refuse a run (a group, or one agent) whose estimated peak, training's step or evaluation's acting,
    exceeds 90% of what the device has free, with the estimate and what would fit."""
    free = free_bytes(device) if free is None else free
    if free is None:
        return
    each = per_agent_bytes(weight_bytes, batch_size, hidden, noise_levels)
    need = n_agents * each
    if need > 0.9 * free:
        fits = int(0.9 * free // each)
        if n_agents > 1 and fits >= 1:
            raise GroupTooLarge(
                f"--seeds: {n_agents} agents need about {_gib(need)} ({_gib(each)} each at --batch-size {batch_size}), "
                f"more than the {_gib(free)} free on {device}; train at most {fits} seeds per run (split the list "
                f"over several runs{', or use a GPU' if device.type == 'cpu' else ''}), or a smaller --batch-size")
        raise GroupTooLarge(
            f"{n_agents} agent(s) at --batch-size {batch_size} and --noise-levels {noise_levels} need about "
            f"{_gib(need)} a step, more than the {_gib(free)} free on {device}; give a smaller --batch-size or "
            f"--noise-levels{' (or fewer --seeds)' if n_agents > 1 else ''}")
    acting = n_agents * acting_bytes(eval_episodes, candidates, hidden)
    if acting > 0.9 * free - need:
        fits = max(0, int((0.9 * free - need) // max(1, n_agents * acting_bytes(1, candidates, hidden))))
        raise GroupTooLarge(
            f"evaluating {eval_episodes} episodes per agent ({n_agents} agent(s), {candidates} candidate actions "
            f"each) needs at least {_gib(acting)}, more than the {_gib(free)} free on {device}; give at most "
            f"{fits} episodes (--eval-episodes for train, --episodes for evaluate)")


def weight_bytes_of(params: dict[str, dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for net in params.values() for t in net.values())

