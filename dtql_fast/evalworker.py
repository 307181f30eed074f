"""Evaluation off the training's path (train --eval-worker): a worker process evaluates a snapshot of the
agents while training goes on.

The worker is spawned (torch.multiprocessing's 'spawn': it inherits none of the trainer's threads, locks or
compiled graphs), given one core where the run has a spare one and one torch thread. It loads the run's data
and builds the run's agents as python -m dtql_fast.evaluate does, then evaluates each request: the checkpoint
payload the loop writes at that step, restored into its agents, acted on by the same rule (the parent's
FastDTQL.act, compiled and padded where the run's step is compiled) with the same env seeds and draws
(evaluate.evaluate_agents: eval_generator(seed, step)). So its rows are the numbers in-line evaluation gives
at that step; with one torch thread on both sides, to the bit.

One evaluation is in flight at a time. The trainer keeps the snapshot until the result arrives: the best
checkpoint is written from it then, and if the worker dies the trainer evaluates the snapshot in-line and
goes on in-line (train.Run).
"""
from __future__ import annotations

import io
import os
import queue
import signal
import time
import types

import torch

from .config import ConfigError, allowed_cores


# auto's floor: an evaluation of fewer env steps (at most; agents x episodes x the env's step limit) stays
# in-line, as a worker's start would cost more than it saves: on walker (run_bench's warm-up runs, 2026-12-06)
# a worker took 10.7 s to start and return a tiny evaluation that took 4.8 s in-line. Walker, hopper,
# halfcheetah (10 x 1,000), antmaze (100 x 700), pen (100 x 100) and kitchen (100 x 280) reach it.
AUTO_MIN_ENV_STEPS = 10_000


def env_steps_per_evaluation(cfg) -> int | None:
    """The most env steps one evaluation of the run can take (agents x episodes x the env's step limit), from
    the task table and gymnasium's registry, before any data is read; None where that is not known (a Minari
    id, the demo data, an env not registered here)."""
    from .tasks import TASKS, step_limit

    per_task = []
    for name in cfg.tasks:
        limit = step_limit(name)  # None without gymnasium: evaluation itself says what is missing, later
        if not limit:
            return None
        per_task.append((cfg.eval_episodes or TASKS[name].eval_episodes) * limit)
    return sum(per_task[t] for t in cfg.task_of_agent)


def where_to_evaluate(mode: str, device: torch.device, threads: int,
                      env_steps: int | None = None) -> tuple[set[int] | None, str]:
    """(the worker's cores, why), or (None, why) to evaluate in-line. The worker runs as many torch threads as
    training does (`threads`), so that its rows are the numbers in-line evaluation gives. auto (the default):
    a worker on a CPU run whose allowed cores (os.sched_getaffinity) leave at least `threads` spare (pinned to
    them) and whose evaluation may take `env_steps` >= AUTO_MIN_ENV_STEPS; in-line otherwise. on: a worker
    even without spare cores (it shares the run's). off: in-line."""
    if mode == "off":
        return None, "--eval-worker off"
    if device.type != "cpu":
        if mode == "on":
            raise ConfigError(f"--eval-worker on: the evaluation worker runs on a CPU and this run trains on "
                              f"{device}; evaluate in-line (--eval-worker off or auto)")
        return None, f"in-line on {device.type}"
    if mode == "auto" and (env_steps is None or env_steps < AUTO_MIN_ENV_STEPS):
        size = "of unknown size before the data loads" if env_steps is None else f"of at most {env_steps} env steps"
        return None, f"in-line: an evaluation {size} does not repay a worker's start (--eval-worker on forces one)"
    cores = sorted(allowed_cores())
    spare = cores[threads:]
    if len(spare) < threads:
        if mode == "auto":
            return None, (f"no {threads} spare core(s) for a worker of {threads} thread(s) ({len(cores)} allowed, "
                          f"{threads} torch threads training)")
        return set(cores), f"on the run's own {len(cores)} core(s): too few are spare for it"
    return set(spare), (f"on core {spare[0]}, the one" if len(spare) == 1 else
                        f"on the {len(spare)} cores") + f" torch's {threads} training thread(s) leave free"


class WorkerFailed(RuntimeError):
    """The worker died or could not evaluate; the message names it in one line."""


class EvalWorker:
    """The trainer's side: start the worker, hand it a step's payload, take its results."""

    def __init__(self, cfg, hyper, episodes: int, cores: set[int], act, threads: int = 1):
        ctx = torch.multiprocessing.get_context("spawn")
        self.requests, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=serve, name="dtql-eval-worker", daemon=True,
                                args=(cfg, hyper, episodes, cores, act, threads, self.requests, self.results))
        self.proc.start()
        self.pending: tuple[int, bytes] | None = None  # (step, the payload evaluated, serialised)

    def submit(self, step: int, payload: bytes, compiled: bool):
        """Evaluate the agents as `payload` (torch.save of a checkpoint payload) holds them at `step`."""
        self.check_alive()
        self.pending = (step, payload)
        self.requests.put((step, payload, compiled))

    def result(self, wait: bool) -> tuple[int, list[dict], float] | None:
        """(step, results, the worker's seconds) of the evaluation in flight once it has arrived; None while it
        has not (wait: until it has). Raises WorkerFailed when the worker died or could not evaluate."""
        while True:
            try:
                msg = self.results.get(timeout=0.2) if wait else self.results.get_nowait()
            except queue.Empty:
                self.check_alive()
                if not wait:
                    return None
                continue
            kind, step, body, seconds = msg
            if kind == "failed":
                raise WorkerFailed(f"the evaluation worker (pid {self.proc.pid}) could not evaluate"
                                   f"{'' if step is None else f' step {step}'}: {body}")
            self.pending = None
            return step, body, seconds

    def check_alive(self):
        if self.proc.exitcode is not None:
            try:  # what it said before it ended (it could not load the run's data, say)
                kind, step, body, _ = self.results.get(timeout=0.1)
            except (queue.Empty, OSError, EOFError):
                kind = None
            if kind == "failed":
                raise WorkerFailed(f"the evaluation worker (pid {self.proc.pid}) could not start: {body}")
            code = self.proc.exitcode
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise WorkerFailed(f"the evaluation worker (pid {self.proc.pid}) died ({how})")

    def close(self):
        """Stop the worker (now: an evaluation in flight is dropped)."""
        if self.proc.exitcode is None:
            self.proc.terminate()
        self.proc.join(timeout=10)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
        for q in (self.requests, self.results):
            q.cancel_join_thread()
            q.close()


def snapshot(payload: dict) -> bytes:
    """A checkpoint payload serialised: a copy the loop's next steps cannot change."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def unsnapshot(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), weights_only=True)


def serve(cfg, hyper, episodes: int, cores: set[int], act, threads: int, requests, results):
    """The worker: the run's data and agents, then one evaluation per request until told to stop (None) or its
    trainer is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the trainer decides
    trainer = os.getppid()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)  # the trainer's count: the same reductions, so in-line evaluation's numbers
    devnull = os.open(os.devnull, os.O_WRONLY)  # its notes and warnings would land in the trainer's progress bar
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    from . import compiling
    from .agents import build_agent, restore
    from .data import load_run_data
    from .evaluate import evaluate_agents

    cpu = torch.device("cpu")
    try:
        loaded = load_run_data(cfg, cpu)
        agent = build_agent(cfg, loaded.transitions, hyper, loaded.hypers(cfg), cpu)
    except Exception as e:  # noqa: BLE001 - named to the trainer, which evaluates in-line instead
        results.put(("failed", None, f"{type(e).__name__}: {e}", 0.0))
        return
    eager = types.MethodType(act, agent)
    compiled = None
    while (request := _next(requests, trainer)) is not None:
        step, payload, padded = request
        try:
            t0 = time.perf_counter()
            restore(agent, unsnapshot(payload), cfg.task, where=f"the evaluation of step {step}")
            if padded and compiled is None:
                compiled = compiling.CompileOnFirstCall(eager, cpu)
            out = evaluate_agents(compiled if padded else eager, loaded, hyper, cpu, cfg, step, episodes,
                                  padded=padded)
            results.put(("done", step, out, time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001
            results.put(("failed", step, f"{type(e).__name__}: {e}", 0.0))


def _next(requests, trainer: int):
    """The next request; None once told to stop or the trainer died (killed, it could not say so)."""
    while True:
        try:
            return requests.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != trainer:
                return None
