"""Validated transitions, held as tensors on the training device.

Every loader (D4RL HDF5, Minari, the offline builder) ends here, so every bad-data check lives
in one place and runs before training starts.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message says what is wrong and where."""


@dataclass
class Transitions:
    obs: torch.Tensor       # (N, S)
    actions: torch.Tensor   # (N, A)
    rewards: torch.Tensor   # (N, 1)
    next_obs: torch.Tensor  # (N, S)
    not_done: torch.Tensor  # (N, 1), 0.0 where the transition ended in a terminal state

    @property
    def n(self) -> int:
        return self.obs.shape[0]

    @property
    def state_dim(self) -> int:
        return self.obs.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    def batch(self, idx: torch.Tensor):
        """(s, a, r, s', not_done) at rows idx."""
        return (self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.not_done[idx])

    @classmethod
    def from_arrays(cls, obs, actions, rewards, next_obs, dones, *, source: str = "dataset",
                    max_action: float = 1.0, device="cpu", file_rows: np.ndarray | None = None) -> "Transitions":
        """Check the arrays and move them to `device` as float32 tensors. `file_rows`: the source file's
        row of each transition (D4RL's rule drops rows), so a bad value is reported where it is."""
        arrays = {"observations": obs, "actions": actions, "rewards": rewards,
                  "next_observations": next_obs, "terminals": dones}
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        n = arrays["observations"].shape[0] if arrays["observations"].ndim else 0
        if n == 0:
            why = "" if file_rows is None else (
                " D4RL's rule pairs each row with the next one and drops the last row and every timeout "
                "row, so a file needs at least two rows of one episode.")
            raise DatasetError(f"{source}: no transitions to train on.{why}")
        for key, arr in arrays.items():
            if arr.shape[:1] != (n,):
                raise DatasetError(f"{source}: '{key}' has {arr.shape[0] if arr.ndim else 0} rows, "
                                   f"but 'observations' has {n}; every field needs one row per transition.")
            if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
                raise DatasetError(f"{source}: '{key}' has non-numeric dtype {arr.dtype}.")
        for key in ("observations", "actions", "next_observations"):
            if arrays[key].ndim != 2:
                raise DatasetError(f"{source}: '{key}' should be 2-D (N, dim); got shape {arrays[key].shape}.")
        if arrays["observations"].shape != arrays["next_observations"].shape:
            raise DatasetError(f"{source}: observations {arrays['observations'].shape} and next_observations "
                               f"{arrays['next_observations'].shape} differ in shape.")
        for key in ("rewards", "terminals"):
            arrays[key] = arrays[key].reshape(n, -1)
            if arrays[key].shape[1] != 1:
                raise DatasetError(f"{source}: '{key}' should hold one value per transition; "
                                   f"got shape {arrays[key].shape}.")
        for key, arr in arrays.items():
            bad = ~np.isfinite(arr.astype(np.float64))
            if bad.any():
                row = int(np.argwhere(bad)[0][0])
                where = f"transition {row}" if file_rows is None else f"file row {int(file_rows[row])}"
                raise DatasetError(f"{source}: '{key}' holds {int(bad.sum())} NaN/inf values "
                                   f"(first at {where}); clean or drop those rows.")
        amax = float(np.abs(arrays["actions"]).max())
        if amax > max_action + 1e-6:
            raise DatasetError(f"{source}: actions reach {amax:.4g}, outside the action box "
                               f"[-{max_action}, {max_action}]; rescale the actions to the box.")
        t = {k: torch.as_tensor(v.astype(np.float32), device=device) for k, v in arrays.items()}
        return cls(t["observations"], t["actions"], t["rewards"], t["next_observations"], 1.0 - t["terminals"])


class AgentData:
    """Each agent of a group sampling its own dataset: the datasets stored once, their rows
    concatenated (`rows`), agent i's dataset at rows starts[i] .. starts[i] + sizes[i] - 1. Agent i's
    batch indices are local to its dataset (draws.sample_draws with `n`), so agents sharing a
    dataset draw as agents of a one-dataset group do."""

    def __init__(self, datasets: list[Transitions], of_agent: list[int]):
        shapes = {(d.state_dim, d.action_dim) for d in datasets}
        if len(shapes) != 1:
            raise DatasetError(f"the datasets of one group must share state and action widths; got "
                               f"{sorted(shapes)} (state, action)")
        device = datasets[0].obs.device
        self.rows = Transitions(*(torch.cat([getattr(d, f.name) for d in datasets]) for f in fields(Transitions)))
        begins = np.cumsum([0] + [d.n for d in datasets[:-1]])
        self.starts = torch.tensor([[int(begins[i])] for i in of_agent], device=device)
        sizes = [datasets[i].n for i in of_agent]
        # Rows to draw from (draws.sample_draws): one count where every agent's dataset has as many, else
        # the (agents, 1) sizes.
        self.n: int | torch.Tensor = (sizes[0] if len(set(sizes)) == 1 else
                                      torch.tensor([[k] for k in sizes], device=device))

    @property
    def state_dim(self) -> int:
        return self.rows.state_dim

    @property
    def action_dim(self) -> int:
        return self.rows.action_dim

    def batch(self, idx: torch.Tensor):
        """(s, a, r, s', not_done) of each agent's rows idx (agents, B), local to its dataset."""
        return self.rows.batch(idx + self.starts)
