"""A run over a --task list: every task's agents in one step, each sampling its own task's data at its task's
own settings and playing its own task's environment (one vector env per task, stepped together); rows,
summary and report per task; an exact resume; refusals of lists that cannot share a step."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dtql_fast import report
from dtql_fast import evaluate as evaluate_mod
from dtql_fast import train as train_mod
from dtql_fast.profiling.gpu_check import write_d4rl
from dtql_fast.tasks import TASKS, get_task
from dtql_fast.config import ConfigError
from dtql_fast.train import parse_args, train
from test_train import straight_and_resumed
from tree import tensors

TINY = ["--epochs", "2", "--steps-per-epoch", "12", "--pretrain-epochs", "1", "--eval-every", "2",
        "--eval-episodes", "1", "--batch-size", "32", "--log-every", "4", "--no-compile", "--threads", "1"]
WALKER, CHEETAH = "walker2d-medium-v2", "halfcheetah-medium-v2"   # both 17 / 6, other environments


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("d4rl")
    write_d4rl(d / "walker.hdf5", 17, 6, rows=400, seed=0)
    write_d4rl(d / "cheetah.hdf5", 17, 6, rows=300, seed=1)   # another size: each agent draws from its own rows
    write_d4rl(d / "hopper.hdf5", 11, 3, rows=300, seed=2)
    write_d4rl(d / "walker-replay.hdf5", 17, 6, rows=300, seed=3)
    return d


def _rows(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == kind]


def test_a_task_list_trains_each_task_on_its_data_settings_and_env(files, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--task", f"{WALKER},{CHEETAH}", "--dataset", f"{files / 'walker.hdf5'},{files / 'cheetah.hdf5'}",
            "--seeds", "0", "--out", str(out)]  # one seed: a HalfCheetah episode is 1000 acting steps
    summary = train(parse_args(args))
    printed = capsys.readouterr().out
    cells = [f"task={WALKER}", f"task={CHEETAH}"]
    assert summary["settings"] == cells and [c["seeds"] for c in summary["per_setting"]] == [[0]] * 2
    assert f"task {WALKER},{CHEETAH} | seeds 0 x settings {'; '.join(cells)} (2 agents, one step)" in printed
    assert f"final: 2 tasks | task={CHEETAH} | " in printed
    # Each task's own settings: walker2d-medium decays its learning rate, halfcheetah-medium does not.
    assert TASKS[WALKER].hyper.lr_decay and not TASKS[CHEETAH].hyper.lr_decay
    late = {(r["setting"], r["seed"]): r["lr_policy"] for r in _rows(out, "train") if r["step"] == 36}
    base = TASKS[WALKER].hyper.lr
    assert late[(cells[0], 0)] < base and late[(cells[1], 0)] == pytest.approx(base)
    # Each agent played its own task's env (HalfCheetah never ends an episode early; a barely trained walker
    # falls) and is scored by its own task's reference returns.
    last = [r for r in _rows(out, "eval") if r["step"] == 36]
    assert [(r["setting"], r["seed"]) for r in last] == [(c, 0) for c in cells]
    for r in last:
        task = get_task(r["setting"].removeprefix("task="))
        assert (r["lengths"] == [1000]) == (task.name == CHEETAH)
        assert r["score_mean"] == pytest.approx(np.mean([task.normalized_score(x) for x in r["returns"]]))
    # python -m dtql_fast.evaluate repeats training's evaluation of every agent, each in its own env.
    again = evaluate_mod.main([str(out)])
    assert [(r["setting"], r["seed"], r["return_mean"]) for r in again] == \
        [(r["setting"], r["seed"], r["return_mean"]) for r in last]
    # The report reads one run per task, its agents at the task's own settings (Table 1's cells).
    seed_runs = report.discover(out)
    assert sorted((r.task, r.seed, r.setting) for r in seed_runs) == [(CHEETAH, 0, None), (WALKER, 0, None)]
    # A resume over other tasks is refused, naming both lists.
    with pytest.raises(SystemExit, match=rf"was trained on task '{WALKER},{CHEETAH}', not '{WALKER}'"):
        train_mod.main(["--resume", str(out), "--task", WALKER])


def test_task_lists_that_cannot_share_a_step_are_refused(files, tmp_path):
    with pytest.raises(ConfigError, match=r"must share state and action widths; got walker2d-medium-v2: state 17, "
                                          r"action 6, hopper-medium-v2: state 11, action 3"):
        train(parse_args([*TINY, "--task", f"{WALKER},hopper-medium-v2", "--dataset",
                          f"{files / 'walker.hdf5'},{files / 'hopper.hdf5'}", "--out", str(tmp_path / "a")]))
    with pytest.raises(ConfigError, match=r"--dataset gives 3 paths for 2 tasks"):
        train(parse_args([*TINY, "--task", f"{WALKER},{CHEETAH}", "--dataset", "a,b,c", "--out", str(tmp_path / "b")]))
    with pytest.raises(SystemExit):
        parse_args(["--task", f"{WALKER},,{CHEETAH}"])


def test_the_report_splits_a_packed_run_that_failed_before_writing_rows(tmp_path):
    """A packed sweep run whose process failed early has only the sweep's status.json (task "a,b"): the
    report lists each task's seeds as failed, not one row for the list."""
    d = tmp_path / "sweep" / f"{WALKER}+{CHEETAH}"
    d.mkdir(parents=True)
    (d / "status.json").write_text(json.dumps({"state": "failed", "task": f"{WALKER},{CHEETAH}", "seeds": [0, 1],
                                               "error": "error: no data"}))
    found = report.discover(tmp_path / "sweep")
    assert sorted((r.task, r.seed, r.state, r.setting) for r in found) == sorted(
        (t, s, "failed", None) for t in (WALKER, CHEETAH) for s in (0, 1))


def test_a_task_list_resumes_bit_for_bit(files, tmp_path, monkeypatch):
    """Ctrl-C at step 17 of 36 and --resume end on the straight run's agents, every tensor; here two datasets of
    one environment under one table entry: the same seed and settings on two datasets are two agents."""
    args = [*TINY, "--task", f"{WALKER},walker2d-medium-replay-v2", "--dataset",
            f"{files / 'walker.hdf5'},{files / 'walker-replay.hdf5'}", "--seeds", "0-1"]
    a, b = straight_and_resumed(args, tmp_path, monkeypatch)
    ta, tb = dict(tensors(a["agent"])), dict(tensors(b["agent"]))
    assert a["step"] == b["step"] == 36 and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a["agent"]["seeds"] == [0, 1, 0, 1] and a["task"] == [WALKER, "walker2d-medium-replay-v2"]
