"""python -m dtql_fast.train: config -> data -> agent -> loop (progress, metrics, eval, checkpoints).
_train reads top to bottom in that order. The flags, their checks and the resume rules are config.py's;
the agents are built by agents.py; what a run prints and writes about itself is runlog.py's (with its time,
split part by part: runlog.RunClock); evaluation in a worker process beside training is evalworker.py's.

With no arguments it builds a small Reacher dataset offline, trains on it and prints the scores.
`--seeds 0-4` trains a group of independent agents in one process, one step for all of them
(FastDTQL(seeds=...)): metric and evaluation rows per seed, and the mean ± std over seeds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, compiling, divergence, evalworker, footprint, runfolder, runlog, tracking
from .agents import build_agent, check_fits_before_data, net_shapes, restore
from .config import (GRID_FIELDS, ConfigError, TrainConfig, agent_labels, check_checkpoint_belongs, check_config,
                     check_resumed_seeds, flag, kernels_of, parse_args, resolve_device, resumed_config, setting_label)
from .data import RunData, check_env_widths, load_run_data
from .evaluate import evaluate_agents
from .evalworker import EvalWorker, WorkerFailed, env_steps_per_evaluation, where_to_evaluate
from .groups import GroupMismatch
from .ranges import ProfileWindow, phase
# What a run prints and writes about itself (rows, messages, summary.json's parts, the plot) is runlog.py's.
from .runlog import (MetricLog, RunClock, eval_message, eval_rows, eval_summary, final_message,
                     plot_curves, progress_postfix, run_time, start_message, time_message, train_rows)
from .seeds import SeedListError, folder_label
from .steppers import StepRunner
from .stopping import StopAtStepEnd
from .tasks import Hyper, UnknownTaskError
from .transitions import DatasetError
from .update import FastDTQL


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


def train(cfg: TrainConfig) -> dict:
    clock = RunClock()  # the run's wall time, part by part (summary.json "time"), from here
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
        return _train(cfg, out, clock)
    finally:
        lock.release()


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


def keep_existing_run(out: Path, overwrite: bool):
    """A new run never writes over one: refused, or with --overwrite the old run moved aside."""
    found = runfolder.run_files(out)
    if not found:
        return
    if not overwrite:
        resume = f"continue it with --resume {out}, " if set(found) & set(runfolder.RESUMABLE) else ""
        raise ConfigError(f"{out} holds a run already ({', '.join(found)}); {resume}"
                          "write this one to another --out, or pass --overwrite to move the old run aside")
    aside = runfolder.move_aside(out)
    print(f"note: the run that was in {out} is now in {aside}")


def _train(cfg: TrainConfig, out: Path, clock: RunClock) -> dict:
    """The run in the algorithm's order: resume, data, agent, then the loop (a step; its metric row, evaluation
    and checkpoint when due), then the summary. Run (below) holds the state the loop reads and changes."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, latest = resume_from(cfg, out, device)  # latest: the checkpoint continued, None for a new run
    done = finished_already(cfg, latest, out)
    if done is not None:  # a resume with nothing to do changes no file
        return done
    # (the worker's cores, why) where evaluation runs in a worker; (None, why): in-line
    evaluator = (None, "--no-eval") if cfg.no_eval else where_to_evaluate(
        cfg.eval_worker, device, torch.get_num_threads(), env_steps_per_evaluation(cfg))
    # The stream of batches and draws (the agents draw their initial weights under their own seeds).
    torch.manual_seed(cfg.agents[0])
    check_fits_before_data(cfg, device, 0 if cfg.no_eval else cfg.eval_episodes)  # before the data's minutes
    with clock.part("data"):
        loaded, hyper = load_checked_data(cfg, device)
    agent = build_agent(cfg, loaded.transitions, hyper, loaded.hypers(cfg), device,
                        eval_episodes=0 if cfg.no_eval else cfg.eval_episodes or loaded.eval_episodes())
    start, kept_rows = load_agent_state(agent, latest, cfg, out, device)
    checkpoint.remove_partial(out)
    # writes config.json, prints the first line, starts an evaluation worker where one runs
    run = Run(cfg, out, device, loaded, hyper, agent, latest, start, clock, evaluator)

    # Resumed at an evaluation's step: its rows are in the kept rows, or (an evaluation worker's result that had
    # not arrived) it is done again first, from the checkpoint's weights: the ones it was to evaluate.
    run.last_eval = list({(r.get("setting"), r.get("seed")): r for r in kept_rows
                          if r.get("kind") == "eval" and r["step"] == start}.values()) or None
    redo = run.last_eval is None and start > 0 and run.should_evaluate(start)
    step = start
    clock.move(clock.split()[1]["other"], "startup")  # all before the first step but the data
    stop = StopAtStepEnd().install()  # uninstalled in the finally: below
    try:
        if redo:
            run.evaluate(step)
        while step < run.total and stop.signum is None:
            pretrain = step < run.pre_total
            run.profile.before(step)
            seconds = run.step(pretrain)
            run.choose_compile(step, seconds)  # the automatic choice, once, from timed eager steps
            run.profile.after(step)
            step += 1
            run.count(step)  # the progress bar, the log interval's steps
            run.collect()  # an evaluation worker's result, once it has arrived
            if run.should_log(step):
                run.log_metrics(step, pretrain)
            evaluating = run.should_evaluate(step)
            if evaluating:
                run.evaluate(step)
            # and every --checkpoint-every minutes, once no evaluation is in flight (Run.save)
            if evaluating or step == run.total or (run.ckpts.due() and run.in_flight() is None):
                run.save(step)
        run.bar.close()
        run.save(step)  # at the end, or where a stop was asked for
        if stop.signum is None:
            run.collect(wait=True)  # the end waits for the evaluation in flight
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
        run.close_worker()
    if stop.signum is not None:
        print(f"\nstopped at step {step} ({signal.Signals(stop.signum).name}); checkpoint saved. Resume with: "
              f"python -m dtql_fast.train --resume {out}")
        run.log.close()
        raise SystemExit(128 + stop.signum)
    if run.last_eval is None and not cfg.no_eval:
        run.evaluate(step)  # in-line: the worker is closed
    with clock.part("logging"):
        run.log.close()
        plot_curves(out)
    return run.write_summary(step, run.last_eval)


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
    check_checkpoint_belongs(saved, out, where=f"checkpoint {latest.path}")
    # The run's identity comes from the checkpoint; where, how fast and how long it runs from the CLI.
    cfg, changed = resumed_config(cfg, saved, resumed.get("hyper", {}), out, where=f"checkpoint {latest.path}")
    if changed:
        print("resume changes: " + ", ".join(f"{flag(k)} {a} -> {b}" for k, (a, b) in changed.items()))
    return cfg, latest


def finished_already(cfg: TrainConfig, latest: checkpoint.Latest | None, out: Path) -> dict | None:
    """A resume of a run that has trained all its steps and written its summary: the summary, untouched (no file
    is rewritten; its time record stays the run's); None when there is work to do."""
    if latest is None:
        return None
    total = cfg.hyper(Hyper(**latest.ckpt["hyper"])).run_steps
    try:
        summary = json.loads((out / runfolder.SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    if latest.ckpt["step"] < total or summary.get("steps") != latest.ckpt["step"] or latest.note:
        return None
    print(f"{out}: the run is finished (step {total} of {total}) and its summary written; nothing to do. "
          "Give a larger --epochs to train it further")
    return summary


def load_checked_data(cfg: TrainConfig, device: torch.device) -> tuple[RunData, Hyper]:
    """The run's data (load_run_data), its widths checked against the evaluation envs', and the run's shared
    hyperparameters (the first task's table with the command's overrides). Refused when evaluation cannot run."""
    loaded = load_run_data(cfg, device)
    for name, one in zip(cfg.tasks, loaded.per_task):
        check_env_widths(one, need_env=not cfg.no_eval)
        if cfg.no_eval is False and one.env_problem:
            raise SystemExit(f"error: evaluation for {name} cannot run: {one.env_problem} (or pass --no-eval)")
    return loaded, loaded.hypers(cfg)[0]


def load_agent_state(agent: FastDTQL, latest: checkpoint.Latest | None, cfg: TrainConfig, out: Path,
                     device: torch.device) -> tuple[int, list[dict]]:
    """A resumed run's agent and RNG state from its checkpoint, and its metric rows trimmed back to the
    checkpoint's step. Returns (the step to start from, the rows kept); (0, []) for a new run."""
    if latest is None:
        return 0, []
    resumed = latest.ckpt
    restore(agent, resumed, cfg.task, where=f"checkpoint in {latest.path}")
    checkpoint.set_rng_state(resumed["rng"], device)
    start = resumed["step"]
    damage = runfolder.metric_damage(out)
    if damage:
        print(f"note: {damage}")
    kept_rows = runfolder.trim_metrics(out, start)  # the rows past it are about to be written again
    return start, kept_rows


# -- the loop's state and steps ------------------------------------------------------------------------------


class Run:
    """One run from its first step to its summary: the state the loop in _train reads and changes, and the
    loop's steps as methods. The step runs eager or compiled (`choice`; on CUDA compiled runs as a CUDA graph);
    should_log and should_evaluate say when a step's end writes a metric row or evaluates; `ckpts` saves."""

    def __init__(self, cfg: TrainConfig, out: Path, device: torch.device, loaded, hyper: Hyper, agent: FastDTQL,
                 latest: checkpoint.Latest | None, start: int, clock: RunClock,
                 evaluator: tuple[set[int] | None, str] = (None, "in-line")):
        self.cfg, self.out, self.device, self.loaded, self.hyper, self.agent = cfg, out, device, loaded, hyper, agent
        self.data, self.start = loaded.transitions, start
        # The columns naming each agent in the run folder: None in a --seed run's single-seed format (runlog.py).
        self.who = agent_labels(cfg)
        self.labels = [""] if self.who is None else [f"{runlog.agent_name(w)}: " for w in self.who]  # in messages
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
                                                        "task": cfg.task, "source": loaded.source,
                                                        "fingerprint": loaded.fingerprint}, indent=2))
        print(start_message(",".join(cfg.tasks), cfg.seed, self.who, self.data, device,
                            self.mode() if self.choice.compile is not None else "auto", self.choice.why,
                            self.kernels, out))
        if loaded.note:
            print(f"note: {loaded.note}")

        self.ckpts = checkpoint.Checkpointer(out, cfg.checkpoint_every, latest, start, self.payload, self.log)
        self.act_rule = self.acting()
        self.last_eval: list[dict] | None = None  # the newest evaluation's rows
        self.worker, self.evaluated = None, "in-line"  # where evaluation runs (summary.json's time says)
        cores, why = evaluator
        if cores is not None:
            threads = torch.get_num_threads()
            self.worker, self.evaluated = EvalWorker(cfg, hyper, self.eval_episodes, cores, type(agent).act,
                                                     threads), "worker"
            print(f"evaluation: in a worker process {why}, {threads} thread(s) as training, while training goes on")
        self.clock = clock  # this process's wall time, split (summary.json "time"; the report's time per task)
        self.graphs_before = compiling.compiled_graphs()
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
        with self.clock.part("steps"):
            t_step = time.perf_counter()
            run()
            t_step = time.perf_counter() - t_step
            if run.compile_seconds and pretrain not in self.compile_reported:
                self.clock.move(run.compile_seconds, "compile")
        if run.compile_seconds and pretrain not in self.compile_reported:
            self.compile_reported.add(pretrain)
            warm = compiling.cache_hits() > hits
            tqdm.write(f"compiled the {'pretraining' if pretrain else 'training'} step in "
                       f"{run.compile_seconds:.1f}s ({'warm: from' if warm else 'cold; kept for the next run in'} "
                       f"{self.cache})")
            compiling.remember(self.cache, self.signature(pretrain), run.compile_seconds)
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
        if self.device.type == "cuda":  # the steps queued on the GPU count as steps, not as the read that waits
            with self.clock.part("steps"):
                torch.cuda.synchronize(self.device)
        with self.clock.part("logging"):
            self._log_metrics(step, pretrain)

    def _log_metrics(self, step: int, pretrain: bool):
        weight_max = self.weights.queue()  # done by the time the read below has waited for the step
        m = self.agent.read_metrics(pretrain=pretrain)
        now = time.perf_counter()
        sps = self.steps_since / (now - self.t_log)
        self.t_log, self.steps_since = now, 0
        for row in train_rows(step, pretrain, sps, m, self.agent.lrs(), self.who):
            self.log.write("train", row)
        self.bar.set_postfix(progress_postfix(m, sps))
        divergence.check_log_row(step, m, weight_max, self.labels)

    def evaluate(self, step: int):
        """Every agent evaluated at `step`: in-line (evaluate_inline), or by the worker, handed the state the
        loop checkpoints at this step while training goes on (collect takes its rows); one evaluation in flight."""
        self.collect(wait=self.worker is not None)  # the one before first: rows in step order
        if self.worker is None:
            self.evaluate_inline(step)
            return
        with self.clock.part("eval"):
            state = evalworker.snapshot(self.ckpts.state_at(step))
            try:
                self.worker.submit(step, state, compiled=bool(self.choice.compile))
            except WorkerFailed as e:
                self.worker_failed(e, step)
                self.evaluate_inline(step)

    def in_flight(self) -> int | None:
        """The step of the evaluation a worker has not answered yet; None when there is none."""
        return self.worker.pending[0] if self.worker is not None and self.worker.pending else None

    def collect(self, wait: bool = False):
        """The worker's evaluation once it has arrived (wait: until it has): its rows written and printed, the
        best checkpoint offered the state evaluated. A worker that died or failed is named in one line, its
        evaluation done in-line from the same state, and every later one in-line."""
        if self.in_flight() is None:
            return
        step, state = self.worker.pending
        try:
            with self.clock.part("eval_wait" if wait else "eval"):
                got = self.worker.result(wait)
        except WorkerFailed as e:
            self.worker_failed(e, step)
            with self.swapped(state):
                self.evaluate_inline(step, payload=lambda: evalworker.unsnapshot(state))
            return
        if got is not None:
            _, results, seconds = got
            self.clock.off_path_eval += seconds
            self.record_eval(step, results, payload=lambda: evalworker.unsnapshot(state))

    def worker_failed(self, e: WorkerFailed, step: int):
        tqdm.write(f"{e}; evaluating in-line from step {step} on")
        self.evaluated = f"worker, in-line from step {step} on ({e})"
        self.close_worker()

    def close_worker(self):
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    @contextlib.contextmanager
    def swapped(self, state: bytes):
        """The agents as `state` (a snapshot of a checkpoint payload) holds them, then back as they were."""
        now = evalworker.snapshot(self.agent.state_dict())
        restore(self.agent, evalworker.unsnapshot(state), self.cfg.task, where="an evaluation's snapshot")
        try:
            yield
        finally:
            self.agent.load_state_dict(evalworker.unsnapshot(now))

    def evaluate_inline(self, step: int, payload=None) -> list[dict]:
        """Every agent evaluated here and now; its rows written and printed, the best checkpoint offered (the
        state payload() gives; default the agents' state now). Returns the rows."""
        act = self.act_rule
        compiles = isinstance(act, compiling.CompileOnFirstCall) and not act.called
        with self.clock.part("eval"), phase("evaluate"):
            results = evaluate_agents(act, self.loaded, self.hyper, self.device, self.cfg, step,
                                      self.eval_episodes, padded=bool(self.choice.compile))
            if compiles:  # acting's first compiled call: its compile
                self.clock.move(act.first_call_s, "compile")
        return self.record_eval(step, results, payload)

    def record_eval(self, step: int, results: list[dict], payload=None) -> list[dict]:
        """An evaluation's results at `step`: its rows written and printed, the best checkpoint offered (the
        state `payload()` gives; default the agents' state now, at `step`). Returns the rows."""
        rows = eval_rows(results, step, (step - self.pre_total) // self.spe, self.who)
        with self.clock.part("logging"):
            for row in rows:
                self.log.write("eval", row)
            tqdm.write(eval_message(rows, self.who))
        with self.clock.part("checkpoint"):
            self.ckpts.offer_best(step, rows, payload)
        self.last_eval = rows
        return rows

    def save(self, step: int):
        """checkpoint.pt at `step` (Checkpointer.save), once the evaluation of an earlier step in flight has
        arrived: a checkpoint never passes an evaluation whose rows are not written (a resume redoes only the
        evaluation of its own step)."""
        if (pending := self.in_flight()) is not None and pending < step:
            self.collect(wait=True)
        with self.clock.part("checkpoint"):
            self.ckpts.save(step)

    def payload(self, step: int) -> dict:
        """What a checkpoint holds: everything an exact resume needs."""
        state = self.agent.state_dict()
        divergence.check_state(step, state, self.labels)  # a diverged state never replaces a good checkpoint
        if self.cfg.single_seed:
            state = checkpoint.single_seed_state(state)
        return {"task": self.cfg.task, "shapes": net_shapes(self.agent), "config": dataclasses.asdict(self.cfg),
                "hyper": dataclasses.asdict(self.hyper), "agent": state, "step": step, "rng": checkpoint.rng_state(self.device)}

    def write_summary(self, step: int, last_eval: list[dict] | None) -> dict:
        """summary.json (returned): the run, its time, its step mode, the graphs compiled and the last
        evaluation; the final scores printed."""
        cfg, who = self.cfg, self.who
        summary = {"task": cfg.task, "steps": step, "out": str(self.out)}
        if who is not None:
            summary["seeds"] = list(dict.fromkeys(cfg.agents))
        if len(cfg.settings()) > 1:
            summary["settings"] = [setting_label(st) for st in cfg.settings()]
        summary["time"] = run_time(self.clock, step, self.start, self.pre_total, self.device,
                                   None if cfg.no_eval else self.evaluated)
        summary["step_mode"] = self.mode()
        if self.choice.compile:
            # One graph each for pretraining, training and acting; more would mean recompilation.
            summary["compiled_graphs"] = compiling.compiled_graphs() - self.graphs_before
            print(f"compiled graphs: {summary['compiled_graphs']} (pretraining step, training step, acting; "
                  "more would mean a recompile)")
        if last_eval is not None:
            summary.update(eval_summary(last_eval, who, self.eval_episodes, self.loaded.behaviour_return))
            if len(cfg.tasks) > 1:
                summary["behaviour_returns"] = {t: one.behaviour_return for t, one in zip(cfg.tasks, self.loaded.per_task)}
            # a task list's lines name each agent's task in its setting
            print(final_message(cfg.task if len(cfg.tasks) == 1 else f"{len(cfg.tasks)} tasks", summary, who))
        print(time_message(summary["time"]))
        (self.out / runfolder.SUMMARY).write_text(json.dumps(summary, indent=2))
        return summary


if __name__ == "__main__":
    main()
