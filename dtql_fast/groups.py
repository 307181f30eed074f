"""Which agents may train in one step (FastDTQL(seeds=..., hypers=..., datasets=...)): agents that differ,
if at all, in the settings that keep shapes (hyper.PER_AGENT: each held as a per-agent device tensor, so another
grid never recompiles) and share the rest (hyper.SHARED: shapes, schedule, acting, the action box the losses
clamp to); each agent (its seed, settings and data) trains once. Which is which is each Hyper field's
metadata (hyper.py).
"""
from __future__ import annotations

from typing import Sequence

from .hyper import SHARED, Hyper
from .seeds import check_seeds


class GroupMismatch(ValueError):
    """Agents asked to share one step that cannot: the message names the agents and the field."""


def check_group(hypers: Sequence[Hyper], names: Sequence[str]) -> None:
    """Refuse a group whose agents differ in a SHARED field, naming the first such field and the agents'
    values (`names`: how each agent is called, e.g. its seed or grid cell)."""
    for f in SHARED:
        values = [getattr(h, f) for h in hypers]
        if len(set(values)) > 1:
            by = {}
            for name, v in zip(names, values):
                by.setdefault(v, []).append(str(name))
            shown = "; ".join(f"{', '.join(who)}: {v}" for v, who in by.items())
            raise GroupMismatch(f"the agents of one group must share {f}, but they differ ({shown}); "
                                f"train them as separate groups")


def check_agents(hyper: Hyper, seeds: Sequence[int], hypers: Sequence[Hyper],
                 datasets: Sequence[int] | None) -> list[int]:
    """The group's seeds, checked: one settings per seed (`hypers`), sharing `hyper`'s SHARED fields; in a
    seed group each seed once, in a grid (settings or data that differ) each (seed, settings, data) once."""
    if len(hypers) != len(seeds):
        raise GroupMismatch(f"{len(hypers)} agents' settings for {len(seeds)} seeds")
    data = list(datasets) if datasets is not None else [0] * len(seeds)
    if len(set(hypers)) <= 1 and len(set(data)) <= 1:  # a seed group: each seed once (and at least one)
        checked = list(check_seeds(seeds))
    else:  # a grid: a seed may recur, with other settings or data (the same start, another run)
        checked = [check_seeds([s])[0] for s in seeds]
        seen = set()
        for i, agent in enumerate(zip(checked, hypers, data)):
            if agent in seen:
                raise GroupMismatch(f"agent {i} (seed {agent[0]}) repeats an earlier agent's seed, settings and "
                                    "data; each agent trains once")
            seen.add(agent)
    check_group([hyper, *hypers], ["the group", *(f"agent {i} (seed {s})" for i, s in enumerate(checked))])
    return checked
