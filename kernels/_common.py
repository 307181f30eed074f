"""What the EDM ops share: input checks, launch geometry, Mish in Triton, and the view their public
functions take of each tensor."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def traceable(t: torch.Tensor) -> torch.Tensor:
    """t as a fresh view of itself, what each op's public function hands its autograd.Function. Compiled
    under torch.func.grad, dynamo runs the registered op itself (and fails: the autograd.Function that
    register_autograd makes has no setup_context) when a tensor reaches the Function straight from grad's
    inputs, e.g. a differentiated weight. A view of it traces through the Function; it costs nothing
    (torch 2.13)."""
    return t.view(t.shape)


def uses_triton(device: torch.device) -> bool:
    """Triton kernels serve GPU tensors; every other device runs the PyTorch implementation."""
    return device.type == "cuda"


def require_float32(op: str, t: torch.Tensor) -> None:
    # Other devices accept float64 (for gradcheck); the Triton kernels are written for float32.
    if t.dtype != torch.float32:
        raise TypeError(f"{op}: the Triton kernels take float32 tensors, got {t.dtype}")


def _check_common(op: str, named: dict[str, torch.Tensor]) -> None:
    first_name, first = next(iter(named.items()))
    device = first.device
    allowed = (torch.float32,) if uses_triton(device) else (torch.float32, torch.float64)
    for name, t in named.items():
        if t.device != device:
            raise ValueError(f"{op}: all tensors must be on one device: {first_name} is on {device}, "
                             f"{name} is on {t.device}")
        if t.dtype not in allowed:
            which = "float32" if len(allowed) == 1 else "float32 (or float64, off the GPU)"
            raise TypeError(f"{op}: {name} must be {which}, got {t.dtype}")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: all tensors must share one dtype: {first_name} is {first.dtype}, "
                            f"{name} is {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (got strides {tuple(t.stride())} for "
                             f"shape {tuple(t.shape)}); call .contiguous() on it first")


def check_group_shapes(op: str, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                       s: torch.Tensor | None = None, F: torch.Tensor | None = None) -> tuple[int, int, int, int]:
    """Validate x (..., B, A), sigma (..., B, K), noise (..., B, K, A), and optionally s (..., B, S)
    and F (..., B*K, A), all with the same leading group dimensions (none, or one per seed);
    return (G, B, K, A), G the number of groups (1 without a group dimension).

    The kernels index raw memory as row-major, so layout, dtype and device are checked here,
    once, rather than producing silently wrong numbers.
    """
    named = {"x": x, "sigma": sigma, "noise": noise}
    if s is not None:
        named["s"] = s
    if F is not None:
        named = {"F": F, **named}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 2 or sigma.dim() != x.dim() or noise.dim() != x.dim() + 1:
        raise ValueError(
            f"{op}: expected x (..., B, A), sigma (..., B, K), noise (..., B, K, A) with the same leading "
            f"dimensions; got x {tuple(x.shape)}, sigma {tuple(sigma.shape)}, noise {tuple(noise.shape)}")
    lead, (B, A) = tuple(x.shape[:-2]), x.shape[-2:]
    K = sigma.shape[-1]
    if tuple(sigma.shape) != (*lead, B, K) or tuple(noise.shape) != (*lead, B, K, A):
        raise ValueError(
            f"{op}: shapes disagree: x {tuple(x.shape)} gives B={B}, A={A}; sigma {tuple(sigma.shape)} "
            f"must be {(*lead, B, 'K')} and noise {tuple(noise.shape)} must be {(*lead, B, K, A)}")
    if s is not None and (s.dim() != x.dim() or tuple(s.shape[:-1]) != (*lead, B)):
        raise ValueError(f"{op}: s has shape {tuple(s.shape)}, expected {(*lead, B, 'S')} from x {tuple(x.shape)}")
    if F is not None and tuple(F.shape) != (*lead, B * K, A):
        raise ValueError(
            f"{op}: F has shape {tuple(F.shape)}, expected (..., B*K, A) = {(*lead, B * K, A)} "
            f"from x {tuple(x.shape)} and sigma {tuple(sigma.shape)}")
    if B == 0 or K == 0 or A == 0 or (s is not None and s.shape[-1] == 0) or 0 in lead:
        raise ValueError(f"{op}: empty input (B={B}, K={K}, A={A}, leading {lead})")
    _check_common(op, named)
    G = 1
    for d in lead:
        G *= d
    return G, B, K, A


# Rows of x per program of the row-parallel kernels (edm_input). tl.dot needs at least 16.
_ROWS_PER_PROGRAM = 32


def launch_rows(B: int) -> tuple[int, int]:
    """(BLOCK_B, programs per group) for a grid over the B rows of x, chosen from static shapes."""
    block_b = max(16, min(_ROWS_PER_PROGRAM, triton.next_power_of_2(B)))
    return block_b, triton.cdiv(B, block_b)


@triton.jit
def mish_tl(x):
    """Mish with one exp, as dtql_fast.nets.mish_value: x n / (n + 2), n = e^x (e^x + 2)."""
    e = tl.exp(tl.minimum(x, 20.0))  # past 20, tanh(softplus(x)) == 1 in fp32
    n = e * (e + 2.0)
    return tl.where(x > 20.0, x, tl.div_rn(x * n, n + 2.0))


@triton.jit
def mish_slope_tl(x):
    """d mish / dx, as dtql_fast.nets.mish_slope: n / (n + 2) + 4 x e (e + 1) / (n + 2)^2."""
    e = tl.exp(tl.minimum(x, 20.0))
    n = e * (e + 2.0)
    d = n + 2.0
    return tl.where(x > 20.0, 1.0, tl.div_rn(n, d) + tl.div_rn(4.0 * x * e * (e + 1.0), d * d))
