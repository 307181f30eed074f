"""Run folders: how many steps a run plans, how far it got, and how it ended.

Read from what `python -m dtql_fast.train` writes: config.json (at the start), metrics.jsonl (as it
goes), summary.json (at the end) and checkpoint.pt / checkpoint.prev.pt (only whether they exist).
The sweep adds status.json (the latest attempt's state) and attempts.jsonl (one line per attempt
start and end), both written here. A run is finished when summary.json exists and its "steps" reaches
the planned total. A seed group's run (train --seeds) is one folder whose metric rows carry a `seed`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .runfolder import (CHECKPOINT, CHECKPOINT_PREVIOUS, CONFIG, CURVES, EVAL_CSV, METRICS, SUMMARY, TRAIN_CSV,
                        live_holder)
from .hyper import Hyper, run_steps
from .tasks import DEFAULT_HYPER, OFFLINE_DEMO_HYPER, TASKS, get_task

# The files the sweep adds to a run folder (train.py's own are named in runfolder.py).
STATUS = "status.json"
ATTEMPTS = "attempts.jsonl"
LOG = "train.log"
CHECKPOINTS = (CHECKPOINT, CHECKPOINT_PREVIOUS)
# What a fresh start clears: outputs of an attempt that died before writing any checkpoint.
PARTIAL_OUTPUTS = (METRICS, TRAIN_CSV, EVAL_CSV, SUMMARY, CURVES, CONFIG)


def base_hyper(task: str, dataset: str | None) -> Hyper:
    """The table entry train.py starts from for this task (before command-line overrides)."""
    from .data import OFFLINE_DATASET_ID, is_minari_id  # data imports gymnasium: only when asked

    if task in TASKS:
        return TASKS[task].hyper
    if task == OFFLINE_DATASET_ID and dataset is None:
        return OFFLINE_DEMO_HYPER
    if is_minari_id(task):
        return DEFAULT_HYPER
    return get_task(task).hyper  # raises UnknownTaskError naming close matches


def planned_steps_from_config(run_dir: Path) -> int | None:
    """The total a run started with, from its config.json (None before train.py wrote it)."""
    cfg = read_json(run_dir / CONFIG)
    if not cfg or "hyper" not in cfg:
        return None
    h = cfg["hyper"]
    return run_steps(h["pretrain_epochs"], h["epochs"], h["steps_per_epoch"])


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, obj: dict):
    """Readers (the live view, the report) never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def is_finished(run_dir: Path, planned: int | None) -> bool:
    summary = read_json(run_dir / SUMMARY)
    if summary is None or "steps" not in summary:
        return False
    planned = planned if planned is not None else planned_steps_from_config(run_dir)
    return planned is not None and summary["steps"] >= planned


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / name).is_file() for name in CHECKPOINTS)


def read_status(run_dir: Path) -> dict:
    return read_json(run_dir / STATUS) or {}


def write_status(run_dir: Path, **fields):
    write_json_atomic(run_dir / STATUS, fields)


def append_attempt(run_dir: Path, **fields):
    with open(run_dir / ATTEMPTS, "a") as f:
        f.write(json.dumps(fields) + "\n")


def attempts(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / ATTEMPTS).read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def read_metrics(run_dir: Path) -> tuple[list[dict], int, bool]:
    """metrics.jsonl as written: its rows in file order, how many complete lines are not JSON, and
    whether its last line was cut short (a kill mid-write; kept as a row where it still parses)."""
    try:
        lines = (run_dir / METRICS).read_text().split("\n")
    except OSError:
        return [], 0, False
    cut = lines.pop()  # the text after the last newline
    rows, bad = [], 0
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            bad += 1
    if cut:
        try:
            rows.append(json.loads(cut))
        except ValueError:
            pass
    return rows, bad, bool(cut)


def metric_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of metrics.jsonl, one per step (kind, setting, seed), the last written winning.

    A run resumed from a checkpoint logs again the steps its killed attempt had logged past that
    checkpoint; keeping the last row per step drops the dead attempt's copy.
    """
    return _by_step(read_metrics(run_dir)[0])


def _by_step(written: list[dict]) -> tuple[list[dict], list[dict]]:
    rows: dict[tuple, dict] = {}
    for r in written:
        rows[(r.get("kind"), r.get("setting"), r.get("seed"), r.get("step"))] = r
    ordered = sorted(rows.values(), key=lambda r: (r.get("step") or 0))
    return [r for r in ordered if r.get("kind") == "train"], [r for r in ordered if r.get("kind") == "eval"]


@dataclass
class RunProgress:
    """One line of the live view."""
    state: str                      # see run_state
    step: int | None = None
    total: int | None = None
    steps_per_s: float | None = None
    score: float | None = None      # latest normalised score (or return when there is none); a group's mean
    error: str | None = None
    attempt: int = 0
    extra: dict = field(default_factory=dict)


def run_state(run_dir: Path, planned: int | None) -> str:
    """finished; else the sweep's status (running, failed, killed, interrupted); else unfinished (a run
    folder with no summary and no status: still going, or stopped) or pending (nothing written yet)."""
    if is_finished(run_dir, planned):
        return "finished"
    state = read_status(run_dir).get("state")
    if state and state != "finished":  # "finished" with no summary: the folder was changed since
        return state
    return "unfinished" if (run_dir / CONFIG).is_file() else "pending"


def progress(run_dir: Path, planned: int | None) -> RunProgress:
    status = read_status(run_dir)
    train_rows, eval_rows = metric_rows(run_dir)
    state = run_state(run_dir, planned)
    finished = state == "finished"
    p = RunProgress(state=state, total=planned or planned_steps_from_config(run_dir),
                    error=status.get("error") if state == "failed" else None,
                    attempt=status.get("attempt", 0))
    if train_rows:
        p.step, p.steps_per_s = train_rows[-1].get("step"), train_rows[-1].get("steps_per_s")
    if eval_rows:  # a group's latest evaluation is one row per seed: their mean
        latest = [r for r in eval_rows if r.get("step") == eval_rows[-1].get("step")]
        key = "score_mean" if all(r.get("score_mean") is not None for r in latest) else "return_mean"
        values = [r[key] for r in latest if r.get(key) is not None]
        p.score = sum(values) / len(values) if values else None
    if finished:
        p.step = (read_json(run_dir / SUMMARY) or {}).get("steps", p.step)
    return p


def _gap(rows: list[dict], log_every) -> tuple[int, int] | None:
    """The first pair of consecutive metric rows further apart than a log interval (the run's --log-every, or
    the commonest spacing where that is larger: a resume may have changed it); None when there is none."""
    steps = sorted({r["step"] for r in rows if isinstance(r.get("step"), int)})
    diffs = [b - a for a, b in zip(steps, steps[1:])]
    if not diffs:
        return None
    every = max(log_every if isinstance(log_every, int) else 0, max(set(diffs), key=diffs.count))
    return next(((a, b) for a, b in zip(steps, steps[1:]) if b - a > every), None)


def problems(run_dir: Path) -> list[str]:
    """What a reader of this run folder could not read, or should know about how it ended: a missing
    or unreadable config.json or summary.json, metric lines that do not parse, rows missing against
    the steps summary.json reports, a run that stopped (no process holds it, and no sweep says why)
    or diverged. Empty for a run that is finished, or running, and whole."""
    found = []
    metrics = run_dir / METRICS
    for name in (CONFIG, SUMMARY):
        path = run_dir / name
        if path.exists() and read_json(path) is None:
            found.append(f"{name} cannot be read (not JSON: cut short or edited?)")
    if not (run_dir / CONFIG).exists() and metrics.exists():
        found.append("config.json is missing: task, seed and schedule unknown (the task is taken from the folder name)")
    written, bad, cut = read_metrics(run_dir)
    if bad:
        found.append(f"metrics.jsonl has {bad} line(s) that are not JSON; they were skipped")
    train_rows, _ = _by_step(written)
    last = train_rows[-1].get("step") if train_rows else None
    gap = _gap(train_rows, (read_json(run_dir / CONFIG) or {}).get("config", {}).get("log_every"))
    if gap:
        found.append(f"metrics.jsonl has no rows between steps {gap[0]} and {gap[1]} (lines lost before a resume)")
    summary = read_json(run_dir / SUMMARY)
    if summary and isinstance(summary.get("steps"), int) and (last or 0) < summary["steps"]:
        found.append(f"metrics.jsonl ends at step {last or 0} but summary.json says the run reached step "
                     f"{summary['steps']}: rows are missing (the file was cut short or replaced)")
    if train_rows and any(isinstance(v, float) and not math.isfinite(v) for v in train_rows[-1].values()):
        found.append(f"diverged at step {last} (non-finite values in its last metric row)")
    elif not (run_dir / SUMMARY).exists() and (run_dir / CONFIG).exists() and read_status(run_dir).get(
            "state") in (None, "unfinished") and live_holder(run_dir) is None:
        where = f"at step {last}" if last else "before its first metric row"
        found.append(f"stopped {where} and not running{' (its last line cut short)' if cut else ''}; "
                     f"resume with python -m dtql_fast.train --resume {run_dir}")
    return found
