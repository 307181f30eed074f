"""The project's own offline benchmark data: a SAC behaviour policy and its D4RL-format rollouts."""
import json

import h5py
import numpy as np
import pytest
import torch

from dtql_fast import behaviour
from dtql_fast.data import check_env_widths, load_dataset


def test_committed_policy_loads_as_a_hopper_policy():
    actor, ckpt = behaviour.load_policy()
    assert ckpt["env_id"] == "Hopper-v4" and ckpt["obs_dim"] == 11 and ckpt["act_dim"] == 3
    assert 30 <= ckpt["meta"]["eval_score"] <= 60  # kept nearest the "medium" target when trained
    a, logp = actor(torch.zeros(4, 11), torch.randn(4, 3))
    assert a.shape == (4, 3) and a.abs().max() <= 1 and torch.isfinite(logp).all()


def test_rollout_is_d4rl_format_and_deterministic(tmp_path):
    a, b = tmp_path / "a.hdf5", tmp_path / "b.hdf5"
    info = behaviour.rollout(a, transitions=1500, seed=3, envs=4)
    behaviour.rollout(b, transitions=1500, seed=3, envs=4)
    assert a.read_bytes() == b.read_bytes()  # same seed, same bytes
    c = behaviour.rollout(tmp_path / "c.hdf5", transitions=1500, seed=4, envs=4)
    assert c["return_mean"] != info["return_mean"]
    with h5py.File(a) as f:
        obs, act, rew = f["observations"][()], f["actions"][()], f["rewards"][()]
        term, tout = f["terminals"][()], f["timeouts"][()]
    n = obs.shape[0]
    assert n == info["rows"] >= 1500 and obs.shape == (n, 11) and act.shape == (n, 3)
    assert np.abs(act).max() <= 1.0 and rew.shape == (n,)
    ends = np.flatnonzero(term | tout)
    assert ends[-1] == n - 1 and not (term & tout).any() and len(ends) == info["episodes"]
    returns = np.split(rew.astype(np.float64), ends[:-1] + 1)
    assert np.mean([r.sum() for r in returns]) == pytest.approx(info["return_mean"], rel=1e-6)  # fp32 rewards
    assert json.loads((tmp_path / "a.hdf5.json").read_text())["score_mean"] == info["score_mean"]
    loaded = load_dataset("hopper-medium-v2", str(a), "cpu")
    assert loaded.transitions.n == n - int(tout.sum()) - int(not tout[-1])  # D4RL's rule drops those rows
    check_env_widths(loaded)
    assert loaded.fingerprint == info["fingerprint"]  # the summary names the data the file holds
    assert abs(loaded.behaviour_return - info["return_mean"]) < 1e-6 * abs(info["return_mean"])


def test_sac_keeps_the_actor_nearest_the_target(tmp_path):
    out = tmp_path / "p.pt"
    res = behaviour.train_sac("Hopper-v4", steps=400, out=out, start_steps=100, eval_every=100, batch=32,
                              eval_episodes=2)
    scores = [h["score"] for h in res["history"]]
    assert len(scores) == 3
    kept = min(res["history"], key=lambda h: abs(h["score"] - 45.0))
    actor, ckpt = behaviour.load_policy(out)
    assert ckpt["meta"]["sac_step"] == kept["step"] and ckpt["meta"]["eval_score"] == kept["score"]
