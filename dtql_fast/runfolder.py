"""The run folder's rules: one writer at a time (run.lock), and metric files that end where the
checkpoint a run resumes from ends."""
from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path

# The names of a run folder's files, each defined here once.
LOCKNAME = "run.lock"
CONFIG = "config.json"                  # the run's settings, written when it starts
SUMMARY = "summary.json"                # written when it finishes
METRICS = "metrics.jsonl"               # every metric and evaluation row
TRAIN_CSV = "train.csv"                 # the training rows as a table
EVAL_CSV = "eval.csv"                   # the evaluation rows as a table
CURVES = "learning_curves.png"
CHECKPOINT = "checkpoint.pt"            # the newest checkpoint (checkpoint.py writes them)
CHECKPOINT_PREVIOUS = "checkpoint.prev.pt"  # the one before
CHECKPOINT_UNREADABLE = "checkpoint.unreadable.pt"  # a newest one that did not read, set aside
TENSORBOARD = "tensorboard"  # TensorBoard event files (where the tensorboard package is installed)
CHECKPOINT_BEST = "checkpoint.best.pt"  # the state at the best evaluation so far (best-of-run)

METRIC_FILES = (METRICS, TRAIN_CSV, EVAL_CSV)
# The files that make a folder hold a run (a new run into it is refused: train.keep_existing_run).
RUN_FILES = (CONFIG, SUMMARY, CHECKPOINT, CHECKPOINT_PREVIOUS, CHECKPOINT_BEST, *METRIC_FILES, CURVES)
# Of those, the ones a run can be continued from (--resume).
RESUMABLE = (CHECKPOINT, CHECKPOINT_PREVIOUS)


class RunFolderBusy(RuntimeError):
    pass


# The filesystem faults a run can meet while writing, each with what to do about it.
_WRITE_FAULTS = {
    errno.ENOSPC: ("no space left on device", "free space there or write to another --out"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or write to another --out"),
    errno.EFBIG: ("file too large (a file-size limit: see ulimit -f)", "raise the limit or write to another --out"),
    errno.EROFS: ("read-only file system", "write to another --out"),
    errno.EACCES: ("permission denied", "make the folder writable or write to another --out"),
    errno.EPERM: ("operation not permitted", "make the folder writable or write to another --out"),
}


class CannotWrite(RuntimeError):
    """A write into the run folder failed for a reason outside the program (disk full, read-only, no
    permission): one line naming the path, the cause and what to do."""


def write_fault(e: BaseException) -> OSError | None:
    """The filesystem fault behind `e`, looked for along its chain (torch.save wraps a full disk in a
    RuntimeError whose cause is the OSError); None when `e` is not one."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _WRITE_FAULTS:
            return e
        e = e.__cause__ or e.__context__
    return None


def check_writable(path: str | os.PathLike, what: str, folder: bool = False):
    """Refuse (CannotWrite, one line naming `what`, e.g. "--json out.json") an output path before the work that
    fills it: a file path that exists (outputs are never overwritten) or whose folder cannot take a new file; a
    folder path that is a file, or where a file cannot be created. Tried with a real file, not os.access (which
    root passes on a read-only mount)."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise CannotWrite(f"{what}: {path} is a file, not a folder; give a folder")
    if not folder and path.exists():
        raise CannotWrite(f"{what}: {path} exists already and is never overwritten; give another path or move it")
    where = path if folder else path.parent
    probe = where
    while not probe.exists():  # the first folder that exists decides whether the missing ones can be made
        probe = probe.parent
    if not probe.is_dir():
        raise CannotWrite(f"{what}: {probe} is a file, not a folder; give another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dtql-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        fault = _WRITE_FAULTS.get(e.errno, (e.strerror, "give another path"))
        raise CannotWrite(f"{what}: cannot write in {probe} ({fault[0]}); give another path") from None


def metric_damage(folder: str | os.PathLike) -> str | None:
    """What a resume will tidy in metrics.jsonl besides the rows past its checkpoint: lines that are not a JSON
    row (garbage, or cut short by a kill); None when there are none."""
    path = Path(folder) / METRICS
    if not path.exists():
        return None
    lines = re.findall(r"[^\n]*\n|[^\n]+\Z", path.read_bytes().decode(errors="replace"))
    bad = [i + 1 for i, ln in enumerate(lines) if _json_row(ln) is None]
    if not bad:
        return None
    return (f"{path}: {len(bad)} line(s) that are not a complete metric row (line {', '.join(map(str, bad[:5]))}"
            f"{', ...' if len(bad) > 5 else ''}; cut by a kill or edited) are dropped")


def cannot_write(path: str | os.PathLike, fault: OSError, kept: str = "") -> CannotWrite:
    cause, todo = _WRITE_FAULTS[fault.errno]
    return CannotWrite(f"cannot write {path}: {cause}; {todo}{'. ' + kept if kept else ''}")


class RunLock:
    """An exclusive flock on <folder>/run.lock for the life of a run; the file names the holder.

    flock, not the file's existence, is the lock: the kernel drops it when its holder dies, however
    it dies, so a lock left by a killed run is taken over (with a note) and a live one never is,
    even if the dead holder's PID has been reused since.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCKNAME
        self.fd: int | None = None
        self.note: str | None = None  # set when a dead holder's lock was taken over
        self._made: list[Path] = []  # folders made for this run, removed again if it wrote nothing

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        folder = self.path.parent.absolute()
        self._made = [p for p in [folder, *folder.parents] if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd, wait=True) or "holder unknown"
                os.close(fd)
                self._made = []
                raise RunFolderBusy(
                    f"{self.path.parent} is in use by another run ({holder}, lock file {self.path}); "
                    "wait for it to finish or stop it, or write this run to another --out") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder released and removed it while we opened it: take the new one
        left = _holder(fd, wait=False)
        if left:  # a holder that exits removes the file: this one was killed
            self.note = f"took over {self.path} left by {left}, which is no longer running"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd

    def release(self):
        if self.fd is None:
            return
        # Remove the file while still holding it; _same_file makes a racing acquire start over.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        for p in self._made:  # deepest first; a run that failed before writing leaves no empty folders
            try:
                p.rmdir()
            except OSError:
                break


def run_files(folder: str | os.PathLike) -> list[str]:
    """The run files present in `folder` (none: it holds no run)."""
    return [n for n in RUN_FILES if (Path(folder) / n).exists()]


def move_aside(folder: str | os.PathLike) -> Path:
    """Rename a run folder to <folder>.old-<time>[-n], under its lock (a live run is refused with
    RunFolderBusy); returns the new path. Nothing is deleted."""
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = folder.with_name(f"{folder.name}.old-{stamp}"), 1
    while aside.exists():
        aside, n = folder.with_name(f"{folder.name}.old-{stamp}-{n}"), n + 1
    lock = RunLock(folder)
    lock.acquire()
    try:
        os.rename(folder, aside)
        lock.path = aside / LOCKNAME  # release removes the lock file where it now is
    finally:
        lock.release()
    return aside


def live_holder(folder: str | os.PathLike) -> str | None:
    """Who holds the run folder's lock, read without taking it (a reader must never make a starting run
    find its folder busy): the holder named in run.lock when that process is alive on this host, or
    runs on another host (which cannot be told from here); None when no run holds it."""
    try:
        words = (Path(folder) / LOCKNAME).read_text().split()
    except OSError:
        return None  # a holder that exits removes the file
    who = _describe(words)
    if who is None or not words[0].isdigit():
        return None
    if words[1] == socket.gethostname():
        try:
            os.kill(int(words[0]), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
    return who


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _holder(fd: int, wait: bool) -> str | None:
    # A holder writes its PID just after taking the lock: give it a moment before saying None.
    for _ in range(20 if wait else 1):
        os.lseek(fd, 0, os.SEEK_SET)
        who = _describe(os.read(fd, 4096).decode(errors="replace").split())
        if who is not None:
            return who
        if wait:
            time.sleep(0.05)
    return None


def _describe(words: list[str]) -> str | None:
    """run.lock's words (PID, host, start date and time, as RunLock writes them) as a holder's name."""
    if len(words) < 2:
        return None
    since = f", since {' '.join(words[2:4])}" if len(words) >= 4 else ""
    return f"PID {words[0]} on host {words[1]}{since}"


def trim_metrics(folder: str | os.PathLike, step: int) -> list[dict]:
    """Drop the rows past `step` (written after the checkpoint a run resumes from, and about to be
    written again) and any line cut short by a kill, rewriting each metric file atomically.
    Returns the rows of metrics.jsonl that stay."""
    folder = Path(folder)
    kept_rows = []
    for name in METRIC_FILES:
        path = folder / name
        if not path.exists():
            continue
        lines = re.findall(r"[^\n]*\n|[^\n]+\Z", path.read_bytes().decode(errors="replace"))  # as written: csv's \r\n stays
        if name == METRICS:
            keep = [ln for ln in lines if (row := _json_row(ln)) is not None and row.get("step", 0) <= step]
            kept_rows = [json.loads(ln) for ln in keep]
        else:
            header = next(csv.reader(lines[:1]), None)
            col = header.index("step") if header and "step" in header else None
            keep = lines[:1] + [ln for ln in lines[1:] if col is not None and _csv_step(ln, col) <= step]
        if keep != lines:
            _write_atomic(path, "".join(keep).encode())
    return kept_rows


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_row(line: str) -> dict | None:
    if not line.endswith("\n"):
        return None  # the last line, cut short by a kill
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _csv_step(line: str, col: int) -> float:
    if not line.endswith("\n"):
        return float("inf")
    fields = next(csv.reader([line]), [])
    try:
        return int(fields[col])
    except (IndexError, ValueError):
        return float("inf")
