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
- Adam is written with foreach ops on device tensors (lr, step counts), so nothing is read
  back to the host, a changing learning rate never recompiles, and a CUDA graph can replay it.
- Mish is computed with one exp and an analytic derivative (nets.mish_value, mish_slope).
- The critic evaluates Q1, Q2 on (s, a) once (the reference does it twice), and the policy's
  EMA, which the release keeps but never uses, is not kept.
- Losses accumulate on the device; `read_metrics()` is the only host read, once per log interval.

Agents: `FastDTQL(..., seeds=[0, 1, 2])` is three independent agents in one step; with `hypers`
they may differ in the settings that keep shapes (PER_AGENT: alpha, gamma, learning rates, lr decay,
expectile, discount, tau), each held as a per-agent device tensor, and with transitions.AgentData
each samples its own dataset. Every
parameter, Adam moment, draw and metric has a leading agent dimension; each layer is one batched
matmul over the agents, each loss a per-agent mean, and the step differentiates their sum, so each
agent's gradient is exactly its own: the same step, the same launches, N agents. One agent is a
group of one (`seeds=[s]`, the default `[0]`); the single-seed checkpoint format of a `--seed`
run is an adapter at the edge (checkpoint.single_seed_state).

CPU and CUDA run the same step; only `CUDAGraphStep` is CUDA-specific.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
from torch.func import grad

from . import compiling, edm, fastnets
from .draws import Draws, sample_draws
from .nets import Critic, DiffusionNet, GaussianPolicy
from .ranges import phase
from .seeds import check_seeds
from .tasks import Hyper
from .transitions import Transitions

METRICS = ("loss_v", "loss_q", "loss_bc", "loss_tr", "loss_pq", "loss_ent", "loss_policy", "q_mean", "v_mean")
PRETRAIN_METRICS = ("loss_v", "loss_q", "loss_bc", "q_mean", "v_mean")  # what pretraining fills in
NETWORKS = ("diffusion", "critic", "critic_target", "policy")

# Step counters, one device tensor (a column per agent) so that one kernel advances them all
# (fastnets' launch budget): Adam's step for each optimiser, training steps taken (the lr schedule;
# it stays 0 for an agent without lr decay) and metric rows summed.
COUNTERS = ("critic", "diffusion", "policy", "lr_step", "metric_count")

# What the agents of one group may set each for itself (per-agent tensors: another grid never
# recompiles), and what they must share (shapes, schedule, acting, the action box the losses clamp to).
PER_AGENT = ("alpha", "gamma", "lr", "lr_decay", "expectile", "discount", "tau", "critic_lr")
SHARED = ("batch_size", "noise_levels", "hidden", "steps_per_epoch", "epochs", "pretrain_epochs", "eval_every",
          "num_candidates", "max_action")


class GroupMismatch(ValueError):
    """Agents asked to share one step that cannot: the message names the agents and the field."""


def check_group(hypers: Sequence[Hyper], names: Sequence[str]) -> None:
    """Refuse a group whose agents differ in a SHARED field, naming the first such field and the agents'
    values (`names`: how each agent is called, e.g. its seed or grid cell)."""
    for f in SHARED:
        values = [getattr(h, f) for h in hypers]
        if len(set(values)) > 1:
            by = {}
            for name, v in zip(names, values):
                by.setdefault(v, []).append(str(name))
            shown = "; ".join(f"{', '.join(who)}: {v}" for v, who in by.items())
            raise GroupMismatch(f"the agents of one group must share {f}, but they differ ({shown}); "
                                f"train them as separate groups")


class Adam:
    """Adam (betas 0.9/0.999, eps 1e-8, no weight decay) on a dict of tensors, updated in place.

    Same arithmetic as torch.optim.Adam. `lr` and `step` are device tensors owned by the caller,
    0-dim or one value per agent (the tensors' leading dimension): views into FastDTQL's learning-
    rate and counter tensors, which it sets and advances for all three optimisers in one kernel each.
    """

    def __init__(self, params: dict[str, torch.Tensor], lr: torch.Tensor, step: torch.Tensor,
                 betas=(0.9, 0.999), eps=1e-8):
        self.params = list(params.values())
        self.names = list(params.keys())
        self.lr, self.step = lr, step
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps

    def update(self, grads: dict[str, torch.Tensor]):
        g = [grads[n] for n in self.names]
        torch._foreach_lerp_(self.exp_avg, g, 1 - self.beta1)
        torch._foreach_mul_(self.exp_avg_sq, self.beta2)
        torch._foreach_addcmul_(self.exp_avg_sq, g, g, value=1 - self.beta2)
        # 1 - beta**t as -expm1(t ln beta): in float32, 1 - 0.999**t loses ~1e-5 of its value to
        # cancellation at small t. (A float64 step instead makes dynamo guard on its value.)
        bc1 = -torch.expm1(self.step * math.log(self.beta1))
        bc2_sqrt = torch.sqrt(-torch.expm1(self.step * math.log(self.beta2)))
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, self._each(bc2_sqrt))
        torch._foreach_add_(denom, self.eps)
        upd = torch._foreach_div(self.exp_avg, denom)
        torch._foreach_mul_(upd, self._each(-self.lr / bc1))
        torch._foreach_add_(self.params, upd)

    def _each(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (one value, or one per agent) shaped to broadcast over each parameter's own dimensions."""
        return [x.reshape(x.shape + (1,) * (p.dim() - x.dim())) for p in self.params]

    def state_dict(self) -> dict:
        return {"lr": self.lr, "step": self.step, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, sd: dict):
        with torch.no_grad():
            self.lr.copy_(sd["lr"]); self.step.copy_(sd["step"])
            torch._foreach_copy_(self.exp_avg, list(sd["exp_avg"]))
            torch._foreach_copy_(self.exp_avg_sq, list(sd["exp_avg_sq"]))


class FastDTQL:
    """The DTQL step on packed parameters (fastnets.py): same numbers as ReferenceDTQL, laid out
    for fewer kernel launches. Weights go in and out in the reference's layout (`load_modules`,
    `modules`, `state_dict`), so checkpoints and the reference stay interchangeable.

    `seeds`: one per agent (a leading dimension of every tensor), agent i's initial weights drawn
    under torch.manual_seed(seeds[i]) (the global RNG left as it was). One agent is a group of one.
    `hypers`: agent i's settings (default: `hyper` for every agent); they may differ in PER_AGENT
    fields only (GroupMismatch otherwise). `hyper` gives what the group shares. `datasets`: which dataset
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
        if len(self.hypers) != len(seeds):
            raise GroupMismatch(f"{len(self.hypers)} agents' settings for {len(seeds)} seeds")
        data = list(datasets) if datasets is not None else [0] * len(seeds)
        if len(set(self.hypers)) <= 1 and len(set(data)) <= 1:  # a seed group: each seed once (and at least one)
            self.seeds = list(check_seeds(seeds))
        else:  # a grid: a seed may recur, with other settings or data (the same start, another run)
            self.seeds = [check_seeds([s])[0] for s in seeds]
            seen = set()
            for i, agent in enumerate(zip(self.seeds, self.hypers, data)):
                if agent in seen:
                    raise GroupMismatch(f"agent {i} (seed {agent[0]}) repeats an earlier agent's seed, settings and "
                                        "data; each agent trains once")
                seen.add(agent)
        check_group([hyper, *self.hypers], ["the group", *(f"agent {i} (seed {s})" for i, s in enumerate(self.seeds))])
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
        members = []
        for seed in self.seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                members.append(self._initial_weights())
        packed = {net: {k: torch.stack([m[net][k] for m in members]) for k in members[0][net]} for net in NETWORKS}
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

    def _initial_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """One agent's packed weights, initialised as the reference's modules (built in the same
        order, so the same weights per seed)."""
        init = self._reference_modules()
        init["critic_target"].load_state_dict(init["critic"].state_dict())
        self._ref_keys = {k: list(m.state_dict()) for k, m in init.items()}
        return {net: fastnets.pack(self.layout[_NET[net]], init[net].state_dict()) for net in NETWORKS}

    def _reference_modules(self) -> dict[str, torch.nn.Module]:
        h, S, A = self.hyper, self.state_dim, self.action_dim
        return {"diffusion": DiffusionNet(S, A, h.hidden), "critic": Critic(S, A, h.hidden),
                "critic_target": Critic(S, A, h.hidden), "policy": GaussianPolicy(S, A, h.hidden, h.max_action)}

    @property
    def group_shape(self) -> tuple[int]:
        """The leading agent dimension of every tensor: (N,) for N agents."""
        return (len(self.seeds),)

    def set_kernels(self, kernels: str):
        """'torch': the EDM losses as PyTorch formulas (inductor fuses them); 'triton': the dtql::
        ops of kernels/, each one kernel on a GPU (their PyTorch implementation elsewhere)."""
        if kernels == "torch":
            self._diffusion_input, self._edm_loss = fastnets.diffusion_input, _edm_loss_formula
        elif kernels == "triton":
            from . import kernels as K
            self._diffusion_input = lambda p, x, s, sigma, noise: K.edm_input(x, s, sigma, noise, p["t1"], p["t2"])
            self._edm_loss = K.edm_loss
        else:
            raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
        self.kernels = kernels

    # -- losses: pure functions of the parameters they differentiate, one value per seed --------

    def _edm_loss_fn(self, dp, x, s, sigma, noise, weight):
        """(weight * EDM loss, EDM loss) of the diffusion net at clean actions x (K levels per row)."""
        F = fastnets.diffusion_trunk(dp, self._diffusion_input(dp, x, s, sigma, noise))
        return self._edm_loss(F, x, sigma, noise, self.hyper.max_action, weight)

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
        own networks act on its own states.
        """
        *lead, E, S = states.shape
        R = eps.shape[-2]
        s_rep = states[..., None, :].expand(*lead, E, R, S).reshape(*lead, E * R, S)
        mu, std, _ = fastnets.policy(self.pp, s_rep)
        cand = fastnets.sample_action(mu, std, eps.reshape(*lead, E * R, -1), self.hyper.max_action)
        q = fastnets.q_pair(self.tp, torch.cat([s_rep, cand], dim=-1), self.hyper.hidden).amin(dim=-3)
        cdf = torch.softmax(q.reshape(*lead, E, R), dim=-1).cumsum(dim=-1)
        idx = (cdf < u[..., None]).sum(dim=-1).clamp(max=R - 1)
        cand = cand.reshape(*lead, E, R, -1)
        return torch.gather(cand, -2, idx[..., None, None].expand(*lead, E, 1, cand.shape[-1]))[..., 0, :]

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

    def _members(self, packed: dict) -> list[dict[str, torch.Tensor]]:
        """A packed dict split into one dict per agent (views)."""
        return [{k: v[i] for k, v in packed.items()} for i in range(len(self.seeds))]

    def _unpack(self, name: str, packed: dict) -> dict[str, torch.Tensor]:
        """One agent's packed tensors of network `name` -> the reference's state dict, in its key order."""
        ref = fastnets.unpack(self.layout[_NET[name]], packed)
        return {k: ref[k] for k in self._ref_keys[name]}

    def _pack(self, name: str, refs: list[dict]) -> list[torch.Tensor]:
        """Reference state dicts (one per agent) -> packed tensors with the agent dimension, in order."""
        if len(refs) != len(self.seeds):
            raise ValueError(f"{len(refs)} agents' states for {len(self.seeds)} agents (seeds {self.seeds})")
        packed = [fastnets.pack(self.layout[_NET[name]], ref) for ref in refs]
        return [torch.stack([p[k] for p in packed]) for k in packed[0]]

    def modules(self, agent: int = 0) -> dict[str, torch.nn.Module]:
        """The four networks of agent number `agent` as the reference's nn.Modules (copies of the
        current weights)."""
        mods = self._reference_modules()
        for k, m in mods.items():
            m.to(self.device).load_state_dict(self._unpack(k, self._members(self.params()[k])[agent]))
        return mods

    def load_modules(self, modules: list[dict[str, torch.nn.Module]] | dict[str, torch.nn.Module]):
        """Set the weights from reference-layout modules (e.g. ReferenceDTQL.modules()), in place: a
        list of such dicts, one per agent (one dict: a group of one's)."""
        mods = [modules] if isinstance(modules, dict) else list(modules)
        with torch.no_grad():
            for k, packed in self.params().items():
                torch._foreach_copy_(list(packed.values()), self._pack(k, [m[k].state_dict() for m in mods]))

    def load_weights_from(self, other):
        """Copy the four networks' weights from another implementation (e.g. ReferenceDTQL)."""
        self.load_modules(other.modules())

    def state_dict(self) -> dict:
        """In the reference's layout, a list over the agents: module state dicts, and Adam moments
        listed in the order of the reference module's parameters (as torch.optim.Adam would list
        them); "seeds" names the agents."""
        def per_agent(name, packed):
            return [self._unpack(name, m) for m in self._members(packed)]

        opts = {}
        for k, o in self.optimizers().items():
            sd = o.state_dict()
            opts[k] = {**sd, **{m: [list(d.values()) for d in per_agent(k, dict(zip(o.names, sd[m])))]
                                for m in ("exp_avg", "exp_avg_sq")}}
        return {"modules": {k: per_agent(k, p) for k, p in self.params().items()}, "optimizers": opts,
                "lr_step": self.lr_step, "metric_sum": self.metric_sum, "metric_count": self.metric_count,
                "seeds": list(self.seeds)}

    def load_state_dict(self, sd: dict):
        if sd.get("seeds") != list(self.seeds):
            raise ValueError(f"this state is of seeds {sd.get('seeds')}, the agent's are {self.seeds}")
        with torch.no_grad():
            for k, packed in self.params().items():
                torch._foreach_copy_(list(packed.values()), self._pack(k, sd["modules"][k]))
            for k, o in self.optimizers().items():
                osd = dict(sd["optimizers"][k])
                for m in ("exp_avg", "exp_avg_sq"):
                    refs = [dict(zip(self._ref_keys[k], lst)) for lst in osd[m]]
                    osd[m] = self._pack(k, refs)
                o.load_state_dict(osd)
            self.lr_step.copy_(sd["lr_step"])
            self.metric_sum.copy_(sd["metric_sum"]); self.metric_count.copy_(sd["metric_count"])


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over an (N, B, 1) batch: one value per agent."""
    return x.mean(dim=(-2, -1))


def _edm_loss_formula(F, x, sigma, noise, max_action, weight):
    loss = edm.edm_loss_from_output(F, x, sigma, noise, max_action)
    return weight * loss, loss


# The packed layout of each network; the target critic shares the critic's.
_NET = {"diffusion": "diffusion", "critic": "critic", "critic_target": "critic", "policy": "policy"}


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


# -- runners: eager, compiled, CUDA graph ---------------------------------------------------------


class StepRunner:
    """Draws + one step, as a callable with no arguments: what the training loop calls.

    `mode`: "eager" runs FastDTQL.train_step as Python; "compile" wraps draws + step in
    torch.compile(fullgraph=True); "cudagraph" (CUDA only) additionally captures the compiled
    step in a CUDA graph after warm-up and replays it.
    """

    def __init__(self, agent: FastDTQL, data: Transitions, mode: str = "eager", pretrain: bool = False):
        h = agent.hyper
        self.agent, self.data, self.mode = agent, data, mode
        step = agent.pretrain_step if pretrain else agent.train_step

        def fn():
            with phase("sample"):
                draws = sample_draws(data.n, h.batch_size, agent.action_dim, h.noise_levels, device=agent.device,
                                     groups=len(agent.seeds))  # data.n: per-agent sizes (AgentData) or one
            return step(data, draws)

        self.compile_seconds = 0.0
        if mode == "eager":
            self._fn = fn
        elif mode in ("compile", "cudagraph"):
            self._fn = compiled = compiling.CompileOnFirstCall(fn, agent.device)
        else:
            raise ValueError(f"mode must be eager, compile or cudagraph, got {mode!r}")
        if mode == "cudagraph":
            if agent.device.type != "cuda":
                raise ValueError("cudagraph mode needs a CUDA device")
            self._fn = CUDAGraphStep(compiled)
        self._calls = 0

    def __call__(self) -> torch.Tensor:
        with phase("step"):
            return self._call()

    def _call(self) -> torch.Tensor:
        if self._calls == 0 and self.mode != "eager":
            t0 = time.perf_counter()
            out = self._fn()
            if self.agent.device.type == "cuda":
                torch.cuda.synchronize()
            self.compile_seconds = time.perf_counter() - t0
        else:
            out = self._fn()
        self._calls += 1
        return out


class CUDAGraphStep:
    """Replays a step captured in a CUDA graph. Every call is one real step: the first
    `warmup` calls run the step normally (compilation, allocator warm-up), the next one captures
    it and then replays it, since capture itself executes nothing.

    Parameters, optimiser states and the dataset are persistent tensors, so their addresses are
    static; random draws come from the default CUDA generator, whose philox offsets a captured
    graph advances on each replay (graph-safe RNG).
    """

    def __init__(self, fn: Callable[[], torch.Tensor], warmup: int = 3):
        self.fn, self.warmup, self.calls = fn, warmup, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out = None

    def __call__(self) -> torch.Tensor:
        if self.graph is None and self.calls < self.warmup:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.fn()
            torch.cuda.current_stream().wait_stream(stream)
            self.calls += 1
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.fn()
        self.graph.replay()
        self.calls += 1
        return self.out
