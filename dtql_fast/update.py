"""The fast DTQL step: the whole update, top to bottom, with no host synchronisation.

Read `FastDTQL.train_step` from top to bottom: it is the algorithm of
docs/algorithm.md, in its order. What makes it fast:

- The networks are pure functions of packed parameters (fastnets.py): each Linear's bias rides
  in its matmul, Q1 and Q2 are one batched matmul a layer, V(s) and V(s') one pass on a GPU, so a
  compiled step launches far fewer kernels there (where a batch-256 step is launch-bound).
- Gradients are taken over exactly the parameters being updated, so the policy step computes
  no gradients for the critic's or the diffusion net's weights. Traced, they come from
  `torch.func.grad`, so the whole step (three backward passes and three Adam steps) is one graph:
  `torch.compile(fullgraph=True)` cannot trace `Tensor.backward()` or `Optimizer.zero_grad`.
- Adam (optim.py) is written with foreach ops on device tensors (lr, step counts), so nothing is
  read back to the host, a changing learning rate never recompiles, and a CUDA graph can replay it.
- Mish is computed with one exp and an analytic derivative (nets.mish_value, mish_slope).
- The critic evaluates Q1, Q2 on (s, a) once (the reference does it twice), and the policy's
  EMA, which the release keeps but never uses, is not kept.
- Losses accumulate on the device; `read_metrics()` is the only host read, once per log interval.

Agents: `FastDTQL(..., seeds=[0, 1, 2])` is three independent agents in one step; with `hypers`
they may differ in the settings that keep shapes (hyper.PER_AGENT: alpha, gamma, learning rates, lr
decay, expectile, discount, tau), each held as a per-agent device tensor, and with transitions.AgentData
each samples its own dataset. Every
parameter, Adam moment, draw and metric has a leading agent dimension; each layer is one batched
matmul over the agents, each loss a per-agent mean, and the step differentiates their sum, so each
agent's gradient is exactly its own: the same step, the same launches, N agents. One agent is a
group of one (`seeds=[s]`, the default `[0]`); the single-seed checkpoint format of a `--seed`
run is an adapter at the edge (checkpoint.single_seed_state).

Around the algorithm, in rooms of their own: the optimiser (optim.py), the step runners the training
loop calls, eager, compiled or replayed as a CUDA graph (steppers.py), and the weights and state in the
reference's layout, checkpoints' included (reference_layout.py). CPU and CUDA run the same step; only
steppers.CUDAGraphStep is CUDA-specific.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.func import grad

from . import acting, edm, fastnets, reference_layout
from .draws import Draws
from .groups import check_agents
from .optim import Adam
from .ranges import phase
from .reference_layout import NETWORKS
from .tasks import Hyper
from .transitions import Transitions

METRICS = ("loss_v", "loss_q", "loss_bc", "loss_tr", "loss_pq", "loss_ent", "loss_policy", "q_mean", "v_mean")
PRETRAIN_METRICS = ("loss_v", "loss_q", "loss_bc", "q_mean", "v_mean")  # what pretraining fills in

# Step counters, one device tensor (a column per agent) so that one kernel advances them all
# (fastnets' launch budget): Adam's step for each optimiser, training steps taken (the lr schedule;
# it stays 0 for an agent without lr decay) and metric rows summed.
COUNTERS = ("critic", "diffusion", "policy", "lr_step", "metric_count")


class FastDTQL:
    """The DTQL step on packed parameters (fastnets.py): same numbers as ReferenceDTQL, laid out
    for fewer kernel launches. Weights go in and out in the reference's layout (`load_modules`,
    `modules`, `state_dict`), so checkpoints and the reference stay interchangeable.

    `seeds`: one per agent (a leading dimension of every tensor), agent i's initial weights drawn
    under torch.manual_seed(seeds[i]) (the global RNG left as it was). One agent is a group of one.
    `hypers`: agent i's settings (default: `hyper` for every agent); they may differ in hyper.PER_AGENT
    fields only (groups.GroupMismatch otherwise). `hyper` gives what the group shares. `datasets`: which dataset
    agent i samples (transitions.AgentData), where they differ: two agents may repeat a seed and settings
    on different data, never on the same.
    """

    def __init__(self, state_dim: int, action_dim: int, hyper: Hyper, device="cpu", kernels: str = "torch",
                 seeds: Sequence[int] = (0,), hypers: Sequence[Hyper] | None = None,
                 datasets: Sequence[int] | None = None):
        h = self.hyper = hyper
        self.device = torch.device(device)
        self.state_dim, self.action_dim = state_dim, action_dim
        self.hypers = list(hypers) if hypers is not None else [hyper] * len(seeds)
        self.seeds = check_agents(hyper, seeds, self.hypers, datasets)  # groups.GroupMismatch where they cannot
        N = len(self.seeds)
        per = lambda f: torch.tensor([float(getattr(x, f)) for x in self.hypers], device=device)  # noqa: E731
        # Per-agent settings, shaped to broadcast: (N,) against per-agent losses, (N, 1, 1) against batches.
        self._alpha, self._gamma = per("alpha"), per("gamma")
        self._expectile, self._discount = per("expectile").view(N, 1, 1), per("discount").view(N, 1, 1)
        self._tau = per("tau")
        # Which terms any agent has: a group without them leaves them out of its graph.
        self._any_gamma = any(x.gamma != 0 for x in self.hypers)
        self._any_decay = any(x.lr_decay for x in self.hypers)
        self.layout = fastnets.layout(state_dim, action_dim, h.hidden)
        self.ref_keys = reference_layout.key_order(state_dim, action_dim, h)
        packed = reference_layout.initial_weights(state_dim, action_dim, h, self.layout, self.seeds)
        self.dp, self.cp, self.tp, self.pp = ({k: v.to(self.device) for k, v in packed[net].items()} for net in NETWORKS)
        lead = self.group_shape
        self.counters = torch.zeros(len(COUNTERS), N, device=device)
        count = {k: self.counters[i] for i, k in enumerate(COUNTERS)}
        # The three learning rates of every agent, one tensor: the cosine decay sets them in one kernel.
        self._lr0 = torch.stack([per("critic_lr"), per("lr"), per("lr")])
        self._lr = self._lr0.clone()
        self.critic_opt = Adam(self.cp, lr=self._lr[0], step=count["critic"])
        self.diffusion_opt = Adam(self.dp, lr=self._lr[1], step=count["diffusion"])
        self.policy_opt = Adam(self.pp, lr=self._lr[2], step=count["policy"])
        self.lr_step, self.metric_count = count["lr_step"], count["metric_count"]
        # What one training / pretraining step adds to the counters (one kernel for all of them).
        ones = torch.ones(N, device=device)
        self._advance = {False: torch.stack([ones, ones, ones, per("lr_decay"), ones]),
                         True: torch.stack([ones, ones, torch.zeros_like(ones), torch.zeros_like(ones), ones])}
        self.metric_sum = torch.zeros(*lead, len(METRICS), device=device)
        self._ones = torch.ones(1, h.batch_size, device=device)  # batch-row sums as a matmul (fastnets)
        # V(s) and V(s') in one pass where the step is launch-bound (a GPU); on a CPU, FLOP-bound,
        # V(s') alone without its backward. profiling/launches.py sets it to count a GPU's graph.
        self.joint_value = self.device.type == "cuda"
        self.set_kernels(kernels)

    @property
    def group_shape(self) -> tuple[int]:
        """The leading agent dimension of every tensor: (N,) for N agents."""
        return (len(self.seeds),)

    def set_kernels(self, kernels: str):
        """Which EDM losses _edm_loss_fn runs: 'torch', the PyTorch formulas (inductor fuses them), or
        'triton', the dtql:: ops of kernels/, each one kernel on a GPU (their PyTorch implementation
        elsewhere), imported only when chosen: they need Triton."""
        if kernels not in ("torch", "triton"):
            raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
        self.kernels, self._triton = kernels, None
        if kernels == "triton":
            from . import kernels as ops
            self._triton = ops

    # -- losses: pure functions of the parameters they differentiate, one value per seed --------

    def _edm_loss_fn(self, dp, x, s, sigma, noise, weight):
        """(weight * EDM loss, EDM loss) of the diffusion net at clean actions x (K levels per row): the
        fused dtql:: ops (kernels='triton'), or the same arithmetic as PyTorch formulas ('torch')."""
        if self._triton is not None:
            F = fastnets.diffusion_trunk(dp, self._triton.edm_input(x, s, sigma, noise, dp["t1"], dp["t2"]))
            return self._triton.edm_loss(F, x, sigma, noise, self.hyper.max_action, weight)
        F = fastnets.diffusion_trunk(dp, fastnets.diffusion_input(dp, x, s, sigma, noise))
        loss = edm.edm_loss_from_output(F, x, sigma, noise, self.hyper.max_action)
        return weight * loss, loss

    def _critic_loss(self, cp, s, a, r, s2, not_done):
        h = self.hyper
        q1, q2 = fastnets.q_pair(cp, torch.cat([s, a], dim=-1), h.hidden, self._ones).unbind(-3)  # once; the reference twice
        q = torch.minimum(q1, q2).detach()
        if self.joint_value:
            # One pass (its backward also runs over the V(s') rows, with a zero gradient: on a GPU
            # that costs FLOPs, not launches).
            v, next_v = fastnets.value(cp, torch.cat([s, s2], dim=-2)).chunk(2, dim=-2)
            next_v = next_v.detach()
        else:
            # V(s') on its own, with no backward (10% of a compiled CPU walker step).
            v = fastnets.value(cp, s)
            with torch.no_grad():
                next_v = fastnets.value(cp, s2)
        d = q - v
        w = torch.where(d > 0, self._expectile, 1.0 - self._expectile)
        loss_v = _mean(w * d * d)
        y = r + not_done * self._discount * next_v
        loss_q = _mean((q1 - y) ** 2) + _mean((q2 - y) ** 2)
        return loss_v + loss_q, (loss_v, loss_q, _mean(q), _mean(v))

    def _bc_loss(self, dp, s, a, sigma, noise):
        return self._edm_loss_fn(dp, a, s, sigma, noise, 1.0)

    def _policy_loss(self, pp, s, a, eps, sigma, noise):
        h = self.hyper
        mu, std, log_std = fastnets.policy(pp, s)
        a_new = fastnets.sample_action(mu, std, eps, h.max_action)
        # Each agent's alpha scales its loss; the EDM op's backward scales its precomputed gradient
        # by that upstream value anyway, so this costs no pass of its own on a GPU.
        tr, loss_tr = self._edm_loss_fn(self.dp, a_new, s, sigma, noise, 1.0)
        loss_q = -_mean(fastnets.q_pair(self.cp, torch.cat([s, a_new], dim=-1), h.hidden, self._ones).amin(dim=-3))
        loss = self._alpha * tr + loss_q
        loss_ent = torch.zeros_like(loss_q)
        if self._any_gamma:
            # Release quirk: the "entropy" term is the NLL of the dataset actions.
            z = torch.atanh(a / (h.max_action + 1e-3))
            log_prob = (-((z - mu) ** 2) / (2 * std * std) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
            nll = -log_prob.mean(dim=-1)
            loss = loss + self._gamma * nll
            loss_ent = torch.where(self._gamma != 0, nll, 0.0)  # an agent without the term reports none
        return loss, (loss_tr, loss_q, loss_ent, loss)

    # -- the step -----------------------------------------------------------------------------

    def _critic_phase(self, s, a, r, s2, not_done):
        """One Adam step of the critic (IQL); returns (loss_v, loss_q, q_mean, v_mean)."""
        with phase("critic"):
            g, aux = _grad(self._critic_loss, self.cp, s, a, r, s2, not_done)
            self.critic_opt.update(g)
        return aux

    def _bc_phase(self, s, a, draws: Draws):
        """One Adam step of the diffusion net on behaviour cloning; returns loss_bc."""
        with phase("behaviour_cloning"):
            g, loss_bc = _grad(self._bc_loss, self.dp, s, a, draws.sigma_bc, draws.noise_bc)
            self.diffusion_opt.update(g)
        return loss_bc

    def train_step(self, data: Transitions, draws: Draws) -> torch.Tensor:
        """One DTQL step. Returns the step's metrics as one device tensor (..., len(METRICS))."""
        h = self.hyper
        with phase("sample"), torch.no_grad():
            s, a, r, s2, not_done = data.batch(draws.idx)
            self.counters += self._advance[False]
        # 1. critic (IQL), online critic
        loss_v, loss_q, q_mean, v_mean = self._critic_phase(s, a, r, s2, not_done)
        # 2. behaviour cloning
        loss_bc = self._bc_phase(s, a, draws)
        # 3. policy, against the critic and diffusion net as just updated
        with phase("policy"):
            g, (loss_tr, loss_pq, loss_ent, loss_pi) = _grad(
                self._policy_loss, self.pp, s, a, draws.eps, draws.sigma_tr, draws.noise_tr)
            self.policy_opt.update(g)
        # 4. critic target soft update, each agent with its tau
        with phase("target_update"), torch.no_grad():
            tp, cp = list(self.tp.values()), list(self.cp.values())
            tau = [self._tau.view((-1,) + (1,) * (t.dim() - 1)) for t in tp]
            torch._foreach_mul_(tp, [1.0 - x for x in tau])
            torch._foreach_add_(tp, torch._foreach_mul(cp, tau))
        # 5. cosine learning-rate decay, on the device (lr_step advanced with the counters; it stays 0,
        # and the factor exactly 1, for an agent without decay)
        with phase("lr_decay"), torch.no_grad():
            if self._any_decay:
                self._lr.copy_(self._lr0 * (0.5 * (1.0 + torch.cos(math.pi * self.lr_step / h.total_steps))))
        with torch.no_grad():
            m = torch.stack([loss_v, loss_q, loss_bc, loss_tr, loss_pq, loss_ent, loss_pi, q_mean, v_mean], dim=-1)
            self.metric_sum += m
        return m

    def pretrain_step(self, data: Transitions, draws: Draws) -> torch.Tensor:
        """Diffusion net then critic on one batch; no target update, no lr decay."""
        with phase("sample"), torch.no_grad():
            s, a, r, s2, not_done = data.batch(draws.idx)
            self.counters += self._advance[True]
        loss_bc = self._bc_phase(s, a, draws)
        loss_v, loss_q, q_mean, v_mean = self._critic_phase(s, a, r, s2, not_done)
        with torch.no_grad():
            zero = torch.zeros_like(loss_v)  # the policy's metrics: no policy step here
            m = torch.stack([loss_v, loss_q, loss_bc, zero, zero, zero, zero, q_mean, v_mean], dim=-1)
            self.metric_sum += m
        return m

    @torch.no_grad()
    def act(self, states: torch.Tensor, eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The spec's acting rule, as ReferenceDTQL.act: R candidates, target critic, softmax draw.

        states (N, E, S), eps (N, E, R, A), u (N, E) -> actions (N, E, A) for N agents: each agent's
        own networks act on its own states. acting.py computes it at the critic's cost (the policy and
        the critic's state part once per state, not once per candidate).
        """
        return acting.act(self.pp, self.tp, states, eps, u, self.hyper.hidden, self.hyper.max_action)

    # -- host side -----------------------------------------------------------------------------

    def read_metrics(self, pretrain: bool = False) -> list[dict[str, float]]:
        """Mean of each metric since the last read, one dict per agent; the one host sync of a log
        interval."""
        means = (self.metric_sum / self.metric_count.clamp(min=1.0)[:, None]).tolist()
        self.metric_sum.zero_(); self.metric_count.zero_()

        def pick(row, h):
            keep = PRETRAIN_METRICS if pretrain else [k for k in METRICS if k != "loss_ent" or h.gamma]
            return {k: v for k, v in zip(METRICS, row) if k in keep}

        return [pick(row, h) for row, h in zip(means, self.hypers)]

    def lrs(self) -> list[dict[str, float]]:
        """Each agent's three learning rates now."""
        return [{"lr_critic": c, "lr_diffusion": d, "lr_policy": p} for c, d, p in zip(*self._lr.tolist())]

    def params(self) -> dict[str, dict[str, torch.Tensor]]:
        """The packed parameter dicts, by network: what the step updates in place."""
        return {"diffusion": self.dp, "critic": self.cp, "critic_target": self.tp, "policy": self.pp}

    def optimizers(self) -> dict:
        return {"diffusion": self.diffusion_opt, "critic": self.critic_opt, "policy": self.policy_opt}

    # -- the agents' weights and state in the reference's layout (reference_layout.py) ------------

    def modules(self, agent: int = 0) -> dict[str, torch.nn.Module]:
        """The four networks of agent number `agent` as the reference's nn.Modules (copies)."""
        return reference_layout.modules(self, agent)

    def load_modules(self, modules: list[dict[str, torch.nn.Module]] | dict[str, torch.nn.Module]):
        """Set the weights from reference-layout modules (e.g. ReferenceDTQL.modules()), one dict per agent."""
        reference_layout.load_modules(self, modules)

    def load_weights_from(self, other):
        """Copy the four networks' weights from another implementation (e.g. ReferenceDTQL)."""
        self.load_modules(other.modules())

    def state_dict(self) -> dict:
        """Networks, Adam states, lr schedule and open metric sums, as checkpoints hold them."""
        return reference_layout.state_dict(self)

    def load_state_dict(self, sd: dict):
        reference_layout.load_state_dict(self, sd)


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over an (N, B, 1) batch: one value per agent."""
    return x.mean(dim=(-2, -1))


def _grad(loss_fn, params: dict, *args):
    """(d loss / d params, aux) for loss_fn(params, *args) -> (loss, aux), loss one value per seed.

    Differentiates the sum over seeds: each seed's parameters get exactly their own loss's
    gradient. Traced: torch.func.grad, which dynamo compiles into the step's one graph. Eager:
    plain autograd on detached leaves, the same math without functorch's per-op wrapping (about
    1.5x faster eagerly on CPU). Only `params` are differentiated; everything closed over is constant.
    """
    def summed(p, *a):
        loss, aux = loss_fn(p, *a)
        return loss.sum(), aux

    if torch.compiler.is_compiling():
        return grad(summed, has_aux=True)(params, *args)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        loss, aux = summed(leaves, *args)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads)), tuple(x.detach() for x in aux) if isinstance(aux, tuple) else aux.detach()
