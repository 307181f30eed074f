"""Where the compiled training step's time goes on a CPU: matmuls, the optimizers, other fused kernels,
the compiled graph's Python wrapper, dynamo's guards, and the rest.

    python -m dtql_fast.profiling.breakdown --task walker2d-medium-v2 --threads 1 --json out.json
    python -m dtql_fast.profiling.breakdown --threads 1,2      # one table per thread count
    python -m dtql_fast.profiling.breakdown --threads 1 --kernels 25   # and its 25 costliest kernels
    python -m dtql_fast.profiling.breakdown --threads 1 --matmuls      # and its matmuls by shape

The step is the bench's "compile" variant (profiling.variants.Variant), its C++ kernels made visible to
torch.profiler (inductor's cpp.enable_kernel_profile). After warm-up, `--steps` steps are timed without
the profiler (the step time), then the same number run under it (the split). Categories, from the
profiler's self times per step:
- matmul: aten::mm / addmm / bmm / baddbmm (inductor calls them as extern kernels);
- optimizer: the fused kernels of the Adam and target updates (inductor names them `..._foreach_...`; it
  may fuse other element-wise work of the step into them, which then counts here);
- elementwise: every other fused C++ kernel;
- wrapper: the compiled graph's Python wrapper calling the kernels one by one (`Call CompiledFxGraph`, self);
- guards: dynamo's check of the step's inputs before each call (`TorchDynamo Cache Lookup`);
- other: the rest of the profiled time.
The matmul ceiling is measured in the same run: square fp32 matmuls at the step's hidden width, the
best of several timings; the step's matmul FLOPs over it is the time a step would take at the ceiling.
Profiler self times add overhead of their own: the split is a guide, the untimed step time the measure.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dtql_fast.profiling.variants import SHAPES, Variant, make_draws, resolve_task, synthetic_transitions
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.runlog import cpu_model
from dtql_fast.tasks import TASKS

CATEGORIES = ("matmul", "optimizer", "elementwise", "wrapper", "guards", "other")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def category(name: str) -> str | None:
    """The category of a profiler event by its name; None for the events that only hold others."""
    if name in MATMUL_OPS:
        return "matmul"
    if "cpp_fused" in name:
        return "optimizer" if "_foreach_" in name else "elementwise"
    if name.startswith("## Call CompiledFxGraph"):
        return "wrapper"
    if name == "TorchDynamo Cache Lookup":
        return "guards"
    return "other"


def ms_per_step(e, steps: int) -> float:
    """A key_averages() row's self CPU time, in ms per step."""
    return e.self_cpu_time_total / 1e3 / steps


def split(events, steps: int) -> dict[str, float]:
    """ms per step by category, from key_averages() rows (their self CPU time)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for e in events:
        out[category(e.key)] += ms_per_step(e, steps)
    return out


def costliest(events, steps: int, n: int) -> list[dict]:
    """The n profiler rows of most self time: where to look next, kernel by kernel."""
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:n]
    return [{"name": e.key, "category": category(e.key), "ms_per_step": ms_per_step(e, steps),
             "calls_per_step": e.count / steps} for e in rows]


def matmul_operands(name: str, shapes: list) -> tuple[list, list]:
    """The two matrices (or batches of them) of a matmul event: addmm and baddbmm take a bias first."""
    return (shapes[1], shapes[2]) if name in ("aten::addmm", "aten::baddbmm") else (shapes[0], shapes[1])


def matmuls_by_shape(events, steps: int) -> list[dict]:
    """The step's matmuls grouped by operand shapes (from a profile that recorded shapes), most time first:
    how far each shape runs from the GEMM ceiling."""
    out = []
    for e in events:
        if e.key not in MATMUL_OPS:
            continue
        a, b = matmul_operands(e.key, e.input_shapes)
        flop = 2 * math.prod(a) * b[-1]
        us = e.self_cpu_time_total / e.count
        out.append({"op": e.key, "shapes": [list(a), list(b)], "calls_per_step": e.count / steps,
                    "us_per_call": us, "ms_per_step": ms_per_step(e, steps),
                    "gflops": flop / us / 1e3})
    return sorted(out, key=lambda r: -r["ms_per_step"])


def matmul_ceiling_gflops(n: int, reps: int = 50) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(5):
        a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n ** 3 / best / 1e9


def matmul_flops(step) -> int:
    with FlopCounterMode(display=False) as fc:
        step()
    counts = fc.get_flop_counts().get("Global", {})
    names = {op.split("::")[1] for op in MATMUL_OPS}  # the counter names ops aten.mm, the profiler aten::mm
    return int(sum(v for k, v in counts.items() if str(k).split(".")[-1] in names))


def measure(task: str, threads: int, steps: int, warmup: int, batch: int | None = None,
            hidden: int | None = None, rows: int = 100_000, kernels: int = 0, matmuls: bool = False) -> dict:
    torch.set_num_threads(threads)
    torch._dynamo.reset()
    hyper = TASKS[task].hyper
    hyper = hyper.replace(**{k: v for k, v in (("batch_size", batch), ("hidden", hidden)) if v})
    S, A = SHAPES[task.split("-")[0]]
    device = torch.device("cpu")
    data = synthetic_transitions(S, A, rows, 0, device, hyper.max_action)
    draws = make_draws(data.n, hyper, A, warmup + (3 if matmuls else 2) * steps + 1, 1, device)
    torch.manual_seed(0)
    v = Variant("compile", ReferenceDTQL(S, A, hyper, device), data, hyper, draws, device)
    t0 = time.perf_counter()
    v.step(draws[0])
    compile_s = time.perf_counter() - t0
    for d in draws[1:warmup]:
        v.step(d)
    times = []
    for d in draws[warmup:warmup + steps]:
        t0 = time.perf_counter()
        v.step(d)
        times.append((time.perf_counter() - t0) * 1e3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for d in draws[warmup + steps:warmup + 2 * steps]:
            v.step(d)
    events = prof.key_averages()
    parts = split(events, steps)
    by_shape = []
    if matmuls:  # a pass of its own: recording shapes costs time the split should not carry
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for d in draws[warmup + 2 * steps:warmup + 3 * steps]:
                v.step(d)
        by_shape = matmuls_by_shape(prof.key_averages(group_by_input_shape=True), steps)
    flops = matmul_flops(lambda: v.eager_step(draws[-1]))  # the same matmuls; a dispatch mode cannot enter the compiled step
    ceiling = matmul_ceiling_gflops(hyper.hidden)
    step_ms = statistics.median(times)
    at_ceiling_ms = flops / ceiling / 1e6
    return {"task": task, "threads": threads, "batch_size": hyper.batch_size, "hidden": hyper.hidden,
            "steps": steps, "compile_s": round(compile_s, 1), "step_ms_median": step_ms, "step_ms_all": times,
            "profiled_ms_per_step": sum(parts.values()), "split_ms": parts, "matmul_gflop_per_step": flops / 1e9,
            "matmul_ceiling_gflops": ceiling, "matmul_at_ceiling_ms": at_ceiling_ms,
            "step_over_matmul_at_ceiling": step_ms / at_ceiling_ms,
            "matmul_gflops_in_step": flops / 1e9 / (parts["matmul"] / 1e3) if parts["matmul"] else None,
            "costliest": costliest(events, steps, kernels), "matmuls_by_shape": by_shape}


def short(name: str, width: int = 100) -> str:
    """A kernel's name cut to fit a table, its end (inductor's kernel number) kept: the JSON has it whole."""
    return name if len(name) <= width else name[:width - 33] + "..." + name[-30:]


def format_row(r: dict) -> str:
    parts = r["split_ms"]
    total = r["profiled_ms_per_step"]
    cells = " | ".join(f"{parts[c]:.2f} ({100 * parts[c] / total:.0f}%)" for c in CATEGORIES)
    return (f"| {r['threads']} | {r['step_ms_median']:.2f} | {total:.2f} | {cells} | {r['matmul_gflop_per_step']:.2f} | "
            f"{r['matmul_ceiling_gflops']:.0f} | {r['matmul_at_ceiling_ms']:.2f} | {r['step_over_matmul_at_ceiling']:.2f}x |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dtql_fast.profiling.breakdown", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--task", default="walker2d-medium-v2", help="a task of the table, or a family (walker2d, antmaze)")
    p.add_argument("--threads", default="1", help="comma-separated torch thread counts, e.g. 1,2")
    p.add_argument("--steps", type=int, default=20, help="steps timed, and as many profiled")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None, help="override the hidden width (256)")
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="also list the N profiler rows of most self time per step (kernels, matmuls, wrapper)")
    p.add_argument("--matmuls", action="store_true",
                   help="also time the matmuls by operand shape, with their GFLOP/s (a third pass of --steps)")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    task = resolve_task(a.task)
    rows = [measure(task, int(t), a.steps, a.warmup, a.batch_size, a.hidden, kernels=a.kernels, matmuls=a.matmuls)
            for t in a.threads.split(",")]
    cpu = cpu_model()
    print(f"# compiled step of {task} (batch {rows[0]['batch_size']}, hidden {rows[0]['hidden']}) on {cpu}; "
          f"ms per step, median of {a.steps} unprofiled steps, then the profiler's split of {a.steps} more")
    print("| threads | step ms | profiled ms | " + " | ".join(CATEGORIES) + " | matmul GFLOP/step | GEMM ceiling "
          "GFLOP/s | matmul at ceiling ms | step / that |")
    print("|" + "---|" * (len(CATEGORIES) + 7))
    for r in rows:
        print(format_row(r))
    for r in rows:
        if r["costliest"]:
            print(f"\n# the {len(r['costliest'])} costliest rows at {r['threads']} thread(s), profiler self time per step")
            print("| ms | calls | category | name |\n|---|---|---|---|")
            for k in r["costliest"]:
                print(f"| {k['ms_per_step']:.3f} | {k['calls_per_step']:g} | {k['category']} | {short(k['name'])} |")
        if r["matmuls_by_shape"]:
            print(f"\n# the matmuls by shape at {r['threads']} thread(s), against a {r['matmul_ceiling_gflops']:.0f} "
                  "GFLOP/s ceiling (profiled with shapes recorded)")
            print("| ms/step | calls | us/call | GFLOP/s | op | operands |\n|---|---|---|---|---|---|")
            for m in r["matmuls_by_shape"]:
                print(f"| {m['ms_per_step']:.2f} | {m['calls_per_step']:g} | {m['us_per_call']:.1f} | {m['gflops']:.1f} | "
                      f"{m['op']} | {' x '.join(str(tuple(x)) for x in m['shapes'])} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"cpu": cpu, "command": " ".join([sys.executable, "-m",
                                            "dtql_fast.profiling.breakdown", *(argv or sys.argv[1:])]),
                                            "rows": rows}, indent=1))
        print(f"# wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
