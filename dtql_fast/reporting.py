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

import torch

from . import runfolder
from .curves import draw_mean_curve, mean_curve
from .seeds import format_seeds


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


# -- a single-seed run or a group: the rows, messages and summary whose formats differ --------------------
# `group` is the seed list a run folder shows, None in a --seed run's single-seed format (TrainConfig.single_seed).


def start_message(task: str, seed: int | None, group: list[int] | None, data, device: torch.device, mode: str,
                  why: str, kernels: str, out: Path) -> str:
    """A run's first line: what it trains (the seed, or the group), on what data and device, how its step runs
    (`mode`: eager, compile, cudagraph or auto, and why) with which EDM kernels, and where it writes."""
    kernels_text = kernels if device.type == "cuda" or kernels == "torch" else f"{kernels} (their PyTorch form on a CPU)"
    who = f"seed {seed}" if group is None else f"seeds {format_seeds(group)} ({len(group)} agents, one step)"
    return (f"dtql_fast | task {task} | {who} | {data.n} transitions, state {data.state_dim}, action "
            f"{data.action_dim} | device {device} | step: {mode} ({why}), kernels {kernels_text} | out {out}")


def train_rows(step: int, pretrain: bool, sps: float, metrics: list[dict], lrs: list[dict],
               group: list[int] | None) -> list[dict]:
    """A log interval's rows from one metrics dict and one learning-rate dict per agent: for a group one
    per seed, with its seed in a `seed` column; a single-seed run's (group None) one row, no seed column."""
    where = {"phase": "pretrain" if pretrain else "train", "steps_per_s": sps}
    if group is None:
        return [{"step": step, **where, **metrics[0], **lrs[0]}]
    return [{"step": step, "seed": s, **where, **m, **lr} for s, m, lr in zip(group, metrics, lrs)]


def progress_postfix(metrics: list[dict], sps: float) -> dict:
    """The progress bar's losses: the mean over the agents (one dict each)."""
    metrics = {k: statistics.fmean(m[k] for m in metrics) for k in metrics[0]}
    return {k.replace("loss_", ""): f"{v:.3g}" for k, v in metrics.items() if k.startswith("loss")} | {"it/s": f"{sps:.0f}"}


def eval_mean(rows: list[dict]) -> tuple[float, str]:
    """An evaluation's mean over its agents: of the normalised score, or of the return where the task
    has none; and which of the two."""
    key = "score_mean" if all(r.get("score_mean") is not None for r in rows) else "return_mean"
    return sum(r[key] for r in rows) / len(rows), key.removesuffix("_mean")


def eval_rows(results: list[dict], step: int, epoch: int, group: list[int] | None) -> list[dict]:
    """An evaluation's rows: one for one agent; for a group one per seed, with its seed in a `seed` column
    (`env_seed` is the evaluation envs' seed)."""
    if group is None:
        return [{"step": step, "epoch": epoch, **results[0]}]
    return [{"step": step, "epoch": epoch, "seed": s, **r} for s, r in zip(group, results)]


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


def _seeds_text(group: list[int]) -> str:
    return f"seed {group[0]}" if len(group) == 1 else f"{len(group)} seeds ({format_seeds(group)})"


def _pm(mean: float, std: float | None, spec: str) -> str:
    return format(mean, spec) if std is None else f"{mean:{spec}} ± {std:{spec}}"


def eval_message(rows: list[dict], group: list[int] | None) -> str:
    r, n = rows[0], len(rows)
    head = f"eval @ epoch {r['epoch']}: "
    tail = f" | {r['episodes']} episodes in {r['wall_s']:.1f}s"
    if group is None:
        score = f" | normalised score {r['score_mean']:.1f} ± {r['score_std']:.1f}" if r["score_mean"] is not None else ""
        return f"{head}return {r['return_mean']:.2f} ± {r['return_std']:.2f}{score}{tail}"
    stats = over_seeds(rows)
    key, spec, name = ("score", ".1f", "normalised score") if stats["score_mean"] is not None else ("return", ".2f", "return")
    per = ", ".join(f"{row[f'{key}_mean']:{spec}}" for row in rows)
    return (f"{head}{name} {_pm(stats[f'{key}_mean'], stats[f'{key}_std'], spec)} over {_seeds_text(group)} (per seed: {per})"
            f" | {n} x {r['episodes']} episodes in {r['wall_s']:.1f}s")


def eval_summary(rows: list[dict], group: list[int] | None, episodes: int, behaviour_return: float | None) -> dict:
    """summary.json's evaluation part. One agent: its return and score, mean and std over its episodes. A
    group: the same for each seed (per_seed), and over_seeds: the mean and sample std over the seeds of
    those per-seed means."""
    keys = ("return_mean", "return_std", "score_mean", "score_std")
    if group is None:
        return {**{k: rows[0][k] for k in keys}, "episodes": episodes, "behaviour_return": behaviour_return}
    return {"episodes": episodes, "behaviour_return": behaviour_return,
            "per_seed": [{"seed": s, **{k: r[k] for k in keys}} for s, r in zip(group, rows)],
            "over_seeds": over_seeds(rows)}


def final_message(task: str, summary: dict, group: list[int] | None) -> str:
    beh = summary["behaviour_return"]
    beh = f" | behaviour data {beh:.2f}" if beh is not None else ""
    if group is None:
        s = summary
        score = (f" | normalised score {s['score_mean']:.1f} ± {s['score_std']:.1f}" if s["score_mean"] is not None
                 else " | no normalised score (no reference scores)")
        return (f"final: {task} | return {s['return_mean']:.2f} ± {s['return_std']:.2f} over "
                f"{s['episodes']} episodes{score}{beh}")
    o = summary["over_seeds"]
    score = (f" | normalised score {_pm(o['score_mean'], o['score_std'], '.1f')}" if o["score_mean"] is not None
             else " | no normalised score (no reference scores)")
    lines = [f"final: {task} | {_seeds_text(group)}, {summary['episodes']} episodes each{score} | return "
             f"{_pm(o['return_mean'], o['return_std'], '.2f')}{beh}",
             "  (mean ± std over the seeds of each seed's mean; below, per seed, ± is the std over its episodes)"]
    for p in summary["per_seed"]:
        sc = f" | normalised score {p['score_mean']:.1f} ± {p['score_std']:.1f}" if p["score_mean"] is not None else ""
        lines.append(f"  seed {p['seed']}: return {p['return_mean']:.2f} ± {p['return_std']:.2f}{sc}")
    return "\n".join(lines)


# -- summary.json's time: where it went, on which machine ------------------------------------------------


def hardware(device: torch.device) -> str:
    """The machine a run's times were measured on: the GPU's name, or the CPU model and threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} torch threads"


def run_time(clock: dict, step: int, pre_total: int, device: torch.device) -> dict:
    """summary.json's "time": this process's wall seconds split into compile, evaluation and training
    (the rest), the steps it ran (pretraining ones apart) and the machine. A resumed run counts only
    its own process (first_step > 0)."""
    total = time.perf_counter() - clock["start"]
    first = clock["first_step"]
    return {"total_s": round(total, 2), "compile_s": round(clock["compile_s"], 2), "eval_s": round(clock["eval_s"], 2),
            "train_s": round(total - clock["compile_s"] - clock["eval_s"], 2), "first_step": first,
            "steps": step - first, "pretrain_steps": max(0, min(step, pre_total) - first),
            "hardware": hardware(device)}


# -- learning_curves.png ------------------------------------------------------------------------------------


def plot_curves(out: Path):
    """learning_curves.png from metrics.jsonl: losses over steps, and evaluation scores. A group's rows
    (one per seed and step) are drawn as their mean with a ± std band across the seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(out / runfolder.METRICS)]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    n_seeds = len({r.get("seed") for r in train}) if train and "seed" in train[0] else 1
    keys = ["loss_q", "loss_v", "loss_bc", "loss_tr", "loss_pq"]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 3.2))
    for ax, k in zip(axes, keys):
        _plot_mean_band(ax, [(r["step"], r[k]) for r in train if k in r])
        ax.set_title(k)
        ax.set_xlabel("step")
    ax = axes[-1]
    if evals:
        ykey = "score_mean" if evals[-1].get("score_mean") is not None else "return_mean"
        _plot_mean_band(ax, [(r["step"], r[ykey]) for r in evals], marker="o")
        ax.set_title("normalised score" if ykey == "score_mean" else "return")
    ax.set_xlabel("step")
    if n_seeds > 1:
        fig.suptitle(f"mean over {n_seeds} seeds, band: ± std across seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / runfolder.CURVES, dpi=80)
    plt.close(fig)


def _plot_mean_band(ax, points: list[tuple[int, float]], **style):
    """One line through the mean at each step, and a ± std band where a step has several values (seeds)."""
    curve = mean_curve(points)
    draw_mean_curve(ax, curve, band={"alpha": 0.25} if any(n > 1 for *_, n in curve) else None, **style)
