"""Packages a bare machine may lack. A lent GPU machine has torch, numpy, h5py, tqdm and matplotlib,
but no gymnasium, MuJoCo, Minari, Ray or nvtx: training on a D4RL file with --no-eval, the bench and
the GPU check must run there all the same, and whatever needs a missing package must say which.
"""
from __future__ import annotations

import importlib.util

INSTALL = {"gymnasium": 'pip install "gymnasium[mujoco]"', "mujoco": "pip install mujoco",
           "minari": "pip install minari", "ray": 'pip install "ray==2.60.0"', "nvtx": "pip install nvtx",
           "tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def have(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # an import hook that refuses it (tests/bare)
        return False


def missing_message(name: str, needed_for: str) -> str:
    return f"{needed_for} needs {name}, which is not installed: {INSTALL.get(name, f'pip install {name}')}"


class _NoGymnasium:
    """Stands in for gymnasium where it is not installed: the env wrappers can still be defined (their
    base is object), and anything else names the package to install."""

    ObservationWrapper = object

    def __getattr__(self, attr):
        raise ImportError(missing_message("gymnasium", f"gymnasium.{attr} (evaluation environments)"))


def gymnasium():
    """The gymnasium module, or a stand-in that says it is missing when used."""
    try:
        import gymnasium as gym
    except ImportError:
        return _NoGymnasium()
    return gym
