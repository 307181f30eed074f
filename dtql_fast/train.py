"""python -m dtql_fast.train: config -> data -> agent -> loop (progress, metrics, eval, checkpoints).
_train reads top to bottom in that order; what a run prints and writes about itself is reporting.py's.

With no arguments it builds a small Reacher dataset offline, trains on it and prints the scores.
`--seeds 0-4` trains a group of independent agents in one process, one step for all of them
(FastDTQL(seeds=...)): metric and evaluation rows per seed, and the mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, compiling, divergence, footprint, reporting, runfolder, tracking
from .cli import HelpFormatter
from .data import OFFLINE_DATASET_ID, build_offline_dataset, check_env_widths, load_dataset
from .evaluate import evaluate_group, make_group_act_fn
from .ranges import ProfileWindow, parse_window, phase
# What a run prints and writes about itself (rows, messages, summary.json's parts, the plot) is reporting.py's.
from .reporting import (MetricLog, eval_mean, eval_message, eval_rows, eval_summary, final_message, plot_curves,
                        progress_postfix, run_time, start_message, train_rows)
from .seeds import SeedListError, check_seeds, folder_label, format_seeds, parse_seeds
from .tasks import OFFLINE_DEMO_HYPER, Hyper, UnknownTaskError, one_per_task
from .transitions import AgentData, DatasetError
from .update import FastDTQL, GroupMismatch, StepRunner

# Still importable from here, where they were before reporting.py (profiling.gpu_check imports hardware).
hardware, over_seeds = reporting.hardware, reporting.over_seeds


# The titled flag groups of --help: a field's metadata names its group (None: the parser's own
# "options"; "who": --seed | --seeds, one or the other). Groups and flags show in field order.
FLAG_GROUPS = {
    "schedule": "schedule (default: the task's table)",
    "tracking": "tracking (TensorBoard event files are written wherever tensorboard is installed)",
    "algorithm": "algorithm overrides (default: the task's table)",
}


def flag_meta(help: str | None = None, *, group: str | None = None, metavar: str | None = None,
              choices: list[str] | None = None, resume: int | None = None, runtime: bool = False,
              grid: bool = False) -> dict:
    """A TrainConfig field's command-line facts, kept in its dataclasses.field metadata; parse_args builds
    the parser from them. The flag's type and action come from the field's annotation and default (int,
    float, str; bool: a store_true switch, or --x/--no-x where the default None means "not given").
    resume: the field's place in the list of flags a resume may change (RESUME_MAY_CHANGE; None: fixed
    by the run's checkpoint). runtime: where and how fast a run goes, not what it computes (RUNTIME_FIELDS).
    grid: a comma list of values trains one agent per value, all in one step (GRID_FIELDS)."""
    return {"help": help, "group": group, "metavar": metavar, "choices": choices, "resume": resume,
            "runtime": runtime, "grid": grid}


def _option(default, help: str | None = None, **meta):
    return field(default=default, metadata=flag_meta(help, **meta))


@dataclass
class TrainConfig:
    """Every flag of python -m dtql_fast.train, in --help's order, with its help text."""
    task: str | list[str] = _option(
        OFFLINE_DATASET_ID, "a D4RL task of the paper's table (e.g. walker2d-medium-v2) or a Minari dataset id (e.g. "
                            "mujoco/walker2d/medium-v0); a comma list trains every task's agents in one step (their "
                            "state and action widths and shared settings equal; each agent samples its own task's "
                            "data and plays its own task's env)", grid=True)
    dataset: str | None = _option(None, "path to the D4RL HDF5 file (default: the D4RL cache, ~/.d4rl/datasets); "
                                        "for a Minari id, the Minari datasets folder; with a --task list, one path "
                                        "for all or a comma list of one per task")
    # None: seed 0 (or, resuming, the checkpoint's)
    seed: int | None = _option(None, "one agent: seeds weights, batches, noise and evaluation (default: 0)",
                               group="who")
    # given as text, parsed after parse_args (seeds.parse_seeds)
    seeds: list[int] | None = _option(
        None, "a group of independent agents trained together, one step for all: a range 0-4, a list 0,3,7, "
              "or both 0-2,7; seed s starts from --seed s's weights and is evaluated on its envs",
        group="who", metavar="LIST")
    device: str = _option("auto", "cpu, cuda, cuda:N, or auto (cuda when available)", resume=1, runtime=True)
    threads: int | None = _option(None, "CPU threads for torch (default: torch's choice)", resume=2, runtime=True)
    out: str | None = _option(None, "run folder for metrics, plots and checkpoints (default: runs/<task>-s<seed>, "
                                    "for a group runs/<task>-seeds0-4 or runs/<task>-seeds0_3_7)")
    # parse_args appends the flags a resume may change (RESUME_MAY_CHANGE)
    resume: str | None = _option(None, "a run folder (or checkpoint.pt) to continue; gives the same numbers as an "
                                       "uninterrupted run. It may change only ")
    overwrite: bool = _option(False, "if --out holds a run, move it aside to <out>.old-<time> first (nothing is "
                                     "deleted); without it, a new run into a folder holding one is refused")
    compile: bool | None = _option(
        None, "torch.compile(fullgraph=True) the whole step (on CUDA also replayed as a CUDA graph), or not. "
              "Default: compiled on CUDA; on a CPU the run times a few eager steps and compiles the rest where "
              "the time saved beats the compile (warm when an earlier run compiled the same shapes)",
        resume=3, runtime=True)
    kernels: str = _option("auto", "EDM losses: fused Triton kernels or the plain PyTorch formula (auto: triton on "
                                   "CUDA)", choices=["auto", "torch", "triton"], resume=4, runtime=True)
    # schedule
    epochs: int | None = _option(None, group="schedule", resume=12)
    steps_per_epoch: int | None = _option(None, group="schedule")
    pretrain_epochs: int | None = _option(None, group="schedule")
    eval_every: int | None = _option(None, "evaluate every N epochs", group="schedule", resume=13)
    eval_episodes: int | None = _option(None, group="schedule", resume=14)
    no_eval: bool = _option(False, "skip evaluation (checkpoints still written)", group="schedule", resume=15)
    log_every: int = _option(250, "steps between metric rows", group="schedule", resume=6, runtime=True)
    checkpoint_every: float = _option(
        10.0, "also checkpoint every MINUTES of training, not only at evaluations and the end (0: not by time); "
              "the one before is kept as checkpoint.prev.pt",
        group="schedule", metavar="MINUTES", resume=7, runtime=True)
    profile_steps: str | None = _option(
        None, "profile steps A..B-1: cudaProfilerStart/Stop on CUDA (for nsys --capture-range=cudaProfilerApi), "
              "a torch.profiler Chrome trace on CPU",
        group="schedule", metavar="A:B", resume=5, runtime=True)
    # tracking (tracking.py)
    track: bool = _option(False, "also log every metric row to Weights & Biases", group="tracking", resume=8,
                          runtime=True)
    wandb_project: str = _option("dtql_fast", group="tracking", resume=9, runtime=True)
    wandb_entity: str | None = _option(None, group="tracking", resume=10, runtime=True)
    wandb_mode: str = _option("online", "offline: no network, the run is kept in <out>/wandb for `wandb sync`",
                              group="tracking", choices=["online", "offline"], resume=11, runtime=True)
    # algorithm overrides (None: the task's table value)
    # (grid=True: a comma list, e.g. --alpha 1,5,20, trains one agent per value and seed in one step)
    alpha: float | list[float] | None = _option(None, "trust-region weight", group="algorithm", grid=True)
    gamma: float | list[float] | None = _option(None, "entropy-term weight", group="algorithm", grid=True)
    lr: float | list[float] | None = _option(None, "diffusion and policy learning rate (the critic always uses 3e-4)",
                                             group="algorithm", grid=True)
    lr_decay: bool | None = _option(None, group="algorithm")
    batch_size: int | None = _option(None, group="algorithm")
    expectile: float | list[float] | None = _option(None, group="algorithm", grid=True)
    noise_levels: int | None = _option(None, "K noise levels per row in both EDM losses (1: the paper)",
                                       group="algorithm")

    def settings(self) -> list[dict]:
        """The grid's cells: one dict of the varied values per setting, the product of the GRID_FIELDS given
        as lists, in their order; [{}] when none is."""
        varied = {k: getattr(self, k) for k in GRID_FIELDS if isinstance(getattr(self, k), list)}
        return [dict(zip(varied, values)) for values in itertools.product(*varied.values())]

    @property
    def cells(self) -> list[tuple[dict, int]]:
        """(setting, seed) of each agent, one step for all: every setting with every seed (--seeds, or --seed's
        one, 0 when neither is given), setting-major."""
        seeds = list(self.seeds) if self.seeds is not None else [self.seed or 0]
        return [(setting, s) for setting in self.settings() for s in seeds]

    @property
    def tasks(self) -> list[str]:
        """--task as a list: one task, or a grid's tasks in their order."""
        return list(self.task) if isinstance(self.task, list) else [self.task]

    def datasets(self) -> list[str | None]:
        """--dataset for each of `tasks` (one path for all, or one per task)."""
        return one_per_task(self.dataset, len(self.tasks))

    @property
    def task_of_agent(self) -> list[int]:
        """Each agent's index in `tasks`."""
        return [self.tasks.index(setting.get("task", self.tasks[0])) for setting, _ in self.cells]

    @property
    def agents(self) -> list[int]:
        """The seed of each agent (in a grid a seed recurs, once per setting)."""
        return [s for _, s in self.cells]

    @property
    def single_seed(self) -> bool:
        """A --seed run: one agent (a group of one inside) whose folder, rows, summary and checkpoint keep the
        single-seed format, with no seed lists. --seeds 3 is a group of one in the group's format."""
        return self.seeds is None and len(self.settings()) == 1

    def hyper(self, base: Hyper) -> Hyper:
        """The task's table with the command's overrides: what every agent shares (a grid's lists left out)."""
        names = {f.name for f in dataclasses.fields(Hyper)}
        over = {k: v for k, v in dataclasses.asdict(self).items()
                if k in names and v is not None and not isinstance(v, list)}
        return base.replace(**over)

    def agent_hypers(self, bases: list[Hyper]) -> list[Hyper]:
        """Each agent's settings: its task's entry of `bases` (hyper(...) of each of `tasks`) with its grid cell's
        values."""
        return [bases[i].replace(**{k: v for k, v in setting.items() if k != "task"})
                for i, (setting, _) in zip(self.task_of_agent, self.cells)]


# What a resume may change (each field's metadata "resume" gives its place in this list): the flags that
# say where and how fast a run goes, not what it computes (RUNTIME_FIELDS: sweep.py compares the rest
# between invocations of a sweep), then how long it runs and how it is evaluated. Everything else is the
# run's identity, fixed by its checkpoint: a resume giving another value is refused.
RESUME_MAY_CHANGE = tuple(f.name for f in sorted((f for f in dataclasses.fields(TrainConfig)
                                                  if f.metadata["resume"] is not None),
                                                 key=lambda f: f.metadata["resume"]))
RUNTIME_FIELDS = tuple(k for k in RESUME_MAY_CHANGE if TrainConfig.__dataclass_fields__[k].metadata["runtime"])
# The flags a comma list makes a grid of (one agent per value and seed, one step for all).
GRID_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["grid"])


def setting_label(setting: dict) -> str:
    """A grid cell's name in rows, messages and folder names: 'alpha=5', 'alpha=5,gamma=0'."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def agent_labels(cfg: TrainConfig) -> list[dict] | None:
    """The columns naming each agent in its rows: {"seed": s}, and in a grid {"setting": ..., "seed": s};
    None for a --seed run's single-seed format (no such columns)."""
    if cfg.single_seed:
        return None
    if len(cfg.settings()) == 1:
        return [{"seed": s} for s in cfg.agents]
    return [{"setting": setting_label(st), "seed": s} for st, s in cfg.cells]


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
        for x in (v if isinstance(v, list) else [v]):
            if x is not None and not ok(x):
                problems.append(f"{flag(name)} {x}: takes {need}")
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


def _add_flag(to, f: dataclasses.Field, kind: type):
    """One TrainConfig field's flag, from its metadata, annotation and default."""
    meta = f.metadata
    kw = {"default": f.default, "help": meta["help"]}
    if f.name == "resume":
        kw["help"] += ", ".join(map(flag, RESUME_MAY_CHANGE))
    if meta["grid"] and f.name == "task":
        kw["type"], kw["metavar"] = _grid_values(f.name, str), "TASK[,TASK...]"
    elif meta["grid"]:
        kw["type"], kw["metavar"] = _grid_values(f.name), "X[,X...]"
        kw["help"] = (kw["help"] + "; " if kw["help"] else "") + "a comma list trains one agent per value (a grid)"
    elif kind is bool:  # a switch; None by default: --x / --no-x, "not given" left to the run
        kw["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
    elif kind in (int, float):
        kw["type"] = kind
    kw.update({k: meta[k] for k in ("metavar", "choices") if meta[k] is not None})
    to.add_argument(flag(f.name), **kw)


def _grid_values(name: str, kind: type = float):
    """A grid flag's argparse type: '5' -> 5.0, '1,5,20' -> [1.0, 5.0, 20.0] (a value listed twice refused);
    of names (kind str), 'a,b' -> ['a', 'b']."""
    def parse(text: str):
        try:
            values = [kind(x.strip()) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a number or a comma list of numbers (1,5,20)") from None
        if kind is str and not all(values):
            raise argparse.ArgumentTypeError(f"{text!r}: an empty name in the list")
        if len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(f"{text!r}: a value is listed twice")
        return values[0] if len(values) == 1 else values
    parse.__name__ = name  # argparse names the flag's type in its message
    return parse


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(
        prog="python -m dtql_fast.train",
        description="Train DTQL (Diffusion Trusted Q-Learning) on a D4RL task or a Minari dataset. "
                    "With no arguments: build a small offline Reacher dataset and train on it (minutes on a CPU).",
        formatter_class=HelpFormatter)
    groups = {None: p}
    kinds = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = (p.add_mutually_exclusive_group() if group == "who"  # --seed | --seeds
                             else p.add_argument_group(FLAG_GROUPS[group]))
        kind = next((t for t in typing.get_args(kinds[f.name]) if t is not type(None)), kinds[f.name])
        _add_flag(groups[group], f, kind)
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
    grid = "".join(f"-{k}{'_'.join(f'{v:g}' for v in getattr(cfg, k))}" for k in GRID_FIELDS
                   if k != "task" and isinstance(getattr(cfg, k), list))
    return Path(f"runs/{'+'.join(t.replace('/', '_') for t in cfg.tasks)}{grid}-{who}")


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
    """The run in the algorithm's order: resume, data, agent, then the loop (a step; its metric row, evaluation
    and checkpoint when due), then the summary. Run (below) holds the state the loop reads and changes."""
    device = _device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, latest = resume_from(cfg, out, device)  # latest: the checkpoint continued, None for a new run
    # The stream of batches and draws (the agents draw their initial weights under their own seeds).
    torch.manual_seed(cfg.agents[0])
    loaded, hyper = load_checked_data(cfg, device)
    agent = build_agent(cfg, loaded.transitions, hyper, loaded.hypers(cfg), device)
    start, kept_rows = load_agent_state(agent, latest, cfg, out, device)
    checkpoint.remove_partial(out)
    run = Run(cfg, out, device, loaded, hyper, agent, latest, start)  # writes config.json, prints the first line

    # Resumed where a run ended: its final evaluation is already in the kept rows.
    last_eval = list({(r.get("setting"), r.get("seed")): r for r in kept_rows
                      if r.get("kind") == "eval" and r["step"] == start}.values())
    last_eval = last_eval or None
    step = start
    stop = StopAtStepEnd().install()  # uninstalled in the finally: below
    try:
        while step < run.total and stop.signum is None:
            pretrain = step < run.pre_total
            run.profile.before(step)
            seconds = run.step(pretrain)
            run.choose_compile(step, seconds)  # the automatic choice, once, from timed eager steps
            run.profile.after(step)
            step += 1
            run.count(step)  # the progress bar, the log interval's steps
            if run.should_log(step):
                run.log_metrics(step, pretrain)
            evaluating = run.should_evaluate(step)
            if evaluating:
                last_eval = run.evaluate(step)
            if evaluating or step == run.total or run.ckpts.due():  # and every --checkpoint-every minutes
                run.ckpts.save(step)
        run.bar.close()
        run.ckpts.save(step)  # at the end, or where a stop was asked for
    except KeyboardInterrupt:  # a second Ctrl-C, maybe mid-step: the state may be half updated
        run.bar.close()
        run.log.close()
        last_good = run.ckpts.last_good
        hint = (f"resume from step {last_good[1]} with: python -m dtql_fast.train --resume {out}"
                if last_good else "none was written before")
        print(f"\ninterrupted at step {step} without a checkpoint; {hint}")
        raise SystemExit(130)
    except divergence.Diverged as e:
        run.bar.close()
        run.log.close()
        e.kept = divergence.what_is_kept(run.ckpts.last_good)
        raise
    except Exception:  # the error message goes below the bar, not into its line
        run.bar.close()
        raise
    finally:
        stop.uninstall()
        run.profile.close()
    if stop.signum is not None:
        print(f"\nstopped at step {step} ({signal.Signals(stop.signum).name}); checkpoint saved. Resume with: "
              f"python -m dtql_fast.train --resume {out}")
        run.log.close()
        raise SystemExit(128 + stop.signum)
    if last_eval is None and not cfg.no_eval:
        last_eval = run.evaluate(step)
    run.log.close()
    plot_curves(out)
    return run.write_summary(step, last_eval)


# -- before the first step: resume, data, agent ------------------------------------------------------------


def resume_from(cfg: TrainConfig, out: Path, device: torch.device) -> tuple[TrainConfig, checkpoint.Latest | None]:
    """The run's config and the checkpoint it continues. --resume: the newest checkpoint that reads, and its
    config with what a resume may change taken from the command (the rest refused when it differs). A new
    run: None, and the command's config (seed 0 when it names none)."""
    if not cfg.resume:
        return (dataclasses.replace(cfg, seed=0) if cfg.seeds is None and cfg.seed is None else cfg), None
    latest = checkpoint.load_latest(cfg.resume, map_location=device)
    resumed = latest.ckpt
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
    return cfg, latest


def load_checked_data(cfg: TrainConfig, device: torch.device) -> tuple[RunData, Hyper]:
    """The run's data (load_run_data), its widths checked against the evaluation envs', and the run's shared
    hyperparameters (the first task's table with the command's overrides). Refused when evaluation cannot run."""
    loaded = load_run_data(cfg, device)
    for name, one in zip(cfg.tasks, loaded.per_task):
        check_env_widths(one, need_env=not cfg.no_eval)
        if cfg.no_eval is False and one.env_problem:
            raise SystemExit(f"error: evaluation for {name} cannot run: {one.env_problem} (or pass --no-eval)")
    return loaded, loaded.hypers(cfg)[0]


def kernels_of(cfg: TrainConfig, device: torch.device) -> str:
    """--kernels, auto resolved: the fused Triton kernels on CUDA, the PyTorch formula on a CPU."""
    return cfg.kernels if cfg.kernels != "auto" else ("triton" if device.type == "cuda" else "torch")


def net_shapes(agent: FastDTQL) -> dict:
    """The network shapes a checkpoint records, and a resume must match."""
    return {"state_dim": agent.state_dim, "action_dim": agent.action_dim, "hidden": agent.hyper.hidden,
            "noise_levels": agent.hyper.noise_levels}


def build_agent(cfg: TrainConfig, data, hyper: Hyper, bases: list[Hyper], device: torch.device) -> FastDTQL:
    """The run's agents (one step for all; `hyper` what they share, each with its task's table (`bases`) and its
    grid cell's settings), their initial weights drawn here; a group too large for the device refused before it
    is built."""
    if len(cfg.agents) > 1:  # one agent's weights tell what the group needs, before the group is built
        one = FastDTQL(data.state_dim, data.action_dim, hyper, "cpu")
        footprint.check_group_fits(len(cfg.agents), footprint.weight_bytes_of(one.params()), hyper.batch_size,
                                   hyper.hidden, device)
        del one
    return FastDTQL(data.state_dim, data.action_dim, hyper, device, kernels=kernels_of(cfg, device), seeds=cfg.agents,
                    hypers=cfg.agent_hypers(bases), datasets=cfg.task_of_agent)


def load_agent_state(agent: FastDTQL, latest: checkpoint.Latest | None, cfg: TrainConfig, out: Path,
                     device: torch.device) -> tuple[int, list[dict]]:
    """A resumed run's agent and RNG state from its checkpoint, and its metric rows trimmed back to the
    checkpoint's step. Returns (the step to start from, the rows kept); (0, []) for a new run."""
    if latest is None:
        return 0, []
    resumed = latest.ckpt
    checkpoint.check_compatible(resumed, cfg.task, net_shapes(agent), where=f"checkpoint in {latest.path}")
    agent.load_state_dict(checkpoint.agent_state(resumed))
    _set_rng_state(resumed["rng"], device)
    start = resumed["step"]
    kept_rows = runfolder.trim_metrics(out, start)  # the rows past it are about to be written again
    return start, kept_rows


# -- the loop's state and steps ------------------------------------------------------------------------------


class Checkpointer:
    """A run's checkpoints: checkpoint.pt when the loop saves (at evaluations, at the end, where a stop was
    asked for, every --checkpoint-every minutes: checkpoint.Schedule, the one before kept), and
    checkpoint.best.pt at an evaluation that beats the run's best (checkpoint.Best)."""

    def __init__(self, out: Path, every_minutes: float, latest: checkpoint.Latest | None, start: int,
                 payload, log: MetricLog):
        self.out, self._make_payload, self._log = out, payload, log
        self.schedule = checkpoint.Schedule(out / checkpoint.FILENAME, every_minutes, latest, start)
        self.best = checkpoint.Best(out / checkpoint.BEST)
        self._made: tuple[int, dict] | None = None  # (step, payload): an evaluation's best and its save share it

    def _payload(self, step: int) -> dict:
        if self._made is None or self._made[0] != step:
            self._made = (step, self._make_payload(step))
        return self._made[1]

    @property
    def last_good(self) -> tuple[Path, int] | None:
        """(file, step) of the newest checkpoint known good; None when there is none."""
        return self.schedule.last_good

    def due(self) -> bool:
        """--checkpoint-every minutes have passed since the last save."""
        return self.schedule.due()

    def save(self, step: int):
        """checkpoint.pt at `step` (nothing when it holds that step already). A diverged state is refused
        (divergence.Diverged); a write that fails says which checkpoint is untouched (runfolder.CannotWrite)."""
        if step == self.schedule.saved_step:
            return
        state = self._payload(step)
        self._made = None  # the loop moves on: the next save is of another state
        self._log.sync()  # the rows this checkpoint vouches for reach the disk before it does
        try:
            self.schedule.save(step, state)
        except runfolder.CannotWrite as e:
            last_good = self.schedule.last_good
            kept = (f"the checkpoint of step {last_good[1]} is untouched: once fixed, resume with "
                    f"python -m dtql_fast.train --resume {self.out}" if last_good else
                    "no checkpoint was written before it")
            raise runfolder.CannotWrite(f"{e}; {kept}") from None

    def offer_best(self, step: int, rows: list[dict]):
        """checkpoint.best.pt at `step` when this evaluation's mean over the agents beats the run's best."""
        self.best.offer(step, *eval_mean(rows), lambda: self._payload(step))


class Run:
    """One run from its first step to its summary: the state the loop in _train reads and changes, and the
    loop's steps as methods. The step runs eager or compiled (`choice`; on CUDA compiled runs as a CUDA graph);
    should_log and should_evaluate say when a step's end writes a metric row or evaluates; `ckpts` saves."""

    def __init__(self, cfg: TrainConfig, out: Path, device: torch.device, loaded, hyper: Hyper, agent: FastDTQL,
                 latest: checkpoint.Latest | None, start: int):
        self.cfg, self.out, self.device, self.loaded, self.hyper, self.agent = cfg, out, device, loaded, hyper, agent
        self.data, self.start = loaded.transitions, start
        # The columns naming each agent in the run folder: None in a --seed run's single-seed format (reporting.py).
        self.who = agent_labels(cfg)
        self.labels = [""] if self.who is None else [f"{reporting.agent_name(w)}: " for w in self.who]  # in messages
        self.kernels = kernels_of(cfg, device)
        self.eval_episodes = cfg.eval_episodes or loaded.eval_episodes()
        self.spe = hyper.steps_per_epoch
        self.pre_total, self.total = hyper.pretrain_epochs * self.spe, hyper.run_steps
        self.choice = compiling.initial(cfg.compile, device)  # compile or not; None: decided after timing eager steps
        self.cache = compiling.use_cache() if self.choice.compile is not False else None
        self.runners: dict[bool, StepRunner] = {}

        try:
            trackers = tracking.open_trackers(out, cfg.track, dataclasses.asdict(cfg), cfg.wandb_project,
                                              cfg.wandb_entity, cfg.wandb_mode, name=out.name)
        except ImportError as e:
            raise ConfigError(str(e)) from None
        self.log = MetricLog(out, trackers)
        (out / runfolder.CONFIG).write_text(json.dumps({"config": dataclasses.asdict(cfg),
                                                        "hyper": dataclasses.asdict(hyper),
                                                        "task": cfg.task, "source": loaded.source}, indent=2))
        print(start_message(",".join(cfg.tasks), cfg.seed, self.who, self.data, device,
                            self.mode() if self.choice.compile is not None else "auto", self.choice.why,
                            self.kernels, out))
        if loaded.note:
            print(f"note: {loaded.note}")

        self.ckpts = Checkpointer(out, cfg.checkpoint_every, latest, start, self.payload, self.log)
        self.act_rule = self.acting()
        # This process's wall time, split (summary.json "time"; the report's time per task).
        self.clock = {"start": time.perf_counter(), "compile_s": 0.0, "eval_s": 0.0, "first_step": start}
        self.graphs_before = _compiled_graphs()
        self.profile = ProfileWindow(cfg.profile_steps, device, out)
        self.bar = tqdm(total=self.total, initial=start, desc="pretrain" if start < self.pre_total else "train",
                        dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
        self.t_log, self.steps_since = time.perf_counter(), 0
        self.compile_reported = set()
        self.timed, self.t_timed = 0, 0.0  # eager steps timed for the automatic choice
        self.weights = divergence.WeightWatch(agent.params())

    # -- the step: eager or compiled -------------------------------------------------------------------------

    def mode(self) -> str:
        return "eager" if not self.choice.compile else ("cudagraph" if self.device.type == "cuda" else "compile")

    def runner(self, pretrain: bool) -> StepRunner:
        if pretrain not in self.runners:
            self.runners[pretrain] = StepRunner(self.agent, self.data, mode=self.mode(), pretrain=pretrain)
        return self.runners[pretrain]

    def signature(self, pretrain: bool) -> str:  # what a compiled step is cached by, beside its graph
        data, hyper = self.data, self.hyper
        return (f"{self.device.type}|S{data.state_dim}|A{data.action_dim}|B{hyper.batch_size}|K{hyper.noise_levels}|"
                f"H{hyper.hidden}|N{len(self.agent.seeds)}|{self.kernels}|{'pretrain' if pretrain else 'train'}")

    def acting(self):
        return compiling.CompileOnFirstCall(self.agent.act, self.device) if self.choice.compile else self.agent.act

    def step(self, pretrain: bool) -> float:
        """One pretraining or training step; its wall seconds. A step's first compiled call compiles it:
        the time is printed (warm from the cache or cold), remembered in the cache, and counted apart."""
        run = self.runner(pretrain)
        first_compiled = bool(self.choice.compile) and pretrain not in self.compile_reported
        hits = compiling.cache_hits() if first_compiled else 0
        t_step = time.perf_counter()
        run()
        t_step = time.perf_counter() - t_step
        if run.compile_seconds and pretrain not in self.compile_reported:
            self.compile_reported.add(pretrain)
            warm = compiling.cache_hits() > hits
            tqdm.write(f"compiled the {'pretraining' if pretrain else 'training'} step in "
                       f"{run.compile_seconds:.1f}s ({'warm: from' if warm else 'cold; kept for the next run in'} "
                       f"{self.cache})")
            compiling.remember(self.cache, self.signature(pretrain), run.compile_seconds)
            self.clock["compile_s"] += run.compile_seconds
        return t_step

    def choose_compile(self, step: int, seconds: float):
        """Neither --compile nor --no-compile on a CPU: past SKIP_STEPS warm-up steps, time MEASURE_STEPS eager
        steps (`seconds`: step `step`'s), then compile the rest of the run where it pays (compiling.decide)."""
        if self.choice.compile is not None or step - self.start < compiling.SKIP_STEPS:
            return
        self.timed, self.t_timed = self.timed + 1, self.t_timed + seconds
        if self.timed == compiling.MEASURE_STEPS:
            phases = [True, False] if step + 1 < self.pre_total else [False]  # graphs still to compile
            self.choice = compiling.decide(self.t_timed / self.timed, self.total - step - 1, len(phases),
                                           all(compiling.compiled_before(self.cache, self.signature(p))
                                               for p in phases))
            tqdm.write(f"step: {'compiled' if self.choice.compile else 'eager'} for the rest of the run: "
                       f"{self.choice.why}")
            if self.choice.compile:
                self.runners.clear()
                self.act_rule = self.acting()

    def count(self, step: int):
        """Step `step` done: the progress bar moves (its label at the end of pretraining)."""
        self.steps_since += 1
        self.bar.update(1)
        if step == self.pre_total:
            self.bar.set_description("train")

    # -- when a step's end writes ----------------------------------------------------------------------------

    def should_log(self, step: int) -> bool:
        """A metric row every --log-every steps, and where pretraining or training ends."""
        return step % self.cfg.log_every == 0 or step == self.pre_total or step == self.total

    def should_evaluate(self, step: int) -> bool:
        """At the end of every --eval-every-th training epoch, and of the last one (never with --no-eval)."""
        if self.cfg.no_eval or step <= self.pre_total or (step - self.pre_total) % self.spe != 0:
            return False
        epoch = (step - self.pre_total) // self.spe
        return epoch % self.hyper.eval_every == 0 or step == self.total

    # -- what it writes --------------------------------------------------------------------------------------

    def log_metrics(self, step: int, pretrain: bool):
        """The log interval's metric rows and the progress bar's losses; a diverged row stops the run."""
        weight_max = self.weights.queue()  # done by the time the read below has waited for the step
        m = self.agent.read_metrics(pretrain=pretrain)
        now = time.perf_counter()
        sps = self.steps_since / (now - self.t_log)
        self.t_log, self.steps_since = now, 0
        for row in train_rows(step, pretrain, sps, m, self.agent.lrs(), self.who):
            self.log.write("train", row)
        self.bar.set_postfix(progress_postfix(m, sps))
        divergence.check_log_row(step, m, weight_max, self.labels)

    def evaluate(self, step: int) -> list[dict]:
        """Every agent evaluated; its rows written and printed, the best checkpoint offered. Returns the rows."""
        t0 = time.perf_counter()
        with phase("evaluate"):
            results = evaluate_agents(self.act_rule, self.loaded, self.hyper, self.device, self.cfg, step,
                                      self.eval_episodes, padded=bool(self.choice.compile))
        self.clock["eval_s"] += time.perf_counter() - t0
        rows = eval_rows(results, step, (step - self.pre_total) // self.spe, self.who)
        for row in rows:
            self.log.write("eval", row)
        tqdm.write(eval_message(rows, self.who))
        self.ckpts.offer_best(step, rows)
        return rows

    def payload(self, step: int) -> dict:
        """What a checkpoint holds: everything an exact resume needs."""
        state = self.agent.state_dict()
        divergence.check_state(step, state, self.labels)  # a diverged state never replaces a good checkpoint
        if self.cfg.single_seed:
            state = checkpoint.single_seed_state(state)
        return {"task": self.cfg.task, "shapes": net_shapes(self.agent), "config": dataclasses.asdict(self.cfg),
                "hyper": dataclasses.asdict(self.hyper), "agent": state, "step": step, "rng": _rng_state(self.device)}

    def write_summary(self, step: int, last_eval: list[dict] | None) -> dict:
        """summary.json (returned): the run, its time, its step mode, the graphs compiled and the last
        evaluation; the final scores printed."""
        cfg, who = self.cfg, self.who
        summary = {"task": cfg.task, "steps": step, "out": str(self.out)}
        if who is not None:
            summary["seeds"] = list(dict.fromkeys(cfg.agents))
        if len(cfg.settings()) > 1:
            summary["settings"] = [setting_label(st) for st in cfg.settings()]
        summary["time"] = run_time(self.clock, step, self.pre_total, self.device)
        summary["step_mode"] = self.mode()
        if self.choice.compile:
            # One graph each for pretraining, training and acting; more would mean recompilation.
            summary["compiled_graphs"] = _compiled_graphs() - self.graphs_before
            print(f"compiled graphs: {summary['compiled_graphs']} (pretraining step, training step, acting; "
                  "more would mean a recompile)")
        if last_eval is not None:
            summary.update(eval_summary(last_eval, who, self.eval_episodes, self.loaded.behaviour_return))
            if len(cfg.tasks) > 1:
                summary["behaviour_returns"] = {t: one.behaviour_return for t, one in zip(cfg.tasks, self.loaded.per_task)}
            # a task list's lines name each agent's task in its setting
            print(final_message(cfg.task if len(cfg.tasks) == 1 else f"{len(cfg.tasks)} tasks", summary, who))
        (self.out / runfolder.SUMMARY).write_text(json.dumps(summary, indent=2))
        return summary


@dataclass
class RunData:
    """What a run's agents train and are evaluated on: each task's data.LoadedData (dataset, evaluation env,
    reference scores), in --task order, and the task of each agent. `transitions`: one task's Transitions, or
    for a task list an AgentData, each agent sampling its own task's rows."""
    per_task: list
    of_agent: list[int]
    transitions: object

    def agent(self, i: int):
        """Agent i's task's LoadedData."""
        return self.per_task[self.of_agent[i]]

    def hypers(self, cfg: TrainConfig) -> list[Hyper]:
        """Each task's table with the command's overrides (TrainConfig.agent_hypers' bases)."""
        return [cfg.hyper(one.task.hyper) for one in self.per_task]

    @property
    def source(self) -> str:
        return ",".join(one.source for one in self.per_task)

    @property
    def note(self) -> str:
        return "; ".join(one.note for one in self.per_task if one.note)

    @property
    def behaviour_return(self) -> float | None:
        """The behaviour data's mean return (None for a task list: summary.json has each task's)."""
        return self.per_task[0].behaviour_return if len(self.per_task) == 1 else None

    def eval_episodes(self) -> int:
        counts = {one.task.eval_episodes for one in self.per_task}
        if len(counts) > 1:
            raise ConfigError("the tasks evaluate different numbers of episodes ("
                              + ", ".join(f"{one.task.name}: {one.task.eval_episodes}" for one in self.per_task)
                              + "); give --eval-episodes")
        return counts.pop()


def load_run_data(cfg: TrainConfig, device: torch.device) -> RunData:
    """The datasets (and evaluation envs, tasks, reference scores) a run trains on: for each task its --dataset
    file or Minari id, else the task's D4RL file; the offline Reacher demo for the default task. A task list's
    datasets must share state and action widths."""
    paths = cfg.datasets()
    if len(paths) != len(cfg.tasks):
        raise ConfigError(f"--dataset gives {len(paths)} paths for {len(cfg.tasks)} tasks; give one path, or one "
                          "per task in --task's order")
    per_task = []
    for name, path in zip(cfg.tasks, paths):
        if name == OFFLINE_DATASET_ID and path is None:
            one = build_offline_dataset(device=device)
            one.task = dataclasses.replace(one.task, hyper=OFFLINE_DEMO_HYPER)
        else:
            one = load_dataset(name, path, device)
        per_task.append(one)
    if len(per_task) == 1:
        return RunData(per_task, [0] * len(cfg.agents), per_task[0].transitions)
    widths = {name: (one.transitions.state_dim, one.transitions.action_dim) for name, one in zip(cfg.tasks, per_task)}
    if len(set(widths.values())) > 1:
        raise ConfigError("the tasks of one run must share state and action widths; got "
                          + ", ".join(f"{t}: state {s}, action {a}" for t, (s, a) in widths.items()))
    of_agent = cfg.task_of_agent
    return RunData(per_task, of_agent, AgentData([one.transitions for one in per_task], of_agent))


def env_seed(seed: int) -> int:
    """The first evaluation env's seed of agent seed `seed` (its episode j plays env_seed + j)."""
    return seed * 10_000 + 1000


def eval_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The acting draws of seed `seed`'s evaluation at `step` (python -m dtql_fast.evaluate replays them)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def evaluate_agents(act_rule, loaded, hyper, device: torch.device, cfg: TrainConfig, step: int,
                    episodes: int, padded: bool = False, first_env_seed: int | None = None) -> list[dict]:
    """One evaluation result per agent. Seed s plays the same envs and action draws in any run (env seeds
    s * 10000 + 1000 + j, draws from a generator seeded by s and the step); all the agents' episodes run
    in one vector env, one acting call per env step. Compiled, every call acts on all `episodes` rows an
    agent, finished envs padded, so the acting graph never recompiles."""
    A, R = loaded.transitions.action_dim, hyper.num_candidates
    agents = range(len(cfg.agents))

    def draws(seed: int) -> torch.Generator:
        return eval_generator(seed, step, device)

    def envs(i: int, seed: int) -> int:  # first_env_seed (python -m dtql_fast.evaluate --env-seed): other envs
        return env_seed(seed) if first_env_seed is None else first_env_seed + 10_000 * i

    act = make_group_act_fn(act_rule, A, R, device, [draws(s) for s in cfg.agents], pad=padded)
    return evaluate_group(act, [loaded.agent(i).make_env for i in agents], episodes,
                          [envs(i, s) for i, s in enumerate(cfg.agents)], task=[loaded.agent(i).task for i in agents])


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (UnknownTaskError, DatasetError, checkpoint.CheckpointError, divergence.Diverged,
            runfolder.RunFolderBusy, runfolder.CannotWrite, footprint.GroupTooLarge, SeedListError,
            ConfigError, GroupMismatch) as e:
        raise SystemExit(f"error: {e}")
    except (OSError, RuntimeError) as e:  # a metric file, summary or plot meeting a full or read-only disk
        fault = runfolder.write_fault(e)
        if fault is None:
            raise
        raise SystemExit(f"error: {runfolder.cannot_write(fault.filename or run_folder(cfg), fault)}") from None


if __name__ == "__main__":
    main()
