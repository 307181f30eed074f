"""The acting rule alone: the rule on R copies of each state against acting.py's, side by side in one run.

    python -m dtql_fast.profiling.act_bench --tasks walker2d-medium-v2,antmaze-umaze-v0 --threads 1,2 \\
        --modes eager,compile --json act.json

For each task (its hyperparameters and (state, action) widths, synthetic weights: no dataset), thread count
and mode (eager; compiled, as training compiles acting: compiling.CompileOnFirstCall), both rules act on the
same states and draws, in alternating blocks of `--block` calls (old first in even blocks, new first in odd
ones), each call timed on its own. A call acts for `--agents` agents on `--states` states each (default: the
task's evaluation episodes, what one env step of its evaluation asks for) with the task's R candidates.

Reported per rule: MFLOP per state (torch's FLOP counter over one eager call; the compiled call runs the
same matmuls), the first call's seconds (the compile, for compiled calls), the median call and states per
second (states / median call), and new over old in states per second. Each call's CPU seconds (the
process's, all threads) are kept beside its wall seconds: on a machine shared with other work, one thread's
CPU time is the steadier measure of what the call costs. Before timing, the two rules' actions on the
bench's first draws are compared (the largest difference; the same picks give round-off only).

`old_act` is FastDTQL.act as it was before acting.py: kept here so the two can still be compared once
FastDTQL.act calls acting.act.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dtql_fast import acting, compiling, fastnets
from dtql_fast.profiling.variants import SHAPES, resolve_task
from dtql_fast.runlog import cpu_model
from dtql_fast.tasks import TASKS
from dtql_fast.update import FastDTQL

MODES = ("eager", "compile")


@torch.no_grad()
def old_act(pp: dict, tp: dict, states: torch.Tensor, eps: torch.Tensor, u: torch.Tensor, hidden: int,
            max_action: float) -> torch.Tensor:
    """FastDTQL.act before acting.py: the policy and the critics' first layer on R copies of each state."""
    *lead, E, S = states.shape
    R = eps.shape[-2]
    s_rep = states[..., None, :].expand(*lead, E, R, S).reshape(*lead, E * R, S)
    mu, std, _ = fastnets.policy(pp, s_rep)
    cand = fastnets.sample_action(mu, std, eps.reshape(*lead, E * R, -1), max_action)
    q = fastnets.q_pair(tp, torch.cat([s_rep, cand], dim=-1), hidden).amin(dim=-3)
    cdf = torch.softmax(q.reshape(*lead, E, R), dim=-1).cumsum(dim=-1)
    idx = (cdf < u[..., None]).sum(dim=-1).clamp(max=R - 1)
    cand = cand.reshape(*lead, E, R, -1)
    return torch.gather(cand, -2, idx[..., None, None].expand(*lead, E, 1, cand.shape[-1]))[..., 0, :]


RULES = {"old": old_act, "new": acting.act}


def bind(rule, agent: FastDTQL):
    """rule as FastDTQL.act calls it: (states, eps, u) -> actions, on the agent's packed weights."""
    h = agent.hyper
    return lambda states, eps, u: rule(agent.pp, agent.tp, states, eps, u, h.hidden, h.max_action)


def flops_per_state(fn, states, eps, u) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(states, eps, u)
    return counter.get_total_flops() / (states.shape[0] * states.shape[1])


def measure(task: str, threads: int, mode: str, agents: int, states: int | None, hidden: int | None,
            candidates: int | None, blocks: int, block: int, draws: int = 4, seed: int = 0) -> dict:
    """Both rules on one task's shapes at one thread count and mode; one row per rule and their ratio."""
    torch.set_num_threads(threads)
    hyper = TASKS[task].hyper.replace(**{k: v for k, v in (("hidden", hidden), ("num_candidates", candidates))
                                         if v is not None})
    S, A = SHAPES[task.split("-")[0]]
    E = states if states is not None else TASKS[task].eval_episodes
    R = hyper.num_candidates
    agent = FastDTQL(S, A, hyper, seeds=list(range(seed, seed + agents)))
    g = torch.Generator().manual_seed(seed)
    inputs = [(torch.randn(agents, E, S, generator=g), torch.randn(agents, E, R, A, generator=g),
               torch.rand(agents, E, generator=g)) for _ in range(draws)]
    eager = {name: bind(rule, agent) for name, rule in RULES.items()}
    mflop = {name: flops_per_state(fn, *inputs[0]) / 1e6 for name, fn in eager.items()}
    if mode == "compile":
        torch._dynamo.reset()  # inductor's CPU kernels are built for the thread count of their compile
        fns = {name: compiling.CompileOnFirstCall(fn, agent.device) for name, fn in eager.items()}
    else:
        fns = eager
    first, out = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        out[name] = fn(*inputs[0])
        first[name] = time.perf_counter() - t0
        fn(*inputs[1 % draws])  # a second call before timing: whatever the first left cold
    calls, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    for b in range(blocks):
        for name in (list(fns) if b % 2 == 0 else list(reversed(fns))):
            for c in range(block):
                x = inputs[(b * block + c) % draws]
                t0, c0 = time.perf_counter(), time.process_time()
                fns[name](*x)
                calls[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    n_states = agents * E
    rows = []
    for name in fns:
        median, median_cpu = statistics.median(calls[name]), statistics.median(cpu[name])
        rows.append({"task": task, "state_dim": S, "action_dim": A, "hidden": hyper.hidden, "candidates": R,
                     "agents": agents, "states_per_call": n_states, "threads": threads, "mode": mode, "rule": name,
                     "eager_rows": acting.EAGER_ROWS, "mflop_per_state": mflop[name], "first_call_s": first[name],
                     "call_ms": calls[name], "cpu_ms": cpu[name], "median_ms": median, "median_cpu_ms": median_cpu,
                     "states_per_s": n_states / (median / 1e3), "states_per_cpu_s": n_states / (median_cpu / 1e3)})
    by = {r["rule"]: r for r in rows}
    return {"rows": rows, "new_over_old": by["new"]["states_per_s"] / by["old"]["states_per_s"],
            "new_over_old_cpu": by["new"]["states_per_cpu_s"] / by["old"]["states_per_cpu_s"],
            "flop_ratio": by["old"]["mflop_per_state"] / by["new"]["mflop_per_state"],
            "max_action_difference": (out["new"] - out["old"]).abs().max().item()}


def format_table(res: dict) -> str:
    lines = [f"# acting rule, states per second: {res['cpu']}; torch {res['torch']}; {res['date']}",
             f"# {res['command']}",
             "| task | threads | mode | rule | MFLOP/state | first call s | median ms/call | states/s | new/old "
             "| median CPU ms/call | states/CPU s | new/old (CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in res["measurements"]:
        for r in m["rows"]:
            ratio, ratio_cpu = ((f"{m['new_over_old']:.2f}x", f"{m['new_over_old_cpu']:.2f}x") if r["rule"] == "new"
                                else ("", ""))
            lines.append(f"| {r['task']} | {r['threads']} | {r['mode']} | {r['rule']} | {r['mflop_per_state']:.1f} | "
                         f"{r['first_call_s']:.2f} | {r['median_ms']:.2f} | {r['states_per_s']:.1f} | {ratio} | "
                         f"{r['median_cpu_ms']:.2f} | {r['states_per_cpu_s']:.1f} | {ratio_cpu} |")
    per_call = {r["task"]: f"{r['agents']} agent(s) x {r['states_per_call'] // r['agents']} states x R "
                           f"{r['candidates']}" for m in res["measurements"] for r in m["rows"]}
    lines.append(f"# a call: {'; '.join(f'{t} {n}' for t, n in per_call.items())}; {res['blocks']} alternating blocks "
                 f"of {res['block']} calls per rule; largest action difference new vs old: "
                 f"{max(m['max_action_difference'] for m in res['measurements']):.3g}")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dtql_fast.profiling.act_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tasks", default="walker2d-medium-v2,antmaze-umaze-v0",
                   help="comma list of tasks of the table or families (walker2d, antmaze, ...)")
    p.add_argument("--threads", type=_ints, default=[1, 2], help="comma list of torch thread counts")
    p.add_argument("--modes", default="eager,compile", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--agents", type=int, default=1, help="agents acting in one call (a group's N)")
    p.add_argument("--states", type=int, help="states per agent per call (default: the task's evaluation episodes)")
    p.add_argument("--hidden", type=int, help="hidden width (default: the task's)")
    p.add_argument("--candidates", type=int, help="R (default: the task's num_candidates)")
    p.add_argument("--blocks", type=int, default=6, help="alternating blocks per rule")
    p.add_argument("--block", type=int, default=3, help="calls per block")
    p.add_argument("--eager-rows", type=int, help=f"candidate rows per block of the eager critic "
                                                   f"(default acting.EAGER_ROWS, {acting.EAGER_ROWS})")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes takes {', '.join(MODES)}; got {a.modes!r}")
    if not a.threads or min(a.threads) < 1:
        p.error(f"--threads takes positive thread counts, e.g. 1,2; got {a.threads}")
    for name, v in (("--agents", a.agents), ("--states", a.states), ("--hidden", a.hidden),
                    ("--candidates", a.candidates), ("--blocks", a.blocks), ("--block", a.block),
                    ("--eager-rows", a.eager_rows)):
        if v is not None and v < 1:
            p.error(f"{name} must be at least 1, got {v}")
    tasks = [resolve_task(t) for t in a.tasks.split(",") if t]
    if a.eager_rows is not None:
        acting.EAGER_ROWS = a.eager_rows
    compiling.use_cache()
    argv_shown = argv if argv is not None else sys.argv[1:]
    res = {"command": shlex.join(["python", "-m", "dtql_fast.profiling.act_bench", *argv_shown]),
           "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model(),
           "torch": torch.__version__, "blocks": a.blocks, "block": a.block, "measurements": []}
    for task in tasks:
        for threads in a.threads:
            for mode in modes:
                res["measurements"].append(measure(task, threads, mode, a.agents, a.states, a.hidden, a.candidates,
                                                   a.blocks, a.block))
    print(format_table(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
        print(f"# wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
