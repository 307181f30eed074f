"""What a run prints and writes about itself: its metric rows (metrics.jsonl, train.csv, eval.csv,
TensorBoard), its messages (the first line, each evaluation, the final scores, the progress bar's
losses), summary.json's parts (the evaluation, the time and the machine it was measured on) and
learning_curves.png. One agent or a seed group: the rows, messages and summary that differ.

train.py decides when each is written; nothing here changes what a run computes.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import runfolder
from .curves import draw_mean_curve, mean_curve
from .seeds import format_seeds

if TYPE_CHECKING:  # torch only where a run's machine is named: the report reads TIME_PARTS without it
    import torch


# -- metric rows ---------------------------------------------------------------------------------------------


class MetricLog:
    """metrics.jsonl (every row), train.csv and eval.csv (one table each), appended as they come."""

    CSV_NAMES = {"train": runfolder.TRAIN_CSV, "eval": runfolder.EVAL_CSV}  # a row's kind -> its table

    def __init__(self, out: Path, trackers: list | None = None):
        self.out = out
        self.jsonl = open(out / runfolder.METRICS, "a")
        self._csv: dict[str, tuple] = {}
        self.trackers = trackers or []  # tracking.py: TensorBoard, W&B

    def write(self, kind: str, row: dict):
        row = {"kind": kind, **row}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        flat = {k: v for k, v in row.items() if not isinstance(v, (list, dict))}
        path = self.out / self.CSV_NAMES[kind]
        if kind not in self._csv:
            new = not path.exists()
            f = open(path, "a", newline="")
            fields = list(flat) if new else next(csv.reader(open(path)))
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            self._csv[kind] = (f, w)
        f, w = self._csv[kind]
        w.writerow(flat)
        f.flush()
        for t in self.trackers:  # the row's numbers, already on the host: no device sync of their own
            t.write(kind, flat)

    def sync(self):
        """Put the rows written so far on the disk (before a checkpoint that counts on them)."""
        for f in [self.jsonl, *(f for f, _ in self._csv.values())]:
            f.flush()
            os.fsync(f.fileno())
        for t in self.trackers:
            t.flush()

    def close(self):
        self.jsonl.close()
        for f, _ in self._csv.values():
            f.close()
        for t in self.trackers:
            t.close()


# -- a single-seed run, a seed group or a grid: the rows, messages and summary whose formats differ ----------
# `who` names each agent in its rows: [{"seed": s}, ...] for a seed group, [{"setting": "alpha=5", "seed": s},
# ...] for a grid (train.agent_labels); None in a --seed run's single-seed format (TrainConfig.single_seed).


def agent_name(w: dict) -> str:
    """An agent as messages name it: 'seed 3', or in a grid 'alpha=5, seed 3'."""
    return (f"{w['setting']}, " if "setting" in w else "") + f"seed {w['seed']}"


def _by_setting(items: list, who: list[dict]) -> dict[str | None, list]:
    """items (one per agent) split by the agents' grid cells, in order (one key, None, outside a grid)."""
    out: dict[str | None, list] = {}
    for x, w in zip(items, who):
        out.setdefault(w.get("setting"), []).append(x)
    return out


def start_message(task: str, seed: int | None, who: list[dict] | None, data, device: torch.device, mode: str,
                  why: str, kernels: str, out: Path) -> str:
    """A run's first line: what it trains (the seed, the group or the grid), on what data and device, how its
    step runs (`mode`: eager, compile, cudagraph or auto, and why) with which EDM kernels, and where it writes."""
    kernels_text = kernels if device.type == "cuda" or kernels == "torch" else f"{kernels} (their PyTorch form on a CPU)"
    if who is None:
        agents = f"seed {seed}"
    else:
        seeds = list(dict.fromkeys(w["seed"] for w in who))
        settings = [k for k in _by_setting(who, who) if k is not None]
        grid = f" x settings {'; '.join(settings)}" if settings else ""
        agents = f"seeds {format_seeds(seeds)}{grid} ({len(who)} agents, one step)"
    rows = getattr(data, "rows", data)  # a --task list's AgentData: every task's rows
    return (f"dtql_fast | task {task} | {agents} | {rows.n} transitions, state {data.state_dim}, action "
            f"{data.action_dim} | device {device} | step: {mode} ({why}), kernels {kernels_text} | out {out}")


def train_rows(step: int, pretrain: bool, sps: float, metrics: list[dict], lrs: list[dict],
               who: list[dict] | None) -> list[dict]:
    """A log interval's rows from one metrics dict and one learning-rate dict per agent: one per agent, named
    by its `who` columns (seed; setting in a grid); a single-seed run's (who None) one row, no such column."""
    where = {"phase": "pretrain" if pretrain else "train", "steps_per_s": sps}
    if who is None:
        return [{"step": step, **where, **metrics[0], **lrs[0]}]
    return [{"step": step, **w, **where, **m, **lr} for w, m, lr in zip(who, metrics, lrs)]


def progress_postfix(metrics: list[dict], sps: float) -> dict:
    """The progress bar's losses: the mean over the agents (one dict each)."""
    metrics = {k: statistics.fmean(m[k] for m in metrics if k in m) for k in metrics[0]}
    return {k.replace("loss_", ""): f"{v:.3g}" for k, v in metrics.items() if k.startswith("loss")} | {"it/s": f"{sps:.0f}"}


def eval_mean(rows: list[dict]) -> tuple[float, str]:
    """An evaluation's mean over its agents: of the normalised score, or of the return where the task
    has none; and which of the two."""
    key = "score_mean" if all(r.get("score_mean") is not None for r in rows) else "return_mean"
    return sum(r[key] for r in rows) / len(rows), key.removesuffix("_mean")


def eval_rows(results: list[dict], step: int, epoch: int, who: list[dict] | None) -> list[dict]:
    """An evaluation's rows: one per agent, named by its `who` columns (`env_seed` is the evaluation envs'
    seed); a single-seed run's one row, no such column."""
    if who is None:
        return [{"step": step, "epoch": epoch, **results[0]}]
    return [{"step": step, "epoch": epoch, **w, **r} for w, r in zip(who, results)]


def over_seeds(rows: list[dict]) -> dict:
    """Mean and sample std over the seeds of each seed's mean return and mean score (std None for one seed,
    scores None without reference scores)."""
    out = {}
    for key in ("score", "return"):
        xs = [r[f"{key}_mean"] for r in rows]
        known = all(x is not None for x in xs)
        out[f"{key}_mean"] = statistics.fmean(xs) if known else None
        out[f"{key}_std"] = statistics.stdev(xs) if known and len(xs) > 1 else None
    return out


def per_setting(rows: list[dict], who: list[dict]) -> list[dict]:
    """A grid's evaluation by setting: its seeds, and over them the mean, sample std and standard error
    (std / sqrt(seeds)) of each seed's mean score and return."""
    out = []
    for setting, part in _by_setting(rows, who).items():
        stats = over_seeds(part)
        for key in ("score", "return"):
            std = stats[f"{key}_std"]
            stats[f"{key}_sem"] = None if std is None else std / len(part) ** 0.5
        out.append({"setting": setting, "seeds": [r["seed"] for r in part], **stats})
    return out


def _seeds_text(seeds: list[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({format_seeds(seeds)})"


def _pm(mean: float, std: float | None, spec: str) -> str:
    return format(mean, spec) if std is None else f"{mean:{spec}} ± {std:{spec}}"


def _key(stats: dict) -> tuple[str, str, str]:
    return ("score", ".1f", "normalised score") if stats["score_mean"] is not None else ("return", ".2f", "return")


def eval_message(rows: list[dict], who: list[dict] | None) -> str:
    r, n = rows[0], len(rows)
    head = f"eval @ epoch {r['epoch']}: "
    tail = f" | {r['episodes']} episodes in {r['wall_s']:.1f}s"
    if who is None:
        score = f" | normalised score {r['score_mean']:.1f} ± {r['score_std']:.1f}" if r["score_mean"] is not None else ""
        return f"{head}return {r['return_mean']:.2f} ± {r['return_std']:.2f}{score}{tail}"
    parts = []
    for setting, part in _by_setting(rows, who).items():
        stats = over_seeds(part)
        key, spec, name = _key(stats)
        per = ", ".join(f"{row[f'{key}_mean']:{spec}}" for row in part)
        at = f"{setting}: " if setting is not None else ""
        parts.append(f"{at}{name} {_pm(stats[f'{key}_mean'], stats[f'{key}_std'], spec)} over "
                     f"{_seeds_text([row['seed'] for row in part])} (per seed: {per})")
    return f"{head}{' | '.join(parts)} | {n} x {r['episodes']} episodes in {r['wall_s']:.1f}s"


def eval_summary(rows: list[dict], who: list[dict] | None, episodes: int, behaviour_return: float | None) -> dict:
    """summary.json's evaluation part. One agent: its return and score, mean and std over its episodes. A
    group: the same for each agent (per_seed, each named by its `who` columns), and over_seeds: the mean and
    sample std over the agents of those per-agent means; a grid also per_setting (over each setting's seeds,
    with the standard error)."""
    keys = ("return_mean", "return_std", "score_mean", "score_std")
    if who is None:
        return {**{k: rows[0][k] for k in keys}, "episodes": episodes, "behaviour_return": behaviour_return}
    out = {"episodes": episodes, "behaviour_return": behaviour_return,
           "per_seed": [{**w, **{k: r[k] for k in keys}} for w, r in zip(who, rows)],
           "over_seeds": over_seeds(rows)}
    if any("setting" in w for w in who):
        out["per_setting"] = per_setting(rows, who)
    return out


def final_message(task: str, summary: dict, who: list[dict] | None) -> str:
    beh = summary["behaviour_return"]
    beh = f" | behaviour data {beh:.2f}" if beh is not None else ""
    if who is None:
        s = summary
        score = (f" | normalised score {s['score_mean']:.1f} ± {s['score_std']:.1f}" if s["score_mean"] is not None
                 else " | no normalised score (no reference scores)")
        return (f"final: {task} | return {s['return_mean']:.2f} ± {s['return_std']:.2f} over "
                f"{s['episodes']} episodes{score}{beh}")
    lines = []
    for o in summary.get("per_setting") or [{"setting": None, "seeds": [w["seed"] for w in who],
                                              **summary["over_seeds"]}]:
        score = (f" | normalised score {_pm(o['score_mean'], o['score_std'], '.1f')}" if o["score_mean"] is not None
                 else " | no normalised score (no reference scores)")
        at = f" | {o['setting']}" if o["setting"] is not None else ""
        lines.append(f"final: {task}{at} | {_seeds_text(o['seeds'])}, {summary['episodes']} episodes each{score} | "
                     f"return {_pm(o['return_mean'], o['return_std'], '.2f')}{beh}")
    lines.append("  (mean ± std over the seeds of each seed's mean; below, per seed, ± is the std over its episodes)")
    for p in summary["per_seed"]:
        sc = f" | normalised score {p['score_mean']:.1f} ± {p['score_std']:.1f}" if p["score_mean"] is not None else ""
        lines.append(f"  {agent_name(p)}: return {p['return_mean']:.2f} ± {p['return_std']:.2f}{sc}")
    return "\n".join(lines)


# -- summary.json's time: where it went, on which machine ------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def hardware(device: torch.device) -> str:
    """The machine a run's times were measured on: the GPU's name, or the CPU model and threads."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} torch threads"


# The parts a run's wall time is split into, in the order the final lines and the report show them (key: its
# name there). They sum to the total: "other" is what no part counted (the progress bar, the profiler's window,
# the summary). eval: evaluating on the training's path (in-line, or handing a worker its weights); eval_wait:
# training held up waiting for a worker's result. An evaluation worker's own time is off the path, apart.
TIME_PARTS = {"startup": "start-up", "data": "data", "compile": "compile", "steps": "training steps",
              "eval": "evaluation", "eval_wait": "waiting for evaluation", "checkpoint": "checkpoints",
              "logging": "logging", "other": "other"}


class RunClock:
    """A run's wall time as it goes, split into TIME_PARTS. `part(name)` counts a block's seconds, less those of
    the parts opened inside it (a best checkpoint written during an evaluation counts as a checkpoint);
    `move(seconds, name)` gives seconds measured inside the open part to another (a step's compile)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.parts = dict.fromkeys(TIME_PARTS, 0.0)
        self.off_path_eval = 0.0  # evaluated by a worker while training went on: no part of the total
        self._open: list[list] = []  # [name, seconds given to parts inside it]

    def part(self, name: str) -> _Part:
        return _Part(self, name)

    def move(self, seconds: float, name: str):
        self.parts[name] += seconds
        if self._open:
            self._open[-1][1] += seconds

    def split(self) -> tuple[float, dict[str, float]]:
        """(total seconds so far, {part: seconds}), "other" the remainder."""
        total = time.perf_counter() - self.start
        parts = {**self.parts, "other": 0.0}
        parts["other"] = max(0.0, total - sum(parts.values()))
        return total, parts


class _Part:
    """RunClock.part's block (a class, not a generator: it wraps every step)."""

    def __init__(self, clock: RunClock, name: str):
        self.clock, self.name = clock, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.clock._open.append([self.name, 0.0])

    def __exit__(self, *exc):
        clock = self.clock
        seconds = time.perf_counter() - self.t0
        _, inner = clock._open.pop()
        clock.parts[self.name] += seconds - inner
        if clock._open:
            clock._open[-1][1] += seconds


def run_time(clock: RunClock, step: int, first_step: int, pre_total: int, device: torch.device,
             evaluated: str | None = None) -> dict:
    """summary.json's "time": this process's wall seconds (from train()'s call) and the steps it ran (pretraining
    ones apart), on which machine. compile_s, eval_s (what evaluation held training up: in-line evaluation, or
    handing a worker its weights and waiting for it) and train_s (the rest of the total); "split": every part of
    TIME_PARTS, summing to total_s; eval_off_path_s: a worker's evaluating while training went on, and
    `evaluated`: where evaluation ran. A resumed run counts only its own process (first_step > 0), its parts too."""
    total, parts = clock.split()
    compile_s, eval_s = parts["compile"], parts["eval"] + parts["eval_wait"]
    out = {"total_s": round(total, 2), "compile_s": round(compile_s, 2), "eval_s": round(eval_s, 2),
           "train_s": round(total - compile_s - eval_s, 2), "first_step": first_step,
           "steps": step - first_step, "pretrain_steps": max(0, min(step, pre_total) - first_step),
           "hardware": hardware(device), "split": {f"{k}_s": round(v, 3) for k, v in parts.items()},
           "eval_off_path_s": round(clock.off_path_eval, 2)}
    if evaluated is not None:
        out["evaluated"] = evaluated
    return out


def time_message(t: dict) -> str:
    """The final line of where a run's time went: summary.json's "time" in seconds, part by part."""
    parts = ", ".join(f"{TIME_PARTS[k]} {t['split'][f'{k}_s']:.1f}" for k in TIME_PARTS)
    off = (f" | evaluated by the worker off the training's path: {t['eval_off_path_s']:.1f} s"
           if t.get("eval_off_path_s") else "")
    return f"time: {t['total_s']:.1f} s = {parts}{off}"


# -- learning_curves.png ------------------------------------------------------------------------------------


def plot_curves(out: Path):
    """learning_curves.png from metrics.jsonl: losses over steps, and evaluation scores. A group's rows
    (one per seed and step) are drawn as their mean with a ± std band across the seeds; a grid's, one such
    line per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(out / runfolder.METRICS)]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    n_seeds = len({r.get("seed") for r in train}) if train and "seed" in train[0] else 1
    settings = list(dict.fromkeys(r.get("setting") for r in rows))  # [None] outside a grid
    keys = ["loss_q", "loss_v", "loss_bc", "loss_tr", "loss_pq"]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 3.2))
    for ax, k in zip(axes, keys):
        for setting in settings:
            _plot_mean_band(ax, [(r["step"], r[k]) for r in train if k in r and r.get("setting") == setting],
                            label=setting)
        ax.set_title(k)
        ax.set_xlabel("step")
    ax = axes[-1]
    if evals:
        ykey = "score_mean" if evals[-1].get("score_mean") is not None else "return_mean"
        for setting in settings:
            _plot_mean_band(ax, [(r["step"], r[ykey]) for r in evals if r.get("setting") == setting], marker="o",
                            label=setting)
        ax.set_title("normalised score" if ykey == "score_mean" else "return")
        if len(settings) > 1:
            ax.legend(fontsize=7)
    ax.set_xlabel("step")
    if n_seeds > 1:
        per = " per setting" if len(settings) > 1 else ""
        fig.suptitle(f"mean over {n_seeds} seeds{per}, band: ± std across seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / runfolder.CURVES, dpi=80)
    plt.close(fig)


def _plot_mean_band(ax, points: list[tuple[int, float]], **style):
    """One line through the mean at each step, and a ± std band where a step has several values (seeds)."""
    curve = mean_curve(points)
    draw_mean_curve(ax, curve, band={"alpha": 0.25} if any(n > 1 for *_, n in curve) else None, **style)
