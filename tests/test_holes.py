"""issue 36's cases, each in a real process (`python -m dtql_fast.<cli>`): refused before any work in one line
starting `error:`, or handled so that no file already on disk changes (checksums before and after)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dtql_fast.profiling.gpu_check import write_d4rl

TINY = ["--epochs", "1", "--steps-per-epoch", "6", "--pretrain-epochs", "0", "--eval-every", "1",
        "--eval-episodes", "1", "--batch-size", "16", "--log-every", "3", "--threads", "1", "--no-compile"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                MINARI_DATASETS_PATH=str(tmp_path_factory.getbasetemp() / "minari"))


def cli(env, cwd, tool, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"dtql_fast.{tool}", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def sums(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def refused(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1 or 2, no traceback, the refusal one line starting `error:`, the last (argparse's own refusals,
    exit 2, print their usage line above it)."""
    err = p.stderr.strip()
    assert p.returncode in (1, 2) and "Traceback" not in p.stderr, (p.returncode, p.stderr)
    line = err.splitlines()[-1]
    if p.returncode == 1:  # above it, at most what building the offline dataset printed
        assert line.startswith("error: ") and "error" not in err[:-len(line)], err
    else:
        assert ": error: " in line, err
    for n in needles:
        assert n in line, line
    return line


@pytest.fixture(scope="module")
def finished(env, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("holes")
    for seed in (1, 2):
        p = cli(env, root, "train", *TINY, "--seed", seed, "--out", f"s{seed}")
        assert p.returncode == 0, p.stdout + p.stderr
    return root


def copy(finished: Path, tmp_path: Path, name="s1") -> Path:
    shutil.copytree(finished / name, tmp_path / name)
    return tmp_path / name


# -- lost: something already on disk changed -----------------------------------------------------------

def test_resume_of_a_finished_run_changes_no_file(env, finished, tmp_path):
    run = copy(finished, tmp_path)
    before = sums(run)
    p = cli(env, tmp_path, "train", "--resume", run)
    assert p.returncode == 0 and "nothing to do" in p.stdout, p.stdout + p.stderr
    assert sums(run) == before


def test_new_run_into_a_folder_holding_a_plot_is_refused(env, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "learning_curves.png").write_bytes(b"someone else's")
    refused(cli(env, tmp_path, "train", *TINY, "--out", "out"), "holds a run already (learning_curves.png)",
            "--overwrite")
    assert (tmp_path / "out" / "learning_curves.png").read_bytes() == b"someone else's"


def test_foreign_checkpoint_is_refused(env, finished, tmp_path):
    run = copy(finished, tmp_path)
    shutil.copy(finished / "s2" / "checkpoint.pt", run / "checkpoint.pt")
    before = sums(run)
    refused(cli(env, tmp_path, "train", "--resume", run), "is not this folder's run", "--seed 2 (the folder's run: 1)")
    assert sums(run) == before


def test_second_evaluation_never_overwrites_the_first(env, finished, tmp_path):
    run = copy(finished, tmp_path)
    first = cli(env, tmp_path, "evaluate", run, "--env-seed", "7")
    assert first.returncode == 0, first.stderr
    before = sums(run)
    second = cli(env, tmp_path, "evaluate", run, "--env-seed", "7")
    assert second.returncode == 0, second.stderr
    after = sums(run)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {"evaluation-last-step6-2.json"}
    given = run / "evaluation-last-step6.json"
    refused(cli(env, tmp_path, "evaluate", run, "--json", given), "exists already and is never overwritten")
    assert sums(run) == after


def test_rerun_of_a_finished_sweep_keeps_its_record(env, tmp_path):
    """A sweep whose only run is finished: sweep.json is not rewritten (Ray is never started)."""
    from dtql_fast import sweep

    out = tmp_path / "sw"
    task = "hopper-medium-v2"
    run = sweep.run_dir_for(out, task)
    run.mkdir(parents=True)
    steps = 6
    (run / "summary.json").write_text(json.dumps({"steps": steps}))
    record = {"layout": sweep.LAYOUT, "seeds": [0], "max_group": None, "runs": {
        task: {"task": task, "state": "finished", "attempts": 1, "steps": steps}}}
    cfg = sweep.parse_args(["--tasks", task, "--seeds", "0", "--out", str(out), "--epochs", "1",
                            "--steps-per-epoch", "6", "--pretrain-epochs", "0"])
    record["train_settings"] = sweep._identity(cfg.train_args, task)
    record["train_args"] = list(cfg.train_args)
    (out / "sweep.json").write_text(json.dumps(record))
    before = sums(out)
    import io
    results = sweep.run_sweep(cfg, stream=io.StringIO())
    assert [r.state for r in results] == ["skipped"]
    assert sums(out) == before


# -- tracebacks: output found unwritable after the work, inputs the checks missed --------------------------

@pytest.mark.parametrize("flag, path, message", [
    ("--json", "/sys/dtql/out.json", "cannot write in /sys"),
    ("--video", "/sys/dtql/out.gif", "cannot write in /sys"),
])
def test_evaluate_output_checked_before_the_work(env, finished, tmp_path, flag, path, message):
    run = copy(finished, tmp_path)
    before = sums(run)
    refused(cli(env, tmp_path, "evaluate", run, flag, path), message)
    assert sums(run) == before


def test_report_output_checked_first(env, finished, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(finished / "s1", runs / "s1")
    (tmp_path / "file").write_text("x")
    before = sums(tmp_path)
    refused(cli(env, tmp_path, "report", runs, "--out", tmp_path / "file"), "is a file, not a folder")
    refused(cli(env, tmp_path, "report", runs, "--out", "/sys/dtql-report"), "cannot write in /sys")
    assert sums(tmp_path) == before


@pytest.mark.parametrize("args, message", [
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999: seeds are non-negative integers up to 4294967295"),
    (["--seed", "4294967296"], "--seed 4294967296: seeds are non-negative integers up to 4294967295"),
    (["--seeds", "0-99999999999"], "past the largest, 4294967295"),
    (["--lr", "-1e-3"], "--lr -0.001: takes a finite number > 0"),
    (["--batch-size", "1000000000"], "--batch-size 1000000000 and --noise-levels 1 need about"),
    (["--noise-levels", "100000"], "--noise-levels 100000 need about"),
    (["--eval-episodes", "1000000"], "evaluating 1000000 episodes per agent"),
])
def test_train_input_refused_before_any_work(env, tmp_path, args, message):
    refused(cli(env, tmp_path, "train", *TINY, *args, "--out", "run"), message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--env-seed=-1"], "--env-seed -1: takes 0-4294967295"),
    (["--device", "tpu"], "--device tpu: takes cpu, cuda, cuda:N or auto"),
    (["--episodes", "1000000"], "evaluating 1000000 episodes per agent"),
])
def test_evaluate_input_refused_before_any_work(env, finished, tmp_path, args, message):
    run = copy(finished, tmp_path)
    before = sums(run)
    refused(cli(env, tmp_path, "evaluate", run, *args), message)
    assert sums(run) == before


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "1000000000"], "--batch-size 1000000000 and --noise-levels 1 need about"),
    (["--eval-episodes", "1000000"], "evaluating 1000000 episodes per agent"),
])
def test_memory_refused_before_the_data_is_read(env, tmp_path, args, message):
    """The memory estimate runs before a byte of data is read (from the task table's widths): a dataset that
    is not there is never reached, so the refusal names the memory, not the file."""
    refused(cli(env, tmp_path, "train", *TINY, "--task", "hopper-medium-v2", "--dataset", tmp_path / "absent.hdf5",
                *args, "--out", "run"), message)
    assert not (tmp_path / "run").exists()


def test_evaluate_memory_refused_before_the_data_is_read(finished, tmp_path, monkeypatch):
    from dtql_fast import data, evaluate

    def no_data(*a, **k):
        raise AssertionError("the data was read before the memory estimate")

    monkeypatch.setattr(data, "load_run_data", no_data)
    run = copy(finished, tmp_path)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(run), "--episodes", "1000000"])
    assert str(e.value).startswith("error: evaluating 1000000 episodes per agent")


def test_evaluate_leaves_an_unreadable_checkpoint_where_it_is(env, finished, tmp_path):
    """evaluate reads the previous checkpoint where the newest does not read, and changes no file: the
    unreadable one is not renamed (only a resume, about to save, sets it aside)."""
    run = copy(finished, tmp_path)
    shutil.copy(run / "checkpoint.pt", run / "checkpoint.prev.pt")  # the rotation's previous one
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    before = sums(run)
    p = cli(env, tmp_path, "evaluate", run, "--json", tmp_path / "e.json")
    assert p.returncode == 0, p.stderr
    assert "left as it is" in p.stdout and "Traceback" not in p.stderr
    assert sums(run) == before


def test_dataset_with_rewards_as_bytes_is_one_line(env, tmp_path):
    data = write_d4rl(tmp_path / "data.hdf5", 11, 3, rows=50)
    with h5py.File(data, "a") as f:
        n = len(f["rewards"])
        del f["rewards"]
        f["rewards"] = np.array([b"1"] * n)
    refused(cli(env, tmp_path, "train", *TINY, "--task", "hopper-medium-v2", "--dataset", data, "--no-eval",
                "--out", "run"), "'rewards' holds |S1 values, not numbers")


# -- silent -------------------------------------------------------------------------------------------

def test_resume_into_another_out_is_refused(env, finished, tmp_path):
    run = copy(finished, tmp_path)
    before = sums(run)
    refused(cli(env, tmp_path, "train", "--resume", run, "--out", "B"), "continues the run in", "drop --out")
    assert sums(run) == before and not (tmp_path / "B").exists()


def test_damaged_metrics_noted_on_resume_and_gaps_reported(env, tmp_path):
    p = cli(env, tmp_path, "train", *TINY, "--epochs", "2", "--log-every", "2", "--no-eval", "--out", "run")
    assert p.returncode == 0, p.stderr
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines(True)
    kept = [ln for ln in lines if json.loads(ln)["step"] not in (6, 8)]
    (run / "metrics.jsonl").write_text("".join(kept) + "garbage\n")
    p = cli(env, tmp_path, "train", "--resume", run, "--epochs", "3")
    assert p.returncode == 0, p.stderr
    assert "note: " in p.stdout and "1 line(s) that are not a complete metric row (line" in p.stdout
    rep = cli(env, tmp_path, "report", tmp_path, "--out", tmp_path / "report")
    assert "metrics.jsonl has no rows between steps 4 and 10" in rep.stderr, rep.stderr


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs 0: takes >= 1"),
    (["--lr", "nan"], "--lr nan: takes a finite number > 0"),
    (["--out", "file"], "--out file is a file, not a folder"),
])
def test_sweep_dry_run_refuses_what_train_would(env, tmp_path, args, message):
    (tmp_path / "file").write_text("x")
    out = [] if "--out" in args else ["--out", "sw"]
    refused(cli(env, tmp_path, "sweep", "--tasks", "hopper-medium-v2", "--seeds", "0-1", *out, "--dry-run", *args),
            message)
    assert not (tmp_path / "sw").exists() and (tmp_path / "file").read_text() == "x"


# -- unclear ------------------------------------------------------------------------------------------

def test_resume_of_a_text_file_says_what_it_is(env, tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    refused(cli(env, tmp_path, "train", "--resume", "notes.txt"), "cannot read checkpoint notes.txt: not a complete "
            "torch checkpoint")


def test_resume_of_an_hdf5_file_is_one_line(env, tmp_path):
    write_d4rl(tmp_path / "data.hdf5", 11, 3, rows=20)
    line = refused(cli(env, tmp_path, "train", "--resume", "data.hdf5"), "cannot read checkpoint data.hdf5")
    assert "weights_only" not in line


def test_evaluate_of_a_non_run_does_not_name_resume(env, tmp_path):
    line = refused(cli(env, tmp_path, "evaluate", tmp_path), "no checkpoint at")
    assert "--resume" not in line


def test_folder_without_checkpoint_is_not_told_to_resume(env, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    line = refused(cli(env, tmp_path, "train", *TINY, "--out", "run"), "holds a run already (config.json)")
    assert "--resume" not in line and "--overwrite" in line
