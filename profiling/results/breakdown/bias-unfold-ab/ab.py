# The A/B behind README.md: the compiled walker step with FastDTQL.fold_bias True and False, in alternating
# blocks in one process (needs unfold.diff applied). Run: taskset -c 1 python ab.py
import torch, time, statistics
from dtql_fast.profiling.variants import SHAPES, Variant, make_draws, synthetic_transitions
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.tasks import TASKS
torch.set_num_threads(1)
task = "walker2d-medium-v2"; hyper = TASKS[task].hyper
S, A = SHAPES["walker2d"]; device = torch.device("cpu")
data = synthetic_transitions(S, A, 100_000, 0, device, hyper.max_action)
blocks, per = 8, 20
draws = make_draws(data.n, hyper, A, 20 + blocks*per + 1, 1, device)
vs = {}
for fold in (True, False):
    torch.manual_seed(0)
    v = Variant("compile", ReferenceDTQL(S, A, hyper, device), data, hyper, draws, device)
    v.agent.fold_bias = fold
    t0 = time.perf_counter(); v.step(draws[0]); print("fold", fold, "first", time.perf_counter()-t0, flush=True)
    for d in draws[1:10]: v.step(d)
    vs[fold] = v
ts = {True: [], False: []}
for b in range(blocks):
    for fold in ((True, False) if b % 2 == 0 else (False, True)):
        for d in draws[20 + b*per: 20 + (b+1)*per]:
            t0 = time.perf_counter(); vs[fold].step(d); ts[fold].append((time.perf_counter()-t0)*1e3)
for f in ts: print("fold", f, "median ms", statistics.median(ts[f]))
print("unfold/fold", statistics.median(ts[False]) / statistics.median(ts[True]))
