"""The divergence guard: a non-finite loss or weight stops the run before it reaches a checkpoint.

Two checks, neither adding a host read to the step:
- at each log row, the interval's mean losses (already on the host) and the largest |weight| of
  the four networks, one device reduction queued just before the log read, which waits for it;
- before each checkpoint (a host read anyway), every tensor of the agent's state, so a state
  that went bad between two log rows is never written.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .update import METRICS


class Diverged(RuntimeError):
    def __init__(self, step: int, what: str, kept: str = ""):
        super().__init__(step, what)
        self.step, self.what, self.kept = step, what, kept  # kept: what the training loop left on disk

    def __str__(self):
        return f"training diverged at step {self.step}: {self.what}" + (f". {self.kept}" if self.kept else "")


def what_is_kept(last_good: tuple[Path, int] | None) -> str:
    if last_good is None:
        return "No checkpoint was written before it; start again with a lower --lr or other settings"
    return (f"The last good checkpoint, {last_good[0]} (step {last_good[1]}), is kept as it was; resuming it "
            "repeats the same numbers, so start a new run (another --out) with a lower --lr or other settings")


class WeightWatch:
    """max |w| over every parameter of each agent's networks (FastDTQL.params(): packed tensors, agent
    dimension first): NaN if any weight is NaN, inf if any is inf."""

    def __init__(self, params: dict[str, dict[str, torch.Tensor]]):
        # The same tensors for the whole run, updated in place by the step and by load_state_dict.
        self.params = [p for net in params.values() for p in net.values()]

    def queue(self) -> torch.Tensor:
        per_tensor = [torch.linalg.vector_norm(p.flatten(1), math.inf, dim=1) for p in self.params]
        return torch.stack(per_tensor).amax(dim=0)


def check_log_row(step: int, metrics: list[dict[str, float]], weight_max: torch.Tensor, labels: list[str]):
    """Raise Diverged if a logged loss or the weights are not finite (after the log read synced).
    metrics: one dict per agent (FastDTQL.read_metrics), weight_max one value per agent (WeightWatch);
    what is not finite is named with its agent's label ("seed 7: ", "alpha=5, seed 7: "; "" where the run has
    one seed)."""
    weights = weight_max.tolist()
    bad = []
    for label, m, w in zip(labels, metrics, weights):
        bad += [f"{label}{k} = {v}" for k, v in m.items() if not math.isfinite(v)]
        if not math.isfinite(w):
            bad.append(f"{label}the largest |weight| = {w}")
    if bad:
        raise Diverged(step, ", ".join(bad))


def check_state(step: int, agent_state: dict, labels: list[str]):
    """Raise Diverged, naming what (with its agent's label, as check_log_row), if any tensor of
    FastDTQL.state_dict() is not finite."""
    flat = {}
    for label, part in _parts(agent_state, labels):
        flat.update({(label, k): t for k, t in _tensors(part)})
    ok = torch.stack([torch.isfinite(t).all() for t in flat.values()]).tolist()
    bad = [k for k, good in zip(flat, ok) if not good]
    if not bad:
        return
    names = []
    for label, k in bad:
        if k == "metric_sum":  # the open log interval's running loss sums, one per METRICS entry
            sums = flat[(label, k)].tolist()
            names += [f"{label}{m} (running sum {v})" for m, v in zip(METRICS, sums) if not math.isfinite(v)]
        else:
            names.append(label + k)
    more = f" and {len(names) - 6} more" if len(names) > 6 else ""
    raise Diverged(step, "non-finite " + ", ".join(names[:6]) + more)


def _parts(agent_state: dict, labels: list[str]):
    """(label, state) pairs: each agent's own part (its networks, Adam moments and loss sums) and the
    part they share (counters, lrs)."""
    opts = agent_state["optimizers"]
    for i, label in enumerate(labels):
        yield label, {
            "modules": {k: v[i] for k, v in agent_state["modules"].items()},
            "optimizers": {k: {m: o[m][i] for m in ("exp_avg", "exp_avg_sq")} for k, o in opts.items()},
            "metric_sum": agent_state["metric_sum"][i]}
    yield "", {"optimizers": {k: {m: o[m] for m in ("lr", "step")} for k, o in opts.items()},
               "lr_step": agent_state["lr_step"], "metric_count": agent_state["metric_count"]}


def _tensors(x, prefix=""):
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            yield prefix, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _tensors(v, f"{prefix}[{i}]")
