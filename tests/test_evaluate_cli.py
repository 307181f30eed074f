"""python -m dtql_fast.evaluate RUN: a trained run evaluated again, the best checkpoint kept by training."""
import json

import pytest

from dtql_fast import checkpoint, evaluate
from dtql_fast.train import parse_args, train

TINY = ["--epochs", "3", "--steps-per-epoch", "12", "--pretrain-epochs", "1", "--eval-every", "1",
        "--eval-episodes", "2", "--batch-size", "32", "--log-every", "4", "--threads", "1", "--no-compile"]


@pytest.fixture(autouse=True)
def _minari_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.getbasetemp() / "minari"))


def _tensorboard(run) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _evals(run):
    return [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["kind"] == "eval"]


@pytest.mark.parametrize("who", [["--seed", "3"], ["--seeds", "0-1"]])
def test_evaluating_a_run_again_repeats_its_evaluations(tmp_path, who, capsys):
    """Same env seeds and the checkpoint's step: the very returns of training's evaluation at that
    step, for the last checkpoint and for the best one; another env seed gives other episodes."""
    run = tmp_path / "run"
    train(parse_args([*TINY, *who, "--out", str(run)]))
    evals = _evals(run)
    last_step = evals[-1]["step"]
    rows = evaluate.main([str(run)])
    want = [r for r in evals if r["step"] == last_step]
    assert [r["returns"] for r in rows] == [r["returns"] for r in want]
    doc = json.loads((run / f"evaluation-last-step{last_step}.json").read_text())
    assert doc["step"] == last_step and doc["checkpoint"] == "last" and len(doc["agents"]) == len(want)

    # The best checkpoint: the evaluation with the highest mean over the agents, and its state.
    steps = sorted({r["step"] for r in evals})
    key = "score" if evals[0]["score_mean"] is not None else "return"  # the offline Reacher has reference scores
    mean = {s: sum(r[f"{key}_mean"] for r in evals if r["step"] == s) / len(want) for s in steps}
    best_step = max(steps, key=lambda s: (mean[s], -s))  # the first of equals: a later one must beat it
    best = checkpoint.load(run / checkpoint.BEST)
    assert best["step"] == best["best"]["step"] == best_step and best["best"]["metric"] == key
    assert best["best"]["score"] == pytest.approx(mean[best_step])
    rows = evaluate.main([str(run), "--checkpoint", "best"])
    assert [r["returns"] for r in rows] == [r["returns"] for r in evals if r["step"] == best_step]

    # TensorBoard: every metric row's numbers, per seed for a group, at their steps.
    scalars = _tensorboard(run)
    tag = (lambda k: k) if "--seed" in who else (lambda k: f"{k}/seed1")
    assert [s for s, _ in scalars[tag("eval/return_mean")]] == steps
    assert [v for _, v in scalars[tag("eval/return_mean")]] == pytest.approx(
        [r["return_mean"] for r in evals if r.get("seed", 1) == 1 or "--seed" in who])
    train_rows = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["kind"] == "train"]
    assert len(scalars[tag("train/loss_q")]) == len({r["step"] for r in train_rows if "loss_q" in r})
    assert tag("train/lr_policy") in scalars and tag("train/steps_per_s") in scalars

    other = evaluate.main([str(run), "--env-seed", "77", "--episodes", "3"])
    assert [r["env_seed"] for r in other] == [77 + 10_000 * i for i in range(len(want))]
    assert all(len(r["returns"]) == 3 for r in other)
    assert "seed" in capsys.readouterr().out


def test_one_agent_of_a_group(tmp_path):
    run = tmp_path / "run"
    train(parse_args([*TINY, "--epochs", "1", "--seeds", "0-2", "--out", str(run)]))
    rows = evaluate.main([str(run), "--agents", "2"])
    assert [r["seed"] for r in rows] == [2]
    assert rows[0]["returns"] == [r for r in _evals(run) if r["seed"] == 2][-1]["returns"]
    with pytest.raises(SystemExit, match=r"--agents 5: the run trains seeds \[0, 1, 2\], not \[5\]"):
        evaluate.main([str(run), "--agents", "5"])

    # A video of one episode of that agent, rendered offscreen (MUJOCO_GL=egl): the episode its
    # one-episode evaluation plays, frame for frame.
    rows = evaluate.main([str(run), "--agents", "2", "--episodes", "1", "--video", str(tmp_path / "v.gif")])
    from PIL import Image

    gif = tmp_path / "v-seed2.gif"
    # the second evaluation of this checkpoint: a new file beside the first, which is never overwritten
    doc = json.loads((run / f"evaluation-last-step{rows[0]['step']}-2.json").read_text())
    (video,) = doc["videos"]
    assert video["return"] == pytest.approx(rows[0]["returns"][0], abs=1e-9)
    assert Image.open(gif).n_frames == video["frames"] == rows[0]["lengths"][0] + 1


def test_video_of_one_agent(tmp_path, capsys):
    run = tmp_path / "run"
    train(parse_args([*TINY, "--epochs", "1", "--seed", "4", "--out", str(run)]))
    rows = evaluate.main([str(run), "--episodes", "1", "--video", str(tmp_path / "one.gif")])
    from PIL import Image

    frames = Image.open(tmp_path / "one.gif")
    assert frames.n_frames == rows[0]["lengths"][0] + 1 and frames.size == (480, 480)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(run), "--video", str(tmp_path / "one.avi")])
    assert e.value.code == 2 and "--video " in capsys.readouterr().err


def test_what_cannot_be_evaluated_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at .*checkpoint.pt"):
        evaluate.main([str(tmp_path)])
    run = tmp_path / "run"
    train(parse_args([*TINY, "--epochs", "1", "--no-eval", "--out", str(run)]))
    with pytest.raises(SystemExit, match="has no checkpoint.best.pt .*; use --checkpoint last"):
        evaluate.main([str(run), "--checkpoint", "best"])


def test_weights_and_biases_offline_run_is_written(tmp_path):
    """--track --wandb-mode offline: a W&B run in the run folder, with no network, holding the metric rows."""
    run = tmp_path / "run"
    train(parse_args([*TINY, "--epochs", "1", "--seed", "2", "--out", str(run), "--track", "--wandb-mode", "offline"]))
    (record,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    rows = [r for r in map(json.loads, open(run / "metrics.jsonl"))]
    last_train = [r for r in rows if r["kind"] == "train"][-1]
    for tag, value in (("train/loss_q", last_train["loss_q"]), ("eval/score_mean", _evals(run)[-1]["score_mean"])):
        assert tag.encode() in data and json.dumps(value).encode() in data, tag
    run_id = (run / "wandb-run-id").read_text().strip()
    assert run_id in record.name  # one W&B run per run folder, kept for a resume
