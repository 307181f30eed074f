"""The algorithm's hyperparameters (spec "Hyperparameters"), each declared once with its rules.

A field's metadata holds them: whether the agents of one group may each set their own (`per_agent`:
a per-agent device tensor, so another grid never recompiles) or must share it (shapes, schedule,
acting, the action box the losses clamp to); the range a flag giving it must lie in (`need`); whether a
resume may change it (`resume`; else the run's checkpoint fixes it); and its flag's help. PER_AGENT and
SHARED (groups.py), and the flags' checks and resume rules (config.py), are read from it, in field order.
The values of each task of the paper are tasks.py's table.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass, field
from typing import Callable

Need = tuple[Callable[[float], bool], str]  # (test, what it takes), as a refused flag's message says it


def at_least(lo: int) -> Need:
    return lambda v: v >= lo, f">= {lo}"


def finite_at_least(lo: float) -> Need:
    return lambda v: math.isfinite(v) and v >= lo, f"a finite number >= {lo:g}"


FINITE_POSITIVE: Need = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
OPEN_UNIT: Need = (lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def setting(default=MISSING, *, per_agent: bool, need: Need | None = None, resume: bool = False,
            help: str | None = None):
    """A Hyper field with its rules as metadata (see the module's docstring)."""
    return field(default=default, metadata={"per_agent": per_agent, "need": need, "resume": resume, "help": help})


@dataclass(frozen=True)
class Hyper:
    alpha: float = setting(per_agent=True, need=finite_at_least(0), help="trust-region weight")
    gamma: float = setting(per_agent=True, need=finite_at_least(0), help="entropy-term weight")
    lr: float = setting(per_agent=True, need=FINITE_POSITIVE,  # the diffusion net's and the policy's
                        help="diffusion and policy learning rate (the critic always uses 3e-4)")
    lr_decay: bool = setting(per_agent=True)
    epochs: int = setting(per_agent=False, need=at_least(1), resume=True)
    batch_size: int = setting(256, per_agent=False, need=at_least(1))
    expectile: float = setting(0.7, per_agent=True, need=OPEN_UNIT)
    discount: float = setting(0.99, per_agent=True)
    tau: float = setting(0.005, per_agent=True)
    critic_lr: float = setting(3e-4, per_agent=True)  # release quirk: the task's lr never applies to the critic
    steps_per_epoch: int = setting(1000, per_agent=False, need=at_least(1))
    pretrain_epochs: int = setting(50, per_agent=False, need=at_least(0))
    eval_every: int = setting(50, per_agent=False, need=at_least(1), resume=True, help="evaluate every N epochs")
    num_candidates: int = setting(1024, per_agent=False)  # R, actions scored per state when acting
    noise_levels: int = setting(1, per_agent=False, need=at_least(1),  # K; 1 is the reference
                                help="K noise levels per row in both EDM losses (1: the paper)")
    hidden: int = setting(256, per_agent=False)
    max_action: float = setting(1.0, per_agent=False)

    @property
    def total_steps(self) -> int:
        """Training steps only (the lr schedule's length): pretraining not counted. See run_steps."""
        return self.epochs * self.steps_per_epoch

    @property
    def run_steps(self) -> int:
        """A whole run's steps: pretraining + training (what train.py runs, a finished run reaches)."""
        return run_steps(self.pretrain_epochs, self.epochs, self.steps_per_epoch)

    def replace(self, **kw) -> "Hyper":
        return dataclasses.replace(self, **kw)


def run_steps(pretrain_epochs: int, epochs: int, steps_per_epoch: int) -> int:
    """A whole run's steps, pretraining + training: Hyper.run_steps, and a run's config.json "hyper"."""
    return (pretrain_epochs + epochs) * steps_per_epoch


# What the agents of one group may each set for themselves, and what they must share, in field order.
PER_AGENT = tuple(f.name for f in dataclasses.fields(Hyper) if f.metadata["per_agent"])
SHARED = tuple(f.name for f in dataclasses.fields(Hyper) if not f.metadata["per_agent"])
