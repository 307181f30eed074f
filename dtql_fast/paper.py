"""The DTQL paper's Table 1 (D4RL normalised scores) as data, with where each number was read.

Paper: Tianyu Chen, Zhendong Wang, Mingyuan Zhou, "Diffusion Policies creating a Trust Region for
Offline Reinforcement Learning", NeurIPS 2024, arXiv:2405.19690.

Only numbers that were found in a source are here; a task whose number was not found is None
(`python -m dtql_fast.report` then leaves the comparison blank). The paper itself could not be read
when this file was written: the per-task numbers come from a later paper that reprints DTQL's
column, and they agree with the paper's numbers that our spec quotes (walker2d-medium-v2 89.4,
hopper-medium-v2 99.6, halfcheetah-medium-v2 57.9, Gym average 88.7; a test checks this). No
per-task AntMaze or Kitchen number was found; the AntMaze average is the spec's.
"""
from __future__ import annotations

from dataclasses import dataclass

SPEC = ("the project's algorithm page, docs/algorithm.md, \"Paper numbers used for comparison\", "
        "which quotes the DTQL paper")
DOSER = ("Wang et al., \"Beyond Penalization: Diffusion-based Out-of-Distribution Detection and Selective "
         "Regularization in Offline Reinforcement Learning\" (DOSER), ICLR 2026, arXiv:2605.08202, Table 1, "
         "DTQL column (\"baseline performance is taken from original papers\")")


@dataclass(frozen=True)
class PaperScore:
    score: float | None      # normalised score, mean over the paper's seeds; None: not found
    source: str | None       # where the number was read; None when score is None


def _found(score: float, source: str = DOSER) -> PaperScore:
    return PaperScore(score, source)


NOT_FOUND = PaperScore(None, None)

# Keys are the task names of dtql_fast.tasks.TASKS (tests check that every key is one).
TABLE1: dict[str, PaperScore] = {
    "halfcheetah-medium-v2": _found(57.9),
    "hopper-medium-v2": _found(99.6),
    "walker2d-medium-v2": _found(89.4),
    "halfcheetah-medium-replay-v2": _found(50.9),
    "hopper-medium-replay-v2": _found(100.0),
    "walker2d-medium-replay-v2": _found(88.5),
    "halfcheetah-medium-expert-v2": _found(92.7),
    "hopper-medium-expert-v2": _found(109.3),
    "walker2d-medium-expert-v2": _found(110.0),
    "pen-human-v1": _found(64.1),
    "pen-cloned-v1": _found(81.3),
    "antmaze-umaze-v0": NOT_FOUND,
    "antmaze-umaze-diverse-v0": NOT_FOUND,
    "antmaze-medium-play-v0": NOT_FOUND,
    "antmaze-medium-diverse-v0": NOT_FOUND,
    "antmaze-large-play-v0": NOT_FOUND,
    "antmaze-large-diverse-v0": NOT_FOUND,
    "antmaze-umaze-v2": NOT_FOUND,
    "antmaze-umaze-diverse-v2": NOT_FOUND,
    "antmaze-medium-play-v2": NOT_FOUND,
    "antmaze-medium-diverse-v2": NOT_FOUND,
    "antmaze-large-play-v2": NOT_FOUND,
    "antmaze-large-diverse-v2": NOT_FOUND,
    "kitchen-complete-v0": NOT_FOUND,
    "kitchen-partial-v0": NOT_FOUND,
    "kitchen-mixed-v0": NOT_FOUND,
}

# Domain averages as published (not recomputed from TABLE1, which lacks some domains' tasks).
AVERAGES: dict[str, PaperScore] = {
    "gym": PaperScore(88.7, SPEC),
    "antmaze-v0": PaperScore(73.6, SPEC),
    "adroit": _found(72.7),
}


def paper_score(task: str) -> float | None:
    """The paper's Table 1 score for a task, or None (not in the table, or not found)."""
    entry = TABLE1.get(task)
    return entry.score if entry is not None else None
