"""The measured tables of the docs, rendered from the JSON in profiling/results/, never typed.

    python -m dtql_fast.profiling.tables            # rewrite every table between its markers
    python -m dtql_fast.profiling.tables --check    # exit 1, naming each table the page holds otherwise

A page holds a table as

    <!-- table: NAME -->
    ...
    <!-- /table -->

and everything between the two markers is this module's render of TABLES[NAME]: the table, then each
file it was read from with its machine, date and command. Where a file does not record its date (or
its command, or its CPU), its Source gives them, taken from `git log -1 -- FILE` (the day of the commit
that last wrote it) and from the text that stood beside the table when it was typed;
profiling/results/README.md indexes every file the same way. Standard library only: it reads JSON and
text, and measures nothing.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "profiling" / "results"
# A marker may be indented (a table inside a list item): the render takes the opening marker's indent.
BLOCK = re.compile(r"^(?P<indent>[ \t]*)(?P<open><!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)"
                   r"^(?P=indent)(?P<close><!-- /table -->)", re.S | re.M)


class TableError(ValueError):
    """A page, a table or a results file that cannot be rendered; its message says which and what to do."""


@dataclass(frozen=True)
class Source:
    """One results file a table reads; date, command and cpu only where the file does not record them."""
    path: str
    date: str | None = None
    command: str | None = None
    cpu: str | None = None
    text: bool = False          # raw text output, not JSON


@dataclass(frozen=True)
class Table:
    sources: tuple[Source, ...]
    render: Callable[[list], str]   # the loaded sources, in order -> Markdown table lines


# ---------------------------------------------------------------- formatting

def ms(x: float) -> str:
    return f"{x:.1f} ms"


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def sci(x: float) -> str:
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def short_command(command: str) -> str:
    """The recorded argv with its interpreter's path dropped: `python -m ...`."""
    return re.sub(r"^\S*python[\d.]*(?=\s)", "python", command.strip())


# ---------------------------------------------------------------- what each kind of file records

def meta_of(data, source: Source) -> dict:
    """cpu, date and command of a results file: recorded in it where it records them, else its Source's."""
    if not isinstance(data, dict):
        data = {}
    machine = (data.get("meta") or {}).get("machine") or data.get("machine") or {}
    cpu = source.cpu or machine.get("cpu") or data.get("cpu")
    threads = machine.get("torch_threads", data.get("threads", (data.get("rows") or [{}])[0].get("threads")))
    if cpu and threads and not source.cpu:
        cpu = f"{cpu}, {threads} torch thread{'s' if threads != 1 else ''}"
    stamp = (data.get("meta") or {}).get("timestamp") or data.get("timestamp")
    date = source.date or (stamp[:10] if stamp else None)
    command = source.command or (data.get("meta") or {}).get("command") or data.get("command")
    missing = [k for k, v in (("cpu", cpu), ("date", date), ("command", command)) if not v]
    if missing:
        raise TableError(f"{source.path} records no {', '.join(missing)}: give it in the table's Source")
    return {"cpu": cpu, "date": date, "command": short_command(command)}


def footer(loaded: list, sources: tuple[Source, ...]) -> str:
    lines = ["Rendered by `python -m dtql_fast.profiling.tables` from:", ""]
    for data, source in zip(loaded, sources):
        m = meta_of(data, source)
        lines.append(f"- `profiling/results/{source.path}`: {m['cpu']}, {m['date']}; `{m['command']}`")
    return "\n".join(lines)


# ---------------------------------------------------------------- the tables

def shapes(meta: dict, dims: bool = True) -> str:
    """A bench run's task and timed steps: `walker2d (17/6, batch 256), --steps 30`."""
    name = meta["task"].split("-")[0]
    inner = [f"{meta['state_dim']}/{meta['action_dim']}", f"batch {meta['batch_size']}"] if dims else []
    if dims and meta["hyper"]["gamma"]:
        inner.append(f"gamma {meta['hyper']['gamma']:g}")
    label = f"{name} ({', '.join(inner)})" if inner else name
    return f"{label}, `--steps {meta['steps']}`"


def step_ms(variant: dict) -> str:
    """Median per step; the fastest step beside it where the steps spread by more than a fifth."""
    t = variant["timing"]
    spread = t["median_ms"] > 1.2 * t["min_ms"]
    return ms(t["median_ms"]) + (f" (min {t['min_ms']:.1f})" if spread else "")


def render_step_compiled(loaded: list) -> str:
    rows = []
    for d in loaded:
        v = d["variants"]
        rows.append([shapes(d["meta"]), step_ms(v["reference"]), step_ms(v["eager"]), step_ms(v["compile"]),
                     ratio(v["compile"]["timing"]["speedup"]), f"{v['compile']['compile_s']:.0f} s"])
    return table(["shapes", "reference", "fast eager", "fast compiled", "compiled vs reference",
                  "compile time"], rows)


def render_step_eager(loaded: list) -> str:
    rows = []
    for d in loaded:
        v = d["variants"]
        eager = step_ms(v["eager"])
        if "compile" in v:
            eager += f" (compiled: {ms(v['compile']['timing']['median_ms'])})"
        rows.append([shapes(d["meta"], dims=False), str(d["meta"]["machine"]["torch_threads"]),
                     step_ms(v["reference"]), eager, ratio(v["eager"]["timing"]["speedup"])])
    return table(["shapes", "threads", "reference", "fast eager", "eager vs reference"], rows)


def render_seed_groups(loaded: list) -> str:
    """One row per group size, each run's number beside the other's (first / second)."""
    runs = [{len(g["seeds"]): g for g in d["groups"]} for d in loaded]
    rows = []
    for n in sorted(runs[0]):
        def both(key, fmt="{:.1f}"):
            return " / ".join(fmt.format(run[n][key]) for run in runs)
        rows.append([str(n), both("group_ms"), both("seed_step_ms"), both("single_step_ms"),
                     both("seed_step_over_single_step", "{:.3f}")])
    return table(["seeds in the step", "ms per group step", "ms per seed-step", "ms per single-seed step",
                  "ratio"], rows)


BREAKDOWN_LABELS = {"walker-1thread.json": "Python (the breakdown's)",
                    "walker-1thread-cpp-wrapper.json": "`TORCHINDUCTOR_CPP_WRAPPER=1`"}


def render_breakdown(loaded: list) -> str:
    rows = []
    for d, label in zip(loaded, BREAKDOWN_LABELS.values()):
        r = d["rows"][0]
        split, whole = r["split_ms"], r["profiled_ms_per_step"]

        def part(key):
            return f"{split[key]:.2f} ({100 * split[key] / whole:.0f}%)"
        rows.append([label, f"{r['step_ms_median']:.2f} ms",
                     part("matmul") if split["matmul"] else "(not named)", part("optimizer"),
                     part("elementwise"), part("wrapper"), part("guards"), f"{split['other']:.2f}",
                     f"{r['matmul_at_ceiling_ms']:.2f} ms ({r['matmul_gflop_per_step']:.2f} GFLOP at "
                     f"{r['matmul_ceiling_gflops']:.0f} GFLOP/s)", ratio(r["step_over_matmul_at_ceiling"])])
    return table(["wrapper", "step", "matmul", "optimizers", "other kernels", "wrapper", "guards", "rest",
                  "matmul at the GEMM ceiling", "step / that"], rows)


def render_wrapper_ab(loaded: list) -> str:
    sides = loaded[0]["sides"]
    rows = []
    for key, label in (("python", "Python"), ("cpp", "C++ (`cpp_wrapper`)")):
        s, c = sides[key], sides[key]["compile_s"]
        rows.append([label, f"{s['first_call_s']:.1f} s", f"{c['tracing']:.1f}", f"{c['aot_and_inductor']:.1f}",
                     f"{c['codegen']:.1f}", f"{c['cpp_build']:.1f}", f"{s['step_ms_median']:.2f}"])
    return table(["wrapper", "first call (cold)", "dynamo tracing", "AOTAutograd + inductor",
                  "of which code generation", "of which C++ builds", "step ms"], rows)


def render_cold_train(loaded: list) -> str:
    """cold_train.out: `cpp_wrapper=W run I: compiled the pretraining step in Xs;compiled the training ...`."""
    times: dict[str, dict[str, list[str]]] = {"1": {}, "0": {}}
    for w, line in re.findall(r"^cpp_wrapper=(\d) run \d+: (.*)$", loaded[0], re.M):
        for phase, seconds in re.findall(r"compiled the (\w+) step in ([\d.]+)s", line):
            times[w].setdefault(phase, []).append(f"{seconds} s")
    rows = [[label, ", ".join(times[w]["pretraining"]), ", ".join(times[w]["training"])]
            for w, label in (("1", "C++ (now the default)"), ("0", "Python"))]
    return table(["wrapper", "pretraining step, cold compile", "training step, cold compile"], rows)


OPTION_NOTES = {"cpp.enable_unsafe_math_opt_flag": " (gcc `-ffast-math`)",
                "cpp.enable_floating_point_contract_flag": " (FMA contraction)"}


def render_inductor_options(loaded: list) -> str:
    rows = []
    for d in loaded:
        options = d["options"]["candidate"]
        note = "".join(OPTION_NOTES.get(k, "") for k in options)
        cand, default = d["sides"]["candidate"]["step_ms_median"], d["sides"]["default"]["step_ms_median"]
        diff = d["max_weight_difference"]
        rows.append([f"`{json.dumps(options)}`{note}",
                     f"{d['second_over_first_step']:.3f} ({cand:.2f} / {default:.2f} ms)",
                     "bitwise equal" if diff == 0 else f"{sci(diff)} apart"])
    return table(["options", "step, candidate / default", "running loss sums after the last step"], rows)


PEER_SIDES = (("ours", "ours, compiled", " (FlopCounterMode)"), ("flowrl_shipped", "FlowRL as shipped", ""),
              ("flowrl_one_jit", "FlowRL under one `jax.jit`", " (XLA's cost analysis)"))


def render_peer(loaded: list) -> str:
    d = loaded[0]
    rows = []
    for key, label, flop_note in PEER_SIDES:
        faster = "" if key == "ours" else ratio(d["ours_faster_by"][key])
        flops = d["flops_per_step"].get(key)
        rows.append([label, f"{d['ms_median'][key]:.2f}", faster, f"{d['first_call_s'][key]:.1f} s",
                     f"{flops / 1e9:.3f}{flop_note}" if flops else ""])
    return table(["step", "ms (median)", "ours faster by", "first call (compile)", "GFLOP per step"], rows) + \
        f"\n\n(FlowRL under jax {d['jax']})"


def render_acting(loaded: list) -> str:
    """profiling.act_bench: per task, threads and mode, the rule on copies (old) against acting at the critic's
    cost (new)."""
    rows = []
    for d in loaded:
        for m in d["measurements"]:
            old, new = ({r["rule"]: r for r in m["rows"]}[k] for k in ("old", "new"))
            rows.append([old["task"].split("-")[0], str(old["threads"]), old["mode"],
                         f"{old['mflop_per_state']:.0f} / {new['mflop_per_state']:.0f}",
                         f"{old['states_per_s']:.1f}", f"{new['states_per_s']:.1f}", ratio(m["new_over_old"]),
                         f"{m['max_action_difference']:.1g}"])
    return table(["task", "threads", "mode", "MFLOP per state, old / new", "old states/s", "new states/s",
                  "new / old", "largest action difference"], rows)


def render_run_bench(loaded: list) -> str:
    """profiling.run_bench: whole runs, old and new acting, evaluation in-line or in a worker, time split."""
    rows = []
    for d in loaded:
        base = next(v for v in d["variants"] if v["variant"] == "old-inline")["process_wall_s"]
        for v in d["variants"]:
            t, split = v["time"], v["time"]["split"]
            rows.append([v["variant"], f"{v['process_wall_s']:.1f}", f"{split['steps_s']:.1f}",
                         f"{split['compile_s']:.1f}", f"{split['eval_s']:.1f}", f"{split['eval_wait_s']:.1f}",
                         f"{100 * split['eval_wait_s'] / t['total_s']:.1f}%", f"{t.get('eval_off_path_s', 0):.1f}",
                         ratio(base / v["process_wall_s"]),
                         " / ".join(f"{e['score_mean']:.1f}" for e in v["evals"])])
    return table(["variant", "process s", "training steps s", "compile s", "evaluation on the path s",
                  "waiting for the worker s", "waiting, share of the run", "worker, off the path s",
                  "vs old-inline", "scores at each evaluation"], rows)


PEER_ISA_HEADER = ["instruction set", "JAX", "ours, compiled", "FlowRL as shipped", "FlowRL one `jax.jit`"]


def peer_isa_cells(d: dict) -> list[str]:
    """A peer_flowrl run's first cells (PEER_ISA_HEADER): the instruction set each side ran, the JAX, three medians."""
    isa = d["machine"]["isa"]
    name = "native" if isa["asked"] == "native" else isa["asked"].upper()
    return [f"{name} (ATen {isa['aten']}, inductor {isa['inductor']})", f"jax {d['jax']}",
            *(f"{d['ms_median'][k]:.2f} ms" for k in ("ours", "flowrl_shipped", "flowrl_one_jit"))]


def render_peer_best(loaded: list) -> str:
    """The peer at its best: each row one run (its instruction set, its jax), ours against both FlowRL forms."""
    rows = [peer_isa_cells(d) + [ratio(d["ours_faster_by"]["flowrl_shipped"]),
                                 ratio(d["ours_faster_by"]["flowrl_one_jit"]),
                                 f"{d['first_call_s']['ours']:.1f} s / {d['first_call_s']['flowrl_one_jit']:.1f} s"]
            for d in loaded]
    return table(PEER_ISA_HEADER + ["ours faster than shipped", "than one-jit", "first call, ours / one-jit"], rows)


def render_peer_isa(loaded: list) -> str:
    rows = [peer_isa_cells(d) + [ratio(d["ours_faster_by"]["flowrl_one_jit"])] for d in loaded]
    return table(PEER_ISA_HEADER + ["ours faster than one-jit"], rows)


def launch_count(entry: dict, parts: bool) -> str:
    total = str(entry["total_launches"])
    if not parts:
        return total
    return (f"{total} ({entry['triton_launches']} Triton, {sum(entry['extern_calls'].values())} cuBLAS, "
            f"{sum(entry['fallbacks'].values())} ATen)")


def render_launches_groups(loaded: list) -> str:
    rows = []
    for d in loaded:
        seeds, mixed = d["torch"]["seeds"] or 1, d["torch"]["mixed"]
        label = f"{seeds}, mixed settings and two datasets (`--seeds {seeds} --mixed`)" if mixed else str(seeds)
        rows.append([label, launch_count(d["torch"], False), launch_count(d["triton"], False)])
    return table(["agents in the step", "kernels=torch", "kernels=triton"], rows)


def render_launches_step(loaded: list) -> str:
    rows = []
    for d in loaded:
        t = d["torch"]
        label = f"{t['task'].split('-')[0]} ({t['state_dim']}/{t['action_dim']}, batch {t['batch']})"
        rows.append([label, launch_count(t, True), launch_count(d["triton"], True)])
    return table(["compiled step", "kernels=torch", "kernels=triton"], rows)


# Files that do not record their own date (or command, or CPU): the date is the day of the commit that last
# wrote the file (`git log -1 -- FILE`), the rest the text that stood beside the table when it was typed.
LAUNCHES = "compile-time count (CPU torch faking an NVIDIA H100)"
TABLES: dict[str, Table] = {
    "step-compiled": Table((Source("cpu-walker2d-threads2.json"), Source("cpu-antmaze-threads2.json")),
                           render_step_compiled),
    "step-eager": Table((Source("cpu-walker2d-eager-threads2.json"), Source("cpu-antmaze-eager-threads2.json"),
                         Source("cpu-walker2d-threads1.json"), Source("cpu-antmaze-eager-threads1.json")),
                        render_step_eager),
    "seed-groups": Table((Source("cpu-walker2d-seeds-threads2.json"),
                          Source("cpu-walker2d-seeds-threads2-repeat.json")), render_seed_groups),
    "breakdown": Table(tuple(Source(f"breakdown/{name}", date="2026-11-30") for name in BREAKDOWN_LABELS),
                       render_breakdown),
    "wrapper-ab": Table((Source("breakdown/wrapper-ab-walker-threads1.json", date="2026-11-30"),),
                        render_wrapper_ab),
    "cold-compile-train": Table((Source(
        "breakdown/cpp-wrapper-train/cold_train.out", date="2026-11-30", cpu="AMD EPYC (AVX-512), 1 torch thread",
        command="TORCHINDUCTOR_CPP_WRAPPER=W TORCHINDUCTOR_CACHE_DIR=EMPTY python -m dtql_fast.train --task "
                "dtql_fast/reacher/scripted-v0 --epochs 1 --steps-per-epoch 30 --pretrain-epochs 1 --eval-every 1 "
                "--eval-episodes 1 --compile --threads 1  (two rounds, W = 1 then 0, each cache emptied first)",
        text=True),), render_cold_train),
    "inductor-options": Table(tuple(Source(f"breakdown/inductor-options/candidate-{i}.json", date="2026-11-30")
                                    for i in (1, 2, 3)), render_inductor_options),
    "acting": Table((Source("acting/act-walker2d-threads1-2.json", date="2026-12-06"),
                     Source("acting/act-antmaze-threads1.json", date="2026-12-06")), render_acting),
    "run-bench": Table((Source("run_bench/walker-1+20ep-eval5-threads1.json", date="2026-12-06"),), render_run_bench),
    "peer-flowrl-best": Table((Source("peer-flowrl-walker2d-threads1-jax0.10.2-native.json", date="2026-12-06"),
                               Source("peer-flowrl-walker2d-threads1-jax0.10.2-avx2.json", date="2026-12-06")),
                              render_peer_best),
    "peer-flowrl": Table((Source("peer-flowrl-walker2d-threads1.json", date="2026-11-30"),), render_peer),
    "peer-flowrl-isa": Table((Source("peer-flowrl-walker2d-threads1-isa-native.json", date="2026-11-30"),
                              Source("peer-flowrl-walker2d-threads1-isa-avx2.json", date="2026-11-30")),
                             render_peer_isa),
    "launches-groups": Table((
        Source("launches/walker2d-seeds1.json", date="2026-11-30", cpu=LAUNCHES,
               command="python -m dtql_fast.profiling.launches --task walker2d-medium-v2 --seeds 1"),
        Source("launches/walker2d-seeds5.json", date="2026-11-30", cpu=LAUNCHES,
               command="python -m dtql_fast.profiling.launches --task walker2d-medium-v2 --seeds 5"),
        Source("launches/walker2d-seeds30-mixed.json", date="2026-11-30", cpu=LAUNCHES,
               command="python -m dtql_fast.profiling.launches --task walker2d-medium-v2 --seeds 30 --mixed")),
        render_launches_groups),
    "launches-step": Table((
        Source("launches/walker2d.json", date="2026-11-30", cpu=LAUNCHES,
               command="python -m dtql_fast.profiling.launches --task walker2d-medium-v2 --kernels torch,triton"),
        Source("launches/antmaze.json", date="2026-11-30", cpu=LAUNCHES,
               command="python -m dtql_fast.profiling.launches --task antmaze-umaze-v0 --kernels torch,triton")),
        render_launches_step),
}


# ---------------------------------------------------------------- rendering the pages

def render(name: str, results: Path = RESULTS) -> str:
    """The text between NAME's markers: the table, a blank line, its sources."""
    spec = TABLES[name]
    loaded = []
    for source in spec.sources:
        path = results / source.path
        if not path.is_file():
            raise TableError(f"table {name}: {path} is missing; restore it or change the table's sources")
        text = path.read_text()
        loaded.append(text if source.text else json.loads(text))
    body = spec.render(loaded)
    return f"{body}\n\n{footer([None if s.text else d for d, s in zip(loaded, spec.sources)], spec.sources)}\n"


def render_page(text: str, page: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """The page with every table block rendered, and the names of its blocks."""
    names = []

    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise TableError(f"{page}: unknown table {name!r}; the tables are {', '.join(TABLES)}")
        names.append(name)
        indent = m.group("indent")
        body = "".join(indent + line if line.strip() else line
                       for line in render(name, results).splitlines(keepends=True))
        return indent + m.group("open") + body + indent + m.group("close")

    out = BLOCK.sub(fill, text)
    if len(re.findall(r"^[ \t]*<!-- table: ", out, re.M)) != len(names):  # a marker is a line of its own
        raise TableError(f"{page}: a `<!-- table: NAME -->` marker without its `<!-- /table -->`")
    return out, names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dtql_fast.profiling.tables", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 naming each table whose page differs from its render")
    p.add_argument("--docs", type=Path, default=DOCS, help="the pages' folder (default: the repository's docs/)")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="the results' folder (default: the repository's profiling/results/)")
    a = p.parse_args(argv)
    try:
        return run(a.docs, a.results, a.check)
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(docs: Path, results: Path, check: bool) -> int:
    stale, seen = [], []
    for page in sorted(docs.glob("*.md")):
        text = page.read_text()
        new, names = render_page(text, page.name, results)
        seen += names
        if new == text:
            continue
        if check:
            old = {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}
            stale += [f"{page.name}: {m.group('name')}" for m in BLOCK.finditer(new)
                      if old.get(m.group("name")) != m.group("body")]
        else:
            page.write_text(new)
            print(f"rendered {page.name}: {', '.join(names)}")
    unused = [n for n in TABLES if n not in seen]
    if unused:
        raise TableError(f"no page holds the table(s) {', '.join(unused)}; add `<!-- table: NAME -->` and "
                         "`<!-- /table -->` where each belongs")
    if stale:
        print("error: these tables differ from their render; run python -m dtql_fast.profiling.tables:\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
