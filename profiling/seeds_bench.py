"""Many seeds in one step against one step per seed, side by side in one run (bench --seeds).

For each group size N: a FastDTQL of N seeds and N single-agent FastDTQLs (groups of one) starting
from the same weights (seed i's) are fed the same per-seed draws; with `mixed` the agents also differ
in every per-agent setting and alternate between two datasets, each single run with its agent's. The steps run in alternating blocks
(`block` consecutive group steps, then the same steps of each single-seed agent in turn), each
step synced and timed, so both sides see the same machine and each agent's step runs as it does
in training, after its own previous step. Reported: ms per
group step, ms per seed-step (group step / N), ms per single-seed step, and their ratio. Before
any timing counts, each seed of the group is checked against its single-seed run with the
bench's equivalence rule (profiling.equivalence.compare, fixed bounds: the two differ only by a
batched matmul's summation order).
"""
from __future__ import annotations

import statistics
import time

import torch

from dtql_fast.draws import Draws
from dtql_fast.profiling.launches import mixed_datasets, mixed_group
from dtql_fast.transitions import AgentData
from dtql_fast.profiling.equivalence import compare
from dtql_fast.profiling.variants import _sync, make_draws, metric_keys
from dtql_fast.update import METRICS, FastDTQL


def _params(agent: FastDTQL, i: int = 0) -> dict[str, torch.Tensor]:
    mods = agent.modules(i)
    return {f"{m}.{k}": p.detach().to("cpu", copy=True) for m, mod in mods.items() for k, p in mod.named_parameters()}


def run_group(n: int, S: int, A: int, hyper, data, device, steps: int, warmup: int, compiled: bool,
              seed: int, block: int = 10, mixed: bool = False) -> dict:
    """`mixed`: the agents differ in every per-agent setting (profiling.launches.mixed_group) and alternate
    between `data` and its first half (transitions.AgentData); each single runs its own settings and data."""
    seeds = list(range(seed, seed + n))
    hypers = mixed_group(hyper, n) if mixed else [hyper] * n
    datasets, of_agent = mixed_datasets(data, n) if mixed else ([data], [0] * n)
    group_data = AgentData(datasets, of_agent)
    group = FastDTQL(S, A, hyper, device, seeds=seeds, hypers=hypers)
    singles = [FastDTQL(S, A, h, device, seeds=[s]) for h, s in zip(hypers, seeds)]  # each agent's own run
    torch._dynamo.reset()
    wrap = (lambda f: torch.compile(f, fullgraph=True)) if compiled else (lambda f: f)
    group_step = wrap(group.train_step)
    single_steps = [wrap(a.train_step) for a in singles]
    total = warmup + steps
    per_seed = [make_draws(datasets[k].n, hyper, A, total, 1000 * s + 1, device) for s, k in zip(seeds, of_agent)]
    keep = [METRICS.index(k) for k in metric_keys(hyper)]
    t_group, t_single = [0.0] * total, [0.0] * total
    m_group, m_single = [None] * total, [[None] * total for _ in seeds]

    def timed(step, data, draws):
        t0 = time.perf_counter()
        out = step(data, draws)
        _sync(device)
        return out, (time.perf_counter() - t0) * 1e3

    # Blocks of `block` consecutive steps: the group's, then each single-seed agent's in turn.
    # Alternating blocks show both sides the same machine; consecutive steps of one agent give
    # each the warm caches it has in a real run (every step interleaved, block=1, makes each
    # agent's step evict the others' weights and Adam moments from the caches).
    for b in range(0, total, block):
        rows = range(b, min(b + block, total))
        for i in rows:
            m_group[i], t_group[i] = timed(group_step, group_data, Draws.stack([d[i] for d in per_seed]))
        for j, step in enumerate(single_steps):
            for i in rows:
                m_single[j][i], t = timed(step, datasets[of_agent[j]], per_seed[j][i].as_group())
                t_single[i] += t
    first = {"group_s": t_group[0] / 1e3, "singles_s": t_single[0] / 1e3}
    t_group, t_single = t_group[warmup:], t_single[warmup:]
    hist_group = [[[m_group[i][j, k].item() for k in keep] for i in range(total)] for j in range(n)]
    hist_single = [[[m_single[j][i][0, k].item() for k in keep] for i in range(total)] for j in range(n)]
    lrs = lambda h: {"diffusion": h.lr, "policy": h.lr, "critic": h.critic_lr, "critic_target": h.critic_lr}  # noqa: E731
    checks = [compare({"hist": hist_single[j], "params": _params(singles[j])},
                      {"hist": hist_group[j], "params": _params(group, j)}, None, metric_keys(hyper), lrs(hypers[j]))
              for j in range(n)]
    group_ms, singles_ms = statistics.median(t_group), statistics.median(t_single)
    return {"seeds": seeds, "compiled": compiled, "mixed": mixed, "block": block, "first_call": first,
            "group_ms": group_ms, "seed_step_ms": group_ms / n,
            "singles_ms": singles_ms, "single_step_ms": singles_ms / n,
            "seed_step_over_single_step": (group_ms / n) / (singles_ms / n),
            "times_group_ms": t_group, "times_singles_ms": t_single,
            "passed": all(c["passed"] for c in checks),
            "failures": [f"seed {seeds[j]}: {msg}" for j, c in enumerate(checks) for msg in c["failures"]],
            "worst_over_tol": max(max(c["summary"]["metric_worst_over_tol"], c["summary"]["param_worst_over_tol"])
                                  for c in checks)}


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'seeds':>5} {'group ms':>9} {'ms/seed-step':>12} {'N singles ms':>12} {'ms/single step':>14} "
             f"{'ratio':>6} {'worst/tol':>9}  equivalence"]
    for r in rows:
        lines.append(f"{len(r['seeds']):>5} {r['group_ms']:>9.2f} {r['seed_step_ms']:>12.2f} {r['singles_ms']:>12.2f} "
                     f"{r['single_step_ms']:>14.2f} {r['seed_step_over_single_step']:>6.3f} {r['worst_over_tol']:>9.3f}  "
                     f"{'PASS' if r['passed'] else 'FAIL'}")
        for msg in r["failures"][:4]:
            lines.append(f"    {msg}")
    lines.append("ratio: ms per seed-step in the group / ms per single-seed step (medians of the timed steps, "
                 "in alternating blocks of consecutive steps); equivalence: each seed against its single-seed run, the bench's "
                 "fixed bounds (profiling.equivalence)")
    return "\n".join(lines)
