"""One prepared command that proves the GPU path on a bare CUDA machine, and records what it measured.

    python -m dtql_fast.profiling.gpu_check --out profiling/results/gpu-check      # on a CUDA machine
    python -m dtql_fast.profiling.gpu_check --device cpu --quick --out /tmp/check  # the same stages, tiny, on CPU

Stages, in order, each a subprocess with its own time budget (a stage that fails or runs out of
time is recorded and the next one runs), all under one global deadline (default 470 s on CUDA:
the check stops itself and still writes what it has):

1. environment: GPU, SMs, memory, driver, clocks, torch / triton / CUDA versions, missing packages;
2. cuda-tests: `pytest -m cuda` on tests/test_cuda.py, test_kernels.py and test_bench.py (Triton ops
   against float64 formulas, CUDA graph == compiled step over 50 steps, fresh noise per replay, a seed
   group == its single-seed runs, a checkpoint resumed on CUDA);
3. bench-walker, bench-antmaze: profiling.bench with equivalence first, batch 256 and 2048: reference,
   eager, compile, cudagraph, each with kernels torch and triton (ms per step, compile time, peak memory);
4. seed-groups: profiling.bench --seeds 1,8,64 at walker shapes (seed-steps per second, each seed
   checked against its single-seed run);
5. launches: kernels per step measured by the torch profiler over CUDA-graph replays, beside the
   compile-time count of profiling.launches for the same step;
6. trainer: `train --compile --no-eval` on a D4RL-format file written here, one short epoch, a
   checkpoint, then a resume to a second epoch;
7. summary.md and results.json in --out, the stages' raw logs and JSON under --out/logs.

Runs on the machine's own stack (torch 2.11 / triton 3.6 as well as ours) without gymnasium, MuJoCo,
Minari, Ray or nvtx: evaluation is skipped with a note where they are missing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Seconds per stage on a GPU, and the whole check's deadline: under the 8 minutes a lent GPU's
# 10-minute command limit leaves. Inductor's compiling dominates (on this project's CPU machine a
# cold compile of the step takes 45 s; the GPU machine's 16 cores compile in parallel); the stages
# reuse one another's graphs through inductor's cache (bench-walker's cudagraph is the launches
# stage's step, cuda-tests' hidden-64 graphs are test_bench's). Stages run in order of what matters.
DEADLINE_S = {"cuda": 470.0, "cpu": 600.0}
BUDGET_S = {"environment": 20, "cuda-tests": 130, "bench-walker": 90, "bench-antmaze": 70, "seed-groups": 50,
            "launches": 50, "trainer": 60}
DEADLINE_REASON = "the global deadline was reached"
QUICK_BUDGET_S = 120  # each stage of --device cpu --quick (CI)
OPTIONAL = ("gymnasium", "mujoco", "minari", "ray", "nvtx", "h5py", "triton")
CUDA_TEST_FILES = ("tests/test_cuda.py", "tests/test_kernels.py", "tests/test_bench.py")
HOPPER = (11, 3)  # state and action widths of the trainer stage's D4RL-format file
TRAINER_SPE = {False: 200, True: 20}  # steps per epoch of the trainer stage: 1 pretraining + 1 epoch, then 1 more


@dataclasses.dataclass
class StageResult:
    name: str
    status: str                 # ok, failed, timeout, skipped
    wall_s: float = 0.0
    reason: str = ""            # why it failed or was skipped
    command: str = ""
    log: str = ""               # path of its raw output, relative to --out
    data: dict = dataclasses.field(default_factory=dict)


# -- the stages' commands ------------------------------------------------------------------------------


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def bench_command(task: str, batch: int, device: str, quick: bool, json_path: Path) -> list[str]:
    if quick:
        return _py("-m", "dtql_fast.profiling.bench", "--task", task, "--device", device, "--variants",
                   "reference,eager", "--steps", "3", "--warmup", "1", "--batch-size", str(min(batch, 64)),
                   "--hidden", "32", "--rows", "2000", "--threads", "1", "--json", str(json_path))
    return _py("-m", "dtql_fast.profiling.bench", "--task", task, "--device", device, "--variants",
               "reference,eager,compile,compile-triton,cudagraph,cudagraph-triton", "--steps", "30",
               "--warmup", "4", "--batch-size", str(batch), "--memory-steps", "20", "--json", str(json_path))


def seeds_command(device: str, quick: bool, json_path: Path) -> list[str]:
    if quick:
        return _py("-m", "dtql_fast.profiling.bench", "--task", "walker2d-medium-v2", "--device", device,
                   "--seeds", "1,2", "--seeds-mode", "eager", "--steps", "2", "--warmup", "1", "--batch-size", "16",
                   "--hidden", "32", "--rows", "2000", "--threads", "1", "--json", str(json_path))
    return _py("-m", "dtql_fast.profiling.bench", "--task", "walker2d-medium-v2", "--device", device,
               "--seeds", "1,8,64", "--seeds-mode", "compile", "--steps", "20", "--warmup", "3",
               "--seeds-block", "5", "--json", str(json_path))


def write_d4rl(path: Path, state_dim: int, action_dim: int, rows: int, seed: int = 0,
               nan_at: int | None = None) -> Path:
    """A D4RL-format HDF5 file of random transitions (episodes of 100 steps ending in a timeout); with
    `nan_at`, that row's first state feature is NaN (bad data, for the tests)."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    obs = rng.standard_normal((rows, state_dim)).astype(np.float32)
    if nan_at is not None:
        obs[nan_at, 0] = np.nan
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["actions"] = rng.uniform(-1, 1, (rows, action_dim)).astype(np.float32)
        f["rewards"] = rng.standard_normal(rows).astype(np.float32)
        f["terminals"] = np.zeros(rows, bool)
        timeouts = np.zeros(rows, bool)
        timeouts[99::100] = True
        f["timeouts"] = timeouts
    return path


def trainer_commands(device: str, quick: bool, data: Path, run: Path) -> list[list[str]]:
    size = (["--steps-per-epoch", str(TRAINER_SPE[quick]), "--batch-size", "32", "--no-compile", "--threads", "1"]
            if quick else ["--steps-per-epoch", str(TRAINER_SPE[quick]), "--compile"])
    base = ["-m", "dtql_fast.train", "--task", "hopper-medium-v2", "--dataset", str(data), "--device", device,
            "--no-eval", "--pretrain-epochs", "1", "--log-every", "10", "--seed", "0"]
    return [_py(*base, "--epochs", "1", *size, "--out", str(run)),
            _py("-m", "dtql_fast.train", "--resume", str(run), "--epochs", "2")]


# -- running a stage -----------------------------------------------------------------------------------


class Clock:
    def __init__(self, deadline_s: float):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _run(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[int | None, float]:
    """(exit status or None on timeout, wall seconds); stdout and stderr appended to `log`."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"$ {shlex.join(cmd)}\n".encode())
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            rc = None
    return rc, time.monotonic() - t0


def _tail(log: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-400:]


def run_commands(name: str, cmds: list[list[str]], out: Path, budget: float, clock: Clock, env: dict,
                 json_path: Path | None = None) -> StageResult:
    log = out / "logs" / f"{name}.log"
    res = StageResult(name, "ok", command=" && ".join(shlex.join(c) for c in cmds), log=str(log.relative_to(out)))
    t_end = time.monotonic() + min(budget, clock.left())
    for cmd in cmds:
        rc, wall = _run(cmd, log, t_end - time.monotonic(), env)
        res.wall_s += wall
        if rc is None:
            res.status, res.reason = "timeout", f"stopped after {res.wall_s:.0f} s (budget {budget:.0f} s)"
            break
        if rc != 0:
            res.status, res.reason = "failed", f"exit {rc}: {_tail(log)}"
            break
    if json_path is not None and json_path.exists():
        res.data = json.loads(json_path.read_text())
    res.wall_s = round(res.wall_s, 1)
    return res


# -- in-process stages ---------------------------------------------------------------------------------


def environment(device: str) -> dict:
    import torch

    from dtql_fast.optional import have
    from dtql_fast.runlog import hardware

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu": hardware(torch.device("cpu")), "cores": os.cpu_count(),
            "missing_packages": [m for m in OPTIONAL if not have(m)]}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}")
        if shutil.which("nvidia-smi"):
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                                "power.limit", "--format=csv,noheader"], capture_output=True, text=True)
            info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    return info


def measured_launches(out_json: Path, steps: int = 5) -> dict:
    """CUDA kernels per step under CUDA-graph replays, counted by the torch profiler, for the walker
    step (batch 256) with kernels torch and triton."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dtql_fast.profiling.variants import SHAPES, Variant, make_draws, synthetic_transitions
    from dtql_fast.reference import ReferenceDTQL
    from dtql_fast.tasks import TASKS

    device = torch.device("cuda")
    hyper = TASKS["walker2d-medium-v2"].hyper
    S, A = SHAPES["walker2d"]
    data = synthetic_transitions(S, A, 10_000, 0, device, hyper.max_action)
    draws = make_draws(data.n, hyper, A, 8, 1, device)
    torch.manual_seed(0)
    init = ReferenceDTQL(S, A, hyper, device)
    counts = {}
    for name in ("cudagraph", "cudagraph-triton"):
        torch._dynamo.reset()
        v = Variant(name, init, data, hyper, draws, device)
        for d in draws[:4]:  # three warm-up steps, then the capture
            v.step(d)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for d in draws[4:4 + steps]:
                v.step(d)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
        counts[name] = {"kernels_per_step": len(kernels) / steps, "steps": steps}
    out_json.write_text(json.dumps(counts, indent=1))
    return counts


# -- the check -----------------------------------------------------------------------------------------


def run_check(out: Path, device: str, quick: bool, deadline_s: float | None = None) -> list[StageResult]:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    clock = Clock(deadline_s if deadline_s is not None else DEADLINE_S[device])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cuda = device == "cuda" and torch.cuda.is_available()
    budget = (lambda name: QUICK_BUDGET_S) if quick else (lambda name: BUDGET_S[name])
    results: list[StageResult] = []
    logs = out / "logs"

    def stage(name: str, fn):
        if clock.left() < 10:
            results.append(StageResult(name, "skipped", reason=DEADLINE_REASON))
        else:
            results.append(fn())
        _write(out, results, device, quick, clock)

    t0 = time.monotonic()
    stage("environment", lambda: StageResult("environment", "ok", round(time.monotonic() - t0, 1),
                                             data=environment(device)))

    def cuda_tests():
        if not cuda:
            return StageResult("cuda-tests", "skipped", reason="no CUDA")
        xml = logs / "cuda-tests.xml"
        cmd = _py("-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}",
                  *CUDA_TEST_FILES)
        res = run_commands("cuda-tests", [cmd], out, budget("cuda-tests"), clock, env)
        res.data = _junit_counts(xml)
        return res
    stage("cuda-tests", cuda_tests)

    for name, task, batch in (("bench-walker", "walker2d-medium-v2", 256), ("bench-antmaze", "antmaze-umaze-v0", 2048)):
        j = logs / f"{name}.json"
        stage(name, lambda name=name, task=task, batch=batch, j=j: run_commands(
            name, [bench_command(task, batch, device, quick, j)], out, budget(name), clock, env, j))

    j = logs / "seed-groups.json"
    stage("seed-groups", lambda: run_commands("seed-groups", [seeds_command(device, quick, j)], out,
                                              budget("seed-groups"), clock, env, j))

    def launches():
        if not cuda:
            return StageResult("launches", "skipped", reason="no CUDA (the compile-time count runs without a GPU: "
                               "python -m dtql_fast.profiling.launches)")
        measured, counted = logs / "launches-measured.json", logs / "launches-compiled.json"
        cmds = [_py("-m", "dtql_fast.profiling.gpu_check", "--measure-launches", str(measured)),
                _py("-m", "dtql_fast.profiling.launches", "--task", "walker2d-medium-v2", "--kernels", "torch,triton",
                    "--json", str(counted))]
        res = run_commands("launches", cmds, out, budget("launches"), clock, env)
        for key, path in (("measured", measured), ("compile_time", counted)):
            if path.exists():
                res.data[key] = json.loads(path.read_text())
        return res
    stage("launches", launches)

    def trainer():
        data = write_d4rl(out / "trainer" / "hopper-random.hdf5", *HOPPER, rows=20_000 if not quick else 2_000)
        run = out / "trainer" / "run"
        if run.exists():
            shutil.rmtree(run)  # this check's own earlier run, never a user's
        res = run_commands("trainer", trainer_commands(device, quick, data, run), out, budget("trainer"), clock, env)
        summary = run / "summary.json"
        if summary.exists():
            res.data = json.loads(summary.read_text())
        res.data["note"] = "evaluation skipped (--no-eval): the data is random, and the check must run without MuJoCo"
        if res.status == "ok" and res.data.get("steps") != 3 * TRAINER_SPE[quick]:
            res.status, res.reason = "failed", f"the resumed run ended at step {res.data.get('steps')}"
        return res
    stage("trainer", trainer)
    _write(out, results, device, quick, clock, final=True)
    return results


def _junit_counts(xml: Path) -> dict:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):  # a run that died before writing it, or mid-write
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    failed = [c.get("classname", "") + "::" + c.get("name", "") for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"failed_tests": failed}


def summary_markdown(results: list[StageResult], device: str, quick: bool, elapsed: float) -> str:
    env = next((r.data for r in results if r.name == "environment"), {})
    head = env.get("gpu") or env.get("cpu", "?")
    lines = [f"# GPU check: {head}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, Python {env.get('python')}; "
             f"device {device}{' (--quick)' if quick else ''}; {elapsed:.0f} s in all. Missing packages: "
             f"{', '.join(env.get('missing_packages', [])) or 'none'}.", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.wall_s:.1f} | {r.reason.replace('|', '/')} |")
    for r in results:
        if r.name.startswith("bench-") and r.data.get("variants"):
            lines += ["", f"## {r.name}: {r.data['meta']['task']}, batch {r.data['meta']['batch_size']}", "",
                      "| variant | status | median ms/step | steps/s | speedup vs reference | compile s | peak memory MiB |",
                      "|---|---|---|---|---|---|---|"]
            for name, v in r.data["variants"].items():
                t = v.get("timing") or {}
                mem = v.get("peak_mem_bytes") or v.get("max_rss_bytes")
                lines.append(f"| {name} | {v['status']} | {_f(t.get('median_ms'), 3)} | {_f(t.get('steps_per_s'), 0)} | "
                             f"{_f(t.get('speedup'), 2)} | {_f(v.get('compile_s'), 1)} | "
                             f"{_f(mem / 2**20 if mem else None, 0)} |")
        if r.name == "seed-groups" and r.data.get("groups"):
            lines += ["", "## seed groups (walker shapes)", "", "| seeds | ms per group step | seed-steps/s | "
                      "seed-step / single step | equivalence |", "|---|---|---|---|---|"]
            for g in r.data["groups"]:
                lines.append(f"| {len(g['seeds'])} | {_f(g['group_ms'], 3)} | {_f(1e3 / g['seed_step_ms'], 0)} | "
                             f"{_f(g['seed_step_over_single_step'], 2)} | {'PASS' if g['passed'] else 'FAIL'} |")
        if r.name == "launches" and r.data:
            lines += ["", "## launches per step (walker, batch 256)", "", "```", json.dumps(r.data, indent=1), "```"]
        if r.name == "cuda-tests" and r.data:
            lines += ["", f"## CUDA tests: {r.data.get('tests')} run, {r.data.get('failures')} failed, "
                      f"{r.data.get('errors')} errors, {r.data.get('skipped')} skipped"]
            lines += [f"- failed: `{t}`" for t in r.data.get("failed_tests", [])]
    return "\n".join(lines) + "\n"


def _f(x, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _write(out: Path, results: list[StageResult], device: str, quick: bool, clock: Clock, final: bool = False):
    elapsed = time.monotonic() - clock.t0
    doc = {"device": device, "quick": quick, "elapsed_s": round(elapsed, 1), "complete": final,
           "command": shlex.join([sys.executable, "-m", "dtql_fast.profiling.gpu_check", *sys.argv[1:]]),
           "stages": [dataclasses.asdict(r) for r in results]}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "summary.md").write_text(summary_markdown(results, device, quick, elapsed))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dtql_fast.profiling.gpu_check",
                                description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0 when every stage passed or was skipped for want of CUDA; 1 when one failed, ran out "
                                       "of time, or was not reached before the deadline.")
    p.add_argument("--out", default="gpu-check", help="where summary.md, results.json and logs/ go")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is one")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI, on CPU): the same stages, not a measurement")
    p.add_argument("--deadline", type=float, default=None, metavar="S",
                   help=f"seconds for the whole check (default {DEADLINE_S['cuda']:.0f} on cuda)")
    p.add_argument("--measure-launches", metavar="JSON", help=argparse.SUPPRESS)  # the launches stage's own step
    a = p.parse_args(argv)
    if a.measure_launches:
        print(json.dumps(measured_launches(Path(a.measure_launches)), indent=1))
        return 0
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (torch.version.cuda is "
                f"{torch.version.cuda}); use --device cpu --quick to try the stages on CPU")
    out = Path(a.out)
    results = run_check(out, device, a.quick, a.deadline)
    print((out / "summary.md").read_text())
    bad = [r.name for r in results if r.status in ("failed", "timeout") or r.reason == DEADLINE_REASON]
    print(f"written: {out}/summary.md, results.json, logs/" + (f"; not passed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
