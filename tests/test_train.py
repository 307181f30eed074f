"""The train CLI end to end on the offline Reacher data, resume equality, checkpoint safety."""
import json
import math
import os
import signal

import pytest
import torch

from dtql_fast import checkpoint, train as train_mod
from dtql_fast.train import parse_args, train
from tree import tensors

TINY = ["--epochs", "2", "--steps-per-epoch", "12", "--pretrain-epochs", "1", "--eval-every", "1",
        "--eval-episodes", "2", "--batch-size", "32", "--log-every", "4"]


@pytest.fixture(autouse=True)
def _minari_home(tmp_path_factory, monkeypatch):
    # One offline dataset per test session, never in the user's ~/.minari.
    root = tmp_path_factory.getbasetemp() / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))


def _run(tmp_path, *extra, name="run"):
    return train(parse_args([*TINY, "--out", str(tmp_path / name), *extra]))


def test_cli_end_to_end(tmp_path, capsys):
    summary = _run(tmp_path, "--lr-decay", "--profile-steps", "13:15")
    out = tmp_path / "run"
    text = capsys.readouterr().out
    assert "final: dtql_fast/reacher/scripted-v0 | return" in text and "normalised score" in text
    assert f"time: {summary['time']['total_s']:.1f} s = start-up " in text  # the final line of where it went
    assert summary["steps"] == 36 and summary["score_mean"] is not None
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == [4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert train_rows[0]["phase"] == "pretrain" and "loss_tr" not in train_rows[0]
    assert "loss_tr" in train_rows[-1] and all(r["steps_per_s"] > 0 for r in train_rows)
    assert train_rows[-1]["lr_policy"] == pytest.approx(0.0, abs=1e-9)  # cosine reached its end
    assert [r["epoch"] for r in eval_rows] == [1, 2] and len(eval_rows[0]["returns"]) == 2
    assert eval_rows[0]["env_seed"] == 1000 and "seed" not in eval_rows[0]  # the env's seed; --seed 0's envs
    assert (out / "train.csv").read_text().splitlines()[0].startswith("kind,step,phase")
    assert len((out / "eval.csv").read_text().splitlines()) == 3
    png = (out / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    trace = (out / "trace_steps_13_15.json").read_text()  # CPU: a Chrome trace of steps 13 and 14
    for name in ("step", "sample", "critic", "behaviour_cloning", "policy", "target_update", "lr_decay"):
        assert f'"name": "{name}"' in trace, name
    ck = checkpoint.load(out)
    assert ck["step"] == 36 and ck["task"] == "dtql_fast/reacher/scripted-v0"
    assert set(ck["agent"]["modules"]) == {"diffusion", "critic", "critic_target", "policy"}


def test_cli_compiled_end_to_end(tmp_path, capsys):
    """--compile: one graph each for pretraining, training and acting, over two evaluations."""
    torch._dynamo.reset()
    summary = _run(tmp_path, "--compile", "--lr-decay")
    text = capsys.readouterr().out
    assert "compiled the pretraining step in" in text and "compiled the training step in" in text
    assert summary["compiled_graphs"] == 3
    t = summary["time"]  # the steps' and acting's compiles counted as compile, not as steps or evaluation
    assert t["split"]["compile_s"] > 0 and t["compile_s"] == pytest.approx(t["split"]["compile_s"], abs=0.01)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(math.isfinite(r["loss_policy"]) for r in rows if r["kind"] == "train" and r["phase"] == "train")
    assert len([r for r in rows if r["kind"] == "eval"]) == 2


def _stop_at(monkeypatch, n):
    """Press Ctrl-C (a real SIGINT) in the middle of the n-th step."""
    real = train_mod.StepRunner.__call__
    calls = {"n": 0}

    def call(self):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(train_mod.StepRunner, "__call__", call)


def straight_and_resumed(args: list[str], tmp_path, monkeypatch, at: int = 17) -> tuple[dict, dict]:
    """The run `args` straight to its end (tmp_path/straight), and again (tmp_path/split) with Ctrl-C in step `at`
    (exit 130, a checkpoint of that step) and then --resume to its end; returns both final checkpoints."""
    train(parse_args([*args, "--out", str(tmp_path / "straight")]))
    with monkeypatch.context() as m:
        _stop_at(m, at)
        with pytest.raises(SystemExit) as e:
            train(parse_args([*args, "--out", str(tmp_path / "split")]))
        assert e.value.code == 130
    assert checkpoint.load(tmp_path / "split")["step"] == at
    train(parse_args(["--resume", str(tmp_path / "split")]))
    return checkpoint.load(tmp_path / "straight"), checkpoint.load(tmp_path / "split")


def test_interrupt_and_resume_equals_straight_run(tmp_path, monkeypatch, capsys):
    _run(tmp_path, "--lr-decay", "--seed", "3", name="straight")
    with monkeypatch.context() as m:
        _stop_at(m, 17)  # mid-epoch, past pretraining: the loop stops once step 17 is whole
        with pytest.raises(SystemExit) as e:
            _run(tmp_path, "--lr-decay", "--seed", "3", name="split")
        assert e.value.code == 130
    assert "Resume with: python -m dtql_fast.train --resume" in capsys.readouterr().out
    assert checkpoint.load(tmp_path / "split")["step"] == 17
    train(parse_args(["--resume", str(tmp_path / "split")]))
    a, b = checkpoint.load(tmp_path / "straight"), checkpoint.load(tmp_path / "split")
    assert a["step"] == b["step"] == 36

    ta, tb = dict(tensors(a["agent"])), dict(tensors(b["agent"]))
    assert ta.keys() == tb.keys() and len(ta) > 50
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    rows = lambda d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]
    last = lambda d: [r for r in rows(d) if r["kind"] == "eval"][-1]
    assert last("straight")["returns"] == last("split")["returns"]


def test_resume_refuses_other_task(tmp_path):
    _run(tmp_path, "--epochs", "1", "--no-eval")
    with pytest.raises(checkpoint.CheckpointError, match="trained on task"):
        train(parse_args(["--resume", str(tmp_path / "run"), "--task", "hopper-medium-v2"]))


def test_checkpoint_shapes_mismatch_is_named():
    ck = {"task": "t", "shapes": {"state_dim": 17, "action_dim": 6}}
    with pytest.raises(checkpoint.CheckpointError, match="action_dim: checkpoint 6 vs this run 3"):
        checkpoint.check_compatible(ck, "t", {"state_dim": 17, "action_dim": 3})


def test_checkpoint_unreadable_and_missing(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        checkpoint.load(tmp_path)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"task": "t", "x": torch.ones(3)})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"task": "t", "x": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["x"], torch.ones(3))  # the old checkpoint survived
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_unknown_task_lists_close_matches(capsys):
    with pytest.raises(SystemExit) as e:
        train_mod.main(["--task", "walker2d-medium-v3"])
    assert "unknown task 'walker2d-medium-v3'" in str(e.value.code)
    assert "walker2d-medium-v2" in str(e.value.code)


def test_missing_d4rl_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    monkeypatch.setattr("dtql_fast.data._download", lambda url, dest, timeout=0: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(SystemExit) as e:
        train_mod.main(["--task", "hopper-medium-v2"])
    msg = str(e.value.code)
    assert str(tmp_path) in msg and "hopper_medium-v2.hdf5" in msg


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--task", "--dataset", "--seed", "--device", "--epochs", "--steps-per-epoch", "--pretrain-epochs",
                 "--eval-every", "--eval-episodes", "--out", "--resume", "--compile", "--alpha", "--gamma", "--lr",
                 "--lr-decay", "--batch-size", "--expectile", "--kernels", "--noise-levels", "--profile-steps",
                 "--checkpoint-every"):
        assert flag in text, flag


def test_a_run_records_the_fingerprint_of_the_data_it_read(tmp_path):
    from dtql_fast.data import load_dataset
    from dtql_fast.profiling.gpu_check import write_d4rl
    data = str(write_d4rl(tmp_path / "d.hdf5", 11, 3, rows=200))
    _run(tmp_path, "--task", "hopper-medium-v2", "--dataset", data, "--no-eval")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["source"] == data
    assert config["fingerprint"] == load_dataset("hopper-medium-v2", data, "cpu").fingerprint is not None
