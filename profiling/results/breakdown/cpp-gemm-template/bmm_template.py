"""Would inductor's CPP GEMM template pay on a CPU if torch 2.13 could compile the step with it?

One layer of the critic's shape (a stacked Q1/Q2 bmm, 2 x (512, 256) @ (256, 256), then LayerNorm and
Mish), forward and backward, compiled with the default (ATen bmm, MKL) and with max_autotune over
CPP,ATEN: inductor benchmarks its own micro-GEMM against ATen's bmm and prints both times (the
AUTOTUNE lines). One thread. The full step cannot be compiled this way on torch 2.13
(pytorch/pytorch#185405); a single layer can, which is enough to time the template's matmul.

    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python bmm_template.py default
    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python bmm_template.py cpp
"""
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
mode = sys.argv[1]
x = torch.randn(2, 512, 256)
w = torch.randn(2, 256, 256, requires_grad=True)
b = torch.zeros(256, requires_grad=True)
g = torch.ones(256, requires_grad=True)
beta = torch.zeros(256, requires_grad=True)
options = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"} if mode == "cpp" else {}


def layer():
    return F.mish(F.layer_norm(torch.bmm(x, w) + b, (256,), g, beta))


def forward():
    with torch.no_grad():
        return layer()


def forward_backward():
    layer().sum().backward()


for name, fn in (("forward", torch.compile(forward, options=options)),
                 ("forward+backward", torch.compile(forward_backward, options=options))):
    t0 = time.perf_counter()
    fn()
    compile_s = time.perf_counter() - t0
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(100):
            fn()
        best = min(best, (time.perf_counter() - t0) / 100)
    print(f"{mode} {name}: compile {compile_s:.1f} s, best of 7 x 100 calls {best * 1e6:.0f} us")
