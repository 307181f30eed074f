"""The compiled CPU step under inductor's Python wrapper and under its C++ wrapper, side by side.

    python -m dtql_fast.profiling.wrapper_ab --task walker2d-medium-v2 --threads 1 --json out.json
    python -m dtql_fast.profiling.wrapper_ab --candidate '{"aggressive_fusion": true}'   # any inductor options

With --candidate, the sides are inductor's defaults and the step compiled with those options instead.

Both sides compile the same FastDTQL step (a group of one, the same weights and draws). For each
side, the cold compile runs first in a process of its own with empty inductor caches: the first
call's seconds and where they went (dynamo's tracing, AOTAutograd and inductor's lowering,
inductor's code generation, the C++ builds: torch._dynamo.utils.compilation_time_metrics). Then
this process times both sides' steps in alternating blocks and reports the largest difference
between their weights after the last step (the same kernels, so zero is expected).

Caution: two compiled agents in one process can differ by 5-10% for reasons other than their code (where
their tensors landed, which compiled first); alternating blocks do not remove that. A difference of a few
percent needs confirming in fresh processes (profiling/results/breakdown/inductor-options/realize-reads/).

Training on a CPU compiles with the C++ wrapper since this measured its shorter compile
(dtql_fast.compiling.inductor_options; docs/performance.md, "Where the compile time goes").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from dtql_fast.profiling.variants import SHAPES, make_draws, resolve_task, synthetic_transitions
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.runlog import cpu_model
from dtql_fast.tasks import TASKS
from dtql_fast.update import FastDTQL

WRAPPERS = {"python": {"cpp_wrapper": False}, "cpp": {"cpp_wrapper": True}}
# compilation_time_metrics keys (nested: each includes the ones below it), by what they stand for
COMPILE_PARTS = {"total": "_compile.compile_inner", "tracing": "bytecode_tracing",
                 "aot_and_inductor": "create_aot_dispatcher_function", "codegen": "GraphLowering.codegen",
                 "cpp_build": "compile_file"}


def _compile_split(before: dict[str, int]) -> dict[str, float]:
    from torch._dynamo.utils import compilation_time_metrics as m
    return {part: round(sum(m.get(key, [])[before.get(key, 0):]), 2) for part, key in COMPILE_PARTS.items()}


def _setup(task: str, threads: int, n_draws: int):
    torch.set_num_threads(threads)
    hyper = TASKS[task].hyper
    S, A = SHAPES[task.split("-")[0]]
    device = torch.device("cpu")
    data = synthetic_transitions(S, A, 100_000, 0, device, hyper.max_action)
    draws = make_draws(data.n, hyper, A, n_draws, 1, device)
    torch.manual_seed(0)
    init = ReferenceDTQL(S, A, hyper, device)

    def agent_and_step(opts):
        agent = FastDTQL(S, A, hyper, device)
        agent.load_weights_from(init)
        return agent, torch.compile(agent.train_step, fullgraph=True, options=opts)
    return data, draws, agent_and_step


def compile_cold(task: str, threads: int, opts: dict) -> dict:
    """In a fresh process with empty caches: the first call of the step compiled with `opts`, and its split."""
    from torch._dynamo.utils import compilation_time_metrics
    data, draws, agent_and_step = _setup(task, threads, 1)
    _, step = agent_and_step(opts)
    before = {k: len(v) for k, v in compilation_time_metrics.items()}
    t0 = time.perf_counter()
    step(data, draws[0].as_group())
    return {"first_call_s": round(time.perf_counter() - t0, 2), "compile_s": _compile_split(before)}


def measure(task: str, threads: int, blocks: int, block: int, warmup: int = 5, sides: dict | None = None) -> dict:
    """`sides`: name -> inductor options of each side (default WRAPPERS)."""
    sides = sides or WRAPPERS
    out = {}
    for side, opts in reversed(sides.items()):  # the side under test first: if it cannot compile, say so at once
        with tempfile.TemporaryDirectory(prefix="dtql-wrapper-ab-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            cmd = [sys.executable, "-m", "dtql_fast.profiling.wrapper_ab", "--task", task, "--threads", str(threads),
                   "--cold", json.dumps(opts)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                tail = "\n".join(res.stderr.strip().splitlines()[-8:])
                raise SystemExit(f"error: side {side!r} ({json.dumps(opts)}) failed to compile the step:\n{tail}")
            out[side] = {**json.loads(res.stdout.strip().splitlines()[-1]), "step_ms": []}
    out = {side: out[side] for side in sides}
    data, draws, agent_and_step = _setup(task, threads, warmup + blocks * block)
    steps, agents = {}, {}
    for name, opts in sides.items():
        agents[name], step = agent_and_step(opts)
        for d in draws[:warmup]:
            step(data, d.as_group())
        steps[name] = step
    for b in range(blocks):
        order = list(steps) if b % 2 == 0 else list(reversed(steps))
        for name in order:
            for d in draws[warmup + b * block:warmup + (b + 1) * block]:
                t0 = time.perf_counter()
                steps[name](data, d.as_group())
                out[name]["step_ms"].append((time.perf_counter() - t0) * 1e3)
    for name in sides:
        out[name]["step_ms_median"] = statistics.median(out[name]["step_ms"])
    pa, pb = (agents[n].params() for n in sides)  # every network's packed weights, the target critic's too
    diff = max((pa[net][k] - pb[net][k]).abs().max().item() for net in pa for k in pa[net])
    first, second = list(sides)
    return {"task": task, "threads": threads, "blocks": blocks, "block": block,
            "options": sides, "sides": out, "max_weight_difference": diff,
            "second_over_first_step": out[second]["step_ms_median"] / out[first]["step_ms_median"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dtql_fast.profiling.wrapper_ab", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--task", default="walker2d-medium-v2", help="a task of the table, or a family (walker2d, antmaze)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blocks", type=int, default=10, help="alternating blocks per side")
    p.add_argument("--block", type=int, default=20, help="steps per block")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--candidate", metavar="JSON", type=json.loads,
                   help="inductor options (torch.compile options=) to compare with the defaults, instead of the wrappers")
    p.add_argument("--cold", type=json.loads, help=argparse.SUPPRESS)  # the per-side cold-compile process's options
    a = p.parse_args(argv)
    if a.cold is not None:
        print(json.dumps(compile_cold(resolve_task(a.task), a.threads, a.cold)))
        return 0
    sides = {"default": {}, "candidate": a.candidate} if a.candidate is not None else WRAPPERS
    r = measure(resolve_task(a.task), a.threads, a.blocks, a.block, sides=sides)
    cpu = cpu_model()
    print(f"# {r['task']} compiled step on {cpu}, {a.threads} thread(s); compile seconds cold, step ms median")
    print("| side | first call s | tracing | AOT + inductor | of which codegen | of which C++ build | step ms |")
    print("|---|---|---|---|---|---|---|")
    for name, s in r["sides"].items():
        c = s["compile_s"]
        print(f"| {name} | {s['first_call_s']:.1f} | {c['tracing']:.1f} | {c['aot_and_inductor']:.1f} | {c['codegen']:.1f} | "
              f"{c['cpp_build']:.1f} | {s['step_ms_median']:.2f} |")
    first, second = list(sides)
    print(f"# {second} ({json.dumps(sides[second])}) / {first} step: {r['second_over_first_step']:.3f}; largest "
          f"weight difference after the last step: {r['max_weight_difference']:.3g}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"cpu": cpu, "command": " ".join(
            [sys.executable, "-m", "dtql_fast.profiling.wrapper_ab", *(argv if argv is not None else sys.argv[1:])]),
            **r}, indent=1))
        print(f"# wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
