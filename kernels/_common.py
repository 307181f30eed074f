"""Input checks and launch geometry shared by the EDM ops."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one (rows x actions) tile handled per program and per noise level. The ops are
# memory- and launch-bound at the trainer's shapes (B*K*A <= 65k), so this only needs to keep
# register use modest while leaving enough programs to spread over the SMs.
_TILE_ELEMENTS = 512


def uses_triton(device: torch.device) -> bool:
    """Triton kernels serve GPU tensors; every other device runs the PyTorch implementation."""
    return device.type == "cuda"


def check_edm_inputs(op: str, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                     F: torch.Tensor | None = None) -> tuple[int, int, int]:
    """Validate x (B, A), sigma (B, K), noise (B, K, A) and optionally F (B*K, A); return (B, K, A).

    The kernels index raw memory as row-major, so layout, dtype and device are checked here,
    once, rather than producing silently wrong numbers.
    """
    named = {"x": x, "sigma": sigma, "noise": noise}
    if F is not None:
        named = {"F": F, **named}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or sigma.dim() != 2 or noise.dim() != 3:
        raise ValueError(
            f"{op}: expected x (B, A), sigma (B, K), noise (B, K, A); got x {tuple(x.shape)}, "
            f"sigma {tuple(sigma.shape)}, noise {tuple(noise.shape)}")
    B, A = x.shape
    K = sigma.shape[1]
    if sigma.shape[0] != B or tuple(noise.shape) != (B, K, A):
        raise ValueError(
            f"{op}: shapes disagree: x {tuple(x.shape)} gives B={B}, A={A}; sigma {tuple(sigma.shape)} "
            f"must be ({B}, K) and noise {tuple(noise.shape)} must be ({B}, K, {A})")
    if F is not None and tuple(F.shape) != (B * K, A):
        raise ValueError(
            f"{op}: F has shape {tuple(F.shape)}, expected (B*K, A) = ({B * K}, {A}) "
            f"from x {tuple(x.shape)} and sigma {tuple(sigma.shape)}")
    if B == 0 or K == 0 or A == 0:
        raise ValueError(f"{op}: empty input (B={B}, K={K}, A={A}); the loss is a mean over B*K*A entries")
    _check_common(op, named)
    return B, K, A


def check_grad(op: str, grad: torch.Tensor, shape: tuple[int, ...], **others: torch.Tensor) -> None:
    """The incoming gradient of a backward op must match its forward output's layout."""
    if tuple(grad.shape) != tuple(shape):
        raise ValueError(f"{op}: grad has shape {tuple(grad.shape)}, expected {tuple(shape)}")
    _check_common(op, {"grad": grad, **others})


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


@triton.jit
def row_tile(pid, B, A, BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr):
    """Program pid's BLOCK_B rows of a (B, A) array: row and column indices, and the masks for the
    ragged edges (row_ok for per-row values, mask for the (BLOCK_B, BLOCK_A) tile)."""
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_A)
    row_ok = rows < B
    return rows, cols, row_ok, row_ok[:, None] & (cols < A)[None, :]


def tile(B: int, A: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_A, number of programs) for a grid over the B rows of x.

    Chosen once from static shapes: each program owns BLOCK_B rows of x and walks all K noise
    levels, so x is read once per row however large K is.
    """
    block_a = triton.next_power_of_2(A)
    block_b = max(1, min(_TILE_ELEMENTS // block_a, triton.next_power_of_2(B)))
    return block_b, block_a, triton.cdiv(B, block_b)
