"""Phase names of a DTQL step, emitted as NVTX ranges and torch.profiler ranges.

The same names appear in an Nsight Systems timeline (NVTX) and in a torch.profiler trace
(record_function), so a CPU trace shows them too. Inside torch.compile the ranges are left out
(an NVTX call would break the graph); the compiled step is one "step" range seen from outside.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

try:
    import nvtx as _nvtx
except ImportError:  # nvtx is a dependency, but ranges must never stop training
    _nvtx = None

# In the order of the algorithm.
PHASES = ("step", "sample", "critic", "behaviour_cloning", "policy", "target_update", "lr_decay", "evaluate")


@contextlib.contextmanager
def _range(name: str):
    if _nvtx is not None:
        _nvtx.push_range(name, domain="dtql")
    try:
        # record_function costs ~5 us even with no profiler attached; asking first costs ~0.1 us.
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.profiler.record_function(name):
                yield
        else:
            yield
    finally:
        if _nvtx is not None:
            _nvtx.pop_range(domain="dtql")


def phase(name: str):
    """Context manager marking one phase; free of graph breaks under torch.compile."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _range(name)


def parse_window(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--profile-steps takes A:B (two step numbers), got {spec!r}") from None
    if not 0 <= a < b:
        raise ValueError(f"--profile-steps A:B needs 0 <= A < B, got {spec!r}")
    return a, b


class ProfileWindow:
    """Profile steps [A, B): cudaProfilerStart/Stop on CUDA, so that
    `nsys profile --capture-range=cudaProfilerApi` records just them; on CPU a torch.profiler
    Chrome trace of those steps, written to <out>/trace_steps_A_B.json."""

    def __init__(self, spec: str | None, device: torch.device, out: Path):
        self.window = parse_window(spec)
        self.device, self.out = torch.device(device), Path(out)
        self.prof = None
        self.active = False
        self.trace_path: Path | None = None

    def before(self, step: int):
        if self.window and step == self.window[0] and not self.active:
            self.active = True
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
            else:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()

    def after(self, step: int):
        if self.active and step == self.window[1] - 1:
            self.close()

    def close(self):
        if not self.active:
            return
        self.active = False
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        else:
            self.prof.__exit__(None, None, None)
            self.out.mkdir(parents=True, exist_ok=True)
            self.trace_path = self.out / f"trace_steps_{self.window[0]}_{self.window[1]}.json"
            self.prof.export_chrome_trace(str(self.trace_path))
