"""The 2-D toy experiments of the DTQL paper (Section 3, Appendix G.1; Figures 3 and 6).

A one-state bandit: the "dataset" is 10,000 2-D actions (25 Gaussians or a swiss roll), all taken
in one dummy state s = 0, each with a reward that depends on its distance to the origin. An IQL
critic learns Q(a) from the data, and a one-step policy maximises Q under one of two regularisers:

  tr  DTQL's diffusion trust region: a diffusion net behaviour-clones the data with the EDM loss, and
      the Gaussian policy minimises  alpha * L_tr + L_q,  L_tr = the same EDM loss evaluated at the
      policy's own actions (diffusion net frozen). L_tr is small wherever the diffusion net denoises
      well, i.e. on the data manifold, so the policy is free to pick the best mode (mode seeking).
  kl  the KL-style distillation baseline (Diff-Instruct / DMD): an implicit generator a = G(z), a
      "fake score" diffusion net trained on G's actions, and G moved along (fake - real denoiser
      output), DMD's estimate of the reverse-KL gradient, plus the same Q term.

    python -m dtql_fast.toy --dataset all --reward all --method all --out toy_results

writes one PNG per run, grid.png (rows dataset x method, columns reward) and metrics.json (the
measures at the end, and every --log-every steps in `history`). --compile compiles the step's
losses (torch.compile, with the fast path's one-exp Mish): 1.7x faster on CPU, same run to fp32
round-off.
The networks and the EDM loss are dtql_fast.nets and dtql_fast.edm, the ones the trainer uses, at
the toy's sizes (hidden 128, time embedding 4) and with the denoised action left unclamped.

Batch sizes. The release takes full-batch steps: 10,000 data rows and 10,000 policy actions per
step. On 2 CPU cores that is 0.2-0.35 s a step, 12-20 min a panel. What the picture needs is many
policy actions for the regulariser. L_tr's per-sample gradient is heavy-tailed (weight 1 / c_out^2,
up to 2.5e5 at sigma_min), and Adam bounds what a rare large gradient can do to one step (our
reading of it), so with few actions a step the steady Q gradient wins: the policy runs into the tanh
box and its log-std into the clamp at 2, where the gradient is zero, and its actions stay smeared
along the box's edge. Measured on 25gaussians/far, seed 0: 11% in support with 1,000 actions a
step, 99.5% with 4,000, 100% at full batch. The critic, the behaviour cloning and the smooth Q term
do fine on fewer rows. So by default a step draws `batch` = 1,000 data rows (with replacement) for
the critic, BC and the Q term, and `policy_samples` = 4,000 actions for the regulariser: 2-4 min a
panel. --batch 0 --policy-samples 10000 is the release's full batch.
Even then the tr policy first overshoots to the box corner beyond the best mode (Q extrapolates
outwards) and the trust region pulls it back into the mode late, around steps 2000-3300; fewer
steps leave it on the box's edge.

Default alpha: tr 1.0 (the release's eta = 1): nearly all actions land on one high-reward Gaussian
("far": a corner, "hard": the doubled top-left corner, "near": the centre) or the matching stretch
of the swiss roll. kl 5.0: the DMD term is normalised per sample (by |a - D_real|), so its scale is
not L_tr's; at alpha 1 the Q term wins outright. The generator's output goes through the policy's
box, m tanh(G / m) (m = the data's largest coordinate): the identity on the data, bounded beyond it.
The release's generator is unbounded, and here it ran away (actions ~1e10 on 25gaussians, at alpha
1 and 5): once it leaves the data both denoisers extrapolate alike, the DMD term vanishes, and Adam
keeps following Q's tiny outward gradient. With one fake-score update per generator update (our
first version) the generator still outran the fake score. Compiled, seed 0, in support was 0.00 on
25gaussians/near and /hard and on swissroll/far (on a corner of the box, where tanh has no gradient
left; on /hard and swissroll/far with a reward above the data's best) and 0.35 on 25gaussians/far.
kl amplifies fp32 round-off (see tests/test_toy.py), and the eager runs of the same seed ended
elsewhere (25gaussians/near: 1.00 eager, 0.00 compiled). So the fake score takes `fake_updates` = 5
steps per generator step, DMD2's two-time-scale rule: then, seed 0, in support 0.48
(25gaussians/far), 0.84 (25gaussians/near), 0.69 (swissroll/far). The kl baseline remains the
noisier method (the release's own script stops its kl runs at 1500-2500 steps); the numbers above
are single runs.

Other differences from the release's toy script, all deliberate:
- The critic is a bandit critic: Q is regressed on r alone (there is no next state). The release
  feeds s' = s, not_done = 1, so its Q target is r + 0.99 V(s): a shifted copy of r, same gradient.
- Critic and policy are hidden 128 (the release's toy used its 256-wide defaults for both).
- `alpha` weighs the regulariser (the release's `eta` weighs the Q term: alpha = 1 / eta gives the
  same direction of update, with a different step size).
- The policy and V see only the one dummy state, so they are evaluated on one row and broadcast:
  the same numbers as evaluating thousands of identical rows, for free.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .edm import edm_loss, edm_prepare, precondition, sample_sigma
from .nets import Critic, DiffusionNet, FastMish, GaussianPolicy

DATASETS = ("25gaussians", "swissroll")
REWARDS = ("far", "near", "hard")
METHODS = ("tr", "kl")

GAUSS_STD = 0.3
GAUSS_MEANS = torch.cartesian_prod(torch.linspace(-10, 10, 5), torch.linspace(-10, 10, 5))  # (25, 2)
SWISS_NOISE = 0.1
# "In support": within 3 std of a Gaussian's mean; for the swiss roll, closer than SWISS_RADIUS to
# some data point (5 noise std; the roll's arms are > 9 apart, so this never bridges two arms).
GAUSS_RADIUS = 3 * GAUSS_STD
SWISS_RADIUS = 0.5


DEFAULT_ALPHA = {"tr": 1.0, "kl": 5.0}  # see the module docstring


_CLI_FIELDS = ("steps", "policy_samples", "fake_updates", "batch", "lr", "alpha", "log_every", "seed")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-") if field in _CLI_FIELDS else field


@dataclass
class ToyConfig:
    dataset: str = "25gaussians"  # 25gaussians | swissroll
    reward: str = "far"           # far | near | hard
    method: str = "tr"            # tr (diffusion trust region) | kl (DMD-style distillation)
    steps: int = 3500             # training steps (the release's count)
    batch: int = 1000             # data rows a step (critic, BC, Q term), with replacement; 0 = all
    policy_samples: int = 4000    # policy actions a step for the regulariser (release: 10,000)
    alpha: float | None = None    # regulariser weight against L_q; None: DEFAULT_ALPHA[method]
    lr: float = 3e-3              # Adam, every network (the toy's critic too)
    hidden: int = 128
    t_dim: int = 4                # time-embedding width of the diffusion nets
    expectile: float = 0.95
    n_data: int = 10_000
    n_eval: int = 1_000           # policy actions drawn for the figure and the measures
    fake_updates: int = 5         # kl: fake-score steps per generator step (DMD2's two time scales)
    gen_sigma: float = 2.5        # kl: the generator's input is gen_sigma * z, z ~ N(0, I) (release)
    seed: int = 0
    log_every: int = 100          # steps between in-support / reward measurements in `history`
    compile: bool = False         # torch.compile the step's losses (1.7x on CPU; see train)

    def __post_init__(self):
        # Named as the CLI's flags where there is one: the CLI reports these messages as they are.
        for value, allowed in ((self.dataset, DATASETS), (self.reward, REWARDS), (self.method, METHODS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
        for field in ("steps", "policy_samples", "fake_updates", "n_data", "n_eval", "hidden", "t_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{_flag(field)} must be at least 1, got {getattr(self, field)}")
        if self.batch < 0:
            raise ValueError(f"--batch must be >= 0 (0 = all rows), got {self.batch}")
        if self.log_every < 0:
            raise ValueError(f"--log-every must be >= 0 (0 = no history), got {self.log_every}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.alpha is None:
            self.alpha = DEFAULT_ALPHA[self.method]
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"--alpha must be a finite number >= 0, got {self.alpha}")

    @property
    def name(self) -> str:
        return f"{self.dataset}_{self.reward}_{self.method}_alpha{self.alpha:g}_steps{self.steps}_seed{self.seed}"


# ---------------------------------------------------------------------------------------------
# Data and rewards
# ---------------------------------------------------------------------------------------------

def sample_25_gaussians(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n // 25 points around each of the 25 grid means (n = 10,000 gives 400 per mode)."""
    per_mode = n // len(GAUSS_MEANS)
    noise = torch.randn(len(GAUSS_MEANS), per_mode, 2, generator=generator) * GAUSS_STD
    return (GAUSS_MEANS[:, None, :] + noise).reshape(-1, 2)


def sample_swiss_roll(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(x, z) of the standard 3-D swiss roll: t = 1.5 pi (1 + 2u), (t cos t, t sin t), + N(0, 0.1^2).

    The roll's height coordinate y is dropped, so drawing it would change nothing but the RNG stream.
    """
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    xz = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    return xz + SWISS_NOISE * torch.randn(n, 2, generator=generator)


def make_data(dataset: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if dataset == "25gaussians":
        return sample_25_gaussians(n, generator)
    if dataset == "swissroll":
        return sample_swiss_roll(n, generator)
    raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")


def reward_fn(kind: str, a: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Reward of actions a (N, 2) -> (N,). max_norm: the largest ||a|| in the data ("near" only)."""
    norm = a.norm(dim=-1)
    if kind == "far":
        return norm
    if kind == "near":
        return max_norm - norm
    if kind == "hard":
        # The top-left corner pays double, so the best action is one specific mode, not any corner.
        corner = (a[:, 0] < -7.5) & (a[:, 1] > 7.5)
        return torch.where(corner, 2 * norm, norm)
    raise ValueError(f"unknown reward {kind!r}; choose from {REWARDS}")


def in_support(dataset: str, a: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Boolean (N,): is each action on the data (see GAUSS_RADIUS, SWISS_RADIUS)?"""
    if dataset == "25gaussians":
        return torch.cdist(a, GAUSS_MEANS).min(dim=1).values < GAUSS_RADIUS
    return torch.cdist(a, data).min(dim=1).values < SWISS_RADIUS


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def denoise(net: DiffusionNet, x: torch.Tensor, s: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor):
    """EDM denoiser output D(x + sigma n; sigma), unclamped; sigma (N, 1), noise (N, 1, A)."""
    x_in, t = edm_prepare(x, sigma, noise)
    c_skip, c_out, _ = precondition(sigma)
    return c_out * net(x_in, s, t) + c_skip * (x + sigma * noise[:, 0])


def edm_draws(n: int, action_dim: int = 2):
    """One noise level per row (K = 1, the reference) and its Gaussian noise."""
    return sample_sigma((n, 1)), torch.randn(n, 1, action_dim)


class frozen:
    """Context manager: requires_grad off for the given modules' parameters, then restored."""

    def __init__(self, *modules):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.saved):
            p.requires_grad_(flag)


def train(cfg: ToyConfig, progress: bool = True) -> dict:
    """Train one (dataset, reward, method) panel; return the data, 1000 policy actions, and measures."""
    torch.manual_seed(cfg.seed)
    data = make_data(cfg.dataset, cfg.n_data, torch.Generator().manual_seed(cfg.seed))
    N = data.shape[0]
    max_norm = data.norm(dim=-1).max().item()
    r = reward_fn(cfg.reward, data, max_norm)[:, None]  # (N, 1)
    B = cfg.batch if 0 < cfg.batch < N else N
    P = cfg.policy_samples
    Q = min(B, P)  # Q is smooth: its term needs no more actions than the critic sees rows
    s = torch.zeros(max(B, P, cfg.n_eval), 1)  # the dummy state, one row per action
    s0 = torch.zeros(1, 1)  # the same state once: V, the policy and the generator's t broadcast from it
    max_action = data.abs().max().item()

    # Compiled, Mish is the fast path's one-exp FastMish (same values to fp32 round-off): inductor's
    # fused aten mish costs several times more, and Mish is half of an eager toy step.
    act_fn = FastMish if cfg.compile else nn.Mish
    critic = Critic(1, 2, cfg.hidden, act=act_fn)
    diffusion = DiffusionNet(1, 2, cfg.hidden, cfg.t_dim, act=act_fn)  # behaviour cloning: the "real" score
    critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.lr)
    diffusion_opt = torch.optim.Adam(diffusion.parameters(), lr=cfg.lr)
    if cfg.method == "tr":
        policy = GaussianPolicy(1, 2, cfg.hidden, max_action)
        policy_opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    elif cfg.method == "kl":
        # The implicit generator is a DiffusionNet called at one fixed time input: an MLP from
        # (gen_sigma * z, s) to an action, laid out as the release's generator is, then squashed
        # into the same box as the Gaussian policy's.
        generator = DiffusionNet(1, 2, cfg.hidden, cfg.t_dim, act=act_fn)
        fake_score = DiffusionNet(1, 2, cfg.hidden, cfg.t_dim, act=act_fn)
        policy_opt = torch.optim.Adam(generator.parameters(), lr=cfg.lr)
        fake_opt = torch.optim.Adam(fake_score.parameters(), lr=cfg.lr)
        t_gen = torch.full((1,), cfg.gen_sigma).expand(len(s))  # the release feeds the raw gen_sigma as t
    else:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {METHODS}")

    def act(eps: torch.Tensor) -> torch.Tensor:
        if cfg.method == "tr":
            return policy.sample(s0, eps)  # mu, std from the one state, broadcast over the draws
        # The policy's box, m tanh(G / m): the identity on the data, bounded beyond it (see DEFAULT_ALPHA).
        n = len(eps)
        g = generator(cfg.gen_sigma * eps, s[:n], t_gen[:n])
        return max_action * torch.tanh(g / max_action)

    # The step's losses (kl adds fake_loss), each a pure function of the batch and its random draws
    # (drawn outside, so compiled and eager runs consume the same random stream).
    def critic_loss(a, r_a):
        # IQL, bandit form: Q regresses onto r; V is the expectile of min(Q1, Q2).
        q1, q2 = critic.q(s[:B], a)
        q = torch.minimum(q1, q2).detach()
        d = q - critic.value(s0)
        w = torch.where(d > 0, cfg.expectile, 1.0 - cfg.expectile)
        loss_v = (w * d ** 2).mean()
        loss_q = ((q1 - r_a) ** 2).mean() + ((q2 - r_a) ** 2).mean()
        return loss_v + loss_q, loss_q

    def bc_loss(a, sigma, noise):
        # Behaviour cloning of the data with the EDM loss (no action box: unclamped).
        return edm_loss(diffusion, a, s[:B], sigma, noise, max_action=None)

    def policy_loss(eps, sigma, noise):
        # Regulariser + Q term. The critic and the diffusion nets only pass gradients through to
        # the actions (they are frozen around this call: no weight gradients).
        a_new = act(eps)
        a_q = a_new[:Q]
        loss_pq = -critic.q_min(s[:Q], a_q).mean()
        if cfg.method == "tr":
            loss_reg = edm_loss(diffusion, a_new, s[:P], sigma, noise, max_action=None)
        else:
            # DMD: move each action along D_real - D_fake (the reverse-KL gradient up to a per-sigma
            # weight), normalised per sample by |a - D_real| as in the DMD paper. Real and fake see
            # the same sigma and noise, so their difference is low-variance.
            with torch.no_grad():
                d_real = denoise(diffusion, a_new, s[:P], sigma, noise)
                d_fake = denoise(fake_score, a_new, s[:P], sigma, noise)
                grad = (d_fake - d_real) / (a_new - d_real).abs().mean(dim=1, keepdim=True)
            # A loss whose gradient w.r.t. a_new is grad / (P * 2).
            loss_reg = 0.5 * ((a_new - (a_new - grad).detach()) ** 2).mean()
        return cfg.alpha * loss_reg + loss_pq, loss_reg, loss_pq, a_q.detach()

    def fake_loss(a_q, sigma, noise):
        # kl only: the fake score tracks the generator's current action distribution.
        return edm_loss(fake_score, a_q, s[:Q], sigma, noise, max_action=None)

    if cfg.compile:
        critic_loss, bc_loss, policy_loss, fake_loss = (
            torch.compile(f, fullgraph=True) for f in (critic_loss, bc_loss, policy_loss, fake_loss))

    # The history's draws come from their own generator, so logging leaves training's RNG stream,
    # and with it the run, unchanged.
    history_gen = torch.Generator().manual_seed(cfg.seed + 1)

    def measure(n: int, gen: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            actions = act(torch.randn(n, 2, generator=gen))
            return actions, {"in_support_frac": in_support(cfg.dataset, actions, data).float().mean().item(),
                             "policy_reward_mean": reward_fn(cfg.reward, actions, max_norm).mean().item()}

    log, history = {}, []
    bar = tqdm(range(cfg.steps), desc=cfg.name, disable=not progress, mininterval=1.0)
    for step in bar:
        if B == N:
            a, r_a = data, r
        else:
            idx = torch.randint(0, N, (B,))
            a, r_a = data[idx], r[idx]

        # 1. Critic.
        loss_critic, loss_q = critic_loss(a, r_a)
        critic_opt.zero_grad()
        loss_critic.backward()
        critic_opt.step()

        # 2. Behaviour cloning.
        loss_bc = bc_loss(a, *edm_draws(B))
        diffusion_opt.zero_grad()
        loss_bc.backward()
        diffusion_opt.step()

        # 3. Policy.
        eps = torch.randn(P, 2)
        with frozen(critic, diffusion):
            loss_policy, loss_reg, loss_pq, a_q = policy_loss(eps, *edm_draws(P))
        policy_opt.zero_grad()
        loss_policy.backward()
        policy_opt.step()

        # 4. kl only: the fake score, fake_updates steps on the generator's latest actions.
        if cfg.method == "kl":
            for _ in range(cfg.fake_updates):
                loss_fake = fake_loss(a_q, *edm_draws(Q))
                fake_opt.zero_grad()
                loss_fake.backward()
                fake_opt.step()
            log["loss_fake"] = loss_fake.item()

        if step % 50 == 0 or step == cfg.steps - 1:
            log |= {"loss_q": loss_q.item(), "loss_bc": loss_bc.item(),
                    "loss_reg": loss_reg.item(), "q_pi": -loss_pq.item()}
            bar.set_postfix({k: f"{v:.3g}" for k, v in log.items()}, refresh=False)
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            history.append({"step": step + 1, **measure(cfg.n_eval, history_gen)[1]})

    actions, final = measure(cfg.n_eval)
    data_r = reward_fn(cfg.reward, data, max_norm)
    measures = {
        "in_support_frac": final["in_support_frac"],
        "in_support_rule": (f"distance to nearest Gaussian mean < {GAUSS_RADIUS:g} (3 std)"
                            if cfg.dataset == "25gaussians"
                            else f"distance to nearest data point < {SWISS_RADIUS:g}"),
        "policy_reward_mean": final["policy_reward_mean"],
        "data_reward_mean": data_r.mean().item(),
        "data_reward_max": data_r.max().item(),
        "final_losses": dict(log),
        "history": history,
    }
    return {"config": cfg, "data": data, "actions": actions, "rewards": data_r, "measures": measures}


# ---------------------------------------------------------------------------------------------
# Figures and the CLI
# ---------------------------------------------------------------------------------------------

PANEL_SIZE = (6.0, 5.0)  # inches; at PANEL_DPI, a 600 x 500 PNG
PANEL_DPI = 100
METHOD_LABEL = {"tr": "DTQL trust region", "kl": "KL (DMD) distillation"}


def draw_panel(ax, result: dict, title: str | None = None):
    cfg, m = result["config"], result["measures"]
    data, actions = result["data"].numpy(), result["actions"].numpy()
    sc = ax.scatter(data[:, 0], data[:, 1], c=result["rewards"].numpy(), s=2, cmap="viridis", rasterized=True)
    ax.scatter(actions[:, 0], actions[:, 1], c="red", s=4, alpha=0.5, label="policy actions")
    lim = np.abs(data).max() * 1.15
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title or (f"{METHOD_LABEL[cfg.method]}: {cfg.dataset}, {cfg.reward}\n"
                           f"alpha={cfg.alpha:g}, steps={cfg.steps}, seed={cfg.seed}; "
                           f"in-support {m['in_support_frac']:.2f}, "
                           f"r {m['policy_reward_mean']:.2f} (data {m['data_reward_mean']:.2f})"),
                 fontsize=8)
    return sc


def save_panel(result: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A fixed figure size and dpi, and no tight bbox, so the PNG's pixel size is known in advance.
    fig, ax = plt.subplots(figsize=PANEL_SIZE, dpi=PANEL_DPI)
    sc = draw_panel(ax, result)
    fig.colorbar(sc, ax=ax, label="reward")
    ax.set_xlabel("action dim 1")
    ax.set_ylabel("action dim 2")
    fig.savefig(path, dpi=PANEL_DPI)
    plt.close(fig)


def save_grid(results: list[dict], path: str):
    """Rows (dataset, method), columns rewards: the layout of the paper's Figures 3 and 6."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({(r["config"].dataset, r["config"].method) for r in results},
                  key=lambda dm: (DATASETS.index(dm[0]), METHODS.index(dm[1])))
    cols = sorted({r["config"].reward for r in results}, key=REWARDS.index)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.6 * len(cols), 3.6 * len(rows)),
                             squeeze=False, dpi=PANEL_DPI)
    for ax in axes.flat:
        ax.axis("off")
    for res in results:
        cfg, m = res["config"], res["measures"]
        ax = axes[rows.index((cfg.dataset, cfg.method)), cols.index(cfg.reward)]
        ax.axis("on")
        draw_panel(ax, res, title=(f"{cfg.method} (alpha {cfg.alpha:g}) | {cfg.dataset} | {cfg.reward}\n"
                                   f"in-support {m['in_support_frac']:.2f}, "
                                   f"r {m['policy_reward_mean']:.1f} / data {m['data_reward_mean']:.1f}"))
        ax.tick_params(labelsize=6)
    first = results[0]["config"]
    fig.suptitle(f"tr (DTQL diffusion trust region) vs kl (DMD distillation); steps={first.steps}, "
                 f"seed={first.seed}; red: {first.n_eval} policy actions", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    d = ToyConfig()
    p = argparse.ArgumentParser(
        prog="python -m dtql_fast.toy",
        description="DTQL's 2-D toy experiments: a one-state bandit on 25 Gaussians or a swiss roll; "
                    "DTQL's diffusion trust region (tr) vs a KL / DMD distillation baseline (kl). "
                    "Writes one PNG per run, grid.png, and metrics.json to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default=d.dataset, choices=DATASETS + ("all",))
    p.add_argument("--reward", default=d.reward, choices=REWARDS + ("all",),
                   help="far: ||a||; near: max||a|| - ||a||; hard: ||a||, doubled where a1 < -7.5, a2 > 7.5 "
                        "(no swiss-roll point lies there, so on the swiss roll hard = far)")
    p.add_argument("--method", default=d.method, choices=METHODS + ("all",),
                   help="tr: diffusion trust region (DTQL); kl: DMD-style distillation with an implicit generator")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (the release: 3500)")
    p.add_argument("--batch", type=int, default=d.batch,
                   help="data rows a step for the critic, behaviour cloning and the Q term, drawn with "
                        "replacement; 0 = all 10,000 (the release)")
    p.add_argument("--policy-samples", type=int, default=d.policy_samples,
                   help="policy actions a step for the regulariser (the release: 10,000); fewer than "
                        "~4,000 and L_tr's gradient noise smears the tr policy along the action box")
    p.add_argument("--alpha", type=float, default=None,
                   help="regulariser weight: the policy minimises alpha * regulariser - mean Q; "
                        "None: per method, " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_ALPHA.items()))
    p.add_argument("--fake-updates", type=int, default=d.fake_updates,
                   help="kl: fake-score updates per generator update (DMD2's two time scales; with 1 the "
                        "generator outruns the fake score and collapses off the data)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the step's losses: about 1.7x faster on CPU after ~30 s of compiling")
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help="steps between the in-support / reward measurements kept in metrics.json's history; 0: none")
    p.add_argument("--out", default="toy_results", help="output directory")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, None: torch's choice; 1 is faster on a busy machine")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    pick = lambda v, every: every if v == "all" else (v,)  # noqa: E731
    try:  # every run's config checked before the first one trains
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        cfgs = [ToyConfig(dataset=dataset, reward=reward, method=method, steps=args.steps, batch=args.batch,
                          policy_samples=args.policy_samples, alpha=args.alpha, lr=args.lr, seed=args.seed,
                          compile=args.compile, log_every=args.log_every, fake_updates=args.fake_updates)
                for dataset in pick(args.dataset, DATASETS) for reward in pick(args.reward, REWARDS)
                for method in pick(args.method, METHODS)]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {args.out}: cannot write there ({e.strerror}); choose another --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for cfg in cfgs:
        t0 = time.perf_counter()
        res = train(cfg)
        res["measures"]["wall_s"] = round(time.perf_counter() - t0, 1)
        png = os.path.join(args.out, cfg.name + ".png")
        save_panel(res, png)
        m = res["measures"]
        print(f"{cfg.name}: in-support {m['in_support_frac']:.3f}, policy reward "
              f"{m['policy_reward_mean']:.3f} (data mean {m['data_reward_mean']:.3f}, "
              f"max {m['data_reward_max']:.3f}), {m['wall_s']} s -> {png}")
        results.append(res)
    if len(results) > 1:
        save_grid(results, os.path.join(args.out, "grid.png"))
    summary = {r["config"].name: {"config": asdict(r["config"]), **r["measures"]} for r in results}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return results


if __name__ == "__main__":
    main()
