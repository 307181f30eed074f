"""Faults met by real processes (`python -m dtql_fast.train`): SIGKILL at random points and inside a
checkpoint write, divergence, a second writer, a truncated checkpoint. A run killed and resumed
must end on the very weights (bit for bit, CPU) and metric rows of a run never interrupted."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtql_fast import checkpoint, divergence, runfolder
from dtql_fast.tasks import OFFLINE_DEMO_HYPER
from dtql_fast.update import METRICS, FastDTQL
from tree import tensors

SHORT = ["--epochs", "3", "--steps-per-epoch", "12", "--pretrain-epochs", "1", "--batch-size", "32",
         "--log-every", "2", "--no-eval", "--seed", "5"]
TOTAL = 48
OFTEN = ["--checkpoint-every", "1e-5"]  # 0.6 ms: a checkpoint at nearly every step boundary


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # The offline dataset is built once per test session, never in the user's ~/.minari.
    # Unbuffered: what a run printed before its SIGKILL is in its log.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                MINARI_DATASETS_PATH=str(tmp_path_factory.getbasetemp() / "minari"))


def _start(env, out: Path, *args, **extra_env) -> subprocess.Popen:
    with open(out.parent / f"{out.name}.log", "ab") as log:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, "-m", "dtql_fast.train", "--threads", "1", *args],
                                cwd=out.parent, env={**env, **extra_env}, stdout=log, stderr=subprocess.STDOUT)


def _run(env, out: Path, *args, **extra_env) -> tuple[int, str]:
    log = out.parent / f"{out.name}.log"
    start = log.stat().st_size if log.exists() else 0
    p = _start(env, out, *args, **extra_env)
    p.wait(timeout=300)
    return p.returncode, log.read_bytes()[start:].decode(errors="replace")


def _kill_when(p: subprocess.Popen, ready, delay: float = 0.0, timeout: float = 120):
    """SIGKILL `p` `delay` seconds after ready() first holds; fail if it ended on its own."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert p.poll() is None, f"the run ended (status {p.returncode}) before it could be killed"
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.005)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before the kill landed"


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _last_step(out: Path) -> int:
    """The step of the newest complete row of metrics.jsonl (0: none yet)."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    complete = text[: text.rfind("\n") + 1].splitlines()
    return json.loads(complete[-1])["step"] if complete else 0


def _assert_same_weights(a: Path, b: Path):
    ca, cb = checkpoint.load(a), checkpoint.load(b)
    assert ca["step"] == cb["step"] == TOTAL
    ta, tb = dict(tensors(ca["agent"])), dict(tensors(cb["agent"]))
    assert ta.keys() == tb.keys() and len(ta) > 50
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert torch.equal(ca["rng"]["cpu"], cb["rng"]["cpu"])


def _assert_same_rows(a: Path, b: Path):
    """The same train rows, step for step, with the same losses: none missing, none twice."""
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(2, TOTAL + 1, 2))
    for x, y in zip(ra, rb):
        x.pop("steps_per_s"), y.pop("steps_per_s")
        assert x == y
    steps = lambda d: [line.split(",")[1] for line in (d / "train.csv").read_text().splitlines()[1:]]
    assert steps(a) == steps(b) == [str(s) for s in range(2, TOTAL + 1, 2)]


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory) -> Path:
    """A run never interrupted (checkpointing as often as the faulted runs do)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    rc, text = _run(env, out, *SHORT, *OFTEN, "--out", str(out))
    assert rc == 0, text
    assert checkpoint.load(out / checkpoint.PREVIOUS)["step"] < TOTAL  # the rotation kept the one before
    return out


def test_sigkill_anywhere_then_resume_equals_straight_run(env, straight, tmp_path):
    """Killed twice at random steps, once with a new checkpoint written but not yet renamed into
    place, once between the rotation's two renames; each time resumed. Same weights, same rows."""
    out, rng = tmp_path / "run", random.Random(14)
    resume = ["--resume", str(out), *OFTEN]

    # 1. at a random point of the first run
    p = _start(env, out, *SHORT, *OFTEN, "--out", str(out))
    target = rng.randint(4, 12)
    _kill_when(p, lambda: _last_step(out) >= target, delay=rng.uniform(0, 0.05))
    # load_latest, as the resume below: the kill may land between the rotation's two renames,
    # when only checkpoint.prev.pt exists (seen once under a loaded CPU)
    assert checkpoint.load_latest(out).ckpt["step"] >= 1

    # 2. at a random point of a resumed run (rows past its checkpoint, written by run 1, still there)
    target = _last_step(out) + rng.randint(4, 10)
    p = _start(env, out, *resume)
    _kill_when(p, lambda: _last_step(out) >= target, delay=rng.uniform(0, 0.05))
    assert "took over" in (tmp_path / "run.log").read_text()  # run 1's lock, left by a dead process

    # 3. inside a checkpoint write: the temp file complete, nothing renamed yet
    p = _start(env, out, *resume, DTQL_TEST_STALL_SAVE="2:written")
    _kill_when(p, lambda: (out / ".stalled-written").exists())
    (out / ".stalled-written").unlink()
    assert list(out.glob(".ckpt-*.tmp")) and checkpoint.load(out)["step"] < TOTAL

    # 4. between the rotation's renames: checkpoint.pt moved to checkpoint.prev.pt, the new one not in place
    p = _start(env, out, *resume, DTQL_TEST_STALL_SAVE="2:rotated")
    _kill_when(p, lambda: (out / ".stalled-rotated").exists())
    (out / ".stalled-rotated").unlink()
    assert not (out / checkpoint.FILENAME).exists()
    before = checkpoint.load(out / checkpoint.PREVIOUS)["step"]

    # 5. to the end
    rc, text = _run(env, out, *resume)
    assert rc == 0, text
    assert "checkpoint.pt is missing" in text and f"resuming from {out / checkpoint.PREVIOUS} (step {before})" in text
    assert not list(out.glob(".ckpt-*.tmp")) and not (out / runfolder.LOCKNAME).exists()
    _assert_same_weights(straight, out)
    _assert_same_rows(straight, out)


def test_truncated_newest_checkpoint_falls_back_to_previous(env, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    newest = out / checkpoint.FILENAME
    good_prev = checkpoint.load(out / checkpoint.PREVIOUS)["step"]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a write cut short by a lost disk
    rc, text = _run(env, out, "--resume", str(out), *OFTEN)
    assert rc == 0, text
    assert f"cannot read checkpoint {newest}" in text
    assert f"resuming from {out / checkpoint.PREVIOUS} (step {good_prev}) instead" in text
    assert (out / checkpoint.UNREADABLE).exists()  # set aside, so a rotation never makes it the fallback
    _assert_same_weights(straight, out)
    _assert_same_rows(straight, out)


def test_divergence_stops_and_keeps_the_good_checkpoint(env, tmp_path):
    out = tmp_path / "run"
    # lr 1e30: the first Adam step leaves finite but huge weights, the second step's losses are NaN
    args = [*SHORT, "--lr", "1e30", "--log-every", "1", *OFTEN, "--out", str(out)]
    rc, text = _run(env, out, *args)
    assert rc == 1, text
    error = (f"error: training diverged at step 2: loss_bc = nan, the largest |weight| = nan. The last good "
             f"checkpoint, {out / checkpoint.FILENAME} (step 1), is kept as it was")
    assert error in text
    good = (out / checkpoint.FILENAME).read_bytes()
    ck = checkpoint.load(out)
    assert ck["step"] == 1 and not (out / checkpoint.PREVIOUS).exists()
    assert all(torch.isfinite(t).all() for _, t in tensors(ck["agent"]) if t.is_floating_point())
    # Resumable: it loads, runs step 2 again, diverges the same way and still writes nothing over it.
    rc, text = _run(env, out, "--resume", str(out), *OFTEN)
    assert rc == 1 and error in text, text
    assert (out / checkpoint.FILENAME).read_bytes() == good
    assert [r["step"] for r in _rows(out)] == [1, 2]  # step 2's row again, not twice


def test_second_writer_is_refused(env, tmp_path):
    out = tmp_path / "run"
    with runfolder.RunLock(out):  # this test process is the first writer
        rc, text = _run(env, out, *SHORT, "--out", str(out))
        assert rc == 1
        assert f"error: {out} is in use by another run (PID {os.getpid()} on host" in text
        assert sorted(p.name for p in out.iterdir()) == [runfolder.LOCKNAME]  # it wrote nothing
    assert not out.exists()  # released; the folder it made for the run, empty, removed


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / runfolder.LOCKNAME).write_text("4194999 elsewhere 2025-01-01 00:00:00\n")
    with runfolder.RunLock(tmp_path) as lock:
        assert "PID 4194999 on host elsewhere" in lock.note and "no longer running" in lock.note
        assert (tmp_path / runfolder.LOCKNAME).read_text().split()[0] == str(os.getpid())
        with pytest.raises(runfolder.RunFolderBusy, match=f"PID {os.getpid()} on host"):
            runfolder.RunLock(tmp_path).acquire()  # another open file: flock refuses it like another process
    assert not (tmp_path / runfolder.LOCKNAME).exists()


def test_trim_metrics_drops_rows_past_the_step_and_cut_lines(tmp_path):
    rows = [{"kind": "train", "step": s, "loss_v": 0.5} for s in (2, 4, 6)] + [{"kind": "eval", "step": 4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tr')
    (tmp_path / "train.csv").write_bytes(b"kind,step,loss_v\r\ntrain,2,0.5\r\ntrain,4,0.5\r\ntrain,6,0.5\r\ntrain,8")
    kept = runfolder.trim_metrics(tmp_path, 4)
    assert kept == rows[:2] + rows[3:]
    assert (tmp_path / "train.csv").read_bytes() == b"kind,step,loss_v\r\ntrain,2,0.5\r\ntrain,4,0.5\r\n"
    assert runfolder.trim_metrics(tmp_path, 4) == kept  # nothing more to drop


def test_state_check_names_what_went_non_finite():
    agent = FastDTQL(3, 2, OFFLINE_DEMO_HYPER.replace(hidden=16))
    divergence.check_state(7, agent.state_dict(), [""])  # a fresh agent passes
    agent.metric_sum[0, METRICS.index("loss_q")] = float("inf")
    agent.pp["p0"][0, 0, 0] = float("nan")  # packed layout: the policy's net.0.weight[0, 0]
    with pytest.raises(divergence.Diverged, match=r"at step 7: non-finite modules.policy.net.0.weight, "
                                                  r"loss_q \(running sum inf\)"):
        divergence.check_state(7, agent.state_dict(), [""])
    watch = divergence.WeightWatch(agent.params())
    with pytest.raises(divergence.Diverged, match=r"loss_v = nan, the largest \|weight\| = nan"):
        divergence.check_log_row(3, [{"loss_v": float("nan"), "loss_q": 1.0}], watch.queue(), [""])


# -- the filesystem failing under a run: each fault one line naming the path, nothing written lost ----------


def _can_mount() -> bool:
    """A private mount namespace (unprivileged user namespaces, or root) to mount a small tmpfs in."""
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="no mount namespace here (unshare --user --mount refused)")


def _in_namespace(env, tmp_path: Path, mount: str, train_args: list[str], keep: Path) -> tuple[int, str]:
    """Mount `mount` (a shell command) in a private namespace, run train in it, copy the run folder
    out to `keep` (the mount ends with the namespace) and return train's exit status and output."""
    log, rc = tmp_path / "ns.log", tmp_path / "ns.rc"
    train = " ".join([sys.executable, "-m", "dtql_fast.train", "--threads", "1", *train_args])
    script = f"{mount} && {{ {train} > {log} 2>&1; echo $? > {rc}; cp -a {tmp_path / 'disk' / 'run'} {keep}; }}"
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                   cwd=tmp_path, env=env, check=True, timeout=300)
    return int(rc.read_text()), log.read_text()


@needs_mount
def test_disk_full_at_a_checkpoint_is_one_line_and_the_one_before_resumes(env, straight, tmp_path):
    """A tmpfs with room for one checkpoint and the metric files, not for a second checkpoint's temp
    file: the run stops with the cause (not torch's "unexpected pos"), and the checkpoint it had
    written resumes, on another disk, to the very weights of a run never interrupted."""
    disk, keep = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    size_kb = (straight / checkpoint.FILENAME).stat().st_size * 3 // 2 // 1024
    out = disk / "run"
    rc, text = _in_namespace(env, tmp_path, f"mount -t tmpfs -o size={size_kb}k tmpfs {disk}",
                             [*SHORT, *OFTEN, "--out", str(out)], keep)
    assert rc == 1, text
    step = checkpoint.load(keep)["step"]
    assert step >= 1
    assert text.strip().splitlines()[-1] == (
        f"error: cannot write {out / checkpoint.FILENAME}: no space left on device; free space there or write "
        f"to another --out; the checkpoint of step {step} is untouched: once fixed, resume with "
        f"python -m dtql_fast.train --resume {out}")
    assert "Traceback" not in text
    assert not list(keep.glob(".ckpt-*.tmp"))  # the cut-short temp file removed
    rc, text = _run(env, keep, "--resume", str(keep), *OFTEN)
    assert rc == 0, text
    _assert_same_weights(straight, keep)
    _assert_same_rows(straight, keep)


def test_file_size_limit_at_the_first_checkpoint_is_one_line(env, tmp_path):
    """A real EFBIG, made without any mount: a 4 MiB file-size limit (ulimit -f) below a checkpoint's size."""
    import resource

    out = tmp_path / "run"
    limit = 4 << 20
    p = subprocess.run([sys.executable, "-m", "dtql_fast.train", "--threads", "1", *SHORT, "--out", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {out / checkpoint.FILENAME}: file too large (a file-size limit: see ulimit -f); "
        "raise the limit or write to another --out; no checkpoint was written before it")
    assert "Traceback" not in p.stderr
    assert not list(out.glob(".ckpt-*.tmp")) and not (out / checkpoint.FILENAME).exists()
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 5  # what it wrote before is whole
    assert all(line.endswith("}") for line in (out / "metrics.jsonl").read_text().splitlines())


@needs_mount
def test_read_only_run_folder_is_one_line_and_unchanged(env, straight, tmp_path):
    disk, keep = tmp_path / "disk", tmp_path / "kept"
    shutil.copytree(straight, disk / "run")
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}  # noqa: E731
    before = files(disk / "run")
    out = disk / "run"
    rc, text = _in_namespace(env, tmp_path, f"mount --bind {disk} {disk} && mount -o remount,bind,ro {disk}",
                             ["--resume", str(out), "--epochs", "4"], keep)
    assert rc == 1, text
    assert text.strip().splitlines()[-1] == (f"error: --out {out}: cannot write there (Read-only file system); "
                                             "choose another --out")
    assert files(out) == before
