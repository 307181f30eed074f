"""python -m dtql_fast.report FOLDER: the sweep's results beside the DTQL paper's tables.

FOLDER is a sweep (python -m dtql_fast.sweep --out) or any folder holding run folders (train.py's
--out: one seed, or a seed group of train --seeds, read as its seeds) at any depth. Per task: our
normalised score at the last evaluation, mean ± sample std over seeds, its standard error and the
number of seeds; at the best evaluation (best-of-run: each seed's highest, picked after the fact, so it
overstates); the paper's DTQL mean ± spread (Table 1; Table 6 for AntMaze -v2), the strongest
baseline of the paper's row, whether ours lies within the paper's spread and by how many of our
standard errors it differs. Domain averages as the paper forms them. Time per task: our hours beside
Table 7's, the speedup, and the paper's full schedule projected from our training rate where a run was
shorter. Data that is not the paper's (a Minari id, another file given to --dataset) is said so and
not compared. Writes report.md, report.csv, paper_vs_ours.png (ours against the paper per task) and
curves_<task>.png (mean over seeds with a ± std band) to --out (default FOLDER/report) and prints the
Markdown. Runs not finished (still going, or stopped) count with their latest evaluation and are
marked; failed runs are listed with their error and left out of the numbers.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import paper, runfolder, runstatus
from .curves import draw_mean_curve, mean_curve, mean_std
from .hyper import run_steps
from .runlog import TIME_PARTS
from .tasks import TASKS, one_per_task

MARK_UNFINISHED = "†"


# -- one run's time --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunTime:
    """One training process's time (summary.json "time") and what the paper's full schedule takes at it."""
    process_s: float            # this process's wall seconds
    hours: float                # the full schedule: measured when this process ran all of it, else projected
    projected: bool
    steps: int                  # steps this process ran
    full_steps: int             # the paper's schedule (a task not in the paper: the run's own)
    s_per_1k: float             # training seconds per 1000 steps (compiling and evaluating apart)
    evals_measured: bool        # False: no evaluation ran in this process (a projection leaves them out)
    hardware: str
    seeds: int                  # agents trained together in the process (a seed group shares one time)
    split: dict | None = None   # summary.json's time split (runlog.TIME_PARTS, seconds); None: a run before it
    off_path_eval_s: float = 0.0  # an evaluation worker's seconds, beside training rather than in the total


def _schedule(task: str, cfg: dict) -> tuple[int, int, int, int]:
    """(pretrain epochs, epochs, steps per epoch, eval every) of the paper's schedule for a task of its
    tables (Table 7 times all of it: 50 pretraining epochs + the task's epochs, 1000 steps each), else
    of the run's own config."""
    if task in TASKS:
        h = TASKS[task].hyper
        return h.pretrain_epochs, h.epochs, h.steps_per_epoch, h.eval_every
    h = cfg.get("hyper", {})
    return h.get("pretrain_epochs", 0), h.get("epochs", 0), h.get("steps_per_epoch", 0), h.get("eval_every", 1)


def run_time(task: str, cfg: dict, summary: dict | None, eval_rows: list[dict], seeds: int) -> RunTime | None:
    """None for a run without "time" in its summary.json (made before train.py wrote one, or not finished).

    A process that ran the whole schedule from step 0 is measured. Any other (a shorter schedule, or a
    resumed run, whose summary times only its last process) is projected: compiling once, training at
    its measured rate (train_s / steps; pretraining steps counted at that rate too) for the full
    schedule's steps, and its measured seconds per evaluation, scaled to the task's evaluation
    episodes, for the full schedule's evaluations."""
    t = (summary or {}).get("time")
    if not t or not t.get("steps"):
        return None
    pre, epochs, spe, every = _schedule(task, cfg)
    full = run_steps(pre, epochs, spe)
    if not full:  # no schedule to time (a config.json without "hyper")
        return None
    steps, first = t["steps"], t.get("first_step", 0)
    rate = t["train_s"] / steps
    ran = sorted({r["step"] for r in eval_rows if first < r["step"] <= first + steps})
    if first == 0 and steps == full:
        hours, projected = t["total_s"] / 3600, False
    else:
        evals = 0.0
        if ran:
            episodes = next(r.get("episodes") for r in eval_rows if r["step"] == ran[0]) or 1
            wanted = TASKS[task].eval_episodes if task in TASKS else episodes
            evals = t["eval_s"] / len(ran) * wanted / episodes * math.ceil(epochs / every)
        hours, projected = (t["compile_s"] + rate * full + evals) / 3600, True
    split = {k: t["split"].get(f"{k}_s", 0.0) for k in TIME_PARTS} if "split" in t else None
    return RunTime(t["total_s"], hours, projected, steps, full, rate * 1000, bool(ran),
                   t.get("hardware", "unknown machine"), seeds, split, t.get("eval_off_path_s", 0.0))


# -- where a run's data came from ------------------------------------------------------------------------

def data_note(task: str, cfg: dict) -> str | None:
    """Why a run is not compared with the paper; None: a task of the paper's tables on the paper's data."""
    from .data import OFFLINE_DATASET_ID, is_minari_id  # data imports gymnasium: only when a report is made

    if task == OFFLINE_DATASET_ID:
        return "this project's offline demo data: not in the paper"
    if is_minari_id(task):
        return ("Minari dataset, re-collected on newer environments: not the paper's data, no Table 1 "
                "comparison")
    if paper.row(task) is None:
        return "not in the paper's tables"
    dataset, source = cfg.get("config", {}).get("dataset"), cfg.get("source")
    tasks = cfg.get("config", {}).get("task")
    if isinstance(tasks, list) and task in tasks:  # a run over a --task list: this task's own file
        at = tasks.index(task)
        dataset, source = one_per_task(dataset, len(tasks))[at], one_per_task(source, len(tasks))[at]
    # Without --dataset train.py reads D4RL's file from its cache. With it, the file read (config.json's
    # "source") is D4RL's when it bears D4RL's file name (a folder holding the D4RL files, or the file
    # itself kept elsewhere); any other file is some other data under the task's name.
    source = Path(source or dataset or "")
    d4rl_name = Path(TASKS[task].d4rl_url).name
    if dataset is not None and source.name != d4rl_name:
        return f"not the paper's data: trained on {source} (--dataset), not D4RL's {d4rl_name}"
    return None


# -- runs and tasks --------------------------------------------------------------------------------------

@dataclass
class SeedRun:
    task: str
    seed: int | None
    run_dir: Path
    state: str                                  # runstatus.run_state: finished, running, failed, unfinished, ...
    evals: list[tuple[int, float]] = field(default_factory=list)   # (step, score)
    kind: str = "score"                         # "score" (normalised) or "return" when the task has no reference scores
    step: int | None = None
    total: int | None = None
    error: str | None = None
    data_note: str | None = None                # see data_note
    time: RunTime | None = None                 # a seed group's seeds share their process's
    problems: list[str] = field(default_factory=list)   # runstatus.problems: what could not be read, how it ended
    setting: str | None = None                  # a grid's cell (train --alpha 1,5: "alpha=5"); None outside a grid

    @property
    def last(self) -> float | None:
        return self.evals[-1][1] if self.evals else None

    @property
    def best(self) -> float | None:
        return max(s for _, s in self.evals) if self.evals else None


@dataclass(frozen=True)
class TaskTime:
    """A task's runs' time: hours of the paper's full schedule (Table 7's measure) per run and per seed."""
    runs: list[RunTime]         # one per timed process
    untimed: int                # counted runs without a time: unknown
    paper_hours: float | None   # Table 7 (one seed, one RTX A5000)

    @property
    def hours_per_run(self) -> float | None:
        return sum(t.hours for t in self.runs) / len(self.runs) if self.runs else None

    @property
    def hours_per_seed(self) -> float | None:
        """Machine-hours per seed: a seed group trains its seeds in one process (Table 7: one seed a run)."""
        return sum(t.hours for t in self.runs) / sum(t.seeds for t in self.runs) if self.runs else None

    @property
    def speedup(self) -> float | None:
        h = self.hours_per_seed
        return None if h is None or self.paper_hours is None else self.paper_hours / h

    @property
    def s_per_1k(self) -> float | None:
        return sum(t.s_per_1k for t in self.runs) / len(self.runs) if self.runs else None

    @property
    def hardware(self) -> str:
        return "; ".join(sorted({t.hardware for t in self.runs})) or "–"

    @property
    def projected(self) -> int:
        return sum(t.projected for t in self.runs)

    @property
    def split(self) -> tuple[int, float, dict[str, float], float] | None:
        """Where the time of the processes with a split went: (how many, their wall seconds, seconds per part,
        an evaluation worker's seconds beside them); None when none has a split."""
        split = [t for t in self.runs if t.split is not None]
        if not split:
            return None
        return (len(split), sum(t.process_s for t in split),
                {k: sum(t.split[k] for t in split) for k in TIME_PARTS}, sum(t.off_path_eval_s for t in split))


@dataclass
class TaskRow:
    task: str
    kind: str
    seeds: int                 # runs counted in the numbers (finished or not, failed excluded)
    unfinished: int            # of which not finished (still going, or stopped)
    failed: int
    last: tuple[float, float | None] | None     # (mean, std over seeds; None with one seed)
    best: tuple[float, float | None] | None
    paper: float | None                         # DTQL's mean (paper_row's); None: no comparison
    paper_row: paper.Row | None = None          # None: not in the paper, or not the paper's data (data_note)
    data_note: str | None = None
    time: TaskTime | None = None

    @property
    def last_se(self) -> float | None:
        """Standard error of the last-evaluation mean over seeds (None with one seed)."""
        return None if self.last is None or self.last[1] is None else self.last[1] / math.sqrt(self.seeds)

    @property
    def last_diff(self) -> float | None:
        return None if self.last is None or self.paper is None else self.last[0] - self.paper

    @property
    def best_diff(self) -> float | None:
        return None if self.best is None or self.paper is None else self.best[0] - self.paper

    @property
    def within_spread(self) -> bool | None:
        """Our last-evaluation mean within the paper's DTQL mean ± spread."""
        return None if self.last is None or self.paper_row is None else self.paper_row.dtql.contains(self.last[0])

    @property
    def diff_in_se(self) -> float | None:
        """(ours − paper) in our standard errors."""
        d, se = self.last_diff, self.last_se
        return None if d is None or not se else d / se


@dataclass(frozen=True)
class DomainRow:
    """Ours averaged over a domain's tasks as the paper averages them: the plain mean of the per-task means."""
    domain: paper.Domain
    tasks: tuple[str, ...]      # ours, on the paper's data, with a score
    last: float
    last_se: float | None       # of the average, from the tasks' standard errors (None if one lacks one)
    best: float
    paper: float                # the printed average with every task; else the mean of the paper's rows of ours

    @property
    def complete(self) -> bool:
        return set(self.tasks) == set(self.domain.tasks)

    @property
    def last_diff(self) -> float:
        return self.last - self.paper


def _is_run_dir(d: Path) -> bool:
    return any((d / name).is_file() for name in (runfolder.CONFIG, runstatus.STATUS, runfolder.METRICS))


def discover(root: Path) -> list[SeedRun]:
    """Every run under root (root itself may be one), one SeedRun per seed."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give a sweep folder (python -m dtql_fast.sweep --out) "
                                "or a folder holding run folders (python -m dtql_fast.train --out)")
    dirs = [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
    found = []
    for d in dirs:
        if _is_run_dir(d):
            found.extend(_read_run(d))
    return found


def _read_run(d: Path) -> list[SeedRun]:
    cfg = runstatus.read_json(d / runfolder.CONFIG) or {}
    status = runstatus.read_status(d)
    task = cfg.get("task") or status.get("task") or d.name
    state = runstatus.run_state(d, None)
    train_rows, eval_rows = runstatus.metric_rows(d)
    total = runstatus.planned_steps_from_config(d)
    step = train_rows[-1]["step"] if train_rows else None
    if state == "finished":  # how far it got is summary.json's word (its rows may be cut: runstatus.problems says so)
        step = (runstatus.read_json(d / runfolder.SUMMARY) or {}).get("steps", step)
    error = status.get("error") if state == "failed" else None
    # A seed group's folder (train --seeds; the sweep writes "seeds" in status.json too, before config.json
    # exists) holds every seed's rows, each tagged with its seed; a single run's rows are all its one seed's.
    group = cfg.get("config", {}).get("seeds") or status.get("seeds")
    # A grid's folder (train --alpha 1,5) tags each row with its setting too: one agent per setting and seed.
    cells = list(dict.fromkeys(r["setting"] for r in train_rows + eval_rows if "setting" in r)) or [None]
    if isinstance(task, str) and "," in task:  # a packed run's status.json, before config.json: its task list
        task = task.split(",")
    if isinstance(task, list) and cells == [None]:  # a task list that wrote no rows (failed early): its tasks
        cells = [f"task={t}" for t in task]
    if isinstance(group, list) or cells != [None]:
        seeds = group if isinstance(group, list) else [cfg.get("config", {}).get("seed") or 0]
        per_seed = [((c, s), [r for r in eval_rows if r.get("seed") == s and r.get("setting") == c])
                    for c in cells for s in seeds]
    else:
        per_seed = [((None, cfg.get("config", {}).get("seed", status.get("seed"))), eval_rows)]
    problems = runstatus.problems(d)
    summary = runstatus.read_json(d / runfolder.SUMMARY)
    out = []
    for (setting, s), rows in per_seed:
        agent_task, setting = _task_of(task, setting)
        note = data_note(agent_task, cfg)
        timed = run_time(agent_task, cfg, summary, eval_rows, len(per_seed))
        kind = "score" if all(r.get("score_mean") is not None for r in rows) else "return"
        evals = [(r["step"], r["score_mean"] if kind == "score" else r["return_mean"]) for r in rows]
        out.append(SeedRun(agent_task, s, d, state, evals, kind, step, total, error, note, timed, problems, setting))
    return out


def _task_of(task, setting: str | None) -> tuple[str, str | None]:
    """An agent's task and the rest of its grid cell: a run over a --task list names each agent's task first
    in its setting ("task=hopper-medium-v2,alpha=5"); its agents at their task's own settings have no rest
    (None), as in a run of one task."""
    if not isinstance(task, list):
        return task, setting
    head, _, rest = setting.partition(",")
    return head.removeprefix("task="), rest or None


def _task_time(task: str, counted: list[SeedRun]) -> TaskTime:
    by_dir = {r.run_dir: r for r in counted}        # a seed group's seeds share one process, timed once
    hours = paper.TABLE7.get(task)
    return TaskTime(runs=[r.time for r in by_dir.values() if r.time is not None],
                    untimed=sum(r.time is None for r in by_dir.values()),
                    paper_hours=hours.hours if hours else None)


def summarise(seed_runs: list[SeedRun]) -> list[TaskRow]:
    """One row per task and data source (a task trained on the paper's data and on other data: two rows)."""
    rows = []
    for task, note in sorted({(r.task, r.data_note) for r in seed_runs}, key=lambda k: (k[0], k[1] or "")):
        mine = [r for r in seed_runs if r.task == task and r.data_note == note]
        counted = [r for r in mine if r.state != "failed" and r.evals]
        kind = "score" if all(r.kind == "score" for r in counted) else "return"
        ref = paper.row(task) if note is None else None
        rows.append(TaskRow(task=task, kind=kind, seeds=len(counted),
                            unfinished=sum(r.state != "finished" for r in counted),
                            failed=sum(r.state == "failed" for r in mine),
                            last=mean_std([r.last for r in counted]), best=mean_std([r.best for r in counted]),
                            paper=ref.dtql.mean if ref else None, paper_row=ref, data_note=note,
                            time=_task_time(task, [r for r in mine if r.state != "failed"])))
    return rows


def domain_averages(rows: list[TaskRow]) -> list[DomainRow]:
    """Per paper domain with any task of ours (on the paper's data, scored): the mean over its tasks."""
    out = []
    for dom in paper.DOMAINS:
        mine = [r for r in rows if r.paper_row is not None and r.paper_row.domain == dom.name
                and r.kind == "score" and r.last is not None]
        if not mine:
            continue
        n = len(mine)
        ses = [r.last_se for r in mine]
        complete = {r.task for r in mine} == set(dom.tasks)
        out.append(DomainRow(
            domain=dom, tasks=tuple(r.task for r in mine), last=sum(r.last[0] for r in mine) / n,
            last_se=None if None in ses else math.sqrt(sum(s * s for s in ses)) / n,
            best=sum(r.best[0] for r in mine) / n,
            paper=dom.average[paper.DTQL] if complete else sum(r.paper for r in mine) / n))
    return out


# -- formatting ------------------------------------------------------------------------------------------

def _ms(x: tuple[float, float | None] | None) -> str:
    if x is None:
        return "–"
    return f"{x[0]:.1f}" if x[1] is None else f"{x[0]:.1f} ± {x[1]:.1f}"


def _num(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else (f"{x:+.1f}" if signed else f"{x:.1f}")


def _pm(x: float | None) -> str:
    return "–" if x is None else f"± {x:.2f}"


def _yes(x: bool | None) -> str:
    return "–" if x is None else ("yes" if x else "no")


def _hours(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.2f}"


def _speedup(t: TaskTime) -> str:
    s = t.speedup
    return "–" if s is None else f"{s:.2f}× ({t.hardware} vs {paper.PAPER_GPU})"


def time_basis(t: TaskTime) -> str:
    """How a task's hours were got: measured, or a projection (labelled so), and what is unknown."""
    if not t.runs:
        return f"unknown: {t.untimed} run(s) without a time in summary.json"
    parts = []
    if t.projected:
        shorter = [r for r in t.runs if r.projected]
        lo, hi = min(r.steps for r in shorter), max(r.steps for r in shorter)
        ran = f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"
        parts.append(f"projection from the training rate: {t.projected} of {len(t.runs)} run(s) ran {ran} of "
                     f"{shorter[0].full_steps:,} steps in their timed process")
        if not all(r.evals_measured for r in shorter):
            parts.append("evaluations not measured, left out")
    else:
        parts.append("measured")
    if t.untimed:
        parts.append(f"{t.untimed} run(s) unknown (no time in summary.json)")
    return "; ".join(parts)


def time_split_table(rows: list[TaskRow]) -> list[str]:
    """Where our processes' hours went, part by part (summary.json's split), beside Table 7's hours."""
    split = [(r, r.time.split) for r in rows if r.time.split is not None]
    if not split:
        return []
    lines = ["", "### Where the time went", "",
             "Our timed processes' wall time (as measured, not projected), by part, as a share of it; the parts "
             "sum to it. *evaluation*: evaluating on the training's path (in-line, or handing a worker the "
             "weights); *waiting for evaluation*: training held up by a worker (train --eval-worker); *off the "
             "path*: the worker's evaluating while training went on, not in the total.", "",
             "| task | processes | hours | " + " | ".join(TIME_PARTS.values()) + " | off the path (hours) | "
             "Table 7 hours |", "|---|---|---|" + "---|" * len(TIME_PARTS) + "---|---|"]
    for r, (n, total, parts, off) in split:
        shares = " | ".join(f"{100 * parts[k] / total:.1f}%" if total else "–" for k in TIME_PARTS)
        lines.append(f"| {r.task} | {n} of {len(r.time.runs) + r.time.untimed} | {total / 3600:.3f} | {shares} | "
                     f"{off / 3600:.3f} | {_num(r.time.paper_hours)} |")
    return lines


def _domain_paper(d: DomainRow) -> str:
    if d.complete:
        return f"{d.paper:.1f}"
    return (f"{d.paper:.1f} (its rows for these {len(d.tasks)} of its {len(d.domain.tasks)} tasks; printed "
            f"average of all {len(d.domain.tasks)}: {d.domain.average[paper.DTQL]:.1f})")


def to_markdown(rows: list[TaskRow], seed_runs: list[SeedRun], root: Path) -> str:
    lines = [f"# DTQL sweep report: {root}", "",
             "Normalised score (D4RL: 0 random, 100 expert) over seeds. *last*: each seed's latest evaluation, "
             "mean ± sample std; *SE*: its standard error (std / √seeds). *best-of-run*: each seed's highest "
             "evaluation, mean ± std: picked after the fact, it overstates what a run delivers. *paper*: DTQL's "
             f"mean and ± its spread over the paper's seeds ({paper.PAPER}; numbers in `dtql_fast/paper.py`); "
             "*within*: our last mean inside the paper's mean ± spread; *(last − paper) / SE*: the difference in "
             "our standard errors; *strongest baseline*: the best other method of the paper's row.", "",
             "## Scores", "",
             "| task | seeds | last | best-of-run | paper | last − paper | best − paper | SE | paper spread | within "
             "| (last − paper) / SE | strongest baseline | source |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r.task + (f" {MARK_UNFINISHED}" if r.unfinished else "") + (" (return)" if r.kind == "return" else "")
        seeds = (f"{r.seeds}" + (f" ({r.unfinished} not finished)" if r.unfinished else "")
                 + (f" ({r.failed} failed)" if r.failed else ""))
        p = r.paper_row
        baseline = "–" if p is None else "{} {:.1f}".format(*p.strongest_baseline())
        source = r.data_note or p.table
        lines.append(f"| {name} | {seeds} | {_ms(r.last)} | {_ms(r.best)} | {_num(r.paper)} | "
                     f"{_num(r.last_diff, True)} | {_num(r.best_diff, True)} | {_pm(r.last_se)} | "
                     f"{_pm(p.dtql.spread if p else None)} | {_yes(r.within_spread)} | {_num(r.diff_in_se, True)} | "
                     f"{baseline} | {source} |")
    notes = []
    if any(r.unfinished for r in rows):
        notes.append(f"{MARK_UNFINISHED} includes runs not finished (still going, or stopped): their latest evaluation "
                     "counts as *last*.")
    if any(r.kind == "return" for r in rows):
        notes.append("(return): the task has no reference scores, so raw returns are shown.")
    if any(r.task.startswith("antmaze-") and r.task.endswith("-v2") and r.paper_row for r in rows):
        notes.append("AntMaze -v2 tasks are compared with Table 6 (DTQL with the -v0 settings, 500 epochs; its "
                     "strongest baseline is SRPO, the only other column).")
    if notes:
        lines += [""] + notes

    domains = domain_averages(rows)
    if domains:
        lines += ["", "## Domain averages", "",
                  "The mean over a domain's tasks of the per-task means, as the paper forms its averages; only "
                  "tasks on the paper's data. With some of a domain's tasks missing, the paper's side is the mean "
                  "of its rows for the same tasks.", "",
                  "| domain | source | tasks | last | SE | best-of-run | paper | last − paper |",
                  "|---|---|---|---|---|---|---|---|"]
        for d in domains:
            lines.append(f"| {d.domain.name} | {d.domain.table} | {len(d.tasks)} of {len(d.domain.tasks)} | "
                         f"{d.last:.1f} | {_pm(d.last_se)} | {d.best:.1f} | {_domain_paper(d)} | "
                         f"{d.last_diff:+.1f} |")

    timed = [r for r in rows if r.time is not None and (r.time.runs or r.time.untimed)]
    if timed:
        lines += ["", "## Time per task", "",
                  f"Hours for the paper's full schedule (50 pretraining epochs + the task's epochs, 1000 steps each, "
                  f"with its evaluations): ours from summary.json's \"time\" (measured when one process ran all "
                  f"of it; else a projection from the measured training rate, labelled so), Table 7's on one "
                  f"{paper.PAPER_GPU} per run and seed. *per seed*: a seed group trains its seeds in one process, "
                  f"so its hours are shared among them. Table 2 ({paper.TABLE2_TASK}, {paper.PAPER_GPU}): DTQL "
                  f"trains at {paper.TABLE2[paper.DTQL].train_s_per_1k} s per 1k steps.", "",
                  f"| task | runs timed | hours per run | hours per seed | Table 7 hours | speedup per seed (our "
                  f"machine vs {paper.PAPER_GPU}) | s per 1k steps | basis |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in timed:
            t = r.time
            lines.append(f"| {r.task} | {len(t.runs)} of {len(t.runs) + t.untimed} | {_hours(t.hours_per_run)} | "
                         f"{_hours(t.hours_per_seed)} | {_num(t.paper_hours)} | "
                         f"{_speedup(t)} | {_num(t.s_per_1k)} | {time_basis(t)} |")
        lines += time_split_table(timed)

    lines += settings_tables(seed_runs)
    lines += ["", "## Runs", "", "| task | seed | state | step | evaluations | last | best | process hours | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(seed_runs, key=lambda r: (r.task, r.setting or "", r.seed if r.seed is not None else -1)):
        step = f"{r.step if r.step is not None else 0:,}/{r.total:,}" if r.total else "–"
        note = "; ".join(([r.error] if r.error else []) + r.problems).replace("|", "\\|")
        hours = "unknown" if r.time is None else f"{r.time.process_s / 3600:.3f}"
        who = f"{r.setting}, {r.seed}" if r.setting is not None else r.seed
        lines.append(f"| {r.task} | {who} | {r.state} | {step} | {len(r.evals)} | {_num(r.last)} | "
                     f"{_num(r.best)} | {hours} | {note} |")
    warned = warnings(seed_runs)
    if warned:
        lines += ["", "## Warnings", "", "What the report could not read, or runs that stopped; their numbers "
                  "above are as far as they could be read.", ""]
        lines += [f"- `{d}`: {w}" for d, w in warned]
    return "\n".join(lines) + "\n"


def settings_tables(seed_runs: list[SeedRun]) -> list[str]:
    """Markdown for the grids' runs (train --alpha 1,5 ...): a table per set of varied settings, rows the
    settings, columns the tasks, cells each seed's last evaluation, mean ± sample std (and SE) over the seeds.
    Nothing where no run is a grid; Table 1 above holds only runs at the task's own settings."""
    grid = [r for r in seed_runs if r.setting is not None and r.state != "failed" and r.evals]
    if not grid:
        return []
    lines = ["", "## Settings", "",
             "Grid runs (one agent per setting and seed in one step): each seed's latest evaluation, mean ± sample std "
             "over the seeds (SE: std / √seeds). Not in the table above, which is at each task's own settings."]
    by_fields: dict[tuple, list[SeedRun]] = {}
    for r in grid:  # "alpha=5,lr=0.0001" varies alpha and lr
        by_fields.setdefault(tuple(kv.split("=")[0] for kv in r.setting.split(",")), []).append(r)
    for fields_, rs in by_fields.items():
        tasks = sorted({r.task for r in rs})
        settings = list(dict.fromkeys(r.setting for r in rs))
        lines += ["", f"### {', '.join(fields_)}", "", "| setting | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for setting in settings:
            by_task = {t.task: t for t in summarise([r for r in rs if r.setting == setting])}  # Table 1's numbers
            cells = [f"{_ms(t.last)} (SE {_pm(t.last_se)}, {t.seeds} seeds)" if (t := by_task.get(task)) else "–"
                     for task in tasks]
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return lines


def warnings(seed_runs: list[SeedRun]) -> list[tuple[Path, str]]:
    """(run folder, problem), once per folder (a seed group's seeds share theirs)."""
    seen, out = set(), []
    for r in seed_runs:
        if r.run_dir not in seen:
            seen.add(r.run_dir)
            out += [(r.run_dir, w) for w in r.problems]
    return out


CSV_FIELDS = ["task", "metric", "seeds", "unfinished", "failed", "last_mean", "last_std", "best_mean", "best_std",
              "paper", "last_minus_paper", "best_minus_paper", "last_se", "paper_spread", "within_paper_spread",
              "diff_in_se", "strongest_baseline", "strongest_baseline_score", "paper_table", "data_note",
              "hours_per_run", "hours_per_seed", "table7_hours", "speedup_per_seed", "hardware", "s_per_1k_steps",
              "time_basis", *(f"{k}_s" for k in TIME_PARTS), "eval_off_path_s"]


def to_csv(rows: list[TaskRow], path: Path):
    def r1(x):
        return "" if x is None else round(x, 4)

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            p, t = r.paper_row, r.time
            method, score = p.strongest_baseline() if p else ("", None)
            w.writerow({"task": r.task, "metric": "normalised_score" if r.kind == "score" else "return",
                        "seeds": r.seeds, "unfinished": r.unfinished, "failed": r.failed,
                        "last_mean": r1(r.last and r.last[0]), "last_std": r1(r.last and r.last[1]),
                        "best_mean": r1(r.best and r.best[0]), "best_std": r1(r.best and r.best[1]),
                        "paper": r1(r.paper), "last_minus_paper": r1(r.last_diff),
                        "best_minus_paper": r1(r.best_diff), "last_se": r1(r.last_se),
                        "paper_spread": r1(p.dtql.spread if p else None),
                        "within_paper_spread": "" if r.within_spread is None else r.within_spread,
                        "diff_in_se": r1(r.diff_in_se), "strongest_baseline": method,
                        "strongest_baseline_score": r1(score), "paper_table": p.table if p else "",
                        "data_note": r.data_note or "",
                        "hours_per_run": r1(t and t.hours_per_run), "hours_per_seed": r1(t and t.hours_per_seed),
                        "table7_hours": r1(t and t.paper_hours), "speedup_per_seed": r1(t and t.speedup),
                        "hardware": t.hardware if t and t.runs else "", "s_per_1k_steps": r1(t and t.s_per_1k),
                        "time_basis": time_basis(t) if t and (t.runs or t.untimed) else "",
                        **_split_columns(t)})


def _split_columns(t: TaskTime | None) -> dict:
    """report.csv's seconds per part of the processes with a time split (empty without one)."""
    split = t.split if t else None
    if split is None:
        return {}
    _, _, parts, off = split
    return {**{f"{k}_s": round(v, 2) for k, v in parts.items()}, "eval_off_path_s": round(off, 2)}


# -- figures ---------------------------------------------------------------------------------------------

def curve(seed_runs: list[SeedRun]) -> list[tuple[int, float, float, int]]:
    """(step, mean, std, n) over the seeds that have an evaluation at each step."""
    return mean_curve(pt for r in seed_runs for pt in r.evals)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_task(task: str, seed_runs: list[SeedRun], path: Path, ref: float | None = None):
    """Learning curves; ref: the paper's number, dashed (None: no comparison)."""
    plt = _pyplot()
    pts = curve(seed_runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in seed_runs:
        if r.evals:
            ax.plot(*zip(*r.evals), color="tab:blue", alpha=0.25, lw=0.8)
    draw_mean_curve(ax, pts, band=dict(color="tab:blue", alpha=0.2, label="± std"),
                    color="tab:blue", lw=2, label=f"mean over {len(seed_runs)} seeds")
    if ref is not None:
        ax.axhline(ref, color="tab:red", ls="--", label=f"paper {ref:.1f}")
    kind = "normalised score" if all(r.kind == "score" for r in seed_runs) else "return"
    unfinished = sum(r.state != "finished" for r in seed_runs)
    ax.set_title(task + (f" ({unfinished} run(s) not finished)" if unfinished else ""))
    ax.set_xlabel("training step")
    ax.set_ylabel(kind)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_paper(rows: list[TaskRow], path: Path) -> bool:
    """Ours (last evaluation, ± SE over seeds) beside the paper's DTQL (± its spread), one pair of bars per
    scored task; tasks without a paper number show ours alone. False when no task has a score."""
    scored = [r for r in rows if r.kind == "score" and r.last is not None]
    if not scored:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 2.0 + 0.45 * len(scored)), layout="constrained")
    y = list(range(len(scored)))
    h = 0.4
    ax.barh([i - h / 2 for i in y], [r.last[0] for r in scored], h, xerr=[r.last_se or 0.0 for r in scored],
            color="tab:blue", capsize=3, label="ours, last evaluation (± SE over seeds)")
    ref = [(i, r.paper_row.dtql) for i, r in zip(y, scored) if r.paper_row is not None]
    if ref:
        ax.barh([i + h / 2 for i, _ in ref], [s.mean for _, s in ref], h, xerr=[s.spread or 0.0 for _, s in ref],
                color="tab:red", capsize=3, label="paper DTQL (± its spread; Table 1 / Table 6)")
    ax.set_yticks(y)
    ax.set_yticklabels([r.task + ("" if r.paper_row else " (not compared)") for r in scored], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("normalised score")
    ax.set_title("ours against the DTQL paper", fontsize=10)
    # Outside the axes: inside, it would cover the bars of whichever task scores highest.
    fig.legend(loc="outside lower center", fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _curves_name(r: TaskRow) -> str:
    other = r.data_note is not None and paper.row(r.task) is not None   # a paper task on other data
    return f"curves_{r.task.replace('/', '_')}{'_other-data' if other else ''}.png"


def report(root: Path, out: Path | None = None) -> tuple[str, list[TaskRow], list[tuple[Path, str]]]:
    """Write report.md, report.csv, paper_vs_ours.png and one figure per task; return the Markdown, the
    rows and the warnings."""
    root = Path(root)
    seed_runs = discover(root)
    if not seed_runs:
        raise FileNotFoundError(f"no run folders under {root} (a run folder holds config.json, status.json or "
                                "metrics.jsonl)")
    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise([r for r in seed_runs if r.setting is None])  # Table 1: runs at the task's own settings
    md = to_markdown(rows, seed_runs, root)
    (out / "report.md").write_text(md)
    to_csv(rows, out / "report.csv")
    plot_paper(rows, out / "paper_vs_ours.png")
    for r in rows:
        mine = [s for s in seed_runs if s.task == r.task and s.data_note == r.data_note and s.state != "failed"]
        if any(s.evals for s in mine):
            plot_task(r.task, mine, out / _curves_name(r), r.paper)
    return md, rows, warnings(seed_runs)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dtql_fast.report", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a sweep folder, or any folder holding run folders")
    p.add_argument("--out", help="where to write report.md, report.csv and the figures (default: FOLDER/report)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when a run folder could not be read whole, or a run stopped or diverged "
                        "(the report is written all the same)")
    a = p.parse_args(argv)
    try:
        out = Path(a.out) if a.out else Path(a.folder) / "report"
        runfolder.check_writable(out, f"--out {a.out}" if a.out else f"the report folder {out} (or give --out)",
                                 folder=True)  # before the folder is read, not after
        md, _, warned = report(Path(a.folder), Path(a.out) if a.out else None)
    except (FileNotFoundError, runfolder.CannotWrite) as e:
        raise SystemExit(f"error: {e}")
    sys.stdout.write(md)
    print(f"\nwritten: {Path(a.out) if a.out else Path(a.folder) / 'report'}/report.md, report.csv, "
          "paper_vs_ours.png, curves_*.png")
    for d, w in warned:
        print(f"warning: {d}: {w}", file=sys.stderr)
    if warned and a.strict:
        raise SystemExit(f"error: --strict: {len({d for d, _ in warned})} run folder(s) with warnings (above)")


if __name__ == "__main__":
    main()
