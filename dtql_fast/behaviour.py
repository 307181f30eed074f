"""A realistic offline dataset the project rebuilds anywhere: a SAC behaviour policy and its rollouts.

The offline Reacher demo saturates (its scripted controller is the 100 of its own scale), so it
cannot tell a trainer that learns like the release from one that does not. This module makes a
D4RL-style "medium" dataset instead:

    python -m dtql_fast.behaviour train --env Hopper-v4 --steps 150000 --out POLICY.pt   # once: 24 min to 110k steps
    python -m dtql_fast.behaviour rollout --out data/hopper-sac-medium.hdf5              # 27 s for 200k rows

`train` runs SAC (CleanRL's recipe: twin Q, tanh-Gaussian actor, learned entropy weight) and keeps
the actor whose evaluated return lies closest to a "medium" level (D4RL's hopper-medium behaviour
scores about 44 normalised). The committed `assets/hopper-medium-sac.pt` is SAC step 110,000 of a
run stopped at 115,000 (its 10-episode evaluation: 39.1; profiling/results/learning/sac-train.log).
`rollout` runs it (sampled actions, as D4RL's medium data) into an HDF5 file in D4RL's format
(observations, actions, rewards, terminals, timeouts), so `train --task hopper-medium-v2 --dataset
FILE` reads it with D4RL's qlearning_dataset rule and evaluates on Hopper-v4 with D4RL's
normalisation. The file is the same bytes for the same seed on one machine (1 thread, seeded envs
and draws); the behaviour's own normalised score (24.7 over the 788 episodes of the default 200k
rows, seed 0) goes into the file's attributes and a JSON beside it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import optional
from .data import d4rl_fingerprint
from .tasks import TASKS

gym = optional.gymnasium()

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_POLICY = ASSETS / "hopper-medium-sac.pt"


def _d4rl_task_for(env_id: str):
    """The D4RL locomotion task that evaluates on env_id (tasks.py), for its normalisation."""
    for name in ("hopper-medium-v2", "walker2d-medium-v2", "halfcheetah-medium-v2"):
        if TASKS[name].env_id == env_id:
            return TASKS[name]
    return None


class Actor(nn.Module):
    """tanh-squashed diagonal Gaussian, two hidden layers (CleanRL's SAC actor)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mu, self.log_std = nn.Linear(hidden, act_dim), nn.Linear(hidden, act_dim)

    def forward(self, obs: torch.Tensor, eps: torch.Tensor | None = None):
        """(action, log-prob); eps None: the mean action."""
        h = self.net(obs)
        mu, log_std = self.mu(h), torch.tanh(self.log_std(h))
        log_std = -5 + 0.5 * (2 - (-5)) * (log_std + 1)  # in [-5, 2]
        std = log_std.exp()
        z = mu if eps is None else mu + std * eps
        a = torch.tanh(z)
        logp = (-0.5 * ((z - mu) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - torch.log(1 - a.pow(2) + 1e-6).sum(-1)
        return a, logp


class QNet(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, obs, act):
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


def _returns(env_id: str, actor: Actor, episodes: int, seed: int, sample: bool) -> np.ndarray:
    """Undiscounted returns of `episodes` episodes, env i seeded seed + i; sampled or mean actions."""
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(episodes)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    g = torch.Generator().manual_seed(seed)
    obs, _ = envs.reset(seed=[seed + i for i in range(episodes)])
    ret, live = np.zeros(episodes), np.ones(episodes, dtype=bool)
    with torch.no_grad():
        while live.any():
            o = torch.as_tensor(obs, dtype=torch.float32)
            eps = torch.randn(o.shape[0], envs.single_action_space.shape[0], generator=g) if sample else None
            a, _ = actor(o, eps)
            obs, r, term, trunc, _ = envs.step(a.numpy())
            ret[live] += r[live]
            live &= ~(term | trunc)
    envs.close()
    return ret


def train_sac(env_id: str, steps: int, out: Path, seed: int = 0, target_score: float = 45.0,
              eval_every: int = 5000, start_steps: int = 5000, batch: int = 256, eval_episodes: int = 10,
              stop_within: float | None = None, snapshots: Path | None = None) -> dict:
    """SAC on `env_id`; every eval_every steps the actor is evaluated (10 episodes, sampled actions)
    and the one whose normalised score lies closest to target_score is kept at `out`. With
    `stop_within`, training stops at the first evaluation within that many points of the target
    (SAC's later steps only climb past a "medium" level, and walker's take an hour). With `snapshots`, every
    evaluated actor is also saved there (step<N>.pt), to roll out another one without training again."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    task = _d4rl_task_for(env_id)
    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor, q1, q2 = Actor(obs_dim, act_dim), QNet(obs_dim, act_dim), QNet(obs_dim, act_dim)
    q1_t, q2_t = copy.deepcopy(q1), copy.deepcopy(q2)
    q_opt = torch.optim.Adam([*q1.parameters(), *q2.parameters()], lr=1e-3)
    pi_opt = torch.optim.Adam(actor.parameters(), lr=3e-4)
    log_alpha = torch.zeros(1, requires_grad=True)
    a_opt = torch.optim.Adam([log_alpha], lr=1e-3)
    target_entropy = -float(act_dim)
    buf = {"o": np.zeros((steps, obs_dim), np.float32), "a": np.zeros((steps, act_dim), np.float32),
           "r": np.zeros(steps, np.float32), "o2": np.zeros((steps, obs_dim), np.float32),
           "d": np.zeros(steps, np.float32)}
    obs, _ = env.reset(seed=seed)
    best, history, t0 = None, [], time.perf_counter()
    for t in range(steps):
        if t < start_steps:
            act = rng.uniform(-1, 1, act_dim).astype(np.float32)
        else:
            with torch.no_grad():
                act = actor(torch.as_tensor(obs, dtype=torch.float32)[None], torch.randn(1, act_dim))[0][0].numpy()
        obs2, r, term, trunc, _ = env.step(act)
        for k, v in (("o", obs), ("a", act), ("r", r), ("o2", obs2), ("d", float(term))):
            buf[k][t] = v
        obs = obs2
        if term or trunc:
            obs, _ = env.reset()
        if t >= start_steps:
            idx = rng.integers(0, t + 1, batch)
            o, a, r_, o2, d = (torch.as_tensor(buf[k][idx]) for k in ("o", "a", "r", "o2", "d"))
            alpha = log_alpha.exp().detach()
            with torch.no_grad():
                a2, logp2 = actor(o2, torch.randn_like(a))
                y = r_ + 0.99 * (1 - d) * (torch.min(q1_t(o2, a2), q2_t(o2, a2)) - alpha * logp2)
            q_loss = F.mse_loss(q1(o, a), y) + F.mse_loss(q2(o, a), y)
            q_opt.zero_grad(); q_loss.backward(); q_opt.step()  # noqa: E702
            if t % 2 == 0:  # delayed actor and entropy-weight updates (CleanRL: policy_frequency 2)
                for _ in range(2):
                    pi, logp = actor(o, torch.randn_like(a))
                    pi_loss = (alpha * logp - torch.min(q1(o, pi), q2(o, pi))).mean()
                    pi_opt.zero_grad(); pi_loss.backward(); pi_opt.step()  # noqa: E702
                    a_loss = (-log_alpha.exp() * (logp.detach() + target_entropy)).mean()
                    a_opt.zero_grad(); a_loss.backward(); a_opt.step()  # noqa: E702
                    alpha = log_alpha.exp().detach()
            with torch.no_grad():
                for p, pt in zip([*q1.parameters(), *q2.parameters()], [*q1_t.parameters(), *q2_t.parameters()]):
                    pt.lerp_(p, 0.005)
        if (t + 1) % eval_every == 0 and t >= start_steps:
            ret = _returns(env_id, actor, eval_episodes, 10_000 + t, sample=True)
            score = task.normalized_score(float(ret.mean())) if task else None
            history.append({"step": t + 1, "return": float(ret.mean()), "score": score,
                            "wall_s": time.perf_counter() - t0})
            print(f"step {t + 1}: return {ret.mean():.1f} (score {score:.1f}), {time.perf_counter() - t0:.0f}s",
                  flush=True)
            if snapshots is not None:
                _save(snapshots / f"step{t + 1}.pt", actor, env_id, {"sac_step": t + 1, "eval_return": float(ret.mean()),
                                                                   "eval_score": score, "seed": seed})
            if score is not None and (best is None or abs(score - target_score) < abs(best["score"] - target_score)):
                best = history[-1]
                _save(out, actor, env_id, {"sac_step": t + 1, "eval_return": best["return"],
                                           "eval_score": score, "seed": seed, "target_score": target_score})
            if stop_within is not None and score is not None and abs(score - target_score) <= stop_within:
                print(f"step {t + 1}: within {stop_within} of the target {target_score}, stopping", flush=True)
                break
    return {"kept": best, "history": history}


def _save(path: Path, actor: Actor, env_id: str, meta: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"env_id": env_id, "obs_dim": actor.net[0].in_features, "act_dim": actor.mu.out_features,
                "hidden": actor.net[0].out_features, "state_dict": actor.state_dict(), "meta": meta}, tmp)
    tmp.replace(path)


def load_policy(path: Path = DEFAULT_POLICY) -> tuple[Actor, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    actor = Actor(ckpt["obs_dim"], ckpt["act_dim"], ckpt["hidden"])
    actor.load_state_dict(ckpt["state_dict"])
    return actor.eval(), ckpt


def rollout(out: Path, policy: Path = DEFAULT_POLICY, transitions: int = 200_000, seed: int = 0,
            envs: int = 16) -> dict:
    """Sampled-action episodes of the policy, `envs` at a time, written episode after episode in
    D4RL's layout until `transitions` rows: each episode ends in terminals (it fell) or timeouts
    (the env's time limit; D4RL's qlearning rule drops that row). Deterministic for a seed."""
    import h5py

    torch.set_num_threads(1)
    actor, ckpt = load_policy(policy)
    env_id = ckpt["env_id"]
    task = _d4rl_task_for(env_id)
    venv = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    g = torch.Generator().manual_seed(seed)
    obs, _ = venv.reset(seed=[seed * 1000 + i for i in range(envs)])
    open_eps = [{"o": [], "a": [], "r": []} for _ in range(envs)]
    done_eps, n_rows, t0 = [], 0, time.perf_counter()
    just_reset = np.zeros(envs, dtype=bool)
    with torch.no_grad():
        while n_rows < transitions:
            a, _ = actor(torch.as_tensor(obs, dtype=torch.float32), torch.randn(envs, ckpt["act_dim"], generator=g))
            a = a.numpy()
            obs2, r, term, trunc, _ = venv.step(a)
            for i in range(envs):
                if just_reset[i]:  # NEXT_STEP autoreset: this step only reset env i
                    continue
                e = open_eps[i]
                e["o"].append(obs[i]); e["a"].append(a[i]); e["r"].append(r[i])  # noqa: E702
                if term[i] or trunc[i]:
                    done_eps.append({**e, "terminal": bool(term[i])})
                    n_rows += len(e["r"])
                    open_eps[i] = {"o": [], "a": [], "r": []}
            just_reset = term | trunc
            obs = obs2
    venv.close()
    rows = {k: np.concatenate([np.asarray(e[k], np.float32) for e in done_eps]) for k in ("o", "a", "r")}
    terminals, timeouts, returns = [], [], []
    for e in done_eps:
        n = len(e["r"])
        end = np.zeros(n, dtype=bool)
        end[-1] = True
        terminals.append(end & e["terminal"])
        timeouts.append(end & (not e["terminal"]))
        returns.append(float(np.sum(np.asarray(e["r"], np.float64))))
    ret = float(np.mean(returns))
    arrays = {"observations": rows["o"], "actions": rows["a"], "rewards": rows["r"],
              "terminals": np.concatenate(terminals), "timeouts": np.concatenate(timeouts)}
    info = {"env_id": env_id, "policy": str(policy), "policy_meta": ckpt["meta"], "seed": seed,
            "rows": int(rows["r"].shape[0]), "episodes": len(done_eps), "return_mean": ret,
            "return_std": float(np.std(returns)),
            "score_mean": task.normalized_score(ret) if task else None,
            "d4rl_task": task.name if task else None, "fingerprint": d4rl_fingerprint(arrays),
            "wall_s": time.perf_counter() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for k, v in arrays.items():
            f[k] = v
        for k, v in info.items():
            if k != "wall_s":  # the file is the same bytes for the same seed
                f.attrs[k] = json.dumps(v)
    tmp.replace(out)
    out.with_name(out.name + ".json").write_text(json.dumps(info, indent=2))
    return info


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dtql_fast.behaviour", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a SAC behaviour policy, keeping the actor nearest a target score")
    t.add_argument("--env", default="Hopper-v4")
    t.add_argument("--steps", type=int, default=120_000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--target-score", type=float, default=45.0, help="D4RL-normalised score to keep the actor nearest to")
    t.add_argument("--eval-every", type=int, default=5000)
    t.add_argument("--stop-within", type=float, help="stop at the first evaluation within this many points of the target")
    t.add_argument("--out", type=Path, default=DEFAULT_POLICY)
    t.add_argument("--snapshots", type=Path, help="also save every evaluated actor in this folder (stepN.pt)")
    r = sub.add_parser("rollout", help="roll a behaviour policy out into a D4RL-format HDF5 file")
    r.add_argument("--out", type=Path, required=True, help="the HDF5 file to write (a .json summary goes beside it)")
    r.add_argument("--policy", type=Path, default=DEFAULT_POLICY)
    r.add_argument("--transitions", type=int, default=200_000)
    r.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.cmd == "train":
        res = train_sac(a.env, a.steps, a.out, a.seed, a.target_score, a.eval_every, stop_within=a.stop_within, snapshots=a.snapshots)
        print(json.dumps(res["kept"]))
    else:
        if a.transitions < 1:
            p.error(f"--transitions must be >= 1, got {a.transitions}")
        info = rollout(a.out, a.policy, a.transitions, a.seed)
        print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
