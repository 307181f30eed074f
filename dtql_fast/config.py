"""What a run is set with: TrainConfig (every flag of python -m dtql_fast.train, in --help's order),
how the flags are parsed and checked before anything is read or written, and the resume rules (which
flags a resume may change, the rest fixed by the run's checkpoint).

A flag's facts (help, group, range, resume rule) sit in its field's metadata; the parser, the checks
and the resume rules are derived from them.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .cli import HelpFormatter
from .ranges import parse_window
from .seeds import MAX_SEED, SeedListError, check_seeds, format_seeds, parse_seeds
from .hyper import Hyper, Need, at_least
from .tasks import OFFLINE_DATASET_ID, one_per_task


# The titled flag groups of --help: a field's metadata names its group (None: the parser's own
# "options"; "who": --seed | --seeds, one or the other). Groups and flags show in field order.
FLAG_GROUPS = {
    "schedule": "schedule (default: the task's table)",
    "tracking": "tracking (TensorBoard event files are written wherever tensorboard is installed)",
    "algorithm": "algorithm overrides (default: the task's table)",
}


def flag_meta(help: str | None = None, *, group: str | None = None, metavar: str | None = None,
              choices: list[str] | None = None, need: Need | None = None, resume: bool = False,
              runtime: bool = False, grid: bool = False) -> dict:
    """A TrainConfig field's command-line facts, kept in its dataclasses.field metadata; parse_args builds
    the parser from them. The flag's type and action come from the field's annotation and default (int,
    float, str; bool: a store_true switch, or --x/--no-x where the default None means "not given").
    need: (test, what it takes) a given value must pass (check_config). resume: a resume may change it
    (RESUME_MAY_CHANGE; else fixed by the run's checkpoint). runtime: where and how fast a run goes, not
    what it computes (RUNTIME_FIELDS; a resume may change it). grid: a comma list of values trains one agent
    per value, all in one step (GRID_FIELDS)."""
    return {"help": help, "group": group, "metavar": metavar, "choices": choices, "need": need,
            "resume": resume or runtime, "runtime": runtime, "grid": grid}


def _option(default, help: str | None = None, **meta):
    return field(default=default, metadata=flag_meta(help, **meta))


def _override(name: str, *, group: str, grid: bool = False):
    """The flag overriding Hyper field `name` (None: the task's table value): its help, range and resume
    rule are the field's own (hyper.py)."""
    rules = Hyper.__dataclass_fields__[name].metadata
    return field(default=None, metadata={**flag_meta(rules["help"], group=group, need=rules["need"],
                                                     resume=rules["resume"], grid=grid), "hyper": name})


def allowed_cores() -> set[int]:
    """The cores this process may run on (all of them where the OS does not say: no sched_getaffinity)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


# More torch threads than the CPUs this process may use only slow a step (and past 2**31 torch overflows)
CPU_THREADS: Need = (lambda v: 1 <= v <= len(allowed_cores()),
                     f"1-{len(allowed_cores())} (the CPUs this process may use)")


@dataclass
class TrainConfig:
    """Every flag of python -m dtql_fast.train, in --help's order, with its help text. A hyperparameter's flag
    (_override) takes its help, range and resume rule from its Hyper field (hyper.py)."""
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
    device: str = _option("auto", "cpu, cuda, cuda:N, or auto (cuda when available)", runtime=True)
    threads: int | None = _option(None, "CPU threads for torch (default: torch's choice)", need=CPU_THREADS,
                                  runtime=True)
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
        runtime=True)
    kernels: str = _option("auto", "EDM losses: fused Triton kernels or the plain PyTorch formula (auto: triton on "
                                   "CUDA)", choices=["auto", "torch", "triton"], runtime=True)
    # schedule
    epochs: int | None = _override("epochs", group="schedule")
    steps_per_epoch: int | None = _override("steps_per_epoch", group="schedule")
    pretrain_epochs: int | None = _override("pretrain_epochs", group="schedule")
    eval_every: int | None = _override("eval_every", group="schedule")
    eval_episodes: int | None = _option(None, group="schedule", need=at_least(1), resume=True)
    no_eval: bool = _option(False, "skip evaluation (checkpoints still written)", group="schedule", resume=True)
    eval_worker: str = _option(
        "auto", "evaluate in a worker process on a snapshot of the weights while training goes on (on), or in the "
                "training loop (off); the worker runs training's thread count, so its rows are in-line "
                "evaluation's numbers. auto (the default): a worker on a CPU where the cores this process may use "
                "leave training's thread count spare and an evaluation may take 10,000 env steps or more, else "
                "in-line",
        group="schedule", choices=["auto", "on", "off"], runtime=True)
    log_every: int = _option(250, "steps between metric rows", group="schedule", need=at_least(1), runtime=True)
    checkpoint_every: float = _option(
        10.0, "also checkpoint every MINUTES of training, not only at evaluations and the end (0: not by time); "
              "the one before is kept as checkpoint.prev.pt",
        group="schedule", metavar="MINUTES", need=(lambda v: math.isfinite(v) and v >= 0,
                                                   "minutes >= 0 (0: only at evaluations and the end)"), runtime=True)
    profile_steps: str | None = _option(
        None, "profile steps A..B-1: cudaProfilerStart/Stop on CUDA (for nsys --capture-range=cudaProfilerApi), "
              "a torch.profiler Chrome trace on CPU",
        group="schedule", metavar="A:B", runtime=True)
    # tracking (tracking.py)
    track: bool = _option(False, "also log every metric row to Weights & Biases", group="tracking", runtime=True)
    wandb_project: str = _option("dtql_fast", group="tracking", runtime=True)
    wandb_entity: str | None = _option(None, group="tracking", runtime=True)
    wandb_mode: str = _option("online", "offline: no network, the run is kept in <out>/wandb for `wandb sync`",
                              group="tracking", choices=["online", "offline"], runtime=True)
    # algorithm overrides (None: the task's table value)
    # (grid=True: a comma list, e.g. --alpha 1,5,20, trains one agent per value and seed in one step)
    alpha: float | list[float] | None = _override("alpha", group="algorithm", grid=True)
    gamma: float | list[float] | None = _override("gamma", group="algorithm", grid=True)
    lr: float | list[float] | None = _override("lr", group="algorithm", grid=True)
    lr_decay: bool | None = _override("lr_decay", group="algorithm")
    batch_size: int | None = _override("batch_size", group="algorithm")
    expectile: float | list[float] | None = _override("expectile", group="algorithm", grid=True)
    noise_levels: int | None = _override("noise_levels", group="algorithm")

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
        given = {f.metadata["hyper"]: getattr(self, f.name) for f in dataclasses.fields(self) if "hyper" in f.metadata}
        return base.replace(**{k: v for k, v in given.items() if v is not None and not isinstance(v, list)})

    def agent_hypers(self, bases: list[Hyper]) -> list[Hyper]:
        """Each agent's settings: its task's entry of `bases` (hyper(...) of each of `tasks`) with its grid cell's
        values."""
        return [bases[i].replace(**{k: v for k, v in setting.items() if k != "task"})
                for i, (setting, _) in zip(self.task_of_agent, self.cells)]


# Each flag's rules, read from its field's metadata in field order. RUNTIME_FIELDS: where and how fast a run
# goes, not what it computes (sweep.py compares the rest between invocations of a sweep). RESUME_MAY_CHANGE:
# those, then how long it runs and how it is evaluated; everything else is the run's identity, fixed by its
# checkpoint: a resume giving another value is refused. GRID_FIELDS: the flags a comma list makes a grid of
# (one agent per value and seed, one step for all). RANGES: flag -> (test, what it takes), checked where given.
_FIELDS = dataclasses.fields(TrainConfig)
RUNTIME_FIELDS = tuple(f.name for f in _FIELDS if f.metadata["runtime"])
RESUME_MAY_CHANGE = RUNTIME_FIELDS + tuple(f.name for f in _FIELDS if f.metadata["resume"] and not f.metadata["runtime"])
GRID_FIELDS = tuple(f.name for f in _FIELDS if f.metadata["grid"])
RANGES = {f.name: f.metadata["need"] for f in _FIELDS if f.metadata["need"] is not None}
# An override is named as the Hyper field it overrides.
assert all(f.metadata.get("hyper", f.name) == f.name for f in _FIELDS)


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


def check_config(cfg: TrainConfig):
    """Every flag that can be checked without data, checked at once: ranges, the device, the profile
    window, the seeds. Raises ConfigError naming the flag and what it takes (SeedListError for the seeds)."""
    check_seed_flags(cfg)
    check_resume_out(cfg)
    problems = []
    for name, (ok, need) in RANGES.items():
        v = getattr(cfg, name)
        for x in (v if isinstance(v, list) else [v]):
            if x is not None and not ok(x):
                problems.append(f"{flag(name)} {x}: takes {need}")
    try:
        parse_window(cfg.profile_steps)
    except ValueError as e:
        problems.append(str(e))
    problems += [p for p in [device_problem(cfg.device)] if p]
    if problems:
        raise ConfigError("; ".join(problems))


def device_problem(name: str) -> str | None:
    """Why --device `name` cannot run here (train's and evaluate's flag); None when it can."""
    if name == "auto":
        return None
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        return f"--device {name}: takes cpu, cuda, cuda:N or auto"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: torch sees no CUDA device; use --device cpu"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {name}: there are {torch.cuda.device_count()} CUDA devices"
    return None


# argparse reads "-1e-3" as a flag (its own pattern knows only -1 and -1.5): a flag's value that is a
# negative number in any float spelling reaches the flag's check, which names what it takes.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


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
    p._negative_number_matcher = NEGATIVE_NUMBER
    ns = p.parse_args(argv)
    if ns.seed is not None and not 0 <= ns.seed <= MAX_SEED:
        p.error(f"--seed {ns.seed}: seeds are non-negative integers up to {MAX_SEED}")
    if ns.seeds is not None:
        try:
            ns.seeds = list(parse_seeds(ns.seeds))
        except SeedListError as e:
            p.error(str(e))
    return TrainConfig(**{k: v for k, v in vars(ns).items()})



def resolve_device(name: str) -> torch.device:
    """--device as a torch.device: auto is cuda where torch sees one, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu")
    return dev



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



def check_resume_out(cli: TrainConfig):
    """--resume continues a run in its own folder: an --out naming another folder would split the run in two
    (the steps after the resume in one, the rest in the other), so it is refused."""
    if not (cli.resume and cli.out):
        return
    theirs = Path(cli.resume) if Path(cli.resume).is_dir() else Path(cli.resume).parent
    if theirs.resolve() != Path(cli.out).resolve():
        raise ConfigError(f"--resume {cli.resume} continues the run in {theirs}, but --out names {cli.out}; drop "
                          f"--out (or copy {theirs} to {cli.out} and --resume {cli.out})")


def check_checkpoint_belongs(saved: TrainConfig, folder: Path, where: str):
    """Refuse a checkpoint whose run is not the one its folder's config.json describes (another seed's or
    task's checkpoint copied in): resuming it would rewrite that run's files with another run's."""
    try:
        doc = json.loads((folder / "config.json").read_text())
        mine = doc["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no readable config.json: nothing to compare with (a run killed before writing it)
    ignore = set(RESUME_MAY_CHANGE) | {"out", "resume", "overwrite"}
    diff = [k for k, v in dataclasses.asdict(saved).items() if k not in ignore and k in mine and mine[k] != v]
    if diff:
        what = ", ".join(f"{flag(k)} {getattr(saved, k)} (the folder's run: {mine[k]})" for k in diff)
        raise checkpoint.CheckpointError(
            f"{where} is not this folder's run: it has {what}; put the run's own checkpoint back, or resume the "
            "checkpoint's own run folder")


def kernels_of(cfg: TrainConfig, device: torch.device) -> str:
    """--kernels, auto resolved: the fused Triton kernels on CUDA, the PyTorch formula on a CPU."""
    return cfg.kernels if cfg.kernels != "auto" else ("triton" if device.type == "cuda" else "torch")

