"""D4RL-format HDF5 files the tests write: random transitions of the given widths, an episode end (timeout)
every 100 rows, and optionally a NaN (bad data)."""
from pathlib import Path

import h5py
import numpy as np


def write_d4rl(path: Path, state_dim: int, action_dim: int, n: int = 400, seed: int = 0, nan_at: int | None = None):
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, state_dim)).astype(np.float32)
    if nan_at is not None:
        obs[nan_at, 0] = np.nan
    timeouts = np.zeros(n, bool)
    timeouts[99::100] = True
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["actions"] = rng.uniform(-1, 1, (n, action_dim)).astype(np.float32)
        f["rewards"] = rng.standard_normal(n).astype(np.float32)
        f["terminals"] = np.zeros(n, bool)
        f["timeouts"] = timeouts
