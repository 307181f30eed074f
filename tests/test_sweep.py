"""The sweep on a real local Ray (2 CPUs) with D4RL files the tests write: a grid (each task's seeds one
group, one process, one run folder) that finishes while a bad-data task fails, a re-run that skips what
finished, and runs whose processes are SIGKILLed mid-run (the Ray worker of one, the training process of
another) retried to exactly an uninterrupted run's weights, every seed's."""
import dataclasses
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from dtql_fast import checkpoint, runstatus, sweep
from dtql_fast.profiling.gpu_check import write_d4rl
from dtql_fast.sweep import SweepConfig, SweepError, parse_args, run_sweep
from tree import tensors

# 1 pretraining epoch + 3 epochs of 10 steps, evaluated (1 episode) and checkpointed after every epoch.
TINY = ("--epochs", "3", "--steps-per-epoch", "10", "--pretrain-epochs", "1", "--eval-every", "1",
        "--eval-episodes", "1", "--batch-size", "32", "--log-every", "5")
TOTAL = 40
GOOD, BAD = ("hopper-medium-v2", "walker2d-medium-v2"), "halfcheetah-medium-v2"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("d4rl")
    write_d4rl(d / "hopper_medium-v2.hdf5", 11, 3, rows=400)
    write_d4rl(d / "walker2d_medium-v2.hdf5", 17, 6, rows=400)
    write_d4rl(d / "halfcheetah_medium-v2.hdf5", 17, 6, rows=400, nan_at=7)   # bad data
    return d


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(out, data_dir, tasks, seeds=(0, 1), **kw) -> SweepConfig:
    return SweepConfig(tasks=tuple(tasks), seeds=tuple(seeds), out=str(out),
                       train_args=("--dataset", str(data_dir), *TINY), refresh=0.5, **kw)


@pytest.fixture(scope="module")
def grid(local_ray, data_dir, tmp_path_factory):
    """2 good tasks x 2 seeds (one seed group per task), plus a task whose data holds a NaN."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    log = io.StringIO()
    results = run_sweep(_cfg(out, data_dir, (*GOOD, BAD)), stream=log)
    return out, results, log.getvalue()


def _agent_tensors(run_dir: Path) -> dict:
    ck = checkpoint.load(run_dir)
    return ck["step"], dict(tensors(ck["agent"]))


def test_grid_finishes_and_bad_data_fails_alone(grid):
    out, results, log = grid
    by = {r.task: r for r in results}
    assert len(results) == 3  # one run per task, its seeds trained together
    for task in GOOD:
        r = by[task]
        assert r.state == "finished" and r.steps == TOTAL and r.attempts == 1 and r.seeds == (0, 1), r
        run_dir = sweep.run_dir_for(out, task)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == TOTAL and [p["seed"] for p in summary["per_seed"]] == [0, 1]
        ck = checkpoint.load(run_dir)
        assert ck["step"] == TOTAL and ck["agent"]["seeds"] == [0, 1]
        assert runstatus.read_status(run_dir)["state"] == "finished" and runstatus.read_status(run_dir)["seeds"] == [0, 1]
        assert "--seeds 0-1" in (run_dir / runstatus.LOG).read_text()
    r = by[BAD]
    assert r.state == "failed" and r.attempts == 1  # a deterministic failure is not retried
    assert "halfcheetah_medium-v2.hdf5" in r.error and "NaN" in r.error and r.error.startswith("error:")
    st = runstatus.read_status(sweep.run_dir_for(out, BAD))
    assert st["state"] == "failed" and st["exit_code"] == 1 and st["error"] == r.error
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["runs"][BAD]["state"] == "failed" and manifest["runs"][GOOD[0]]["state"] == "finished"
    assert manifest["layout"] == sweep.LAYOUT and manifest["seeds"] == [0, 1]
    assert "done: 1 failed, 2 finished" in log and f"failed: {BAD} seeds 0-1: error:" in log
    # the live view's last table: one line per task's seed group with its state, step and latest score
    table = log[log.rindex("task "):].splitlines()
    hopper = next(line for line in table if line.startswith("hopper-medium-v2"))
    assert hopper.split()[1:3] == ["0-1", "finished"] and f"{TOTAL}/{TOTAL}" in hopper
    evals = [r for r in runstatus.metric_rows(sweep.run_dir_for(out, GOOD[0]))[1] if r["step"] == TOTAL]
    assert float(hopper.split()[5]) == pytest.approx(sum(r["score_mean"] for r in evals) / 2, abs=0.051)


def test_rerun_skips_finished_runs_and_retries_failed_ones(grid, data_dir):
    out, _, _ = grid
    good_dirs = [sweep.run_dir_for(out, t) for t in GOOD]
    before = {d: ((d / "checkpoint.pt").stat().st_mtime_ns, (d / runstatus.ATTEMPTS).read_text(),
                  (d / "metrics.jsonl").read_text()) for d in good_dirs}
    log = io.StringIO()
    results = run_sweep(_cfg(out, data_dir, (*GOOD, BAD)), stream=log)
    assert ("3 task(s) x 2 seed(s) (0-1), 3 run(s) (one process each, per task); 2 already finished, 1 to run"
            in log.getvalue())
    assert sorted(r.state for r in results) == ["failed", "skipped", "skipped"]
    for d in good_dirs:  # nothing trained twice
        assert ((d / "checkpoint.pt").stat().st_mtime_ns, (d / runstatus.ATTEMPTS).read_text(),
                (d / "metrics.jsonl").read_text()) == before[d]
    assert runstatus.read_status(sweep.run_dir_for(out, BAD))["attempt"] == 2


def test_rerun_with_other_train_settings_is_refused(grid, data_dir):
    out, _, _ = grid
    cfg = _cfg(out, data_dir, GOOD)
    with pytest.raises(SweepError, match="alpha: None before, 2.5 now"):
        run_sweep(dataclasses.replace(cfg, train_args=(*cfg.train_args, "--alpha", "2.5")), stream=io.StringIO())
    runtime_only = dataclasses.replace(cfg, train_args=(*cfg.train_args, "--threads", "1", "--log-every", "5"))
    assert [r.state for r in run_sweep(runtime_only, stream=io.StringIO())] == ["skipped"] * 2
    # a task's seeds are one group in one folder: another seed list cannot join it
    with pytest.raises(SweepError, match="was swept with --seeds 0-1, not 0-2: each task's seeds train as one group"):
        run_sweep(dataclasses.replace(cfg, seeds=(0, 1, 2)), stream=io.StringIO())


def test_sweep_folder_of_the_per_seed_layout_is_refused(data_dir, tmp_path):
    out = tmp_path / "old"
    (out / "hopper-medium-v2" / "seed0").mkdir(parents=True)
    (out / "sweep.json").write_text(json.dumps({"tasks": ["hopper-medium-v2"], "seeds": [0], "runs": {}}))
    with pytest.raises(SweepError, match="made before seed groups .* another --out"):
        run_sweep(_cfg(out, data_dir, GOOD[:1], seeds=(0,)), stream=io.StringIO())


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_after_first_checkpoint(run_dir: Path, which: str, done: dict):
    """SIGKILL the run's Ray worker ("worker_pid") or training process ("pid") once a checkpoint exists
    and before the run ends."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = runstatus.read_status(run_dir)
        if st.get("state") == "running" and (run_dir / "checkpoint.pt").is_file():
            step = checkpoint.load(run_dir)["step"]
            if step < TOTAL:
                done.update(step=step, pid=st["pid"], worker_pid=st["worker_pid"])
                os.kill(st[which], signal.SIGKILL)
                return
        time.sleep(0.02)


def test_killed_runs_are_retried_to_the_uninterrupted_weights(grid, data_dir, tmp_path):
    straight, _, _ = grid
    out = tmp_path / "killed"
    cfg = _cfg(out, data_dir, GOOD)
    kills = {GOOD[0]: ("worker_pid", {}), GOOD[1]: ("pid", {})}
    threads = [threading.Thread(target=_kill_after_first_checkpoint, args=(sweep.run_dir_for(out, task), which, done))
               for task, (which, done) in kills.items()]
    for t in threads:
        t.start()
    results = run_sweep(cfg, stream=io.StringIO())
    for t in threads:
        t.join()
    for task, (which, done) in kills.items():
        run_dir = sweep.run_dir_for(out, task)
        assert done, f"{task}: no checkpoint before the run ended; nothing was killed"
        r = next(r for r in results if r.task == task)
        assert r.state == "finished" and r.attempts == 2, r
        starts = [a for a in runstatus.attempts(run_dir) if a["event"] == "start"]
        assert [a["resumed"] for a in starts] == [False, True]
        assert starts[0]["pid"] == done["pid"] != starts[1]["pid"]
        assert not _running(done["pid"])  # the killed attempt left no training process behind
        if which == "pid":  # the training process died from a signal: the worker saw it and Ray retried
            assert {"event": "end", "state": "killed", "signal": "SIGKILL"}.items() <= runstatus.attempts(run_dir)[1].items()
        step_a, a = _agent_tensors(run_dir)
        step_b, b = _agent_tensors(sweep.run_dir_for(straight, task))
        assert step_a == step_b == TOTAL and a.keys() == b.keys() and len(a) > 100  # both seeds' networks and moments
        for k in a:
            assert torch.equal(a[k], b[k]), (task, k)
        # the evaluations after the resume match too, each seed's, and each (step, seed) is reported once
        _, evals = runstatus.metric_rows(run_dir)
        _, evals_straight = runstatus.metric_rows(sweep.run_dir_for(straight, task))
        assert [(e["step"], e["seed"], e["returns"]) for e in evals] == \
            [(e["step"], e["seed"], e["returns"]) for e in evals_straight]
        assert len(evals) == 3 * 2


def test_run_killed_more_often_than_max_retries_is_recorded_failed(local_ray, data_dir, tmp_path):
    out = tmp_path / "given-up"
    run_dir = sweep.run_dir_for(out, GOOD[0])
    done = {}
    t = threading.Thread(target=_kill_after_first_checkpoint, args=(run_dir, "pid", done))
    t.start()
    (r,) = run_sweep(_cfg(out, data_dir, GOOD[:1], seeds=(1,), max_retries=0), stream=io.StringIO())
    t.join()
    assert done and r.state == "failed" and r.error.startswith("killed on all 1 attempt(s); Ray gave up")
    assert runstatus.read_status(run_dir)["state"] == "failed"
    assert json.loads((out / "sweep.json").read_text())["runs"][GOOD[0]]["error"] == r.error


def test_stopped_run_checkpoints_and_resumes(data_dir, tmp_path):
    """The sweep's stop file (Ctrl-C or SIGTERM on the sweep): the run sends train.py SIGINT, train.py saves a
    checkpoint where the step ends and exits 130, the run ends "interrupted"; the next attempt resumes it from that
    checkpoint. (Exact resume after SIGINT is tests/test_train.py's.)"""
    (spec,) = sweep.plan_runs(_cfg(tmp_path / "stopped", data_dir, GOOD[:1], seeds=(0,)))
    run_dir, stop = Path(spec.run_dir), Path(spec.stop_file)
    stop.parent.mkdir(parents=True)

    def stop_once_training():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not runstatus.metric_rows(run_dir)[0]:
            time.sleep(0.02)
        stop.touch()

    t = threading.Thread(target=stop_once_training)
    t.start()
    first = sweep.execute_run(spec)
    t.join()
    step = checkpoint.load(run_dir)["step"]
    assert first.state == "interrupted" and runstatus.read_status(run_dir)["exit_code"] == 130 and 0 < step < TOTAL
    assert f"stopped at step {step} (SIGINT); checkpoint saved" in (run_dir / runstatus.LOG).read_text()
    assert sweep.execute_run(spec).state == "interrupted"  # the stop file holds back any further attempt
    stop.unlink()
    second = sweep.execute_run(spec)
    assert second.state == "finished" and second.attempts == 2 and checkpoint.load(run_dir)["step"] == TOTAL
    starts = [a for a in runstatus.attempts(run_dir) if a["event"] == "start"]
    assert [a["resumed"] for a in starts] == [False, True]


def test_live_view_redraws_in_place_on_a_terminal(grid):
    out, _, _ = grid
    specs = sweep.plan_runs(_cfg(out, "unused", (*GOOD, BAD)))

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    view = sweep.LiveView(specs, tty)
    view.refresh()
    view.refresh()
    first, second = tty.getvalue().split("\x1b[4F\x1b[J")  # header + 3 runs, moved up over and cleared
    assert first == second and first.count("\n") == 4
    assert "failed" in first and "error: " in first and f"{TOTAL}/{TOTAL}" in first


# -- input, no Ray needed -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--tasks", "walker2d-medium-v3"], "unknown task 'walker2d-medium-v3'. Did you mean: walker2d-medium-v2"),
    (["--tasks", "hopper-medium-v2", "--seeds", "4-0"], "the range '4-0' goes down"),
    (["--tasks", "hopper-medium-v2", "--seeds", "0-2,1"], "seed 1 is listed more than once"),
    (["--tasks", "hopper-medium-v2,hopper-medium-v2"], "more than once"),
    (["--tasks", "hopper-medium-v2", "--seed", "3"], "--seed is set by the sweep for each run; use --seeds"),
    (["--tasks", "hopper-medium-v2", "--resume", "x"], "--resume is set by the sweep"),
    (["--tasks", "hopper-medium-v2", "--epohcs", "3"], "unrecognized arguments: --epohcs"),
    (["--tasks", "hopper-medium-v2", "--cpus-per-run", "0"], "--cpus-per-run 0.0: must be positive"),
    (["--tasks", "hopper-medium-v2,walker2d-medium-v2", "--dataset", "__FILE__"], "is one file, but the sweep has 2"),
])
def test_bad_input_is_named(argv, message, capsys, tmp_path):
    f = tmp_path / "one.hdf5"
    f.write_bytes(b"")
    argv = [str(f) if a == "__FILE__" else a for a in argv]
    if "--seeds" not in argv:
        argv += ["--seeds", "0-1"]
    with pytest.raises(SystemExit) as e:
        parse_args([*argv, "--out", str(tmp_path / "s")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_train_flags_pass_through_and_command():
    cfg = parse_args(["--tasks", "hopper-medium-v2", "--seeds", "0", "--out", "s", "--dataset", "d", "--epochs", "5"])
    group = sweep.plan_runs(dataclasses.replace(cfg, seeds=(0, 1, 2, 7)))[0]
    assert sweep.train_command(group, False)[5:7] == ["--seeds", "0-2,7"] and group.run_dir.endswith("/s/hopper-medium-v2")
    assert cfg.train_args[0] == "--dataset" and Path(cfg.train_args[1]).is_absolute()
    (spec,) = sweep.plan_runs(cfg)
    assert spec.planned_steps == (50 + 5) * 1000  # the table's 50 pretraining epochs, --epochs 5
    fresh, resume = sweep.train_command(spec, False), sweep.train_command(spec, True)
    assert fresh[1:7] == ["-m", "dtql_fast.train", "--task", "hopper-medium-v2", "--seeds", "0"]
    assert resume[3:5] == ["--resume", spec.run_dir] and "--task" not in resume
    assert fresh[-2:] == ["--threads", "1"] and "--epochs" in resume
    assert fresh[-4:-2] == ["--eval-worker", "off"]  # Ray's reservation: no worker on another run's core


def test_help_names_the_flags(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--tasks", "--seeds", "--out", "--address", "--gpus-per-run", "--cpus-per-run", "--max-retries",
                 "python -m dtql_fast.train"):
        assert flag in text, flag


def test_error_message_from_log(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("pretrain:  10%|#  | 4/40\rpretrain:  20%|## | 8/40\nerror: loss_q is NaN at step 12\n")
    assert sweep.error_message(log) == "error: loss_q is NaN at step 12"
    log.write_text("Traceback (most recent call last):\n  File x\nZeroDivisionError: division by zero\n")
    assert sweep.error_message(log) == "ZeroDivisionError: division by zero"


def test_report_on_the_sweep(grid, tmp_path):
    """python -m dtql_fast.report on the grid: per task the scores over seeds beside the paper's."""
    from statistics import mean, stdev

    from dtql_fast import report

    out, _, _ = grid
    md, rows, _ = report.report(out, tmp_path / "report")
    by = {r.task: r for r in rows}
    assert set(by) == {*GOOD, BAD}
    for task, paper in zip(GOOD, (99.6, 89.4)):
        scores = []
        for seed in (0, 1):  # the group's rows, each seed's own
            lines = (sweep.run_dir_for(out, task) / "metrics.jsonl").read_text().splitlines()
            scores.append([r["score_mean"] for r in map(json.loads, lines) if r["kind"] == "eval" and r["seed"] == seed])
        assert all(len(s) == 3 for s in scores)
        last, best = [s[-1] for s in scores], [max(s) for s in scores]
        r = by[task]
        assert (r.seeds, r.unfinished, r.failed, r.paper) == (2, 0, 0, paper)
        assert r.last == pytest.approx((mean(last), stdev(last))) and r.best == pytest.approx((mean(best), stdev(best)))
        assert r.last_diff == pytest.approx(mean(last) - paper)
        assert (f"| {task} | 2 | {mean(last):.1f} ± {stdev(last):.1f} | {mean(best):.1f} ± {stdev(best):.1f} | "
                f"{paper:.1f} | {mean(last) - paper:+.1f} | {mean(best) - paper:+.1f} |") in md
        assert (tmp_path / "report" / f"curves_{task}.png").read_bytes()[:4] == b"\x89PNG"
    bad = by[BAD]
    assert (bad.seeds, bad.failed, bad.last) == (0, 2, None)
    assert f"| {BAD} | 0 | failed |" in md and "NaN" in md
    assert not (tmp_path / "report" / f"curves_{BAD}.png").exists()
    csv_rows = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert csv_rows[0].startswith("task,metric,seeds,unfinished,failed,last_mean")
    assert any(line.startswith(f"{GOOD[0]},normalised_score,2,0,0,") for line in csv_rows)


# -- packing: the tasks that can share one step in one run --------------------------------------------

def test_dry_run_packs_table_1_into_eleven_processes(capsys):
    """--tasks all --pack: runs hold only tasks of equal widths, schedule and evaluation episodes, at most
    --max-group agents each."""
    from dtql_fast.tasks import TASKS

    sweep.main(["--tasks", "all", "--seeds", "0-4", "--pack", "--out", "unused", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "11 run(s) (one process each), 130 agents"
    runs_ = [line.split(": ", 2)[2].split(", ") for line in lines[:-1]]
    assert sorted(t for r in runs_ for t in r) == sorted(TASKS[t].name for t in sweep.parse_tasks("all"))
    for tasks in runs_:
        assert len(tasks) * 5 <= 30
        assert len({(TASKS[t].widths, TASKS[t].hyper.epochs, TASKS[t].hyper.batch_size, TASKS[t].eval_episodes)
                    for t in tasks}) == 1
    assert runs_[0] == ["halfcheetah-medium-v2", "walker2d-medium-v2", "halfcheetah-medium-replay-v2",
                        "walker2d-medium-replay-v2", "halfcheetah-medium-expert-v2", "walker2d-medium-expert-v2"]
    sweep.main(["--tasks", "all", "--seeds", "0-4", "--pack", "--max-group", "10", "--out", "unused", "--dry-run"])
    assert capsys.readouterr().out.splitlines()[-1] == "16 run(s) (one process each), 130 agents"
    with pytest.raises(SystemExit):
        sweep.parse_args(["--tasks", "all", "--seeds", "0-4", "--pack", "--max-group", "3", "--out", "x"])
    assert "--max-group 3: a run holds at least one task's 5 seeds" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("d4rl-pack")
    write_d4rl(d / "walker2d_medium-v2.hdf5", 17, 6, rows=400)
    write_d4rl(d / "walker2d_medium_replay-v2.hdf5", 17, 6, rows=300, seed=1)
    write_d4rl(d / "hopper_medium-v2.hdf5", 11, 3, rows=400)
    return d


def test_a_packed_sweep_trains_compatible_tasks_in_one_process(local_ray, pack_dir, tmp_path):
    from dtql_fast import report

    # (walker2d's two datasets share one table entry: the same seed and settings on two datasets, two agents)
    tasks = ("walker2d-medium-v2", "hopper-medium-v2", "walker2d-medium-replay-v2")
    cfg = _cfg(tmp_path / "packed", pack_dir, tasks, max_group=4)
    log = io.StringIO()
    results = run_sweep(cfg, stream=log)
    assert [(r.task, r.state, r.steps) for r in results] == [
        ("walker2d-medium-v2,walker2d-medium-replay-v2", "finished", TOTAL), ("hopper-medium-v2", "finished", TOTAL)]
    assert "2 run(s) (one process each, packed, at most 4 agents each)" in log.getvalue()
    both = sweep.run_dir_for(tmp_path / "packed", results[0].task)
    assert both.name == "walker2d-medium-v2+walker2d-medium-replay-v2"
    assert "--task walker2d-medium-v2,walker2d-medium-replay-v2 --seeds 0-1" in (both / runstatus.LOG).read_text()
    summary = json.loads((both / "summary.json").read_text())
    assert summary["settings"] == ["task=walker2d-medium-v2", "task=walker2d-medium-replay-v2"]
    _, rows, _ = report.report(tmp_path / "packed", tmp_path / "report")
    assert sorted((r.task, r.seeds, r.failed) for r in rows) == sorted((t, 2, 0) for t in tasks)
    again = run_sweep(cfg, stream=io.StringIO())
    assert [r.state for r in again] == ["skipped", "skipped"]
    with pytest.raises(SweepError, match=r"was swept --pack --max-group 4, this command asks for unpacked"):
        run_sweep(dataclasses.replace(cfg, max_group=None), stream=io.StringIO())
