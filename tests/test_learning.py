"""profiling/learning.py: the whole-run comparison's statistics, folders and commands (the runs
themselves are opt-in, not CI: they take hours)."""
import json
import math
import statistics

import pytest
import torch

from dtql_fast.profiling import learning


def _write(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _seed_rows(scores, seed=None, bc=0.5):
    rows = []
    for i, s in enumerate(scores):
        step = 1000 * (i + 1)
        rows.append({"kind": "train", "phase": "train", "step": step, "loss_bc": bc, "loss_tr": 0.3, "loss_pq": -5.0,
                     **({} if seed is None else {"seed": seed})})
        rows.append({"kind": "eval", "step": step, "score_mean": s, **({} if seed is None else {"seed": seed})})
    return rows


def test_agreement_is_welch_within_two_standard_errors():
    a = learning._stats([50.0, 60.0, 70.0])
    b = learning._stats([52.0, 58.0, 61.0])
    assert a["se"] == pytest.approx(10.0 / math.sqrt(3))
    ag = learning.agreement(a, b)
    assert ag["diff"] == pytest.approx(60.0 - 57.0)
    assert ag["se"] == pytest.approx(math.sqrt(a["se"] ** 2 + b["se"] ** 2))
    assert ag["within_2se"]
    far = learning.agreement(learning._stats([90.0, 91.0, 92.0]), b)
    assert not far["within_2se"] and far["z"] > 2
    # one seed has no standard error: neither 'agree' nor 'differ' (not a NO, as a NaN comparison would say)
    assert learning.agreement(learning._stats([90.0]), b)["within_2se"] is None


def test_report_reads_per_seed_and_group_folders(tmp_path):
    root = tmp_path / "cmp"
    (root).mkdir()
    (root / "comparison.json").write_text(json.dumps({"task": "hopper-medium-v2", "dataset": "d.hdf5",
                                                      "seeds": [0, 1, 2], "schedule": {"epochs": 2}}))
    for s, scores in enumerate([[10, 40], [20, 50], [30, 45]]):
        _write(root / "release" / f"seed{s}", _seed_rows(scores))
    _write(root / "group-compiled", [r for s, sc in enumerate([[12, 38], [25, 52], [28, 44]])
                                     for r in _seed_rows(sc, seed=s)])
    for s in range(2):  # seed 2 of the release still running
        (root / "release" / f"seed{s}" / "summary.json").write_text("{}")
    (root / "group-compiled" / "summary.json").write_text("{}")
    table = learning.report(root, tmp_path / "out", behaviour_score=24.7)
    assert table["group-compiled"]["finished"] and not table["release"]["finished"]
    assert table["release"]["final"]["values"] == [40, 50, 45]
    assert table["release"]["best"]["mean"] == pytest.approx(45.0)
    assert table["group-compiled"]["final"]["values"] == [38, 52, 44]
    assert table["group-compiled"]["vs_release_final"]["within_2se"]
    assert (tmp_path / "out" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "out" / "table.md").read_text()
    assert "| group-compiled | 3 |" in text and "| release † | 3 |" in text and "Behaviour data: 24.7" in text
    rank = learning.rank_test([25.0, 38.5, 36.0], [25.0, 35.0, 37.5])  # each seed's mean of its (two) evaluations
    assert table["group-compiled"]["rank_last3"] == rank and f"| {rank['p']:.3f} |" in text and "rank p" in text
    steps, mean, se = learning.curves(learning.read_variant(root / "release"), "eval", "score_mean")
    assert list(steps) == [1000, 2000] and mean[1] == pytest.approx(45.0)


def test_ours_variants_are_tested_against_each_other(tmp_path):
    root = tmp_path / "cmp"
    for s, scores in enumerate([[10, 40], [20, 50], [30, 45]]):
        _write(root / "release" / f"seed{s}", _seed_rows(scores))
    _write(root / "group-compiled", [r for s, sc in enumerate([[12, 38], [25, 52], [28, 44]])
                                     for r in _seed_rows(sc, seed=s)])
    for s, scores in enumerate([[5, 10], [6, 12], [7, 9]]):
        _write(root / "single-eager" / f"seed{s}", _seed_rows(scores))
    _write(root / "single-compiled" / "seed0", _seed_rows([1, 2]))  # one seed is not a sample: left out
    out = tmp_path / "out"
    learning.report(root, out)
    between = json.loads((out / "table.json").read_text())["between_ours"]
    assert list(between) == ["single-eager vs group-compiled"]
    eager, group = [7.5, 9.0, 8.0], [25.0, 38.5, 36.0]  # each seed's mean of its (two) evaluations
    w = learning.welch(eager, group)
    assert between["single-eager vs group-compiled"]["welch"] == pytest.approx(w)
    assert between["single-eager vs group-compiled"]["rank"]["p"] == pytest.approx(0.1)  # the 3-a-side floor
    assert f"| single-eager vs group-compiled | {w['diff']:+.1f} | {w['t']:.2f} |" in (out / "table.md").read_text()
    q = between["single-eager vs group-compiled"]["paired"]  # the same seeds' weights: seed by seed as well
    assert q["seeds"] == [0, 1, 2] and q["diff"] == pytest.approx(-25.0)  # -17.5, -29.5, -28
    assert q["p_signflip"] == pytest.approx(2 / 8)  # every difference one sign: the 3-seed floor
    assert f"| 3 | -25.0 | {q['p']:.3f} | 0.250 |" in (out / "table.md").read_text()


def test_paired_is_scipys_paired_t_and_the_exact_sign_flip_test():
    from scipy import stats as st
    a = {0: 61.0, 1: 2.0, 2: 70.5, 3: 58.0, 4: 66.0, 7: 50.0}  # seed 7 ran on one side only: left out
    b = {0: 45.0, 1: 73.0, 2: 41.8, 3: 59.4, 4: 56.5, 5: 60.0}
    q = learning.paired(a, b)
    x, y = [a[s] for s in range(5)], [b[s] for s in range(5)]
    assert q["seeds"] == [0, 1, 2, 3, 4] and q["diff"] == pytest.approx(sum(x) / 5 - sum(y) / 5)
    assert q["p"] == pytest.approx(st.ttest_rel(x, y).pvalue)
    exact = st.permutation_test((x, y), lambda u, v: sum(u) - sum(v), permutation_type="samples",
                                n_resamples=10_000, alternative="two-sided")  # 32 sign patterns: all of them
    assert q["p_signflip"] == pytest.approx(exact.pvalue)
    assert learning.paired({0: 1.0}, {0: 2.0, 1: 3.0}) == {"seeds": [0], "n": 1}


def test_ours_commands_are_the_trainers():
    sched = {"epochs": 5, "pretrain_epochs": 1, "eval_every": 2, "steps_per_epoch": 100, "eval_episodes": 4}
    group = learning.ours_command("group-compiled", "hopper-medium-v2", "d.hdf5", [0, 1, 2], sched, learning.Path("o"))
    assert len(group) == 1 and group[0][group[0].index("--seeds") + 1] == "0-2" and "--compile" in group[0]
    singles = learning.ours_command("single-eager", "hopper-medium-v2", "d.hdf5", [3, 4], sched, learning.Path("o"))
    assert [c[c.index("--seed") + 1] for c in singles] == ["3", "4"] and all("--no-compile" in c for c in singles)
    assert singles[0][singles[0].index("--out") + 1] == "o/single-eager/seed3"
    for flag, value in (("--epochs", "5"), ("--eval-episodes", "4"), ("--steps-per-epoch", "100"), ("--threads", "1")):
        assert group[0][group[0].index(flag) + 1] == value


def test_welch_is_scipys_unequal_variance_test_and_states_its_power():
    from scipy import stats as st
    a, b = [50.0, 60.0, 70.0, 64.0, 58.0], [52.0, 58.0, 61.0, 49.0]
    w = learning.welch(a, b)
    ref = st.ttest_ind(a, b, equal_var=False)
    assert w["t"] == pytest.approx(ref.statistic) and w["p"] == pytest.approx(ref.pvalue)
    # mde80: the difference found 80% of the time at the 5% level; a difference that large has p near 0.05 or
    # below once observed, a much smaller one does not
    shifted = learning.welch([x + w["mde80"] - w["diff"] for x in a], b)
    assert shifted["p"] < 0.05
    assert learning.welch([x - w["diff"] + 0.1 * w["mde80"] for x in a], b)["p"] > 0.5


def test_rank_test_is_mann_whitneys_exact_test_with_its_floor():
    # 5 against 5, every value of a above every value of b: the most extreme ordering, p = 2 / C(10, 5)
    r = learning.rank_test([60.0, 61.0, 70.0, 72.0, 75.0], [10.0, 12.0, 15.0, 50.0, 55.0])
    assert r["u"] == 25.0 and r["p"] == pytest.approx(2 / 252)
    # an outlier moves Welch's p but not the ranks
    a, b = [60.0, 61.0, 70.0, 72.0, 75.0], [10.0, 62.0, 63.0, 64.0, 65.0]
    assert learning.rank_test(a, b)["p"] == learning.rank_test(a, [-1e6] + b[1:])["p"]
    # three a side cannot reach 5%: the floor is 2 / C(6, 3) = 0.1
    assert learning.rank_test([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])["p"] == pytest.approx(0.1)


def test_steadiness_separates_falling_from_walking_worse(tmp_path):
    def ev(step, scores, lengths):
        return {"kind": "eval", "step": step, "score_mean": statistics.fmean(scores), "scores": scores, "lengths": lengths}

    rows = {0: [ev(1000, [0.0, 0.0], [5, 5]),  # before from_step: left out
                ev(2000, [70.0, 10.0], [100, 20]), ev(3000, [80.0, 80.0], [100, 100])]}
    got = learning.steadiness(rows, from_step=2000, limit=100)[0]
    assert got["fell"] == 0.25 and got["episodes"] == 4 and got["at_once"] == 0.0  # 20 steps is not at once
    assert learning.steadiness({2: [ev(2000, [0.0, 0.0, 0.0, 80.0], [19, 8, 30, 100])]}, 0, 100)[2]["at_once"] == 0.5
    assert got["spread"] == pytest.approx((30.0 + 0.0) / 2) and got["full"] == pytest.approx(230 / 3)
    assert math.isnan(learning.steadiness({1: [ev(2000, [5.0, 6.0], [9, 9])]}, 0, 100)[1]["full"])
    # in the report: the second half of training from the schedule, tested against the release
    root = tmp_path / "cmp"
    (root / "release").mkdir(parents=True)
    (root / "comparison.json").write_text(json.dumps({"schedule": {"epochs": 2, "pretrain_epochs": 1,
                                                                   "steps_per_epoch": 1000}}))
    for v, fell in (("release", [0, 0, 1]), ("single-eager", [2, 2, 1])):
        for s_ in range(3):
            n = fell[s_]
            _write(root / v / f"seed{s_}", [ev(k, [50.0] * 4, [10] * n + [100] * (4 - n)) for k in (1000, 2000, 3000)])
    table = learning.report(root, tmp_path / "out")
    w = table["single-eager"]["steadiness"]["fell"]["welch"]
    assert w["diff"] == pytest.approx((5 / 12) - (1 / 12))  # from step 2000 (1 + 2 / 2 epochs): two evaluations
    assert "How steady the policies are, over the evaluations from step 2000 on" in (tmp_path / "out" / "table.md").read_text()


def test_holm_adjusts_a_family_of_p_values():
    assert learning.holm([0.01, 0.04, 0.03, None]) == [(0.01, 0.03), (0.04, 0.06), (0.03, 0.06), (None, None)]
    assert learning.holm([0.5, 0.9]) == [(0.5, 1.0), (0.9, 1.0)]  # capped at 1, and monotone


def test_per_evaluation_compares_every_step_reached_against_the_release(tmp_path):
    root = tmp_path / "cmp"
    for s, scores in enumerate([[10, 40, 44], [20, 50, 48], [30, 45, 47]]):
        _write(root / "release" / f"seed{s}", _seed_rows(scores))
    _write(root / "group-compiled", [r for s, sc in enumerate([[12, 38], [25, 52], [28, 44]])
                                     for r in _seed_rows(sc, seed=s)])  # one evaluation behind
    variants = {v: learning.read_variant(root / v) for v in ("release", "group-compiled")}
    rows = learning.per_evaluation(variants)
    # every step the release reached: the variant one evaluation behind is absent at the last, not hiding it
    assert [r["step"] for r in rows] == [1000, 2000, 3000]
    assert "group-compiled" not in rows[2]["variants"] and rows[2]["vs"] == {}
    # a variant that has not evaluated yet is left out, not allowed to empty the table
    _write(root / "single-eager" / "seed0", [r for r in _seed_rows([1.0]) if r["kind"] == "train"])
    with_empty = learning.per_evaluation({**variants, "single-eager": learning.read_variant(root / "single-eager")})
    assert [r["step"] for r in with_empty] == [1000, 2000, 3000] and "single-eager" not in with_empty[0]["variants"]
    assert rows[1]["variants"]["release"]["values"] == [40, 50, 45]
    assert rows[1]["vs"]["group-compiled"]["diff"] == pytest.approx(statistics.fmean([38, 52, 44]) - 45.0)
    table = learning.report(root, tmp_path / "out")
    assert table["release"]["last3"]["values"] == pytest.approx([94 / 3, 118 / 3, 122 / 3])
    assert table["group-compiled"]["last3"]["values"] == pytest.approx([25.0, 38.5, 36.0])
    text = (tmp_path / "out" / "table.md").read_text()
    assert "| 2000 | 45.0 ± 2.9 (n=3) |" in text and "mde80" in text
    assert "| 3000 | 46.3 ± 1.2 (n=3) | - | - |" in text  # the group has not reached it


def test_a_running_seed_is_compared_where_it_got_and_left_out_of_the_final_figures(tmp_path):
    root = tmp_path / "cmp"
    (root / "release").mkdir(parents=True)
    (root / "comparison.json").write_text(json.dumps({"schedule": {"epochs": 2, "pretrain_epochs": 1,
                                                                   "steps_per_epoch": 1000}}))
    for s, scores in enumerate([[10, 40, 44], [20, 50, 48], [30]]):  # seed 2 still running
        _write(root / "release" / f"seed{s}", _seed_rows(scores))
    for s, scores in enumerate([[12, 38, 41], [25, 52, 49]]):
        _write(root / "single-eager" / f"seed{s}", _seed_rows(scores))
    for v in ("release", "single-eager"):
        for s in range(2):
            (root / v / f"seed{s}" / "summary.json").write_text("{}")
    table = learning.report(root, tmp_path / "out")
    assert table["release"]["finished"]  # the seeds it counts finished; the running one is left out, not a dagger
    assert table["release"]["final"]["values"] == [44, 48]  # not seed 2's 30 at step 1000
    rows = learning.per_evaluation({v: learning.read_variant(root / v) for v in ("release", "single-eager")})
    assert [r["step"] for r in rows] == [1000, 2000, 3000]
    assert rows[0]["variants"]["release"]["values"] == [10, 20, 30] and rows[2]["variants"]["release"]["n"] == 2
    text = (tmp_path / "out" / "table.md").read_text()
    assert "left out of the final" in text and "release 2" in text
    assert "| release | 2 |" in text and "†" not in text


FAKE_RELEASE = '''
import torch, torch.nn as nn
from torch.optim.lr_scheduler import CosineAnnealingLR

class _Critic(nn.Module):
    def __init__(self, S, A):
        super().__init__(); self.q = nn.Linear(S + A, 1); self.vn = nn.Linear(S, 1)
    def q_min(self, s, a): return self.q(torch.cat([s, a], -1))
    def v(self, s): return self.vn(s)

class DTQL:
    """The release's interface, a few layers deep: its draws come from the global RNG, as the release's."""
    def __init__(self, device, state_dim, action_dim, action_space, lr_decay=False, lr_maxt=1, repeats=4, **kw):
        S, A = state_dim, action_dim
        self.critic, self.bc_actor, self.distill_actor = _Critic(S, A), nn.Linear(S + A, A), nn.Linear(S, A)
        self.critic_target, self.bc_actor_target, self.distill_actor_target = _Critic(S, A), nn.Linear(S + A, A), nn.Linear(S, A)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters())
        self.bc_actor_optimizer = torch.optim.Adam(self.bc_actor.parameters())
        self.distill_actor_optimizer = torch.optim.Adam(self.distill_actor.parameters())
        if lr_decay:
            self.critic_lr_scheduler = CosineAnnealingLR(self.critic_optimizer, T_max=lr_maxt)
        self.step, self.A = 0, A
    def q_v_critic_loss(self, s, a, s2, r, nd):
        return ((self.critic.q_min(s, a) - r) ** 2).mean() + (self.critic.v(s) ** 2).mean()
    def _bc(self, s, a):
        noise = torch.randn_like(a)
        return ((self.bc_actor(torch.cat([s, a + noise], -1)) - a) ** 2).mean()
    def pretrain(self, buf, batch_size, steps):
        for _ in range(steps):
            s, a, s2, r, nd = buf.sample(batch_size)
            loss = self._bc(s, a); self.bc_actor_optimizer.zero_grad(); loss.backward(); self.bc_actor_optimizer.step()
            self.bc_loss = loss
            c = self.q_v_critic_loss(s, a, s2, r, nd); self.critic_optimizer.zero_grad(); c.backward(); self.critic_optimizer.step()
    def train(self, buf, batch_size):
        s, a, s2, r, nd = buf.sample(batch_size)
        c = self.q_v_critic_loss(s, a, s2, r, nd); self.critic_optimizer.zero_grad(); c.backward(); self.critic_optimizer.step()
        bc = self._bc(s, a); self.bc_actor_optimizer.zero_grad(); bc.backward(); self.bc_actor_optimizer.step()
        pi = torch.tanh(self.distill_actor(s) + torch.randn(len(s), self.A))
        q = -self.critic.q_min(s, pi).mean(); self.distill_actor_optimizer.zero_grad(); q.backward()
        self.distill_actor_optimizer.step()
        self.step += 1
        if hasattr(self, "critic_lr_scheduler"):
            self.critic_lr_scheduler.step()
        return {"bc_loss": [bc.item()], "distill_loss": [0.0], "ql_loss": [q.item()], "critic_loss": [c.item()],
                "actor_loss": [q.item()]}
    def sample_action(self, state):
        s = torch.as_tensor(state, dtype=torch.float32)[None]
        return torch.tanh(self.distill_actor(s) + 0.1 * torch.randn(1, self.A))[0].detach().numpy()
'''


def test_a_release_seed_resumes_bit_for_bit(tmp_path, monkeypatch):
    """An interrupted release seed continues from its checkpoint: the same rows as one run straight through."""
    from dtql_fast.profiling import gpu_check
    import dtql_fast.evaluate as ev

    src = tmp_path / "release"
    (src / "agents").mkdir(parents=True)
    (src / "agents" / "__init__.py").write_text("")
    (src / "agents" / "dtql.py").write_text(FAKE_RELEASE)
    data = str(gpu_check.write_d4rl(tmp_path / "d.hdf5", 11, 3, rows=500))
    over = {"epochs": 4, "pretrain_epochs": 1, "eval_every": 1, "steps_per_epoch": 10, "lr_decay": True}
    monkeypatch.syspath_prepend(str(src))
    learning.run_release(src, "hopper-medium-v2", data, 3, over, tmp_path / "straight", episodes=1, log_every=5)
    real, calls = ev.evaluate, []

    def stop_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "evaluate", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        learning.run_release(src, "hopper-medium-v2", data, 3, over, tmp_path / "resumed", episodes=1, log_every=5)
    monkeypatch.setattr(ev, "evaluate", real)
    assert not (tmp_path / "resumed" / "summary.json").exists()
    learning.run_release(src, "hopper-medium-v2", data, 3, over, tmp_path / "resumed", episodes=1, log_every=5)

    def rows(folder):
        out = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        for r in out:
            for k in ("steps_per_s", "wall_s"):
                r.pop(k, None)
        return out

    straight, resumed = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert len([r for r in straight if r["kind"] == "eval"]) == 4
    assert resumed == straight
    from dtql_fast.data import load_dataset  # the run names the data it read, by content
    config = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert config["fingerprint"] == load_dataset("hopper-medium-v2", data, "cpu").fingerprint


def test_release_networks_map_by_position():
    """The release's tensors land in our networks in order, whatever their names, and back."""
    from types import SimpleNamespace

    from dtql_fast.nets import Critic, DiffusionNet, GaussianPolicy
    from dtql_fast.profiling.release_nets import RELEASE_NETS, load_into_release, ours_from_release

    S, A = 11, 3
    shells = {"diffusion": DiffusionNet(S, A, 256), "critic": Critic(S, A, 256), "critic_target": Critic(S, A, 256),
              "policy": GaussianPolicy(S, A, 256, 1.0)}
    theirs = {k: {f"their_{i}": torch.randn_like(t) for i, t in enumerate(m.state_dict().values())}
              for k, m in shells.items()}
    ours = ours_from_release(theirs, S, A, 1.0)
    for k in shells:
        assert all(torch.equal(a, b) for a, b in zip(ours[k].state_dict().values(), theirs[k].values())), k
    release = SimpleNamespace(bc_actor=DiffusionNet(S, A, 256), critic=Critic(S, A, 256),
                              critic_target=Critic(S, A, 256), distill_actor=GaussianPolicy(S, A, 256, 1.0))
    load_into_release(release, {k: m.state_dict() for k, m in ours.items()})
    for k in shells:
        got = getattr(release, RELEASE_NETS[k]).state_dict().values()
        assert all(torch.equal(a, b) for a, b in zip(got, theirs[k].values())), k


def test_release_ours_init_starts_where_ours_starts_and_draws_as_the_release(tmp_path):
    """release-ours-init: the release's networks (and its EMA copies) hold the weights ours' trainer starts the
    seed from, a group's agent included, and the global RNG the release draws from is where it was."""
    from types import SimpleNamespace

    from dtql_fast.nets import Critic, DiffusionNet, GaussianPolicy
    from dtql_fast.profiling.release_nets import RELEASE_NETS
    from dtql_fast.tasks import get_task
    from dtql_fast.update import FastDTQL

    h = get_task("walker2d-medium-v2").hyper
    S, A, seed = 17, 6, 4
    shell = lambda: SimpleNamespace(  # noqa: E731
        bc_actor=DiffusionNet(S, A, 256), bc_actor_target=DiffusionNet(S, A, 256), critic=Critic(S, A, 256),
        critic_target=Critic(S, A, 256), distill_actor=GaussianPolicy(S, A, 256, 1.0),
        distill_actor_target=GaussianPolicy(S, A, 256, 1.0))
    release = shell()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    learning.start_from_ours(release, S, A, h, seed)
    assert torch.equal(torch.get_rng_state(), before)
    ours = FastDTQL(S, A, h, seeds=[9, seed]).modules(agent=1)  # the weights ours' trainer starts seed 4 from
    for k, name in RELEASE_NETS.items():
        got, want = getattr(release, name).state_dict().values(), ours[k].state_dict().values()
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), k
    for model, copy in (("bc_actor", "bc_actor_target"), ("distill_actor", "distill_actor_target")):
        assert all(torch.equal(a, b) for a, b in zip(getattr(release, model).state_dict().values(),
                                                     getattr(release, copy).state_dict().values())), copy
    other = shell()
    learning.start_from_ours(other, S, A, h, seed + 1)  # another seed, other weights: the test can fail
    first = lambda agent: next(iter(agent.critic.state_dict().values()))  # noqa: E731
    assert not torch.equal(first(other), first(release))


def test_probe_measures_the_networks_it_is_given():
    """probe_networks' statistics are the formulas they name, on networks built to have known answers."""
    from dtql_fast.edm import edm_loss
    from dtql_fast.reference_layout import reference_modules
    from dtql_fast.tasks import get_task

    h = get_task("walker2d-medium-v2").hyper
    S, A, B = 17, 6, 300
    torch.manual_seed(3)
    mods = reference_modules(S, A, h)
    last = mods["policy"].net[-1]
    with torch.no_grad():  # mu = 0.5 everywhere; log std -7 on half the dimensions (clamped), -1 on the rest
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.5] * A + [-7.0] * (A // 2) + [-1.0] * (A - A // 2)))
    nets = {k: m.state_dict() for k, m in mods.items()}
    s, a = torch.randn(B, S), torch.rand(B, A) * 2 - 1
    s0, a0 = s[:7], a[:7]
    got = learning.probe_networks(nets, s, a, (s0, a0), h, seed=5)
    assert got["clamped"] == pytest.approx(0.5) and got["saturated"] == 0.0
    assert got["log_std"] == pytest.approx((-7.0 * (A // 2) - 1.0 * (A - A // 2)) / A)
    assert got["q_gap"] == pytest.approx(got["q_policy"] - got["q_data"])
    assert got["q_data"] == pytest.approx(mods["critic"].q_min(s, a).mean().item(), rel=1e-6)
    g = torch.Generator().manual_seed(5)
    eps, noise = torch.randn(a.shape, generator=g), torch.randn(B, 1, A, generator=g)
    a_pi = mods["policy"].sample(s, eps)
    assert got["action_gap"] == pytest.approx((a_pi - a).abs().mean().item(), rel=1e-6)
    sigma = torch.full((B, 1), learning.PROBE_SIGMAS[1])
    with torch.no_grad():
        tr = edm_loss(mods["diffusion"], a_pi, s, sigma, noise, h.max_action).item()
        bc = edm_loss(mods["diffusion"], a, s, sigma, noise, h.max_action).item()
    assert got[f"tr@{learning.PROBE_SIGMAS[1]}"] == pytest.approx(tr, rel=1e-6)
    assert got[f"bc@{learning.PROBE_SIGMAS[1]}"] == pytest.approx(bc, rel=1e-6)
    a0_pi = mods["policy"].sample(s0, torch.randn(a0.shape, generator=g))  # drawn after the others
    assert got["start_action_gap"] == pytest.approx((a0_pi - a0).abs().mean().item(), rel=1e-6)
    with torch.no_grad():
        gap0 = (mods["critic"].q_min(s0, a0_pi) - mods["critic"].q_min(s0, a0)).mean().item()
    assert got["start_q_gap"] == pytest.approx(gap0, rel=1e-5, abs=1e-6)
    noise0, sigma0 = torch.randn(7, 1, A, generator=g), torch.full((7, 1), learning.START_SIGMA)
    with torch.no_grad():
        tr0 = edm_loss(mods["diffusion"], a0_pi, s0, sigma0, noise0, h.max_action).item()
        bc0 = edm_loss(mods["diffusion"], a0, s0, sigma0, noise0, h.max_action).item()
    assert got["start_tr"] == pytest.approx(tr0, rel=1e-6) and got["start_bc"] == pytest.approx(bc0, rel=1e-6)
    assert {k for k, _ in learning.PROBE_STATS} == set(got)


def test_episode_starts_are_the_rows_that_do_not_continue_the_previous_one():
    from dtql_fast.transitions import Transitions

    obs = torch.arange(10.0).reshape(10, 1)
    nxt = obs + 1
    nxt[3] = 99.0  # episodes time out at rows 3 and 6 (their next states are not the next rows' states)
    nxt[6] = -5.0
    not_done = torch.ones(10, 1)
    not_done[8] = 0.0  # row 8 ends in a terminal state; its next state is row 9's (the loader's D4RL rule)
    t = Transitions(obs, torch.zeros(10, 1), torch.zeros(10, 1), nxt, not_done)
    assert learning.episode_starts(t).tolist() == [0, 4, 7, 9]


def test_probe_table_compares_runs_at_the_release_final_step(tmp_path):
    stats = {k: 0.0 for k, _ in learning.PROBE_STATS}
    rel = {str(i): {**stats, "step": 45000, "q_gap": x} for i, x in enumerate([3.0, 3.2, 3.4])}
    ours = {str(i): {**stats, "step": 45000, "q_gap": x} for i, x in enumerate([2.0, 2.1, 2.3])}
    ours["9"] = {**stats, "step": 30000, "q_gap": 100.0}  # unfinished: left out
    lines = learning.probe_table({"meta": {"states": 10}, "variants": {"release": rel, "single-eager": ours}})
    row = next(line for line in lines if line.startswith("| Q(policy) - Q(data) |"))
    p = learning.welch([2.0, 2.1, 2.3], [3.0, 3.2, 3.4])["p"]
    # the smallest p of the family (the others compare equal values, p = 1): Holm multiplies it by their number
    m = len(learning.PROBE_STATS)
    assert "single-eager (n=3)" in lines[2] and f"| {p:.3f} ({min(1.0, m * p):.2f}) |" in row and "2.133 ± 0.088" in row
    assert all(line.count("|") == lines[2].count("|") for line in lines[2:])  # no title splits a row
    # per-seed and group folders: only finished runs are probed
    _write(tmp_path / "single-eager" / "seed0", _seed_rows([1.0]))
    _write(tmp_path / "single-eager" / "seed1", _seed_rows([1.0]))
    (tmp_path / "single-eager" / "seed1" / "summary.json").write_text("{}")
    assert [x[0] for x in learning._finished_seeds(tmp_path / "single-eager")] == [1]
    _write(tmp_path / "group-compiled", [r for s in (0, 4) for r in _seed_rows([1.0], seed=s)])
    assert learning._finished_seeds(tmp_path / "group-compiled") == []
    (tmp_path / "group-compiled" / "summary.json").write_text("{}")
    assert [(s, a) for s, _, a in learning._finished_seeds(tmp_path / "group-compiled")] == [(0, 0), (4, 4)]


def test_two_runs_into_one_folder_share_its_record(tmp_path):
    """The release's `run` and ours' share a folder: each adds its variants; another schedule is refused."""
    sched = {"epochs": 40, "pretrain_epochs": 5, "eval_every": 5, "steps_per_epoch": 1000, "eval_episodes": 10}
    meta = {"task": "walker2d-medium-v2", "dataset": "d.hdf5", "seeds": [0, 1], "schedule": sched}
    learning.record_comparison(tmp_path, {**meta, "variants": ["single-eager", "group-compiled"]})
    learning.record_comparison(tmp_path, {**meta, "seeds": [2], "variants": ["release"]})
    got = json.loads((tmp_path / "comparison.json").read_text())
    assert got["variants"] == ["release", "single-eager", "group-compiled"] and got["seeds"] == [0, 1, 2]
    with pytest.raises(SystemExit, match="another schedule"):
        learning.record_comparison(tmp_path, {**meta, "schedule": {**sched, "epochs": 150}, "variants": ["release"]})
    assert json.loads((tmp_path / "comparison.json").read_text()) == got
    assert [p.name for p in tmp_path.iterdir()] == ["comparison.json"]


def test_probe_reads_task_and_dataset_from_the_comparison_it_probes(tmp_path):
    with pytest.raises(SystemExit, match="give --task and --dataset"):
        learning.probe(tmp_path, tmp_path / "out")
    (tmp_path / "comparison.json").write_text(json.dumps({"task": "walker2d-medium-v2",
                                                          "dataset": str(tmp_path / "missing.hdf5")}))
    with pytest.raises(Exception, match="missing.hdf5"):  # the recorded dataset is the one it loads
        learning.probe(tmp_path, tmp_path / "out")


def test_probe_keeps_the_runs_an_earlier_probe_measured_and_refuses_other_data(tmp_path, monkeypatch):
    """A comparison finished on two machines is probed piece by piece into one probe.json: the runs the new
    root holds are measured (and replace their earlier rows), the others are kept; a probe.json of other
    data is refused and left as it was."""
    from dtql_fast.data import load_dataset
    from dtql_fast.profiling import gpu_check

    data = str(gpu_check.write_d4rl(tmp_path / "d.hdf5", 11, 3, rows=300))
    root = tmp_path / "root"
    root.mkdir()
    (root / "comparison.json").write_text(json.dumps({"task": "hopper-medium-v2", "dataset": data}))
    _write(root / "release" / "seed2", _seed_rows([1.0]))
    (root / "release" / "seed2" / "summary.json").write_text("{}")
    monkeypatch.setattr(learning, "networks_of", lambda folder, agent: (folder.name, 155000))
    monkeypatch.setattr(learning, "probe_networks", lambda nets, *a: {k: 7.0 for k, _ in learning.PROBE_STATS})
    out = tmp_path / "out"
    out.mkdir()
    meta = {"task": "hopper-medium-v2", "dataset": data, "states": 50, "sigmas": list(learning.PROBE_SIGMAS),
            "episode_starts": len(learning.episode_starts(load_dataset("hopper-medium-v2", data).transitions))}
    old = {"step": 155000, **{k: 1.0 for k, _ in learning.PROBE_STATS}}
    earlier = {"meta": meta, "variants": {"group-compiled": {"0": old}, "release": {"2": old, "0": old}}}
    (out / "probe.json").write_text(json.dumps(earlier))   # written before runs recorded fingerprints
    got = learning.probe(root, out, states=50)
    assert list(got["variants"]) == ["release", "group-compiled"] and list(got["variants"]["release"]) == ["0", "2"]
    assert got["variants"]["release"]["2"]["q_gap"] == 7.0 and got["variants"]["release"]["0"] == old
    assert got["variants"]["group-compiled"]["0"] == old
    assert got["meta"]["fingerprint"] == load_dataset("hopper-medium-v2", data).fingerprint
    assert json.loads((out / "probe.json").read_text()) == got
    before = (out / "probe.json").read_text()
    with pytest.raises(SystemExit, match="states: 50, now 60"):
        learning.probe(root, out, states=60)
    other = str(gpu_check.write_d4rl(tmp_path / "e.hdf5", 11, 3, rows=400))
    with pytest.raises(SystemExit, match="fingerprint"):
        learning.probe(root, out, dataset=other, states=50)
    assert (out / "probe.json").read_text() == before
