# _LayerNormMish (the critic's (2, 256, 260) LayerNorm + Mish) forward and backward, compiled alone with the
# given inductor options. Run: taskset -c 1 python layernorm_alone.py JSON [JSON ...]
import torch, time, json, sys
from dtql_fast import fastnets
torch.set_num_threads(1)
H = 256; W = 260
ones = torch.ones(1, 256)
h = torch.randn(2, 256, W, requires_grad=True)
gw = torch.randn(2, 1, W, requires_grad=True); bw = torch.randn(2, 1, W, requires_grad=True)
gz = torch.randn(2, 256, W)
def f(h, gw, bw):
    y, vjp = torch.func.vjp(lambda h, gw, bw: fastnets._LayerNormMish.apply(h, gw, bw, ones, H), h, gw, bw)
    return y, vjp(gz)
for opts in [{}, *map(json.loads, sys.argv[1:])]:
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, options=opts)
    for _ in range(20): cf(h, gw, bw)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(100): cf(h, gw, bw)
        best = min(best, (time.perf_counter() - t) / 100 * 1e6)
    print(opts, f"{best:.1f} us")
