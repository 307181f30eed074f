"""The reference DTQL: eager, plain PyTorch, and never optimised. It is the oracle.

It computes exactly docs/algorithm.md, quirks of the authors' release included.
Every random draw of a step comes in through a `Draws`, so the fast path can be fed the same
numbers and checked against this file. Work that a fast path may skip (a second critic forward,
gradients into networks the step does not update) is done here as the release does it.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .draws import Draws
from .edm import edm_loss
from .nets import Critic, DiffusionNet, GaussianPolicy
from .tasks import Hyper
from .transitions import Transitions


class ReferenceDTQL:
    def __init__(self, state_dim: int, action_dim: int, hyper: Hyper, device="cpu"):
        h = self.hyper = hyper
        self.state_dim, self.action_dim = state_dim, action_dim
        self.diffusion = DiffusionNet(state_dim, action_dim, h.hidden).to(device)
        self.critic = Critic(state_dim, action_dim, h.hidden).to(device)
        self.critic_target = copy.deepcopy(self.critic)
        self.policy = GaussianPolicy(state_dim, action_dim, h.hidden, h.max_action).to(device)
        self.diffusion_opt = torch.optim.Adam(self.diffusion.parameters(), lr=h.lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=h.critic_lr)
        self.policy_opt = torch.optim.Adam(self.policy.parameters(), lr=h.lr)
        self.schedulers = []
        if h.lr_decay:
            self.schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=h.total_steps, eta_min=0.0)
                               for opt in (self.critic_opt, self.diffusion_opt, self.policy_opt)]

    # -- the three updates, each one Adam step -------------------------------------------------

    def critic_update(self, s, a, r, s2, not_done) -> dict:
        h = self.hyper
        with torch.no_grad():
            q = self.critic.q_min(s, a)
        v = self.critic.value(s)
        d = q - v
        w = torch.where(d > 0, torch.full_like(d, h.expectile), torch.full_like(d, 1.0 - h.expectile))
        loss_v = (w * d ** 2).mean()
        with torch.no_grad():
            next_v = self.critic.value(s2)
            y = r + not_done * h.discount * next_v
        q1, q2 = self.critic.q(s, a)
        loss_q = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        self.critic_opt.zero_grad()
        (loss_v + loss_q).backward()
        self.critic_opt.step()
        return {"loss_v": loss_v.detach(), "loss_q": loss_q.detach(), "v_mean": v.detach().mean(),
                "q_mean": q.mean()}

    def bc_update(self, s, a, sigma, noise) -> dict:
        loss_bc = edm_loss(self.diffusion, a, s, sigma, noise, self.hyper.max_action)
        self.diffusion_opt.zero_grad()
        loss_bc.backward()
        self.diffusion_opt.step()
        return {"loss_bc": loss_bc.detach()}

    def policy_update(self, s, a, eps, sigma, noise) -> dict:
        h = self.hyper
        a_new = self.policy.sample(s, eps)
        loss_tr = edm_loss(self.diffusion, a_new, s, sigma, noise, h.max_action)
        loss_q = -self.critic.q_min(s, a_new).mean()
        loss = h.alpha * loss_tr + loss_q
        out = {"loss_tr": loss_tr.detach(), "loss_pq": loss_q.detach()}
        if h.gamma != 0:
            # Release quirk: the "entropy" term is the NLL of the dataset actions.
            loss_ent = -self.policy.log_prob(s, a).mean()
            loss = loss + h.gamma * loss_ent
            out["loss_ent"] = loss_ent.detach()
        self.policy_opt.zero_grad()
        loss.backward()
        self.policy_opt.step()
        out["loss_policy"] = loss.detach()
        return out

    @torch.no_grad()
    def target_update(self):
        tau = self.hyper.tau
        for p, tp in zip(self.critic.parameters(), self.critic_target.parameters()):
            tp.mul_(1.0 - tau).add_(tau * p)

    # -- steps ---------------------------------------------------------------------------------

    def train_step(self, data: Transitions, draws: Draws) -> dict:
        s, a, r, s2, not_done = data.batch(draws.idx)
        metrics = self.critic_update(s, a, r, s2, not_done)
        metrics |= self.bc_update(s, a, draws.sigma_bc, draws.noise_bc)
        metrics |= self.policy_update(s, a, draws.eps, draws.sigma_tr, draws.noise_tr)
        self.target_update()
        for sched in self.schedulers:
            sched.step()
        return metrics

    def pretrain_step(self, data: Transitions, draws: Draws) -> dict:
        """Diffusion net then critic, on one batch; no target update, no lr decay."""
        s, a, r, s2, not_done = data.batch(draws.idx)
        metrics = self.bc_update(s, a, draws.sigma_bc, draws.noise_bc)
        metrics |= self.critic_update(s, a, r, s2, not_done)
        return metrics

    @torch.no_grad()
    def act(self, states: torch.Tensor, eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One action per state: R policy candidates, scored by the target critic, one drawn
        from Categorical(softmax(q)).

        states (N, S); eps (N, R, A) the candidates' noise; u (N,) uniforms in [0, 1) that pick
        the category by inverting the softmax's CDF (an exact categorical draw).
        """
        N, R = states.shape[0], eps.shape[1]
        s_rep = states.repeat_interleave(R, dim=0)
        cand = self.policy.sample(s_rep, eps.reshape(N * R, -1))
        q = self.critic_target.q_min(s_rep, cand).reshape(N, R)
        cdf = torch.softmax(q, dim=1).cumsum(dim=1)
        idx = (cdf < u[:, None]).sum(dim=1).clamp(max=R - 1)
        return cand.reshape(N, R, -1)[torch.arange(N, device=states.device), idx]

    # -- weights -------------------------------------------------------------------------------

    def modules(self) -> dict:
        return {"diffusion": self.diffusion, "critic": self.critic, "critic_target": self.critic_target,
                "policy": self.policy}

    def optimizers(self) -> dict:
        return {"diffusion": self.diffusion_opt, "critic": self.critic_opt, "policy": self.policy_opt}
