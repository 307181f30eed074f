"""Whether a run compiles its step, and where compiled code is kept between runs.

Compiling is paid per process, about a minute a graph on a 2-core CPU cold; torch's own caches
(inductor's FX graph cache, the AOTAutograd cache) make a second run of the same step shapes
compile in seconds. They live in one folder per torch version and CPU instruction set under
~/.cache/dtql_fast (or $XDG_CACHE_HOME): a cache written under another instruction set is never
read (loading one built for AVX-512 under an AVX2 ATen gave NaN losses here), and a stale or
corrupt entry is recompiled by torch with a warning, never a failure. $TORCHINDUCTOR_CACHE_DIR,
when set, wins.

On a CPU the compiled step is built with inductor's C++ wrapper (`cpp_wrapper`): its ~70 kernels are
one translation unit and one gcc run rather than one each, so a cold compile takes a third less (43.7 s
against 65.5 s for the walker step, one core; profiling.wrapper_ab), the step runs the same kernels at
the same speed. TORCHINDUCTOR_CPP_WRAPPER=0 keeps the Python wrapper. Under the C++ wrapper torch 2.13
imports a corrupt cached module file instead of writing it again; that compile falls back to the Python
wrapper and removes the file (CompileOnFirstCall), so a corrupt cache still costs only time.

The default (neither --compile nor --no-compile): on CUDA, compiled with a CUDA graph. On a CPU
the run starts eager, times MEASURE_STEPS eager steps, and compiles for the rest only where the
time saved pays for the compile: remaining steps x eager step x (1 - COMPILED_OVER_EAGER) against
the graphs' expected compile time, warm when this cache has compiled the same step shapes before.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Measured (python -m dtql_fast.profiling.bench --task walker2d-medium-v2 --device cpu
# --variants reference,eager,compile --threads 1, AMD EPYC): compiled 30.9 ms, eager 39.4 ms a step.
# Compiling under the C++ wrapper, one core: 27-30 s a graph cold and 6-7 s warm at Reacher's shapes
# (python -m dtql_fast.train --compile), 43.7 s cold at walker2d's (profiling.wrapper_ab).
COMPILED_OVER_EAGER = 0.8
COLD_S_PER_GRAPH = 45.0
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


def inductor_options(device: torch.device) -> dict:
    """torch.compile options for a training step on `device`: on a CPU the C++ wrapper (see above); a
    GPU's step keeps inductor's defaults."""
    if torch.device(device).type != "cpu":
        return {}
    return {"cpp_wrapper": os.environ.get("TORCHINDUCTOR_CPP_WRAPPER", "1") != "0"}


class CompileOnFirstCall:
    """torch.compile(fn, fullgraph=True), whose first call (the compile) runs under inductor_options(device):
    a config patch rather than options=, so that tools which swap torch.compile's backend
    (profiling/launches.py, the team's gpu_offline.py) still can. If the C++ wrapper's compile fails, the
    cache files the error names are removed and fn is compiled again with the Python wrapper."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.options = fn, inductor_options(device)
        self.compiled = torch.compile(fn, fullgraph=True)
        self.called = False
        self.first_call_s = 0.0  # the first call's seconds: the compile (a run counts them as such)

    def __call__(self, *args, **kwargs):
        if self.called:
            return self.compiled(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            with torch._inductor.config.patch(self.options):
                out = self.compiled(*args, **kwargs)
        except Exception as e:
            from torch._inductor.exc import InductorError  # loaded by now; costs a second at import
            if not (isinstance(e, InductorError) and self.options.get("cpp_wrapper")):
                raise
            removed = _remove_unreadable(e)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"warning: compiling the step with inductor's C++ wrapper failed ({first[:300]}); compiling it "
                  f"with the Python wrapper instead" + (f"; removed the unreadable cache file(s) "
                                                        f"{', '.join(map(str, removed))}" if removed else ""),
                  file=sys.stderr, flush=True)
            self.options = {**self.options, "cpp_wrapper": False}
            self.compiled = torch.compile(self.fn, fullgraph=True)
            with torch._inductor.config.patch(self.options):
                out = self.compiled(*args, **kwargs)
        self.called = True
        self.first_call_s = time.perf_counter() - t0
        return out


def _remove_unreadable(error: Exception) -> list[Path]:
    """Delete the files of inductor's cache that `error` names (a module file torch could not import, which
    torch 2.13 never writes again while it exists), so the next run's C++-wrapper compile writes them afresh."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache  # honours $TORCHINDUCTOR_CACHE_DIR
    cache = Path(inductor_cache()).resolve()
    removed = []
    for name in re.findall(r"(/\S+\.py)\b", str(error)):
        path = Path(name).resolve()
        if cache in path.parents and path.is_file():
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


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


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a run reports how many it added)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]
