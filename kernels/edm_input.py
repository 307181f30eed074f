"""dtql::edm_input: the denoiser's whole input for K noise levels per row, in one kernel.

    x (B, A), s (B, S), sigma (B, K), noise (B, K, A), t1 (20, 32), t2 (36, 16)
      ->  z (B*K, width(A + S + 16)) = [c_in * (x + sigma * noise), s, temb, 1, 0...]

with c_in = 1 / sqrt(sigma^2 + sigma_data^2) and temb the diffusion net's time embedding of
t = ln(sigma) / 4: sinusoidal features (16), Linear(16, 32), Mish, Linear(32, 16), its two
Linears packed as dtql_fast.fastnets lays them out (t1 = [W1^T; b1; 0...], t2 = [W2^T; b2; 0...]).
z is the first trunk layer's augmented input (fastnets.augment), row b*K + k for noise level k.

What it absorbs: computed by the compiled step from PyTorch ops, this is five launches on a GPU
(noise levels and time inputs, two time-MLP matmuls, the Mish between them, the concatenation
with the state); here it is one, and the state's K-fold repeat is written straight into z, never
materialised. The two small matmuls run in-kernel (tl.dot, full fp32 precision).

Backward: d/dx (the trust region's policy actions get it) and the time MLP's weight gradients
(behaviour cloning trains them). One kernel computes d/dx and the gradients at the time MLP's two
pre-activations; the weight gradients are then two matmuls of those with the forward's saved,
augmented inputs (emb_aug, act_aug): their bias rows come out of the same matmul. s, sigma and
noise get no gradient (data and random draws). First derivatives only.

A leading group dimension (one per seed) is native: every tensor may carry it, (G, B, A) etc.,
and the grid runs over it.

On CUDA the op runs the Triton kernels; elsewhere the same arithmetic in PyTorch (the traced
body branches on the device, so torch.compile on CPU fuses plain aten ops).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from torch.library import triton_op, wrap_triton

from dtql_fast.edm import SIGMA_DATA

from ._common import check_group_shapes, launch_rows, mish_slope_tl, mish_tl, require_float32, traceable, uses_triton

TIME_DIM, TIME_HIDDEN = 16, 32
T1_ROWS, T2_ROWS = 20, 36       # width(16), width(32): the packed time-MLP matrices' rows
_LOG_FREQ = -math.log(10000.0) / (TIME_DIM // 2 - 1)


def z_width(A: int, S: int) -> int:
    """Columns of z: the A + S + 16 features, the ones column, padding to a multiple of 4."""
    return (A + S + TIME_DIM + 1 + 3) // 4 * 4


@triton.jit
def _c_in(s, sigma_data):
    # Correctly rounded sqrt/div, like torch's, instead of the GPU's approximate defaults.
    return tl.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.sqrt_rn(s * s + sigma_data * sigma_data))


@triton.jit
def _embedding(s, LOG_FREQ: tl.constexpr):
    """Sinusoidal features of t = ln(sigma) / 4: (BLOCK_B, 16) = [sin(t f), cos(t f)]."""
    cols = tl.arange(0, 16)
    arg = (tl.log(s) * 0.25)[:, None] * tl.exp((cols % 8).to(tl.float32) * LOG_FREQ)[None, :]
    return tl.where(cols[None, :] < 8, tl.sin(arg), tl.cos(arg))


@triton.jit
def _store_row_tail(ptr, rows_ok, start, end):
    """Columns start..end-1 of a row block: the ones column, then zeros (at most 4 columns)."""
    c = tl.arange(0, 4)
    tl.store(ptr + start + c[None, :], tl.where(c[None, :] == 0, 1.0, 0.0) + tl.zeros((1, 4), tl.float32),
             mask=rows_ok[:, None] & (start + c < end)[None, :])


@triton.jit
def _fwd(x_ptr, s_ptr, sigma_ptr, noise_ptr, t1_ptr, t2_ptr, z_ptr, emb_ptr, act_ptr,
         B, A, S, sigma_data,
         K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_S: tl.constexpr,
         LOG_FREQ: tl.constexpr):
    # Python floats arrive as fp32 from a direct launch but as fp64 from torch.compile's
    # generated launcher; the arithmetic below is fp32 either way.
    sigma_data = tl.cast(sigma_data, tl.float32)
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    ca, cs = tl.arange(0, BLOCK_A), tl.arange(0, BLOCK_S)
    ct, ch = tl.arange(0, 16), tl.arange(0, 32)
    a_mask = row_ok[:, None] & (ca < A)[None, :]
    s_mask = row_ok[:, None] & (cs < S)[None, :]
    ZW = (A + S + 16 + 1 + 3) // 4 * 4
    x = tl.load(x_ptr + g * B * A + rows[:, None] * A + ca[None, :], mask=a_mask, other=0.0)
    sv = tl.load(s_ptr + g * B * S + rows[:, None] * S + cs[None, :], mask=s_mask, other=0.0)
    t1 = t1_ptr + g * 20 * 32
    t2 = t2_ptr + g * 36 * 16
    w1 = tl.load(t1 + ct[:, None] * 32 + ch[None, :])       # (16, 32) = W1^T
    b1 = tl.load(t1 + 16 * 32 + ch)
    w2 = tl.load(t2 + ch[:, None] * 16 + ct[None, :])       # (32, 16) = W2^T
    b2 = tl.load(t2 + 32 * 16 + ct)
    for k in range(K):  # a loop, not unrolled: K copies of the tiles would spill registers
        # other=1 keeps masked lanes finite (log, division) without affecting stored lanes.
        s = tl.load(sigma_ptr + g * B * K + rows * K + k, mask=row_ok, other=1.0)
        r = g * B * K + rows * K + k                           # row of z, emb_aug, act_aug
        emb = _embedding(s, LOG_FREQ)
        act = mish_tl(tl.dot(emb, w1, input_precision="ieee") + b1[None, :])
        temb = tl.dot(act, w2, input_precision="ieee") + b2[None, :]
        n = tl.load(noise_ptr + (r[:, None]) * A + ca[None, :], mask=a_mask, other=0.0)
        z = z_ptr + r[:, None] * ZW
        tl.store(z + ca[None, :], _c_in(s, sigma_data)[:, None] * (x + s[:, None] * n), mask=a_mask)
        tl.store(z + A + cs[None, :], sv, mask=s_mask)
        tl.store(z + A + S + ct[None, :], temb, mask=row_ok[:, None])
        _store_row_tail(z, row_ok, A + S + 16, ZW)
        # The time MLP's augmented inputs, for its weight gradients in the backward.
        tl.store(emb_ptr + r[:, None] * 20 + ct[None, :], emb, mask=row_ok[:, None])
        _store_row_tail(emb_ptr + r[:, None] * 20, row_ok, 16, 20)
        tl.store(act_ptr + r[:, None] * 36 + ch[None, :], act, mask=row_ok[:, None])
        _store_row_tail(act_ptr + r[:, None] * 36, row_ok, 32, 36)


@triton.jit
def _bwd(grad_ptr, sigma_ptr, emb_ptr, t1_ptr, t2_ptr, grad_x_ptr, g_pre_ptr, g_temb_ptr,
         B, A, S, sigma_data,
         K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr):
    sigma_data = tl.cast(sigma_data, tl.float32)
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    ca, ct, ch = tl.arange(0, BLOCK_A), tl.arange(0, 16), tl.arange(0, 32)
    a_mask = row_ok[:, None] & (ca < A)[None, :]
    ZW = (A + S + 16 + 1 + 3) // 4 * 4
    t1 = t1_ptr + g * 20 * 32
    t2 = t2_ptr + g * 36 * 16
    w1 = tl.load(t1 + ct[:, None] * 32 + ch[None, :])       # (16, 32) = W1^T
    b1 = tl.load(t1 + 16 * 32 + ch)
    w2t = tl.load(t2 + ch[None, :] * 16 + ct[:, None])      # (16, 32) = W2
    grad_x = tl.zeros((BLOCK_B, BLOCK_A), dtype=tl.float32)
    # x feeds all K noisy copies of its row, so its gradient sums them, in a fixed order.
    for k in range(K):
        s = tl.load(sigma_ptr + g * B * K + rows * K + k, mask=row_ok, other=1.0)
        r = g * B * K + rows * K + k
        gz = grad_ptr + r[:, None] * ZW
        grad_x += _c_in(s, sigma_data)[:, None] * tl.load(gz + ca[None, :], mask=a_mask, other=0.0)
        g_temb = tl.load(gz + A + S + ct[None, :], mask=row_ok[:, None], other=0.0)
        tl.store(g_temb_ptr + r[:, None] * 16 + ct[None, :], g_temb, mask=row_ok[:, None])
        emb = tl.load(emb_ptr + r[:, None] * 20 + ct[None, :], mask=row_ok[:, None], other=0.0)
        pre = tl.dot(emb, w1, input_precision="ieee") + b1[None, :]
        g_pre = tl.dot(g_temb, w2t, input_precision="ieee") * mish_slope_tl(pre)
        tl.store(g_pre_ptr + r[:, None] * 32 + ch[None, :], g_pre, mask=row_ok[:, None])
    tl.store(grad_x_ptr + g * B * A + rows[:, None] * A + ca[None, :], grad_x, mask=a_mask)


# -- host side ------------------------------------------------------------------------------------

def _shapes(op, x, s, sigma, noise, t1, t2):
    G, B, K, A = check_group_shapes(op, x, sigma, noise, s=s)
    lead = x.shape[:-2]
    for name, t, rows, cols in (("t1", t1, T1_ROWS, TIME_HIDDEN), ("t2", t2, T2_ROWS, TIME_DIM)):
        if tuple(t.shape) != (*lead, rows, cols):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {(*lead, rows, cols)} "
                             f"(the packed time-MLP layer, dtql_fast.fastnets)")
        if t.dtype != x.dtype or t.device != x.device or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous {x.dtype} tensor on {x.device}")
    return G, B, K, A, s.shape[-1], lead


def _input_fwd_triton(x, s, sigma, noise, t1, t2, sigma_data):
    """Launch the forward kernel (also callable directly on CPU tensors under TRITON_INTERPRET=1)."""
    G, B, K, A, S, lead = _shapes("edm_input", x, s, sigma, noise, t1, t2)
    require_float32("edm_input", x)
    z = torch.empty((*lead, B * K, z_width(A, S)), device=x.device, dtype=x.dtype)
    emb = torch.empty((*lead, B * K, T1_ROWS), device=x.device, dtype=x.dtype)
    act = torch.empty((*lead, B * K, T2_ROWS), device=x.device, dtype=x.dtype)
    block_b, programs = launch_rows(B)
    wrap_triton(_fwd)[(programs, G)](x, s, sigma, noise, t1, t2, z, emb, act, B, A, S, float(sigma_data),
                                     K=K, BLOCK_B=block_b, BLOCK_A=triton.next_power_of_2(A),
                                     BLOCK_S=triton.next_power_of_2(S), LOG_FREQ=_LOG_FREQ)
    return z, emb, act


def _input_bwd_triton(grad_z, sigma, emb, t1, t2, A, S, sigma_data):
    """Launch the backward kernel: (d/dx, d/d pre-activation of the time MLP, d/d temb)."""
    lead, (B, K) = sigma.shape[:-2], sigma.shape[-2:]
    G = math.prod(lead)
    require_float32("edm_input_backward", grad_z)
    grad_x = torch.empty((*lead, B, A), device=grad_z.device, dtype=grad_z.dtype)
    g_pre = torch.empty((*lead, B * K, TIME_HIDDEN), device=grad_z.device, dtype=grad_z.dtype)
    g_temb = torch.empty((*lead, B * K, TIME_DIM), device=grad_z.device, dtype=grad_z.dtype)
    block_b, programs = launch_rows(B)
    wrap_triton(_bwd)[(programs, G)](grad_z, sigma, emb, t1, t2, grad_x, g_pre, g_temb, B, A, S,
                                     float(sigma_data), K=K, BLOCK_B=block_b,
                                     BLOCK_A=triton.next_power_of_2(A))
    return grad_x, g_pre, g_temb


def _embedding_torch(sigma):
    col = torch.arange(TIME_DIM, device=sigma.device)
    arg = (torch.log(sigma) / 4.0)[..., None] * torch.exp((col % (TIME_DIM // 2)).to(sigma.dtype) * _LOG_FREQ)
    return torch.where(col < TIME_DIM // 2, arg.sin(), arg.cos())


def _mish_torch(x):
    from dtql_fast.nets import mish_value
    return mish_value(x)


def _aug_torch(x, width):
    one_hot = (torch.arange(width, device=x.device) == x.shape[-1]).to(x.dtype)
    return torch.nn.functional.pad(x, (0, width - x.shape[-1])) + one_hot


def _input_fwd_torch(x, s, sigma, noise, t1, t2, sigma_data):
    G, B, K, A, S, lead = _shapes("edm_input", x, s, sigma, noise, t1, t2)
    c_in = 1.0 / torch.sqrt(sigma * sigma + sigma_data * sigma_data)
    x_in = c_in[..., None] * (x[..., None, :] + sigma[..., None] * noise)              # (..., B, K, A)
    emb = _aug_torch(_embedding_torch(sigma), T1_ROWS)                                  # (..., B, K, 20)
    act = _aug_torch(_mish_torch(emb @ t1[..., None, :, :]), T2_ROWS)                   # (..., B, K, 36)
    temb = act @ t2[..., None, :, :]
    s_rep = s[..., None, :].expand(*s.shape[:-1], K, S)
    z = _aug_torch(torch.cat([x_in, s_rep, temb], dim=-1), z_width(A, S))
    flat = lambda t: t.reshape(*lead, B * K, t.shape[-1])  # noqa: E731
    return flat(z), flat(emb), flat(act)


def _input_bwd_torch(grad_z, sigma, emb, t1, t2, A, S, sigma_data):
    lead, (B, K) = sigma.shape[:-2], sigma.shape[-2:]
    g = grad_z.reshape(*lead, B, K, -1)
    c_in = 1.0 / torch.sqrt(sigma * sigma + sigma_data * sigma_data)
    grad_x = (c_in[..., None] * g[..., :A]).sum(dim=-2)
    g_temb = grad_z[..., A + S:A + S + TIME_DIM]
    from dtql_fast.nets import mish_slope
    pre = emb @ t1
    g_pre = (g_temb @ t2[..., :TIME_HIDDEN, :].transpose(-1, -2)) * mish_slope(pre)
    return grad_x, g_pre, g_temb.clone(memory_format=torch.contiguous_format)  # never an alias of grad_z


@triton_op("dtql::edm_input", mutates_args=())
def edm_input_op(x: torch.Tensor, s: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                 t1: torch.Tensor, t2: torch.Tensor,
                 sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # This body is also the op's fake kernel and what torch.compile traces: the device branch
    # keeps CPU tensors away from the Triton launch at trace time as well as at run time.
    if uses_triton(x.device):
        return _input_fwd_triton(x, s, sigma, noise, t1, t2, sigma_data)
    return _input_fwd_torch(x, s, sigma, noise, t1, t2, sigma_data)


@triton_op("dtql::edm_input_backward", mutates_args=())
def edm_input_backward_op(grad_z: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor, t1: torch.Tensor,
                          t2: torch.Tensor, A: int, S: int,
                          sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if uses_triton(grad_z.device):
        return _input_bwd_triton(grad_z, sigma, emb, t1, t2, A, S, sigma_data)
    return _input_bwd_torch(grad_z, sigma, emb, t1, t2, A, S, sigma_data)


@edm_input_op.register_kernel("cpu")
def _input_fwd_cpu(x, s, sigma, noise, t1, t2, sigma_data):
    return _input_fwd_torch(x, s, sigma, noise, t1, t2, sigma_data)


@edm_input_backward_op.register_kernel("cpu")
def _input_bwd_cpu(grad_z, sigma, emb, t1, t2, A, S, sigma_data):
    return _input_bwd_torch(grad_z, sigma, emb, t1, t2, A, S, sigma_data)


def _setup_context(ctx, inputs, output):
    x, s, sigma, noise, t1, t2, sigma_data = inputs
    _, emb, act = output
    ctx.save_for_backward(sigma, emb, act, t1, t2)
    ctx.dims = (x.shape[-1], s.shape[-1])
    ctx.sigma_data = sigma_data
    ctx.mark_non_differentiable(emb, act)


@once_differentiable
def _backward(ctx, grad_z, _grad_emb, _grad_act):
    sigma, emb, act, t1, t2 = ctx.saved_tensors
    A, S = ctx.dims
    # Autograd may hand over an expanded or strided gradient.
    grad_x, g_pre, g_temb = torch.ops.dtql.edm_input_backward(grad_z.contiguous(), sigma, emb, t1, t2, A, S,
                                                              ctx.sigma_data)
    # The time MLP's weight gradients, bias rows included: augmented inputs^T @ output gradients.
    # Always returned: needs_input_grad is not reliable under torch.func.grad when compiled, and a
    # traced step drops what nothing uses (the trust region's).
    grad_t1 = emb.transpose(-1, -2) @ g_pre
    grad_t2 = act.transpose(-1, -2) @ g_temb
    return grad_x, None, None, None, grad_t1, grad_t2, None


# The op's own autograd: torch.ops.dtql.edm_input is differentiable wherever it is called (opcheck tests it).
edm_input_op.register_autograd(_backward, setup_context=_setup_context)


class EdmInput(torch.autograd.Function):
    """torch.ops.dtql.edm_input with the formula registered above, as a class of its own: torch.func
    transforms (the training step's torch.func.grad) refuse the autograd.Function that register_autograd
    generates, which has no setup_context (pytorch/pytorch#170834). Its backward node is EdmInputBackward."""

    @staticmethod
    def forward(*args):
        return torch.ops.dtql.edm_input(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def edm_input(x: torch.Tensor, s: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, t1: torch.Tensor,
              t2: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """The diffusion net's first-layer input for K noise levels per row: z (..., B*K, width(A + S + 16)).
    Drop-in for dtql_fast.fastnets.diffusion_input (which takes the packed time-MLP layers t1, t2 in a dict).

    Gradient to x and to the packed time-MLP layers t1, t2. Differentiable with .backward(),
    torch.autograd.grad and torch.func.grad, eager or compiled.
    """
    return EdmInput.apply(*map(traceable, (x, s, sigma, noise, t1, t2)), float(sigma_data))[0]
