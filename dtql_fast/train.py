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


#@@TRAIN@@


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
