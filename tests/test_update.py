"""The fast step against the reference, and the structure that makes it fast.

Tolerances (fp32, CPU):
- one step from identical weights and draws: every loss within rtol 1e-5 (atol 1e-6); at least
  99.9% of the weights of every tensor (all but 2, for small ones) within 1e-6 absolute of the exact
  answer (the reference in float64), or no more than 3x as many off as the farthest fp32 sample (the
  fp32 reference, or it fed its batch rows in other orders). The worst weight is bounded against the exact answer, the reference in float64:
  no farther from it than 5% of one Adam step (0.05 * lr) or 3x the round-off floor measured in
  the same run (the farthest of the fp32 reference and four fp32 references fed their batch rows
  in other orders), whichever is larger. Why a measured floor: tests/exact_reference.py.
- 200 steps from the same start with the same draws: losses within 1e-3 relative, parameters
  within 1e-3 of their scale (differences grow from round-off through Adam).
- 1000 steps: the running means of the losses over the last 500 steps agree within 1%.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dtql_fast.draws import sample_draws
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.tasks import TASKS, Hyper
from dtql_fast.transitions import Transitions
from dtql_fast.optim import Adam
from dtql_fast.steppers import StepRunner
from dtql_fast.update import METRICS, PRETRAIN_METRICS, FastDTQL
from exact_reference import FLOOR_FACTOR, RoundOff

LOSSES = ("loss_v", "loss_q", "loss_bc", "loss_tr", "loss_pq", "loss_policy")


def _data(S, A, N=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Transitions(torch.randn(N, S, generator=g), torch.rand(N, A, generator=g) * 2 - 1,
                       torch.randn(N, 1, generator=g), torch.randn(N, S, generator=g),
                       (torch.rand(N, 1, generator=g) > 0.1).float())


def _pair(S, A, h, seed=0):
    torch.manual_seed(seed)
    ref = ReferenceDTQL(S, A, h)
    fast = FastDTQL(S, A, h)
    fast.load_weights_from(ref)
    return ref, fast


def _check_losses(mr, mf, rtol, atol, keys=LOSSES, order=METRICS):
    for k in keys:
        got, want = mf[order.index(k)].item(), mr[k].item()
        assert got == pytest.approx(want, rel=rtol, abs=atol), k


def _check_params(ref, fast, atol, h, roundoff: RoundOff):
    """Against the exact answer (the float64 reference): no more of a tensor's weights farther than atol from
    it than 0.1% (or 2), or FLOOR_FACTOR times as many as the farthest fp32 sample puts that far (the fp32
    reference and its row-permuted copies: on an AVX2 build the fp32 reference itself lands 61-64 of antmaze's
    first policy-layer weights over 1e-6 from float64, where the fast step lands none); and the worst weight
    within the round-off floor's bound (RoundOff.check). The critic and its target step with critic_lr, the
    others with lr."""
    fast_mods = fast.modules()
    for name, m in ref.modules().items():
        lr = h.critic_lr if name.startswith("critic") else h.lr
        exact = [e.detach().double() for e in roundoff.exact.agent.modules()[name].parameters()]
        samples = [list(m.parameters())] + [list(a.modules()[name].parameters()) for a in roundoff.permuted]
        for i, ((k, p), q) in enumerate(zip(m.named_parameters(), fast_mods[name].parameters())):
            n_off = int(((q.detach().double() - exact[i]).abs() > atol).sum())
            floor = max(int(((s[i].detach().double() - exact[i]).abs() > atol).sum()) for s in samples)
            assert n_off <= max(2, 1e-3 * q.numel(), FLOOR_FACTOR * floor), \
                f"{name}.{k}: {n_off} weights farther than {atol} from float64 (fp32 round-off: {floor})"
        roundoff.check(name, list(fast_mods[name].parameters()), list(m.parameters()), lr)


def test_adam_matches_torch_adam():
    torch.manual_seed(0)
    p = {"w": torch.randn(7, 5), "b": torch.randn(5)}
    tp = [torch.nn.Parameter(v.clone()) for v in p.values()]
    step = torch.zeros(())
    ours, theirs = Adam(p, lr=torch.tensor(1e-2), step=step), torch.optim.Adam(tp, lr=1e-2)
    for _ in range(5):
        grads = {k: torch.randn_like(v) for k, v in p.items()}
        for t, g in zip(tp, grads.values()):
            t.grad = g.clone()
        step += 1  # the owner advances the step, as FastDTQL's counters do once a step
        ours.update(grads)
        theirs.step()
    for a, b in zip(p.values(), tp):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("task", ["walker2d-medium-v2", "hopper-medium-v2", "antmaze-umaze-v0"])
def test_one_step_eager_matches_reference(task):
    """Walker shapes (decay on, gamma 0) and antmaze shapes (gamma 1, batch 2048)."""
    h = TASKS[task].hyper.replace(steps_per_epoch=10, epochs=1)
    S, A = {"walker2d-medium-v2": (17, 6), "hopper-medium-v2": (11, 3), "antmaze-umaze-v0": (29, 8)}[task]
    ref, fast = _pair(S, A, h)
    roundoff = RoundOff(ref)
    data = _data(S, A, N=4096)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        d = sample_draws(data.n, h.batch_size, A, generator=g)
        mr, mf = ref.train_step(data, d), fast.train_step(data, d.as_group())[0]
        roundoff.train_step(data, d)
        _check_losses(mr, mf, 1e-5, 1e-6)
        if h.gamma:
            assert mf[METRICS.index("loss_ent")].item() == pytest.approx(mr["loss_ent"].item(), rel=1e-5)
    _check_params(ref, fast, atol=1e-6, h=h, roundoff=roundoff)
    assert fast.lrs()[0]["lr_policy"] == pytest.approx(ref.policy_opt.param_groups[0]["lr"], rel=1e-6)


def test_round_off_bound_catches_a_weight_off_by_one_step():
    """The float64 bound is not vacuous: one weight per tensor moved by one Adam step (what a wrong
    term does to an element) fails it, though it passes the 99.9%-within-1e-6 count."""
    h = TASKS["hopper-medium-v2"].hyper.replace(steps_per_epoch=10, epochs=1)
    ref, fast = _pair(11, 3, h)
    roundoff = RoundOff(ref)
    data = _data(11, 3, N=4096)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        d = sample_draws(data.n, h.batch_size, 3, generator=g)
        ref.train_step(data, d), fast.train_step(data, d.as_group())[0], roundoff.train_step(data, d)
    fast_mods = fast.modules()
    for name, m in ref.modules().items():
        lr = h.critic_lr if name.startswith("critic") else h.lr
        fp32 = list(m.parameters())
        roundoff.check(name, list(fast_mods[name].parameters()), fp32, lr)
        for i, p in enumerate(fast_mods[name].parameters()):
            moved = [q.detach().clone() for q in fast_mods[name].parameters()]
            moved[i].view(-1)[0] += lr
            with pytest.raises(AssertionError, match="from float64"):
                roundoff.check(name, moved, fp32, lr)


def test_one_step_with_kernel_ops_matches_reference():
    """kernels='triton' routes both EDM losses through the dtql:: ops (CPU impl here). The ops use a
    better-conditioned form of (D - x) / c_out, so agreement is to round-off, not bit for bit."""
    h = TASKS["walker2d-medium-v2"].hyper.replace(steps_per_epoch=10, epochs=1)
    ref, fast = _pair(17, 6, h)
    fast.set_kernels("triton")
    roundoff = RoundOff(ref)
    data = _data(17, 6, N=4096)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        d = sample_draws(data.n, 256, 6, generator=g)
        _check_losses(ref.train_step(data, d), fast.train_step(data, d.as_group())[0], 1e-5, 1e-6)
        roundoff.train_step(data, d)
    _check_params(ref, fast, atol=1e-6, h=h, roundoff=roundoff)


def test_pretrain_step_matches_reference():
    h = Hyper(alpha=5, gamma=0, lr=3e-4, lr_decay=True, epochs=1, steps_per_epoch=10, hidden=64)
    ref, fast = _pair(17, 6, h)
    roundoff = RoundOff(ref)
    data = _data(17, 6)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        d = sample_draws(data.n, 256, 6, generator=g)
        mr, mf = ref.pretrain_step(data, d), fast.pretrain_step(data, d.as_group())[0]
        roundoff.pretrain_step(data, d)
        _check_losses(mr, mf, 1e-5, 1e-6, keys=PRETRAIN_METRICS[:3])
    _check_params(ref, fast, atol=1e-6, h=h, roundoff=roundoff)
    assert fast.lrs()[0]["lr_critic"] == pytest.approx(3e-4, rel=1e-7) and fast.lr_step.item() == 0


def test_act_matches_reference():
    h = Hyper(alpha=5, gamma=0, lr=3e-4, lr_decay=False, epochs=1, hidden=64)
    ref, fast = _pair(17, 6, h)
    states, eps, u = torch.randn(5, 17), torch.randn(5, 1024, 6), torch.rand(5)
    torch.testing.assert_close(fast.act(states[None], eps[None], u[None])[0], ref.act(states, eps, u), rtol=0, atol=0)


def test_long_trajectories_agree():
    """200 steps: trajectories stay close; 1000 steps: running means agree. Small nets keep CI fast."""
    h = Hyper(alpha=5, gamma=1, lr=3e-4, lr_decay=True, epochs=1, steps_per_epoch=1000, batch_size=64,
              hidden=64)
    ref, fast = _pair(11, 3, h)
    data = _data(11, 3)
    g = torch.Generator().manual_seed(3)
    hist_r, hist_f = [], []
    for i in range(1000):
        d = sample_draws(data.n, h.batch_size, 3, generator=g)
        mr, mf = ref.train_step(data, d), fast.train_step(data, d.as_group())[0]
        hist_r.append([mr[k].item() for k in LOSSES])
        hist_f.append([mf[METRICS.index(k)].item() for k in LOSSES])
        if i == 199:
            r, f = torch.tensor(hist_r), torch.tensor(hist_f)
            torch.testing.assert_close(f, r, rtol=1e-3, atol=1e-4)
            fast_mods = fast.modules()
            for name, m in ref.modules().items():
                for p, q in zip(m.parameters(), fast_mods[name].parameters()):
                    assert (p.detach() - q).abs().max() <= 1e-3 * max(p.abs().max().item(), 1.0)
    r, f = torch.tensor(hist_r[500:]).mean(0), torch.tensor(hist_f[500:]).mean(0)
    torch.testing.assert_close(f, r, rtol=1e-2, atol=1e-3)


# -- the compiled step --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled_pair():
    """One compiled step, shared: compiling costs tens of seconds on 2 cores."""
    h = TASKS["walker2d-medium-v2"].hyper.replace(steps_per_epoch=10, epochs=1)
    ref, fast = _pair(17, 6, h)
    torch._dynamo.reset()
    compiled = torch.compile(fast.train_step, fullgraph=True)
    step = lambda data, d: compiled(data, d.as_group())[0]  # noqa: E731 - the one agent's draws and metrics
    return ref, fast, step, _data(17, 6, N=4096)


def test_compiled_step_matches_reference(compiled_pair):
    ref, fast, step, data = compiled_pair
    roundoff = RoundOff(ref)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        d = sample_draws(data.n, 256, 6, generator=g)
        mr, mf = ref.train_step(data, d), step(data, d)
        roundoff.train_step(data, d)
        _check_losses(mr, mf, 1e-5, 1e-5)
    _check_params(ref, fast, atol=1e-6, h=ref.hyper, roundoff=roundoff)


def test_compiled_step_never_recompiles(compiled_pair):
    ref, fast, step, data = compiled_pair
    from torch._dynamo.utils import counters
    step(data, sample_draws(data.n, 256, 6))  # compiled already by the test above, or now
    frames = dict(counters["stats"])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            fast.policy_opt.lr.fill_(1e-4)  # a changed lr is data, not a new graph
            step(data, sample_draws(data.n, 256, 6))
    assert dict(counters["stats"]).get("unique_graphs") == frames.get("unique_graphs")


def test_compiled_call_reads_nothing_back(compiled_pair):
    """A compiled call, guards included, must not read a tensor value back to the host: a guard
    on a 0-dim tensor's value (dynamo adds one for float64 scalars) would sync CUDA every step."""
    ref, fast, step, data = compiled_pair
    step(data, sample_draws(data.n, 256, 6))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(data, sample_draws(data.n, 256, 6))
    names = {e.key for e in prof.key_averages()}
    assert any("Torch-Compiled Region" in n or "CompiledFxGraph" in n for n in names), names
    assert not names & {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero"}


def test_compiled_step_on_its_own_draws_matches_reference():
    """A run's compiled step draws inside its graph (StepRunner: inductor's RNG, under the run's compile options),
    which the tests above, feeding draws in, never reach. Here the graph also returns the draws it made, and the
    reference fed those very draws must land where the compiled step did: the step consumes each random tensor
    as drawn (a kernel that recomputed a draw with another seed, or a draw left out of a fused kernel, would
    show here), for three steps."""
    from dtql_fast import compiling
    from dtql_fast.draws import Draws

    h = TASKS["walker2d-medium-v2"].hyper.replace(steps_per_epoch=10, epochs=1, batch_size=64)
    ref, fast = _pair(11, 3, h, seed=5)
    data = _data(11, 3, N=500)

    def fn():
        d = sample_draws(data.n, h.batch_size, 3, h.noise_levels, groups=1)
        return fast.train_step(data, d), d.tensors()

    step = compiling.CompileOnFirstCall(fn, torch.device("cpu"))
    roundoff = RoundOff(ref)
    seen = []
    for _ in range(3):
        mf, drawn = step()
        d = Draws(*(t[0].clone() for t in drawn))
        seen.append(d.idx)
        mr = ref.train_step(data, d)
        roundoff.train_step(data, d)
        _check_losses(mr, mf[0], 1e-5, 1e-5)
    assert not torch.equal(seen[0], seen[1])  # a new draw every call
    _check_params(ref, fast, atol=1e-6, h=ref.hyper, roundoff=roundoff)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_whole_step_is_one_graph(kernels):
    """fullgraph=True refuses graph breaks; explain() also counts them, for a readable failure.
    With kernels='triton' the dtql:: custom ops sit inside the graph (their CPU impl runs here)."""
    h = Hyper(alpha=1, gamma=1, lr=3e-4, lr_decay=True, epochs=1, batch_size=32, hidden=32)
    fast = FastDTQL(5, 2, h, kernels=kernels)
    data = _data(5, 2, N=100)
    d = sample_draws(data.n, 32, 2)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fast.train_step)(data, d.as_group())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# Ops that make the host wait for the device: reading a value back, or data-dependent shapes.
HOST_SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero",
                 "aten.masked_select", "aten.equal", "aten.allclose", "aten.unique", "aten._unique2",
                 "aten.repeat_interleave"}


@pytest.mark.parametrize("gamma,decay", [(0.0, True), (1.0, False)])
def test_step_dispatches_no_host_sync(gamma, decay):
    h = Hyper(alpha=1, gamma=gamma, lr=3e-4, lr_decay=decay, epochs=1, batch_size=32, hidden=32, noise_levels=2)
    fast = FastDTQL(5, 2, h)
    data = _data(5, 2, N=100)
    rec = _OpRecorder()
    with rec:
        runner = StepRunner(fast, data, mode="eager")
        runner()
        StepRunner(fast, data, mode="eager", pretrain=True)()
    assert rec.ops, "the recorder saw nothing"
    assert rec.ops & {"aten.mm", "aten.addmm", "aten.bmm"}, rec.ops  # the layers ran
    assert not (rec.ops & HOST_SYNC_OPS), rec.ops & HOST_SYNC_OPS


def test_noise_levels_k4_step_runs_and_accumulates_metrics():
    h = Hyper(alpha=1, gamma=0, lr=3e-4, lr_decay=False, epochs=1, batch_size=16, hidden=32, noise_levels=4)
    fast = FastDTQL(5, 2, h)
    data = _data(5, 2, N=100)
    m = StepRunner(fast, data)()
    assert torch.isfinite(m).all()
    assert fast.metric_count.item() == 1
