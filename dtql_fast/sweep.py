"""python -m dtql_fast.sweep: a grid of tasks x seeds on Ray (a local Ray by default, an existing cluster
with --address). Each task's seeds are one run: one Ray task running one `python -m dtql_fast.train
--seeds ...` process, which trains the whole seed group in one step. With --pack, the tasks that can share
one step (pack_tasks) are one run too: `python -m dtql_fast.train --task a,b,c --seeds ...`.

Layout: OUT/sweep.json (what the sweep runs, and how each run ended), OUT/<task>/ (the task's train run
folder, seed group and all, plus status.json, attempts.jsonl and train.log written here); a packed run's
folder is OUT/<task>+<task>+.../.

Nothing lost, nothing done twice:
- a finished run (summary.json with the planned number of steps) is skipped;
- a run with a checkpoint is resumed with `--resume` (exact: same numbers as an uninterrupted run);
- a training process killed by a signal raises RunKilled, which Ray retries (`max_retries`); a Ray
  worker that dies is retried by Ray itself, and its training process dies with it (PDEATHSIG);
- a training process that exits with an error (bad data, divergence) is a deterministic failure: it
  is recorded with its message in status.json and sweep.json, not retried, and the others go on.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import runfolder, runstatus
from .cli import RawHelpFormatter
from .runstatus import RunProgress
from .seeds import SeedListError, format_seeds, parse_seeds

# Train flags the sweep sets itself for each run.
OWNED_FLAGS = {"--task": "--tasks", "--seed": "--seeds", "--out": "--out (the sweep's folder)",
               "--resume": "nothing (the sweep resumes runs that have a checkpoint by itself)"}
KILLED_BY_SIGNAL = "killed"
# Written in the sweep folder when the sweep is stopped (Ctrl-C, SIGTERM): every run sees it, sends its
# training process SIGINT (train.py then checkpoints and exits 130) and ends as "interrupted". A file,
# because the run folders already sit on storage every node shares, and Ray's own cancel cannot reach
# a task blocked waiting on its process.
STOP_FILE = "STOP"
# sweep.json's "layout": one run folder per task, its seeds trained as one group. (Sweeps made before seed
# groups kept one folder per seed and no layout; a re-run into one is refused rather than mixed.)
LAYOUT = "seed-groups"
# --pack's default cap on a run's agents: Table 1's locomotion tasks of 17 / 6 widths x 5 seeds.
DEFAULT_MAX_GROUP = 30


class SweepError(ValueError):
    """Bad sweep input; the message says what and how to fix it."""


class RunKilled(RuntimeError):
    """The training process died from a signal (OOM killer, kill -9, a lost node): retried by Ray."""


@dataclass(frozen=True)
class SweepConfig:
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    out: str
    train_args: tuple[str, ...] = ()     # passed to every run's python -m dtql_fast.train
    address: str | None = None           # an existing Ray cluster; None starts a local one
    num_cpus: int | None = None          # CPUs of the local Ray (default: all)
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    max_retries: int = 3
    refresh: float = 2.0                 # seconds between live-view refreshes
    max_group: int | None = None         # --pack: at most this many agents (tasks x seeds) a run; None: no packing
    dry_run: bool = False                # print the runs and exit


@dataclass(frozen=True)
class RunSpec:
    """One training run: one task's seed group (or a packed run's tasks, comma-separated as train's --task
    takes them), one process, one run folder, one Ray task."""
    task: str
    seeds: tuple[int, ...]
    run_dir: str
    train_args: tuple[str, ...]
    planned_steps: int
    threads: int
    stop_file: str = ""      # appears when the sweep is stopped: the run checkpoints and exits

    @property
    def name(self) -> str:
        return f"{self.task} seeds {format_seeds(self.seeds)}"


@dataclass
class RunResult:
    task: str
    seeds: tuple[int, ...]
    run_dir: str
    state: str                   # finished, failed, interrupted, skipped (finished before this sweep)
    steps: int | None = None
    error: str | None = None
    attempts: int = 0


# -- input ------------------------------------------------------------------------------------------

def parse_tasks(text: str) -> tuple[str, ...]:
    from .paper import ROWS
    from .tasks import UnknownTaskError

    if text.strip() == "all":
        return tuple(ROWS)  # the paper's Table 1, in its order
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks:
        raise SweepError("--tasks is empty; give comma-separated task names, e.g. walker2d-medium-v2,hopper-medium-v2")
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise SweepError(f"--tasks lists {dup} more than once")
    for t in tasks:
        try:
            runstatus.base_hyper(t, None)
        except UnknownTaskError as e:
            raise SweepError(f"--tasks: {e}") from None
    return tasks


def check_train_args(train_args: tuple[str, ...], tasks: tuple[str, ...]):
    """Refuse flags the sweep owns, typos (train.py's own parser judges), and one --dataset file for many tasks."""
    for arg in train_args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            raise SweepError(f"{flag} is set by the sweep for each run; use {OWNED_FLAGS[flag]} instead")
    cfg = _train_config(train_args, tasks[0])
    from .config import ConfigError, check_config

    try:  # train's own range checks (--epochs 0, --lr nan, ...), before any run starts
        check_config(dataclasses.replace(cfg, device="auto"))  # the workers' devices are theirs to judge
    except (ConfigError, SeedListError) as e:
        raise SweepError(f"{e} (a flag passed to python -m dtql_fast.train)") from None
    if cfg.dataset is not None and len(tasks) > 1 and Path(cfg.dataset).expanduser().is_file():
        raise SweepError(f"--dataset {cfg.dataset} is one file, but the sweep has {len(tasks)} tasks; pass a folder "
                         "holding each task's D4RL file under its D4RL name (e.g. hopper_medium-v2.hdf5)")


def _train_config(train_args: tuple[str, ...], task: str):
    """train.py's own parse of the flags passed through (config.parse_args), its error turned into a SweepError."""
    from .config import parse_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_args([*train_args, "--task", task])
    except SystemExit:
        msg = next((line for line in err.getvalue().splitlines() if "error:" in line), err.getvalue().strip())
        raise SweepError(f"{msg.split('error:', 1)[-1].strip()} (flags other than the sweep's own go to "
                         "python -m dtql_fast.train; see python -m dtql_fast.train --help)") from None


def _absolute_dataset(train_args: tuple[str, ...]) -> tuple[str, ...]:
    """Workers may start in another folder: make a --dataset path absolute."""
    out = list(train_args)
    for i, arg in enumerate(out):
        if arg == "--dataset" and i + 1 < len(out):
            out[i + 1] = str(Path(out[i + 1]).expanduser().resolve())
        elif arg.startswith("--dataset="):
            out[i] = "--dataset=" + str(Path(arg.split("=", 1)[1]).expanduser().resolve())
    return tuple(out)


def _identity(train_args: tuple[str, ...], task: str) -> dict:
    """The train settings that change a run's numbers (compared between invocations of one sweep)."""
    from .config import RUNTIME_FIELDS  # flags that may change between invocations of one sweep

    cfg = dataclasses.asdict(_train_config(train_args, task))
    return {k: v for k, v in cfg.items()
            if k not in {*RUNTIME_FIELDS, "task", "seed", "seeds", "out", "resume", "overwrite"}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dtql_fast.sweep", formatter_class=RawHelpFormatter, allow_abbrev=False,
        description="Train a grid of tasks x seeds on Ray: a local Ray by default, an existing cluster with\n"
                    "--address. Each task's seeds are one run: one Ray task, one `python -m dtql_fast.train --seeds`\n"
                    "process training the seed group in one step, one run folder OUT/<task>/. Running the same\n"
                    "command again skips finished runs, resumes interrupted ones from their checkpoints and tries\n"
                    "failed ones again.",
        epilog="Every other flag is passed to each run's python -m dtql_fast.train (see its --help), e.g.\n"
               "  python -m dtql_fast.sweep --tasks hopper-medium-v2,walker2d-medium-v2 --seeds 0-4 \\\n"
               "      --out sweeps/gym --dataset ~/.d4rl/datasets --compile\n"
               "then: python -m dtql_fast.report sweeps/gym")
    a = p.add_argument
    a("--tasks", required=True, metavar="A,B,...",
      help="comma-separated task names (D4RL names of the paper's table, or Minari ids); all: Table 1's 26 tasks")
    a("--seeds", required=True, metavar="LIST",
      help="seeds: a range 0-4, a list 0,2,5, or both 0-2,7; each task trains them as one group, in one process")
    a("--out", required=True, metavar="DIR", help="the sweep's folder (on a cluster: a path every node sees)")
    a("--address", metavar="ADDR", help="an existing Ray cluster to run on (e.g. auto, or ray://HOST:10001); "
                                        "default: start a local Ray")
    a("--num-cpus", type=int, metavar="N", help="CPUs the local Ray may use (default: all); not with --address")
    a("--cpus-per-run", type=float, default=1.0, metavar="N",
      help="CPUs Ray reserves for each run (a task's seed group); also its torch threads unless you pass --threads")
    a("--gpus-per-run", type=float, default=0.0, metavar="F",
      help="GPUs Ray reserves for each run, a task's seed group (0.5: two per GPU)")
    a("--max-retries", type=int, default=3, metavar="N",
      help="times Ray retries a run whose process was killed (a signal, a dead worker or node); a run that "
           "exits with an error is not retried")
    a("--refresh", type=float, default=2.0, metavar="S", help="seconds between refreshes of the live view")
    a("--pack", action="store_true",
      help="train the tasks that can share one step (equal state and action widths, the settings a group shares:\n"
           "batch size, noise levels, hidden width, schedule, acting; equal evaluation episodes) in one run each:\n"
           "one process for several tasks' seed groups")
    a("--max-group", type=int, default=DEFAULT_MAX_GROUP, metavar="N",
      help=f"with --pack: at most N agents (tasks x seeds) in one run (default {DEFAULT_MAX_GROUP})")
    a("--dry-run", action="store_true", help="print the runs the sweep would start (with --pack, the packing) and exit")
    return p


def parse_args(argv=None) -> SweepConfig:
    p = build_parser()
    ns, extra = p.parse_known_args(argv)
    try:
        tasks, seeds = parse_tasks(ns.tasks), _sweep_seeds(ns.seeds)
        if ns.cpus_per_run <= 0:
            raise SweepError(f"--cpus-per-run {ns.cpus_per_run}: must be positive")
        if ns.gpus_per_run < 0:
            raise SweepError(f"--gpus-per-run {ns.gpus_per_run}: must be 0 or more")
        if ns.max_retries < 0:
            raise SweepError(f"--max-retries {ns.max_retries}: must be 0 or more")
        if ns.refresh <= 0:
            raise SweepError(f"--refresh {ns.refresh}: must be positive (seconds)")
        if ns.num_cpus is not None and (ns.address or ns.num_cpus < 1):
            raise SweepError("--num-cpus sizes the local Ray: give a positive number, and no --address")
        if ns.pack and ns.max_group < len(seeds):
            raise SweepError(f"--max-group {ns.max_group}: a run holds at least one task's {len(seeds)} seeds; give "
                             f"--max-group {len(seeds)} or more")
        check_train_args(tuple(extra), tasks)
        if Path(ns.out).expanduser().exists() and not Path(ns.out).expanduser().is_dir():
            raise SweepError(f"--out {ns.out} is a file, not a folder; give the sweep's folder")
    except SweepError as e:
        p.error(str(e))
    return SweepConfig(tasks=tasks, seeds=seeds, out=ns.out, train_args=_absolute_dataset(tuple(extra)),
                       address=ns.address, num_cpus=ns.num_cpus, cpus_per_run=ns.cpus_per_run,
                       gpus_per_run=ns.gpus_per_run, max_retries=ns.max_retries, refresh=ns.refresh,
                       max_group=ns.max_group if ns.pack else None, dry_run=ns.dry_run)


def _sweep_seeds(text: str) -> tuple[int, ...]:
    try:
        return parse_seeds(text)
    except SeedListError as e:
        raise SweepError(str(e)) from None


# -- planning ---------------------------------------------------------------------------------------

def run_dir_for(out: Path, task: str) -> Path:
    """A task's run folder: its whole seed group (a packed run's: its tasks joined by +)."""
    return out / "+".join(t.replace("/", "_") for t in task.split(","))


def _task_settings(train_args: tuple[str, ...], task: str):
    """(train's config, the task's table with the command's overrides) of one task under the sweep's flags."""
    tcfg = _train_config(train_args, task)
    return tcfg, tcfg.hyper(runstatus.base_hyper(task, tcfg.dataset))


def pack_key(task: str, train_args: tuple[str, ...]) -> tuple:
    """What tasks must agree in to share one step: their (state, action) widths, the settings a group shares
    (hyper.SHARED, after the command's overrides) and their evaluation episodes. A task whose widths are not
    known before loading (a Minari id) packs with no other."""
    from .tasks import TASKS
    from .hyper import SHARED

    tcfg, hyper = _task_settings(train_args, task)
    widths = TASKS[task].widths if task in TASKS else None
    if widths is None:
        return ("alone", task)
    episodes = tcfg.eval_episodes or TASKS[task].eval_episodes
    return (widths, tuple(getattr(hyper, f) for f in SHARED), episodes)


def pack_tasks(tasks: tuple[str, ...], seeds: int, max_group: int, train_args: tuple[str, ...]) -> list[list[str]]:
    """The tasks in runs: those with one pack_key together, in the order of --tasks, split so that no run holds
    more than max_group agents (each task brings its `seeds`)."""
    by_key: dict[tuple, list[str]] = {}
    for t in tasks:
        by_key.setdefault(pack_key(t, train_args), []).append(t)
    per_run = max(1, max_group // seeds)
    return [group[i:i + per_run] for group in by_key.values() for i in range(0, len(group), per_run)]


def stop_file_for(out: Path) -> Path:
    return out / STOP_FILE


def plan_runs(cfg: SweepConfig) -> list[RunSpec]:
    out = Path(cfg.out).expanduser().resolve()
    threads = max(1, int(cfg.cpus_per_run))
    stop = str(stop_file_for(out))
    specs = []
    groups = ([[t] for t in cfg.tasks] if cfg.max_group is None
              else pack_tasks(cfg.tasks, len(cfg.seeds), cfg.max_group, cfg.train_args))
    for group in groups:
        task = ",".join(group)
        # a packed run's tasks share their schedule (pack_key)
        planned = _task_settings(cfg.train_args, group[0])[1].run_steps
        specs.append(RunSpec(task, tuple(cfg.seeds), str(run_dir_for(out, task)), cfg.train_args, planned, threads,
                             stop))
    return specs


def format_plan(specs: list[RunSpec]) -> list[str]:
    """The runs a sweep starts, one line each (--dry-run): tasks, agents, steps."""
    lines = []
    for i, s in enumerate(specs, 1):
        tasks = s.task.split(",")
        lines.append(f"run {i:>2}: {len(tasks)} task(s) x {len(s.seeds)} seed(s) = {len(tasks) * len(s.seeds)} agents, "
                     f"{s.planned_steps:,} steps: {', '.join(tasks)}")
    agents = sum(len(s.task.split(",")) * len(s.seeds) for s in specs)
    lines.append(f"{len(specs)} run(s) (one process each), {agents} agents")
    return lines


# -- one run, inside a Ray worker -------------------------------------------------------------------

def _die_with_parent():
    """preexec_fn: the kernel sends SIGKILL to the training process when the Ray worker dies, so a retried
    task never races an orphan of its dead predecessor over the same run folder. SIGINT is unblocked and
    gets its default back (a Ray worker blocks it, and children inherit that), so train.py can checkpoint
    when the sweep is stopped."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def train_command(spec: RunSpec, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "dtql_fast.train"]
    if resume:
        cmd += ["--resume", spec.run_dir]
    else:
        cmd += ["--task", spec.task, "--seeds", format_seeds(spec.seeds), "--out", spec.run_dir]
    cmd += list(spec.train_args)
    # Ray reserves --cpus-per-run for the run, not the whole machine its affinity shows: an evaluation worker on
    # a "spare" core would take one Ray gave another run
    if not any(a == "--eval-worker" or a.startswith("--eval-worker=") for a in spec.train_args):
        cmd += ["--eval-worker", "off"]
    if not any(a == "--threads" or a.startswith("--threads=") for a in spec.train_args):
        cmd += ["--threads", str(spec.threads)]
    return cmd


def error_message(log_path: Path, limit: int = 2000) -> str:
    """The reason a run failed, from its log: train.py's 'error: ...' line, else the traceback's last line."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    lines = [ln.strip() for chunk in text.split("\n") for ln in chunk.split("\r") if ln.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[:limit]
    return (lines[-1] if lines else "(empty log)")[:limit]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_for_previous_attempt(run_dir: Path, timeout: float = 30.0):
    """A dead worker's training process gets SIGKILL from the kernel; wait until it is really gone."""
    st = runstatus.read_status(run_dir)
    pid = st.get("pid")
    if st.get("state") != "running" or not pid or st.get("host") != socket.gethostname():
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        try:
            if str(run_dir) not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return  # the PID now belongs to another process
        except OSError:
            return
        time.sleep(0.1)


def _clear_partial_outputs(run_dir: Path):
    for name in runstatus.PARTIAL_OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)


def _interrupt(proc: subprocess.Popen, grace: float = 120.0):
    """SIGINT: train.py saves a checkpoint and exits 130; SIGKILL if it has not within `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(proc: subprocess.Popen, stop_file: str) -> tuple[int, bool]:
    """(exit code, whether the sweep was stopped). Waits in short slices, watching for the stop file."""
    while True:
        try:
            return proc.wait(timeout=0.5), False
        except subprocess.TimeoutExpired:
            if stop_file and os.path.exists(stop_file):
                _interrupt(proc)
                return proc.returncode, True


def execute_run(spec: RunSpec) -> RunResult:
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if runstatus.is_finished(run_dir, spec.planned_steps):
        return RunResult(spec.task, spec.seeds, spec.run_dir, "skipped", steps=spec.planned_steps)
    if spec.stop_file and os.path.exists(spec.stop_file):
        return RunResult(spec.task, spec.seeds, spec.run_dir, "interrupted", error="the sweep was stopped")
    _wait_for_previous_attempt(run_dir)
    resume = runstatus.has_checkpoint(run_dir)
    if not resume:
        _clear_partial_outputs(run_dir)
    attempt = sum(1 for a in runstatus.attempts(run_dir) if a.get("event") == "start") + 1
    cmd = train_command(spec, resume)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), PYTHONUNBUFFERED="1")
    base = dict(task=spec.task, seeds=list(spec.seeds), attempt=attempt, host=socket.gethostname(), worker_pid=os.getpid(),
                command=cmd)
    with open(run_dir / runstatus.LOG, "ab") as log:
        log.write(f"\n=== attempt {attempt}: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        started = base["started"] = time.time()
        runstatus.write_status(run_dir, state="running", pid=proc.pid, resumed=resume, **base)
        runstatus.append_attempt(run_dir, event="start", time=started, pid=proc.pid, worker_pid=os.getpid(),
                            host=base["host"], resumed=resume)
        try:
            rc, stopped = _wait(proc, spec.stop_file)
        except BaseException:
            # the worker itself is being stopped (KeyboardInterrupt, SystemExit): let train.py checkpoint first.
            _interrupt(proc)
            state = "finished" if runstatus.is_finished(run_dir, spec.planned_steps) else "interrupted"
            runstatus.write_status(run_dir, state=state, exit_code=proc.returncode, ended=time.time(), **base)
            runstatus.append_attempt(run_dir, event="end", state=state, exit_code=proc.returncode, time=time.time())
            raise
    ended = time.time()
    steps = (runstatus.read_json(run_dir / runfolder.SUMMARY) or {}).get("steps")
    if runstatus.is_finished(run_dir, spec.planned_steps) and (rc == 0 or stopped):
        state, error = "finished", None
    elif stopped:
        state, error = "interrupted", "the sweep was stopped; re-run it to resume"
    elif rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        runstatus.write_status(run_dir, state=KILLED_BY_SIGNAL, signal=sig, ended=ended, **base)
        runstatus.append_attempt(run_dir, event="end", state=KILLED_BY_SIGNAL, signal=sig, time=ended)
        raise RunKilled(f"{spec.name}: the training process was killed by {sig} (attempt {attempt}); "
                        f"Ray retries it from its last checkpoint")
    elif rc == 130:
        state, error = "interrupted", "interrupted (Ctrl-C); re-run the sweep to resume it"
    elif rc == 0:
        state, error = "failed", f"train.py exited 0 but summary.json says {steps} of {spec.planned_steps} steps"
    else:
        state, error = "failed", error_message(run_dir / runstatus.LOG)
    runstatus.write_status(run_dir, state=state, exit_code=rc, error=error, ended=ended, **base)
    runstatus.append_attempt(run_dir, event="end", state=state, exit_code=rc, time=ended)
    return RunResult(spec.task, spec.seeds, spec.run_dir, state, steps=steps, error=error, attempts=attempt)


# -- the live view ----------------------------------------------------------------------------------

def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def render_rows(specs: list[RunSpec], progress: list[RunProgress]) -> list[str]:
    """One line per run (a task's seed group): task, seeds, state, step/total, steps/s (of the group's
    step: every seed advances one step), the latest score (mean over the seeds), note."""
    w = max([len("task")] + [len(s.task) for s in specs])
    seeds = [format_seeds(s.seeds) for s in specs]
    ws = max([len("seeds")] + [len(x) for x in seeds])
    lines = [f"{'task':<{w}}  {'seeds':<{ws}}  {'state':<11}  {'step':>15}  {'steps/s':>8}  {'score':>7}  note"]
    for s, label, p in zip(specs, seeds, progress):
        step = f"{_fmt(p.step, ',', '0')}/{_fmt(p.total, ',')}"
        note = p.error or (f"attempt {p.attempt}" if p.attempt > 1 else "")
        sps = p.steps_per_s if p.state == "running" else None
        lines.append(f"{s.task:<{w}}  {label:<{ws}}  {p.state:<11}  {step:>15}  {_fmt(sps, '.1f'):>8}  "
                     f"{_fmt(p.score, '.1f'):>7}  {note}")
    return lines


class LiveView:
    """On a terminal the table is redrawn in place every refresh; in a log it is printed when a run changes
    state, and every `log_every` seconds."""

    def __init__(self, specs: list[RunSpec], stream=None, skipped: set[str] = frozenset(), since: float = 0.0,
                 log_every: float = 60.0):
        self.specs, self.stream = specs, stream or sys.stdout
        self.skipped, self.since = skipped, since   # runs finished before the sweep; when the sweep started
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every, self._printed = log_every, 0.0
        self._drawn, self._states = 0, None

    def snapshot(self) -> list[RunProgress]:
        out = []
        for s in self.specs:
            p = runstatus.progress(Path(s.run_dir), s.planned_steps)
            st = runstatus.read_status(Path(s.run_dir))
            if s.run_dir in self.skipped:
                p.state = "skipped"
            elif p.state != "finished" and max(st.get("started", 0), st.get("ended", 0)) < self.since:
                p.state, p.error = "queued", None   # what the folder says is from an earlier sweep
            out.append(p)
        return out

    def refresh(self, force: bool = False):
        progress = self.snapshot()
        states = [p.state for p in progress]
        now = time.monotonic()
        if not self.tty and not force and states == self._states and now - self._printed < self.log_every:
            return
        self._states, self._printed = states, now
        lines = render_rows(self.specs, progress)
        if self.tty and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines) if self.tty else 0


# -- the sweep --------------------------------------------------------------------------------------

def _ray():
    try:
        import ray
    except ImportError:
        raise SweepError('the sweep needs Ray: pip install "dtql_fast[sweep]"') from None
    return ray


def _check_manifest(out: Path, cfg: SweepConfig) -> dict:
    """A sweep folder keeps one layout, one seed list and one set of train settings: refuse a re-run that
    would mix two."""
    manifest = runstatus.read_json(out / "sweep.json") or {}
    if manifest and manifest.get("layout") != LAYOUT:
        raise SweepError(f"{out} holds a sweep made before seed groups (one run folder per seed); sweep into "
                         "another --out (python -m dtql_fast.report still reads it)")
    if manifest and manifest.get("max_group") != cfg.max_group:
        had = "unpacked" if manifest.get("max_group") is None else f"--pack --max-group {manifest['max_group']}"
        now = "unpacked" if cfg.max_group is None else f"--pack --max-group {cfg.max_group}"
        raise SweepError(f"{out} was swept {had}, this command asks for {now}: its runs would not be found again; "
                         "re-run with the same packing or sweep into another --out")
    old_seeds = manifest.get("seeds")
    if old_seeds is not None and list(old_seeds) != list(cfg.seeds):
        raise SweepError(f"{out} was swept with --seeds {format_seeds(old_seeds)}, not {format_seeds(cfg.seeds)}: "
                         f"each task's seeds train as one group in one run folder; re-run with --seeds "
                         f"{format_seeds(old_seeds)}, or sweep the other seeds into another --out")
    new = _identity(cfg.train_args, cfg.tasks[0])
    old = manifest.get("train_settings")
    if old is not None and old != new:
        diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        desc = ", ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in diff.items())
        raise SweepError(f"{out} was swept with other train settings ({desc}); re-run with the same flags "
                         f"(earlier: {' '.join(manifest.get('train_args', [])) or 'none'}) or use another --out")
    return manifest


def run_sweep(cfg: SweepConfig, stream=None) -> list[RunResult]:
    """Run the grid; returns one result per run. Uses the Ray already initialised, else starts one."""
    ray = _ray()
    stream = stream or sys.stdout
    out = Path(cfg.out).expanduser().resolve()
    try:
        runfolder.check_writable(out, f"--out {cfg.out}", folder=True)
    except runfolder.CannotWrite as e:
        raise SweepError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    manifest = _check_manifest(out, cfg)
    stop = stop_file_for(out)
    stop.unlink(missing_ok=True)  # left by a sweep that was stopped
    specs = plan_runs(cfg)
    results: dict[str, RunResult] = {}
    for s in specs:
        if runstatus.is_finished(Path(s.run_dir), s.planned_steps):
            results[s.run_dir] = RunResult(s.task, s.seeds, s.run_dir, "skipped", steps=s.planned_steps)
    todo = [s for s in specs if s.run_dir not in results]
    if not todo and manifest.get("runs"):  # all finished already: sweep.json keeps their record as it is
        print(f"sweep {out}: all {len(specs)} run(s) finished already; nothing to do", file=stream)
        _print_outcome(list(results.values()), stream)
        return [results[s.run_dir] for s in specs]
    manifest.update(layout=LAYOUT, tasks=list(cfg.tasks), seeds=list(cfg.seeds), train_args=list(cfg.train_args),
                    train_settings=_identity(cfg.train_args, cfg.tasks[0]), max_group=cfg.max_group,
                    started=time.time())
    runstatus.write_json_atomic(out / "sweep.json", manifest)
    per = "per task" if cfg.max_group is None else f"packed, at most {cfg.max_group} agents each"
    print(f"sweep {out}: {len(cfg.tasks)} task(s) x {len(cfg.seeds)} seed(s) ({format_seeds(cfg.seeds)}), "
          f"{len(specs)} run(s) (one process each, {per}); {len(results)} already finished, {len(todo)} to run",
          file=stream)

    started_ray = False
    if todo and not ray.is_initialized():
        kw = {"address": cfg.address} if cfg.address else {"num_cpus": cfg.num_cpus}
        ctx = ray.init(**kw)
        started_ray = True
        url = getattr(ctx, "dashboard_url", None)
        print(f"Ray dashboard: http://{url}" if url else
              'Ray dashboard: none (pip install "ray[default]" for one)', file=stream)
    view = LiveView(specs, stream, skipped=set(results), since=manifest["started"])
    try:
        if todo:
            remote = ray.remote(execute_run).options(num_cpus=cfg.cpus_per_run, num_gpus=cfg.gpus_per_run,
                                                     max_retries=cfg.max_retries, retry_exceptions=[RunKilled])
            pending = {remote.remote(spec): spec for spec in todo}
            view.refresh(force=True)
            try:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1, timeout=cfg.refresh)
                    for ref in done:
                        r = _collect(ray, ref, pending.pop(ref), cfg)
                        results[r.run_dir] = r
                    view.refresh()
            except KeyboardInterrupt:
                print("\ninterrupted: stopping the runs (each saves a checkpoint); re-run the same command to "
                      "resume them", file=stream)
                stop.touch()
                done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=180)
                for ref in done:
                    r = _collect(ray, ref, pending[ref], cfg)
                    results[r.run_dir] = r
                view.refresh(force=True)
                raise
        view.refresh(force=True)
    finally:
        final = [results.get(s.run_dir) for s in specs]
        before = manifest.get("runs") or {}  # a run finished before this sweep keeps the record it had
        manifest["runs"] = {s.task: before[s.task] if r and r.state == "skipped" and s.task in before
                            else dataclasses.asdict(r) if r else {"state": "not run"} for s, r in zip(specs, final)}
        manifest["ended"] = time.time()
        runstatus.write_json_atomic(out / "sweep.json", manifest)
        if started_ray:
            ray.shutdown()
        stop.unlink(missing_ok=True)
    ordered = [results[s.run_dir] for s in specs]
    _print_outcome(ordered, stream)
    return ordered


def _collect(ray, ref, spec: RunSpec, cfg: SweepConfig) -> RunResult:
    """A run's result; a run Ray gave up on (killed on every attempt, or the sweep's own code failing in the
    worker) is recorded as failed with the reason."""
    try:
        return ray.get(ref)
    except Exception as e:  # RayTaskError(RunKilled), WorkerCrashedError, NodeDiedError, ...
        why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        killed = (isinstance(e, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError))
                  or isinstance(e, RunKilled) or isinstance(getattr(e, "cause", None), RunKilled))
        run_dir = Path(spec.run_dir)
        error = (f"killed on all {cfg.max_retries + 1} attempt(s); Ray gave up ({why})" if killed
                 else f"the sweep failed in the Ray worker: {type(e).__name__}: {why}")
        n = sum(1 for a in runstatus.attempts(run_dir) if a.get("event") == "start")
        runstatus.write_status(run_dir, state="failed", error=error, task=spec.task, seeds=list(spec.seeds), attempt=n,
                          ended=time.time())
        return RunResult(spec.task, spec.seeds, spec.run_dir, "failed", error=error, attempts=n)


def _print_outcome(results: list[RunResult], stream):
    counts = {}
    for r in results:
        counts[r.state] = counts.get(r.state, 0) + 1
    print("done: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())), file=stream)
    for r in results:
        if r.state == "failed":
            print(f"  failed: {r.task} seeds {format_seeds(r.seeds)}: {r.error}", file=stream)


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.dry_run:
        try:
            print("\n".join(format_plan(plan_runs(cfg))))
        except SweepError as e:
            raise SystemExit(f"error: {e}")
        return
    signal.signal(signal.SIGTERM, _stop)  # stopped by a job scheduler: checkpoint the runs, as on Ctrl-C
    try:
        results = run_sweep(cfg)
    except SweepError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit(130)
    if any(r.state in ("failed", "interrupted") for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    # Ray pickles functions and exception classes of __main__ by value: run them from the importable
    # module instead, so workers and the driver agree on RunKilled (the exception Ray retries).
    from dtql_fast.sweep import main as _main
    _main()
