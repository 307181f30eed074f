"""Whether a run compiles its step, and where compiled code is kept between runs.

Compiling is paid per process, about a minute a graph on a 2-core CPU cold; torch's own caches
(inductor's FX graph cache, the AOTAutograd cache) make a second run of the same step shapes
compile in seconds. They live in one folder per torch version and CPU instruction set under
~/.cache/dtql_fast (or $XDG_CACHE_HOME): a cache written under another instruction set is never
read (loading one built for AVX-512 under an AVX2 ATen gave NaN losses here), and a stale or
corrupt entry is recompiled by torch with a warning, never a failure. $TORCHINDUCTOR_CACHE_DIR,
when set, wins.

The default (neither --compile nor --no-compile): on CUDA, compiled with a CUDA graph. On a CPU
the run starts eager, times MEASURE_STEPS eager steps, and compiles for the rest only where the
time saved pays for the compile: remaining steps x eager step x (1 - COMPILED_OVER_EAGER) against
the graphs' expected compile time, warm when this cache has compiled the same step shapes before.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# Measured (python -m dtql_fast.profiling.bench --task walker2d-medium-v2 --device cpu
# --variants reference,eager,compile --threads 1, AMD EPYC): compiled 30.9 ms, eager 39.4 ms a step;
# compiling 45-66 s a graph cold, 6-8 s warm (python -m dtql_fast.train --compile, Reacher shapes).
COMPILED_OVER_EAGER = 0.8
COLD_S_PER_GRAPH = 60.0
WARM_S_PER_GRAPH = 10.0
MEASURE_STEPS = 10     # eager steps timed before deciding (after SKIP_STEPS warm-up steps)
SKIP_STEPS = 3
RECORD = "compiled_steps.json"


def cache_dir() -> Path:
    """This torch version's and CPU instruction set's compile cache."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dtql_fast" / "compile"
    return root / f"torch-{torch.__version__.replace('+', '_')}-{torch.backends.cpu.get_cpu_capability().lower()}"


def use_cache() -> Path:
    """Point inductor's caches at cache_dir() unless the user chose a folder; returns the folder."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path(torch._inductor.runtime.cache_dir_utils.cache_dir())  # torch's own default
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def cache_hits() -> int:
    """Compiled graphs loaded from the cache so far in this process."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["fxgraph_cache_hit"]


def _read_record(folder: Path) -> dict:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def compiled_before(folder: Path, signature: str) -> bool:
    return signature in _read_record(folder)


def remember(folder: Path, signature: str, seconds: float):
    """Note that this step was compiled (and how long it took), so the next run's choice counts it warm."""
    record = _read_record(folder)
    record[signature] = round(seconds, 2)
    try:
        tmp = folder / (RECORD + f".{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(folder / RECORD)
    except OSError:
        pass  # a cache we cannot write is only slower next time


@dataclass
class Choice:
    compile: bool | None   # None: not decided yet (auto on a CPU, measuring)
    why: str


def initial(requested: bool | None, device: torch.device) -> Choice:
    if requested is not None:
        return Choice(requested, "--compile" if requested else "--no-compile")
    if device.type == "cuda":
        return Choice(True, "CUDA: the compiled step replays as a CUDA graph")
    return Choice(None, f"timing {MEASURE_STEPS} eager steps to decide")


def decide(eager_step_s: float, steps_left: int, graphs: int, warm: bool) -> Choice:
    """Compile when the steps left save more time than compiling `graphs` graphs costs."""
    compile_s = graphs * (WARM_S_PER_GRAPH if warm else COLD_S_PER_GRAPH)
    saving = steps_left * eager_step_s * (1.0 - COMPILED_OVER_EAGER)
    how = (f"{steps_left} steps left at {eager_step_s * 1e3:.1f} ms eager would save ~{saving:.0f}s compiled, "
           f"against ~{compile_s:.0f}s of {'warm' if warm else 'cold'} compiling for {graphs} graph(s)")
    return Choice(saving > compile_s, how)
