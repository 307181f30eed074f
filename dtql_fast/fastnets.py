"""The release's three networks as pure functions of packed parameters: the fast path's layout.

The reference keeps the release's nn.Modules (nets.py). The fast step holds the same numbers laid
out so that a compiled step launches fewer kernels on a GPU, where a batch-256 step is
launch-bound:

- A Linear (W (out, in), b (out)) is one matrix P (width(in), out): P[:in] = W^T, P[in] = b, the
  other rows zero, and its input carries a ones column: x_aug = [x, 1, 0, ...]. The layer is
  x_aug @ P, and autograd's weight gradient x_aug^T @ g holds the bias gradient in row `in`, so no
  bias gradient needs a column-sum reduction of its own (two launches per layer on a GPU). The
  ones column is written by the kernel that produces x anyway (inductor fuses the concatenation
  into it). width(in) rounds in + 1 up to a multiple of 4, so rows stay 16-byte aligned for
  cuBLAS; the padding rows meet zero inputs, so their gradients are exactly zero and they stay
  zero under Adam.
- Q1 and Q2 are stacked: (2, width, out) matrices and (2, 1, H) LayerNorm affines, one batched
  matmul per layer for both.
- Leading group dimensions (one per seed, say) broadcast through every function here: a
  (..., B, S) input with (..., width, out) parameters.

`layout()` lists every packed tensor with the reference parameters it holds; `pack` and `unpack`
convert a reference state dict (or a dict of Adam moments, laid out like the parameters) both ways.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .edm import SIGMA_DATA
from .nets import LOG_STD_MAX, LOG_STD_MIN, _MishFn, mish_slope, mish_value

TIME_DIM = 16   # the diffusion net's sinusoidal time embedding width (nets.DiffusionNet)
LN_EPS = 1e-5   # nn.LayerNorm's default


def width(n: int) -> int:
    """Columns of an augmented input of n features: n, the ones column, padding to a multiple of 4."""
    return (n + 1 + 3) // 4 * 4


def augment(x: torch.Tensor) -> torch.Tensor:
    """[x, 1, 0, ...]: x with its ones column and zero padding, (..., width(n)).

    Written as pad + a one-hot row (an index comparison, not a tensor), so inductor computes it
    inside the kernel that produces x: no separate fill kernels for the ones and zeros.
    """
    n = x.shape[-1]
    one_hot = torch.arange(width(n), device=x.device) == n
    return F.pad(x, (0, width(n) - n)) + one_hot.to(x.dtype)


def _written_out() -> bool:
    """Whether the activations take their written-out, setup_context-style forms: when traced (inductor
    fuses them into one kernel each way) or under torch.func (which needs that style). Otherwise,
    eager, they take the forms with the fewest passes (_EagerMishFn, ATen's LayerNorm)."""
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def mish(x: torch.Tensor) -> torch.Tensor:
    """One exp and its derivative written out (_MishFn), or eagerly the same formula in fewer passes."""
    return _MishFn.apply(x) if _written_out() else _EagerMishFn.apply(x)


class _EagerMishFn(torch.autograd.Function):
    """_MishFn's formula in as few eager passes as it takes: one exp, the rest in place, and the
    exp kept for the backward instead of computed again. 0.64 ms against ATen mish + mish_backward's
    1.13 ms on a (2, 256, 256) tensor (1 thread, AMD EPYC), no farther from float64. Clamped at 20,
    n / (n + 2) is exactly 1 in fp32, so large x pass through as mish does."""

    @staticmethod
    def forward(ctx, x):
        e = torch.clamp(x, max=20.0).exp_()
        n = e.add(2.0).mul_(e)                  # e (e + 2)
        d = n.add(2.0)
        ctx.save_for_backward(x, e, d)
        return n.div_(d).mul_(x)                # x n / (n + 2)

    @staticmethod
    def backward(ctx, g):
        x, e, d = ctx.saved_tensors
        # n / d + 4 x e (e + 1) / d^2, with n / d = 1 - 2 / d
        return e.add(1.0).mul_(e).mul_(x).mul_(4.0).div_(d).sub_(2.0).div_(d).add_(1.0).mul_(g)


class _ReluFn(torch.autograd.Function):
    """ReLU that keeps its input, not its output, for the backward (like _MishFn): then nothing
    but the next layer reads the activation, and inductor writes it, padded and augmented, in
    the one kernel that computes it (torch.relu's saved output split that into three)."""

    @staticmethod
    def forward(x):
        return torch.clamp_min(x, 0.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return torch.where(x > 0, grad_out, 0.0)


def relu(x: torch.Tensor) -> torch.Tensor:
    return _ReluFn.apply(x)


# -- the networks ---------------------------------------------------------------------------------

def time_embedding(p: dict, t: torch.Tensor) -> torch.Tensor:
    """(..., M) time inputs -> (..., M, 16): sinusoidal features, Linear, Mish, Linear."""
    half = TIME_DIM // 2
    col = torch.arange(TIME_DIM, device=t.device)
    # [sin(t f), cos(t f)] as one expression over the 16 columns: t is read once per element,
    # so inductor computes it inline instead of storing t f first.
    arg = t[..., None] * torch.exp((col % half).to(t.dtype) * (-math.log(10000.0) / (half - 1)))
    emb = torch.where(col < half, arg.sin(), arg.cos())
    return augment(mish(augment(emb) @ p["t1"])) @ p["t2"]


def diffusion_input(p: dict, x: torch.Tensor, s: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                    sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """The first trunk layer's augmented input for K noise levels per row: (..., B*K, width(A+S+16)),
    row b*K + k = [c_in (x_b + sigma_bk n_bk), s_b, temb(ln(sigma_bk) / 4), 1, 0...].

    x (..., B, A), s (..., B, S), sigma (..., B, K), noise (..., B, K, A). dtql::edm_input
    (kernels/edm_input.py) computes the same in one kernel.
    """
    *lead, B, K = sigma.shape
    c_in = 1.0 / torch.sqrt(sigma * sigma + sigma_data * sigma_data)   # as edm.precondition
    x_in = c_in[..., None] * (x[..., None, :] + sigma[..., None] * noise)
    t = torch.log(sigma) / 4.0
    s_rep = s[..., None, :].expand(*s.shape[:-1], K, s.shape[-1])
    flat = lambda u: u.reshape(*lead, B * K, u.shape[-1])  # noqa: E731
    return augment(torch.cat([flat(x_in), flat(s_rep), time_embedding(p, t.reshape(*lead, B * K))], dim=-1))


def diffusion_trunk(p: dict, z: torch.Tensor) -> torch.Tensor:
    """D_theta's trunk on its augmented input z: (..., M, A) denoiser output F."""
    h = augment(z @ p["m0"])  # release quirk: no activation after the first trunk Linear
    for k in ("m1", "m2", "m3"):
        h = augment(mish(h @ p[k]))
    return h @ p["out"]


class _LayerNormMish(torch.autograd.Function):
    """augment(Mish(LayerNorm(h) * g + b)) for Q's hidden layers, as one row-wise pass.

    h, g and b are width(H) wide; the first H columns are the layer, the rest (zero weights,
    zero affine) carry the next layer's ones column. LayerNorm's statistics run over the first H
    columns only. Written out so that inductor makes one persistent kernel forward and one
    backward, and the affine's gradients (sums over the batch rows) come from one batched matmul
    with a ones row instead of split column reductions (three or four launches a layer).
    """

    @staticmethod
    def forward(h, g, b, ones, H):
        col = torch.arange(h.shape[-1], device=h.device)
        valid = col < H
        mean = torch.where(valid, h, 0.0).sum(-1, keepdim=True) / H
        c = torch.where(valid, h - mean, 0.0)
        rstd = torch.rsqrt((c * c).sum(-1, keepdim=True) / H + LN_EPS)
        y = c * rstd * g + b
        return torch.where(col == H, 1.0, torch.where(valid, mish_value(y), 0.0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, g, b, ones, H = inputs
        ctx.save_for_backward(h, g, b, ones)
        ctx.H = H

    @staticmethod
    def backward(ctx, gz):
        h, g, b, ones = ctx.saved_tensors
        H = ctx.H
        col = torch.arange(h.shape[-1], device=h.device)
        valid = col < H
        mean = torch.where(valid, h, 0.0).sum(-1, keepdim=True) / H
        c = torch.where(valid, h - mean, 0.0)
        rstd = torch.rsqrt((c * c).sum(-1, keepdim=True) / H + LN_EPS)
        xhat = c * rstd
        gy = torch.where(valid, gz * mish_slope(xhat * g + b), 0.0)
        dxhat = gy * g
        m1 = dxhat.sum(-1, keepdim=True) / H
        m2 = (dxhat * xhat).sum(-1, keepdim=True) / H
        dh = torch.where(valid, rstd * (dxhat - m1 - xhat * m2), 0.0)
        # Sums over the batch rows, both at once: ones (1, B) @ (2, ..., B, W). Always computed:
        # needs_input_grad is not reliable under torch.func.grad when compiled, and a traced step
        # drops the sums where nothing uses them (the policy step's Q).
        ones = gy.new_ones(1, gy.shape[-2]) if ones is None else ones
        dg, db = (ones @ torch.stack([gy * xhat, gy])).unbind(0)  # a (1, B) row: cuBLAS, not a reduction
        return dh, dg, db, None, None


def q_pair(p: dict, sa: torch.Tensor, hidden: int, ones: torch.Tensor | None = None) -> torch.Tensor:
    """Q1 and Q2 of concat([s, a]) (..., B, S+A), stacked: (..., 2, B, 1).

    `ones` (1, B): a persistent ones row for the LayerNorm affines' gradients (see
    _LayerNormMish); without it the backward makes one, which costs a fill kernel a layer.
    """
    W = p["q0"]  # (..., width(S+A), 2, width(H)): both networks' first layer as one matmul
    h = (augment(sa) @ W.flatten(-2)).unflatten(-1, W.shape[-2:]).transpose(-3, -2)
    written_out = _written_out()
    for i in range(3):
        g, b = p[f"q{i}_ln_w"], p[f"q{i}_ln_b"]
        if written_out:
            h = _LayerNormMish.apply(h, g, b, ones, hidden)
        else:
            h = _layer_norm_mish_eager(h, g, b, hidden)
        h = h @ p[f"q{i + 1}"]
    return h


def _layer_norm_mish_eager(h: torch.Tensor, g: torch.Tensor, b: torch.Tensor, H: int) -> torch.Tensor:
    """_LayerNormMish's value through ATen's own LayerNorm and Mish kernels, for the uncompiled step
    (written out, its element-wise ops are many separate passes eagerly); traced, the written-out
    form fuses into one kernel each way and stays (compiled launch counts unchanged)."""
    y = F.layer_norm(h[..., :H], (H,), eps=LN_EPS) * g[..., :H] + b[..., :H]
    return augment(mish(y))


def value(p: dict, s: torch.Tensor) -> torch.Tensor:
    """V(s): (..., B, S) -> (..., B, 1). No LayerNorm (release quirk)."""
    h = augment(s)
    for k in ("v0", "v1", "v2"):
        h = augment(mish(h @ p[k]))
    return h @ p["v3"]


def policy(p: dict, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu, std, log_std) of the one-step policy's Gaussian, log_std clamped to [-5, 2]."""
    h = augment(s)
    for k in ("p0", "p1", "p2"):
        h = augment(relu(h @ p[k]))
    mu, log_std = (h @ p["p3"]).chunk(2, dim=-1)
    log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
    return mu, log_std.exp(), log_std


def sample_action(mu: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, max_action: float) -> torch.Tensor:
    return (torch.tanh(mu + std * eps) * max_action).clamp(-max_action, max_action)


# -- layout and conversion ------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One packed tensor. `refs`: the reference names it holds, one per stacked member (a Linear's
    module prefix, or a LayerNorm parameter's full name). A Linear packs to (width(in_dim), cols),
    a LayerNorm vector to (1, cols); cols = out_dim, or width(out_dim) with `pad_out` (zero
    columns that carry the next layer's ones column). Stacked members go at `stack_dim`."""
    key: str
    refs: tuple[str, ...]
    out_dim: int
    in_dim: int | None = None   # None: a LayerNorm vector
    pad_out: bool = False
    stack_dim: int = 0

    @property
    def cols(self) -> int:
        return width(self.out_dim) if self.pad_out else self.out_dim


def layout(state_dim: int, action_dim: int, hidden: int) -> dict[str, list[Entry]]:
    """Every packed tensor of each network (keys of FastDTQL's parameter dicts)."""
    S, A, H, T = state_dim, action_dim, hidden, TIME_DIM
    lin = lambda key, in_dim, out_dim, *refs, **kw: Entry(key, refs, out_dim, in_dim, **kw)  # noqa: E731
    critic = []
    for i, (ref, n_in) in enumerate(((0, S + A), (3, H), (6, H))):
        critic += [lin(f"q{i}", n_in, H, f"q1.{ref}", f"q2.{ref}", pad_out=True, stack_dim=1 if i == 0 else 0),
                   Entry(f"q{i}_ln_w", (f"q1.{ref + 1}.weight", f"q2.{ref + 1}.weight"), H, pad_out=True),
                   Entry(f"q{i}_ln_b", (f"q1.{ref + 1}.bias", f"q2.{ref + 1}.bias"), H, pad_out=True)]
    critic += [lin("q3", H, 1, "q1.9", "q2.9"),
               lin("v0", S, H, "v.0"), lin("v1", H, H, "v.2"), lin("v2", H, H, "v.4"), lin("v3", H, 1, "v.6")]
    return {
        "diffusion": [lin("t1", T, 2 * T, "time_mlp.1"), lin("t2", 2 * T, T, "time_mlp.3"),
                      lin("m0", A + S + T, H, "mid.0"), lin("m1", H, H, "mid.1"), lin("m2", H, H, "mid.3"),
                      lin("m3", H, H, "mid.5"), lin("out", H, A, "final")],
        "critic": critic,
        "policy": [lin("p0", S, H, "net.0"), lin("p1", H, H, "net.2"), lin("p2", H, H, "net.4"),
                   lin("p3", H, 2 * A, "net.6")],
    }


def pack(entries: list[Entry], ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference state dict (or Adam moments keyed like it) -> packed tensors."""
    out = {}
    for e in entries:
        parts = []
        for r in e.refs:
            if e.in_dim is None:
                v = ref[r]
                P = v.new_zeros(1, e.cols)
                P[0, :e.out_dim] = v
            else:
                w, b = ref[f"{r}.weight"], ref[f"{r}.bias"]
                P = w.new_zeros(width(e.in_dim), e.cols)
                P[:e.in_dim, :e.out_dim] = w.T
                P[e.in_dim, :e.out_dim] = b
            parts.append(P)
        out[e.key] = torch.stack(parts, dim=e.stack_dim) if len(parts) > 1 else parts[0]
    return out


def unpack(entries: list[Entry], packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed tensors -> reference state dict (new tensors, reference names)."""
    out = {}
    for e in entries:
        P = packed[e.key]
        members = P.unbind(e.stack_dim) if len(e.refs) > 1 else (P,)
        for r, m in zip(e.refs, members):
            if e.in_dim is None:
                out[r] = m[0, :e.out_dim].clone()
            else:
                out[f"{r}.weight"] = m[:e.in_dim, :e.out_dim].T.contiguous()
                out[f"{r}.bias"] = m[e.in_dim, :e.out_dim].clone()
    return out
