"""Kernel launches per compiled training step on a GPU, counted without a GPU.

    python -m dtql_fast.profiling.launches --task antmaze-umaze-v0 --kernels torch,triton --json out.json
    python -m dtql_fast.profiling.launches --task walker2d-medium-v2 --seeds 5   # a group of 5 seeds
    python -m dtql_fast.profiling.launches --task walker2d-medium-v2 --seeds 30 --mixed  # 30 agents, own settings

The method is in profiling/fake_cuda.py, which the team's gpu_offline.py tool (--part step)
also uses: a fake CUDA device inside the CPU torch build, dynamo's graph of the StepRunner
'compile' step captured on the CPU, and inductor's real CUDA code generation run on it; the
generated module is parsed for Triton launches, cuBLAS calls and ATen fallbacks. The tool
counts the walker2d step as the CPU traces it; this counts any task's shapes, and the step a
CUDA device traces (V(s) and V(s') in one pass: FastDTQL.joint_value; on a CPU they are two,
which the tool's count includes: 7 launches more). Every number is a compile-time
count, not a timing: at batch 256 a step is launch-bound, so launches are the GPU-time proxy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dtql_fast.profiling import fake_cuda  # imports only the standard library: torch is not loaded yet

SYNTHETIC_ROWS = 1000


def mixed_group(hyper, n: int) -> list:
    """n agents' settings that differ in every per-agent field (hyper.PER_AGENT), cycling: the group the
    --mixed count compiles (and a grid of tasks x settings x seeds would)."""
    cycle = [dict(alpha=1.0, gamma=0.0, lr_decay=True), dict(alpha=5.0, gamma=1.0, lr_decay=False, lr=1e-4),
             dict(alpha=20.0, gamma=0.0, lr_decay=False, expectile=0.9, discount=0.95),
             dict(alpha=5.0, gamma=1.0, lr_decay=True, tau=0.01, critic_lr=1e-4)]
    return [hyper.replace(**cycle[i % len(cycle)]) for i in range(n)]


def mixed_datasets(data, n: int) -> tuple[list, list[int]]:
    """The --mixed group's two datasets of different sizes, `data` and its first half, and which of them each
    of n agents samples (alternating): transitions.AgentData's arguments."""
    from dataclasses import fields

    from dtql_fast.transitions import Transitions
    half = Transitions(*(getattr(data, f.name)[: data.n // 2] for f in fields(Transitions)))
    return [data, half], [i % 2 for i in range(n)]


def _capture(task: str, kernels: str, seeds: int | None, mixed: bool = False):
    """Dynamo's one graph of StepRunner('compile') for `task`'s shapes, captured on the CPU."""
    import torch
    from dtql_fast import steppers, update
    from dtql_fast.profiling.bench import SHAPES, resolve_task
    from dtql_fast.tasks import TASKS
    from dtql_fast.transitions import Transitions

    name = resolve_task(task)
    S, A = SHAPES[name.split("-")[0]]
    hyper = TASKS[name].hyper
    g = torch.Generator().manual_seed(0)
    N = SYNTHETIC_ROWS
    data = Transitions(torch.randn(N, S, generator=g), torch.rand(N, A, generator=g) * 2 - 1,
                       torch.randn(N, 1, generator=g), torch.randn(N, S, generator=g),
                       (torch.rand(N, 1, generator=g) > 0.1).float())
    torch.manual_seed(0)
    n = seeds or 1
    hypers = mixed_group(hyper, n) if mixed else None
    if mixed:
        from dtql_fast.transitions import AgentData
        data = AgentData(*mixed_datasets(data, n))
    agent = update.FastDTQL(S, A, hyper, device="cpu", kernels=kernels, seeds=list(range(n)), hypers=hypers)
    agent.joint_value = True  # built on the CPU, but the graph counted is the one a GPU runs
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    real_compile = torch.compile
    torch.compile = lambda fn, **kw: real_compile(fn, backend=backend, **kw)
    try:
        runner = steppers.StepRunner(agent, data, mode="compile")
    finally:
        torch.compile = real_compile
    runner()
    if len(captured) != 1:
        raise RuntimeError(f"expected one graph (fullgraph=True), got {len(captured)}")
    return captured[0], {"task": name, "state_dim": S, "action_dim": A, "batch": hyper.batch_size,
                         "noise_levels": hyper.noise_levels, "seeds": seeds, "mixed": mixed}


def child(task: str, kernels: str, seeds: int | None, out: str, mixed: bool = False) -> None:
    fake_cuda.load()  # before torch is imported
    import torch
    torch.set_num_threads(1)
    result = {"kernels": kernels, "ok": False}
    t0 = time.perf_counter()
    try:
        (gm, example_inputs), shapes = _capture(task, kernels, seeds, mixed)
        result.update(shapes)
        fake_cuda.retarget_to_cuda(gm)
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.graph import GraphLowering
        from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
        codes = []

        class Generated(Exception):
            pass

        def save(code):
            codes.append(code)
            raise Generated  # stop before the module is loaded (that would compile and launch)

        GraphLowering.save_output_code = staticmethod(save)
        with fake_cuda.fake_cuda() as props:
            mode = FakeTensorMode()
            cuda = torch.device("cuda", 0)
            fake = [FakeTensor(mode, torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta"), cuda)
                    for t in example_inputs]
            try:
                compile_fx(gm, fake)
            except Exception:
                if not codes:
                    raise
            result.update(fake_cuda.analyse_module(codes[0]))
            result["device"] = f"{props.name}, {props.multi_processor_count} SMs, cc {props.major}.{props.minor}"
        result["total_launches"] = (result["triton_launches"] + sum(result["extern_calls"].values())
                                    + sum(result["fallbacks"].values()))
        result["ok"] = True
    except Exception as e:  # report where it stopped
        import traceback
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-4000:]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(out).write_text(json.dumps(result, indent=1, default=str))


def count(task: str, kernels: list[str], seeds: int | None = None, mixed: bool = False) -> dict:
    """Run one child process per kernels mode (the fake CUDA library must load before torch)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="dtql_launches_") as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(tmp, "triton"), TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                   TORCHINDUCTOR_AUTOGRAD_CACHE="0", TORCHINDUCTOR_COMPILE_THREADS="1", OMP_NUM_THREADS="1")
        env.pop("TRITON_INTERPRET", None)
        for mode in kernels:
            out = os.path.join(tmp, f"{mode}.json")
            proc = subprocess.run([sys.executable, "-m", "dtql_fast.profiling.launches", "--child", "--task", task,
                                   "--kernels", mode, "--json", out]
                                  + ([] if seeds is None else ["--seeds", str(seeds)]) + (["--mixed"] if mixed else []),
                                  env=env, capture_output=True, text=True)
            results[mode] = (json.loads(Path(out).read_text()) if os.path.exists(out) else
                             {"kernels": mode, "ok": False, "error": f"child exited {proc.returncode}: "
                                                                    f"{proc.stderr.strip()[-1500:]}"})
    return results


def format_table(results: dict) -> str:
    oks = {m: r for m, r in results.items() if r.get("ok")}
    lines = []
    for m, r in results.items():
        if not r.get("ok"):
            lines.append(f"kernels={m}: FAILED: {r.get('error')}")
    if not oks:
        return "\n".join(lines)
    first = next(iter(oks.values()))
    group = "" if first.get("seeds") is None else f", {first['seeds']} agents in one step"
    if first.get("mixed"):
        group += " (mixed: every per-agent setting varied, two datasets)"
    lines.append(f"{first['task']} (state {first['state_dim']}, action {first['action_dim']}, batch {first['batch']}, "
                 f"K={first['noise_levels']}{group}): compiled-step launches on {first['device']} "
                 "(compile-time counts, not timings)")
    rows = [("Triton launches", lambda r: r["triton_launches"]),
            ("  user-defined (dtql ops)", lambda r: r["kinds_launched"]["user"]),
            ("cuBLAS calls", lambda r: sum(r["extern_calls"].values())),
            ("ATen fallbacks", lambda r: sum(r["fallbacks"].values())),
            ("total launches per step", lambda r: r["total_launches"])]
    lines.append(f"  {'':<28}" + "".join(f"{'kernels=' + m:>16}" for m in oks))
    for name, fn in rows:
        lines.append(f"  {name:<28}" + "".join(f"{fn(r):>16}" for r in oks.values()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dtql_fast.profiling.launches", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="walker2d-medium-v2", help="a task of the table, or a family (walker2d, antmaze)")
    ap.add_argument("--kernels", default="torch,triton", help="comma-separated kernels= modes")
    ap.add_argument("--seeds", type=int, help="count the step of a group of this many seeds (FastDTQL(seeds=...))")
    ap.add_argument("--mixed", action="store_true",
                    help="with --seeds: the agents differ in every per-agent setting (alpha, gamma, lr, lr decay, "
                         "expectile, discount, tau, critic lr) and sample two datasets of different sizes")
    ap.add_argument("--json", help="write the counts here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.task, args.kernels, args.seeds, args.json, args.mixed)
        return 0
    if args.seeds is not None and args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: a group has at least one seed")
    if args.mixed and args.seeds is None:
        ap.error("--mixed needs --seeds N (a group of N agents)")
    results = count(args.task, [m for m in args.kernels.split(",") if m], args.seeds, args.mixed)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
