"""acting.act, the acting rule at the critic's cost, against ReferenceDTQL.act on the same draws.

Tolerances are measured in each test, never fixed: the reference in float64 (exact_reference._copy) gives
the exact candidates, scores and softmax CDF; the fp32 reference's distance from them is the round-off
floor (no lower than one fp32 ulp of the largest value), and the new rule may be FLOOR_FACTOR floors away.

Picks: a state's pick is the category whose CDF interval holds u. Where u lies within the CDF's round-off
(FLOOR_FACTOR x the fp32 reference's CDF floor) of a category boundary, the fp32 reference itself could pick
either side: such a tie may flip. Every other state must pick the same candidate. The tests assert both, and
that ties are rare (at most 1% of the states), so the comparison covers nearly all of them; at these shapes
none of 4,096 states was a tie and no pick flipped, eager or compiled (torch 2.13, Intel Xeon, one thread).
"""
import json
import statistics

import pytest
import torch

from dtql_fast import acting, compiling
from dtql_fast.profiling import act_bench
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.tasks import DEFAULT_HYPER
from dtql_fast.update import FastDTQL
from exact_reference import FLOOR_FACTOR, _copy

F32_EPS = torch.finfo(torch.float32).eps


def _agents(S, A, hidden, R, seeds, max_action=1.0):
    """One ReferenceDTQL per seed (target critic and policy moved off their initial weights, so the target
    differs from the online critic and the candidates spread), and a FastDTQL group holding the same weights."""
    h = DEFAULT_HYPER.replace(hidden=hidden, num_candidates=R, max_action=max_action)
    refs = []
    for seed in seeds:
        torch.manual_seed(seed)
        ref = ReferenceDTQL(S, A, h)
        with torch.no_grad():
            for p in ref.critic_target.parameters():
                p.add_(0.3 * torch.randn_like(p))
            for p in ref.policy.parameters():
                p.add_(0.1 * torch.randn_like(p))
        refs.append(ref)
    fast = FastDTQL(S, A, h, seeds=list(seeds))
    fast.load_modules([r.modules() for r in refs])
    return refs, fast


def _draws(N, E, R, S, A, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(N, E, S, generator=g), torch.randn(N, E, R, A, generator=g),
            torch.rand(N, E, generator=g))


@torch.no_grad()
def _reference_scores(ref, states, eps):
    """ReferenceDTQL.act's candidates (E, R, A) and target q_min (E, R), as it computes them."""
    E, R, A = eps.shape
    s_rep = states.repeat_interleave(R, dim=0)
    cand = ref.policy.sample(s_rep, eps.reshape(E * R, A))
    return cand.reshape(E, R, A), ref.critic_target.q_min(s_rep, cand).reshape(E, R)


def _cdf(q):
    return torch.softmax(q, dim=-1).cumsum(dim=-1)


def _dist(a, b):
    return (a.double() - b.double()).abs().max().item()


def _floor(fp32, exact):
    return max(_dist(fp32, exact), F32_EPS * exact.abs().max().item())


def _picks(actions, cand):
    """The index of each state's action among its candidates (actions are copies of one candidate)."""
    same = (actions[:, None, :] == cand).all(dim=-1)
    assert same.any(dim=-1).all(), "an action that is none of its state's candidates"
    return same.float().argmax(dim=-1)


def _check_agent(ref, cand, q, actions, states, eps, u):
    """One agent's candidates, scores and picks from the rule under test against the reference on the same
    draws; returns the number of states whose u is a round-off tie and the candidates' floor."""
    c32, q32 = _reference_scores(ref, states, eps)
    c64, q64 = _reference_scores(_copy(ref, torch.float64), states.double(), eps.double())
    floors = {}
    for name, got, fp32, exact in (("candidates", cand, c32, c64), ("q", q, q32, q64)):
        floor = floors[name] = _floor(fp32, exact)
        assert _dist(got, exact) <= FLOOR_FACTOR * floor, \
            f"{name}: {_dist(got, exact):.3g} from float64, the fp32 reference {floor:.3g}"
    cdf64 = _cdf(q64)
    band = FLOOR_FACTOR * _floor(_cdf(q32), cdf64)
    # a tie: u within the CDF's round-off of a boundary the pick depends on (the last category takes the rest)
    tie = ((u.double()[:, None] - cdf64[:, :-1]).abs() <= band).any(dim=-1)
    want = _picks(ref.act(states, eps, u), c32)
    got = _picks(actions, cand)
    unexplained = (got != want) & ~tie
    assert not unexplained.any(), f"picks differ, not at a round-off tie: {unexplained.nonzero()[:, 0].tolist()}"
    return int(tie.sum()), floors["candidates"]


def _rule(fast, compiled):
    """(candidates, q, actions) from acting's pieces on the agents' packed weights, as FastDTQL.act calls them."""
    h = fast.hyper

    def fn(states, eps, u):
        with torch.no_grad():
            cand = acting.candidates(fast.pp, states, eps, h.max_action)
            q = acting.q_min(fast.tp, states, cand, h.hidden)
            return cand, q, acting.draw(cand, q, u)
    return compiling.CompileOnFirstCall(fn, fast.device) if compiled else fn


def _act(fast, compiled):
    """acting.act exactly as FastDTQL.act is to call it."""
    fn = lambda s, e, u: acting.act(fast.pp, fast.tp, s, e, u, fast.hyper.hidden, fast.hyper.max_action)  # noqa: E731
    return compiling.CompileOnFirstCall(fn, fast.device) if compiled else fn


COMPILED = [False, pytest.param(True, marks=pytest.mark.slow)]  # a compile each: seconds, not milliseconds


@pytest.mark.parametrize("compiled", COMPILED, ids=["eager", "compiled"])
@pytest.mark.parametrize("seeds", [[0], [3, 1, 2]], ids=["N1", "N3"])
def test_candidates_scores_and_picks_match_the_reference(seeds, compiled):
    S, A, H, R, E = 17, 6, 64, 128, 24
    refs, fast = _agents(S, A, H, R, seeds)
    states, eps, u = _draws(len(seeds), E, R, S, A)
    cand, q, actions = _rule(fast, compiled)(states, eps, u)
    N = len(seeds)
    assert cand.shape == (N, E, R, A) and q.shape == (N, E, R) and actions.shape == (N, E, A)
    acted = _act(fast, compiled)(states, eps, u)  # act itself, as FastDTQL.act is to call it
    for i, ref in enumerate(refs):
        ties, floor = _check_agent(ref, cand[i], q[i], actions[i], states[i], eps[i], u[i])
        assert ties <= 0.01 * E
        # the same picks as the pieces above (another pick: O(1) away), each within round-off of the reference
        assert _dist(acted[i], actions[i]) <= 2 * FLOOR_FACTOR * floor


@pytest.mark.parametrize("compiled", COMPILED, ids=["eager", "compiled"])
def test_same_picks_on_thousands_of_states(compiled):
    S, A, H, R, E = 17, 6, 32, 32, 4096   # small networks and R: the float64 reference on 131,072 rows
    (ref,), fast = _agents(S, A, H, R, [0])
    states, eps, u = _draws(1, E, R, S, A, seed=2)
    cand, q, actions = _rule(fast, compiled)(states, eps, u)
    ties, _ = _check_agent(ref, cand[0], q[0], actions[0], states[0], eps[0], u[0])
    assert ties <= 0.01 * E, f"{ties} of {E} states are round-off ties: too few checked"


@pytest.mark.parametrize("seeds, compiled", [([0], False), ([0, 1], False),
                                             pytest.param([0, 1], True, marks=pytest.mark.slow)],
                         ids=["N1-eager", "N2-eager", "N2-compiled"])
def test_same_actions_as_the_rule_on_copies(seeds, compiled):
    """At walker2d's shapes (hidden 256, R 1,024): acting.act against FastDTQL.act (while it runs the old
    rule; once it calls acting.act, this checks that wiring) and against the old rule kept in the bench:
    the same picks, each action within round-off of the reference."""
    S, A, H, R, E = 17, 6, 256, 1024, 5
    refs, fast = _agents(S, A, H, R, seeds)
    states, eps, u = _draws(len(seeds), E, R, S, A, seed=3)
    new = _act(fast, compiled)(states, eps, u)
    old = act_bench.old_act(fast.pp, fast.tp, states, eps, u, H, fast.hyper.max_action)
    agent = fast.act(states, eps, u)
    for i, ref in enumerate(refs):
        c32, _ = _reference_scores(ref, states[i], eps[i])
        c64, _ = _reference_scores(_copy(ref, torch.float64), states[i].double(), eps[i].double())
        tol = 2 * FLOOR_FACTOR * _floor(c32, c64)  # two actions each within FLOOR_FACTOR floors of float64
        for name, other in (("FastDTQL.act", agent[i]), ("the old rule", old[i])):
            # another pick would be another candidate: O(1) away, not round-off
            assert _dist(new[i], other) <= tol, f"agent {i}: {_dist(new[i], other):.3g} from {name} (tol {tol:.3g})"


AWKWARD = {  # S, A, hidden, R, E, seeds, max_action
    "E1-R1": (17, 6, 8, 1, 1, [0], 1.0),              # one state, one candidate: the draw has nothing to choose
    "odd": (5, 1, 7, 3, 5, [4], 2.5),                 # width(S+A) 8 holds the bias row and one padding row
    "group-odd": (3, 2, 9, 17, 3, [0, 5, 2], 1.0),    # a group; width(S+A) 8 has two padding rows
    "antmaze-R1024": (29, 8, 16, 1024, 3, [1, 2], 1.0),  # antmaze's widths, R 1,024: eager, a block per state
}


@pytest.mark.parametrize("shape, compiled", [(k, False) for k in AWKWARD]
                         + [pytest.param(k, True, marks=pytest.mark.slow) for k in ("E1-R1", "group-odd")],
                         ids=[f"{k}-eager" for k in AWKWARD] + ["E1-R1-compiled", "group-odd-compiled"])
def test_awkward_shapes(shape, compiled):
    S, A, H, R, E, seeds, max_action = AWKWARD[shape]
    refs, fast = _agents(S, A, H, R, seeds, max_action)
    states, eps, u = _draws(len(seeds), E, R, S, A, seed=4)
    cand, q, actions = _rule(fast, compiled)(states, eps, u)
    for i, ref in enumerate(refs):
        ties, _ = _check_agent(ref, cand[i], q[i], actions[i], states[i], eps[i], u[i])
        assert ties == 0  # a handful of states: any tie would leave the picks unchecked
    assert actions.abs().max() <= max_action


def test_eager_blocks_of_any_size_give_the_scores(monkeypatch):
    """The eager critic runs EAGER_ROWS candidate rows at a time: blocks of one state, of four, or all states
    in one block each score every candidate within round-off of the reference."""
    S, A, H, R, E = 11, 3, 32, 64, 9
    refs, fast = _agents(S, A, H, R, [0, 1])
    states, eps, _ = _draws(2, E, R, S, A, seed=5)
    cand = acting.candidates(fast.pp, states, eps, 1.0)
    for rows in (1, 4 * 2 * R, 10 ** 9):   # one state, four states (2 agents x R rows each), all of them
        monkeypatch.setattr(acting, "EAGER_ROWS", rows)
        q = acting.q_min(fast.tp, states, cand, H)
        for i, ref in enumerate(refs):
            q32 = _reference_scores(ref, states[i], eps[i])[1]
            q64 = _reference_scores(_copy(ref, torch.float64), states[i].double(), eps[i].double())[1]
            assert _dist(q[i], q64) <= FLOOR_FACTOR * _floor(q32, q64), (rows, i)


@pytest.mark.slow
def test_act_bench_runs_tiny_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "act.json"
    argv = ["--tasks", "walker2d", "--threads", "1", "--modes", "eager,compile", "--states", "2", "--hidden", "16",
            "--candidates", "8", "--blocks", "2", "--block", "2", "--json", str(out)]
    assert act_bench.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["command"] == "python -m dtql_fast.profiling.act_bench " + " ".join(argv)
    assert res["cpu"] and res["date"] and res["torch"] == torch.__version__
    assert [(m["rows"][0]["mode"], [r["rule"] for r in m["rows"]]) for m in res["measurements"]] == \
        [("eager", ["old", "new"]), ("compile", ["old", "new"])]
    S, A, H, R, W = 17, 6, 16, 8, 20  # walker2d's widths; W = width(H)
    policy = 2 * (20 * H + 2 * W * H + W * 2 * A)   # width(S) = 20
    flops = {"old": R * policy + 2 * R * 2 * 24 * W + 2 * 2 * R * 2 * W * W + 2 * R * 2 * W,  # width(S+A) = 24
             "new": policy + 2 * 2 * S * H + 2 * R * 2 * A * H + 2 * 2 * R * 2 * W * H + 2 * R * 2 * W}
    for m in res["measurements"]:
        for r in m["rows"]:
            assert r["mflop_per_state"] == pytest.approx(flops[r["rule"]] / 1e6, rel=1e-12)
            assert len(r["call_ms"]) == 4 and r["states_per_call"] == 2 and r["threads"] == 1
            assert r["median_ms"] == statistics.median(r["call_ms"])
            assert r["median_cpu_ms"] == statistics.median(r["cpu_ms"])
            assert r["states_per_s"] == pytest.approx(2 / (r["median_ms"] / 1e3), rel=1e-9)
            assert r["states_per_cpu_s"] == pytest.approx(2 / (r["median_cpu_ms"] / 1e3), rel=1e-9)
        assert m["max_action_difference"] < 1e-5
        by = {r["rule"]: r for r in m["rows"]}
        assert m["new_over_old"] == pytest.approx(by["new"]["states_per_s"] / by["old"]["states_per_s"], rel=1e-9)
    assert "| walker2d-medium-v2 | 1 | compile | new |" in capsys.readouterr().out
