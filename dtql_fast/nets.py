"""The three networks of DTQL, laid out exactly as the authors' public release has them.

Layer order matters: weights are loaded across implementations by state_dict, and the
parameter-shape tests pin these layouts. See docs/algorithm.md, "Networks".
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def mish_value(x: torch.Tensor) -> torch.Tensor:
    """Mish with one exp: x tanh(softplus(x)) = x n / (n + 2), n = e^x (e^x + 2)."""
    e = torch.exp(x.clamp(max=20.0))  # past 20, tanh(softplus(x)) == 1 in fp32
    n = e * (e + 2.0)
    return torch.where(x > 20.0, x, x * n / (n + 2.0))


def mish_slope(x: torch.Tensor) -> torch.Tensor:
    """d mish / dx = n / (n + 2) + 4 x e (e + 1) / (n + 2)^2, e = e^x, n = e (e + 2)."""
    e = torch.exp(x.clamp(max=20.0))
    n = e * (e + 2.0)
    d = n + 2.0
    return torch.where(x > 20.0, 1.0, n / d + 4.0 * x * e * (e + 1.0) / (d * d))


class _MishFn(torch.autograd.Function):
    """Mish with one exp and its derivative written out (mish_value, mish_slope).

    Same function as F.mish to fp32 round-off, but inductor's fused exp + log1p + tanh forward and
    backward cost about 6x more on CPU than this (see FastMish).
    """

    @staticmethod
    def forward(x):
        return mish_value(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out * mish_slope(x)


class FastMish(nn.Module):
    """Drop-in for nn.Mish in the fast path (no parameters: state dicts are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MishFn.apply(x)


class SinusoidalPosEmb(nn.Module):
    """[sin(t f_k), cos(t f_k)], f_k = exp(-k ln(10000) / (half - 1)), k = 0..half-1."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        k = torch.arange(half, device=t.device, dtype=t.dtype)
        freqs = torch.exp(k * (-math.log(10000.0) / (half - 1)))
        arg = t[:, None] * freqs[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class DiffusionNet(nn.Module):
    """D_theta(x_in, s, t): the behaviour-cloning denoiser (the EDM 'F' network)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256, t_dim: int = 16,
                 act: type[nn.Module] = nn.Mish):
        super().__init__()
        self.state_dim, self.action_dim = state_dim, action_dim
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(t_dim), nn.Linear(t_dim, 2 * t_dim), act(), nn.Linear(2 * t_dim, t_dim)
        )
        # Release quirk: no activation after the first trunk Linear.
        self.mid = nn.Sequential(
            nn.Linear(action_dim + state_dim + t_dim, hidden),
            nn.Linear(hidden, hidden), act(),
            nn.Linear(hidden, hidden), act(),
            nn.Linear(hidden, hidden), act(),
        )
        self.final = nn.Linear(hidden, action_dim)

    def forward(self, x_in: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(t)
        return self.final(self.mid(torch.cat([x_in, s, temb], dim=-1)))


def _q_net(in_dim: int, hidden: int, act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), act(),
        nn.Linear(hidden, hidden), nn.LayerNorm(hidden), act(),
        nn.Linear(hidden, hidden), nn.LayerNorm(hidden), act(),
        nn.Linear(hidden, 1),
    )


def _v_net(in_dim: int, hidden: int, act: type[nn.Module]) -> nn.Sequential:
    # Release quirk: V has no LayerNorm.
    return nn.Sequential(
        nn.Linear(in_dim, hidden), act(),
        nn.Linear(hidden, hidden), act(),
        nn.Linear(hidden, hidden), act(),
        nn.Linear(hidden, 1),
    )


class Critic(nn.Module):
    """Q1, Q2 on concat([s, a]) and V on s; one optimiser covers all three."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256, act: type[nn.Module] = nn.Mish):
        super().__init__()
        self.q1 = _q_net(state_dim + action_dim, hidden, act)
        self.q2 = _q_net(state_dim + action_dim, hidden, act)
        self.v = _v_net(state_dim, hidden, act)

    def q(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sa = torch.cat([s, a], dim=-1)
        return self.q1(sa), self.q2(sa)

    def q_min(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        q1, q2 = self.q(s, a)
        return torch.minimum(q1, q2)

    def value(self, s: torch.Tensor) -> torch.Tensor:
        return self.v(s)


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class GaussianPolicy(nn.Module):
    """One-step policy: a diagonal Gaussian squashed by tanh and scaled to the action box."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256, max_action: float = 1.0):
        super().__init__()
        self.action_dim = action_dim
        self.max_action = max_action
        self.net = nn.Sequential(
            nn.Linear(state_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 2 * action_dim),
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight)
                nn.init.zeros_(m.bias)

    def dist_params(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_std = self.net(s).chunk(2, dim=-1)
        return mu, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()

    def sample(self, s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Reparameterised draw; eps ~ N(0, I) is passed in so two implementations can share it."""
        mu, std = self.dist_params(s)
        m = self.max_action
        return (torch.tanh(mu + std * eps) * m).clamp(-m, m)

    def log_prob(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Release quirk: Normal log-density of atanh(a / (m + 1e-3)), no tanh Jacobian."""
        mu, std = self.dist_params(s)
        z = torch.atanh(a / (self.max_action + 1e-3))
        return torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
