"""Checkpoints: written atomically, loaded with weights_only=True, refused when they do not fit.

A checkpoint holds everything an exact resume needs: the agent (networks, Adam states, lr
schedule position), the step counters, the RNG states and the run's config.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT = 1
FILENAME = "checkpoint.pt"


class CheckpointError(ValueError):
    pass


def save(path: str | os.PathLike, payload: dict) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over the old checkpoint, so a
    crash or Ctrl-C mid-write never leaves a broken file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, map_location=None) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; --resume takes a run folder (written by --out) "
                              f"or a {FILENAME} file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds non-tensor objects
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dtql_fast checkpoint of format {FORMAT}")
    return ckpt


def check_compatible(ckpt: dict, task: str, shapes: dict, where: str = "checkpoint"):
    """Refuse a checkpoint from another task or of other network shapes, naming the difference."""
    if ckpt.get("task") != task:
        raise CheckpointError(f"{where} was trained on task {ckpt.get('task')!r}, not {task!r}; "
                              f"resume with --task {ckpt.get('task')} or start a new run with another --out")
    theirs = ckpt.get("shapes", {})
    diff = {k: (theirs.get(k), v) for k, v in shapes.items() if theirs.get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a} vs this run {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{where} has other shapes ({desc}); it cannot be resumed with these settings")
