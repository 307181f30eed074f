"""python -m dtql_fast.train: config -> data -> agent -> loop (progress, metrics, eval, checkpoints).

With no arguments it builds a small Reacher dataset offline, trains on it and prints the scores.
`--seeds 0-4` trains a group of independent agents in one process, one step for all of them
(FastDTQL(seeds=...)): metric and evaluation rows per seed, and the mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, compiling, divergence, footprint, optional, runfolder
from .cli import HelpFormatter
from .curves import draw_mean_curve, mean_curve
from .data import OFFLINE_DATASET_ID, build_offline_dataset, check_env_widths, load_dataset
from .evaluate import evaluate, evaluate_group, make_act_fn, make_group_act_fn
from .ranges import ProfileWindow, parse_window, phase
from .seeds import SeedListError, check_seeds, folder_label, format_seeds, parse_seeds
from .tasks import OFFLINE_DEMO_HYPER, Hyper, UnknownTaskError
from .transitions import DatasetError
from .update import FastDTQL, StepRunner


@dataclass
class TrainConfig:
    task: str = OFFLINE_DATASET_ID
    dataset: str | None = None
    seed: int | None = None            # one agent; None: seed 0 (or, resuming, the checkpoint's)
    seeds: list[int] | None = None     # a group of agents trained in one step; exclusive with seed
    device: str = "auto"
    out: str | None = None
    resume: str | None = None
    compile: bool | None = None        # None: compiled on CUDA; on a CPU where it pays (compiling.py)
    kernels: str = "auto"
    threads: int | None = None
    eval_episodes: int | None = None
    log_every: int = 250
    checkpoint_every: float = 10.0
    profile_steps: str | None = None
    no_eval: bool = False
    overwrite: bool = False            # a run already in --out is moved aside (never deleted)
    # schedule and algorithm overrides (None: the task's table value)
    epochs: int | None = None
    steps_per_epoch: int | None = None
    pretrain_epochs: int | None = None
    eval_every: int | None = None
    alpha: float | None = None
    gamma: float | None = None
    lr: float | None = None
    lr_decay: bool | None = None
    batch_size: int | None = None
    expectile: float | None = None
    noise_levels: int | None = None

    def hyper(self, base: Hyper) -> Hyper:
        names = {f.name for f in dataclasses.fields(Hyper)}
        over = {k: v for k, v in dataclasses.asdict(self).items() if k in names and v is not None}
        return base.replace(**over)


# Flags that say where and how fast a run goes, not what it computes (sweep.py compares the rest
# between invocations of a sweep).
RUNTIME_FIELDS = ("device", "threads", "compile", "kernels", "profile_steps", "log_every", "checkpoint_every")
# What a resume may change besides those: how long it runs and how it is evaluated. Everything else
# is the run's identity, fixed by its checkpoint: a resume giving another value is refused.
RESUME_MAY_CHANGE = RUNTIME_FIELDS + ("epochs", "eval_every", "eval_episodes", "no_eval")


def flag(field: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--" + field.replace("_", "-")


class ConfigError(ValueError):
    """A flag that cannot train, refused before anything is read or written."""


def _at_least(lo):
    return lambda v: v >= lo, f">= {lo}"


# flag name -> (test, what it needs); None values (the task's table) are not checked.
_RANGES = {
    "epochs": _at_least(1), "steps_per_epoch": _at_least(1), "pretrain_epochs": _at_least(0),
    "eval_every": _at_least(1), "eval_episodes": _at_least(1), "log_every": _at_least(1),
    "batch_size": _at_least(1), "noise_levels": _at_least(1), "threads": _at_least(1),
    "checkpoint_every": (lambda v: math.isfinite(v) and v >= 0, "minutes >= 0 (0: only at evaluations and the end)"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "alpha": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "gamma": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "expectile": (lambda v: 0 < v < 1, "a number strictly between 0 and 1"),
}


def check_config(cfg: TrainConfig):
    """Every flag that can be checked without data, checked at once: ranges, the device, the profile
    window, the seeds. Raises ConfigError naming the flag and what it takes (SeedListError for the seeds)."""
    check_seed_flags(cfg)
    problems = []
    for name, (ok, need) in _RANGES.items():
        v = getattr(cfg, name)
        if v is not None and not ok(v):
            problems.append(f"{flag(name)} {v}: takes {need}")
    try:
        parse_window(cfg.profile_steps)
    except ValueError as e:
        problems.append(str(e))
    if cfg.device != "auto":
        try:
            dev = torch.device(cfg.device)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            problems.append(f"--device {cfg.device}: takes cpu, cuda, cuda:N or auto")
        elif dev.type == "cuda" and not torch.cuda.is_available():
            problems.append(f"--device {cfg.device}: torch sees no CUDA device; use --device cpu")
        elif dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            problems.append(f"--device {cfg.device}: there are {torch.cuda.device_count()} CUDA devices")
    if problems:
        raise ConfigError("; ".join(problems))


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(
        prog="python -m dtql_fast.train",
        description="Train DTQL (Diffusion Trusted Q-Learning) on a D4RL task or a Minari dataset. "
                    "With no arguments: build a small offline Reacher dataset and train on it (minutes on a CPU).",
        formatter_class=HelpFormatter)
    a = p.add_argument
    a("--task", default=OFFLINE_DATASET_ID,
      help="a D4RL task of the paper's table (e.g. walker2d-medium-v2) or a Minari dataset id "
           "(e.g. mujoco/walker2d/medium-v0)")
    a("--dataset", help="path to the D4RL HDF5 file (default: the D4RL cache, ~/.d4rl/datasets); "
                        "for a Minari id, the Minari datasets folder")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--seed", type=int, help="one agent: seeds weights, batches, noise and evaluation (default: 0)")
    who.add_argument("--seeds", metavar="LIST",
                     help="a group of independent agents trained together, one step for all: a range 0-4, a list "
                          "0,3,7, or both 0-2,7; seed s starts from --seed s's weights and is evaluated on its envs")
    a("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    a("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    a("--out", help="run folder for metrics, plots and checkpoints (default: runs/<task>-s<seed>, "
                    "for a group runs/<task>-seeds0-4 or runs/<task>-seeds0_3_7)")
    a("--resume", help="a run folder (or checkpoint.pt) to continue; gives the same numbers as an uninterrupted run. "
                       "It may change only " + ", ".join(map(flag, RESUME_MAY_CHANGE)))
    a("--overwrite", action="store_true",
      help="if --out holds a run, move it aside to <out>.old-<time> first (nothing is deleted); without it, "
           "a new run into a folder holding one is refused")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile(fullgraph=True) the whole step (on CUDA also replayed as a CUDA graph), or not. "
           "Default: compiled on CUDA; on a CPU the run times a few eager steps and compiles the rest where "
           "the time saved beats the compile (warm when an earlier run compiled the same shapes)")
    a("--kernels", choices=["auto", "torch", "triton"], default="auto",
      help="EDM losses: fused Triton kernels or the plain PyTorch formula (auto: triton on CUDA)")
    g = p.add_argument_group("schedule (default: the task's table)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--steps-per-epoch", type=int)
    g.add_argument("--pretrain-epochs", type=int)
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs")
    g.add_argument("--eval-episodes", type=int)
    g.add_argument("--no-eval", action="store_true", help="skip evaluation (checkpoints still written)")
    g.add_argument("--log-every", type=int, default=250, help="steps between metric rows")
    g.add_argument("--checkpoint-every", type=float, default=10.0, metavar="MINUTES",
                   help="also checkpoint every MINUTES of training, not only at evaluations and the end "
                        "(0: not by time); the one before is kept as checkpoint.prev.pt")
    g.add_argument("--profile-steps", metavar="A:B",
                   help="profile steps A..B-1: cudaProfilerStart/Stop on CUDA (for nsys "
                        "--capture-range=cudaProfilerApi), a torch.profiler Chrome trace on CPU")
    h = p.add_argument_group("algorithm overrides (default: the task's table)")
    h.add_argument("--alpha", type=float, help="trust-region weight")
    h.add_argument("--gamma", type=float, help="entropy-term weight")
    h.add_argument("--lr", type=float, help="diffusion and policy learning rate (the critic always uses 3e-4)")
    h.add_argument("--lr-decay", action=argparse.BooleanOptionalAction, default=None)
    h.add_argument("--batch-size", type=int)
    h.add_argument("--expectile", type=float)
    h.add_argument("--noise-levels", type=int, help="K noise levels per row in both EDM losses (1: the paper)")
    ns = p.parse_args(argv)
    if ns.seed is not None and ns.seed < 0:
        p.error(f"--seed {ns.seed}: seeds are non-negative integers")
    if ns.seeds is not None:
        try:
            ns.seeds = list(parse_seeds(ns.seeds))
        except SeedListError as e:
            p.error(str(e))
    return TrainConfig(**{k: v for k, v in vars(ns).items()})


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu")
    return dev


class MetricLog:
    """metrics.jsonl (every row), train.csv and eval.csv (one table each), appended as they come."""

    CSV_NAMES = {"train": runfolder.TRAIN_CSV, "eval": runfolder.EVAL_CSV}  # a row's kind -> its table

    # Columns that label a row rather than measure something: not drawn as TensorBoard scalars.
    LABELS = ("step", "epoch", "seed", "env_seed", "episodes")

    def __init__(self, out: Path):
        self.out = out
        self.jsonl = open(out / runfolder.METRICS, "a")
        self._csv: dict[str, tuple] = {}
        self.tb = _tensorboard_writer(out / runfolder.TENSORBOARD)

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
        if self.tb is not None:  # the row's numbers, already on the host: no device sync of its own
            seed = f"/seed{row['seed']}" if "seed" in row else ""
            for k, v in flat.items():
                if k not in self.LABELS and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}{seed}", v, row["step"])

    def sync(self):
        """Put the rows written so far on the disk (before a checkpoint that counts on them)."""
        for f in [self.jsonl, *(f for f, _ in self._csv.values())]:
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        self.jsonl.close()
        for f, _ in self._csv.values():
            f.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter on `folder`, or None where the tensorboard package is not installed
    (pip install tensorboard; `.[test]` installs it)."""
    if not optional.have("tensorboard"):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder))


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


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


class StopAtStepEnd:
    """Ctrl-C or SIGTERM ask the loop to stop where a step ends: a checkpoint of a half-updated
    agent would resume into other numbers. A second Ctrl-C stops at once, without a checkpoint."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> StopAtStepEnd:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping when this step ends, with a checkpoint "
                   "(Ctrl-C again: stop now, without one)")

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def run_folder(cfg: TrainConfig) -> Path:
    """--out; else the folder resumed from; else runs/<task>-s<seed>, or for a group
    runs/<task>-seeds<list> (seeds0-4, seeds0_3_7: never a single seed's folder, a group of one included)."""
    if cfg.out:
        return Path(cfg.out)
    if cfg.resume:
        return Path(cfg.resume) if Path(cfg.resume).is_dir() else Path(cfg.resume).parent
    who = f"s{cfg.seed or 0}" if cfg.seeds is None else folder_label(cfg.seeds)
    return Path(f"runs/{cfg.task.replace('/', '_')}-{who}")


def check_seed_flags(cfg: TrainConfig):
    """A seed list that cannot train is refused before anything is read or written (parse_args refuses
    a bad --seeds already; this covers a TrainConfig built in code)."""
    if cfg.seeds is None:
        return
    if cfg.seed is not None:
        raise SeedListError(f"give --seed or --seeds, not both (got --seed {cfg.seed} and --seeds {cfg.seeds})")
    check_seeds(cfg.seeds, "--seeds")


def _who(cfg: TrainConfig) -> str:
    if cfg.seeds is not None:
        return f"the seed group {list(cfg.seeds)} (--seeds {format_seeds(cfg.seeds)})"
    return f"the single seed {cfg.seed} (--seed {cfg.seed})"


def check_resumed_seeds(cli: TrainConfig, saved: TrainConfig, where: str):
    """A resumed run trains its checkpoint's seeds: --seed or --seeds naming others is refused, naming both."""
    if cli.seed is None and cli.seeds is None:
        return
    group = saved.seeds is not None
    if (cli.seeds is not None) == group and (list(cli.seeds) == list(saved.seeds) if group else cli.seed == saved.seed):
        return
    raise checkpoint.CheckpointError(
        f"{where} trains {_who(saved)}, but this run asks for {_who(cli)}; resume it without --seed/--seeds, "
        "or train those seeds as a new run with another --out")


def train(cfg: TrainConfig) -> dict:
    check_config(cfg)
    out = run_folder(cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    try:
        if not cfg.resume:
            keep_existing_run(out, cfg.overwrite)
        lock = runfolder.RunLock(out)
        lock.acquire()  # one writer per run folder, from before the first read
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror}); choose another --out") from None
    try:
        if lock.note:
            print(f"note: {lock.note}")
        return _train(cfg, out)
    finally:
        lock.release()


def keep_existing_run(out: Path, overwrite: bool):
    """A new run never writes over one: refused, or with --overwrite the old run moved aside."""
    found = runfolder.run_files(out)
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"{out} holds a run already ({', '.join(found)}); continue it with --resume {out}, "
                          "write this one to another --out, or pass --overwrite to move the old run aside")
    aside = runfolder.move_aside(out)
    print(f"note: the run that was in {out} is now in {aside}")


def resumed_config(cli: TrainConfig, saved: TrainConfig, saved_hyper: dict, out: Path,
                   where: str) -> tuple[TrainConfig, dict]:
    """The resumed run's config: the checkpoint's, with the flags a resume may change taken from the
    command where it gives them (RESUME_MAY_CHANGE; a flag left at its default keeps the run's). A
    flag that would change the run itself is refused, not dropped (compared with the value the run
    trains with: its flag, else its task's table entry).
    Returns (config, {flag: (before, now)} for what changed)."""
    fixed = [f.name for f in dataclasses.fields(TrainConfig)
             if f.name not in RESUME_MAY_CHANGE + ("task", "seed", "seeds", "out", "resume", "overwrite")]

    def has(k):
        return getattr(saved, k) if getattr(saved, k) is not None else saved_hyper.get(k)

    def same(k, a, b):
        if k == "dataset" and a and b:
            return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
        return a == b

    refused = [(k, has(k), getattr(cli, k)) for k in fixed
               if getattr(cli, k) is not None and not same(k, has(k), getattr(cli, k))]
    if refused:
        what = "; ".join(f"{flag(k)} (the run has {old}, this command gives {new})" for k, old, new in refused)
        raise checkpoint.CheckpointError(
            f"{where}: a resume continues the run as it was set up and cannot change {what}. Resume without "
            f"them, or start a new run with another --out. A resume may change only "
            + ", ".join(map(flag, RESUME_MAY_CHANGE)))
    default = TrainConfig()
    take = {k: getattr(cli, k) for k in RESUME_MAY_CHANGE if getattr(cli, k) != getattr(default, k)}
    cfg = dataclasses.replace(saved, resume=cli.resume, out=str(out), **take)
    changed = {k: (getattr(saved, k), getattr(cfg, k)) for k in RESUME_MAY_CHANGE if getattr(saved, k) != getattr(cfg, k)}
    return cfg, changed


def _train(cfg: TrainConfig, out: Path) -> dict:
    device = _device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    latest = checkpoint.load_latest(cfg.resume, map_location=device) if cfg.resume else None
    resumed = latest.ckpt if latest else None
    if resumed is not None:
        if latest.note:
            print(f"note: {latest.note}")
        saved = TrainConfig(**resumed["config"])
        if cfg.task != TrainConfig.task and cfg.task != saved.task:
            checkpoint.check_compatible(resumed, cfg.task, {}, where=f"checkpoint in {cfg.resume}")
        check_resumed_seeds(cfg, saved, where=f"checkpoint {latest.path}")
        # The run's identity comes from the checkpoint; where, how fast and how long it runs from the CLI.
        cfg, changed = resumed_config(cfg, saved, resumed.get("hyper", {}), out, where=f"checkpoint {latest.path}")
        if changed:
            print("resume changes: " + ", ".join(f"{flag(k)} {a} -> {b}" for k, (a, b) in changed.items()))
    elif cfg.seeds is None and cfg.seed is None:
        cfg = dataclasses.replace(cfg, seed=0)
    group = cfg.seeds  # None: one agent
    # The stream of batches and draws; a group's seeds draw their initial weights under their own seeds.
    torch.manual_seed(cfg.seed if group is None else group[0])

    # -- data --------------------------------------------------------------------------------
    loaded = load_run_data(cfg, device)
    data, task = loaded.transitions, loaded.task
    check_env_widths(loaded, need_env=not cfg.no_eval)
    hyper = cfg.hyper(task.hyper)
    if cfg.no_eval is False and loaded.env_problem:
        raise SystemExit(f"error: evaluation for {cfg.task} cannot run: {loaded.env_problem} "
                         "(or pass --no-eval)")
    eval_episodes = cfg.eval_episodes or task.eval_episodes
    kernels = cfg.kernels if cfg.kernels != "auto" else ("triton" if device.type == "cuda" else "torch")

    # -- agent -------------------------------------------------------------------------------
    if group is not None:  # one agent's weights tell what the group needs, before the group is built
        one = FastDTQL(data.state_dim, data.action_dim, hyper, "cpu")
        footprint.check_group_fits(len(group), footprint.weight_bytes_of(one.params()), hyper.batch_size,
                                   hyper.hidden, device)
        del one
    agent = FastDTQL(data.state_dim, data.action_dim, hyper, device, kernels=kernels, seeds=group)
    shapes = {"state_dim": data.state_dim, "action_dim": data.action_dim, "hidden": hyper.hidden,
              "noise_levels": hyper.noise_levels}
    start, kept_rows = 0, []
    if resumed is not None:
        checkpoint.check_compatible(resumed, cfg.task, shapes, where=f"checkpoint in {latest.path}")
        agent.load_state_dict(resumed["agent"])
        _set_rng_state(resumed["rng"], device)
        start = resumed["step"]
        kept_rows = runfolder.trim_metrics(out, start)  # the rows past it are about to be written again
    checkpoint.remove_partial(out)

    spe = hyper.steps_per_epoch
    pre_total, total = hyper.pretrain_epochs * spe, hyper.run_steps
    choice = compiling.initial(cfg.compile, device)  # compile or not; None: decided after timing eager steps
    cache = compiling.use_cache() if choice.compile is not False else None
    runners = {}

    def mode() -> str:
        return "eager" if not choice.compile else ("cudagraph" if device.type == "cuda" else "compile")

    def runner(pretrain: bool) -> StepRunner:
        if pretrain not in runners:
            runners[pretrain] = StepRunner(agent, data, mode=mode(), pretrain=pretrain)
        return runners[pretrain]

    def signature(pretrain: bool) -> str:  # what a compiled step is cached by, beside its graph
        return (f"{device.type}|S{data.state_dim}|A{data.action_dim}|B{hyper.batch_size}|K{hyper.noise_levels}|"
                f"H{hyper.hidden}|N{len(group) if group else 0}|{kernels}|{'pretrain' if pretrain else 'train'}")

    log = MetricLog(out)
    (out / runfolder.CONFIG).write_text(json.dumps({"config": dataclasses.asdict(cfg),
                                                    "hyper": dataclasses.asdict(hyper),
                                                    "task": cfg.task, "source": loaded.source}, indent=2))
    kernels_text = kernels if device.type == "cuda" or kernels == "torch" else f"{kernels} (their PyTorch form on a CPU)"
    who = f"seed {cfg.seed}" if group is None else f"seeds {format_seeds(group)} ({len(group)} agents, one step)"
    print(f"dtql_fast | task {cfg.task} | {who} | {data.n} transitions, state {data.state_dim}, action "
          f"{data.action_dim} | device {device} | step: {mode() if choice.compile is not None else 'auto'} "
          f"({choice.why}), kernels {kernels_text} | out {out}")
    if loaded.note:
        print(f"note: {loaded.note}")

    ckpts = checkpoint.Schedule(out / checkpoint.FILENAME, cfg.checkpoint_every, latest, start)

    best = checkpoint.Best(out / checkpoint.BEST)

    def payload(step: int) -> dict:
        state = agent.state_dict()
        divergence.check_state(step, state)  # a diverged state never replaces a good checkpoint
        return {"task": cfg.task, "shapes": shapes, "config": dataclasses.asdict(cfg),
                "hyper": dataclasses.asdict(hyper), "agent": state, "step": step, "rng": _rng_state(device)}

    def save_checkpoint(step: int):
        if step == ckpts.saved_step:
            return
        state = payload(step)
        log.sync()  # the rows this checkpoint vouches for reach the disk before it does
        try:
            ckpts.save(step, state)
        except runfolder.CannotWrite as e:
            kept = (f"the checkpoint of step {ckpts.last_good[1]} is untouched: once fixed, resume with "
                    f"python -m dtql_fast.train --resume {out}" if ckpts.last_good else
                    "no checkpoint was written before it")
            raise runfolder.CannotWrite(f"{e}; {kept}") from None

    def acting():
        return torch.compile(agent.act, fullgraph=True) if choice.compile else agent.act

    act_rule = acting()

    def run_eval(step: int) -> list[dict]:
        t0 = time.perf_counter()
        with phase("evaluate"):
            results = evaluate_agents(act_rule, loaded, hyper, device, cfg, step, eval_episodes,
                                      padded=bool(choice.compile))
        clock["eval_s"] += time.perf_counter() - t0
        rows = eval_rows(results, step, (step - pre_total) // spe, group)
        for row in rows:
            log.write("eval", row)
        tqdm.write(eval_message(rows, group))
        best.offer(step, *eval_mean(rows), lambda: payload(step))
        return rows

    # This process's wall time, split (summary.json "time"; the report's time per task).
    clock = {"start": time.perf_counter(), "compile_s": 0.0, "eval_s": 0.0, "first_step": start}
    graphs_before = _compiled_graphs()
    profile = ProfileWindow(cfg.profile_steps, device, out)
    bar = tqdm(total=total, initial=start, desc="pretrain" if start < pre_total else "train",
               dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
    # Resumed where a run ended: its final evaluation is already in the kept rows.
    last_eval = list({r.get("seed"): r for r in kept_rows if r.get("kind") == "eval" and r["step"] == start}.values())
    last_eval = last_eval or None
    step = start
    t_log, steps_since = time.perf_counter(), 0
    compile_reported = set()
    timed, t_timed = 0, 0.0  # eager steps timed for the automatic choice
    weights = divergence.WeightWatch(agent.params(), seeds=group)
    stop = StopAtStepEnd().install()  # uninstalled in the finally: below
    try:
        while step < total and stop.signum is None:
            pretrain = step < pre_total
            profile.before(step)
            run = runner(pretrain)
            first_compiled = bool(choice.compile) and pretrain not in compile_reported
            hits = compiling.cache_hits() if first_compiled else 0
            t_step = time.perf_counter()
            run()
            t_step = time.perf_counter() - t_step
            if run.compile_seconds and pretrain not in compile_reported:
                compile_reported.add(pretrain)
                warm = compiling.cache_hits() > hits
                tqdm.write(f"compiled the {'pretraining' if pretrain else 'training'} step in "
                           f"{run.compile_seconds:.1f}s ({'warm: from' if warm else 'cold; kept for the next run in'} "
                           f"{cache})")
                compiling.remember(cache, signature(pretrain), run.compile_seconds)
                clock["compile_s"] += run.compile_seconds
            if choice.compile is None and step - start >= compiling.SKIP_STEPS:
                timed, t_timed = timed + 1, t_timed + t_step
                if timed == compiling.MEASURE_STEPS:
                    phases = [True, False] if step + 1 < pre_total else [False]  # graphs still to compile
                    choice = compiling.decide(t_timed / timed, total - step - 1, len(phases),
                                              all(compiling.compiled_before(cache, signature(p)) for p in phases))
                    tqdm.write(f"step: {'compiled' if choice.compile else 'eager'} for the rest of the run: {choice.why}")
                    if choice.compile:
                        runners.clear()
                        act_rule = acting()
            profile.after(step)
            step += 1
            steps_since += 1
            bar.update(1)
            if step == pre_total:
                bar.set_description("train")
            phase_end = step == pre_total or step == total
            if step % cfg.log_every == 0 or phase_end:
                weight_max = weights.queue()  # done by the time the read below has waited for the step
                m = agent.read_metrics(pretrain=pretrain)
                now = time.perf_counter()
                sps = steps_since / (now - t_log)
                t_log, steps_since = now, 0
                for row in train_rows(step, pretrain, sps, m, agent.lrs(), group):
                    log.write("train", row)
                bar.set_postfix(progress_postfix(m, sps))
                divergence.check_log_row(step, m, weight_max, seeds=group)
            if not pretrain and (step - pre_total) % spe == 0:
                epoch = (step - pre_total) // spe
                if not cfg.no_eval and (epoch % hyper.eval_every == 0 or step == total):
                    last_eval = run_eval(step)
                    save_checkpoint(step)
                elif step == total:
                    save_checkpoint(step)
            if ckpts.due():
                save_checkpoint(step)
        bar.close()
        save_checkpoint(step)  # at the end, or where a stop was asked for
    except KeyboardInterrupt:  # a second Ctrl-C, maybe mid-step: the state may be half updated
        bar.close()
        log.close()
        resume = (f"resume from step {ckpts.last_good[1]} with: python -m dtql_fast.train --resume {out}"
                  if ckpts.last_good else "none was written before")
        print(f"\ninterrupted at step {step} without a checkpoint; {resume}")
        raise SystemExit(130)
    except divergence.Diverged as e:
        bar.close()
        log.close()
        e.kept = divergence.what_is_kept(ckpts.last_good)
        raise
    except Exception:  # the error message goes below the bar, not into its line
        bar.close()
        raise
    finally:
        stop.uninstall()
        profile.close()
    if stop.signum is not None:
        print(f"\nstopped at step {step} ({signal.Signals(stop.signum).name}); checkpoint saved. Resume with: "
              f"python -m dtql_fast.train --resume {out}")
        log.close()
        raise SystemExit(128 + stop.signum)
    if last_eval is None and not cfg.no_eval:
        last_eval = run_eval(step)
    log.close()
    plot_curves(out)
    summary = {"task": cfg.task, "steps": step, "out": str(out), **({} if group is None else {"seeds": list(group)})}
    summary["time"] = run_time(clock, step, pre_total, device)
    summary["step_mode"] = mode()
    if choice.compile:
        # One graph each for pretraining, training and acting; more would mean recompilation.
        summary["compiled_graphs"] = _compiled_graphs() - graphs_before
        print(f"compiled graphs: {summary['compiled_graphs']} (pretraining step, training step, acting; "
              "more would mean a recompile)")
    if last_eval is not None:
        summary.update(eval_summary(last_eval, group, eval_episodes, loaded.behaviour_return))
        print(final_message(cfg.task, summary, group))
    (out / runfolder.SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


# -- one seed or a group: the rows, messages and summary that differ ----------------------------------------


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


def train_rows(step: int, pretrain: bool, sps: float, metrics: dict | list[dict], lrs: dict,
               group: list[int] | None) -> list[dict]:
    """A log interval's rows: one for one agent; for a group one per seed, with its seed in a `seed` column."""
    where = {"phase": "pretrain" if pretrain else "train", "steps_per_s": sps}
    if group is None:
        return [{"step": step, **where, **metrics, **lrs}]
    return [{"step": step, "seed": s, **where, **m, **lrs} for s, m in zip(group, metrics)]


def progress_postfix(metrics: dict | list[dict], sps: float) -> dict:
    """The progress bar's losses: the agent's, or the group's mean over its seeds."""
    if isinstance(metrics, list):
        metrics = {k: statistics.fmean(m[k] for m in metrics) for k in metrics[0]}
    return {k.replace("loss_", ""): f"{v:.3g}" for k, v in metrics.items() if k.startswith("loss")} | {"it/s": f"{sps:.0f}"}


def load_run_data(cfg: TrainConfig, device: torch.device):
    """The dataset (and evaluation env, task, reference scores) a run trains on: its --dataset file or
    Minari id, else the task's D4RL file; the offline Reacher demo for the default task."""
    if cfg.task == OFFLINE_DATASET_ID and cfg.dataset is None:
        loaded = build_offline_dataset(device=device)
        loaded.task = dataclasses.replace(loaded.task, hyper=OFFLINE_DEMO_HYPER)
        return loaded
    return load_dataset(cfg.task, cfg.dataset, device)


def env_seed(seed: int) -> int:
    """The first evaluation env's seed of agent seed `seed` (its episode j plays env_seed + j)."""
    return seed * 10_000 + 1000


def evaluate_agents(act_rule, loaded, hyper, device: torch.device, cfg: TrainConfig, step: int,
                    episodes: int, padded: bool = False, first_env_seed: int | None = None) -> list[dict]:
    """One evaluation result per seed. Seed s plays the envs and action draws a single-seed run of s
    would (env seeds s * 10000 + 1000 + j, draws from a generator seeded by s and the step); a group
    plays all its seeds' episodes in one vector env, one acting call per env step. Compiled, every
    call acts on all `episodes` rows a seed, finished envs padded, so the acting graph never recompiles."""
    A, R = loaded.transitions.action_dim, hyper.num_candidates

    def draws(seed: int) -> torch.Generator:
        return torch.Generator(device).manual_seed(seed * 1_000_003 + step)

    def envs(i: int, seed: int) -> int:  # first_env_seed (python -m dtql_fast.evaluate --env-seed): other envs
        return env_seed(seed) if first_env_seed is None else first_env_seed + 10_000 * i

    if cfg.seeds is None:
        act = make_act_fn(act_rule, A, R, device, draws(cfg.seed), pad_to=episodes if padded else None)
        return [evaluate(act, loaded.make_env, episodes, seed=envs(0, cfg.seed), task=loaded.task)]
    act = make_group_act_fn(act_rule, A, R, device, [draws(s) for s in cfg.seeds], pad=padded)
    return evaluate_group(act, loaded.make_env, episodes, [envs(i, s) for i, s in enumerate(cfg.seeds)],
                          task=loaded.task)


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


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (UnknownTaskError, DatasetError, checkpoint.CheckpointError, divergence.Diverged,
            runfolder.RunFolderBusy, runfolder.CannotWrite, footprint.GroupTooLarge, SeedListError,
            ConfigError) as e:
        raise SystemExit(f"error: {e}")
    except (OSError, RuntimeError) as e:  # a metric file, summary or plot meeting a full or read-only disk
        fault = runfolder.write_fault(e)
        if fault is None:
            raise
        raise SystemExit(f"error: {runfolder.cannot_write(fault.filename or run_folder(cfg), fault)}") from None


if __name__ == "__main__":
    main()
