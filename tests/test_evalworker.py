"""Evaluation off the training's path (--eval-worker): the worker's rows are in-line evaluation's numbers, a
worker that dies is named and the run finishes with the same rows, a resume redoes an evaluation that was in
flight; and every second of a run accounted for (summary.json's time split)."""
import json
import os
import signal

import pytest
import torch

from dtql_fast import checkpoint, evalworker, train as train_mod
from dtql_fast.config import ConfigError
from dtql_fast.runlog import TIME_PARTS
from dtql_fast.train import parse_args, train
from tree import tensors

# Eager on one thread, as the worker acts: the rows are compared to the bit. 2 evaluations of 2 episodes.
TINY = ["--epochs", "2", "--steps-per-epoch", "12", "--pretrain-epochs", "1", "--eval-every", "1",
        "--eval-episodes", "2", "--batch-size", "32", "--log-every", "4", "--no-compile", "--threads", "1"]
EVAL_STEPS = [24, 36]


@pytest.fixture(autouse=True)
def _minari_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.getbasetemp() / "minari"))


@pytest.fixture(scope="module")
def inline(tmp_path_factory):
    """The tiny run evaluated in-line: (its folder, its summary)."""
    root = tmp_path_factory.mktemp("inline")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.getbasetemp() / "minari"))
        return root / "run", train(parse_args([*TINY, "--out", str(root / "run"), "--eval-worker", "off"]))


def _evals(folder) -> list[dict]:
    rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows if r["kind"] == "eval"]


def _same_state(a: dict, b: dict):
    ta, tb = dict(tensors(a["agent"])), dict(tensors(b["agent"]))
    assert ta.keys() == tb.keys() and len(ta) > 50
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _check_split(t: dict):
    """Every part recorded, summing to the total; the old keys as they were."""
    split = t["split"]
    assert list(split) == [f"{k}_s" for k in TIME_PARTS]
    assert sum(split.values()) == pytest.approx(t["total_s"], abs=0.02)
    assert t["train_s"] == pytest.approx(t["total_s"] - t["compile_s"] - t["eval_s"], abs=0.02)
    assert t["eval_s"] == pytest.approx(split["eval_s"] + split["eval_wait_s"], abs=0.02)
    assert t["compile_s"] == pytest.approx(split["compile_s"], abs=0.01)
    for part in ("startup_s", "data_s", "steps_s", "eval_s", "checkpoint_s", "logging_s"):
        assert split[part] > 0, part


def test_time_split_sums_to_the_total(inline, capsys):
    folder, summary = inline
    t = summary["time"]
    _check_split(t)
    assert t["split"]["eval_wait_s"] == 0 and t["eval_off_path_s"] == 0 and t["evaluated"] == "in-line"
    assert json.loads((folder / "summary.json").read_text())["time"] == t


def test_worker_rows_equal_inline(inline, tmp_path, capsys):
    folder, _ = inline
    summary = train(parse_args([*TINY, "--out", str(tmp_path / "w"), "--eval-worker", "on"]))
    assert "evaluation: in a worker process" in capsys.readouterr().out
    rows = _evals(tmp_path / "w")
    assert [r["step"] for r in rows] == EVAL_STEPS and rows == _evals(folder)
    _same_state(checkpoint.load(folder), checkpoint.load(tmp_path / "w"))  # training untouched by it
    # The best checkpoint holds the weights evaluated, at their step.
    best_inline, best_worker = (checkpoint.load(d / checkpoint.BEST) for d in (folder, tmp_path / "w"))
    assert best_worker["best"] == best_inline["best"] and best_worker["step"] == best_inline["step"]
    _same_state(best_inline, best_worker)
    t = summary["time"]
    _check_split(t)
    assert t["evaluated"] == "worker" and t["eval_off_path_s"] > 0


@pytest.mark.slow
def test_compiled_worker_rows_equal_inline(tmp_path):
    """A compiled run: the worker compiles acting too and pads as in-line evaluation does."""
    torch._dynamo.reset()
    compiled = [a if a != "--no-compile" else "--compile" for a in TINY]
    train(parse_args([*compiled, "--out", str(tmp_path / "i"), "--eval-worker", "off"]))
    summary = train(parse_args([*compiled, "--out", str(tmp_path / "w"), "--eval-worker", "on"]))
    assert summary["time"]["evaluated"] == "worker"
    rows = _evals(tmp_path / "w")
    assert [r["step"] for r in rows] == EVAL_STEPS and rows == _evals(tmp_path / "i")


def test_a_killed_worker_is_named_and_the_run_finishes(inline, tmp_path, monkeypatch, capsys):
    folder, _ = inline
    real = evalworker.EvalWorker.submit
    pids = []

    def submit_then_kill(self, step, payload, compiled):
        real(self, step, payload, compiled)
        if step == EVAL_STEPS[0]:
            pids.append(self.proc.pid)
            os.kill(self.proc.pid, signal.SIGKILL)

    monkeypatch.setattr(evalworker.EvalWorker, "submit", submit_then_kill)
    summary = train(parse_args([*TINY, "--out", str(tmp_path / "k"), "--eval-worker", "on"]))
    out = capsys.readouterr().out
    line = (f"the evaluation worker (pid {pids[0]}) died (signal SIGKILL); evaluating in-line from step "
            f"{EVAL_STEPS[0]} on")
    assert line in out.splitlines() or any(ln.endswith(line) for ln in out.splitlines())
    assert _evals(tmp_path / "k") == _evals(folder)  # the evaluation in flight redone in-line, the same numbers
    assert summary["time"]["evaluated"].startswith(f"worker, in-line from step {EVAL_STEPS[0]} on")
    _check_split(summary["time"])


def test_resume_redoes_the_evaluation_in_flight(inline, tmp_path, monkeypatch, capsys):
    """Killed after the checkpoint of an evaluation's step and before its result arrived: the resume evaluates
    that step again from the checkpoint's weights, and the rows are the straight in-line run's."""
    folder, _ = inline
    real = checkpoint.Checkpointer.save

    def save_then_die(self, step):
        real(self, step)
        if step == EVAL_STEPS[0]:
            raise KeyboardInterrupt  # as a second Ctrl-C: no checkpoint past this one

    with monkeypatch.context() as m:
        m.setattr(checkpoint.Checkpointer, "save", save_then_die)
        with pytest.raises(SystemExit) as e:
            train(parse_args([*TINY, "--out", str(tmp_path / "r"), "--eval-worker", "on"]))
        assert e.value.code == 130
    assert checkpoint.load(tmp_path / "r")["step"] == EVAL_STEPS[0] and _evals(tmp_path / "r") == []
    summary = train(parse_args(["--resume", str(tmp_path / "r"), "--eval-worker", "on"]))
    assert _evals(tmp_path / "r") == _evals(folder)
    _same_state(checkpoint.load(folder), checkpoint.load(tmp_path / "r"))
    t = summary["time"]  # the resumed process's own time, split as a whole run's
    assert t["first_step"] == EVAL_STEPS[0] and t["steps"] == EVAL_STEPS[1] - EVAL_STEPS[0]
    _check_split(t)


def test_where_to_evaluate(monkeypatch):
    cpu, big = torch.device("cpu"), evalworker.AUTO_MIN_ENV_STEPS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert evalworker.where_to_evaluate("auto", cpu, 1, big)[0] == {1}
    assert evalworker.where_to_evaluate("auto", cpu, 1, big - 1)[0] is None  # too small to repay the start
    assert evalworker.where_to_evaluate("auto", cpu, 1, None)[0] is None  # its size unknown
    assert evalworker.where_to_evaluate("on", cpu, 1, None)[0] == {1}
    assert evalworker.where_to_evaluate("auto", cpu, 2, big)[0] is None
    assert evalworker.where_to_evaluate("on", cpu, 2)[0] == {0, 1}  # no spare core: it shares the run's
    assert evalworker.where_to_evaluate("off", cpu, 1, big)[0] is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert evalworker.where_to_evaluate("auto", cpu, 2, big)[0] == {2, 3}  # training's 2 threads, its own 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert evalworker.where_to_evaluate("auto", cpu, 2, big)[0] is None  # one spare core: too few for 2 threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert evalworker.where_to_evaluate("auto", cpu, 1, big)[0] is None  # one core: in-line
    assert evalworker.where_to_evaluate("auto", torch.device("cuda"), 1, big)[0] is None
    with pytest.raises(ConfigError, match="--eval-worker on"):
        evalworker.where_to_evaluate("on", torch.device("cuda"), 1)


def test_env_steps_per_evaluation_from_the_table():
    walker = parse_args(["--task", "walker2d-medium-v2", "--seeds", "0-2"])
    assert evalworker.env_steps_per_evaluation(walker) == 3 * 10 * 1000  # agents x episodes x Walker2d's limit
    few = parse_args(["--task", "hopper-medium-v2", "--eval-episodes", "2"])
    assert evalworker.env_steps_per_evaluation(few) == 2 * 1000 < evalworker.AUTO_MIN_ENV_STEPS
    assert evalworker.env_steps_per_evaluation(parse_args([])) is None  # the demo data: not in the table


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="training on 2 threads needs 2 CPUs")
def test_worker_rows_equal_inline_with_two_training_threads(tmp_path):
    """The worker runs training's thread count, so with 2 training threads its rows are still in-line's (a
    worker of one thread gave rows that differed by round-off)."""
    two = [*TINY[:-2], "--threads", "2"]
    train(parse_args([*two, "--out", str(tmp_path / "i"), "--eval-worker", "off"]))
    train(parse_args([*two, "--out", str(tmp_path / "w"), "--eval-worker", "on"]))
    rows = _evals(tmp_path / "w")
    assert [r["step"] for r in rows] == EVAL_STEPS and rows == _evals(tmp_path / "i")
