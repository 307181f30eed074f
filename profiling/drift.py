"""The release and ours fed the same batches and draws for thousands of steps: where do they part?

    python -m dtql_fast.profiling.drift --release-src ~/src/Diffusion_Trusted_Q_Learning \\
        --task walker2d-medium-v2 --dataset data/walker2d-sac-medium.hdf5 \\
        --pretrain-steps 500 --steps 3000 --json profiling/results/learning/walker/drift.json

One step of ours equals one step of the release to fp32 round-off (tests/test_reference.py and the
release's own code); a whole run is thousands of steps, over the whole learning-rate schedule, and
whatever the trainer does between steps. Here the release's DTQL agent (agents/dtql.py of the
checkout you pass, driven as its main.py drives it: `pretrain`, then `train` step after step) and
FastDTQL start from the same weights and take the same batches and random draws, step after step,
pretraining included, with lr_maxt = the training steps so the cosine decay runs to its end.

Training is chaotic: a round-off difference grows, so "equal" has to be measured against a floor.
The floor is the release against itself: a second release agent fed the same draws with the
batch's rows permuted (mathematically the same step, every loss a mean over rows; only the order of
the sums differs). Ours follows the release as closely as that second release does, or it does not;
`ratio` below is ours' weight difference over the floor's, per network, at every record.

The release is fed draws by wrapping three of its calls (nothing of it is copied here):
its replay buffer's `sample` returns the batch at the drawn rows; DiffusionModel.diffusion_train_step
is called with the drawn noise level and noise (its own `t_chosen=` and `noise=` arguments); the
policy's reparameterised sample is loc + scale * eps on its own Normal (what Normal.rsample computes).
The learning rates of both sides are recorded at every record, to check the schedule end to end.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from dtql_fast.draws import Draws, sample_draws
from dtql_fast.profiling.release_nets import RELEASE_NETS, ours_from_release
from dtql_fast.runlog import cpu_model
from dtql_fast.update import FastDTQL

# Release metric -> ours (train steps); the release's critic_loss is loss_v + loss_q.
METRIC_PAIRS = (("bc_loss", "loss_bc"), ("distill_loss", "loss_tr"), ("ql_loss", "loss_pq"),
                ("critic_loss", "loss_critic"))


class FedRelease:
    """The release's DTQL agent, each step fed a `Draws` (rows optionally permuted) instead of its own RNG."""

    def __init__(self, src: Path, h, S: int, A: int, max_action: float, seed: int):
        sys.path.insert(0, str(src))
        try:
            from agents.dtql import DTQL
        except ImportError as e:
            raise SystemExit(f"error: cannot import agents.dtql from --release-src {src} ({e}); pass a checkout of "
                             "the authors' release (Diffusion_Trusted_Q_Learning), and pip install einops") from None
        import gymnasium as gym
        space = gym.spaces.Box(-max_action, max_action, (A,))
        torch.manual_seed(seed)  # main.py seeds before it builds the agent
        self.agent = DTQL(device="cpu", state_dim=S, action_dim=A, action_space=space, discount=h.discount, lr=h.lr,
                          alpha=h.alpha, lr_decay=h.lr_decay, lr_maxt=h.total_steps, expectile=h.expectile,
                          sigma_data=0.5, sigma_max=80.0, sigma_min=0.002, tau=h.tau, gamma=h.gamma,
                          repeats=h.num_candidates)
        self._queue: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._batch = None
        self._eps = None
        diffusion, actor = self.agent.diffusion, self.agent.distill_actor
        train_step = diffusion.diffusion_train_step

        def fed_train_step(model, x, cond, noise=None, t_chosen=None, return_denoised=False):
            sigma, nz = self._queue.pop(0)
            return train_step(model, x, cond, noise=nz, t_chosen=sigma, return_denoised=return_denoised)

        def fed_sample(state):
            dist = actor(state)
            z = dist.loc + dist.scale * self._eps  # Normal.rsample with the drawn eps
            return (torch.tanh(z) * actor.action_scale).clamp(-actor.action_scale, actor.action_scale)

        diffusion.diffusion_train_step = fed_train_step
        actor.sample = fed_sample

    def sample(self, batch_size):  # the replay buffer's interface
        return self._batch

    def _feed(self, data, d: Draws, pretrain: bool):
        s, a, r, s2, nd = data.batch(d.idx)
        self._batch = (s, a, s2, r, nd)
        self._queue = [(d.sigma_bc[:, 0], d.noise_bc[:, 0])]
        if not pretrain:
            self._queue.append((d.sigma_tr[:, 0], d.noise_tr[:, 0]))
            self._eps = d.eps

    def step(self, data, d: Draws, pretrain: bool) -> dict | None:
        self._feed(data, d, pretrain)
        if pretrain:
            self.agent.pretrain(self, len(d.idx), 1)
            return None
        m = self.agent.train(self, len(d.idx))
        assert not self._queue, "the release drew a noise level this driver did not feed"
        return {k: v[0] for k, v in m.items()}

    def modules(self) -> dict[str, torch.nn.Module]:
        """The release's four networks (its own modules and parameter names)."""
        return {ours: getattr(self.agent, theirs) for ours, theirs in RELEASE_NETS.items()}

    def as_reference(self) -> dict[str, torch.nn.Module]:
        """Copies in dtql_fast.nets' layout: the same tensors in the same order, under our parameter names."""
        a = self.agent
        return ours_from_release({k: m.state_dict() for k, m in self.modules().items()}, a.state_dim, a.action_dim,
                                 a.distill_actor.action_scale)

    def lrs(self) -> dict[str, float]:
        a = self.agent
        return {"lr_critic": a.critic_optimizer.param_groups[0]["lr"],
                "lr_diffusion": a.bc_actor_optimizer.param_groups[0]["lr"],
                "lr_policy": a.distill_actor_optimizer.param_groups[0]["lr"]}


def permuted(d: Draws, perm: torch.Tensor) -> Draws:
    """The same step with its batch rows in another order (every per-row draw moves with its row)."""
    return Draws(*(t[perm] for t in d.tensors()))


def weights(mods: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Each network's weights as one flat float64 vector."""
    return {k: torch.cat([p.detach().double().flatten() for p in m.state_dict().values()]) for k, m in mods.items()}


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per network: |a - b| / |a| (L2 over every weight)."""
    return {k: float((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-30)) for k in a}


def run(args) -> dict:
    from dtql_fast.data import load_dataset

    torch.set_num_threads(args.threads)
    loaded = load_dataset(args.task, args.dataset, "cpu")
    data = loaded.transitions
    spe = args.steps_per_epoch
    if args.steps % spe or args.pretrain_steps % spe:
        raise SystemExit(f"error: --steps and --pretrain-steps must be multiples of --steps-per-epoch {spe}")
    h = loaded.task.hyper.replace(epochs=args.steps // spe, pretrain_epochs=args.pretrain_steps // spe,
                                  steps_per_epoch=spe)
    if args.lr_decay is not None:
        h = h.replace(lr_decay=args.lr_decay)
    S, A = data.state_dim, data.action_dim
    release = FedRelease(args.release_src, h, S, A, h.max_action, args.seed)
    floor = FedRelease(args.release_src, h, S, A, h.max_action, args.seed)  # the release against itself
    ours = FastDTQL(S, A, h, seeds=[args.seed])
    ours.load_modules(release.as_reference())
    compiled = None
    if args.compiled:  # ours again, each step through torch.compile as a run compiles it (draws fed in, not drawn)
        from dtql_fast.compiling import CompileOnFirstCall
        compiled = FastDTQL(S, A, h, seeds=[args.seed])
        compiled.load_modules(release.as_reference())
        c_steps = {True: CompileOnFirstCall(compiled.pretrain_step, torch.device("cpu")),
                   False: CompileOnFirstCall(compiled.train_step, torch.device("cpu"))}
    for k, m in floor.modules().items():
        m.load_state_dict(release.modules()[k].state_dict())
    g = torch.Generator().manual_seed(args.draw_seed)
    gp = torch.Generator().manual_seed(args.draw_seed + 1)
    records, sums, n_sum = [], {}, 0
    out = {"command": "python -m dtql_fast.profiling.drift " + " ".join(sys.argv[1:]), "task": args.task,
           "dataset": str(args.dataset), "seed": args.seed, "draw_seed": args.draw_seed,
           "pretrain_steps": args.pretrain_steps, "steps": args.steps, "hyper": h.__dict__,
           "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "records": records}
    total = args.pretrain_steps + args.steps
    t0 = time.perf_counter()
    for step in range(1, total + 1):
        pretrain = step <= args.pretrain_steps
        d = sample_draws(data.n, h.batch_size, A, 1, generator=g)
        m_rel = release.step(data, d, pretrain)
        floor.step(data, permuted(d, torch.randperm(h.batch_size, generator=gp)), pretrain)
        m_ours = (ours.pretrain_step if pretrain else ours.train_step)(data, d.as_group())
        if compiled is not None:
            c_steps[pretrain](data, d.as_group())
        if not pretrain:
            m_ours = dict(zip(("loss_v", "loss_q", "loss_bc", "loss_tr", "loss_pq"), m_ours[0, :5].tolist()))
            m_ours["loss_critic"] = m_ours["loss_v"] + m_ours["loss_q"]
            for theirs, mine in METRIC_PAIRS:
                sums.setdefault(theirs, 0.0)
                sums[theirs] += m_rel[theirs]
                sums.setdefault(mine + "_ours", 0.0)
                sums[mine + "_ours"] += m_ours[mine]
            n_sum += 1
        if step % args.record_every == 0 or step == total:
            w_rel, w_floor = weights(release.modules()), weights(floor.modules())
            w_ours = weights({k: m for k, m in ours.modules().items()})
            ours_diff, floor_diff = differences(w_rel, w_ours), differences(w_rel, w_floor)
            rec = {"step": step, "phase": "pretrain" if pretrain else "train",
                   "ours_vs_release": ours_diff, "release_vs_permuted_release": floor_diff,
                   "ratio": {k: ours_diff[k] / max(floor_diff[k], 1e-30) for k in ours_diff},
                   "lr_release": release.lrs(), "lr_ours": ours.lrs()[0]}
            if compiled is not None:
                w_c = weights(compiled.modules())
                rec["compiled_vs_release"] = differences(w_rel, w_c)
                rec["compiled_vs_eager"] = differences(w_ours, w_c)
                rec["ratio_compiled"] = {k: rec["compiled_vs_release"][k] / max(floor_diff[k], 1e-30) for k in ours_diff}
                rec["lr_compiled"] = compiled.lrs()[0]
            if n_sum:
                rec["release"] = {k: sums[k] / n_sum for k, _ in METRIC_PAIRS}
                rec["ours"] = {mine: sums[mine + "_ours"] / n_sum for _, mine in METRIC_PAIRS}
                sums, n_sum = {}, 0
            records.append(rec)
            if args.json:  # at every record: a run stopped half way keeps what it measured
                _write(args.json, out)
            worst = max(rec["ratio"].values())
            print(f"step {step:6d} ({rec['phase']}): ours vs release {max(ours_diff.values()):.2e}, "
                  f"release vs itself permuted {max(floor_diff.values()):.2e}, worst ratio {worst:.2f}, "
                  + (f"compiled vs release {max(rec['compiled_vs_release'].values()):.2e}, compiled vs eager "
                     f"{max(rec['compiled_vs_eager'].values()):.2e}, " if compiled is not None else "") +
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    out["max_lr_gap"] = max(abs(r["lr_release"][k] - r[side][k]) for r in records for side in ("lr_ours", "lr_compiled")
                            if side in r for k in r[side])
    if args.json:
        _write(args.json, out)
    return out


def _write(path: Path, obj: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def plot(result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["records"]
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for k in RELEASE_NETS:
        line, = axes[0].semilogy(steps, [r["ours_vs_release"][k] for r in recs], label=f"{k}: ours vs release")
        axes[0].semilogy(steps, [r["release_vs_permuted_release"][k] for r in recs], ls=":", color=line.get_color(),
                         label=f"{k}: release vs itself, rows permuted")
        if "compiled_vs_release" in recs[0]:
            axes[0].semilogy(steps, [r["compiled_vs_release"][k] for r in recs], ls="--", color=line.get_color(),
                             label=f"{k}: ours compiled vs release")
    axes[0].axvline(result["pretrain_steps"], color="k", lw=0.5)
    axes[0].set_xlabel("step (pretraining first)")
    axes[0].set_ylabel("|w - w_release| / |w_release|")
    axes[0].legend(fontsize=7)
    train = [r for r in recs if "release" in r]
    for theirs, mine in METRIC_PAIRS[:3]:
        line, = axes[1].plot([r["step"] for r in train], [r["release"][theirs] for r in train], label=f"release {theirs}")
        axes[1].plot([r["step"] for r in train], [r["ours"][mine] for r in train], ls="--", color=line.get_color(),
                     label=f"ours {mine}")
    axes[1].set_yscale("symlog")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{result['task']}: same weights, batches and draws ({result['cpu']}, {result['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dtql_fast.profiling.drift", description=__doc__.split("\n\n")[0])
    p.add_argument("--release-src", type=Path, required=True, help="a checkout of the authors' release")
    p.add_argument("--task", default="walker2d-medium-v2")
    p.add_argument("--dataset", required=True, help="D4RL-format HDF5 (python -m dtql_fast.behaviour rollout)")
    p.add_argument("--seed", type=int, default=0, help="the initial weights (the release's seeding)")
    p.add_argument("--draw-seed", type=int, default=1234, help="the batches and draws fed to both")
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--steps", type=int, default=3000, help="training steps (the cosine decay's horizon)")
    p.add_argument("--steps-per-epoch", type=int, default=100)
    p.add_argument("--lr-decay", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                   help="override the task's lr_decay (true/false)")
    p.add_argument("--record-every", type=int, default=100)
    p.add_argument("--compiled", action="store_true",
                   help="also ours through torch.compile (as `train --compile` runs it), fed the same draws")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    a = p.parse_args(argv)
    for name in ("steps", "pretrain_steps", "record_every", "steps_per_epoch", "threads"):
        if getattr(a, name) < (0 if name == "pretrain_steps" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    res = run(a)
    if a.plot:
        plot(res, a.plot)
    print(f"largest learning-rate gap between the two sides over the run: {res['max_lr_gap']:.3g}")


if __name__ == "__main__":
    main()
