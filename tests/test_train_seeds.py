"""Seed groups from the train CLI (`--seeds`): one process, one step for every seed; rows, evaluation and
summary per seed with the mean ± std over seeds; exact resume of the whole group; refused seed lists;
evaluation of all seeds in one vector env with one acting call per env step."""
import contextlib
import dataclasses
import io
import json
import math
from statistics import fmean, stdev

import gymnasium as gym
import numpy as np
import pytest
import torch

from dtql_fast import checkpoint, compiling, data as data_mod, divergence, report, train as train_mod
from dtql_fast.evaluate import evaluate, evaluate_group, make_act_fn, make_group_act_fn
from dtql_fast.seeds import SeedListError, format_seeds, parse_seeds
from dtql_fast.tasks import DEFAULT_HYPER, OFFLINE_DEMO_HYPER
from dtql_fast.config import TrainConfig
from dtql_fast.train import parse_args, train
from dtql_fast.update import METRICS, FastDTQL
from test_evaluate import _toy
from test_train import TINY, straight_and_resumed
from tree import tensors

TASK = "dtql_fast/reacher/scripted-v0"


@pytest.fixture(autouse=True)
def _minari_home(tmp_path_factory, monkeypatch):
    # One offline dataset per test session, never in the user's ~/.minari.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.getbasetemp() / "minari"))


def _rows(out, kind):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == kind]


class _CountActs:
    """Counts FastDTQL.act calls and the shapes they saw (the acting rule, under any act_fn)."""

    def __init__(self, monkeypatch):
        self.shapes = []
        real = FastDTQL.act

        def act(agent, states, eps, u):
            self.shapes.append(tuple(states.shape))
            return real(agent, states, eps, u)

        monkeypatch.setattr(FastDTQL, "act", act)


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    """`--seeds 0-1`, eager, the tiny schedule: 36 steps, evaluated (2 episodes a seed) after epochs 1 and 2."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.getbasetemp() / "minari"))
    acts = _CountActs(mp)
    out = tmp_path_factory.mktemp("group") / "run"
    try:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            summary = train(parse_args([*TINY, "--seeds", "0-1", "--out", str(out)]))
    finally:
        mp.undo()
    return out, summary, text.getvalue(), acts.shapes


def test_group_cli_end_to_end(group_run):
    out, summary, text, _ = group_run
    assert summary["seeds"] == [0, 1] and summary["steps"] == 36 and summary["episodes"] == 2
    assert json.loads((out / "config.json").read_text())["config"]["seeds"] == [0, 1]
    # train rows: one per seed at each log step, the seed in its own column; the seeds' losses differ
    train_rows = _rows(out, "train")
    assert [(r["step"], r["seed"]) for r in train_rows] == [(s, k) for s in range(4, 37, 4) for k in (0, 1)]
    assert all(r["loss_bc"] != q["loss_bc"] for r, q in zip(train_rows[::2], train_rows[1::2]))
    assert all(math.isfinite(r["loss_policy"]) for r in train_rows if r["phase"] == "train")
    assert (out / "train.csv").read_text().splitlines()[0].startswith("kind,step,seed,phase,")
    # eval rows: one per seed and evaluation, each seed on its own envs (a single --seed run's)
    evals = _rows(out, "eval")
    assert [(r["step"], r["seed"], r["env_seed"]) for r in evals] == [
        (24, 0, 1000), (24, 1, 11000), (36, 0, 1000), (36, 1, 11000)]
    for r in evals:
        assert len(r["returns"]) == 2 and r["return_mean"] == pytest.approx(fmean(r["returns"]))
        assert r["score_mean"] == pytest.approx(fmean(r["scores"]))
    csv_lines = (out / "eval.csv").read_text().splitlines()
    assert csv_lines[0].startswith("kind,step,epoch,seed,episodes,env_seed,return_mean") and len(csv_lines) == 5
    # summary.json: per seed the last evaluation; over seeds, mean and sample std of those means
    last = evals[2:]
    assert [p["seed"] for p in summary["per_seed"]] == [0, 1]
    for p, r in zip(summary["per_seed"], last):
        assert (p["score_mean"], p["score_std"], p["return_mean"]) == (r["score_mean"], r["score_std"], r["return_mean"])
    scores = [r["score_mean"] for r in last]
    assert scores[0] != scores[1]
    o = summary["over_seeds"]
    assert o["score_mean"] == pytest.approx(fmean(scores)) and o["score_std"] == pytest.approx(stdev(scores))
    assert o["return_mean"] == pytest.approx(fmean(r["return_mean"] for r in last))
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (f"final: {TASK} | 2 seeds (0-1), 2 episodes each | normalised score {o['score_mean']:.1f} ± "
            f"{o['score_std']:.1f}") in text
    assert f"  seed 1: return {last[1]['return_mean']:.2f} ± {last[1]['return_std']:.2f}" in text
    assert "eval @ epoch 1: normalised score" in text and "over 2 seeds (0-1) (per seed: " in text
    # the report reads the group folder as two seeds and gets the summary's mean ± std
    runs = report.discover(out)
    assert [(r.seed, r.last) for r in runs] == [(0, scores[0]), (1, scores[1])]
    (row,) = report.summarise(runs)
    assert row.seeds == 2 and row.last == pytest.approx((o["score_mean"], o["score_std"]))
    ck = checkpoint.load(out)
    assert ck["step"] == 36 and ck["agent"]["seeds"] == [0, 1] and len(ck["agent"]["modules"]["policy"]) == 2
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_evaluation_is_one_act_call_per_env_step(group_run):
    """Reacher episodes last 50 steps: two evaluations are 100 acting calls, each for both seeds' 2 envs."""
    *_, shapes = group_run
    assert shapes == [(2, 2, 10)] * 100


def test_group_cli_compiled(tmp_path, capsys):
    """--compile with --seeds: one graph each for the pretraining step, the training step and acting, over
    two evaluations; the summary's mean ± std is the per-seed numbers'."""
    torch._dynamo.reset()
    summary = train(parse_args([*TINY, "--seeds", "0-1", "--compile", "--out", str(tmp_path / "run")]))
    text = capsys.readouterr().out
    assert "compiled the pretraining step in" in text and "compiled the training step in" in text
    assert summary["compiled_graphs"] == 3
    last = [r for r in _rows(tmp_path / "run", "eval") if r["step"] == 36]
    scores = [r["score_mean"] for r in last]
    assert [r["seed"] for r in last] == [0, 1] and [p["score_mean"] for p in summary["per_seed"]] == scores
    assert summary["over_seeds"]["score_mean"] == pytest.approx(fmean(scores))
    assert summary["over_seeds"]["score_std"] == pytest.approx(stdev(scores))


def test_group_interrupt_and_resume_equals_straight_run(tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-epoch, then --resume: the whole group ends on the straight run's weights, Adam states and
    RNG state bit for bit, with the same rows."""
    args = [*TINY, "--eval-episodes", "1", "--lr-decay", "--seeds", "2,5"]
    a, b = straight_and_resumed(args, tmp_path, monkeypatch)
    assert "Resume with: python -m dtql_fast.train --resume" in capsys.readouterr().out
    assert a["step"] == b["step"] == 36 and a["agent"]["seeds"] == b["agent"]["seeds"] == [2, 5]
    ta, tb = dict(tensors(a["agent"])), dict(tensors(b["agent"]))
    assert ta.keys() == tb.keys() and len(ta) > 100
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])
    for kind in ("train", "eval"):
        ra, rb = _rows(tmp_path / "straight", kind), _rows(tmp_path / "split", kind)
        for r in ra + rb:
            r.pop("steps_per_s", None), r.pop("wall_s", None)
        assert ra == rb and len(ra) == (18 if kind == "train" else 4)
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["over_seeds"] == \
        json.loads((tmp_path / "straight" / "summary.json").read_text())["over_seeds"]


def test_seed_and_a_group_of_one_are_one_path(tmp_path):
    """--seed 3 is a group of one inside: the same weights, losses and evaluation as --seeds 3, bit for bit;
    only the run folder's format differs (no seed column or seed lists in the --seed run's rows, summary and
    checkpoint, which reads back as the group of one's state)."""
    flags = [*TINY, "--no-compile", "--threads", "1"]
    one = train(parse_args([*flags, "--seed", "3", "--out", str(tmp_path / "one")]))
    group = train(parse_args([*flags, "--seeds", "3", "--out", str(tmp_path / "group")]))
    rows_one, rows_group = _rows(tmp_path / "one", "train"), _rows(tmp_path / "group", "train")
    assert "seed" not in rows_one[0] and [r.pop("seed") for r in rows_group] == [3] * len(rows_one)
    keep = lambda r: {k: v for k, v in r.items() if k != "steps_per_s"}  # noqa: E731
    assert [keep(r) for r in rows_one] == [keep(r) for r in rows_group]
    assert [r["returns"] for r in _rows(tmp_path / "one", "eval")] == [r["returns"] for r in _rows(tmp_path / "group", "eval")]
    assert "per_seed" not in one and one["score_mean"] == group["per_seed"][0]["score_mean"]
    ck_one, ck_group = checkpoint.load(tmp_path / "one"), checkpoint.load(tmp_path / "group")
    assert "seeds" not in ck_one["agent"] and ck_group["agent"]["seeds"] == [3]
    got, want = dict(tensors(checkpoint.agent_state(ck_one))), dict(tensors(ck_group["agent"]))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resume_refuses_another_seed_list(group_run, tmp_path, monkeypatch):
    """A group checkpoint resumes only as that group, a single-seed one only as that seed: refused before
    the data is loaded, naming both."""
    out, *_ = group_run

    def no_data(*a, **k):
        raise AssertionError("the data was loaded before the seed lists were compared")

    single = tmp_path / "single"
    train(parse_args([*TINY, "--epochs", "1", "--no-eval", "--seed", "4", "--out", str(single)]))
    monkeypatch.setattr(data_mod, "build_offline_dataset", no_data)
    cases = [
        (out, ["--seeds", "0-2"], f"checkpoint {out / 'checkpoint.pt'} trains the seed group [0, 1] (--seeds 0-1), "
                                  "but this run asks for the seed group [0, 1, 2] (--seeds 0-2)"),
        (out, ["--seed", "0"], "trains the seed group [0, 1] (--seeds 0-1), but this run asks for the single seed 0"),
        (single, ["--seeds", "4"], "trains the single seed 4 (--seed 4), but this run asks for the seed group [4]"),
        (single, ["--seed", "3"], "trains the single seed 4 (--seed 4), but this run asks for the single seed 3"),
    ]
    for folder, flags, message in cases:
        before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
        with pytest.raises(SystemExit) as e:
            train_mod.main(["--resume", str(folder), *flags])
        assert message in str(e.value.code) and "another --out" in str(e.value.code), flags
        assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before  # nothing written


@pytest.mark.parametrize("flags, message", [
    (["--seeds", ""], "--seeds '': '' is not a seed or a range of seeds"),
    (["--seeds", "1,1"], "--seeds '1,1': seed 1 is listed more than once"),
    (["--seeds", "0-2,1"], "seed 1 is listed more than once in [0, 1, 2, 1]"),
    (["--seeds", "0,-3"], "--seeds '0,-3': -3 is negative"),
    (["--seeds", "4-2"], "the range '4-2' goes down"),
    (["--seed", "-1"], "--seed -1: seeds are non-negative integers"),
    (["--seed", "1", "--seeds", "0-1"], "argument --seeds: not allowed with argument --seed"),
])
def test_bad_seed_lists_are_refused_before_any_work(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_mod.main([*flags, "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cfg, message", [
    (TrainConfig(seeds=[]), "the seed list is empty"), (TrainConfig(seeds=[3, -1]), "non-negative"),
    (TrainConfig(seeds=[2, 2]), "seed 2 is listed more than once"),
    (TrainConfig(seed=1, seeds=[0, 1]), "give --seed or --seeds, not both"),
])
def test_bad_seed_list_in_code_is_refused_before_any_work(cfg, message, tmp_path):
    with pytest.raises(SeedListError, match=message):
        train(dataclasses.replace(cfg, out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_seed_lists_parse_and_name_their_folder():
    assert parse_seeds("0-4") == (0, 1, 2, 3, 4) and parse_seeds("0,3,7") == (0, 3, 7)
    assert parse_seeds("0-2,7") == (0, 1, 2, 7) and parse_seeds(" 5 ") == (5,)
    assert format_seeds([0, 1, 2, 7]) == "0-2,7" and format_seeds([0, 3, 7]) == "0,3,7"
    assert parse_args(["--seeds", "0-2,7"]).seeds == [0, 1, 2, 7] and parse_args([]).seeds is None
    folder = lambda *a: str(train_mod.run_folder(parse_args(["--task", "walker2d-medium-v2", *a])))  # noqa: E731
    assert folder("--seeds", "0-4") == "runs/walker2d-medium-v2-seeds0-4"
    assert folder("--seeds", "0,3,7") == "runs/walker2d-medium-v2-seeds0_3_7"
    assert folder("--seeds", "3") == "runs/walker2d-medium-v2-seeds3" != folder("--seed", "3")
    assert folder() == "runs/walker2d-medium-v2-s0"


def test_group_divergence_names_the_seed(tmp_path):
    """--lr 1e30 breaks every seed at step 2; the error names each seed's non-finite numbers."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_mod.main([*TINY, "--lr", "1e30", "--log-every", "1", "--no-eval", "--checkpoint-every", "1e-5",
                        "--seeds", "0,3", "--out", str(out)])
    msg = str(e.value.code)
    assert msg.startswith("error: training diverged at step 2: seed 0: loss_bc = nan") and "seed 3: loss_bc = nan" in msg
    assert f"The last good checkpoint, {out / 'checkpoint.pt'} (step 1), is kept" in msg
    ck = checkpoint.load(out)
    assert ck["step"] == 1 and all(torch.isfinite(t).all() for _, t in tensors(ck["agent"]) if t.is_floating_point())


def test_group_divergence_checks_name_one_bad_seed():
    """One seed going bad is named alone, in the log-row check and in the state check."""
    agent = FastDTQL(3, 2, OFFLINE_DEMO_HYPER.replace(hidden=16), seeds=[4, 7, 9])
    labels = [f"seed {s}: " for s in agent.seeds]
    divergence.check_state(5, agent.state_dict(), labels)
    watch = divergence.WeightWatch(agent.params())
    assert watch.queue().shape == (3,) and torch.isfinite(watch.queue()).all()
    agent.pp["p0"][1, 0, 0] = float("nan")  # seed 7's policy net.0.weight
    agent.metric_sum[2, METRICS.index("loss_q")] = float("inf")  # seed 9's running loss_q
    w = watch.queue()
    assert torch.isnan(w[1]) and torch.isfinite(w[[0, 2]]).all()
    with pytest.raises(divergence.Diverged, match=r"at step 5: non-finite seed 7: modules.policy.net.0.weight, "
                                                  r"seed 9: loss_q \(running sum inf\)$"):
        divergence.check_state(5, agent.state_dict(), labels)
    ok = {"loss_v": 1.0, "loss_q": 1.0}
    with pytest.raises(divergence.Diverged, match=r"^training diverged at step 3: seed 7: the largest \|weight\| = nan$"):
        divergence.check_log_row(3, [ok, ok, ok], w, labels)
    with pytest.raises(divergence.Diverged, match=r"step 3: seed 7: the largest \|weight\| = nan, seed 9: loss_q = inf$"):
        divergence.check_log_row(3, [ok, ok, {**ok, "loss_q": math.inf}], w, labels)


# -- evaluation of a group, in one vector env ---------------------------------------------------------------


def _group_and_singles(seeds, S, A):
    h = DEFAULT_HYPER.replace(hidden=32)
    return FastDTQL(S, A, h, seeds=seeds), [FastDTQL(S, A, h, seeds=[s]) for s in seeds]


def _one(agent):
    """A group of one's acting rule without the agent dimension, as make_act_fn takes one agent's."""
    return lambda s, eps, u: agent.act(s[None], eps[None], u[None])[0]


@pytest.mark.parametrize("pad", [False, True], ids=["live-rows", "padded"])
def test_group_eval_equals_each_seed_evaluated_alone(pad):
    """Episodes of different lengths (terminated and truncated): seed i's returns and lengths equal a single-seed
    evaluation of seed i's agent with the same env seeds and action draws, and the group acts once per env step
    for all seeds (padded: always on E rows a seed, the shape a compiled act keeps)."""
    seeds, E, R, A = [3, 0, 8], 6, 16, 1
    group, singles = _group_and_singles(seeds, 2, A)
    calls = []

    def act(states, eps, u):
        calls.append(tuple(states.shape))
        return group.act(states, eps, u)

    gens = [torch.Generator().manual_seed(100 + s) for s in seeds]
    got = evaluate_group(make_group_act_fn(act, A, R, "cpu", gens, pad=pad), _toy, E, [10 * s for s in seeds])
    lengths = [x for r in got for x in r["lengths"]]
    assert len(set(lengths)) > 3 and min(lengths) < 8 and 8 in lengths  # the envs end at different steps
    assert len(calls) == max(lengths)  # one acting call per env step, for every seed's live envs
    if pad:
        assert set(calls) == {(3, E, 2)}
    for r, s, single in zip(got, seeds, singles):
        fn = make_act_fn(_one(single), A, R, "cpu", torch.Generator().manual_seed(100 + s), pad_to=E if pad else None)
        want = evaluate(fn, _toy, E, seed=10 * s)
        assert r["env_seed"] == want["env_seed"] == 10 * s and r["lengths"] == want["lengths"]
        np.testing.assert_allclose(r["returns"], want["returns"], rtol=0, atol=1e-5)
        assert r["return_mean"] == pytest.approx(want["return_mean"], abs=1e-5)
    assert got[0]["returns"] != got[1]["returns"]


def test_group_eval_on_reacher_with_the_compiled_act():
    """The compiled acting rule on (seeds, episodes, state) rows: one graph for the whole evaluation, each seed's
    returns those of its own agent evaluated alone."""
    seeds, E, R = [1, 6], 3, 64
    group, singles = _group_and_singles(seeds, 10, 2)
    make_env = lambda: gym.make("Reacher-v5")  # noqa: E731
    torch._dynamo.reset()
    graphs = compiling.compiled_graphs()
    compiled = torch.compile(group.act, fullgraph=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    got = evaluate_group(make_group_act_fn(compiled, 2, R, "cpu", gens, pad=True), make_env, E, [7, 70])
    assert compiling.compiled_graphs() - graphs == 1
    for r, s, single, env_seed in zip(got, seeds, singles, [7, 70]):
        want = evaluate(make_act_fn(_one(single), 2, R, "cpu", torch.Generator().manual_seed(s), pad_to=E), make_env,
                        E, seed=env_seed)
        assert r["lengths"] == want["lengths"] == [50] * E
        np.testing.assert_allclose(r["returns"], want["returns"], rtol=1e-5)
