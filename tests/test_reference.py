"""The reference against an update written out independently here, from the spec's text.

The independent step uses functional calls, hand-written Adam and a hand-written cosine
schedule, so a mistake in reference.py (order of updates, which critic, which lr, which actions
the entropy term sees, a missing clamp) shows up as a mismatch.
"""
import math

import pytest
import torch
from torch.func import functional_call

from dtql_fast.draws import sample_draws
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.tasks import Hyper
from dtql_fast.transitions import Transitions

S, A, N = 5, 3, 64
SD = 0.5


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Transitions(
        obs=torch.randn(N, S, generator=g), actions=torch.rand(N, A, generator=g) * 2 - 1,
        rewards=torch.randn(N, 1, generator=g), next_obs=torch.randn(N, S, generator=g),
        not_done=(torch.rand(N, 1, generator=g) > 0.2).float())


class _Adam:
    def __init__(self, params, lr):
        self.lr0 = lr
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads, lr):
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        out = {}
        for k, p in params.items():
            g = grads[k]
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1 ** self.t)
            v_hat = self.v[k] / (1 - b2 ** self.t)
            out[k] = p - lr * m_hat / (v_hat.sqrt() + eps)
        return out


def _edm(diff_params, diffusion, x, s, sigma, noise):
    c_skip = SD ** 2 / (sigma ** 2 + SD ** 2)
    c_out = sigma * SD / (sigma ** 2 + SD ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + SD ** 2).sqrt()
    xn = x + sigma * noise
    Fo = functional_call(diffusion, diff_params, (c_in * xn, s, (sigma.log() / 4).squeeze(1)))
    D = (c_out * Fo + c_skip * xn).clamp(-1, 1)
    return (((D - x) / c_out) ** 2).mean()


def _qmin(crit_params, critic, s, a):
    sa = torch.cat([s, a], 1)
    q1 = functional_call(critic.q1, {k[3:]: v for k, v in crit_params.items() if k.startswith("q1.")}, (sa,))
    q2 = functional_call(critic.q2, {k[3:]: v for k, v in crit_params.items() if k.startswith("q2.")}, (sa,))
    return q1, q2


def _v(crit_params, critic, s):
    return functional_call(critic.v, {k[2:]: v for k, v in crit_params.items() if k.startswith("v.")}, (s,))


def _independent_steps(agent, data, draws_list, h):
    """Run len(draws_list) DTQL steps from the agent's current weights, by the spec."""
    detach = lambda m: {k: v.detach().clone() for k, v in m.named_parameters()}
    cp, dp, pp = detach(agent.critic), detach(agent.diffusion), detach(agent.policy)
    tp = detach(agent.critic_target)
    opt_c, opt_d, opt_p = _Adam(cp, h.critic_lr), _Adam(dp, h.lr), _Adam(pp, h.lr)
    losses = []
    for t, dr in enumerate(draws_list):
        decay = 0.5 * (1 + math.cos(math.pi * t / h.total_steps)) if h.lr_decay else 1.0
        s, a, r, s2, nd = (x[dr.idx] for x in (data.obs, data.actions, data.rewards, data.next_obs, data.not_done))
        # 1. critic
        cpg = {k: v.requires_grad_() for k, v in cp.items()}
        q1, q2 = _qmin(cpg, agent.critic, s, a)
        q = torch.minimum(q1, q2).detach()
        v = _v(cpg, agent.critic, s)
        d = q - v
        w = torch.where(d > 0, h.expectile, 1 - h.expectile)
        lv = (w * d ** 2).mean()
        y = (r + nd * h.discount * _v(cpg, agent.critic, s2)).detach()
        lq = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
        grads = dict(zip(cpg, torch.autograd.grad(lv + lq, list(cpg.values()))))
        cp = opt_c.step({k: v.detach() for k, v in cpg.items()}, grads, h.critic_lr * decay)
        # 2. behaviour cloning
        dpg = {k: v.requires_grad_() for k, v in dp.items()}
        lbc = _edm(dpg, agent.diffusion, a, s, dr.sigma_bc, dr.noise_bc[:, 0])
        grads = dict(zip(dpg, torch.autograd.grad(lbc, list(dpg.values()))))
        dp = opt_d.step({k: v.detach() for k, v in dpg.items()}, grads, h.lr * decay)
        # 3. policy, against the critic and diffusion net as just updated
        ppg = {k: v.requires_grad_() for k, v in pp.items()}
        mu, log_std = functional_call(agent.policy.net, {k[4:]: v for k, v in ppg.items()}, (s,)).chunk(2, 1)
        std = log_std.clamp(-5, 2).exp()
        a_new = torch.tanh(mu + std * dr.eps).clamp(-1, 1)
        ltr = _edm(dp, agent.diffusion, a_new, s, dr.sigma_tr, dr.noise_tr[:, 0])
        lpq = -torch.minimum(*_qmin(cp, agent.critic, s, a_new)).mean()
        loss = h.alpha * ltr + lpq
        if h.gamma:
            z = torch.atanh(a / 1.001)
            logp = (-((z - mu) ** 2) / (2 * std ** 2) - std.log() - 0.5 * math.log(2 * math.pi)).sum(1)
            loss = loss + h.gamma * (-logp.mean())
        grads = dict(zip(ppg, torch.autograd.grad(loss, list(ppg.values()))))
        pp = opt_p.step({k: v.detach() for k, v in ppg.items()}, grads, h.lr * decay)
        # 4. target
        tp = {k: (1 - h.tau) * tp[k] + h.tau * cp[k] for k in tp}
        losses.append({"loss_v": lv.item(), "loss_q": lq.item(), "loss_bc": lbc.item(), "loss_tr": ltr.item(),
                       "loss_pq": lpq.item(), "loss_policy": loss.item()})
    return {"critic": cp, "diffusion": dp, "policy": pp, "critic_target": tp}, losses


@pytest.mark.parametrize("gamma,lr_decay", [(0.0, False), (1.0, True)])
def test_full_update_matches_independent_computation(gamma, lr_decay):
    h = Hyper(alpha=2.5, gamma=gamma, lr=1e-3, lr_decay=lr_decay, epochs=1, steps_per_epoch=3,
              batch_size=16, expectile=0.7, hidden=32)
    torch.manual_seed(3)
    agent = ReferenceDTQL(S, A, h)
    data = _data()
    g = torch.Generator().manual_seed(7)
    draws = [sample_draws(N, h.batch_size, A, generator=g) for _ in range(3)]
    expected, exp_losses = _independent_steps(agent, data, draws, h)
    for dr, el in zip(draws, exp_losses):
        got = agent.train_step(data, dr)
        for k, v in el.items():
            assert got[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), k
        assert ("loss_ent" in got) == bool(gamma)
    for name, params in expected.items():
        module = agent.modules()[name]
        for k, p in module.named_parameters():
            torch.testing.assert_close(p.detach(), params[k], rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")
    # lr after 3 of 3 steps: the cosine has reached 0 with decay, the initial value without.
    want = [0.0, 0.0, 0.0] if lr_decay else [3e-4, 1e-3, 1e-3]
    got_lr = [agent.critic_opt.param_groups[0]["lr"], agent.diffusion_opt.param_groups[0]["lr"],
              agent.policy_opt.param_groups[0]["lr"]]
    assert got_lr == pytest.approx(want, abs=1e-12)


def test_gamma_changes_the_policy_update():
    h = Hyper(alpha=1.0, gamma=0.0, lr=1e-3, lr_decay=False, epochs=1, batch_size=8, hidden=32)
    data = _data()
    dr = sample_draws(N, 8, A, generator=torch.Generator().manual_seed(1))
    out = []
    for gamma in (0.0, 1.0):
        torch.manual_seed(0)
        agent = ReferenceDTQL(S, A, h.replace(gamma=gamma))
        agent.train_step(data, dr)
        out.append(torch.cat([p.flatten() for p in agent.policy.parameters()]))
    assert not torch.allclose(out[0], out[1])


def test_policy_step_leaves_critic_and_diffusion_weights_alone():
    h = Hyper(alpha=1.0, gamma=1.0, lr=1e-3, lr_decay=False, epochs=1, batch_size=8, hidden=32)
    agent = ReferenceDTQL(S, A, h)
    data = _data()
    dr = sample_draws(N, 8, A, generator=torch.Generator().manual_seed(1))
    s, a, *_ = data.batch(dr.idx)
    before = [p.detach().clone() for p in list(agent.critic.parameters()) + list(agent.diffusion.parameters())]
    agent.policy_update(s, a, dr.eps, dr.sigma_tr, dr.noise_tr)
    after = list(agent.critic.parameters()) + list(agent.diffusion.parameters())
    assert all(torch.equal(b, p) for b, p in zip(before, after))


def test_pretrain_step_updates_diffusion_then_critic_only():
    h = Hyper(alpha=1.0, gamma=0.0, lr=1e-3, lr_decay=True, epochs=1, batch_size=8, hidden=32)
    agent = ReferenceDTQL(S, A, h)
    data = _data()
    snap = {n: [p.detach().clone() for p in m.parameters()] for n, m in agent.modules().items()}
    agent.pretrain_step(data, sample_draws(N, 8, A, generator=torch.Generator().manual_seed(2)))
    changed = {n: any(not torch.equal(a, b) for a, b in zip(snap[n], m.parameters()))
               for n, m in agent.modules().items()}
    assert changed == {"diffusion": True, "critic": True, "critic_target": False, "policy": False}
    assert agent.diffusion_opt.param_groups[0]["lr"] == 1e-3  # no decay in pretraining


def test_act_uses_target_critic_and_softmax_draw():
    h = Hyper(alpha=1.0, gamma=0.0, lr=1e-3, lr_decay=False, epochs=1, hidden=32)
    agent = ReferenceDTQL(S, A, h)
    Nst, R = 4, 16
    states = torch.randn(Nst, S)
    eps = torch.randn(Nst, R, A)
    # Make the target critic's q equal to 20 * a[0] (and the online critic the opposite),
    # so the draw should favour the candidate with the largest first action coordinate.
    for crit, sign in ((agent.critic_target, 1.0), (agent.critic, -1.0)):
        for q in (crit.q1, crit.q2):
            q.forward = (lambda sa, sign=sign: sign * 20.0 * sa[:, S:S + 1])
    cand = agent.policy.sample(states.repeat_interleave(R, 0), eps.reshape(Nst * R, A)).reshape(Nst, R, A)
    probs = torch.softmax(20.0 * cand[..., 0], dim=1)
    # Inverting the CDF: u just below the first cumulative mass picks index 0, just above picks 1.
    cdf = probs.cumsum(1)
    a0 = agent.act(states, eps, cdf[:, 0] * 0.999)
    a1 = agent.act(states, eps, cdf[:, 0] + (cdf[:, 1] - cdf[:, 0]) * 0.5)
    torch.testing.assert_close(a0, cand[:, 0])
    torch.testing.assert_close(a1, cand[:, 1])
    # Frequencies over many uniforms match softmax(q) of the target critic.
    M = 20000
    u = torch.rand(M)
    picks = agent.act(states[:1].expand(M, S), eps[:1].expand(M, R, A), u)
    match = (picks[:, None, :] == cand[0][None]).all(-1).float().mean(0)
    torch.testing.assert_close(match, probs[0], atol=0.015, rtol=0)
