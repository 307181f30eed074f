# Compiled steps of the walker shapes with the given inductor options, compiled in this process one after
# another, then timed in alternating blocks. Run: taskset -c 1 python opt_ab.py NAME=JSON [NAME=JSON ...]
# With one side it times that side alone: run it in fresh processes alternating between options.
import sys, json, torch, time, statistics
from dtql_fast.profiling.variants import SHAPES, make_draws, synthetic_transitions
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.update import FastDTQL
from dtql_fast.tasks import TASKS
torch.set_num_threads(1)
task = "walker2d-medium-v2"; hyper = TASKS[task].hyper
S, A = SHAPES["walker2d"]; device = torch.device("cpu")
data = synthetic_transitions(S, A, 100_000, 0, device, hyper.max_action)
blocks, per = 8, 20
draws = make_draws(data.n, hyper, A, 20 + blocks*per + 1, 1, device)
torch.manual_seed(0); init = ReferenceDTQL(S, A, hyper, device)
sides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])}
steps = {}
for name, opts in sides.items():
    agent = FastDTQL(S, A, hyper, device); agent.load_weights_from(init)
    st = torch.compile(agent.train_step, fullgraph=True, options=opts)
    t0 = time.perf_counter(); st(data, draws[0].as_group()); print(name, "first", round(time.perf_counter() - t0, 1), flush=True)
    for d in draws[1:10]: st(data, d.as_group())
    steps[name] = st
ts = {k: [] for k in sides}
for b in range(blocks):
    order = list(steps) if b % 2 == 0 else list(reversed(steps))
    for name in order:
        for d in draws[20 + b*per: 20 + (b+1)*per]:
            t0 = time.perf_counter(); steps[name](data, d.as_group()); ts[name].append((time.perf_counter()-t0)*1e3)
base = statistics.median(ts[list(sides)[0]])
for k in ts: print(k, round(statistics.median(ts[k]), 2), round(statistics.median(ts[k]) / base, 3))
