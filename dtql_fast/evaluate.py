"""Evaluation: all episodes at once in one vector env, and the spec's acting rule, batched.

Acting (spec, "Acting and evaluation"): for each state, R = 1024 policy candidates, scored by the
TARGET critic's q_min, one drawn from Categorical(softmax(q)); the agents implement it as
`act(states, eps, u)`. `make_act_fn` draws eps ~ N(0, I) of shape (N, R, A) and then u ~ U[0, 1)
of shape (N,) from its generator, once per env step for all live envs together.
"""
from __future__ import annotations

import time
from typing import Callable

import gymnasium as gym
import numpy as np
import torch

__all__ = ["evaluate", "make_act_fn"]


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


def evaluate(act_fn: Callable[[torch.Tensor], torch.Tensor], make_env: Callable[[], gym.Env], episodes: int,
             seed: int, task=None) -> dict:
    """Run `episodes` episodes at once, one per sub-env of a SyncVectorEnv, env i seeded seed + i.

    act_fn gets the live envs' states as one (N_live, S) float32 CPU tensor per env step. A sub-env
    counts only up to its first episode end (terminated or truncated); under gymnasium 1.x's
    NEXT_STEP autoreset it is reset on the following step, and what it does after that is ignored.
    The loop stops once every sub-env has finished, so no sub-env is ever stepped into a second
    episode that counts.

    Returns returns/lengths per episode, return_mean/return_std (population std, as the release
    prints), score_mean/score_std and scores (D4RL-normalised, None without reference scores), wall_s.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    t0 = time.perf_counter()
    envs = gym.vector.SyncVectorEnv([make_env for _ in range(episodes)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    try:
        space = envs.single_action_space
        obs, _ = envs.reset(seed=seed)
        returns = np.zeros(episodes, dtype=np.float64)
        lengths = np.zeros(episodes, dtype=np.int64)
        live = np.ones(episodes, dtype=bool)
        actions = np.zeros((episodes, *space.shape), dtype=space.dtype)
        while live.any():
            idx = np.flatnonzero(live)
            states = torch.from_numpy(np.asarray(obs[idx], dtype=np.float32))
            a = act_fn(states)
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
    out = {
        "episodes": episodes,
        "seed": seed,
        "returns": returns.tolist(),
        "lengths": lengths.tolist(),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "scores": None,
        "score_mean": None,
        "score_std": None,
    }
    if task is not None and task.normalized_score(0.0) is not None:
        scores = np.array([task.normalized_score(r) for r in returns])
        out.update(scores=scores.tolist(), score_mean=float(scores.mean()), score_std=float(scores.std()))
    out["wall_s"] = time.perf_counter() - t0
    return out
