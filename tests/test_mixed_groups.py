"""Groups beyond seeds: agents of one step with their own settings (alpha, gamma, lr, lr decay, expectile,
discount, tau) and their own datasets. Agent i of a mixed group equals its own agent (a group of one with
its settings, on its dataset) fed the same draws.

Tolerances, those of tests/test_seeds.py: a few steps at walker shapes, every loss within rtol 1e-5
(atol 1e-6), all but 0.1% of every tensor's weights within 1e-6, the worst weight no farther from the
float64 reference than max(5% of one Adam step, 3x the round-off floor measured in the same run);
200 steps, losses within 1e-3 relative and weights within 1e-3 of their scale.
"""
import json

import pytest
import torch

from dtql_fast import train as train_mod
from dtql_fast.draws import Draws, sample_draws
from dtql_fast.tasks import TASKS, Hyper
from dtql_fast.transitions import AgentData, DatasetError, Transitions
from dtql_fast.train import parse_args
from dtql_fast.groups import GroupMismatch
from dtql_fast.steppers import StepRunner
from dtql_fast.update import METRICS, FastDTQL
from exact_reference import RoundOff
from test_train import TINY, straight_and_resumed
from tree import tensors

LOSSES = ("loss_v", "loss_q", "loss_bc", "loss_tr", "loss_pq", "loss_ent", "loss_policy")


def _data(S, A, N, seed):
    g = torch.Generator().manual_seed(seed)
    return Transitions(torch.randn(N, S, generator=g), torch.rand(N, A, generator=g) * 2 - 1,
                       torch.randn(N, 1, generator=g), torch.randn(N, S, generator=g),
                       (torch.rand(N, 1, generator=g) > 0.1).float())


def _mixed(base: Hyper) -> list[Hyper]:
    """Two alphas, gamma zero and not, decay on and off, and the other per-agent settings apart."""
    return [base.replace(alpha=1.0, gamma=0.0, lr_decay=True),
            base.replace(alpha=5.0, gamma=1.0, lr_decay=False, lr=1e-4, expectile=0.9),
            base.replace(alpha=5.0, gamma=0.0, lr_decay=False, discount=0.95, tau=0.01),
            base.replace(alpha=1.0, gamma=1.0, lr_decay=True, critic_lr=1e-4)]


def _group_and_singles(S, A, hypers, seeds):
    group = FastDTQL(S, A, hypers[0], seeds=seeds, hypers=hypers)
    return group, [FastDTQL(S, A, h, seeds=[s]) for h, s in zip(hypers, seeds)]


def _draw(datasets, of_agent, h, A, g) -> list[Draws]:
    return [sample_draws(datasets[d].n, h.batch_size, A, h.noise_levels, generator=g) for d in of_agent]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_agent_i_of_a_mixed_group_equals_its_own_run(compiled):
    """Walker shapes, two datasets of different sizes, every per-agent setting apart somewhere; a pretraining
    step then training steps: losses, weights, learning rates and metric rows agree agent by agent."""
    base = TASKS["walker2d-medium-v2"].hyper.replace(steps_per_epoch=10, epochs=1)
    hypers, seeds, of_agent = _mixed(base), [0, 1, 2, 3], [0, 1, 1, 0]
    datasets = [_data(17, 6, 3000, 0), _data(17, 6, 2000, 1)]
    data = AgentData(datasets, of_agent)
    group, singles = _group_and_singles(17, 6, hypers, seeds)
    roundoffs = [RoundOff(single) for single in singles]
    torch._dynamo.reset()
    wrap = (lambda f: torch.compile(f, fullgraph=True)) if compiled else (lambda f: f)
    step, pre = wrap(group.train_step), wrap(group.pretrain_step)
    g = torch.Generator().manual_seed(5)
    for i in range(4):
        draws = _draw(datasets, of_agent, base, 6, g)
        pretrain = i == 0
        mg = (pre if pretrain else step)(data, Draws.stack(draws))
        for j, (single, roundoff, d) in enumerate(zip(singles, roundoffs, draws)):
            own = datasets[of_agent[j]]
            ms = (single.pretrain_step if pretrain else single.train_step)(own, d.as_group())[0]
            (roundoff.pretrain_step if pretrain else roundoff.train_step)(own, d)
            torch.testing.assert_close(mg[j], ms, rtol=1e-5, atol=1e-6, msg=lambda m: f"agent {j}: {m}")
    for j, (single, roundoff, h) in enumerate(zip(singles, roundoffs, hypers)):
        got, want = group.modules(j), single.modules()
        for name, m in want.items():
            lr = h.critic_lr if name.startswith("critic") else h.lr
            for (k, p), q in zip(m.named_parameters(), got[name].parameters()):
                n_off = int(((q - p).abs() > 1e-6).sum())
                assert n_off <= max(2, 1e-3 * p.numel()), f"agent {j} {name}.{k}: {n_off} weights off by > 1e-6"
            roundoff.check(name, list(got[name].parameters()), list(m.parameters()), lr, label=f"agent {j} ")
    assert group.lrs() == [single.lrs()[0] for single in singles]
    assert group.lrs()[1]["lr_policy"] == pytest.approx(1e-4) and group.lrs()[0]["lr_policy"] < 3e-4  # decay on
    rows = group.read_metrics()
    assert ["loss_ent" in r for r in rows] == [False, True, False, True]
    for row, single in zip(rows, singles):
        assert row == pytest.approx(single.read_metrics()[0], rel=1e-5, abs=1e-6)


def test_200_steps_of_a_mixed_group_stay_with_their_own_runs():
    base = Hyper(alpha=5, gamma=1, lr=3e-4, lr_decay=True, epochs=1, steps_per_epoch=200, batch_size=64, hidden=64)
    hypers, seeds, of_agent = _mixed(base), [4, 5, 6, 7], [1, 0, 1, 0]
    datasets = [_data(11, 3, 1500, 2), _data(11, 3, 700, 3)]
    data = AgentData(datasets, of_agent)
    group, singles = _group_and_singles(11, 3, hypers, seeds)
    g = torch.Generator().manual_seed(6)
    hist_g, hist_s = [], []
    for _ in range(200):
        draws = _draw(datasets, of_agent, base, 3, g)
        hist_g.append(group.train_step(data, Draws.stack(draws)))
        hist_s.append(torch.stack([s.train_step(datasets[k], d.as_group())[0]
                                   for s, d, k in zip(singles, draws, of_agent)]))
    keep = [METRICS.index(k) for k in LOSSES]
    torch.testing.assert_close(torch.stack(hist_g)[..., keep], torch.stack(hist_s)[..., keep], rtol=1e-3, atol=1e-4)
    for i, single in enumerate(singles):
        for name, m in single.modules().items():
            for p, q in zip(m.parameters(), group.modules(i)[name].parameters()):
                assert (p - q).abs().max() <= 1e-3 * max(p.abs().max().item(), 1.0), (i, name)


def test_each_agent_draws_rows_of_its_own_dataset():
    """StepRunner's draws: agent i's indices fall in its own dataset (sizes 50 and 3000 here), so its batch
    holds only its dataset's rows."""
    h = Hyper(alpha=1, gamma=0, lr=3e-4, lr_decay=False, epochs=1, batch_size=512, hidden=16)
    small, large = _data(5, 2, 50, 0), _data(5, 2, 3000, 1)
    small.rewards.fill_(-1.0); large.rewards.fill_(1.0)
    data = AgentData([small, large], [1, 0, 1])
    assert data.n.tolist() == [[3000], [50], [3000]]
    d = sample_draws(data.n, h.batch_size, 2, groups=3, generator=torch.Generator().manual_seed(0))
    assert d.idx[1].max() < 50 and d.idx[0].max() >= 2900 and d.idx[1].min() >= 0
    s, a, r, s2, nd = data.batch(d.idx)
    assert (r[0] == 1).all() and (r[1] == -1).all() and (r[2] == 1).all()
    m = StepRunner(FastDTQL(5, 2, h, seeds=[0, 1, 2]), data)()
    assert m.shape == (3, len(METRICS)) and torch.isfinite(m).all()
    assert AgentData([small, small], [0, 1]).n == 50  # equal sizes: the plain draw


def test_a_group_refuses_settings_it_cannot_share():
    base = Hyper(alpha=1, gamma=0, lr=3e-4, lr_decay=False, epochs=1, hidden=16)
    with pytest.raises(GroupMismatch, match=r"must share batch_size, but they differ \(the group, agent 0 \(seed 0\): "
                                            r"256; agent 1 \(seed 1\): 128\)"):
        FastDTQL(5, 2, base, seeds=[0, 1], hypers=[base, base.replace(batch_size=128)])
    with pytest.raises(GroupMismatch, match="must share hidden"):
        FastDTQL(5, 2, base, seeds=[0, 1], hypers=[base.replace(hidden=32), base.replace(hidden=32)])
    with pytest.raises(GroupMismatch, match="3 agents' settings for 2 seeds"):
        FastDTQL(5, 2, base, seeds=[0, 1], hypers=[base] * 3)
    with pytest.raises(GroupMismatch, match=r"agent 2 \(seed 0\) repeats an earlier agent's seed, settings and data"):
        FastDTQL(5, 2, base, seeds=[0, 0, 0], hypers=[base, base.replace(alpha=5), base])
    # the same seed and settings on two datasets are two agents (a --task list), on one dataset not
    assert FastDTQL(5, 2, base, seeds=[0, 0], datasets=[0, 1]).seeds == [0, 0]
    with pytest.raises(GroupMismatch, match=r"agent 2 \(seed 0\) repeats"):
        FastDTQL(5, 2, base, seeds=[0, 0, 0], datasets=[0, 1, 0])
    with pytest.raises(DatasetError, match=r"share state and action widths; got \[\(5, 2\), \(6, 2\)\]"):
        AgentData([_data(5, 2, 10, 0), _data(6, 2, 10, 0)], [0, 1])


# -- the grid from the train CLI: --alpha 1,5 --seeds 0-1 is four agents in one step ---------------------------


@pytest.fixture(autouse=True)
def _minari_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.getbasetemp() / "minari"))


def _rows(out, kind):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == kind]


def test_grid_cli_trains_every_setting_and_seed_in_one_step(tmp_path, monkeypatch, capsys):
    """--lr 1e-4,3e-4 --alpha 1,5 --seeds 0-1: eight agents, their rows named by setting and seed, each with its
    own learning rate; summary.json per agent and per setting (mean, std, standard error over the seeds). A Ctrl-C
    and --resume end on the straight run's state bit for bit; a resume with another grid is refused."""
    args = [*TINY, "--eval-episodes", "1", "--no-compile", "--threads", "1", "--lr", "1e-4,3e-4", "--alpha", "1,5",
            "--seeds", "0-1"]
    a, b = straight_and_resumed(args, tmp_path, monkeypatch)  # a Ctrl-C in step 17 and --resume beside
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    out = capsys.readouterr().out
    order = ["alpha=1,lr=0.0001", "alpha=1,lr=0.0003", "alpha=5,lr=0.0001", "alpha=5,lr=0.0003"]  # --help's order
    assert f"seeds 0-1 x settings {'; '.join(order)} (8 agents, one step)" in out
    rows = _rows(tmp_path / "straight", "train")
    last = [r for r in rows if r["step"] == 36]
    assert [(r["setting"], r["seed"]) for r in last] == [(s, k) for s in order for k in (0, 1)]
    first_train = [r for r in rows if r["step"] == 16]  # the cosine decay is off: each agent's own lr
    assert [r["lr_policy"] for r in first_train] == pytest.approx([1e-4, 1e-4, 3e-4, 3e-4] * 2)
    assert summary["settings"] == order
    cells = summary["per_setting"]
    assert [c["seeds"] for c in cells] == [[0, 1]] * 4 and len(summary["per_seed"]) == 8
    for c, pair in zip(cells, [summary["per_seed"][i:i + 2] for i in range(0, 8, 2)]):
        scores = [p["score_mean"] for p in pair]
        assert c["score_mean"] == pytest.approx(sum(scores) / 2)
        assert c["score_sem"] == pytest.approx(abs(scores[0] - scores[1]) / 2)  # std / sqrt(2) of two values
    assert "final: dtql_fast/reacher/scripted-v0 | alpha=5,lr=0.0003 | 2 seeds (0-1)" in out
    ta, tb = dict(tensors(a["agent"])), dict(tensors(b["agent"]))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a["agent"]["seeds"] == [0, 1] * 4
    with pytest.raises(SystemExit, match=r"cannot change --alpha \(the run has \[1.0, 5.0\], this command gives "
                                         r"\[1.0, 5.0, 20.0\]\)"):
        train_mod.main(["--resume", str(tmp_path / "split"), "--alpha", "1,5,20"])


def test_grid_flags_refuse_bad_lists(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--alpha", "1,5,1"])
    assert "argument --alpha: '1,5,1': a value is listed twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--gamma", "0,x"])
    assert "'0,x': give a number or a comma list of numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--alpha -1.0: takes a finite number >= 0"):
        train_mod.main([*TINY, "--alpha", "1,-1", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    assert parse_args(["--alpha", "5"]).alpha == 5.0 and parse_args(["--alpha", "1,5"]).alpha == [1.0, 5.0]
