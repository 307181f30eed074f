"""Where the transitions come from: D4RL HDF5 files, Minari datasets, and a small offline dataset.

Every loader turns its source into five arrays and hands them to `Transitions.from_arrays`, which
does all bad-data checks and moves the whole dataset to the training device. Alongside the data,
`load_dataset` returns the task (hyperparameters and reference scores) and a factory for the
evaluation environment, whose observations are flattened exactly as the data's are. A run's data
(`load_run_data`) is its tasks' LoadedData, in --task order (RunData).

Transition rules (spec-level facts, tested in tests/test_data.py):
- D4RL (`d4rl.qlearning_dataset`, terminate_on_end=False): for i in 0..N-2, a row whose
  `timeouts[i]` is set is skipped (also when `terminals[i]` is set too); otherwise
  (obs[i], actions[i], rewards[i], obs[i+1], terminals[i]). The last row never starts a transition.
- Minari: per episode of T steps, (obs[t], actions[t], rewards[t], obs[t+1], terminations[t]) for
  t in 0..T-1; truncations never stop bootstrapping.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from . import optional
from .config import ConfigError
from .tasks import DEFAULT_HYPER, OFFLINE_DATASET_ID, OFFLINE_DEMO_HYPER, TASKS, Hyper, Task, get_task
from .transitions import AgentData, DatasetError, Transitions

if TYPE_CHECKING:
    import torch

    from .config import TrainConfig

gym = optional.gymnasium()  # absent on a bare GPU machine: D4RL files still load

__all__ = [
    "LoadedData", "load_dataset", "load_d4rl", "load_minari", "build_offline_dataset",
    "d4rl_qlearning", "minari_episodes_to_arrays", "d4rl_path", "flatten_obs", "FlattenObservation",
    "OFFLINE_DATASET_ID", "D4RL_KEYS", "RoboticsMissingError", "RunData", "load_run_data",
]

D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
DOWNLOAD_TIMEOUT_S = 10.0


class RoboticsMissingError(ImportError):
    """An evaluation environment needs gymnasium-robotics, which is not installed."""


@dataclass
class LoadedData:
    transitions: Transitions
    task: Task
    make_env: Callable[..., gym.Env]         # one evaluation env, observations flattened like the data
                                             # (keywords go to gym.make, e.g. render_mode="rgb_array")
    behaviour_return: float | None           # mean undiscounted return of the data's complete episodes
    note: str = ""                           # where reference scores etc. came from, caveats
    source: str = ""                         # file path or Minari id the data was read from
    episodes: int | None = None              # complete episodes behind behaviour_return
    env_problem: str | None = None           # set when make_env() is known to fail (missing extra)
    fingerprint: str | None = None           # d4rl_fingerprint of a D4RL file's arrays (None for other sources)
    extras: dict = field(default_factory=dict)


# -- observation flattening (shared by data and evaluation) --------------------------------------

def _space_keys(space: gym.Space | None, sample: dict) -> list[str]:
    if isinstance(space, gym.spaces.Dict):
        return list(space.spaces.keys())
    return list(sample.keys())


def flatten_obs(obs, keys: Sequence[str] = (), space: gym.Space | None = None, batched: bool = False) -> np.ndarray:
    """A dict observation as one flat vector (or (T, S) rows when `batched`).

    `keys` fixes the order of the top-level keys (AntMaze: achieved_goal (x, y), then observation);
    without keys every key is used, in the space's order, nested dicts recursively.
    Non-dict observations pass through as arrays.
    """
    if not isinstance(obs, dict):
        arr = np.asarray(obs)
        if batched:
            return arr.reshape(arr.shape[0], -1)
        return arr.reshape(-1)
    use = list(keys) if keys else _space_keys(space, obs)
    parts = []
    for k in use:
        if k not in obs:
            raise DatasetError(f"dict observation has no key {k!r} (keys: {sorted(obs)})")
        sub = space.spaces[k] if isinstance(space, gym.spaces.Dict) and k in space.spaces else None
        parts.append(flatten_obs(obs[k], (), sub, batched))
    return np.concatenate(parts, axis=-1)


def _flat_box(space: gym.Space, keys: Sequence[str]) -> gym.spaces.Box:
    lo = flatten_obs(_map_space(space, "low"), keys, space)
    hi = flatten_obs(_map_space(space, "high"), keys, space)
    return gym.spaces.Box(lo.astype(np.float64), hi.astype(np.float64), dtype=np.float64)


def _map_space(space: gym.Space, attr: str):
    if isinstance(space, gym.spaces.Dict):
        return {k: _map_space(s, attr) for k, s in space.spaces.items()}
    if isinstance(space, gym.spaces.Box):
        return getattr(space, attr)
    raise DatasetError(f"observation space {space} is not supported (only Box and Dict of Box)")


class FlattenObservation(gym.ObservationWrapper):
    """Dict observations -> one float vector, in the same order as the training data."""

    def __init__(self, env: gym.Env, keys: Sequence[str] = ()):
        super().__init__(env)
        self.keys = tuple(keys)
        self._inner_space = env.observation_space
        self.observation_space = _flat_box(env.observation_space, self.keys)

    def observation(self, observation):
        return flatten_obs(observation, self.keys, self._inner_space)


class _CheckWidths(gym.ObservationWrapper):
    """Fail early and clearly when the evaluation env does not match the data's state or action size."""

    def __init__(self, env: gym.Env, state_dim: int, action_dim: int, what: str):
        super().__init__(env)
        shape = env.observation_space.shape
        if shape is not None and int(np.prod(shape)) != state_dim:
            raise DatasetError(f"evaluation env {what} gives observations of size {int(np.prod(shape))}, "
                               f"but the dataset's states have size {state_dim}; they must match.")
        shape = env.action_space.shape
        if shape is not None and int(np.prod(shape)) != action_dim:
            raise DatasetError(f"the dataset's actions have {action_dim} dimensions, but its evaluation env "
                               f"{what} takes {int(np.prod(shape))}; they must match (pick the --task the data "
                               "was collected on).")

    def observation(self, observation):
        return observation


def _wrap_eval_env(env: gym.Env, keys: Sequence[str], state_dim: int, action_dim: int, what: str) -> gym.Env:
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = FlattenObservation(env, keys)
    return _CheckWidths(env, state_dim, action_dim, what)


def check_env_widths(loaded: "LoadedData", need_env: bool = True):
    """The dataset's state and action widths against its evaluation env (_CheckWidths), right after
    loading: a mismatch would otherwise train to the end and fail at the first evaluation (or never,
    without one). `need_env` False (no evaluation asked for): an env that cannot be built is not an error."""
    if loaded.env_problem:
        return
    try:
        env = loaded.make_env()
    except DatasetError:
        raise
    except Exception:
        if need_env:
            raise
        return
    env.close()


def _env_problem(env_id: str | None) -> str | None:
    """None when gymnasium can build env_id, else what to install (gymnasium, MuJoCo or gymnasium-robotics)."""
    if env_id is None:
        return None
    what = f"evaluation env {env_id!r}"
    if not optional.have("gymnasium"):
        return optional.missing_message("gymnasium", what)
    try:
        spec = gym.spec(env_id)
    except gym.error.Error:
        if importlib.util.find_spec("gymnasium_robotics") is None:
            return f'{what} needs gymnasium-robotics, which is not installed: pip install "dtql_fast[robotics]"'
        return None
    if "mujoco" in str(spec.entry_point) and not optional.have("mujoco"):
        return optional.missing_message("mujoco", what)
    return None


# Gymnasium-robotics' AntMaze keeps running after the goal unless told otherwise; D4RL's eval
# env ends the episode at the goal, so a return is 0 or 1 as the normalisation expects.
_ENV_KWARGS_BY_PREFIX = {"AntMaze_": {"continuing_task": False}}


def _gym_make(env_id: str, **make_kw) -> gym.Env:
    try:
        gym.spec(env_id)
    except gym.error.Error:
        try:
            import gymnasium_robotics  # noqa: F401  (registers the robotics envs)
        except ImportError as e:
            raise RoboticsMissingError(_env_problem(env_id) or str(e)) from None
        gym.register_envs(gymnasium_robotics)
    kwargs = dict(make_kw)  # e.g. render_mode="rgb_array" (python -m dtql_fast.evaluate --video)
    for prefix, kw in _ENV_KWARGS_BY_PREFIX.items():
        if env_id.startswith(prefix):
            kwargs.update(kw)
    return gym.make(env_id, **kwargs)


# -- D4RL ---------------------------------------------------------------------------------------

def d4rl_path(task: Task, dataset_path: str | os.PathLike | None = None) -> Path:
    """Where D4RL's HDF5 for `task` is read from: dataset_path (a file, or a folder holding the
    file under its D4RL name), else $D4RL_DATASET_DIR or ~/.d4rl/datasets, as D4RL itself does."""
    base = os.path.basename(task.d4rl_url)
    if dataset_path is not None:
        p = Path(dataset_path).expanduser()
        return p / base if p.is_dir() else p
    root = os.environ.get("D4RL_DATASET_DIR", os.path.join("~", ".d4rl", "datasets"))
    return Path(root).expanduser() / base


def _download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    print(f"dtql_fast: downloading {url} -> {dest}", file=sys.stderr, flush=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as f:
            shutil.copyfileobj(resp, f, length=1 << 20)
        os.replace(part, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


def _read_d4rl_hdf5(path: Path, url: str | None) -> dict[str, np.ndarray]:
    import h5py

    again = f" Delete it and download it again from {url}." if url else ""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read as an HDF5 file ({e}); it may be truncated or "
                           f"not a D4RL dataset.{again}") from None
    with f:
        missing = [k for k in D4RL_KEYS if not isinstance(f.get(k), h5py.Dataset)]
        if missing:
            raise DatasetError(f"{path}: missing D4RL key(s) {missing}; a D4RL file needs {list(D4RL_KEYS)} "
                               f"(found: {sorted(f.keys())}).")
        try:
            return {k: f[k][()] for k in D4RL_KEYS}
        except (OSError, ValueError, KeyError) as e:
            raise DatasetError(f"{path}: reading the data failed ({e}); the file is probably truncated "
                               f"or corrupt.{again}") from None


def d4rl_fingerprint(raw: dict) -> str:
    """The first 16 hex digits of a sha256 over a D4RL file's five arrays (name, dtype, shape, bytes). Two
    builds of a dataset hold the same data exactly when their fingerprints agree, whatever HDF5 wrote around
    the arrays. A rebuild is not the same data on every CPU (docs/learning.md: MKL picks its code path by
    CPU vendor), so a run records the fingerprint of what it read."""
    h = hashlib.sha256()
    for k in D4RL_KEYS:
        a = np.ascontiguousarray(raw[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _as_column(raw: dict, key: str, n: int, source: str) -> np.ndarray:
    arr = np.asarray(raw[key])
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DatasetError(f"{source}: '{key}' holds {arr.dtype} values, not numbers; the file is not a D4RL "
                           "dataset or was written wrongly.")
    if arr.ndim == 0 or arr.shape[0] != n or arr.size != n:
        raise DatasetError(f"{source}: '{key}' has shape {arr.shape}; expected one value per row "
                           f"({n} rows, like 'observations').")
    return arr.reshape(n)


def d4rl_qlearning(raw: dict, source: str = "D4RL dataset") -> dict[str, np.ndarray]:
    """D4RL's `qlearning_dataset` rule (terminate_on_end=False), vectorised.

    For i in 0..N-2: skip i if timeouts[i]; else keep (obs[i], act[i], r[i], obs[i+1], terminals[i]).
    """
    obs, act = np.asarray(raw["observations"]), np.asarray(raw["actions"])
    for key, arr in (("observations", obs), ("actions", act)):
        if not np.issubdtype(arr.dtype, np.number):
            raise DatasetError(f"{source}: '{key}' holds {arr.dtype} values, not numbers; the file is not a D4RL "
                               "dataset or was written wrongly.")
    if obs.ndim == 0:
        raise DatasetError(f"{source}: 'observations' is a scalar, not an (N, dim) array.")
    n = obs.shape[0]
    if act.ndim == 0 or act.shape[0] != n:
        raise DatasetError(f"{source}: 'actions' has {act.shape[0] if act.ndim else 0} rows, but "
                           f"'observations' has {n}; every field needs one row per step.")
    rew = _as_column(raw, "rewards", n, source)
    term = _as_column(raw, "terminals", n, source)
    tout = _as_column(raw, "timeouts", n, source)
    keep = np.flatnonzero(~tout[: max(n - 1, 0)].astype(bool))
    return {"obs": obs[keep], "actions": act[keep], "rewards": rew[keep], "next_obs": obs[keep + 1],
            "dones": term[keep].astype(bool), "rows": keep}


def _episode_returns(rewards: np.ndarray, ends: np.ndarray) -> list[float]:
    """Returns of the complete episodes (a row with ends set closes an episode)."""
    rets, start = [], 0
    csum = np.concatenate([[0.0], np.cumsum(rewards.astype(np.float64))])
    for e in np.flatnonzero(ends):
        rets.append(float(csum[e + 1] - csum[start]))
        start = e + 1
    return rets


def load_d4rl(task: Task, dataset_path=None, device="cpu", *, download: bool = True) -> LoadedData:
    path = d4rl_path(task, dataset_path)
    url = task.d4rl_url
    if not path.is_file():
        why = "downloading is switched off"
        if download:
            try:
                _download(url, path)
                why = ""
            except (urllib.error.URLError, OSError, ValueError) as e:
                why = f"downloading it failed ({e})"
        if not path.is_file():
            raise DatasetError(
                f"D4RL dataset for {task.name!r} not found at {path}, and {why}. Download {url} and put it "
                f"at {path} (e.g. `mkdir -p {path.parent} && wget -O {path} {url}`), or pass its path "
                f"with --dataset PATH, or set D4RL_DATASET_DIR to the folder holding it.")
    raw = _read_d4rl_hdf5(path, url)
    arrays = d4rl_qlearning(raw, source=str(path))
    transitions = Transitions.from_arrays(arrays["obs"], arrays["actions"], arrays["rewards"] + task.reward_shift,
                                          arrays["next_obs"], arrays["dones"], source=str(path),
                                          max_action=task.hyper.max_action, device=device, file_rows=arrays["rows"])
    ends = np.asarray(raw["terminals"]).reshape(-1).astype(bool) | np.asarray(raw["timeouts"]).reshape(-1).astype(bool)
    rets = _episode_returns(np.asarray(raw["rewards"]).reshape(-1), ends)
    state_dim, action_dim = transitions.state_dim, transitions.action_dim
    keys = task.obs_keys

    def make_env(**make_kw) -> gym.Env:
        return _wrap_eval_env(_gym_make(task.env_id, **make_kw), keys, state_dim, action_dim, task.env_id)

    note = f"D4RL file {path}"
    if task.reward_shift:
        note += f"; rewards shifted by {task.reward_shift:+g}"
    return LoadedData(transitions, task, make_env, float(np.mean(rets)) if rets else None, note=note,
                      source=str(path), episodes=len(rets), env_problem=_env_problem(task.env_id),
                      fingerprint=d4rl_fingerprint(raw))


# -- Minari -------------------------------------------------------------------------------------

def minari_episodes_to_arrays(episodes: Iterable, obs_keys: Sequence[str] = (), obs_space=None,
                              source: str = "Minari dataset") -> tuple[dict[str, np.ndarray], list[float]]:
    """Transitions of Minari episodes: s=obs[t], s'=obs[t+1], done=terminations[t] for every step
    t of every episode; truncations are ignored (they never stop bootstrapping).

    `episodes` yields objects with .observations (T+1 rows, or a dict of such), .actions (T),
    .rewards, .terminations, .truncations. Returns the arrays and each episode's return.
    """
    cols = {k: [] for k in ("obs", "actions", "rewards", "next_obs", "dones")}
    rets = []
    for i, ep in enumerate(episodes):
        obs = flatten_obs(ep.observations, obs_keys, obs_space, batched=True)
        act = np.asarray(ep.actions)
        rew = np.asarray(ep.rewards).reshape(-1)
        term = np.asarray(ep.terminations).reshape(-1)
        t = rew.shape[0]
        if act.ndim == 1:
            act = act.reshape(t, -1) if t else act.reshape(0, 1)
        if obs.shape[0] != t + 1 or act.shape[0] != t or term.shape[0] != t:
            raise DatasetError(f"{source}: episode {i} has {obs.shape[0]} observations, {act.shape[0]} actions, "
                               f"{t} rewards and {term.shape[0]} terminations; expected T+1, T, T, T.")
        cols["obs"].append(obs[:-1])
        cols["next_obs"].append(obs[1:])
        cols["actions"].append(act)
        cols["rewards"].append(rew)
        cols["dones"].append(term.astype(bool))
        rets.append(float(rew.astype(np.float64).sum()))
    if not rets:
        raise DatasetError(f"{source}: the dataset has no episodes.")
    widths = {k: {a.shape[1:] for a in v} for k, v in cols.items()}
    for k, w in widths.items():
        if len(w) > 1:
            raise DatasetError(f"{source}: episodes disagree on the shape of '{k}': {sorted(w)}.")
    return {k: np.concatenate(v, axis=0) for k, v in cols.items()}, rets


def _d4rl_task_for_minari(dataset_id: str) -> Task | None:
    """'mujoco/hopper/medium-v0' -> hopper-medium-v2, 'D4RL/antmaze/umaze-v1' -> antmaze-umaze-v0, ..."""
    parts = dataset_id.split("/")
    if len(parts) < 2:
        return None
    env = parts[-2]
    name = parts[-1].rsplit("-v", 1)[0]
    matches = sorted(t for t in TASKS if t.rsplit("-v", 1)[0] == f"{env}-{name}")
    return TASKS[matches[0]] if matches else None


def _open_minari(dataset_id: str, download: bool):
    import minari

    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        pass
    except Exception as e:  # a damaged local copy
        raise DatasetError(f"Minari dataset {dataset_id!r} is stored locally but cannot be read ({e}). "
                           f"Delete it (`minari delete {dataset_id}`) and get it again.") from None
    how = (f'Get it with `pip install "dtql_fast[hf]"` (Minari\'s download support) and then '
           f'`minari download {dataset_id}`, or point MINARI_DATASETS_PATH at a folder that holds it.')
    if not download:
        raise DatasetError(f"Minari dataset {dataset_id!r} is not stored locally. {how}")
    try:
        minari.download_dataset(dataset_id)
        return minari.load_dataset(dataset_id)
    except Exception as e:
        raise DatasetError(f"Minari dataset {dataset_id!r} is not stored locally and downloading it failed "
                           f"({type(e).__name__}: {e}). {how}") from None


def load_minari(dataset_id: str, device="cpu", *, download: bool = True) -> LoadedData:
    ds = _open_minari(dataset_id, download)
    meta = ds.storage.metadata
    mapped = _d4rl_task_for_minari(dataset_id)
    notes = [f"Minari dataset {dataset_id}"]
    ref_min, ref_max = meta.get("ref_min_score"), meta.get("ref_max_score")
    if ref_min is not None and ref_max is not None:
        ref_min, ref_max = float(ref_min), float(ref_max)
        notes.append("reference scores from the dataset's metadata")
    elif mapped is not None:
        ref_min, ref_max = mapped.ref_min, mapped.ref_max
        notes.append(f"reference scores from D4RL's {mapped.name} (the dataset has none)")
    else:
        ref_min = ref_max = None
        notes.append("no reference scores: normalised scores are not available")
    action_space = ds.action_space
    max_action = DEFAULT_HYPER.max_action
    if not isinstance(action_space, gym.spaces.Box):
        raise DatasetError(f"Minari dataset {dataset_id!r}: action space {action_space} is not a Box.")
    if not (np.allclose(action_space.low, -max_action) and np.allclose(action_space.high, max_action)):
        raise DatasetError(f"Minari dataset {dataset_id!r}: action box [{action_space.low}, {action_space.high}] "
                           f"is not [-{max_action}, {max_action}], which the policy's tanh squashing assumes.")
    obs_keys = mapped.obs_keys if mapped is not None else ()
    reward_shift = mapped.reward_shift if mapped is not None else 0.0
    if reward_shift:
        notes.append(f"rewards shifted by {reward_shift:+g} (as for D4RL's {mapped.name})")
    task = Task(name=dataset_id, hyper=DEFAULT_HYPER, env_id=None, d4rl_url=None, ref_min=ref_min,
                ref_max=ref_max, reward_shift=reward_shift,
                eval_episodes=mapped.eval_episodes if mapped is not None else 10, obs_keys=obs_keys)
    try:
        arrays, rets = minari_episodes_to_arrays(ds.iterate_episodes(), obs_keys, ds.observation_space,
                                                 source=f"Minari dataset {dataset_id}")
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"Minari dataset {dataset_id!r}: reading the episodes failed ({e}); the local copy "
                           f"may be damaged.") from None
    src = f"Minari dataset {dataset_id}"
    transitions = Transitions.from_arrays(arrays["obs"], arrays["actions"], arrays["rewards"] + reward_shift,
                                          arrays["next_obs"], arrays["dones"], source=src,
                                          max_action=max_action, device=device)
    state_dim, action_dim = transitions.state_dim, transitions.action_dim
    env_id = getattr(ds.env_spec, "id", None)

    def make_env(**make_kw) -> gym.Env:
        try:
            env = ds.recover_environment(eval_env=True, **make_kw)
        except (gym.error.Error, ImportError):
            try:
                env = ds.recover_environment(**make_kw)
            except (gym.error.Error, ImportError):
                problem = _env_problem(env_id)
                if problem:
                    raise RoboticsMissingError(problem) from None
                raise
        return _wrap_eval_env(env, obs_keys, state_dim, action_dim, env_id or dataset_id)

    return LoadedData(transitions, task, make_env, float(np.mean(rets)), note="; ".join(notes), source=src,
                      episodes=len(rets), env_problem=_env_problem(env_id))


# -- entry point --------------------------------------------------------------------------------

def is_minari_id(name: str) -> bool:
    return "/" in name


def load_dataset(name: str, dataset_path: str | None = None, device="cpu", *, download: bool = True) -> LoadedData:
    """Load a D4RL task of the paper's table (by name) or a Minari dataset (an id with '/').

    D4RL: reads D4RL's own HDF5 (dataset_path, else the D4RL cache, else downloads it there).
    Minari: `minari.load_dataset(id)`, downloading it when not local. Raises DatasetError (bad or
    missing data) or tasks.UnknownTaskError (a name that is neither).
    """
    if is_minari_id(name):
        if dataset_path is not None:
            with _env_var("MINARI_DATASETS_PATH", str(Path(dataset_path).expanduser())):
                return load_minari(name, device, download=download)
        return load_minari(name, device, download=download)
    return load_d4rl(get_task(name), dataset_path, device, download=download)


@contextlib.contextmanager
def _env_var(key: str, value: str | None):
    old = os.environ.get(key)
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


# -- the offline default dataset ----------------------------------------------------------------
#
# Reacher-v5 (MuJoCo, 2 joints, action box [-1, 1]^2, 50-step episodes, no terminal states).
# Behaviour: a Jacobian-transpose PD controller that moves the fingertip to the target,
# torque = clip(-KP * J^T (tip - target) - KD * qdot), with Gaussian noise (std NOISE_STD) added,
# and with probability RANDOM_PROB a uniform random action instead. Reference scores, measured at
# build time on seeds REF_SEED.. and stored in the dataset's metadata:
#   ref_min = mean return of the uniform random policy over REF_EPISODES episodes,
#   ref_max = mean return of the noiseless controller over REF_EPISODES episodes.

OFFLINE_ENV_ID = "Reacher-v5"
OFFLINE_EPISODES = 400
_L1, _L2 = 0.1, 0.11          # Reacher's link lengths (upper arm, forearm to fingertip)
KP, KD = 20.0, 0.1
NOISE_STD, RANDOM_PROB = 0.3, 0.3
REF_EPISODES, REF_SEED = 100, 10_000


def reacher_controller(obs: np.ndarray) -> np.ndarray:
    """The noiseless scripted controller for Reacher-v5 observations (batched (N, 10) or (10,))."""
    o = np.atleast_2d(obs)
    c0, c1, s0, s1 = o[:, 0], o[:, 1], o[:, 2], o[:, 3]
    c01, s01 = c0 * c1 - s0 * s1, s0 * c1 + c0 * s1
    ex, ey = o[:, 8], o[:, 9]   # fingertip - target
    # J = [[-L1 s0 - L2 s01, -L2 s01], [L1 c0 + L2 c01, L2 c01]];  tau = -KP J^T e - KD qdot
    t0 = -KP * ((-_L1 * s0 - _L2 * s01) * ex + (_L1 * c0 + _L2 * c01) * ey) - KD * o[:, 6]
    t1 = -KP * ((-_L2 * s01) * ex + (_L2 * c01) * ey) - KD * o[:, 7]
    a = np.clip(np.stack([t0, t1], axis=1), -1.0, 1.0)
    return a if np.ndim(obs) == 2 else a[0]


def _behaviour_action(obs, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < RANDOM_PROB:
        return rng.uniform(-1.0, 1.0, 2)
    return np.clip(reacher_controller(obs) + NOISE_STD * rng.standard_normal(2), -1.0, 1.0)


def _rollout(env: gym.Env, policy, seed: int, rng: np.random.Generator):
    obs_l, act_l, rew_l, term_l, trunc_l = [], [], [], [], []
    obs, _ = env.reset(seed=seed)
    obs_l.append(obs)
    while True:
        a = np.asarray(policy(obs, rng), dtype=np.float32)
        obs, r, term, trunc, _ = env.step(a)
        obs_l.append(obs); act_l.append(a); rew_l.append(float(r)); term_l.append(bool(term)); trunc_l.append(bool(trunc))
        if term or trunc:
            return np.array(obs_l), np.array(act_l), np.array(rew_l), np.array(term_l), np.array(trunc_l)


def _mean_return(env, policy, episodes: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return float(np.mean([_rollout(env, policy, seed + i, rng)[2].sum() for i in range(episodes)]))


def _minari_dataset_exists(dataset_id: str) -> bool:
    from minari.storage import get_dataset_path
    return (get_dataset_path(dataset_id) / "data" / "metadata.json").is_file()


def build_offline_dataset(dataset_id: str = OFFLINE_DATASET_ID, device="cpu", *, episodes: int = OFFLINE_EPISODES,
                          seed: int = 0, rebuild: bool = False, verbose: bool = True) -> LoadedData:
    """The offline default dataset: noisy scripted Reacher-v5 episodes, stored as a local Minari
    dataset (under $MINARI_DATASETS_PATH or ~/.minari/datasets). Reused when already built; needs no
    network. Returns `load_dataset(dataset_id)`."""
    import minari
    from minari.data_collector import EpisodeBuffer
    from minari.storage import get_dataset_path

    if rebuild and get_dataset_path(dataset_id).exists():
        shutil.rmtree(get_dataset_path(dataset_id))
    if not _minari_dataset_exists(dataset_id):
        t0 = time.perf_counter()
        env = gym.make(OFFLINE_ENV_ID)
        rng = np.random.default_rng(seed)
        buffers = []
        for i in range(episodes):
            o, a, r, te, tr = _rollout(env, _behaviour_action, seed + i, rng)
            buffers.append(EpisodeBuffer(id=i, seed=seed + i, observations=o, actions=a, rewards=r,
                                         terminations=te, truncations=tr))
        ref_min = _mean_return(env, lambda o, g: g.uniform(-1.0, 1.0, 2), REF_EPISODES, REF_SEED)
        ref_max = _mean_return(env, lambda o, g: reacher_controller(o), REF_EPISODES, REF_SEED)
        root = get_dataset_path()
        with tempfile.TemporaryDirectory(dir=root, prefix=".dtql-build-") as tmp:
            with _env_var("MINARI_DATASETS_PATH", tmp):
                minari.create_dataset_from_buffers(
                    dataset_id, buffers, env=OFFLINE_ENV_ID, eval_env=OFFLINE_ENV_ID,
                    algorithm_name=(f"scripted Jacobian-transpose PD (KP={KP}, KD={KD}) + N(0,{NOISE_STD}^2) "
                                    f"noise, uniform random action w.p. {RANDOM_PROB}"),
                    author="dtql_fast", author_email="n/a", code_permalink="dtql_fast/data.py",
                    ref_min_score=ref_min, ref_max_score=ref_max, num_episodes_average_score=REF_EPISODES,
                    description=(f"{episodes} episodes of a noisy scripted controller on {OFFLINE_ENV_ID}. "
                                 f"ref_min_score: uniform random policy, ref_max_score: the noiseless "
                                 f"controller; each the mean return of {REF_EPISODES} episodes "
                                 f"(seeds {REF_SEED}..{REF_SEED + REF_EPISODES - 1})."))
            built = Path(tmp) / dataset_id
            final = get_dataset_path(dataset_id)
            # Namespace metadata files, so minari's listing tools see the namespace.
            ns = Path(dataset_id).parent
            for parent in [ns, *ns.parents][:-1]:
                src, dst = Path(tmp) / parent / "namespace_metadata.json", root / parent / "namespace_metadata.json"
                if src.is_file() and not dst.is_file():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
            final.parent.mkdir(parents=True, exist_ok=True)
            if not _minari_dataset_exists(dataset_id):   # another process may have finished first
                if final.exists():
                    shutil.rmtree(final)                  # a half-built leftover of our own id
                os.replace(built, final)
        if verbose:
            print(f"dtql_fast: built {dataset_id} ({episodes} episodes of {OFFLINE_ENV_ID}) at {final} in "
                  f"{time.perf_counter() - t0:.1f} s; ref_min {ref_min:.2f} (random), ref_max {ref_max:.2f} "
                  f"(scripted controller)", file=sys.stderr, flush=True)
    return load_dataset(dataset_id, None, device, download=False)


# -- a run's data: each of its tasks' -------------------------------------------------------------------


@dataclass
class RunData:
    """What a run's agents train and are evaluated on: each task's LoadedData (dataset, evaluation env,
    reference scores), in --task order, and the task of each agent. `transitions`: one task's Transitions, or
    for a task list an AgentData, each agent sampling its own task's rows."""
    per_task: list
    of_agent: list[int]
    transitions: object

    def agent(self, i: int):
        """Agent i's task's LoadedData."""
        return self.per_task[self.of_agent[i]]

    def hypers(self, cfg: TrainConfig) -> list[Hyper]:
        """Each task's table with the command's overrides (TrainConfig.agent_hypers' bases)."""
        return [cfg.hyper(one.task.hyper) for one in self.per_task]

    @property
    def source(self) -> str:
        return ",".join(one.source for one in self.per_task)

    @property
    def fingerprint(self) -> str | None:
        """The datasets' fingerprints, one per task in order (None where a source has none)."""
        prints = [one.fingerprint for one in self.per_task]
        return None if prints == [None] * len(prints) else ",".join(p or "-" for p in prints)

    @property
    def note(self) -> str:
        return "; ".join(one.note for one in self.per_task if one.note)

    @property
    def behaviour_return(self) -> float | None:
        """The behaviour data's mean return (None for a task list: summary.json has each task's)."""
        return self.per_task[0].behaviour_return if len(self.per_task) == 1 else None

    def eval_episodes(self) -> int:
        counts = {one.task.eval_episodes for one in self.per_task}
        if len(counts) > 1:
            raise ConfigError("the tasks evaluate different numbers of episodes ("
                              + ", ".join(f"{one.task.name}: {one.task.eval_episodes}" for one in self.per_task)
                              + "); give --eval-episodes")
        return counts.pop()


def load_run_data(cfg: TrainConfig, device: torch.device) -> RunData:
    """The datasets (and evaluation envs, tasks, reference scores) a run trains on: for each task its --dataset
    file or Minari id, else the task's D4RL file; the offline Reacher demo for the default task. A task list's
    datasets must share state and action widths."""
    paths = cfg.datasets()
    if len(paths) != len(cfg.tasks):
        raise ConfigError(f"--dataset gives {len(paths)} paths for {len(cfg.tasks)} tasks; give one path, or one "
                          "per task in --task's order")
    per_task = []
    for name, path in zip(cfg.tasks, paths):
        if name == OFFLINE_DATASET_ID and path is None:
            one = build_offline_dataset(device=device)
            one.task = dataclasses.replace(one.task, hyper=OFFLINE_DEMO_HYPER)
        else:
            one = load_dataset(name, path, device)
        per_task.append(one)
    if len(per_task) == 1:
        return RunData(per_task, [0] * len(cfg.agents), per_task[0].transitions)
    widths = {name: (one.transitions.state_dim, one.transitions.action_dim) for name, one in zip(cfg.tasks, per_task)}
    if len(set(widths.values())) > 1:
        raise ConfigError("the tasks of one run must share state and action widths; got "
                          + ", ".join(f"{t}: state {s}, action {a}" for t, (s, a) in widths.items()))
    of_agent = cfg.task_of_agent
    return RunData(per_task, of_agent, AgentData([one.transitions for one in per_task], of_agent))

