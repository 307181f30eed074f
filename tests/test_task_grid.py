"""A run over a --task list: every task's agents in one step, each sampling its own task's data at its task's
own settings and playing its own task's environment (one vector env per task, stepped together); rows,
summary and report per task; refusals of lists that cannot share a step."""
import json
from pathlib import Path

import numpy as np
import pytest

from d4rl_files import write_d4rl
from dtql_fast import evaluate as evaluate_mod
from dtql_fast import report
from dtql_fast import train as train_mod
from dtql_fast.tasks import TASKS, get_task
from dtql_fast.train import ConfigError, parse_args, train

TINY = ["--epochs", "2", "--steps-per-epoch", "12", "--pretrain-epochs", "1", "--eval-every", "2",
        "--eval-episodes", "1", "--batch-size", "32", "--log-every", "4", "--no-compile", "--threads", "1"]
WALKER, CHEETAH = "walker2d-medium-v2", "halfcheetah-medium-v2"   # both 17 / 6, other environments


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("d4rl")
    write_d4rl(d / "walker.hdf5", 17, 6, 400, seed=0)
    write_d4rl(d / "cheetah.hdf5", 17, 6, 300, seed=1)   # another size: each agent draws from its own rows
    write_d4rl(d / "hopper.hdf5", 11, 3, 300, seed=2)
    return d


def _rows(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == kind]


def test_a_task_list_trains_each_task_on_its_data_settings_and_env(files, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--task", f"{WALKER},{CHEETAH}", "--dataset", f"{files / 'walker.hdf5'},{files / 'cheetah.hdf5'}",
            "--seeds", "0-1", "--out", str(out)]
    summary = train(parse_args(args))
    printed = capsys.readouterr().out
    cells = [f"task={WALKER}", f"task={CHEETAH}"]
    assert summary["settings"] == cells and [c["seeds"] for c in summary["per_setting"]] == [[0, 1]] * 2
    assert f"task {WALKER},{CHEETAH} | seeds 0-1 x settings {'; '.join(cells)} (4 agents, one step)" in printed
    # Each task's own settings: walker2d-medium decays its learning rate, halfcheetah-medium does not.
    assert TASKS[WALKER].hyper.lr_decay and not TASKS[CHEETAH].hyper.lr_decay
    late = {(r["setting"], r["seed"]): r["lr_policy"] for r in _rows(out, "train") if r["step"] == 36}
    base = TASKS[WALKER].hyper.lr
    assert all(late[(cells[0], s)] < base for s in (0, 1)) and all(late[(cells[1], s)] == pytest.approx(base) for s in (0, 1))
    # Each agent played its own task's env (HalfCheetah never ends an episode early; a barely trained walker
    # falls) and is scored by its own task's reference returns.
    last = [r for r in _rows(out, "eval") if r["step"] == 36]
    assert [(r["setting"], r["seed"]) for r in last] == [(c, s) for c in cells for s in (0, 1)]
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
    assert sorted((r.task, r.seed, r.setting) for r in seed_runs) == sorted(
        (t, s, None) for t in (WALKER, CHEETAH) for s in (0, 1))
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
