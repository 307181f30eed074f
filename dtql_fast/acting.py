"""The acting rule at the critic's cost: what is the same for a state's R candidates is computed once.

The spec's rule (ReferenceDTQL.act): for each state, R policy candidates tanh(mu + std eps), scored by
the target critic's min(Q1, Q2), one drawn from Categorical(softmax(q)) by inverting its CDF at u.
Written out on R copies of each state, as the reference does, most of the arithmetic repeats itself:

- the Gaussian policy's mean and std depend on the state only: its MLP runs once per state, and the R
  candidates are that one (mu, std) broadcast against their own eps;
- the critics' first Linear is W [s; a; 1] = (W_s s + b) + W_a a: the state part once per state, only the
  action part (A input columns) per candidate.

The rest is per candidate as before (LayerNorm, Mish, the hidden layers, min of Q1/Q2, the draw). At
walker2d's shapes (S 17, A 6, hidden 256, R 1,024) that is 553 MFLOP a state against 870 for the rule on
copies (torch's FLOP counter: python -m dtql_fast.profiling.act_bench). The values are the reference's up
to round-off (tests/test_acting.py bounds them against the reference in float64).

With that much less matmul, the critic's per-candidate element-wise work (E * R rows of 2 x 256) is what
is left to keep cheap, and on a CPU much of its cost is memory: a fresh tensor of that size page-faults on
its first write. So the critic's hidden layers here are forward-only forms of fastnets.q_pair's layers
(the same arithmetic; nothing kept for a backward):
- compiled, each layer's LayerNorm, affine, Mish and ones column is one expression that inductor makes one
  kernel writing one buffer (q_pair's _LayerNormMish, written for its backward, compiles here to three
  passes over the rows: statistics, affine, Mish);
- eager, ATen's LayerNorm and Mish kernels write into one new augmented buffer, a block of states at a
  time (EAGER_ROWS candidate rows), so that a block's buffers are reused by the next block.
Each layer's matmul takes the packed weight's first H columns (the padding columns are zeros), so the
LayerNorm reads exactly its H columns, with no mask.

Parameters are FastDTQL's packed dicts (fastnets.py): `pp` the policy, `tp` the target critic, each with
a leading agent dimension, so N agents act in one call, each with its own networks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import fastnets
from .fastnets import LN_EPS, width

# Candidate rows per block of the eager critic: the buffers of a block (2 x 2,048 x 260 floats, 4 MiB) are
# reused block after block instead of page-faulting in afresh. Median CPU ms of a call, new rule eager, one
# thread, Intel Xeon (python -m dtql_fast.profiling.act_bench --modes eager --threads 1 --eager-rows ROWS
# --tasks walker2d, and --tasks antmaze --blocks 2 --block 1): walker2d (10 states) 133 / 124 / 144 / 140 ms
# at 1,024 / 2,048 / 4,096 rows / all at once; antmaze (100 states) 1,298 ms at 2,048 rows, 2,180 all at once.
EAGER_ROWS = 2048


def candidates(pp: dict, states: torch.Tensor, eps: torch.Tensor, max_action: float) -> torch.Tensor:
    """The R policy candidates of each state: (..., E, S), eps (..., E, R, A) -> (..., E, R, A), the policy's
    MLP run once per state."""
    mu, std, _ = fastnets.policy(pp, states)
    return fastnets.sample_action(mu[..., None, :], std[..., None, :], eps, max_action)


def q_min(tp: dict, states: torch.Tensor, cand: torch.Tensor, hidden: int) -> torch.Tensor:
    """min(Q1, Q2) of each state's candidates: (..., E, S), (..., E, R, A) -> (..., E, R)."""
    *lead, E, R, _ = cand.shape
    if fastnets._written_out():
        return _critic(tp, states, cand, hidden, _ln_mish_written).reshape(*lead, E, R)
    # whole states per block; on a GPU, where blocks would only add launches, one block
    step = max(1, EAGER_ROWS // (R * math.prod(lead))) if cand.device.type == "cpu" else E
    return torch.cat([_critic(tp, states[..., i:i + step, :], cand[..., i:i + step, :, :], hidden, _ln_mish_eager)
                      .reshape(*lead, -1, R) for i in range(0, E, step)], dim=-2)


def _critic(tp: dict, states: torch.Tensor, cand: torch.Tensor, H: int, ln_mish) -> torch.Tensor:
    """fastnets.q_pair's min(Q1, Q2) on (..., E, S) states and their (..., E, R, A) candidates: (..., E * R, 1).

    The packed q0 (width(S+A), 2, width(H)) is split at its rows: [0, S) take the state, [S, S+A) the
    action, row S+A is the bias (augment's ones column); the zero rows below it are skipped.
    """
    *lead, E, R, A = cand.shape
    S = states.shape[-1]
    W = tp["q0"][..., :H].movedim(-2, -3)                             # (..., 2, width(S+A), H)
    h_state = states[..., None, :, :] @ W[..., :S, :] + W[..., S + A:S + A + 1, :]           # (..., 2, E, H)
    h = cand.reshape(*lead, 1, E * R, A) @ W[..., S:S + A, :]                                # (..., 2, E*R, H)
    h = (h.unflatten(-2, (E, R)) + h_state[..., None, :]).flatten(-3, -2)
    for i in range(3):
        P = tp[f"q{i + 1}"]
        h = ln_mish(h, tp[f"q{i}_ln_w"], tp[f"q{i}_ln_b"]) @ (P[..., :H] if i < 2 else P)
    return h.amin(dim=-3)


def _ln_mish_written(h: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """augment(Mish(LayerNorm(h) * g + b)): h (..., H) -> (..., width(H)), g and b width(H) wide (zero past
    H). One expression over the width(H) columns, so that traced it is one kernel and one buffer; Mish as
    nets.mish_value without its x > 20 branch (clamped at 20, n / (n + 2) is exactly 1 in fp32)."""
    H = h.shape[-1]
    mean = h.mean(-1, keepdim=True)
    c = h - mean
    rstd = torch.rsqrt((c * c).mean(-1, keepdim=True) + LN_EPS)
    y = (F.pad(h, (0, width(H) - H)) - mean) * rstd * g + b          # zero in the padding columns
    e = torch.exp(y.clamp(max=20.0))
    n = e * (e + 2.0)
    one_hot = torch.arange(width(H), device=h.device) == H
    return y * n / (n + 2.0) + one_hot.to(h.dtype)


def _ln_mish_eager(h: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """_ln_mish_written's value from ATen's LayerNorm and Mish kernels (the reference's), written into one
    new augmented buffer: three passes where the written-out form takes a dozen eagerly."""
    H = h.shape[-1]
    out = h.new_empty(*h.shape[:-1], width(H))
    out[..., H:] = (torch.arange(H, width(H), device=h.device) == H).to(h.dtype)
    y = out[..., :H]
    torch.addcmul(b[..., :H], F.layer_norm(h, (H,), eps=LN_EPS), g[..., :H], out=y)
    F.mish(y, inplace=True)
    return out


def draw(cand: torch.Tensor, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One candidate per state from Categorical(softmax(q)), by inverting its CDF at u: cand (..., E, R, A),
    q (..., E, R), u (..., E) in [0, 1) -> (..., E, A)."""
    R = q.shape[-1]
    cdf = torch.softmax(q, dim=-1).cumsum(dim=-1)
    idx = (cdf < u[..., None]).sum(dim=-1).clamp(max=R - 1)
    picked = torch.gather(cand, -2, idx[..., None, None].expand(*idx.shape, 1, cand.shape[-1]))
    return picked[..., 0, :]


@torch.no_grad()
def act(pp: dict, tp: dict, states: torch.Tensor, eps: torch.Tensor, u: torch.Tensor, hidden: int,
        max_action: float) -> torch.Tensor:
    """FastDTQL.act's rule: states (N, E, S), eps (N, E, R, A), u (N, E) -> actions (N, E, A), agent i acting
    with member i of pp and tp. FastDTQL.act is act(self.pp, self.tp, states, eps, u, self.hyper.hidden,
    self.hyper.max_action)."""
    cand = candidates(pp, states, eps, max_action)
    return draw(cand, q_min(tp, states, cand, hidden), u)
