"""Benchmark and parity harness for the DTQL training step.

    python -m dtql_fast.profiling.bench --task walker2d-medium-v2 --device cpu --threads 2 \\
        --variants reference,eager,compile --steps 30 --warmup 3 --json bench.json

Every variant starts from the same weights (a ReferenceDTQL built under torch.manual_seed(seed);
the fast variants copy them with FastDTQL.load_weights_from) and is fed the same pre-generated
random draws (warmup + steps Draws from one seeded generator, on the device). The variants run one
after the other, so every one of them is checked against the reference run of the same command:

  equivalence  per metric, the largest relative and absolute difference from the reference over
               all steps; per parameter tensor at the end, the largest absolute difference and the
               fraction of elements off by more than 1e-6. A difference is allowed up to the larger
               of a fixed bound (tight for the first 3 steps) and 10x the "round-off floor", a
               second reference run whose weights get a one-ulp kick after every step (see
               TOLERANCES below); each variant is PASS or FAIL. A FAILing variant is not timed as
               if it were fine (its timing row says so) and the command exits 1.
  timing       warm-up steps (the first call's wall time is reported separately: for compiled
               variants it is the compile time), then timed steps, each followed by a device sync:
               min / median / max ms per step, steps/s, speedup vs reference (median over median).
  work         operator launches per step, matmul FLOPs per step and achieved FLOP/s, peak memory
               (CUDA: max_memory_allocated; CPU: the process's max RSS).

Variants: reference (ReferenceDTQL.train_step), eager (FastDTQL.train_step, torch kernels),
compile (torch.compile(train_step, fullgraph=True)), compile-triton (the same with
set_kernels("triton"); on CPU the ops' PyTorch implementation runs), cudagraph and
cudagraph-triton (CUDA only: the compiled step captured by steppers.CUDAGraphStep around a closure
that copies the step's draws into static buffers).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dtql_fast.ranges import PHASES, ProfileWindow, parse_window, phase
from dtql_fast.runlog import cpu_model
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.tasks import TASKS

from dtql_fast.profiling.equivalence import FLOOR_FACTOR, TOLERANCES, compare
from dtql_fast.profiling.variants import (CUDA_ONLY, DEFAULT_VARIANTS, PERTURB_DELTA, SHAPES, SYNTHETIC_ROWS,
                                          VARIANTS, Variant, make_draws, metric_keys, resolve_task, round_off_floor,
                                          run_variant, synthetic_transitions)

__all__ = ["main", "compare", "resolve_task", "SHAPES", "VARIANTS"]


# -- machine, output ----------------------------------------------------------------------------

def machine_info(device: torch.device) -> dict:
    cpu = cpu_model()
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - reported, never fatal
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg_at_start": load,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": commit}


def phase_overhead_us(n: int = 10_000) -> float:
    """Mean cost of one phase() enter/exit with no profiler attached, in microseconds."""
    t0 = time.perf_counter()
    for _ in range(n):
        with phase("critic"):
            pass
    return (time.perf_counter() - t0) / n * 1e6


def _fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def format_report(res: dict) -> str:
    meta, rows = res["meta"], res["variants"]
    lines = [f"# DTQL step benchmark: {meta['task']} (S={meta['state_dim']}, A={meta['action_dim']}, "
             f"B={meta['batch_size']}, hidden={meta['hidden']}, K={meta['noise_levels']}), {meta['data']}",
             f"# {meta['device']}: {meta['machine']['gpu'] or meta['machine']['cpu']}, "
             f"{meta['machine']['torch_threads']} torch threads, load {meta['machine']['loadavg_at_start']}; torch {meta['machine']['torch']}, "
             f"triton {meta['machine']['triton']}, python {meta['machine']['python']}, "
             f"commit {meta['machine']['git_commit'][:12]}",
             f"# {meta['warmup']} warm-up + {meta['steps']} timed steps per variant, synced after every "
             f"step; same initial weights (seed {meta['seed']}) and same draws for every variant"]
    for note in meta["notes"]:
        lines.append(f"# note: {note}")
    lines.append("")
    lines.append(f"equivalence vs reference over {meta['warmup'] + meta['steps']} steps: worst/tol <= 1 "
                 f"passes; tol = max(fixed bound, {FLOOR_FACTOR:g} x round-off floor), rules in the JSON")
    lines.append(f"{'variant':<17} {'metric max rel':>14} {'max abs':>9} {'worst/tol':>9}   "
                 f"{'param max abs':>13} {'frac>1e-6':>9} {'worst/tol':>9}  result")
    for name, row in rows.items():
        eq = row.get("equivalence")
        if name == "reference":
            lines.append(f"{name:<17} {'(the oracle)':>14}")
            fl = res.get("round_off_floor")
            if fl:
                s = fl["summary"]
                lines.append(f"{'round-off floor':<17} {s['metric_max_rel']:>14.2e} {s['metric_max_abs']:>9.2e} "
                             f"{'':>9}   {s['param_max_abs']:>13.2e} {s['param_max_frac_gt_1e-6']:>9.3f} "
                             f"{'':>9}  (reference, weights kicked 1 ulp per step)")
            continue
        if eq is None:
            lines.append(f"{name:<17} {'-':>14} {'-':>9} {'-':>9}   {'-':>13} {'-':>9} {'-':>9}  "
                         f"{row['status']}: {row.get('error', '')}")
            continue
        s = eq["summary"]
        lines.append(f"{name:<17} {s['metric_max_rel']:>14.2e} {s['metric_max_abs']:>9.2e} "
                     f"{s['metric_worst_over_tol']:>9.3f}   {s['param_max_abs']:>13.2e} "
                     f"{s['param_max_frac_gt_1e-6']:>9.3f} {s['param_worst_over_tol']:>9.3f}  {row['status']}")
        for msg in eq["failures"][:6]:
            lines.append(f"    {msg}")
    lines.append("")
    mem_col = "peak mem" if meta["device"].startswith("cuda") else "max RSS"
    lines.append(f"{'variant':<17} {'check':<5} {'first s':>7} {'min ms':>8} {'median ms':>9} {'max ms':>8} "
                 f"{'steps/s':>7} {'speedup':>7} {'launches':>8} {'items':>5} {'GFLOP':>6} {'GFLOP/s':>7} "
                 f"{mem_col:>8}")
    for name, row in rows.items():
        t = row.get("timing")
        first = f"{row['first_call_s']:.2f}" if row.get("first_call_s") is not None else "-"
        if t is None:
            why = "not timed: failed equivalence" if row["status"] == "FAIL" else "not timed: error"
            lines.append(f"{name:<17} {row['status']:<5} {first:>7} {why}")
            continue
        sp = f"{t['speedup']:.2f}x" if t.get("speedup") else "-"
        launches = row.get("launches") or {}
        gf = f"{row['flops'] / 1e9:.3f}" if row.get("flops") is not None else "-"
        mem = row.get("peak_mem_bytes", row.get("max_rss_bytes"))
        lines.append(f"{name:<17} {row['status']:<5} {first:>7} {t['min_ms']:>8.2f} {t['median_ms']:>9.2f} "
                     f"{t['max_ms']:>8.2f} {t['steps_per_s']:>7.1f} {sp:>7} {launches.get('launches', '-'):>8} "
                     f"{launches.get('host_syncs', '-'):>5} {gf:>6} {t['gflops_per_s']:>7.2f} {_fmt_bytes(mem):>8}")
    lines.append("")
    lines.append("first s: wall time of the first call (compile time for compiled variants); "
                 "steps/s: timed steps / their total time; speedup: reference median / variant median;"
                 " items: item/_local_scalar_dense calls per step (a device sync when the tensor is on the GPU);")
    lines.append("launches per step: eager variants count aten ops dispatched below autograd "
                 "(TorchDispatchMode, views excluded); compiled variants count torch.profiler kernel events "
                 + ("(CUDA kernels + memcpy/memset)" if meta["device"].startswith("cuda") else
                    "(inductor C++ kernels + top-level aten ops such as extern mm/addmm)") + ";")
    lines.append("GFLOP: matmul FLOPs of one eager step (FlopCounterMode; compiled variants reuse the eager "
                 "count of the same math); GFLOP/s = GFLOP / median time; "
                 + ("peak mem: torch.cuda.max_memory_allocated over the variant's steps"
                    if meta["device"].startswith("cuda") else
                    "max RSS: the process's peak RSS so far (cumulative across variants, run in order)"))
    hits = [f"{n} {r['fxgraph_cache_hits']}" for n, r in rows.items() if r.get("fxgraph_cache_hits")]
    if hits:
        lines.append("inductor FX-graph cache hits while compiling (compile time then excludes codegen): "
                     + ", ".join(hits))
    mem = res.get("memory_steps")
    if mem:
        n = mem["steps"]
        a, b = mem["step_0"], mem[f"step_{n}"]
        key = mem["measure"]
        lines.append("")
        lines.append(f"memory over {n} more steps of {mem['variant']}: {key} at step 0 {_fmt_bytes(a[key])}, "
                     f"at step {n} {_fmt_bytes(b[key])} (growth {mem['growth_bytes'] / 2**20:+.2f} MiB)")
    lines.append("")
    lines.append(f"phase() overhead with no profiler attached: {meta['phase_overhead_us']:.2f} us per range")
    ok = res["passed"]
    lines.append(f"RESULT: {'PASS' if ok else 'FAIL'}"
                 + ("" if ok else f" ({', '.join(n for n, r in rows.items() if r['status'] != 'PASS')})"))
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dtql_fast.profiling.bench",
        description="Time the DTQL training step's implementations and check each one against the "
                    "reference on the same weights and draws.",
        epilog="Exit status: 0 when every variant passes equivalence, 1 when one fails (or errors), "
               "2 on bad arguments.")
    p.add_argument("--task", default="walker2d-medium-v2",
                   help="a task of the table, or a family (walker2d, hopper, halfcheetah, antmaze, pen, "
                        "kitchen): its hyperparameters, and with synthetic data its state/action dims")
    p.add_argument("--dataset", nargs="?", const="", default=None, metavar="NAME",
                   help="train on real data from dtql_fast.data.load_dataset (NAME: a D4RL task or a "
                        "Minari id; without NAME, --task) instead of synthetic transitions")
    p.add_argument("--dataset-path", default=None, help="passed to load_dataset")
    p.add_argument("--rows", type=int, default=SYNTHETIC_ROWS, help="synthetic transitions (default 100000)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma list from {', '.join(VARIANTS)} (cudagraph* need CUDA); the reference "
                        f"always runs, as the oracle (default {DEFAULT_VARIANTS})")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first (compilation happens in the first); cudagraph* need >= 4")
    p.add_argument("--batch-size", type=int, default=None, help="override the task's batch size")
    p.add_argument("--hidden", type=int, default=None, help="override the hidden width (256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--json", metavar="PATH", help="write every number, plus machine info, here")
    p.add_argument("--profile-steps", metavar="A:B", default=None,
                   help="profile steps [A, B) of every variant (0-based, warm-up included) with "
                        "dtql_fast.ranges.ProfileWindow: on CUDA cudaProfilerStart/Stop for nsys "
                        "--capture-range=cudaProfilerApi, on CPU a Chrome trace per variant under "
                        "--profile-out/<variant>/; profiled steps are left out of the timing")
    p.add_argument("--profile-out", default="bench_profile", help="where CPU traces go")
    p.add_argument("--memory-steps", type=int, default=0, metavar="N",
                   help="run the first compiled variant N extra steps and report memory at step 0 and "
                        "N (CUDA: max_memory_allocated; CPU: RSS), to show it does not grow")
    p.add_argument("--seeds", metavar="N,N,...", default=None,
                   help="instead of the variants: for each group size N, FastDTQL with N seeds in one step "
                        "against N single-seed steps, in alternating blocks in one run (ms per seed-step, "
                        "equivalence per seed); e.g. 1,2,5")
    p.add_argument("--seeds-block", type=int, default=10, metavar="K",
                   help="with --seeds: consecutive steps per block (default 10); 1 interleaves every step, "
                        "which makes each agent's step evict the others' state from the CPU caches")
    p.add_argument("--seeds-mode", choices=["compile", "eager"], default="compile",
                   help="with --seeds: compiled (torch.compile fullgraph) or eager steps on both sides")
    p.add_argument("--seeds-mixed", action="store_true",
                   help="with --seeds: the agents differ in every per-agent setting (alpha, gamma, lr, lr decay, "
                        "expectile, discount, tau, critic lr) and alternate between two datasets; each single-agent "
                        "run has its agent's settings and data")
    p.add_argument("--perturb", choices=[v for v in VARIANTS if v != "reference"], default=None,
                   metavar="VARIANT",
                   help=f"self-test of the harness: after VARIANT's first step add {PERTURB_DELTA:g} to one "
                        f"weight (critic Q1, first Linear, [0, 0]); that variant must then FAIL the "
                        f"equivalence check and the command exit 1")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        if v in CUDA_ONLY and device.type != "cuda":
            parser.error(f"--variants: {v} needs a CUDA device (--device cuda)")
    notes = []
    if "reference" not in variants:
        variants.insert(0, "reference")
        notes.append("reference added: it is the oracle every variant is checked against")
    variants = ["reference"] + [v for v in dict.fromkeys(variants) if v != "reference"]
    if args.perturb and args.perturb not in variants:
        parser.error(f"--perturb {args.perturb}: that variant is not in --variants")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first call is never timed)")
    warmup = args.warmup
    if any(v in CUDA_ONLY for v in variants) and warmup < 4:
        warmup = 4
        notes.append("--warmup raised to 4: CUDAGraphStep runs 3 steps, then captures on the 4th")
    window = parse_window(args.profile_steps) if args.profile_steps else None
    if window is not None:
        notes.append(f"steps {window[0]}..{window[1] - 1} ran under the profiler and are left out of the timing")

    # Data and hyperparameters.
    if args.dataset is not None:
        from dtql_fast.data import load_dataset
        name = args.dataset or resolve_task(args.task)
        loaded = load_dataset(name, args.dataset_path, device)
        data, task_name, hyper = loaded.transitions, loaded.task.name, loaded.task.hyper
        data_desc = f"dataset {name} ({data.n} rows)"
    else:
        task_name = resolve_task(args.task)
        hyper = TASKS[task_name].hyper
        S, A = SHAPES[task_name.split("-")[0]]
        data = synthetic_transitions(S, A, args.rows, args.seed, device, hyper.max_action)
        data_desc = f"synthetic transitions ({args.rows} rows, seed {args.seed})"
    over = {k: v for k, v in (("batch_size", args.batch_size), ("hidden", args.hidden)) if v is not None}
    hyper = hyper.replace(**over)
    S, A = data.state_dim, data.action_dim
    if args.seeds:
        return _main_seeds(args, argv, parser, hyper, data, data_desc, task_name, device)
    keys = metric_keys(hyper)
    total = warmup + args.steps
    draws = make_draws(data.n, hyper, A, total, args.seed + 1, device)
    torch.manual_seed(args.seed)
    init = ReferenceDTQL(S, A, hyper, device)
    lrs = {"diffusion": hyper.lr, "policy": hyper.lr, "critic": hyper.critic_lr, "critic_target": hyper.critic_lr}
    if device.type == "cpu" and any(v.endswith("triton") for v in variants):
        notes.append("compile-triton on cpu: dtql_fast.kernels' ops run their PyTorch implementation "
                     "(Triton kernels serve CUDA tensors only), so this is not a Triton measurement")
    if device.type == "cpu" and any(v not in ("reference", "eager") for v in variants):
        notes.append("compiled variants are built with inductor's cpp.enable_kernel_profile, so that their "
                     "C++ kernel calls show up as profiler events and can be counted")
    if args.perturb:
        notes.append(f"--perturb {args.perturb}: self-test, {PERTURB_DELTA:g} added to critic.q1.0.weight[0, 0] "
                     f"after its first step; it must FAIL")
    mem_variant = None
    if args.memory_steps:
        mem_variant = next((v for v in variants if v not in ("reference", "eager")), None)
        if mem_variant is None:
            mem_variant = variants[-1]
            notes.append(f"--memory-steps: no compiled variant in --variants, measured {mem_variant}")

    machine = machine_info(device)
    load = machine["loadavg_at_start"]
    if device.type == "cpu" and load and load[0] >= 0.5 and torch.get_num_threads() >= (os.cpu_count() or 1):
        notes.append(f"shared machine: load average {load[0]} on {os.cpu_count()} cores with {torch.get_num_threads()} "
                     f"torch threads; OpenMP threads wait for each other on every op, so steps made of many small "
                     f"ops (the reference) can slow down by orders of magnitude; compare a --threads 1 run")
    phase_us = phase_overhead_us()
    results, runs, memory, floor, floor_summary = {}, {}, None, None, None
    torch._dynamo.reset()
    for name in variants:
        row = {"status": "ERROR"}
        results[name] = row
        try:
            if name.startswith(("compile", "cudagraph")):
                torch._dynamo.reset()  # every compiled variant compiles from scratch (the on-disk cache may hit)
            v = Variant(name, init, data, hyper, draws, device)
            win = None
            if window is not None:
                win = ProfileWindow(args.profile_steps, device, Path(args.profile_out) / name)
            run = run_variant(v, draws, warmup, args.perturb == name, win,
                              args.memory_steps if name == mem_variant else 0)
            if win is not None:
                win.close()
                row["trace"] = str(win.trace_path) if win.trace_path else None
        except Exception as e:  # noqa: BLE001 - a variant that errors is reported, the others still run
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"bench: variant {name} failed with {row['error']}", file=sys.stderr)
            continue
        runs[name] = run
        if "memory" in run:
            memory = run.pop("memory")
        row.update({"first_call_s": run["first_call_s"], "compile_s": run["first_call_s"] if v.compiled else None,
                    "fxgraph_cache_hits": run["fxgraph_cache_hits"], "launches": run["launches"],
                    "flops": run["flops"], "profiled_steps_excluded": run["profiled_steps_excluded"]})
        for k in ("peak_mem_bytes", "max_rss_bytes"):
            if k in run:
                row[k] = run[k]
        if name == "reference":
            row["status"] = "PASS"
            row["equivalence"] = None
            floor = round_off_floor(init, data, hyper, draws, device, args.seed + 2)
            floor_summary = compare(run, floor, None, keys, lrs)
        else:
            eq = compare(runs["reference"], run, floor, keys, lrs) if "reference" in runs else None
            row["equivalence"] = eq
            row["status"] = "PASS" if eq is not None and eq["passed"] else "FAIL"
        ms = [t * 1e3 for t in run["times_s"]]
        if row["status"] == "PASS" and ms:
            med = statistics.median(ms)
            row["timing"] = {"min_ms": min(ms), "median_ms": med, "max_ms": max(ms),
                             "mean_ms": statistics.fmean(ms), "steps_timed": len(ms),
                             "steps_per_s": len(ms) / (sum(ms) / 1e3),
                             "gflops_per_s": run["flops"] / (med / 1e3) / 1e9, "times_ms": ms}
        else:
            row["timing"] = None  # a failing variant is not timed as if it were fine
    ref_t = results["reference"].get("timing")
    for name, row in results.items():
        if row.get("timing") and ref_t:
            row["timing"]["speedup"] = ref_t["median_ms"] / row["timing"]["median_ms"]
    passed = all(r["status"] == "PASS" for r in results.values())

    meta = {"task": task_name, "data": data_desc, "state_dim": S, "action_dim": A,
            "batch_size": hyper.batch_size, "hidden": hyper.hidden, "noise_levels": hyper.noise_levels,
            "hyper": {k: getattr(hyper, k) for k in hyper.__dataclass_fields__},
            "device": str(device), "variants": variants, "steps": args.steps, "warmup": warmup,
            "seed": args.seed, "metrics": keys, "tolerances": TOLERANCES, "notes": notes,
            "perturb": args.perturb, "phase_overhead_us": phase_us, "phases": list(PHASES),
            "machine": machine,
            "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "dtql_fast.profiling.bench", *argv]),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    res = {"meta": meta, "passed": passed, "variants": results, "memory_steps": memory,
           "round_off_floor": floor_summary}
    print(format_report(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1, default=float)
        print(f"# wrote {args.json}")
    return 0 if passed else 1


def _main_seeds(args, argv, parser, hyper, data, data_desc, task_name, device) -> int:
    from dtql_fast.profiling import seeds_bench
    try:
        sizes = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give group sizes as a comma-separated list, e.g. 1,2,5")
    if not sizes or min(sizes) < 1:
        parser.error(f"--seeds {args.seeds!r}: group sizes are integers >= 1")
    if args.seeds_block < 1:
        parser.error(f"--seeds-block {args.seeds_block}: a block is at least 1 step")
    machine = machine_info(device)
    rows = [seeds_bench.run_group(n, data.state_dim, data.action_dim, hyper, data, device, args.steps,
                                  args.warmup, args.seeds_mode == "compile", args.seed, args.seeds_block,
                                  mixed=args.seeds_mixed)
            for n in sizes]
    mixed = (" (mixed: the agents differ in every per-agent setting and alternate between the data and its first "
             "half)" if args.seeds_mixed else "")
    print(f"# many seeds in one step: {task_name} (S={data.state_dim}, A={data.action_dim}, B={hyper.batch_size}, "
          f"hidden={hyper.hidden}), {data_desc}; {args.seeds_mode} steps{mixed}")
    print(f"# {device}: {machine['gpu'] or machine['cpu']}, {machine['torch_threads']} torch threads, load "
          f"{machine['loadavg_at_start']}; {args.warmup} warm-up + {args.steps} timed steps per group size, blocks of {args.seeds_block}")
    print(seeds_bench.format_rows(rows))
    passed = all(r["passed"] for r in rows)
    print(f"RESULT: {'PASS' if passed else 'FAIL'}")
    if args.json:
        meta = {"task": task_name, "data": data_desc, "state_dim": data.state_dim, "action_dim": data.action_dim,
                "batch_size": hyper.batch_size, "hidden": hyper.hidden, "device": str(device),
                "mode": args.seeds_mode, "mixed": args.seeds_mixed, "steps": args.steps, "warmup": args.warmup, "block": args.seeds_block,
                "machine": machine,
                "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "dtql_fast.profiling.bench", *argv]),
                "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "passed": passed, "groups": rows}, indent=1,
                                              default=float))
        print(f"# wrote {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
