"""python -m dtql_fast.report FOLDER: the sweep's table beside the paper's Table 1.

FOLDER is a sweep (python -m dtql_fast.sweep --out) or any folder holding run folders (train.py's
--out: one seed, or a seed group of train --seeds, read as its seeds) at any depth. Per task: the
normalised score, mean ± std over seeds, at the last evaluation and at the best one (each seed's
highest evaluation, then mean ± std over seeds), the paper's number and the differences. Writes
report.md, report.csv and curves_<task>.png (mean over seeds with a ± std band) to --out (default
FOLDER/report) and prints the Markdown. Runs not finished (still going, or stopped) count with their
latest evaluation and are marked; failed runs are listed with their error and left out of the numbers.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import paper, runs

MARK_UNFINISHED = "†"


@dataclass
class SeedRun:
    task: str
    seed: int | None
    run_dir: Path
    state: str                                  # runs.run_state: finished, running, failed, unfinished, ...
    evals: list[tuple[int, float]] = field(default_factory=list)   # (step, score)
    kind: str = "score"                         # "score" (normalised) or "return" when the task has no reference scores
    step: int | None = None
    total: int | None = None
    error: str | None = None

    @property
    def last(self) -> float | None:
        return self.evals[-1][1] if self.evals else None

    @property
    def best(self) -> float | None:
        return max(s for _, s in self.evals) if self.evals else None


@dataclass
class TaskRow:
    task: str
    kind: str
    seeds: int                 # runs counted in the numbers (finished or not, failed excluded)
    unfinished: int            # of which not finished (still going, or stopped)
    failed: int
    last: tuple[float, float | None] | None     # (mean, std over seeds; None with one seed)
    best: tuple[float, float | None] | None
    paper: float | None

    @property
    def last_diff(self) -> float | None:
        return None if self.last is None or self.paper is None else self.last[0] - self.paper

    @property
    def best_diff(self) -> float | None:
        return None if self.best is None or self.paper is None else self.best[0] - self.paper


def _is_run_dir(d: Path) -> bool:
    return any((d / name).is_file() for name in ("config.json", runs.STATUS, "metrics.jsonl"))


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
    cfg = runs.read_json(d / "config.json") or {}
    status = runs.read_status(d)
    task = cfg.get("task") or status.get("task") or d.name
    state = runs.run_state(d, None)
    train_rows, eval_rows = runs.metric_rows(d)
    total = runs.planned_steps_from_config(d)
    step = train_rows[-1]["step"] if train_rows else None
    error = status.get("error") if state == "failed" else None
    # A seed group's folder (train --seeds; the sweep writes "seeds" in status.json too, before config.json
    # exists) holds every seed's rows, each tagged with its seed; a single run's rows are all its one seed's.
    group = cfg.get("config", {}).get("seeds") or status.get("seeds")
    if isinstance(group, list):
        per_seed = [(s, [r for r in eval_rows if r.get("seed") == s]) for s in group]
    else:
        per_seed = [(cfg.get("config", {}).get("seed", status.get("seed")), eval_rows)]
    out = []
    for s, rows in per_seed:
        kind = "score" if all(r.get("score_mean") is not None for r in rows) else "return"
        evals = [(r["step"], r["score_mean"] if kind == "score" else r["return_mean"]) for r in rows]
        out.append(SeedRun(task, s, d, state, evals, kind, step, total, error))
    return out


def _mean_std(xs: list[float]) -> tuple[float, float | None] | None:
    if not xs:
        return None
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarise(seed_runs: list[SeedRun]) -> list[TaskRow]:
    rows = []
    for task in sorted({r.task for r in seed_runs}):
        mine = [r for r in seed_runs if r.task == task]
        counted = [r for r in mine if r.state != "failed" and r.evals]
        kind = "score" if all(r.kind == "score" for r in counted) else "return"
        rows.append(TaskRow(task=task, kind=kind, seeds=len(counted),
                            unfinished=sum(r.state != "finished" for r in counted),
                            failed=sum(r.state == "failed" for r in mine),
                            last=_mean_std([r.last for r in counted]), best=_mean_std([r.best for r in counted]),
                            paper=paper.paper_score(task)))
    return rows


def _ms(x: tuple[float, float | None] | None) -> str:
    if x is None:
        return "–"
    return f"{x[0]:.1f}" if x[1] is None else f"{x[0]:.1f} ± {x[1]:.1f}"


def _num(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else (f"{x:+.1f}" if signed else f"{x:.1f}")


def to_markdown(rows: list[TaskRow], seed_runs: list[SeedRun], root: Path) -> str:
    lines = [f"# DTQL sweep report: {root}", "",
             "Normalised score (D4RL: 0 random, 100 expert), mean ± std over seeds (sample std). *last*: each "
             "seed's latest evaluation; *best*: each seed's highest evaluation. *paper*: DTQL's Table 1 "
             "(Chen, Wang & Zhou, NeurIPS 2024; sources in `dtql_fast/paper.py`).", "",
             "| task | seeds | last | best | paper | last − paper | best − paper |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r.task + (f" {MARK_UNFINISHED}" if r.unfinished else "") + (" (return)" if r.kind == "return" else "")
        seeds = (f"{r.seeds}" + (f" ({r.unfinished} not finished)" if r.unfinished else "")
                 + (f" ({r.failed} failed)" if r.failed else ""))
        lines.append(f"| {name} | {seeds} | {_ms(r.last)} | {_ms(r.best)} | {_num(r.paper)} | "
                     f"{_num(r.last_diff, True)} | {_num(r.best_diff, True)} |")
    notes = []
    if any(r.unfinished for r in rows):
        notes.append(f"{MARK_UNFINISHED} includes runs not finished (still going, or stopped): their latest evaluation "
                     "counts as *last*.")
    if any(r.kind == "return" for r in rows):
        notes.append("(return): the task has no reference scores, so raw returns are shown.")
    if any(r.paper is None for r in rows):
        notes.append("paper –: no Table 1 number for the task (not in the table, or not found; see "
                     "dtql_fast/paper.py).")
    if notes:
        lines += [""] + notes
    lines += ["", "## Runs", "", "| task | seed | state | step | evaluations | last | best | note |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(seed_runs, key=lambda r: (r.task, r.seed if r.seed is not None else -1)):
        step = f"{r.step if r.step is not None else 0:,}/{r.total:,}" if r.total else "–"
        note = (r.error or "").replace("|", "\\|")
        lines.append(f"| {r.task} | {r.seed} | {r.state} | {step} | {len(r.evals)} | {_num(r.last)} | "
                     f"{_num(r.best)} | {note} |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["task", "metric", "seeds", "unfinished", "failed", "last_mean", "last_std", "best_mean", "best_std",
              "paper", "last_minus_paper", "best_minus_paper"]


def to_csv(rows: list[TaskRow], path: Path):
    def r1(x):
        return "" if x is None else round(x, 4)

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({"task": r.task, "metric": "normalised_score" if r.kind == "score" else "return",
                        "seeds": r.seeds, "unfinished": r.unfinished, "failed": r.failed,
                        "last_mean": r1(r.last and r.last[0]), "last_std": r1(r.last and r.last[1]),
                        "best_mean": r1(r.best and r.best[0]), "best_std": r1(r.best and r.best[1]),
                        "paper": r1(r.paper), "last_minus_paper": r1(r.last_diff),
                        "best_minus_paper": r1(r.best_diff)})


def curve(seed_runs: list[SeedRun]) -> list[tuple[int, float, float, int]]:
    """(step, mean, std, n) over the seeds that have an evaluation at each step."""
    by_step: dict[int, list[float]] = {}
    for r in seed_runs:
        for step, score in r.evals:
            by_step.setdefault(step, []).append(score)
    out = []
    for step in sorted(by_step):
        m, s = _mean_std(by_step[step])
        out.append((step, m, s or 0.0, len(by_step[step])))
    return out


def plot_task(task: str, seed_runs: list[SeedRun], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = curve(seed_runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in seed_runs:
        if r.evals:
            ax.plot(*zip(*r.evals), color="tab:blue", alpha=0.25, lw=0.8)
    if pts:
        steps, means, stds = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
        ax.plot(steps, means, color="tab:blue", lw=2, label=f"mean over {len(seed_runs)} seeds")
        ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color="tab:blue", alpha=0.2, label="± std")
    ref = paper.paper_score(task)
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


def report(root: Path, out: Path | None = None) -> tuple[str, list[TaskRow]]:
    """Write report.md, report.csv and one figure per task; return the Markdown and the rows."""
    root = Path(root)
    seed_runs = discover(root)
    if not seed_runs:
        raise FileNotFoundError(f"no run folders under {root} (a run folder holds config.json, status.json or "
                                "metrics.jsonl)")
    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(seed_runs)
    md = to_markdown(rows, seed_runs, root)
    (out / "report.md").write_text(md)
    to_csv(rows, out / "report.csv")
    for task in sorted({r.task for r in seed_runs}):
        mine = [r for r in seed_runs if r.task == task and r.state != "failed"]
        if any(r.evals for r in mine):
            plot_task(task, mine, out / f"curves_{task.replace('/', '_')}.png")
    return md, rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dtql_fast.report", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a sweep folder, or any folder holding run folders")
    p.add_argument("--out", help="where to write report.md, report.csv and the figures (default: FOLDER/report)")
    a = p.parse_args(argv)
    try:
        md, _ = report(Path(a.folder), Path(a.out) if a.out else None)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    sys.stdout.write(md)
    print(f"\nwritten: {Path(a.out) if a.out else Path(a.folder) / 'report'}/report.md, report.csv, curves_*.png")


if __name__ == "__main__":
    main()
