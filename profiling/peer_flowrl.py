"""Our compiled step against FlowRL's JAX DTQL, side by side in one process, one CPU thread each.

    python -m dtql_fast.profiling.peer_flowrl --flowrl-src PATH [--task walker2d-medium-v2] [--json out.json]
    python -m dtql_fast.profiling.peer_flowrl --flowrl-src PATH --isa avx2   # both sides held to AVX2

PATH is a checkout of github.com/typoverflow/flow-rl that the user supplies; nothing of it is copied
here. Its DTQL agent (`flowrl/agent/offline/dtql.py`) is imported as shipped, which needs its own
stack: `pip install "dtql_fast[peer]"` (jax 0.10.2, flax 0.12.8, distrax, optax, orbax, hydra: the newest
releases its code runs on, not the jax 0.5.3 it pins, under which its update ran about twice as slow; the
peer is measured at its best). The JAX version is printed and written beside every figure. Not part of CI.

Three steps at the task's shapes and batch, fed synthetic batches:
- ours: the compiled training step (StepRunner "compile": batch sampling, draws and the update);
- flowrl-shipped: `DTQLAgent.train_step`, three jitted updates (behaviour cloning, critic, policy);
- flowrl-one-jit: the same three updates inside one `jax.jit` (one XLA program a step).
After each one's first call (its compile, timed cold), they run in alternating blocks of `--block` steps,
each step waited for (torch: returns synced; JAX: block_until_ready on the new parameters). Reported:
median ms per step, our speedup over each, the first-call seconds, and each side's FLOPs per step
(ours: torch's FlopCounterMode over one eager step; JAX: XLA's cost analysis of the one-jit program).
Both sides are pinned to one thread: torch.set_num_threads(1), and XLA's CPU client with Eigen's
thread pool off (--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1), set before jax loads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


# What holds each library to an instruction set. ATen's choice also sets the vectors of inductor's
# generated C++ (torch._inductor.cpu_vec_isa reads ATEN_CPU_CAPABILITY).
ISA_ENV = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                  "ONEDNN_MAX_CPU_ISA": "AVX2"}}
ISA_XLA_FLAGS = {"native": "", "avx2": " --xla_cpu_max_isa=AVX2"}


def _flowrl(src: Path):
    """FlowRL's DTQL module and the names the benchmark needs from it, imported from the user's checkout."""
    if not (src / "flowrl" / "agent" / "offline" / "dtql.py").exists():
        raise SystemExit(f"error: --flowrl-src {src}: no flowrl/agent/offline/dtql.py there; give a checkout of "
                         "github.com/typoverflow/flow-rl")
    sys.path.insert(0, str(src))
    try:
        from flowrl.agent.offline import dtql
        from flowrl.config.offline.algo.dtql import DTQLConfig
        from flowrl.types import Batch
    except ImportError as e:
        raise SystemExit(f"error: importing FlowRL failed ({e}); install its stack: pip install \"dtql_fast[peer]\"")
    return dtql, DTQLConfig, Batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dtql_fast.profiling.peer_flowrl",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--flowrl-src", required=True, type=Path, help="a checkout of github.com/typoverflow/flow-rl")
    p.add_argument("--task", default="walker2d-medium-v2", help="a task of the table (its shapes, batch, settings)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per block and side")
    p.add_argument("--blocks", type=int, default=5, help="alternating blocks")
    p.add_argument("--isa", choices=sorted(ISA_ENV), default="native",
                   help="native: each side's widest vectors; avx2: both sides held to AVX2 (ATen, MKL, oneDNN, "
                        "inductor's generated code and XLA), to compare as on an AVX2-only CPU")
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args(argv)
    xla = " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + xla + ISA_XLA_FLAGS[a.isa]).strip()
    os.environ.update(ISA_ENV[a.isa])  # read by each library on its first use, below
    dtql, DTQLConfig, Batch = _flowrl(a.flowrl_src)
    import jax
    import jax.numpy as jnp
    import torch
    import torch._inductor.cpu_vec_isa
    from torch.utils.flop_counter import FlopCounterMode

    from dtql_fast.profiling.bench import machine_info
    from dtql_fast.profiling.variants import SHAPES, resolve_task, synthetic_transitions
    from dtql_fast.tasks import TASKS
    from dtql_fast.steppers import StepRunner
    from dtql_fast.update import FastDTQL

    torch.set_num_threads(1)
    if a.isa != "native" and torch.backends.cpu.get_cpu_capability().lower() != a.isa:
        raise SystemExit(f"error: --isa {a.isa}: torch runs {torch.backends.cpu.get_cpu_capability()}; "
                         "start a fresh process (the instruction set is fixed on torch's first operation)")
    task = resolve_task(a.task)
    h = TASKS[task].hyper
    S, A = SHAPES[task.split("-")[0]]
    B = h.batch_size

    # -- ours -------------------------------------------------------------------------------------------
    data = synthetic_transitions(S, A, 100_000, 0, "cpu")
    torch.manual_seed(0)
    agent = FastDTQL(S, A, h)
    ours = StepRunner(agent, data, mode="compile")
    t0 = time.perf_counter()
    ours()
    first = {"ours_s": time.perf_counter() - t0}
    eager = StepRunner(FastDTQL(S, A, h), data, mode="eager")
    with FlopCounterMode(display=False) as fc:
        eager()
    flops = {"ours": int(fc.get_total_flops())}

    # -- FlowRL, as shipped and under one jit ---------------------------------------------------------------
    cfg = DTQLConfig(name="dtql", discount=h.discount, gamma=h.gamma, ema=h.tau, expectile=h.expectile,
                     alpha=h.alpha, sigma_max=80.0, sigma_min=0.002, sigma_data=0.5, lr=h.lr, lr_decay=h.lr_decay,
                     lr_decay_steps=h.total_steps, max_action=h.max_action, min_action=-h.max_action)
    peer = dtql.DTQLAgent(S, A, cfg, seed=0)
    peer.prepare_training()  # the training phase's optimisers (the cosine schedule where the task decays)
    key = jax.random.PRNGKey(1)
    batches = []
    for _ in range(8):
        key, *k = jax.random.split(key, 6)
        batches.append(Batch(obs=jax.random.normal(k[0], (B, S)),
                             action=jax.random.uniform(k[1], (B, A), minval=-1.0, maxval=1.0),
                             reward=jax.random.normal(k[2], (B, 1)),
                             terminal=(jax.random.uniform(k[3], (B, 1)) < 0.01).astype(jnp.float32),
                             next_obs=jax.random.normal(k[4], (B, S)), next_action=jnp.zeros((B, A))))

    def shipped(i):
        peer.train_step(batches[i % len(batches)], i)
        jax.block_until_ready(peer.distill_actor.params)

    @jax.jit
    def update(rng, bc_actor, q, q_target, value, value_target, distill_actor, batch):
        rng, bc_actor, _ = dtql.jit_update_bc(rng, bc_actor, batch)
        q, q_target, value, value_target, _ = dtql.jit_update_critic(
            q, q_target, value, value_target, batch, discount=cfg.discount, expectile=cfg.expectile,
            metric_prefix="", ema=cfg.ema, do_ema_update=True)
        rng, distill_actor, _ = dtql.jit_update_distill_actor(rng, distill_actor, bc_actor, q, batch,
                                                              gamma=cfg.gamma, alpha=cfg.alpha)
        return rng, bc_actor, q, q_target, value, value_target, distill_actor

    state = [peer.rng, peer.bc_actor, peer.q, peer.q_target, peer.value, peer.value_target, peer.distill_actor]

    def one_jit(i):
        state[:] = update(*state, batches[i % len(batches)])
        jax.block_until_ready(state[-1].params)

    t0 = time.perf_counter()
    shipped(0)
    first["flowrl_shipped_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    one_jit(0)
    first["flowrl_one_jit_s"] = time.perf_counter() - t0
    cost = update.lower(*state, batches[0]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops["flowrl_one_jit"] = int(cost.get("flops", 0)) if cost else None

    # -- alternating blocks ------------------------------------------------------------------------------
    times = {"ours": [], "flowrl_shipped": [], "flowrl_one_jit": []}
    sides = {"ours": lambda i: ours(), "flowrl_shipped": shipped, "flowrl_one_jit": one_jit}
    for _ in range(2):  # warm-up block, untimed
        for fn in sides.values():
            for i in range(3):
                fn(i)
    for _ in range(a.blocks):
        for name, fn in sides.items():
            for i in range(a.steps):
                t0 = time.perf_counter()
                fn(i)
                times[name].append((time.perf_counter() - t0) * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    machine = machine_info(torch.device("cpu"))
    machine["isa"] = {"asked": a.isa, "aten": torch.backends.cpu.get_cpu_capability(),
                      "inductor": type(torch._inductor.cpu_vec_isa.pick_vec_isa()).__name__,
                      "env": ISA_ENV[a.isa], "xla_flags": os.environ["XLA_FLAGS"]}
    print(f"# {task}: state {S}, action {A}, batch {B}, hidden {h.hidden}; {machine['cpu']}, one thread each; "
          f"{a.blocks} alternating blocks of {a.steps} steps a side; instruction set: {a.isa} "
          f"(ATen {machine['isa']['aten']}, inductor {machine['isa']['inductor']})")
    print(f"# jax {jax.__version__}, torch {torch.__version__}; FlowRL from {a.flowrl_src}")
    print(f"{'step':<16} {'ms (median)':>12} {'ours faster by':>15} {'first call s':>13} {'GFLOP/step':>11}")
    firsts = {"ours": first["ours_s"], "flowrl_shipped": first["flowrl_shipped_s"],
              "flowrl_one_jit": first["flowrl_one_jit_s"]}
    for k in times:
        f = flops.get(k)
        print(f"{k:<16} {ms[k]:>12.2f} {ms[k] / ms['ours']:>14.2f}x {firsts[k]:>13.1f} "
              f"{(f / 1e9 if f else float('nan')):>11.3f}")
    print("(ours: compiled StepRunner step, batch sampling and draws included; FlowRL: fed a ready batch. FLOPs: ours "
          "by torch's FlopCounterMode on an eager step, FlowRL's one-jit program by XLA's cost analysis; the "
          "shipped form runs the same three updates)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({
            "task": task, "state_dim": S, "action_dim": A, "batch": B, "hidden": h.hidden, "machine": machine,
            "jax": jax.__version__, "torch": torch.__version__, "command": " ".join([sys.executable, "-m",
                                                                                      "dtql_fast.profiling.peer_flowrl",
                                                                                      *(argv or sys.argv[1:])]),
            "ms_median": ms, "ours_faster_by": {k: ms[k] / ms["ours"] for k in ms}, "first_call_s": firsts,
            "flops_per_step": flops, "times_ms": times}, indent=1))
        print(f"# wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
