"""Whole runs, timed: a walker run on a short schedule at a learning-curve cadence, with the old and the new
acting rule and evaluation in-line or in a worker, one after the other in one invocation, each split into
where its time went (summary.json's "time": start-up, data, compile, training steps, evaluation, waiting for
evaluation, checkpoints, logging, other).

    python -m dtql_fast.profiling.run_bench --json run_bench.json               # 2 + 10 epochs, 10 episodes each
    python -m dtql_fast.profiling.run_bench --dataset ~/.d4rl/datasets/walker2d_medium-v2.hdf5
    python -m dtql_fast.profiling.run_bench --epochs 2 --steps-per-epoch 100 --eval-episodes 2   # shrunk

Variants (--variants): ACTING-EVALUATION with ACTING old (FastDTQL.act before acting.py: the policy and the
critic's first layer on R copies of each state, profiling.act_bench.old_act) or new (acting.py's, what
FastDTQL.act is), and EVALUATION inline (train --eval-worker off) or worker (--eval-worker on). old-inline is
the run as it was; new-worker the run as it is where a core is spare. Each variant is one `python -m
dtql_fast.train` process of its own (a fresh interpreter: no cache of another variant in memory), with
--threads THREADS; its wall time is measured from outside too (the process's start-up and imports included).
With --compile on, a short warm-up run of each variant first compiles its graphs into inductor's on-disk
cache, so that every variant's compile is the warm one.

The data: --dataset, or by default a synthetic D4RL-format file of random transitions at the task's widths
(profiling.gpu_check.write_d4rl). A policy trained on it falls early, so its evaluation episodes are much
shorter than a trained walker's: evaluation's share of the run is then far below a real run's (the episode
lengths are reported). Give a real dataset for evaluation's true weight.

Reported per variant: the process's wall seconds, the run's split, the worker's seconds off the training's
path, the evaluation rows (returns, episode lengths), and the speedup over old-inline; and whether the rows
of in-line and worker evaluation are the same numbers for each acting rule.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from dtql_fast.config import allowed_cores
from dtql_fast.profiling.variants import SHAPES, resolve_task
from dtql_fast.runlog import TIME_PARTS, cpu_model
from dtql_fast.tasks import TASKS

ACTING = ("old", "new")
EVALUATION = {"inline": "off", "worker": "on"}  # -> train --eval-worker
VARIANTS = tuple(f"{a}-{e}" for a in ACTING for e in EVALUATION)
SYNTHETIC_ROWS = 1_000_000  # a D4RL walker2d-medium file's size


def old_rule(self, states, eps, u):
    """FastDTQL.act as it was before acting.py (profiling.act_bench.old_act). Module-level, so that the
    evaluation worker, handed the trainer's FastDTQL.act, acts with it too."""
    from dtql_fast.profiling.act_bench import old_act

    return old_act(self.pp, self.tp, states, eps, u, self.hyper.hidden, self.hyper.max_action)


def child(acting: str, train_args: list[str]) -> int:
    """One variant's run, in this process: FastDTQL.act set to the acting rule, then python -m dtql_fast.train."""
    from dtql_fast import train
    from dtql_fast.update import FastDTQL

    if acting == "old":
        from dtql_fast.profiling import run_bench  # by its module name (this file may run as __main__)

        FastDTQL.act = run_bench.old_rule
    print(f"run_bench: acting with {FastDTQL.act.__module__}.{FastDTQL.act.__qualname__}", flush=True)
    train.main(train_args)
    return 0


def train_args(a, dataset: Path, out: Path, evaluation: str, pretrain_epochs: int, epochs: int,
               steps_per_epoch: int) -> list[str]:
    args = ["--task", a.task, "--dataset", str(dataset), "--out", str(out), "--seed", str(a.seed),
            "--device", "cpu", "--threads", str(a.threads), "--pretrain-epochs", str(pretrain_epochs),
            "--epochs", str(epochs), "--steps-per-epoch", str(steps_per_epoch), "--eval-every", str(a.eval_every),
            "--eval-episodes", str(a.eval_episodes), "--eval-worker", evaluation]
    if a.batch_size is not None:
        args += ["--batch-size", str(a.batch_size)]
    return args + {"on": ["--compile"], "off": ["--no-compile"], "auto": []}[a.compile]


def run_child(acting: str, args: list[str], log: Path, threads: int) -> tuple[int, float]:
    """(exit code, wall seconds) of one variant's process; its output in `log`. Its run folder (--out), the
    bench's own, starts empty."""
    shutil.rmtree(args[args.index("--out") + 1], ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "dtql_fast.profiling.run_bench", "--child", acting, "--", *args]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.perf_counter() - t0


def eval_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return [{"step": r["step"], "return_mean": r["return_mean"], "score_mean": r.get("score_mean"),
             "returns": r["returns"], "lengths": r["lengths"]} for r in rows if r["kind"] == "eval"]


def measure(name: str, a, dataset: Path, root: Path) -> dict:
    acting, evaluation = name.split("-")
    run = root / name
    rc, wall = run_child(acting, train_args(a, dataset, run, EVALUATION[evaluation], a.pretrain_epochs, a.epochs,
                                            a.steps_per_epoch), root / f"{name}.log", a.threads)
    if rc != 0:
        tail = (root / f"{name}.log").read_text().strip().splitlines()[-3:]
        raise SystemExit(f"run_bench: variant {name} failed (exit {rc}); its log {root / f'{name}.log'} ends:\n"
                         + "\n".join(tail))
    summary = json.loads((run / "summary.json").read_text())
    rows = eval_rows(run)
    lengths = [x for r in rows for x in r["lengths"]]
    return {"variant": name, "acting": acting, "evaluation": evaluation, "process_wall_s": round(wall, 2),
            "time": summary["time"], "evals": rows, "mean_episode_length": sum(lengths) / max(1, len(lengths)),
            "log": str(root / f"{name}.log"), "run": str(run)}


def warm_up(a, dataset: Path, root: Path, names: list[str]):
    """One short compiled run per variant: every graph it compiles (pretraining, training, acting in the trainer
    or in the worker) put in the on-disk cache before the variants are timed."""
    for name in names:
        acting, evaluation = name.split("-")
        log = root / f"warm-up-{name}.log"
        rc, _ = run_child(acting, train_args(a, dataset, root / f"warm-up-{name}", EVALUATION[evaluation], 1, 1, 2),
                          log, a.threads)
        if rc != 0:
            raise SystemExit(f"run_bench: the warm-up run of {name} failed (exit {rc}); see {log}")


def format_table(res: dict) -> str:
    base = next((v for v in res["variants"] if v["variant"] == "old-inline"), None)
    lines = [f"# whole runs: {res['cpu']}; torch {res['torch']}; {res['date']}", f"# {res['command']}",
             f"# {res['schedule']}", f"# data: {res['data']}",
             "| variant | process s | run s | " + " | ".join(TIME_PARTS.values()) + " | off the path s | "
             "mean episode length | speedup vs old-inline |",
             "|---|---|---|" + "---|" * len(TIME_PARTS) + "---|---|---|"]
    for v in res["variants"]:
        t = v["time"]
        parts = " | ".join(f"{t['split'][f'{k}_s']:.1f}" for k in TIME_PARTS)
        speedup = f"{base['process_wall_s'] / v['process_wall_s']:.2f}x" if base else "–"
        lines.append(f"| {v['variant']} | {v['process_wall_s']:.1f} | {t['total_s']:.1f} | {parts} | "
                     f"{t.get('eval_off_path_s', 0):.1f} | {v['mean_episode_length']:.0f} | {speedup} |")
    for rule, same in res["rows_equal"].items():
        lines.append(f"# {rule} acting: in-line and worker evaluation rows {'the same numbers' if same else 'DIFFER'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:  # one variant's process (run_child)
        return child(argv[1], argv[3:])
    p = argparse.ArgumentParser(prog="python -m dtql_fast.profiling.run_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--task", default="walker2d-medium-v2", help="a task of the table or a family (walker2d, ...)")
    p.add_argument("--dataset", help="its D4RL HDF5 file (default: a synthetic one, written to --out)")
    p.add_argument("--synthetic-rows", type=int, default=SYNTHETIC_ROWS, help="rows of the synthetic file")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps-per-epoch", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--batch-size", type=int, help="default: the task's")
    p.add_argument("--threads", type=int, default=1, help="the training's torch threads (the worker has one)")
    p.add_argument("--compile", choices=["on", "off", "auto"], default="on",
                   help="train --compile, --no-compile, or neither (auto: timed eager steps decide)")
    p.add_argument("--no-warm-up", action="store_true", help="with --compile on: no warm-up runs first")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/run-bench", help="folder for the runs, their logs and the data")
    p.add_argument("--json", metavar="PATH", help="default: OUT/run_bench.json")
    a = p.parse_args(argv)
    a.task = resolve_task(a.task)
    names = [v for v in a.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        p.error(f"--variants takes {', '.join(VARIANTS)}; got {a.variants!r}")
    for flag, v in (("--pretrain-epochs", a.pretrain_epochs), ("--epochs", a.epochs),
                    ("--steps-per-epoch", a.steps_per_epoch), ("--eval-every", a.eval_every),
                    ("--eval-episodes", a.eval_episodes), ("--threads", a.threads),
                    ("--synthetic-rows", a.synthetic_rows), ("--batch-size", a.batch_size)):
        if v is not None and v < (0 if flag == "--pretrain-epochs" else 1):
            p.error(f"{flag} {v}: takes a positive number")
    if a.dataset and not Path(a.dataset).expanduser().is_file():
        p.error(f"--dataset {a.dataset}: no such file")
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    if a.dataset:
        dataset, data = Path(a.dataset).expanduser(), f"{a.dataset} (given)"
    else:
        from dtql_fast.profiling.gpu_check import write_d4rl

        S, A = SHAPES[a.task.split("-")[0]]
        dataset = root / f"synthetic-{a.task}-{a.synthetic_rows}.hdf5"
        if not dataset.is_file():
            write_d4rl(dataset, S, A, a.synthetic_rows, seed=a.seed)
        data = (f"synthetic: {a.synthetic_rows:,} random transitions (profiling.gpu_check.write_d4rl) in {dataset}; "
                "its policy falls early, so evaluation episodes are shorter than a trained agent's and evaluation "
                "weighs less than in a real run: pass --dataset for that")
    print(f"# data: {data}", flush=True)
    cores = sorted(allowed_cores())
    if any(n.endswith("-worker") for n in names) and len(cores) <= a.threads:
        print(f"# note: cores {cores} and {a.threads} training thread(s): no core is spare, the worker shares the "
              "training's", flush=True)
    argv_shown = ["python", "-m", "dtql_fast.profiling.run_bench", *argv]
    h = TASKS[a.task].hyper
    res = {"command": shlex.join(argv_shown), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "cpu": cpu_model(), "torch": torch.__version__, "cores": cores, "threads": a.threads, "task": a.task,
           "dataset": str(dataset), "synthetic": not a.dataset, "data": data,
           "schedule": (f"{a.task}: {a.pretrain_epochs} pretraining + {a.epochs} training epochs of "
                        f"{a.steps_per_epoch} steps, batch {a.batch_size or h.batch_size}, {a.eval_episodes} "
                        f"evaluation episodes every {a.eval_every} epoch(s), R {h.num_candidates}, {a.threads} "
                        f"training thread(s), compile {a.compile}"),
           "variants": []}
    if a.compile == "on" and not a.no_warm_up:
        warm_up(a, dataset, root, names)
    for name in names:
        print(f"# {name} ...", flush=True)
        res["variants"].append(measure(name, a, dataset, root))
    by = {v["variant"]: v for v in res["variants"]}
    res["rows_equal"] = {rule: by[f"{rule}-inline"]["evals"] == by[f"{rule}-worker"]["evals"] for rule in ACTING
                         if f"{rule}-inline" in by and f"{rule}-worker" in by}
    if "old-inline" in by:
        res["speedup_over_old_inline"] = {v["variant"]: by["old-inline"]["process_wall_s"] / v["process_wall_s"]
                                          for v in res["variants"]}
    print(format_table(res))
    out = Path(a.json) if a.json else root / "run_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
