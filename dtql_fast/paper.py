"""The DTQL paper's tables as data, every number with the table it was read from.

Paper: Tianyu Chen, Zhendong Wang, Mingyuan Zhou, "Diffusion Policies creating a Trust Region for
Offline Reinforcement Learning", NeurIPS 2024, arXiv:2405.19690. The numbers were copied by hand from
the paper's tables (the repository never reads any file for them):

- Table 1: D4RL normalised scores of the 20 D4RL tasks, DTQL's "mean ± spread" and every baseline
  column, with each domain's printed average row (`DOMAINS`, Table 1 parts).
- Table 6: the six AntMaze -v2 tasks, DTQL (the -v0 settings, 500 epochs) against SRPO.
- Table 2: compute on antmaze-umaze-v0 (s per 1k training steps, s per trajectory, epochs, hours).
- Table 7: total training + evaluation hours per task, one RTX A5000 per run (all 26 tasks).
- Table 3: the pretraining ablation; Table 5: KL-based behaviour regularisation instead of the trust region.

The paper calls the number after "±" its spread without saying which; the authors' rebuttal speaks of
5 seeds and standard errors, so read it as the spread over the paper's seeds (likely a standard error).
"""
from __future__ import annotations

from dataclasses import dataclass, field

PAPER = ("Chen, Wang & Zhou, \"Diffusion Policies creating a Trust Region for Offline Reinforcement "
         "Learning\", NeurIPS 2024, arXiv:2405.19690")
PAPER_GPU = "RTX A5000"     # Tables 2 and 7: one per run
DTQL = "DTQL"


@dataclass(frozen=True)
class Score:
    """A printed "mean ± spread" (spread None where the paper prints a bare number)."""
    mean: float
    spread: float | None = None

    def contains(self, x: float) -> bool:
        """x within mean ± spread (a bare number: only itself)."""
        return abs(x - self.mean) <= (self.spread or 0.0)


@dataclass(frozen=True)
class Row:
    """One task's row of Table 1 or Table 6."""
    task: str                                   # a name of dtql_fast.tasks.TASKS
    table: str                                  # where every number of the row was read
    domain: str                                 # the Domain whose average it counts in
    dtql: Score
    baselines: tuple[tuple[str, float], ...]    # (method, score), the paper's columns in order

    def strongest_baseline(self) -> tuple[str, float]:
        """The highest baseline score of the row and its method (ties joined by "/")."""
        top = max(s for _, s in self.baselines)
        return "/".join(m for m, s in self.baselines if s == top), top


@dataclass(frozen=True)
class Domain:
    """A block of rows that the paper averages (Table 1's Gym, AntMaze, Adroit, Kitchen; Table 6)."""
    name: str
    table: str
    rows: tuple[Row, ...]
    average: dict[str, float]                   # the printed average row, by method (DTQL included)
    # Methods whose printed average is not the mean of the printed rows, even allowing for rounding
    # (a test recomputes every average and checks that exactly these disagree). DTQL's never does.
    misprinted: dict[str, float] = field(default_factory=dict)   # method -> the mean of its rows, 1 decimal

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(r.task for r in self.rows)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.rows[0].baselines) + (DTQL,)


def _domain(name: str, table: str, methods: tuple[str, ...], rows: list[tuple], average: tuple[float, ...],
            misprinted: dict[str, float] | None = None) -> Domain:
    """rows: (task, baseline scores in `methods` order, DTQL mean, DTQL spread); average: `methods` + DTQL."""
    assert len(average) == len(methods) + 1, name
    built = []
    for task, scores, mean, spread in rows:
        assert len(scores) == len(methods), task
        built.append(Row(task, table, name, Score(mean, spread), tuple(zip(methods, scores))))
    return Domain(name, table, tuple(built), dict(zip(methods + (DTQL,), average)), misprinted or {})


_GYM_METHODS = ("BC", "Onestep RL", "TD3+BC", "DT", "CQL", "IQL", "DQL", "IDQL", "SRPO")
_ADROIT_METHODS = ("BC", "BCQ", "BEAR", "BRAC-p", "BRAC-v", "REM", "CQL", "IQL", "DQL")
_KITCHEN_METHODS = ("BC", "BCQ", "BEAR", "BRAC-p", "BRAC-v", "AWR", "CQL", "IQL", "DQL")

GYM = _domain("Gym", "Table 1", _GYM_METHODS, [
    # task                           BC     Onestep TD3+BC DT     CQL    IQL    DQL    IDQL   SRPO   DTQL
    ("halfcheetah-medium-v2",        (42.6, 48.4,  48.3,  42.6,  44.0,  47.4,  51.1,  51.0,  60.4), 57.9, 0.13),
    ("hopper-medium-v2",             (52.9, 59.6,  59.3,  67.6,  58.5,  66.3,  90.5,  65.4,  95.5), 99.6, 0.87),
    ("walker2d-medium-v2",           (75.6, 81.8,  83.7,  74.0,  72.5,  78.3,  87.0,  82.5,  84.4), 89.4, 0.13),
    ("halfcheetah-medium-replay-v2", (36.3, 38.1,  44.6,  36.0,  45.2,  44.2,  47.8,  45.9,  51.4), 50.9, 0.11),
    ("hopper-medium-replay-v2",      (18.1, 97.5,  60.9,  82.7,  95.0,  94.7,  101.3, 92.1,  101.2), 100.0, 0.13),
    ("walker2d-medium-replay-v2",    (26.0, 49.5,  81.8,  66.6,  77.2,  73.9,  95.5,  85.1,  84.6), 88.5, 2.16),
    ("halfcheetah-medium-expert-v2", (55.2, 93.4,  90.7,  86.8,  91.6,  86.7,  96.8,  95.9,  92.2), 92.7, 0.2),
    ("hopper-medium-expert-v2",      (52.5, 103.3, 98.0,  107.6, 105.8, 91.5,  111.1, 108.6, 100.1), 109.3, 1.49),
    ("walker2d-medium-expert-v2",    (101.9, 113.0, 110.1, 107.1, 109.4, 109.6, 110.1, 112.7, 114.0), 110.0, 0.07),
], average=(51.9, 76.1, 75.3, 74.7, 77.6, 77.0, 88.0, 82.1, 87.1, 88.7), misprinted={
    "BC": 51.2,
    "DT": 74.6,
})

ANTMAZE_V0 = _domain("AntMaze", "Table 1", _GYM_METHODS, [
    # task                       BC    Onestep TD3+BC DT    CQL   IQL   DQL   IDQL  SRPO  DTQL
    ("antmaze-umaze-v0",         (54.6, 64.3, 78.6,  59.2, 74.0, 87.5, 93.4, 94.0, 90.8), 94.8, 1.00),
    ("antmaze-umaze-diverse-v0", (45.6, 60.7, 71.4,  53.0, 84.0, 62.2, 66.2, 80.2, 59.0), 78.8, 1.83),
    ("antmaze-medium-play-v0",   (0.0,  10.6, 0.0,   0.0,  61.2, 71.2, 76.6, 84.5, 73.0), 79.6, 1.8),
    ("antmaze-medium-diverse-v0", (0.0, 3.0,  0.2,   0.0,  53.7, 70.0, 78.6, 84.8, 65.2), 82.2, 1.71),
    ("antmaze-large-play-v0",    (0.0,  0.0,  0.0,   0.0,  15.8, 39.6, 46.4, 63.5, 38.8), 52.0, 2.23),
    ("antmaze-large-diverse-v0", (0.0,  0.0,  0.0,   0.0,  14.9, 47.5, 56.6, 67.9, 33.8), 54.0, 2.23),
], average=(16.7, 20.9, 27.3, 18.7, 50.6, 63.0, 69.6, 79.1, 30.1, 73.6), misprinted={
    # Onestep's and TD3+BC's printed averages are both met if their two medium cells are swapped
    # (Onestep 0.0, 0.2 -> 20.9; TD3+BC 10.6, 3.0 -> 27.3); the rows are kept as printed.
    "Onestep RL": 23.1,
    "TD3+BC": 25.0,
    "SRPO": 60.1,
})

ADROIT = _domain("Adroit", "Table 1", _ADROIT_METHODS, [
    # task           BC    BCQ   BEAR  BRAC-p BRAC-v REM   CQL   IQL   DQL   DTQL
    ("pen-human-v1", (25.8, 68.9, -1.0, 8.1,  0.6,  5.4,  35.2, 71.5, 72.8), 64.1, 2.97),
    ("pen-cloned-v1", (38.3, 44.0, 26.5, 1.6, -2.5, -1.0, 27.2, 37.3, 57.3), 81.3, 3.04),
], average=(32.1, 56.5, 12.8, 4.9, -1.0, 2.2, 31.2, 54.4, 65.1, 72.7))

KITCHEN = _domain("Kitchen", "Table 1", _KITCHEN_METHODS, [
    # task                  BC    BCQ   BEAR  BRAC-p BRAC-v AWR   CQL   IQL   DQL   DTQL
    ("kitchen-complete-v0", (33.8, 8.1,  0.0,  0.0,  0.0,  0.0,  43.8, 62.5, 84.0), 80.8, 1.06),
    ("kitchen-partial-v0",  (33.8, 18.9, 13.1, 0.0,  0.0,  15.4, 49.8, 46.3, 60.5), 74.4, 0.25),
    ("kitchen-mixed-v0",    (47.5, 8.1,  47.2, 0.0,  0.0,  10.6, 51.0, 51.0, 62.6), 60.2, 0.59),
], average=(38.4, 11.7, 20.1, 0.0, 0.0, 8.7, 48.2, 53.3, 69.0, 71.8))

# Table 6: the -v2 AntMaze files, which Table 1 lacks (DTQL with the -v0 settings, 500 epochs; SRPO
# from its own paper). Our -v2 tasks are compared with these, never with Table 1's -v0 rows.
ANTMAZE_V2 = _domain("AntMaze -v2", "Table 6", ("SRPO",), [
    ("antmaze-umaze-v2",          (97.1,), 92.6, 1.24),
    ("antmaze-umaze-diverse-v2",  (82.1,), 74.4, 1.95),
    ("antmaze-medium-play-v2",    (80.7,), 76.0, 1.91),
    ("antmaze-medium-diverse-v2", (75.0,), 80.6, 1.77),
    ("antmaze-large-play-v2",     (53.6,), 59.2, 2.19),
    ("antmaze-large-diverse-v2",  (53.6,), 62.0, 2.17),
], average=(73.6, 74.1))

DOMAINS: tuple[Domain, ...] = (GYM, ANTMAZE_V0, ADROIT, KITCHEN, ANTMAZE_V2)
ROWS: dict[str, Row] = {r.task: r for d in DOMAINS for r in d.rows}   # the 26 tasks of Tables 1 and 6


def row(task: str) -> Row | None:
    return ROWS.get(task)


def domain_of(task: str) -> Domain | None:
    r = ROWS.get(task)
    return None if r is None else next(d for d in DOMAINS if d.name == r.domain)


def paper_score(task: str) -> float | None:
    """DTQL's mean for a task (Table 1; Table 6 for AntMaze -v2), or None when the paper has none."""
    r = ROWS.get(task)
    return None if r is None else r.dtql.mean


# -- compute -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Compute:
    """One method's column of Table 2 (antmaze-umaze-v0, one RTX A5000 per run)."""
    train_s_per_1k: float       # training time, s per 1000 steps
    infer_s_per_trajectory: float
    epochs: int
    total_h: float              # for DTQL: (50 pretraining + 500) epochs x 1000 steps at the rate above


TABLE2_TASK = "antmaze-umaze-v0"
TABLE2: dict[str, Compute] = {
    "DQL": Compute(24.13, 3.03, 1000, 6.70),
    "IDQL": Compute(17.57, 3.04, 3000, 14.64),
    "SRPO": Compute(24.71, 0.22, 1000, 9.42),
    DTQL: Compute(21.83, 0.35, 500, 3.33),
}


@dataclass(frozen=True)
class Hours:
    """Table 7: one run of one seed, all the task's epochs with its evaluations (10 episodes for Gym,
    100 for the other tasks), one RTX A5000."""
    hours: float
    epochs: int


TABLE7: dict[str, Hours] = {
    "halfcheetah-medium-v2": Hours(5.1, 1000),
    "halfcheetah-medium-replay-v2": Hours(5.1, 1000),
    "halfcheetah-medium-expert-v2": Hours(5.5, 1000),
    "hopper-medium-v2": Hours(5.0, 1000),
    "hopper-medium-replay-v2": Hours(5.4, 1000),
    "hopper-medium-expert-v2": Hours(5.2, 1000),
    "walker2d-medium-v2": Hours(4.9, 1000),
    "walker2d-medium-replay-v2": Hours(4.9, 1000),
    "walker2d-medium-expert-v2": Hours(4.9, 1000),
    "antmaze-umaze-v0": Hours(3.3, 500),
    "antmaze-umaze-diverse-v0": Hours(4.0, 500),
    "antmaze-medium-play-v0": Hours(3.1, 400),
    "antmaze-medium-diverse-v0": Hours(3.2, 400),
    "antmaze-large-play-v0": Hours(2.3, 350),
    "antmaze-large-diverse-v0": Hours(2.6, 300),
    "antmaze-umaze-v2": Hours(3.3, 500),
    "antmaze-umaze-diverse-v2": Hours(3.1, 500),
    "antmaze-medium-play-v2": Hours(3.1, 500),
    "antmaze-medium-diverse-v2": Hours(3.1, 500),
    "antmaze-large-play-v2": Hours(3.3, 500),
    "antmaze-large-diverse-v2": Hours(3.3, 500),
    "pen-human-v1": Hours(1.4, 300),
    "pen-cloned-v1": Hours(0.6, 200),
    "kitchen-complete-v0": Hours(3.0, 500),
    "kitchen-partial-v0": Hours(6.1, 1000),
    "kitchen-mixed-v0": Hours(3.0, 500),
}
TABLE7_TOTAL_H = 97.8           # the paper's sum over the 26 tasks, one seed each


# -- ablations -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pretraining:
    """Table 3: DTQL with its 50 pretraining epochs (Table 1's numbers) and with none."""
    with_pretraining: float
    without: float


TABLE3: dict[str, Pretraining] = {
    "halfcheetah-medium-v2": Pretraining(57.9, 57.5),
    "hopper-medium-v2": Pretraining(99.6, 87.6),
    "walker2d-medium-v2": Pretraining(89.4, 88.7),
}

# Table 5: the KL-based behaviour regularisation in place of the trust region (DTQL's own: Table 1).
TABLE5_KL: dict[str, float] = {
    "halfcheetah-medium-v2": 24.1,
    "hopper-medium-v2": 15.0,
    "walker2d-medium-v2": 3.4,
}
