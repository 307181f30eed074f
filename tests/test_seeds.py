"""Many seeds in one step: seed i of an N-seed FastDTQL is seed i's own agent (a group of one) fed its draws.

Tolerances, as tests/test_update.py's fast-vs-reference ones: one step, every loss within rtol
1e-5 (atol 1e-6) and all but 0.1% of every tensor's weights within 1e-6 of the single-seed run;
the worst weight no farther from the exact answer (the reference in float64, from the same
weights and draws) than max(5% of one Adam step, 3x the round-off floor measured in the same run:
a round-off-small gradient tips Adam's normalised step, batched or not, compiled or not; see
tests/exact_reference.py);
200 steps, losses within 1e-3 relative and weights within 1e-3 of their scale.
"""
import pytest
import torch

from dtql_fast.draws import Draws, sample_draws
from dtql_fast.tasks import TASKS, Hyper
from dtql_fast.transitions import Transitions
from dtql_fast.seeds import check_seeds
from dtql_fast.steppers import StepRunner
from dtql_fast.update import METRICS, FastDTQL
from exact_reference import RoundOff

LOSSES = ("loss_v", "loss_q", "loss_bc", "loss_tr", "loss_pq", "loss_ent", "loss_policy")


def _data(S, A, N=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Transitions(torch.randn(N, S, generator=g), torch.rand(N, A, generator=g) * 2 - 1,
                       torch.randn(N, 1, generator=g), torch.randn(N, S, generator=g),
                       (torch.rand(N, 1, generator=g) > 0.1).float())


def _group_and_singles(S, A, h, seeds, kernels="torch"):
    group = FastDTQL(S, A, h, seeds=seeds, kernels=kernels)
    return group, [FastDTQL(S, A, h, kernels=kernels, seeds=[s]) for s in seeds]


_stacked = Draws.stack


def _check_params(group, singles, roundoffs, h, atol=1e-6):
    for i, (single, roundoff) in enumerate(zip(singles, roundoffs)):
        got, want = group.modules(i), single.modules()
        for name, m in want.items():
            lr = h.critic_lr if name.startswith("critic") else h.lr
            for (k, p), q in zip(m.named_parameters(), got[name].parameters()):
                n_off = int(((q - p).abs() > atol).sum())
                assert n_off <= max(2, 1e-3 * p.numel()), f"seed {i} {name}.{k}: {n_off} weights off by > {atol}"
            roundoff.check(name, list(got[name].parameters()), list(m.parameters()), lr, label=f"seed {i} ")


def test_seeds_start_from_their_single_seed_weights():
    h = TASKS["walker2d-medium-v2"].hyper.replace(hidden=32)
    group, singles = _group_and_singles(5, 2, h, [3, 0, 7])
    for i, single in enumerate(singles):
        for name, m in single.modules().items():
            for p, q in zip(m.parameters(), group.modules(i)[name].parameters()):
                assert torch.equal(p, q)
    assert not torch.equal(group.pp["p0"][0], group.pp["p0"][1])  # the seeds' weights differ


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("seeds", [[4], [0, 1, 2]], ids=["N1", "N3"])
def test_seed_i_equals_a_single_seed_step_fed_its_draws(seeds, compiled):
    """Walker shapes, antmaze-like gamma (entropy term on) and lr decay: every term of the step."""
    h = TASKS["walker2d-medium-v2"].hyper.replace(steps_per_epoch=10, epochs=1, gamma=1.0)
    group, singles = _group_and_singles(17, 6, h, seeds)
    roundoffs = [RoundOff(single) for single in singles]
    data = _data(17, 6, N=4096)
    torch._dynamo.reset()
    step = torch.compile(group.train_step, fullgraph=True) if compiled else group.train_step
    pre = torch.compile(group.pretrain_step, fullgraph=True) if compiled else group.pretrain_step
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        draws = [sample_draws(data.n, h.batch_size, 6, generator=g) for _ in seeds]
        pretrain = i == 0
        mg = (pre if pretrain else step)(data, _stacked(draws))
        assert mg.shape == (len(seeds), len(METRICS))
        for j, (single, roundoff, d) in enumerate(zip(singles, roundoffs, draws)):
            ms = (single.pretrain_step if pretrain else single.train_step)(data, d.as_group())[0]
            (roundoff.pretrain_step if pretrain else roundoff.train_step)(data, d)
            torch.testing.assert_close(mg[j], ms, rtol=1e-5, atol=1e-6)
    _check_params(group, singles, roundoffs, h)
    assert group.lrs() == [single.lrs()[0] for single in singles]
    per_seed = group.read_metrics()  # metrics accumulate per seed
    assert len(per_seed) == len(seeds)
    for row, single in zip(per_seed, singles):
        assert row == pytest.approx(single.read_metrics()[0], rel=1e-5, abs=1e-6)


def test_200_steps_stay_with_the_single_seed_runs():
    h = Hyper(alpha=5, gamma=1, lr=3e-4, lr_decay=True, epochs=1, steps_per_epoch=200, batch_size=64, hidden=64)
    seeds = [0, 1, 2]
    group, singles = _group_and_singles(11, 3, h, seeds)
    data = _data(11, 3)
    g = torch.Generator().manual_seed(3)
    hist_g, hist_s = [], []
    for _ in range(200):
        draws = [sample_draws(data.n, h.batch_size, 3, generator=g) for _ in seeds]
        hist_g.append(group.train_step(data, _stacked(draws)))
        hist_s.append(torch.stack([s.train_step(data, d.as_group())[0] for s, d in zip(singles, draws)]))
    keep = [METRICS.index(k) for k in LOSSES]
    torch.testing.assert_close(torch.stack(hist_g)[..., keep], torch.stack(hist_s)[..., keep], rtol=1e-3, atol=1e-4)
    for i, single in enumerate(singles):
        for name, m in single.modules().items():
            for p, q in zip(m.parameters(), group.modules(i)[name].parameters()):
                assert (p - q).abs().max() <= 1e-3 * max(p.abs().max().item(), 1.0)


def test_group_runner_draws_independently_per_seed():
    h = Hyper(alpha=1, gamma=0, lr=3e-4, lr_decay=False, epochs=1, batch_size=16, hidden=32)
    group = FastDTQL(5, 2, h, seeds=[0, 1])
    torch.manual_seed(0)
    m = StepRunner(group, _data(5, 2, N=100))()
    assert m.shape == (2, len(METRICS)) and torch.isfinite(m).all()
    assert m[0, METRICS.index("loss_bc")] != m[1, METRICS.index("loss_bc")]
    d = sample_draws(100, 16, 2, groups=3)
    assert d.idx.shape == (3, 16) and d.noise_bc.shape == (3, 16, 1, 2) and d.eps.shape == (3, 16, 2)
    assert not torch.equal(d.idx[0], d.idx[1])


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_group_step_is_one_graph(kernels):
    h = Hyper(alpha=1, gamma=1, lr=3e-4, lr_decay=True, epochs=1, batch_size=32, hidden=32)
    group = FastDTQL(5, 2, h, seeds=[0, 1, 2], kernels=kernels)
    data = _data(5, 2, N=100)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(group.train_step)(data, sample_draws(data.n, 32, 2, groups=3))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_group_act_is_each_seeds_own_act():
    h = Hyper(alpha=5, gamma=0, lr=3e-4, lr_decay=False, epochs=1, hidden=64)
    seeds = [0, 5]
    group, singles = _group_and_singles(6, 3, h, seeds)
    states, eps, u = torch.randn(2, 4, 6), torch.randn(2, 4, 128, 3), torch.rand(2, 4)
    got = group.act(states, eps, u)
    assert got.shape == (2, 4, 3)
    for i, single in enumerate(singles):
        torch.testing.assert_close(got[i], single.act(states[i:i + 1], eps[i:i + 1], u[i:i + 1])[0], rtol=0, atol=1e-6)


def test_group_state_dict_round_trip_and_refuses_other_seeds():
    h = Hyper(alpha=1, gamma=0, lr=3e-4, lr_decay=False, epochs=1, batch_size=16, hidden=32)
    group = FastDTQL(5, 2, h, seeds=[0, 1])
    data = _data(5, 2, N=100)
    StepRunner(group, data)()
    sd = group.state_dict()
    assert sd["seeds"] == [0, 1] and len(sd["modules"]["policy"]) == 2
    assert set(sd["modules"]["critic"][1]) == set(group.modules(1)["critic"].state_dict())
    other = FastDTQL(5, 2, h, seeds=[0, 1])
    other.load_state_dict(sd)
    for net, packed in group.params().items():
        for k, v in packed.items():
            assert torch.equal(v, other.params()[net][k]), (net, k)
    for o, p in zip(group.optimizers().values(), other.optimizers().values()):
        assert all(torch.equal(a, b) for a, b in zip(o.exp_avg_sq, p.exp_avg_sq)) and torch.equal(o.step, p.step)
    with pytest.raises(ValueError, match=r"seeds \[0, 1\], the agent's are \[0, 2\]"):
        FastDTQL(5, 2, h, seeds=[0, 2]).load_state_dict(sd)
    with pytest.raises(ValueError, match="seeds"):
        FastDTQL(5, 2, h).load_state_dict(sd)


@pytest.mark.parametrize("seeds,message", [([], "empty"), ([1, 2, 1], "seed 1 is listed more than once"),
                                           ([0, -3], "non-negative")])
def test_bad_seed_lists_are_refused(seeds, message):
    with pytest.raises(ValueError, match=message):
        check_seeds(seeds)
    with pytest.raises(ValueError, match=message):
        FastDTQL(5, 2, Hyper(alpha=1, gamma=0, lr=3e-4, lr_decay=False, epochs=1, hidden=16), seeds=seeds)


def test_single_seed_checkpoint_format_round_trips():
    """A --seed run's checkpoint keeps the single-seed format (no seed lists): single_seed_state writes it
    from the group of one, agent_state reads it back to the very same state."""
    from dtql_fast import checkpoint

    h = Hyper(alpha=1, gamma=1, lr=3e-4, lr_decay=True, epochs=1, batch_size=16, hidden=32)
    agent = FastDTQL(5, 2, h, seeds=[3])
    StepRunner(agent, _data(5, 2, N=100))()
    single = checkpoint.single_seed_state(agent.state_dict())
    assert "seeds" not in single and isinstance(single["modules"]["policy"], dict)
    assert single["metric_sum"].shape == (len(METRICS),) and len(single["optimizers"]["critic"]["exp_avg"]) == 36
    other = FastDTQL(5, 2, h, seeds=[3])
    other.load_state_dict(checkpoint.agent_state({"agent": single, "config": {"seed": 3}}))
    for net, packed in agent.params().items():
        for k, v in packed.items():
            assert torch.equal(v, other.params()[net][k]), (net, k)
    assert torch.equal(agent.metric_sum, other.metric_sum)
    with pytest.raises(ValueError, match="one agent"):
        checkpoint.single_seed_state(FastDTQL(5, 2, h, seeds=[0, 1]).state_dict())
