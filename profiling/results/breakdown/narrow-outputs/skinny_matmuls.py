import torch, time
torch.set_num_threads(1)
def t(f, reps=300):
    for _ in range(30): f()
    best=1e9
    for _ in range(7):
        t0=time.perf_counter()
        for _ in range(reps): f()
        best=min(best,(time.perf_counter()-t0)/reps)
    return best*1e6
x=torch.randn(1,256,260); w=torch.randn(1,260,6); wt=w.transpose(1,2).contiguous()
g=torch.randn(1,256,6)
print("bmm x w          ", t(lambda: torch.bmm(x,w)))
print("mm  x w          ", t(lambda: x[0]@w[0]))
print("bmm (wt x^T)^T    ", t(lambda: torch.bmm(wt, x.transpose(1,2)).transpose(1,2)))
print("bmm x wt^T (view) ", t(lambda: torch.bmm(x, wt.transpose(1,2))))
print("x^T g  (260,256)x(256,6)", t(lambda: torch.bmm(x.transpose(1,2), g)))
print("g^T x  (6,256)x(256,260)", t(lambda: torch.bmm(g.transpose(1,2), x)))
a=torch.randn(256,256); b=torch.randn(256,256)
print("sq", t(lambda: a@b))
print("--- views of contiguous w (260,6)")
print("fwd (w^T x^T)^T     ", t(lambda: torch.bmm(w.transpose(1,2), x.transpose(1,2)).transpose(1,2)))
print("dx  g w^T  (K=6)    ", t(lambda: torch.bmm(g, w.transpose(1,2))))
print("dx^T w g^T (K=6)    ", t(lambda: torch.bmm(w, g.transpose(1,2)).transpose(1,2)))
print("dw^T g^T x          ", t(lambda: torch.bmm(g.transpose(1,2), x).transpose(1,2)))
x12=torch.randn(1,256,260); w12=torch.randn(1,260,12)
print("N=12 x w            ", t(lambda: torch.bmm(x12,w12)))
print("N=12 (w^T x^T)^T    ", t(lambda: torch.bmm(w12.transpose(1,2), x12.transpose(1,2)).transpose(1,2)))
