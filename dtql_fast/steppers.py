"""How the training loop calls a step: StepRunner (draws + one FastDTQL step, eager or compiled) and
CUDAGraphStep (a compiled step captured in a CUDA graph and replayed; CUDA only).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from . import compiling
from .draws import sample_draws
from .ranges import phase
from .transitions import Transitions
from .update import FastDTQL


class StepRunner:
    """Draws + one step, as a callable with no arguments: what the training loop calls.

    `mode`: "eager" runs FastDTQL.train_step as Python; "compile" wraps draws + step in
    torch.compile(fullgraph=True); "cudagraph" (CUDA only) additionally captures the compiled
    step in a CUDA graph after warm-up and replays it.
    """

    def __init__(self, agent: FastDTQL, data: Transitions, mode: str = "eager", pretrain: bool = False):
        h = agent.hyper
        self.agent, self.data, self.mode = agent, data, mode
        step = agent.pretrain_step if pretrain else agent.train_step

        def fn():
            with phase("sample"):
                draws = sample_draws(data.n, h.batch_size, agent.action_dim, h.noise_levels, device=agent.device,
                                     groups=len(agent.seeds))  # data.n: per-agent sizes (AgentData) or one
            return step(data, draws)

        self.compile_seconds = 0.0
        if mode == "eager":
            self._fn = fn
        elif mode in ("compile", "cudagraph"):
            self._fn = compiled = compiling.CompileOnFirstCall(fn, agent.device)
        else:
            raise ValueError(f"mode must be eager, compile or cudagraph, got {mode!r}")
        if mode == "cudagraph":
            if agent.device.type != "cuda":
                raise ValueError("cudagraph mode needs a CUDA device")
            self._fn = CUDAGraphStep(compiled)
        self._calls = 0

    def __call__(self) -> torch.Tensor:
        with phase("step"):
            return self._call()

    def _call(self) -> torch.Tensor:
        if self._calls == 0 and self.mode != "eager":
            t0 = time.perf_counter()
            out = self._fn()
            if self.agent.device.type == "cuda":
                torch.cuda.synchronize()
            self.compile_seconds = time.perf_counter() - t0
        else:
            out = self._fn()
        self._calls += 1
        return out


class CUDAGraphStep:
    """Replays a step captured in a CUDA graph. Every call is one real step: the first
    `warmup` calls run the step normally (compilation, allocator warm-up), the next one captures
    it and then replays it, since capture itself executes nothing.

    Parameters, optimiser states and the dataset are persistent tensors, so their addresses are
    static; random draws come from the default CUDA generator, whose philox offsets a captured
    graph advances on each replay (graph-safe RNG).
    """

    def __init__(self, fn: Callable[[], torch.Tensor], warmup: int = 3):
        self.fn, self.warmup, self.calls = fn, warmup, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out = None

    def __call__(self) -> torch.Tensor:
        if self.graph is None and self.calls < self.warmup:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.fn()
            torch.cuda.current_stream().wait_stream(stream)
            self.calls += 1
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.fn()
        self.graph.replay()
        self.calls += 1
        return self.out
