"""The paper's per-task settings as data, and where each task's data and evaluation come from.

One `Hyper` per task (the algorithm's numbers, spec "Hyperparameters"; each with its rules in
hyper.py) and one `Task` (data source, evaluation environment, D4RL reference scores). Nothing here
branches on a task name.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from .hyper import Hyper

D4RL_BASE = "http://rail.eecs.berkeley.edu/datasets/offline_rl"


@dataclass(frozen=True)
class Task:
    name: str
    hyper: Hyper
    env_id: str | None           # gymnasium id used for evaluation
    d4rl_url: str | None         # D4RL HDF5 file; None for Minari ids
    ref_min: float | None        # D4RL normalisation: 100 * (R - min) / (max - min)
    ref_max: float | None
    reward_shift: float = 0.0    # AntMaze: r - 1 (the IQL convention)
    eval_episodes: int = 10
    obs_keys: tuple[str, ...] = field(default=())  # dict observations flattened in this order

    @property
    def widths(self) -> tuple[int, int] | None:
        """(state, action) of its data and env, known before loading (WIDTHS); None outside the table."""
        return WIDTHS.get(self.name.split("-")[0])

    def normalized_score(self, ret: float) -> float | None:
        if self.ref_min is None or self.ref_max is None:
            return None
        return 100.0 * (ret - self.ref_min) / (self.ref_max - self.ref_min)


#          name                            alpha  gamma  lr     decay  epochs batch  expectile
_TABLE = [
    ("halfcheetah-medium-v2",              1,     0,     3e-4,  False, 1000,  256,   0.7),
    ("halfcheetah-medium-replay-v2",       5,     0,     3e-4,  False, 1000,  256,   0.7),
    ("halfcheetah-medium-expert-v2",       50,    0,     3e-4,  False, 1000,  256,   0.7),
    ("hopper-medium-v2",                   5,     0,     1e-4,  True,  1000,  256,   0.7),
    ("hopper-medium-replay-v2",            5,     0,     3e-4,  False, 1000,  256,   0.7),
    ("hopper-medium-expert-v2",            20,    0,     3e-4,  False, 1000,  256,   0.7),
    ("walker2d-medium-v2",                 5,     0,     3e-4,  True,  1000,  256,   0.7),
    ("walker2d-medium-replay-v2",          5,     0,     3e-4,  True,  1000,  256,   0.7),
    ("walker2d-medium-expert-v2",          5,     0,     3e-4,  True,  1000,  256,   0.7),
    ("antmaze-umaze-v0",                   1,     1,     3e-4,  False, 500,   2048,  0.9),
    ("antmaze-umaze-diverse-v0",           1,     1,     3e-5,  True,  500,   2048,  0.9),
    ("antmaze-medium-play-v0",             1,     1,     3e-4,  False, 400,   2048,  0.9),
    ("antmaze-medium-diverse-v0",          1,     1,     3e-4,  False, 400,   2048,  0.9),
    ("antmaze-large-play-v0",              1,     1,     3e-4,  False, 350,   2048,  0.9),
    ("antmaze-large-diverse-v0",           0.5,   1,     3e-4,  False, 300,   2048,  0.9),
    ("pen-human-v1",                       1500,  0,     3e-5,  True,  300,   256,   0.9),
    ("pen-cloned-v1",                      1500,  0,     1e-5,  False, 200,   256,   0.7),
    ("kitchen-complete-v0",                200,   0,     1e-4,  True,  500,   256,   0.7),
    ("kitchen-partial-v0",                 100,   0,     1e-4,  True,  1000,  256,   0.7),
    ("kitchen-mixed-v0",                   200,   0,     3e-4,  True,  500,   256,   0.7),
]

# Locomotion: gymnasium's v4 envs share D4RL v2's MuJoCo models (v5 changed Walker2d's friction).
_LOCOMOTION = {
    "halfcheetah": ("HalfCheetah-v4", -280.178953, 12135.0),
    "hopper": ("Hopper-v4", -20.272305, 3234.3),
    "walker2d": ("Walker2d-v4", 1.629008, 4592.3),
}
_ANTMAZE_FILES = {
    "umaze": ("Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse", "AntMaze_UMaze-v5"),
    "umaze-diverse": ("Ant_maze_u-maze_noisy_multistart_True_multigoal_True_sparse", "AntMaze_UMaze-v5"),
    "medium-play": ("Ant_maze_big-maze_noisy_multistart_True_multigoal_False_sparse", "AntMaze_Medium-v5"),
    "medium-diverse": ("Ant_maze_big-maze_noisy_multistart_True_multigoal_True_sparse", "AntMaze_Medium_Diverse_GR-v5"),
    "large-play": ("Ant_maze_hardest-maze_noisy_multistart_True_multigoal_False_sparse", "AntMaze_Large-v5"),
    "large-diverse": ("Ant_maze_hardest-maze_noisy_multistart_True_multigoal_True_sparse", "AntMaze_Large_Diverse_GR-v5"),
}
_ADROIT = {"pen": ("AdroitHandPen-v1", 96.262799, 3076.8331)}
_KITCHEN_FILES = {
    "complete": "mini_kitchen_microwave_kettle_light_slider-v0.hdf5",
    "partial": "kitchen_microwave_kettle_light_slider-v0.hdf5",
    "mixed": "kitchen_microwave_kettle_bottomburner_light-v0.hdf5",
}
ANTMAZE_OBS_KEYS = ("achieved_goal", "observation")
# (state, action) widths of each environment family's data (the loader checks them against the env): what
# tells, before anything is loaded, which tasks can share one step (sweep --pack).
WIDTHS = {"walker2d": (17, 6), "hopper": (11, 3), "halfcheetah": (17, 6), "antmaze": (29, 8), "pen": (45, 24),
          "kitchen": (60, 9)}


def _task_for(name: str, hyper: Hyper) -> Task:
    env, rest = name.split("-", 1)
    if env in _LOCOMOTION:
        env_id, lo, hi = _LOCOMOTION[env]
        url = f"{D4RL_BASE}/gym_mujoco_v2/{name.replace('-v2', '').replace('-', '_')}-v2.hdf5"
        return Task(name, hyper, env_id, url, lo, hi)
    if env == "antmaze":
        variant, version = rest.rsplit("-", 1)
        stem, env_id = _ANTMAZE_FILES[variant]
        folder, suffix = ("ant_maze_new", "") if version == "v0" else ("ant_maze_v2", "_fixed")
        return Task(name, hyper, env_id, f"{D4RL_BASE}/{folder}/{stem}{suffix}.hdf5", 0.0, 1.0,
                    reward_shift=-1.0, eval_episodes=100, obs_keys=ANTMAZE_OBS_KEYS)
    if env in _ADROIT:
        env_id, lo, hi = _ADROIT[env]
        return Task(name, hyper, env_id, f"{D4RL_BASE}/hand_dapg_v1/{name}.hdf5", lo, hi, eval_episodes=100)
    if env == "kitchen":
        variant = rest.rsplit("-", 1)[0]
        return Task(name, hyper, "FrankaKitchen-v1", f"{D4RL_BASE}/kitchen/{_KITCHEN_FILES[variant]}",
                    0.0, 4.0, eval_episodes=100)
    raise AssertionError(f"no data source for {name}")


TASKS: dict[str, Task] = {}
for _name, _alpha, _gamma, _lr, _decay, _epochs, _batch, _expectile in _TABLE:
    _h = Hyper(alpha=_alpha, gamma=_gamma, lr=_lr, lr_decay=_decay, epochs=_epochs,
               batch_size=_batch, expectile=_expectile)
    TASKS[_name] = _task_for(_name, _h)
    if _name.startswith("antmaze-"):
        # The -v2 AntMaze files use the -v0 settings, trained for 500 epochs (paper).
        _v2 = _name.replace("-v0", "-v2")
        TASKS[_v2] = _task_for(_v2, _h.replace(epochs=500))


def one_per_task(value: str | None, tasks: int) -> list[str | None]:
    """A flag given for a --task list (train's --dataset, config.json's "source"): one value for every task,
    or a comma list of one per task, in --task's order."""
    if value is None or "," not in value:
        return [value] * tasks
    return value.split(",")


class UnknownTaskError(ValueError):
    pass


def step_limit(name: str | None) -> int | None:
    """The step limit gymnasium registers for a task's env; None where that is not known (no gymnasium here, a
    Minari id or the demo data, an env not registered)."""
    task = TASKS.get(name)
    if task is None or not task.env_id:
        return None
    try:
        import gymnasium as gym
    except ImportError:
        return None
    try:
        return gym.spec(task.env_id).max_episode_steps or None
    except gym.error.Error:
        return None


def get_task(name: str) -> Task:
    """A D4RL task of the paper's table. Minari ids are resolved by dtql_fast.data."""
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(TASKS), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownTaskError(
            f"unknown task {name!r}.{hint} Known D4RL tasks: {', '.join(sorted(TASKS))}; "
            "a Minari dataset id (e.g. 'mujoco/walker2d/medium-v0') also works."
        ) from None


# Defaults for datasets outside the paper's table (Minari ids, the offline demo data).
DEFAULT_HYPER = Hyper(alpha=5.0, gamma=0.0, lr=3e-4, lr_decay=False, epochs=1000)

# The offline demo (python -m dtql_fast.train with no arguments): a Reacher dataset built in
# seconds (data.build_offline_dataset), trained and evaluated in a few minutes on 2 CPU cores.
OFFLINE_DATASET_ID = "dtql_fast/reacher/scripted-v0"
OFFLINE_DEMO_HYPER = Hyper(alpha=5.0, gamma=0.0, lr=3e-4, lr_decay=False, epochs=4, pretrain_epochs=1,
                           eval_every=2)
