"""Checkpoints: written atomically with the previous one kept, loaded with weights_only=True,
refused when they do not fit.

A checkpoint holds everything an exact resume needs: the agent (networks, Adam states, lr
schedule position, the metric accumulators of the open log interval), the step counters, the
RNG states and the run's config.

A run folder holds `checkpoint.pt` (the newest) and `checkpoint.prev.pt` (the one before). A save
writes a temp file and fsyncs it, then renames checkpoint.pt to checkpoint.prev.pt, then the temp
file to checkpoint.pt: at every instant at least one of the two is a complete checkpoint, whatever
kills the process. `load_latest` takes the newest one that reads, and says when it fell back.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

# The file names are the run folder's (runfolder.py), under the names this module has always used.
from . import runfolder
from .runfolder import CHECKPOINT as FILENAME
from .runfolder import CHECKPOINT_BEST
from .runfolder import CHECKPOINT_PREVIOUS as PREVIOUS
from .runfolder import CHECKPOINT_UNREADABLE as UNREADABLE
from .runfolder import cannot_write, write_fault
from .runlog import eval_mean

if TYPE_CHECKING:
    from .runlog import MetricLog

FORMAT = 1
BEST = CHECKPOINT_BEST  # checkpoint.best.pt (Best below)
_TEMP_PREFIX, _TEMP_SUFFIX = ".ckpt-", ".tmp"


class CheckpointError(ValueError):
    pass


def previous_of(path: Path) -> Path:
    return path.with_name(PREVIOUS) if path.name == FILENAME else path.with_name(path.stem + ".prev" + path.suffix)


def save(path: str | os.PathLike, payload: dict, keep_previous: bool = True) -> Path:
    """Write to a temp file in the same folder and fsync it, then rotate: the old checkpoint becomes
    the previous one, the temp file the checkpoint. A crash, Ctrl-C or SIGKILL at any point leaves
    a complete checkpoint behind (the new one, or the old one as checkpoint.prev.pt)."""
    global _saves
    _saves += 1
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        _stall_for_test(path.parent, "written")
        if keep_previous and path.exists():
            os.replace(path, previous_of(path))
        _stall_for_test(path.parent, "rotated")
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        fault = write_fault(e)
        if fault is not None:  # a full disk reads as torch's "unexpected pos"; say what it is
            raise cannot_write(path, fault) from e
        raise
    _fsync_dir(path.parent)  # the renames themselves survive a power cut
    return path


def _fsync_dir(folder: Path):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders: the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files of saves that a kill cut short (call it holding the folder's lock)."""
    stale = sorted(Path(folder).glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load(path: str | os.PathLike, map_location=None) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; give a run folder that holds one (a run's --out) "
                              f"or a {FILENAME} file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds non-tensor objects
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if not why or why.isdigit() or "Weights only load failed" in why:  # e.g. a text file's "105"
            why = f"not a complete torch checkpoint ({type(e).__name__})"
        raise CheckpointError(f"cannot read checkpoint {path}: {why}; give a run folder or its {FILENAME}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dtql_fast checkpoint of format {FORMAT}")
    return ckpt


class Latest(NamedTuple):
    ckpt: dict
    path: Path
    note: str | None  # why the newest checkpoint was not the one used; None when it was


def load_latest(path: str | os.PathLike, map_location=None, set_aside: bool = True) -> Latest:
    """The newest checkpoint of a run folder (or of a checkpoint.pt file's folder) that reads.

    When checkpoint.pt is missing (a kill between the rotation's two renames) or unreadable
    (truncated, corrupted), use checkpoint.prev.pt and say so in `note`. With `set_aside` (a resume,
    which is about to save), an unreadable newest is renamed checkpoint.unreadable.pt, so the next save
    does not rotate it over the good previous one; call it so holding the run folder's lock. A reader
    that saves nothing (evaluate) passes set_aside=False and changes no file.
    """
    path = Path(path)
    newest = path / FILENAME if path.is_dir() else path
    candidates = [newest, previous_of(newest)] if newest.name == FILENAME else [newest]
    errors = []
    for p in candidates:
        try:
            ckpt = load(p, map_location)
        except CheckpointError as e:
            errors.append(e)
            continue
        if p == newest:
            return Latest(ckpt, p, None)
        if newest.exists() and set_aside:
            os.replace(newest, newest.with_name(UNREADABLE))
            why = f"{errors[0]} (set aside as {UNREADABLE})"
        elif newest.exists():
            why = f"{errors[0]} (left as it is)"
        else:
            why = f"{newest} is missing (the run was killed while rotating its checkpoints)"
        return Latest(ckpt, p, f"{why}; resuming from {p} (step {ckpt.get('step')}) instead")
    present = [e for p, e in zip(candidates, errors) if p.exists()]  # unreadable rather than missing
    if len(present) > 1:
        raise CheckpointError("; ".join(map(str, present)))
    raise present[0] if present else errors[0]


class Schedule:
    """A run's checkpoints as its loop sees them: when the next timed one is due, which step the
    newest one holds, and the newest known good one (what a diverged run points back to)."""

    def __init__(self, path: Path, every_minutes: float, resumed: Latest | None, step: int):
        self.path = path
        self.every_s = every_minutes * 60 if every_minutes > 0 else math.inf
        self.next_due = time.monotonic() + self.every_s
        self.last_good = (resumed.path, step) if resumed else None
        # Resumed from this very file: it needs no rewriting at that step.
        self.saved_step = step if resumed and resumed.path.resolve() == path.resolve() else None

    def due(self) -> bool:
        return time.monotonic() >= self.next_due  # a clock read per step, no device sync

    def save(self, step: int, payload: dict):
        save(self.path, payload)
        self.last_good, self.saved_step = (self.path, step), step
        self.next_due = time.monotonic() + self.every_s


class Best:
    """checkpoint.best.pt: the state at the evaluation with the highest mean score over the run's agents
    (return where the task has no reference scores), written atomically when an evaluation beats it.
    Best-of-run: picked with the online evaluations themselves, so its score overstates what a run delivers."""

    def __init__(self, path: Path):
        self.path = path
        self.score: float | None = None
        if path.exists():  # a resumed run beats what the run had already seen, not its own restart
            try:
                self.score = load(path).get("best", {}).get("score")
            except CheckpointError:
                self.score = None

    def offer(self, step: int, score: float | None, metric: str, payload) -> bool:
        """Save payload() as the best when `score` beats the best so far; True when it did."""
        if score is None or not math.isfinite(score) or (self.score is not None and score <= self.score):
            return False
        save(self.path, {**payload(), "best": {"step": step, "score": score, "metric": metric}}, keep_previous=False)
        self.score = score
        return True


def check_compatible(ckpt: dict, task: str, shapes: dict, where: str = "checkpoint"):
    """Refuse a checkpoint from another task or of other network shapes, naming the difference."""
    if ckpt.get("task") != task:
        theirs = ckpt.get("task")
        text = lambda t: ",".join(t) if isinstance(t, list) else t  # noqa: E731 - a --task list as its flag
        raise CheckpointError(f"{where} was trained on task {text(theirs)!r}, not {text(task)!r}; "
                              f"resume with --task {text(theirs)} or start a new run with another --out")
    theirs = ckpt.get("shapes", {})
    diff = {k: (theirs.get(k), v) for k, v in shapes.items() if theirs.get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a} vs this run {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{where} has other shapes ({desc}); it cannot be resumed with these settings")


def single_seed_state(state: dict) -> dict:
    """A group of one's agent state (FastDTQL.state_dict()) in the format a single-seed (--seed) run's
    checkpoint holds: no "seeds", no per-agent lists. agent_state reads both back."""
    if len(state["seeds"]) != 1:
        raise ValueError(f"a single-seed checkpoint holds one agent, not seeds {state['seeds']}")
    return {"modules": {k: v[0] for k, v in state["modules"].items()},
            "optimizers": {k: {"lr": o["lr"][0], "step": o["step"][0], "exp_avg": o["exp_avg"][0],
                               "exp_avg_sq": o["exp_avg_sq"][0]} for k, o in state["optimizers"].items()},
            "lr_step": state["lr_step"][0], "metric_sum": state["metric_sum"][0],
            "metric_count": state["metric_count"][0]}


def agent_state(ckpt: dict) -> dict:
    """A checkpoint's agent state as FastDTQL.load_state_dict takes it: a group's as saved, a single-seed
    run's (single_seed_state) as the group of one of its config's seed."""
    state = ckpt["agent"]
    if "seeds" in state:
        return state
    one = lambda t: t.reshape(1)  # noqa: E731 - a counter or lr: one value per agent
    return {"modules": {k: [v] for k, v in state["modules"].items()},
            "optimizers": {k: {"lr": one(o["lr"]), "step": one(o["step"]), "exp_avg": [o["exp_avg"]],
                               "exp_avg_sq": [o["exp_avg_sq"]]} for k, o in state["optimizers"].items()},
            "lr_step": one(state["lr_step"]), "metric_sum": state["metric_sum"][None],
            "metric_count": one(state["metric_count"]),
            "seeds": [ckpt.get("config", {}).get("seed") or 0]}


def rng_state(device: torch.device) -> dict:
    """The global generators a run draws its batches from (the CPU's, and the GPU's on CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpointer:
    """A run's checkpoints: checkpoint.pt when the loop saves (at evaluations, at the end, where a stop was
    asked for, every --checkpoint-every minutes: Schedule, the one before kept), and
    checkpoint.best.pt at an evaluation that beats the run's best (Best)."""

    def __init__(self, out: Path, every_minutes: float, latest: Latest | None, start: int,
                 payload, log: MetricLog):
        self.out, self._make_payload, self._log = out, payload, log
        self.schedule = Schedule(out / FILENAME, every_minutes, latest, start)
        self.best = Best(out / BEST)
        self._made: tuple[int, dict] | None = None  # (step, payload): an evaluation's best and its save share it

    def state_at(self, step: int) -> dict:
        """The payload checkpoint.pt gets at `step` (made once: an evaluation's snapshot and the save share it)."""
        return self._payload(step)

    def _payload(self, step: int) -> dict:
        if self._made is None or self._made[0] != step:
            self._made = (step, self._make_payload(step))
        return self._made[1]

    @property
    def last_good(self) -> tuple[Path, int] | None:
        """(file, step) of the newest checkpoint known good; None when there is none."""
        return self.schedule.last_good

    def due(self) -> bool:
        """--checkpoint-every minutes have passed since the last save."""
        return self.schedule.due()

    def save(self, step: int):
        """checkpoint.pt at `step` (nothing when it holds that step already). A diverged state is refused
        (divergence.Diverged); a write that fails says which checkpoint is untouched (runfolder.CannotWrite)."""
        if step == self.schedule.saved_step:
            return
        state = self._payload(step)
        self._made = None  # the loop moves on: the next save is of another state
        self._log.sync()  # the rows this checkpoint vouches for reach the disk before it does
        try:
            self.schedule.save(step, state)
        except runfolder.CannotWrite as e:
            last_good = self.schedule.last_good
            kept = (f"the checkpoint of step {last_good[1]} is untouched: once fixed, resume with "
                    f"python -m dtql_fast.train --resume {self.out}" if last_good else
                    "no checkpoint was written before it")
            raise runfolder.CannotWrite(f"{e}; {kept}") from None

    def offer_best(self, step: int, rows: list[dict], payload=None):
        """checkpoint.best.pt at `step` when this evaluation's mean over the agents beats the run's best: the
        state payload() gives (the state evaluated), by default the agents' state now."""
        self.best.offer(step, *eval_mean(rows), payload or (lambda: self._payload(step)))


# Test hook (tests/test_faults.py): DTQL_TEST_STALL_SAVE="N:STAGE" makes this process's N-th save
# stop at STAGE ("written": the temp file complete, nothing renamed yet; "rotated": checkpoint.pt
# already renamed to checkpoint.prev.pt, the new one not yet in its place), leave a marker file
# .stalled-STAGE in the folder and wait to be killed: a test can land SIGKILL inside a write.
_saves = 0


def _stall_for_test(folder: Path, stage: str):
    spec = os.environ.get("DTQL_TEST_STALL_SAVE")
    if not spec or spec != f"{_saves}:{stage}":
        return
    (folder / f".stalled-{stage}").write_text(str(os.getpid()))
    while True:
        time.sleep(1)
