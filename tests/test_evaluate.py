"""Evaluation: the batched acting rule against the reference, and vector-env episode accounting."""
import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.wrappers import TimeLimit

from dtql_fast.evaluate import evaluate, make_act_fn
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.tasks import DEFAULT_HYPER, Task
from dtql_fast.update import FastDTQL



def _agent(S, A, hidden=64, seed=0):
    torch.manual_seed(seed)
    ag = ReferenceDTQL(S, A, DEFAULT_HYPER.replace(hidden=hidden))
    with torch.no_grad():   # make the target differ from the online critic
        for p in ag.critic_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ag


@pytest.mark.parametrize("R", [1024, 7])
def test_act_fn_draws_eps_then_u_for_the_agents_rule(R):
    """The eval act_fn feeds the agent's acting rule the documented draws; fast == reference: the
    same candidate picked, equal to fp32 round-off (the fast path's packed layers sum the bias
    into the matmul, so a candidate's last bits can differ; a different pick would differ by O(1))."""
    S, A, N = 6, 3, 5
    ag = _agent(S, A)
    fast = FastDTQL(S, A, ag.hyper)
    fast.load_weights_from(ag)
    states = torch.randn(N, S)
    one = lambda s, e, u: fast.act(s[None], e[None], u[None])[0]  # noqa: E731 - the group of one's rule
    got = make_act_fn(one, A, R, "cpu", torch.Generator().manual_seed(123))(states)
    g = torch.Generator().manual_seed(123)          # the documented draw order: eps, then u
    eps = torch.randn((N, R, A), generator=g)
    u = torch.rand((N,), generator=g)
    want = ag.act(states, eps, u)
    assert got.shape == (N, A)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # scoring with the online critic instead would pick other candidates (so the target is what is used)
    if R > 100:
        fast.load_modules({**fast.modules(), "critic_target": ag.critic})
        assert (one(states, eps, u) - want).abs().max() > 1e-3


@torch.no_grad()
def test_fast_act_inverse_cdf():
    S, A, R = 4, 2, 16
    ag = _agent(S, A)
    fast = FastDTQL(S, A, ag.hyper)
    fast.load_weights_from(ag)
    states = torch.randn(3, S)
    eps = torch.randn(3, R, A)
    cand = ag.policy.sample(states.repeat_interleave(R, 0), eps.reshape(3 * R, A)).reshape(3, R, A)
    first = fast.act(states[None], eps[None], torch.zeros(1, 3))[0]
    torch.testing.assert_close(first, cand[:, 0], rtol=0, atol=1e-6)      # u = 0 picks the first category
    # u just above the cdf at k picks k + 1
    q = ag.critic_target.q_min(states.repeat_interleave(R, 0), cand.reshape(3 * R, A)).reshape(3, R)
    cdf = torch.softmax(q, 1).cumsum(1)
    k = 5
    u = (cdf[:, k] + cdf[:, k + 1]) / 2
    torch.testing.assert_close(fast.act(states[None], eps[None], u[None])[0], cand[:, k + 1], rtol=0, atol=1e-6)


class _Toy(gym.Env):
    """Episode length drawn at reset (1..11); under TimeLimit(8) some are truncated, some terminate."""
    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.length = 0, int(self.np_random.integers(1, 12))
        self.x = float(self.np_random.uniform(-1, 1))
        return np.array([self.x, 0.0]), {}

    def step(self, action):
        self.t += 1
        reward = self.x * float(action[0]) + self.t
        return np.array([self.x, self.t]), reward, self.t >= self.length, False, {}


def _toy():
    return TimeLimit(_Toy(), max_episode_steps=8)


def _manual(act_fn, make_env, episodes, seed):
    rets, lens = [], []
    for i in range(episodes):
        env = make_env()
        obs, _ = env.reset(seed=seed + i)
        ret, n = 0.0, 0
        while True:
            a = act_fn(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
            obs, r, term, trunc, _ = env.step(a)
            ret += float(r)
            n += 1
            if term or trunc:
                break
        env.close()
        rets.append(ret)
        lens.append(n)
    return rets, lens


def _det_act(states):
    """Deterministic and row-wise (no matmul), so batching cannot change a single bit."""
    return torch.tanh(0.7 * states[:, :1] - 0.2)


def test_vector_eval_matches_single_env_loop_toy():
    episodes, seed = 16, 3
    out = evaluate(_det_act, _toy, episodes, seed, None)
    rets, lens = _manual(_det_act, _toy, episodes, seed)
    assert len(out["returns"]) == episodes
    assert out["lengths"] == lens
    assert len(set(lens)) > 3 and 8 in lens and min(lens) < 8   # truncated and terminated episodes
    np.testing.assert_allclose(out["returns"], rets, rtol=0, atol=1e-12)
    assert out["return_mean"] == pytest.approx(np.mean(rets)) and out["return_std"] == pytest.approx(np.std(rets))
    assert out["scores"] is None and out["score_mean"] is None and out["wall_s"] > 0


def test_vector_eval_matches_single_env_loop_hopper():
    def act(states):
        return torch.tanh(0.5 * states[:, 2:5] - 0.1 * states[:, 5:8])

    def make():
        return gym.make("Hopper-v4")

    out = evaluate(act, make, 3, 11, None)
    rets, lens = _manual(act, make, 3, 11)
    assert out["lengths"] == lens and max(lens) < 1000     # terminations at different steps
    np.testing.assert_allclose(out["returns"], rets, rtol=1e-12)


def test_eval_reproducible_and_normalised():
    ag = _agent(10, 2, hidden=32)
    task = Task("t", DEFAULT_HYPER, None, None, ref_min=-40.0, ref_max=-4.0)

    def run(seed):
        fn = make_act_fn(ag.act, 2, 16, "cpu", torch.Generator().manual_seed(7))
        return evaluate(fn, lambda: gym.make("Reacher-v5"), 3, seed, task)

    a, b, c = run(0), run(0), run(1)
    assert a["returns"] == b["returns"] and len(a["returns"]) == 3 and a["lengths"] == [50, 50, 50]
    assert a["returns"] != c["returns"]
    np.testing.assert_allclose(a["scores"], [100 * (r + 40) / 36 for r in a["returns"]])
    assert a["score_mean"] == pytest.approx(task.normalized_score(a["return_mean"]))
    assert a["score_std"] == pytest.approx(100 * a["return_std"] / 36)


def test_eval_rejects_bad_action_shape():
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda s: torch.zeros(s.shape[0], 3), _toy, 2, 0, None)


def test_padded_act_fn_gives_one_shape_and_the_live_rows():
    seen = []

    def act(s, eps, u):
        seen.append(tuple(s.shape))
        return s[:, :2] * 2

    fn = make_act_fn(act, 2, 8, "cpu", torch.Generator().manual_seed(0), pad_to=5)
    for n in (5, 3, 1):
        states = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4)
        torch.testing.assert_close(fn(states), states[:, :2] * 2)
    assert seen == [(5, 4)] * 3
