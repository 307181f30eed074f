"""Data loading: both transition rules, D4RL HDF5 and Minari round trips, every bad input."""
import io
import os
import urllib.error
import urllib.request
import warnings
from types import SimpleNamespace

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

from dtql_fast import data as D
from dtql_fast.tasks import DEFAULT_HYPER, TASKS, UnknownTaskError
from dtql_fast.transitions import DatasetError



# -- the two transition rules on synthetic episodes -----------------------------------------------

def _d4rl_loop(ds):
    """d4rl.qlearning_dataset(terminate_on_end=False) as D4RL writes it, with timeouts present."""
    out = {k: [] for k in ("obs", "actions", "rewards", "next_obs", "dones")}
    n = ds["rewards"].shape[0]
    for i in range(n - 1):
        if ds["timeouts"][i]:
            continue
        out["obs"].append(ds["observations"][i])
        out["next_obs"].append(ds["observations"][i + 1])
        out["actions"].append(ds["actions"][i])
        out["rewards"].append(ds["rewards"][i])
        out["dones"].append(bool(ds["terminals"][i]))
    return {k: np.array(v) for k, v in out.items()}


def _raw(n=20, S=11, A=3, seed=0):
    rng = np.random.default_rng(seed)
    term = np.zeros(n, bool)
    tout = np.zeros(n, bool)
    term[5] = True                 # terminal
    tout[9] = True                 # timeout
    term[14] = tout[14] = True     # both on one step
    tout[n - 1] = True             # a timeout on the last row
    return {"observations": rng.standard_normal((n, S)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, A)).astype(np.float32),
            "rewards": rng.standard_normal(n).astype(np.float32), "terminals": term, "timeouts": tout}


def test_d4rl_rule_cases():
    raw = _raw()
    out = D.d4rl_qlearning(raw)
    kept = [i for i in range(19) if i not in (9, 14)]           # timeout rows skipped, last row dropped
    assert out["obs"].shape[0] == len(kept) == 17
    np.testing.assert_array_equal(out["obs"], raw["observations"][kept])
    np.testing.assert_array_equal(out["next_obs"], raw["observations"][np.array(kept) + 1])
    np.testing.assert_array_equal(out["rewards"], raw["rewards"][kept])
    assert out["dones"].tolist() == [i == 5 for i in kept]     # the terminal kept with done = 1
    assert not np.isin(19, kept)


def test_d4rl_rule_matches_d4rl_loop_on_random_flags():
    rng = np.random.default_rng(1)
    for trial in range(20):
        n = int(rng.integers(20, 60))
        raw = _raw(n=n, seed=trial)
        raw["terminals"] = rng.random(n) < 0.2
        raw["timeouts"] = rng.random(n) < 0.2
        got, want = D.d4rl_qlearning(raw), _d4rl_loop(raw)
        for k in want:
            if want[k].size:
                np.testing.assert_array_equal(got[k], want[k])
            else:
                assert got[k].shape[0] == 0


def _ep(T, S=3, A=2, term_at=None, trunc_at=None, seed=0, obs=None):
    rng = np.random.default_rng(seed)
    term = np.zeros(T, bool)
    trunc = np.zeros(T, bool)
    if term_at is not None:
        term[term_at] = True
    if trunc_at is not None:
        trunc[trunc_at] = True
    return SimpleNamespace(observations=rng.standard_normal((T + 1, S)) if obs is None else obs,
                           actions=rng.uniform(-1, 1, (T, A)), rewards=rng.standard_normal(T),
                           terminations=term, truncations=trunc)


def test_minari_rule_cases():
    eps = [_ep(4, term_at=3, seed=1),            # ends in a terminal state
           _ep(5, trunc_at=4, seed=2),           # truncated: still bootstraps
           _ep(3, term_at=2, trunc_at=2, seed=3)]  # both on the last step: terminal wins
    arrays, rets = D.minari_episodes_to_arrays(eps)
    assert arrays["obs"].shape == (12, 3)
    off = 0
    for ep in eps:
        T = len(ep.rewards)
        np.testing.assert_array_equal(arrays["obs"][off:off + T], ep.observations[:-1])
        np.testing.assert_array_equal(arrays["next_obs"][off:off + T], ep.observations[1:])   # incl. last row
        np.testing.assert_array_equal(arrays["actions"][off:off + T], ep.actions)
        np.testing.assert_array_equal(arrays["dones"][off:off + T], ep.terminations)
        off += T
    assert arrays["dones"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    np.testing.assert_allclose(rets, [ep.rewards.sum() for ep in eps])


def test_minari_rule_dict_observations():
    rng = np.random.default_rng(0)
    obs = {"achieved_goal": rng.standard_normal((4, 2)), "desired_goal": rng.standard_normal((4, 2)),
           "observation": rng.standard_normal((4, 5))}
    arrays, _ = D.minari_episodes_to_arrays([_ep(3, obs=obs)], obs_keys=("achieved_goal", "observation"))
    np.testing.assert_array_equal(arrays["obs"], np.concatenate([obs["achieved_goal"], obs["observation"]], 1)[:3])
    arrays, _ = D.minari_episodes_to_arrays([_ep(3, obs=obs)])      # no keys: every key, in order
    assert arrays["obs"].shape == (3, 9)


def test_minari_rule_bad_episode_lengths():
    ep = _ep(4)
    ep.observations = ep.observations[:-1]   # T observations instead of T + 1
    with pytest.raises(DatasetError, match="episode 0"):
        D.minari_episodes_to_arrays([ep])


# -- D4RL HDF5 round trip -------------------------------------------------------------------------

def _write_h5(path, raw, extra_group=True):
    with h5py.File(path, "w") as f:
        for k, v in raw.items():
            f.create_dataset(k, data=v)
        if extra_group:
            f.create_dataset("infos/qpos", data=np.zeros((len(raw["rewards"]), 2)))
    return path


def _basename(task):
    return os.path.basename(TASKS[task].d4rl_url)


def test_d4rl_roundtrip_locomotion(tmp_path, monkeypatch):
    raw = _raw()
    _write_h5(tmp_path / _basename("hopper-medium-v2"), raw)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    d = D.load_dataset("hopper-medium-v2", None, "cpu")
    want = _d4rl_loop(raw)
    t = d.transitions
    assert t.obs.dtype == torch.float32 and t.obs.device.type == "cpu"
    np.testing.assert_array_equal(t.obs.numpy(), want["obs"])
    np.testing.assert_array_equal(t.next_obs.numpy(), want["next_obs"])
    np.testing.assert_array_equal(t.actions.numpy(), want["actions"])
    np.testing.assert_array_equal(t.rewards.numpy()[:, 0], want["rewards"])
    np.testing.assert_array_equal(t.not_done.numpy()[:, 0], 1.0 - want["dones"])
    assert d.task is TASKS["hopper-medium-v2"]
    r = raw["rewards"].astype(np.float64)   # complete episodes end at rows 5, 9, 14, 19
    assert d.episodes == 4
    assert d.behaviour_return == pytest.approx(np.mean([r[:6].sum(), r[6:10].sum(), r[10:15].sum(), r[15:].sum()]))
    # the same file by explicit path, as a file and as its folder
    for p in (tmp_path / _basename("hopper-medium-v2"), tmp_path):
        monkeypatch.delenv("D4RL_DATASET_DIR", raising=False)
        d2 = D.load_dataset("hopper-medium-v2", str(p), "cpu")
        assert torch.equal(d2.transitions.obs, t.obs)
    env = d.make_env()                        # Hopper-v4, 11-dim observations like the data
    assert env.observation_space.shape == (11,)
    env.close()


def test_fingerprint_names_the_arrays_not_the_file(tmp_path):
    """Two files holding the same five arrays share a fingerprint whatever else HDF5 wrote (chunking, extra
    groups); one bit of one array, or one array's dtype, changes it; a loaded file and a run record it."""
    raw = _raw()
    a = D.load_dataset("hopper-medium-v2", str(_write_h5(tmp_path / "a.hdf5", raw)), "cpu")
    with h5py.File(tmp_path / "b.hdf5", "w") as f:
        for k in reversed(list(raw)):
            f.create_dataset(k, data=raw[k], chunks=True, compression="gzip")
    b = D.load_dataset("hopper-medium-v2", str(tmp_path / "b.hdf5"), "cpu")
    assert a.fingerprint == b.fingerprint == D.d4rl_fingerprint(raw) and len(a.fingerprint) == 16
    flipped = {**raw, "actions": raw["actions"].copy()}
    flipped["actions"].view(np.uint32)[3, 1] ^= 1   # the last bit of one float
    widened = {**raw, "rewards": raw["rewards"].astype(np.float64)}  # the same values, another dtype
    assert len({D.d4rl_fingerprint(r) for r in (raw, flipped, widened)}) == 3


def test_d4rl_roundtrip_antmaze_reward_shift(tmp_path):
    raw = _raw(S=29, A=8)
    raw["rewards"] = (np.arange(20) % 3 == 0).astype(np.float32)
    path = _write_h5(tmp_path / "am.hdf5", raw)
    d = D.load_dataset("antmaze-umaze-v0", str(path), "cpu")
    np.testing.assert_array_equal(d.transitions.rewards.numpy()[:, 0], _d4rl_loop(raw)["rewards"] - 1.0)
    assert d.transitions.state_dim == 29
    assert "-1" in d.note
    if importlib_util_missing("gymnasium_robotics"):
        assert "dtql_fast[robotics]" in d.env_problem
        with pytest.raises(D.RoboticsMissingError, match=r"pip install \"dtql_fast\[robotics\]\""):
            d.make_env()


def importlib_util_missing(name):
    import importlib.util
    return importlib.util.find_spec(name) is None


def test_d4rl_download_into_cache(tmp_path, monkeypatch):
    src = _write_h5(tmp_path / "src.hdf5", _raw())
    payload = src.read_bytes()
    seen = []

    def fake_urlopen(url, timeout=None):
        seen.append((url, timeout))
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    d = D.load_dataset("hopper-medium-v2", None, "cpu")
    assert seen == [(TASKS["hopper-medium-v2"].d4rl_url, D.DOWNLOAD_TIMEOUT_S)]
    assert (tmp_path / "cache" / _basename("hopper-medium-v2")).read_bytes() == payload
    assert d.transitions.n == 17


def test_d4rl_missing_file_no_network(tmp_path, monkeypatch):
    def no_network(url, timeout=None):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    url = TASKS["walker2d-medium-v2"].d4rl_url
    where = tmp_path / "d4rl" / _basename("walker2d-medium-v2")
    with pytest.raises(DatasetError) as e:
        D.load_dataset("walker2d-medium-v2", None, "cpu")
    assert str(where) in str(e.value) and url in str(e.value) and "unreachable" in str(e.value)
    assert not where.exists() and not where.with_name(where.name + ".part").exists()


# -- bad inputs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case, match", [
    ("nan_obs", "NaN/inf"),
    ("inf_reward", "NaN/inf"),
    ("nan_action", "NaN/inf"),
    ("short_rewards", "rewards"),
    ("short_actions", "actions"),
    ("obs_3d", "2-D"),
    ("action_outside_box", "action box"),
    ("empty", "no transitions to train on"),
    ("all_timeouts", "no transitions to train on"),
    ("one_row", "at least two rows of one episode"),
    ("nan_after_timeout", "first at file row 5"),
    ("missing_timeouts", r"missing D4RL key\(s\) \['timeouts'\]"),
    ("missing_obs", r"missing D4RL key\(s\) \['observations'\]"),
])
def test_d4rl_bad_data(tmp_path, case, match):
    raw = _raw()
    if case == "nan_obs":
        raw["observations"][3, 2] = np.nan
    elif case == "inf_reward":
        raw["rewards"][7] = np.inf
    elif case == "nan_action":
        raw["actions"][0, 0] = np.nan
    elif case == "short_rewards":
        raw["rewards"] = raw["rewards"][:-2]
    elif case == "short_actions":
        raw["actions"] = raw["actions"][:-2]
    elif case == "obs_3d":
        raw["observations"] = raw["observations"].reshape(20, 11, 1)
    elif case == "action_outside_box":
        raw["actions"][4, 1] = 1.5
    elif case == "empty":
        raw = {k: v[:0] for k, v in raw.items()}
    elif case == "all_timeouts":
        raw["timeouts"][:] = True
    elif case == "one_row":
        raw = {k: v[:1] for k, v in raw.items()}
    elif case == "nan_after_timeout":  # the dropped timeout row shifts transitions: report the file's row
        raw["timeouts"][:] = False
        raw["timeouts"][1] = True
        raw["observations"][5, 0] = np.nan
    elif case == "missing_timeouts":
        del raw["timeouts"]
    elif case == "missing_obs":
        del raw["observations"]
    path = _write_h5(tmp_path / "bad.hdf5", raw, extra_group=False)
    with pytest.raises(DatasetError, match=match) as e:
        D.load_dataset("hopper-medium-v2", str(path), "cpu")
    assert str(path) in str(e.value)


def test_d4rl_unreadable_and_truncated(tmp_path):
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(b"this is not an hdf5 file" * 100)
    with pytest.raises(DatasetError, match="cannot be read as an HDF5 file") as e:
        D.load_dataset("hopper-medium-v2", str(junk), "cpu")
    assert str(junk) in str(e.value) and TASKS["hopper-medium-v2"].d4rl_url in str(e.value)

    raw = _raw(n=4000)
    good = _write_h5(tmp_path / "good.hdf5", raw)
    blob = good.read_bytes()
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="truncated") as e:
        D.load_dataset("hopper-medium-v2", str(cut), "cpu")
    assert str(cut) in str(e.value)


def test_unknown_task_lists_close_matches():
    with pytest.raises(UnknownTaskError, match="hopper-medium-v2"):
        D.load_dataset("hoper-medium-v2", None, "cpu")
    with pytest.raises(UnknownTaskError, match="walker2d-medium-expert-v2"):
        D.load_dataset("walker-medium-expert", None, "cpu")


def test_eval_env_dimension_mismatch(tmp_path):
    raw = _raw(S=7)                                      # Hopper-v4 gives 11
    d = D.load_dataset("hopper-medium-v2", str(_write_h5(tmp_path / "h.hdf5", raw)), "cpu")
    with pytest.raises(DatasetError, match="size 11.*size 7"):
        d.make_env()


# -- Minari ---------------------------------------------------------------------------------------

@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def _buffers(n_eps, S=10, A=2, seed=0, dict_obs=False, nan=False):
    from minari.data_collector import EpisodeBuffer
    rng = np.random.default_rng(seed)
    out, raw = [], []
    for i in range(n_eps):
        T = 3 + i
        if dict_obs:
            obs = {"achieved_goal": rng.standard_normal((T + 1, 2)), "desired_goal": rng.standard_normal((T + 1, 2)),
                   "observation": rng.standard_normal((T + 1, 5))}
        else:
            obs = rng.standard_normal((T + 1, S))
        act = rng.uniform(-1, 1, (T, A)).astype(np.float32)
        rew = rng.standard_normal(T)
        if nan and i == 1:
            rew[1] = np.nan
        term = np.zeros(T, bool)
        trunc = np.zeros(T, bool)
        (term if i % 2 == 0 else trunc)[-1] = True
        out.append(EpisodeBuffer(id=i, observations=obs, actions=act, rewards=rew, terminations=term, truncations=trunc))
        raw.append(SimpleNamespace(observations=obs, actions=act, rewards=rew, terminations=term, truncations=trunc))
    return out, raw


def _create(dataset_id, buffers, **kw):
    import minari
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return minari.create_dataset_from_buffers(dataset_id, buffers, author="t", author_email="t", code_permalink="t",
                                                  algorithm_name="t", description="t", **kw)


def test_minari_roundtrip_with_ref_scores(minari_root):
    bufs, raw = _buffers(4)
    _create("test/reacher/noisy-v0", bufs, env="Reacher-v5", ref_min_score=-40.0, ref_max_score=-4.0)
    d = D.load_dataset("test/reacher/noisy-v0", None, "cpu")
    want, rets = D.minari_episodes_to_arrays(raw)
    assert d.transitions.n == 3 + 4 + 5 + 6
    np.testing.assert_array_equal(d.transitions.obs.numpy(), want["obs"].astype(np.float32))
    np.testing.assert_array_equal(d.transitions.next_obs.numpy(), want["next_obs"].astype(np.float32))
    np.testing.assert_array_equal(d.transitions.rewards.numpy()[:, 0], want["rewards"].astype(np.float32))
    np.testing.assert_array_equal(d.transitions.not_done.numpy()[:, 0], 1.0 - want["dones"])
    assert d.transitions.not_done.sum() == d.transitions.n - 2   # episodes 0, 2 terminate; 1, 3 truncate
    assert (d.task.name, d.task.env_id, d.task.hyper) == ("test/reacher/noisy-v0", None, DEFAULT_HYPER)
    assert (d.task.ref_min, d.task.ref_max) == (-40.0, -4.0)
    assert "metadata" in d.note
    assert d.behaviour_return == pytest.approx(np.mean(rets)) and d.episodes == 4
    env = d.make_env()
    assert env.spec.id == "Reacher-v5" and env.observation_space.shape == (10,)
    env.close()


def test_minari_dict_obs_maps_to_d4rl_antmaze(minari_root):
    space = gym.spaces.Dict({k: gym.spaces.Box(-np.inf, np.inf, (n,), np.float64)
                             for k, n in (("achieved_goal", 2), ("desired_goal", 2), ("observation", 5))})
    bufs, raw = _buffers(3, dict_obs=True)
    _create("test/antmaze/umaze-v1", bufs, observation_space=space,
            action_space=gym.spaces.Box(-1, 1, (2,), np.float32))
    d = D.load_dataset("test/antmaze/umaze-v1", None, "cpu")
    assert d.transitions.state_dim == 7            # [achieved_goal (2), observation (5)]
    ep0 = raw[0].observations
    np.testing.assert_array_equal(d.transitions.obs.numpy()[:3],
                                  np.concatenate([ep0["achieved_goal"], ep0["observation"]], 1)[:3].astype(np.float32))
    np.testing.assert_allclose(d.transitions.rewards.numpy()[:3, 0], raw[0].rewards.astype(np.float32) - 1.0)
    assert (d.task.ref_min, d.task.ref_max) == (0.0, 1.0) and "D4RL" in d.note
    assert d.task.eval_episodes == 100 and d.task.hyper == DEFAULT_HYPER


def test_minari_without_ref_scores(minari_root):
    bufs, _ = _buffers(2)
    _create("test/reacher/plain-v0", bufs, env="Reacher-v5")
    d = D.load_dataset("test/reacher/plain-v0", None, "cpu")
    assert d.task.ref_min is None and d.task.normalized_score(1.0) is None and "no reference" in d.note


def test_minari_bad_data(minari_root):
    bufs, _ = _buffers(3, nan=True)
    _create("test/reacher/nan-v0", bufs, env="Reacher-v5")
    with pytest.raises(DatasetError, match="NaN/inf"):
        D.load_dataset("test/reacher/nan-v0", None, "cpu")
    bufs, _ = _buffers(2)
    _create("test/reacher/box-v0", bufs, observation_space=gym.spaces.Box(-np.inf, np.inf, (10,)),
            action_space=gym.spaces.Box(-2, 2, (2,), np.float32))
    with pytest.raises(DatasetError, match="action box"):
        D.load_dataset("test/reacher/box-v0", None, "cpu")


def test_minari_missing_and_download_fails(minari_root, monkeypatch):
    import minari

    def fail(dataset_id, force_download=False):
        raise ConnectionError("no network")

    monkeypatch.setattr(minari, "download_dataset", fail)
    with pytest.raises(DatasetError) as e:
        D.load_dataset("mujoco/hopper/medium-v0", None, "cpu")
    msg = str(e.value)
    assert "mujoco/hopper/medium-v0" in msg and "no network" in msg
    assert 'pip install "dtql_fast[hf]"' in msg and "minari download mujoco/hopper/medium-v0" in msg


def test_offline_dataset_builds_once_and_reloads(minari_root, monkeypatch):
    d = D.build_offline_dataset("test/reacher/offline-v0", episodes=6, verbose=False)
    assert d.transitions.n == 6 * 50 and d.transitions.state_dim == 10 and d.transitions.action_dim == 2
    assert d.task.ref_min < d.behaviour_return < d.task.ref_max       # mediocre, not noise, not expert
    assert d.task.ref_min < -30 and d.task.ref_max > -8
    assert not any(p.name.startswith(".dtql-build") for p in minari_root.iterdir())
    import minari

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt an existing dataset")

    monkeypatch.setattr(minari, "create_dataset_from_buffers", no_rebuild)
    d2 = D.build_offline_dataset("test/reacher/offline-v0", episodes=6, verbose=False)
    assert torch.equal(d.transitions.obs, d2.transitions.obs)
    assert d2.behaviour_return == d.behaviour_return
    assert "test/reacher/offline-v0" in minari.list_local_datasets()
