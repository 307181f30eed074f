"""One implementation of the training step (a bench variant) and how one run of it is measured:
the same weights and draws for every variant, timings, launches, FLOPs and memory, and the
round-off floor (the reference with one-ulp kicks) that equivalence is judged against.
"""
from __future__ import annotations

import os
import resource
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dtql_fast.draws import Draws, sample_draws
from dtql_fast.ranges import ProfileWindow, phase
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.tasks import TASKS, WIDTHS, Hyper
from dtql_fast.transitions import Transitions
from dtql_fast.steppers import CUDAGraphStep
from dtql_fast.update import METRICS, FastDTQL
from dtql_fast.profiling.equivalence import FLOOR_ULP

VARIANTS = ("reference", "eager", "compile", "compile-triton", "cudagraph", "cudagraph-triton")
CUDA_ONLY = ("cudagraph", "cudagraph-triton")
DEFAULT_VARIANTS = "reference,eager,compile"

# (state dim, action dim) of each environment family: the synthetic data's shapes.
SHAPES = WIDTHS  # (state, action) per environment family
# A bare family name picks one task of the table (its hyperparameters).
SHORT_NAMES = {"walker2d": "walker2d-medium-v2", "hopper": "hopper-medium-v2",
               "halfcheetah": "halfcheetah-medium-v2", "antmaze": "antmaze-umaze-v0",
               "pen": "pen-human-v1", "kitchen": "kitchen-mixed-v0"}
SYNTHETIC_ROWS = 100_000

# --perturb: after the variant's first step, add this to one weight (Q1's first Linear, [0, 0]).
PERTURB_PARAM = ("critic", "q1.0.weight", (0, 0))
PERTURB_DELTA = 1e-3

# Ops that make the host wait for the device (a read-back or a data-dependent shape).
HOST_SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero",
                 "aten.masked_select", "aten.equal", "aten.allclose", "aten.unique", "aten._unique2",
                 "aten.repeat_interleave"}

# -- setup --------------------------------------------------------------------------------------

def resolve_task(name: str) -> str:
    name = SHORT_NAMES.get(name, name)
    if name not in TASKS:
        raise SystemExit(f"bench: unknown --task {name!r}; one of {', '.join(sorted(SHORT_NAMES))} "
                         f"or a task of the table: {', '.join(sorted(TASKS))}")
    return name


def synthetic_transitions(state_dim: int, action_dim: int, rows: int, seed: int, device,
                          max_action: float = 1.0) -> Transitions:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(rows, state_dim, generator=g)
    actions = (torch.rand(rows, action_dim, generator=g) * 2 - 1) * max_action
    rewards = torch.randn(rows, 1, generator=g)
    next_obs = torch.randn(rows, state_dim, generator=g)
    not_done = (torch.rand(rows, 1, generator=g) > 0.01).float()
    return Transitions(*(t.to(device) for t in (obs, actions, rewards, next_obs, not_done)))


def make_draws(n_rows: int, hyper: Hyper, action_dim: int, count: int, seed: int, device) -> list[Draws]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [sample_draws(n_rows, hyper.batch_size, action_dim, hyper.noise_levels, generator=g, device=device)
            for _ in range(count)]


def metric_keys(hyper: Hyper) -> list[str]:
    return [k for k in METRICS if k != "loss_ent" or hyper.gamma != 0]


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


# -- one variant --------------------------------------------------------------------------------

class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched below autograd (each one a kernel launch on CUDA, except views)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        if func.is_view or func.overloadpacket in (torch.ops.aten.view, torch.ops.aten._unsafe_view):
            self.views += 1
        return func(*args, **(kwargs or {}))


def _profiled_launches(fn, device: torch.device) -> dict:
    """Kernels launched by one call of a compiled step, from torch.profiler events.

    CUDA: the device-side kernel/memcpy/memset events. CPU: the inductor C++ kernels (made visible
    with inductor's cpp.enable_kernel_profile) plus the aten ops called from outside any other aten
    op (extern kernels such as mm/addmm, and whatever runs outside the graph, guards included).
    """
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        _sync(device)
    events = prof.events()
    out = {"host_syncs": sum(1 for e in events if e.name in ("aten::_local_scalar_dense",))}
    if device.type == "cuda":
        n = sum(1 for e in prof.profiler.kineto_results.events()
                if e.device_type() == torch.autograd.DeviceType.CUDA)
        out.update(launches=n, counted="CUDA kernel, memcpy and memset events (torch.profiler/CUPTI)")
        return out
    kernels = sum(1 for e in events if "cpp_fused" in e.name or "triton_" in e.name)
    aten = sum(1 for e in events if e.name.startswith("aten::")
               and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
    out.update(launches=kernels + aten, kernels=kernels, aten_ops=aten,
               counted="inductor C++ kernel calls + top-level aten ops (extern mm/addmm, guards), "
                       "torch.profiler events")
    return out


def _dispatched_ops(fn) -> dict:
    with _OpCounter() as rec:
        fn()
    total = sum(rec.ops.values())
    return {"launches": total - rec.views, "aten_ops": total, "views": rec.views,
            "host_syncs": sum(v for k, v in rec.ops.items() if k in HOST_SYNC_OPS),
            "counted": "aten ops dispatched below autograd (TorchDispatchMode), views excluded"}


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _perturb(agent):
    module, name, index = PERTURB_PARAM
    mods = agent.modules()  # the reference's own modules; FastDTQL's are copies in that layout
    with torch.no_grad():
        dict(mods[module].named_parameters())[name][index] += PERTURB_DELTA
    if isinstance(agent, FastDTQL):
        agent.load_modules(mods)


class Variant:
    """One implementation of the step, bound to its own copy of the starting weights."""

    def __init__(self, name: str, init: ReferenceDTQL, data: Transitions, hyper: Hyper, draws: list[Draws],
                 device: torch.device):
        self.name, self.data, self.device = name, data, device
        S, A = init.state_dim, init.action_dim
        self.compiled = name not in ("reference", "eager")
        keys = metric_keys(hyper)
        if name == "reference":
            agent = ReferenceDTQL(S, A, hyper, device)
            for k, m in agent.modules().items():
                m.load_state_dict(init.modules()[k].state_dict())
            self.agent = agent
            self._step = self.eager_step = lambda d: agent.train_step(data, d)
            # Metrics are read back after the step's timing, in the order of `keys`.
            self.metrics_list = lambda out: [out[k].item() for k in keys]
            return
        agent = self.agent = FastDTQL(S, A, hyper, device)  # a group of one: the draws get its agent dimension
        agent.load_weights_from(init)
        agent.set_kernels("triton" if name.endswith("triton") else "torch")
        keep = [METRICS.index(k) for k in keys]
        self.metrics_list = lambda out: [out[0].detach().double().cpu().tolist()[j] for j in keep]
        self.eager_step = lambda d: agent.train_step(data, d.as_group())
        if name == "eager":
            self._step = self.eager_step
            return
        # CPU: make inductor's C++ kernels emit profiler events so launches can be counted
        # (a RECORD_FUNCTION per kernel call; nothing is recorded while no profiler runs).
        opts = {"cpp.enable_kernel_profile": True} if device.type == "cpu" else {}
        compiled = torch.compile(agent.train_step, fullgraph=True, options=opts)
        if name.startswith("compile"):
            self._step = lambda d: compiled(data, d.as_group())
            return
        if device.type != "cuda":
            raise ValueError(f"{name} needs a CUDA device")
        # CUDA graph: the draws of every step live in stacked device buffers; the captured closure
        # copies draw number (k mod T) into static buffers, so a replay reads the right draws
        # without any host work, and advances k on the device.
        stacked = [torch.stack(ts) for ts in zip(*(d.tensors() for d in draws))]
        static = Draws(*(s[0].clone() for s in stacked))
        k = torch.zeros((), dtype=torch.long, device=device)
        T = len(draws)

        def closure():
            i = torch.remainder(k, T).reshape(1)
            for buf, src in zip(static.tensors(), stacked):
                buf.copy_(src.index_select(0, i)[0])
            k.add_(1)
            return compiled(data, static.as_group())

        graph = CUDAGraphStep(closure, warmup=3)
        self._k, self._draws = k, draws
        self._step = lambda d: graph()  # the closure reads the same draw from its buffers

    def step(self, draws: Draws) -> torch.Tensor:
        with phase("step"):
            return self._step(draws)

    def perturb(self):
        _perturb(self.agent)

    def params(self) -> dict[str, torch.Tensor]:
        return {f"{m}.{k}": p.detach().to("cpu", copy=True)
                for m, mod in self.agent.modules().items() for k, p in mod.named_parameters()}

    def launches(self, draws: Draws) -> dict:
        if self.compiled:
            return _profiled_launches(lambda: self.step(draws), self.device)
        return _dispatched_ops(lambda: self.eager_step(draws))

    def flops(self, draws: Draws) -> int:
        # Compiled variants: one eager step of the same agent (the same math, uncompiled).
        return _flops(lambda: self.eager_step(draws))


def run_variant(v: Variant, draws: list[Draws], warmup: int, perturb: bool, window: ProfileWindow | None,
                memory_steps: int = 0) -> dict:
    dev = v.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    hits0 = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]
    hist, times, first_call = [], [], None
    profiled = []
    for i, d in enumerate(draws):
        if window is not None:
            window.before(i)
        in_window = window is not None and window.active
        t0 = time.perf_counter()
        out = v.step(d)
        _sync(dev)
        dt = time.perf_counter() - t0
        if window is not None:
            window.after(i)
        hist.append(v.metrics_list(out))
        if i == 0:
            first_call = dt
            if perturb:
                v.perturb()
        if i >= warmup:
            (profiled if in_window else times).append(dt)
    res = {"hist": hist, "params": v.params(), "times_s": times, "first_call_s": first_call,
           "profiled_steps_excluded": len(profiled),
           "fxgraph_cache_hits": torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"] - hits0}
    if dev.type == "cuda":
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated(dev)
    else:
        res["max_rss_bytes"] = max_rss()
    # Work counts: extra steps after the final weights were recorded, so they change nothing checked.
    res["launches"] = v.launches(draws[0])
    res["flops"] = v.flops(draws[0])
    if memory_steps:
        res["memory"] = memory_growth(v, draws, memory_steps)
    return res


def round_off_floor(init: ReferenceDTQL, data: Transitions, hyper: Hyper, draws: list[Draws],
                    device: torch.device, seed: int) -> dict:
    """The reference again on the same draws, every weight kicked by one ulp (times 1 +- 2**-23,
    seeded random signs) after each step: how far round-off alone moves the metrics and weights
    over this many steps (see TOLERANCES)."""
    v = Variant("reference", init, data, hyper, draws, device)
    params = [p for m in v.agent.modules().values() for p in m.parameters()]
    g = torch.Generator(device=device).manual_seed(seed)
    hist = []
    for d in draws:
        hist.append(v.metrics_list(v.eager_step(d)))
        with torch.no_grad():
            for p in params:
                sign = torch.randint(0, 2, p.shape, generator=g, device=device, dtype=p.dtype) * 2 - 1
                p.mul_(1.0 + sign * FLOOR_ULP)
    return {"hist": hist, "params": v.params()}


def memory_growth(v: Variant, draws: list[Draws], n: int) -> dict:
    """Runs n more steps; memory at step 0 and step n (CUDA: allocated and peak; CPU: RSS)."""
    dev = v.device
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = {"allocated_bytes": torch.cuda.memory_allocated(dev),
                  "max_allocated_bytes": torch.cuda.max_memory_allocated(dev)}
    else:
        before = {"rss_bytes": current_rss(), "max_rss_bytes": max_rss()}
    samples = []
    for i in range(n):
        v.step(draws[i % len(draws)])
        if dev.type != "cuda" and (i + 1) % max(1, n // 4) == 0:
            samples.append(current_rss())
    _sync(dev)
    if dev.type == "cuda":
        after = {"allocated_bytes": torch.cuda.memory_allocated(dev),
                 "max_allocated_bytes": torch.cuda.max_memory_allocated(dev)}
        key = "max_allocated_bytes"
    else:
        after = {"rss_bytes": current_rss(), "max_rss_bytes": max_rss()}
        key = "rss_bytes"
    return {"variant": v.name, "steps": n, "step_0": before, f"step_{n}": after,
            "growth_bytes": after[key] - before[key], "measure": key, "rss_samples_bytes": samples}


