"""Evaluation: all episodes at once in one vector env, and the spec's acting rule, batched.

A group of seeds (FastDTQL(seeds=...)) evaluates every seed's episodes in one vector env, with one
acting call per env step for all of them (evaluate_group, make_group_act_fn).

Acting (spec, "Acting and evaluation"): for each state, R = 1024 policy candidates, scored by the
TARGET critic's q_min, one drawn from Categorical(softmax(q)); the agents implement it as
`act(states, eps, u)`. `make_act_fn` draws eps ~ N(0, I) of shape (N, R, A) and then u ~ U[0, 1)
of shape (N,) from its generator, once per env step for all live envs together.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from . import optional

gym = optional.gymnasium()  # absent on a bare GPU machine: evaluation says so when asked for

__all__ = ["evaluate", "evaluate_group", "make_act_fn", "make_group_act_fn"]


def make_act_fn(act: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], action_dim: int,
                num_candidates: int = 1024, device="cpu", generator: torch.Generator | None = None,
                pad_to: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """act_fn(states (N, S) float32, any device) -> actions (N, A) on `device`.

    `act(states, eps, u)` is the agent's acting rule (FastDTQL.act or ReferenceDTQL.act). Per call:
    eps = randn((N, R, A)), then u = rand((N,)), both from `generator` (on `device`; None: torch's
    default generator for that device). With `pad_to`, every call acts on exactly pad_to rows
    (states zero-padded, the padding's actions dropped), so a compiled `act` sees one shape as
    episodes end and never recompiles.
    """
    R = int(num_candidates)

    @torch.no_grad()
    def act_fn(states: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(states).to(device=device, dtype=torch.float32)
        N = s.shape[0]
        if pad_to is not None:
            s = torch.cat([s, s.new_zeros(pad_to - N, s.shape[1])])
        eps = torch.randn((s.shape[0], R, action_dim), generator=generator, device=device)
        u = torch.rand((s.shape[0],), generator=generator, device=device)
        return act(s, eps, u)[:N]

    return act_fn


def make_group_act_fn(act: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], action_dim: int,
                      num_candidates: int, device, generators: Sequence[torch.Generator],
                      pad: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """group_act_fn(states (N, E, S), live (N, E) bool) -> actions (N, E, A): every seed's live envs in
    ONE call of the group's acting rule `act(states (N, W, S), eps (N, W, R, A), u (N, W))`.

    Seed i's live states go first in its row of width W (in env order), zeros after. Its draws come
    from its own generator `generators[i]` as make_act_fn draws them for one agent: eps of shape
    (n_i, R, A), then u of shape (n_i,), for its n_i live envs (E of them with `pad`), zero-padded to
    W. So seed i acts on the states and draws a single-seed evaluation with that generator would feed
    it, whatever the other seeds' episodes do. W = E with `pad` (one shape: a compiled `act` never
    recompiles), else the largest live count.
    """
    R = int(num_candidates)

    @torch.no_grad()
    def group_act_fn(states: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(states).to(device=device, dtype=torch.float32)
        live = torch.as_tensor(live, dtype=torch.bool)
        N, E, S = s.shape
        counts = live.sum(dim=1).tolist()
        W = E if pad else max(counts)
        packed = s.new_zeros(N, W, S)
        eps = s.new_zeros(N, W, R, action_dim)
        u = s.new_zeros(N, W)
        for i, g in enumerate(generators):
            n = E if pad else counts[i]
            packed[i, :counts[i]] = s[i, live[i].to(s.device)]
            eps[i, :n] = torch.randn((n, R, action_dim), generator=g, device=device)
            u[i, :n] = torch.rand((n,), generator=g, device=device)
        picked = act(packed, eps, u)
        out = picked.new_zeros(N, E, picked.shape[-1])
        for i in range(N):
            out[i, live[i].to(out.device)] = picked[i, :counts[i]]
        return out

    return group_act_fn


def evaluate(act_fn: Callable[[torch.Tensor], torch.Tensor], make_env: Callable[[], gym.Env], episodes: int,
             seed: int, task=None) -> dict:
    """Run `episodes` episodes at once, one per sub-env of a SyncVectorEnv, env i seeded seed + i.

    act_fn gets the live envs' states as one (N_live, S) float32 CPU tensor per env step. A sub-env
    counts only up to its first episode end (terminated or truncated); under gymnasium 1.x's
    NEXT_STEP autoreset it is reset on the following step, and what it does after that is ignored.
    The loop stops once every sub-env has finished, so no sub-env is ever stepped into a second
    episode that counts.

    Returns env_seed (the first sub-env's seed), returns/lengths per episode, return_mean/return_std
    (population std, as the release prints), score_mean/score_std and scores (D4RL-normalised, None
    without reference scores), wall_s.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    t0 = time.perf_counter()

    def act_live(obs: np.ndarray, live: np.ndarray) -> torch.Tensor:
        return act_fn(torch.from_numpy(np.asarray(obs[live], dtype=np.float32)))

    returns, lengths = _run_episodes(act_live, make_env, [seed + i for i in range(episodes)])
    return {"episodes": episodes, "env_seed": seed, **_scores(returns, lengths, task),
            "wall_s": time.perf_counter() - t0}


def evaluate_group(group_act_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   make_env: Callable[[], gym.Env], episodes: int, env_seeds: Sequence[int], task=None) -> list[dict]:
    """N seeds x `episodes` episodes in ONE SyncVectorEnv: sub-env i * episodes + j is seed i's
    episode j, seeded env_seeds[i] + j (the envs a single-seed evaluate(..., seed=env_seeds[i]) runs).

    One call of group_act_fn (make_group_act_fn) per env step acts for every seed's live envs, given
    their states as (N, E, S) and which are live as (N, E). Returns one result per seed, each as
    evaluate's (its own returns, means and stds over its episodes; wall_s the group's).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    N, E = len(env_seeds), episodes
    t0 = time.perf_counter()

    def act_live(obs: np.ndarray, live: np.ndarray) -> torch.Tensor:
        states = torch.from_numpy(np.asarray(obs, dtype=np.float32).reshape(N, E, -1))
        mask = torch.from_numpy(live.reshape(N, E))
        actions = group_act_fn(states, mask)
        return actions[mask.to(actions.device)]

    returns, lengths = _run_episodes(act_live, make_env, [s + j for s in env_seeds for j in range(E)])
    wall = time.perf_counter() - t0
    return [{"episodes": E, "env_seed": s, **_scores(returns[i * E:(i + 1) * E], lengths[i * E:(i + 1) * E], task),
             "wall_s": wall} for i, s in enumerate(env_seeds)]


def _run_episodes(act_live: Callable[[np.ndarray, np.ndarray], torch.Tensor], make_env: Callable[[], gym.Env],
                  env_seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One episode per sub-env, sub-env k seeded env_seeds[k]; act_live(obs of all sub-envs, live mask)
    returns the live ones' actions, in order. (returns, lengths) per sub-env."""
    M = len(env_seeds)
    envs = gym.vector.SyncVectorEnv([make_env for _ in range(M)], autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    try:
        space = envs.single_action_space
        obs, _ = envs.reset(seed=list(env_seeds))
        returns = np.zeros(M, dtype=np.float64)
        lengths = np.zeros(M, dtype=np.int64)
        live = np.ones(M, dtype=bool)
        actions = np.zeros((M, *space.shape), dtype=space.dtype)
        while live.any():
            idx = np.flatnonzero(live)
            a = act_live(obs, live)
            a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            if a.shape != (idx.size, *space.shape):
                raise ValueError(f"act_fn returned shape {a.shape} for {idx.size} states; expected "
                                 f"{(idx.size, *space.shape)}")
            actions[:] = 0
            actions[idx] = a
            obs, rew, term, trunc, _ = envs.step(actions)
            returns[idx] += rew[idx]
            lengths[idx] += 1
            live[idx[(term | trunc)[idx]]] = False
    finally:
        envs.close()
    return returns, lengths


def _scores(returns: np.ndarray, lengths: np.ndarray, task) -> dict:
    out = {"returns": returns.tolist(), "lengths": lengths.tolist(), "return_mean": float(returns.mean()),
           "return_std": float(returns.std()), "scores": None, "score_mean": None, "score_std": None}
    if task is not None and task.normalized_score(0.0) is not None:
        scores = np.array([task.normalized_score(r) for r in returns])
        out.update(scores=scores.tolist(), score_mean=float(scores.mean()), score_std=float(scores.std()))
    return out
