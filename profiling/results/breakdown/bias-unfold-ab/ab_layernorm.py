# The A/B of layernorm-stats.diff: needs that diff applied plus the committed _LayerNormMish kept beside it as
# _LayerNormMishOld and a module flag fastnets.EXPERIMENT_OLD picking it in q_pair. Run: taskset -c 1 python ab_layernorm.py
# A/B of fastnets.EXPERIMENT_OLD (A: True = committed form, B: False = new form), alternating blocks.
import sys, torch, time, statistics
from dtql_fast import fastnets
from dtql_fast.profiling.variants import SHAPES, Variant, make_draws, synthetic_transitions
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.tasks import TASKS
torch.set_num_threads(1)
task = "walker2d-medium-v2"; hyper = TASKS[task].hyper
S, A = SHAPES["walker2d"]; device = torch.device("cpu")
data = synthetic_transitions(S, A, 100_000, 0, device, hyper.max_action)
blocks, per = int(sys.argv[1]) if len(sys.argv) > 1 else 8, 20
draws = make_draws(data.n, hyper, A, 20 + blocks*per + 1, 1, device)
vs = {}
for old in (True, False):
    torch.manual_seed(0)
    v = Variant("compile", ReferenceDTQL(S, A, hyper, device), data, hyper, draws, device)
    fastnets.EXPERIMENT_OLD = old
    t0 = time.perf_counter(); v.step(draws[0]); print("old", old, "first", time.perf_counter()-t0, flush=True)
    for d in draws[1:10]: v.step(d)
    vs[old] = v
ts = {True: [], False: []}
for b in range(blocks):
    for old in ((True, False) if b % 2 == 0 else (False, True)):
        for d in draws[20 + b*per: 20 + (b+1)*per]:
            t0 = time.perf_counter(); vs[old].step(d); ts[old].append((time.perf_counter()-t0)*1e3)
for f in ts: print("old" if f else "new", "median ms", statistics.median(ts[f]))
print("new/old", statistics.median(ts[False]) / statistics.median(ts[True]))
wa = [p for n in ("dp","cp","pp") for p in getattr(vs[True].agent, n).values()]
wb = [p for n in ("dp","cp","pp") for p in getattr(vs[False].agent, n).values()]
print("max weight diff", max((a-b).abs().max().item() for a, b in zip(wa, wb)))
