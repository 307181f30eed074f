"""Whole runs held against the authors' release: same data, same schedule, several seeds each.

    python -m dtql_fast.profiling.learning run --release-src ~/src/Diffusion_Trusted_Q_Learning \\
        --task hopper-medium-v2 --dataset data/hopper-sac-medium.hdf5 --seeds 0-2 \\
        --pretrain-epochs 2 --epochs 18 --eval-every 3 --out runs/learning
    python -m dtql_fast.profiling.learning probe runs/learning --task hopper-medium-v2 \\
        --dataset data/hopper-sac-medium.hdf5 --out profiling/results/learning
    python -m dtql_fast.profiling.learning report runs/learning --out profiling/results/learning

`run` trains, one after another (pin the process to a core with `taskset -c 0` and the rest of the
machine stays usable), each of the variants asked for (--variants):
- `release`: the release's own DTQL agent (agents/dtql.py of the checkout you pass; nothing of it is
  copied here) driven as its main.py drives it: its Data_Sampler's draw (torch.randint on the
  global generator), `pretrain` then `train` step after step, lr_maxt = epochs x steps per epoch,
  evaluated with its own `sample_action`, one state at a time;
- `single-eager`, `single-compiled`: `python -m dtql_fast.train --seed S` per seed;
- `group-eager`, `group-compiled`: `python -m dtql_fast.train --seeds ...`, all seeds in one step.
Every variant is evaluated on the same envs (seed S plays env seeds S*10000+1000+j, as train does)
with the same episodes, and writes a run folder like train's (metrics.jsonl, summary.json), so a
finished variant is skipped when `run` is called again.

`probe` measures every finished run's networks on the same 20,000 dataset rows: its critic's Q of its
policy's actions and of the data's, V, how far the policy's actions lie from the data's, the policy's
log std (and how much of it sits at the -5 clamp), and the EDM loss at four fixed noise levels on the
policy's actions (the trust region) and on the data's (behaviour cloning). A score is one noisy
number per evaluation; these are properties of what training made, with far less spread between seeds,
so they can place a difference that the scores only hint at. `report` tabulates them when
--out holds the probe.json.

`report` draws the normalised score (mean over seeds, band: ± one standard error) and the bc, trust
region and policy-Q losses of every variant in one figure, and tabulates final and best scores
(mean, sample std, standard error over seeds). Agreement with the release is stated per variant as
Welch's two-sample test: the difference of the final means, its standard error
sqrt(se_a^2 + se_b^2), and whether it lies within two of them. Needs the release's own dependency
`einops` (pip install "dtql_fast[release]").
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dtql_fast.edm import SIGMA_DATA
from dtql_fast.seeds import format_seeds, parse_seeds
from dtql_fast.runfolder import CHECKPOINT, CONFIG, METRICS, SUMMARY
from dtql_fast.runstatus import write_json_atomic
from dtql_fast.evaluate import env_seed  # every variant plays the envs train's evaluation plays
from dtql_fast.profiling.release_nets import RELEASE_NETS, load_into_release, ours_from_release

VARIANTS = ("release", "release-ours-init", "single-eager", "single-compiled", "group-eager", "group-compiled")
# release-ours-init: the release's trainer started from the weights ours starts the same seed from, so a seed of
# it and the same seed of ours differ in the trainer and its draws only (release and ours initialise in another
# order, so their seed s nets differ)
RELEASES = ("release", "release-ours-init")
LOSSES = (("loss_bc", "behaviour cloning"), ("loss_tr", "trust region"), ("loss_pq", "policy: -Q"),
          ("loss_critic", "critic: V + twin Q"), ("q_mean", "Q of the data's actions"), ("v_mean", "V"))
LAST = 3  # "the end of a run": the mean of each seed's last LAST evaluations (one evaluation is noisy)


# -- the release, driven as its main.py drives it ------------------------------------------------

class _ReleaseSampler:
    """The release's Data_Sampler over our loaded transitions: same fields, same draw."""

    def __init__(self, data):
        self.state, self.action, self.next_state = data.obs, data.actions, data.next_obs
        self.reward, self.not_done = data.rewards, data.not_done
        self.size = data.n

    def sample(self, batch_size):
        ind = torch.randint(0, self.size, size=(batch_size,))
        return self.state[ind], self.action[ind], self.next_state[ind], self.reward[ind], self.not_done[ind]


RELEASE_CHECKPOINT = "release-checkpoint.pt"


def _release_state(agent, step: int, metrics_bytes: int) -> dict:
    """Everything the release's loop carries from one step to the next: networks, optimisers, schedulers,
    its step counter and EMA target, and every RNG its draws come from (the global torch one: batches,
    noise, acting), so a resumed seed continues the very same run."""
    nets = ("bc_actor", "bc_actor_target", "critic", "critic_target", "distill_actor", "distill_actor_target")
    opts = ("critic_optimizer", "bc_actor_optimizer", "distill_actor_optimizer")
    scheds = [k for k in ("critic_lr_scheduler", "bc_actor_lr_scheduler", "distill_actor_lr_scheduler")
              if hasattr(agent, k)]
    return {"step": step, "metrics_bytes": metrics_bytes, "agent_step": agent.step,
            "nets": {k: getattr(agent, k).state_dict() for k in nets},
            "opts": {k: getattr(agent, k).state_dict() for k in opts},
            "scheds": {k: getattr(agent, k).state_dict() for k in scheds},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}}


def _load_release_state(agent, state: dict):
    for k, sd in state["nets"].items():
        getattr(agent, k).load_state_dict(sd)
    for group in ("opts", "scheds"):
        for k, sd in state[group].items():
            getattr(agent, k).load_state_dict(sd)
    agent.step = state["agent_step"]
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["random"])


def start_from_ours(agent, state_dim: int, action_dim: int, h, seed: int) -> None:
    """The release agent's networks (their EMA copies too) set to the weights ours starts `seed` from
    (reference_layout.initial_modules); the global RNG, which the release draws its batches and noise from, is
    left as it was."""
    from dtql_fast.reference_layout import initial_modules

    init = initial_modules(state_dim, action_dim, h, seed)
    load_into_release(agent, {k: m.state_dict() for k, m in init.items()})
    for model, copy in (("bc_actor", "bc_actor_target"), ("distill_actor", "distill_actor_target")):
        if hasattr(agent, copy):
            getattr(agent, copy).load_state_dict(getattr(agent, model).state_dict())


def _save_atomic(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def run_release(src: Path, task: str, dataset: str, seed: int, over: dict, out: Path,
                episodes: int | None = None, log_every: int = 1000, variant: str = "release") -> dict:
    """One seed of the release, as its main.py runs it; resumable: a checkpoint after pretraining and after
    every evaluation (RNG states included), and a second call continues from the last one bit for bit.
    variant="release-ours-init" starts it from the weights ours starts `seed` from (start_from_ours), its draws
    unchanged."""
    from dtql_fast.data import load_dataset
    from dtql_fast.evaluate import evaluate

    sys.path.insert(0, str(src))
    try:
        from agents.dtql import DTQL
    except ImportError as e:
        raise SystemExit(f"error: cannot import agents.dtql from --release-src {src} ({e}); pass a checkout of "
                         "the authors' release (Diffusion_Trusted_Q_Learning), and pip install einops") from None
    torch.manual_seed(seed); np.random.seed(seed); random.seed(seed)  # noqa: E702  (main.py's seeding)
    loaded = load_dataset(task, dataset, "cpu")
    h = loaded.task.hyper.replace(**over)
    data = loaded.transitions
    env = loaded.make_env()
    agent = DTQL(device="cpu", state_dim=data.state_dim, action_dim=data.action_dim, action_space=env.action_space,
                 discount=h.discount, lr=h.lr, alpha=h.alpha, lr_decay=h.lr_decay, lr_maxt=h.total_steps,
                 expectile=h.expectile, sigma_data=0.5, sigma_max=80.0, sigma_min=0.002, tau=h.tau, gamma=h.gamma,
                 repeats=h.num_candidates)
    env.close()
    if variant == "release-ours-init":
        start_from_ours(agent, data.state_dim, data.action_dim, h, seed)
    # Q of the data's actions and V on the batch the critic trains on, as ours logs them (q_mean, v_mean):
    # extra forward passes of a critic without randomness, so the release's draws are untouched.
    probe = {"q": 0.0, "v": 0.0, "n": 0}
    critic_loss = agent.q_v_critic_loss

    def probed_critic_loss(state, action, next_state, reward, not_done):
        with torch.no_grad():
            probe["q"] += agent.critic.q_min(state, action).mean().item()
            probe["v"] += agent.critic.v(state).mean().item()
            probe["n"] += 1
        return critic_loss(state, action, next_state, reward, not_done)

    agent.q_v_critic_loss = probed_critic_loss
    sampler = _ReleaseSampler(data)
    out.mkdir(parents=True, exist_ok=True)
    spe = h.steps_per_epoch
    pre_total = h.pretrain_epochs * spe
    done, wall_before = 0, 0.0
    ckpt_path = out / RELEASE_CHECKPOINT
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _load_release_state(agent, state)
        done, wall_before = state["step"], state.get("wall_s", 0.0)
        with open(out / METRICS, "r+b") as f:  # rows written after the checkpoint are written again
            f.truncate(state["metrics_bytes"])
        print(f"{variant} seed {seed}: resumed at step {done} of {pre_total + h.total_steps}", flush=True)
    else:
        (out / METRICS).write_text("")
    (out / CONFIG).write_text(json.dumps({"variant": variant, "src": str(src), "task": task,
                                          "dataset": dataset, "fingerprint": loaded.fingerprint, "seed": seed,
                                          "hyper": h.__dict__}, indent=2))
    log = open(out / METRICS, "a")
    t0 = time.perf_counter() - wall_before

    def write(row):
        log.write(json.dumps(row) + "\n")
        log.flush()

    def checkpoint(step):
        state = _release_state(agent, step, log.tell())
        state["wall_s"] = time.perf_counter() - t0
        _save_atomic(state, ckpt_path)

    def act_fn(states):  # the release's own acting rule, one state at a time
        return torch.as_tensor(np.stack([agent.sample_action(s.numpy()) for s in states]), dtype=torch.float32)

    for start in range(done, pre_total, log_every):
        n = min(log_every, pre_total - start)
        agent.pretrain(sampler, h.batch_size, n)
        write({"kind": "train", "phase": "pretrain", "step": start + n, "loss_bc": agent.bc_loss.item(),
               "q_mean": probe["q"] / max(probe["n"], 1), "v_mean": probe["v"] / max(probe["n"], 1)})
        probe.update(q=0.0, v=0.0, n=0)
    if done < pre_total:
        checkpoint(pre_total)
    sums, last = {}, None
    first = max(done - pre_total, 0) + 1
    t_train = time.perf_counter()
    for i in range(first, h.total_steps + 1):
        m = agent.train(sampler, batch_size=h.batch_size)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v[0]
        if i % log_every == 0 or i == h.total_steps:
            n = log_every if i % log_every == 0 else i % log_every
            write({"kind": "train", "phase": "train", "step": pre_total + i, "loss_bc": sums["bc_loss"] / n,
                   "loss_tr": sums["distill_loss"] / n, "loss_pq": sums["ql_loss"] / n,
                   "loss_critic": sums["critic_loss"] / n, "loss_policy": sums["actor_loss"] / n,
                   "q_mean": probe["q"] / max(probe["n"], 1), "v_mean": probe["v"] / max(probe["n"], 1),
                   "lr": agent.distill_actor_optimizer.param_groups[0]["lr"],
                   "steps_per_s": (i - first + 1) / (time.perf_counter() - t_train)})
            sums = {}
            probe.update(q=0.0, v=0.0, n=0)
        if i % spe == 0 and ((i // spe) % h.eval_every == 0 or i == h.total_steps):
            res = evaluate(act_fn, loaded.make_env, episodes or loaded.task.eval_episodes, seed=env_seed(seed),
                           task=loaded.task)
            last = {"kind": "eval", "step": pre_total + i, "epoch": i // spe, **res}
            write(last)
            print(f"{variant} seed {seed} step {pre_total + i}: score {res['score_mean']}", flush=True)
            checkpoint(pre_total + i)
    log.close()
    if last is None:  # resumed after the final evaluation
        last = [json.loads(r) for r in open(out / METRICS) if '"eval"' in r][-1]
    summary = {"variant": variant, "seed": seed, "steps": pre_total + h.total_steps,
               "score_mean": last["score_mean"], "wall_s": time.perf_counter() - t0}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


# -- the evaluator swap: which side's networks, which side's acting rule --------------------------

def networks_of(folder: Path, seed: int | None = None) -> tuple[dict[str, dict], int]:
    """(our-layout state dicts of the four networks, step) of a release seed's folder (its resume checkpoint)
    or one of ours (checkpoint.pt; a group's agent by `seed`). The release's tensors are ours in the same
    order under other names (dtql_fast/nets.py mirrors its layers), so they are mapped by position."""
    from dtql_fast.checkpoint import agent_state, load_latest

    if (folder / RELEASE_CHECKPOINT).exists():
        state = torch.load(folder / RELEASE_CHECKPOINT, map_location="cpu", weights_only=False)
        cfg = json.loads((folder / CONFIG).read_text())
        S, A = state["nets"]["critic"]["v_model.0.weight"].shape[1], state["nets"]["bc_actor"]["layers.layers.7.weight"].shape[0]
        nets = ours_from_release({k: state["nets"][RELEASE_NETS[k]] for k in RELEASE_NETS}, S, A,
                                 cfg["hyper"]["max_action"])
        return {k: m.state_dict() for k, m in nets.items()}, state["step"]
    latest = load_latest(folder, map_location="cpu")
    st = agent_state(latest.ckpt)
    i = 0 if seed is None else st["seeds"].index(seed)
    return {k: v[i] for k, v in st["modules"].items()}, latest.ckpt["step"]


def swap(src: Path, folders: list[Path], task: str, dataset: str, episodes: int, seed: int | None) -> list[dict]:
    """Every folder's networks scored twice on the same envs: by our acting rule (ReferenceDTQL.act, which
    FastDTQL.act equals; candidates drawn from evaluation's generator) and by the release's own
    `sample_action` loop (one state at a time, the global RNG). A difference between two folders that
    persists under both rules lies in training; one that appears under one rule only lies in evaluation."""
    from dtql_fast.data import load_dataset
    from dtql_fast.evaluate import evaluate, make_act_fn
    from dtql_fast.reference import ReferenceDTQL

    sys.path.insert(0, str(src))
    from agents.dtql import DTQL

    loaded = load_dataset(task, dataset, "cpu")
    h, S, A = loaded.task.hyper, loaded.transitions.state_dim, loaded.transitions.action_dim
    env = loaded.make_env()
    space = env.action_space
    env.close()
    rows = []
    for folder in folders:
        nets, step = networks_of(folder, seed)
        ours = ReferenceDTQL(S, A, h)
        for k, m in ours.modules().items():
            m.load_state_dict(nets[k])
        theirs = DTQL(device="cpu", state_dim=S, action_dim=A, action_space=space, repeats=h.num_candidates)
        load_into_release(theirs, {k: m.state_dict() for k, m in ours.modules().items()})
        s = seed if seed is not None else json.loads((folder / CONFIG).read_text()).get("seed", 0)
        ours_act = make_act_fn(ours.act, A, h.num_candidates, generator=torch.Generator().manual_seed(s))
        torch.manual_seed(s)
        theirs_act = lambda states: torch.as_tensor(  # noqa: E731
            np.stack([theirs.sample_action(x.numpy()) for x in states]), dtype=torch.float32)
        row = {"folder": str(folder), "step": step, "env_seed": env_seed(s)}
        for rule, fn in (("our_rule", ours_act), ("release_rule", theirs_act)):
            res = evaluate(fn, loaded.make_env, episodes, seed=env_seed(s), task=loaded.task)
            row[rule] = {k: res[k] for k in ("score_mean", "score_std", "return_mean", "lengths")}
        print(f"{folder} (step {step}): our rule {row['our_rule']['score_mean']:.1f} "
              f"± {row['our_rule']['score_std']:.1f}, the release's {row['release_rule']['score_mean']:.1f} "
              f"± {row['release_rule']['score_std']:.1f}", flush=True)
        rows.append(row)
    return rows


# -- the networks probed: what each side's training made, measured where scores are too noisy --------

# Noise levels of the trust-region and behaviour-cloning probes, fine to coarse (the training draws
# sigma around sigma_data = 0.5, log-logistic).
PROBE_SIGMAS = (0.01, 0.1, 0.5, 2.0)
START_SIGMA = SIGMA_DATA  # at the episode starts one noise level: sigma_data, where the training's draw centres
PROBE_STATES = 20_000
# What probe_networks reports, in the order the report tabulates it.
PROBE_STATS = (("q_policy", "Q of the policy's action (own critic)"), ("q_data", "Q of the data's action"),
               ("q_gap", "Q(policy) - Q(data)"), ("v", "V"), ("action_gap", "mean abs(policy action - data action)"),
               ("log_std", "policy log std before its clamp"), ("clamped", "share of log stds under -5 (clamped)"),
               ("saturated", "share of abs(tanh(mu)) > 0.99")) + tuple(
    (f"tr@{s}", f"trust region at sigma {s}") for s in PROBE_SIGMAS) + tuple(
    (f"bc@{s}", f"behaviour cloning at sigma {s}") for s in PROBE_SIGMAS) + (
    ("start_q_gap", "Q(policy) - Q(data) at the data's episode starts"),
    ("start_action_gap", "mean abs(policy action - data action) at the data's episode starts"),
    ("start_tr", f"trust region at sigma {START_SIGMA} at the data's episode starts"),
    ("start_bc", f"behaviour cloning at sigma {START_SIGMA} at the data's episode starts"))


def episode_starts(t) -> torch.Tensor:
    """Rows of a Transitions that begin an episode: the first row, every row after a terminal one, and every row
    whose state is not the previous row's next state (after a time-out, whose row the loader drops; a terminal
    row's next state is the next row's state, as in D4RL's qlearning_dataset, so it needs its own rule). Few (one
    per episode, about 300 of walker's 200k), so the data constrains the policy there least; a walker that falls
    at once from its start state acts wrongly there (issue #34)."""
    cont = (t.obs[1:] == t.next_obs[:-1]).all(dim=1) & (t.not_done[:-1, 0] > 0)
    return torch.cat([torch.tensor([0]), torch.nonzero(~cont).flatten() + 1])


def probe_networks(nets: dict[str, dict], s: torch.Tensor, a: torch.Tensor,
                   starts: tuple[torch.Tensor, torch.Tensor], hyper, seed: int = 0) -> dict:
    """One run's networks on fixed dataset rows (s, a): its critic's view of its policy against the data,
    the policy's spread, and the EDM losses at fixed noise levels (the trust region on the policy's own
    actions, behaviour cloning on the data's), with noise drawn from `seed`, so every run is probed alike;
    and at the data's episode starts (`starts`: their states and actions) the critic's view and the policy's
    distance from the data there."""
    from dtql_fast.edm import edm_loss
    from dtql_fast.nets import LOG_STD_MIN
    from dtql_fast.reference_layout import reference_modules

    mods = reference_modules(s.shape[1], a.shape[1], hyper)
    for k, m in mods.items():
        m.load_state_dict(nets[k])
    pol, critic, diffusion = mods["policy"], mods["critic"], mods["diffusion"]
    g = torch.Generator().manual_seed(seed)
    eps, noise = torch.randn(a.shape, generator=g), torch.randn(a.shape[0], 1, a.shape[1], generator=g)
    with torch.no_grad():
        mu, log_std = pol.net(s).chunk(2, dim=-1)
        a_pi = pol.sample(s, eps)
        q_pi, q_data = critic.q_min(s, a_pi).mean().item(), critic.q_min(s, a).mean().item()
        out = {"q_policy": q_pi, "q_data": q_data, "q_gap": q_pi - q_data, "v": critic.value(s).mean().item(),
               "action_gap": (a_pi - a).abs().mean().item(), "log_std": log_std.mean().item(),
               "clamped": (log_std < LOG_STD_MIN).float().mean().item(),
               "saturated": (torch.tanh(mu).abs() > 0.99).float().mean().item()}
        for sig in PROBE_SIGMAS:
            sigma = torch.full((a.shape[0], 1), sig)
            out[f"tr@{sig}"] = edm_loss(diffusion, a_pi, s, sigma, noise, hyper.max_action).item()
            out[f"bc@{sig}"] = edm_loss(diffusion, a, s, sigma, noise, hyper.max_action).item()
        s0, a0 = starts
        a0_pi = pol.sample(s0, torch.randn(a0.shape, generator=g))
        out["start_q_gap"] = (critic.q_min(s0, a0_pi) - critic.q_min(s0, a0)).mean().item()
        out["start_action_gap"] = (a0_pi - a0).abs().mean().item()
        noise0, sigma0 = torch.randn(a0.shape[0], 1, a0.shape[1], generator=g), torch.full((a0.shape[0], 1), START_SIGMA)
        out["start_tr"] = edm_loss(diffusion, a0_pi, s0, sigma0, noise0, hyper.max_action).item()
        out["start_bc"] = edm_loss(diffusion, a0, s0, sigma0, noise0, hyper.max_action).item()
    return out


def _finished_seeds(folder: Path) -> list[tuple[int, Path, int | None]]:
    """(seed, folder to load, group agent) of each finished run of a variant's folder."""
    if (folder / METRICS).exists():  # a group
        if not (folder / SUMMARY).exists():
            return []
        return [(s, folder, s) for s in sorted(read_variant(folder))]
    return [(int(sub.name[4:]), sub, None) for sub in sorted(folder.glob("seed*")) if (sub / SUMMARY).exists()]


def probe(root: Path, out: Path, task: str | None = None, dataset: str | None = None,
          states: int = PROBE_STATES) -> dict:
    """probe_networks on every finished run under root (each variant, each seed) on the same dataset rows;
    writes out/probe.json, which `report` tabulates against the release. Task and dataset: root's
    comparison.json (what `run` trained on) unless given. Runs an earlier probe.json in `out` holds and root
    does not are kept (a comparison whose runs finished on different machines is probed piece by piece);
    one probed on other data or rows is refused before anything is written."""
    from dtql_fast.data import load_dataset

    meta = json.loads((root / "comparison.json").read_text()) if (root / "comparison.json").exists() else {}
    task, dataset = task or meta.get("task"), dataset or meta.get("dataset")
    if not task or not dataset:
        raise SystemExit(f"error: {root} has no comparison.json naming the runs' task and dataset; "
                         "give --task and --dataset")
    loaded = load_dataset(task, dataset, "cpu")
    d = loaded.transitions
    rows = torch.randint(0, d.n, (states,), generator=torch.Generator().manual_seed(0))
    s, a = d.obs[rows], d.actions[rows]
    first = episode_starts(d)
    starts = (d.obs[first], d.actions[first])
    result = {"meta": {"task": task, "dataset": dataset, "fingerprint": loaded.fingerprint, "states": states,
                       "sigmas": list(PROBE_SIGMAS), "episode_starts": len(first)},
              "variants": {}}
    earlier = _earlier_probe(out / "probe.json", result["meta"])
    for v in VARIANTS:
        for seed, folder, agent in _finished_seeds(root / v) if (root / v).is_dir() else []:
            nets, step = networks_of(folder, agent)
            stats = {"step": step, **probe_networks(nets, s, a, starts, loaded.task.hyper)}
            result["variants"].setdefault(v, {})[str(seed)] = stats
            print(f"{v} seed {seed} (step {step}): " + ", ".join(f"{k} {stats[k]:.4g}" for k, _ in PROBE_STATS[:6]),
                  flush=True)
    kept = 0
    for v, runs in earlier.items():
        for seed, stats in runs.items():
            if seed not in result["variants"].get(v, {}):
                result["variants"].setdefault(v, {})[seed] = stats
                kept += 1
    if kept:
        print(f"kept {kept} run(s) of the earlier {out / 'probe.json'} that {root} does not hold", flush=True)
    result["variants"] = {v: dict(sorted(result["variants"][v].items(), key=lambda kv: int(kv[0])))
                          for v in VARIANTS if v in result["variants"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    return result


def _earlier_probe(path: Path, meta: dict) -> dict:
    """The runs of an earlier probe.json, if it probed the same rows of the same data: the same task, rows,
    noise levels and episode starts, and the same dataset fingerprint (the same path where it recorded
    none). Anything else is refused, so that one table never mixes two datasets."""
    if not path.exists():
        return {}
    try:
        before = json.loads(path.read_text())
        old, runs = before["meta"], before["variants"]
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} is not a probe.json `probe` wrote ({e}); move it aside or give another "
                         "--out") from None
    same = ["task", "states", "sigmas", "episode_starts"]
    same.append("fingerprint" if old.get("fingerprint") and meta.get("fingerprint") else "dataset")
    differ = [k for k in same if old.get(k) != meta.get(k)]
    if differ:
        what = ", ".join(f"{k}: {old.get(k)!r}, now {meta.get(k)!r}" for k in differ)
        raise SystemExit(f"error: {path} probed other data or rows ({what}); give another --out, or move it aside "
                         "to probe afresh")
    return runs


def probe_table(result: dict, reference: str = "release") -> list[str]:
    """Markdown: every probe statistic, each variant's mean ± se over its seeds and Welch's p against
    `reference`; only runs probed at the reference's final step count."""
    variants = result["variants"]
    if reference not in variants or len(variants) < 2:
        return []
    step = max(r["step"] for r in variants[reference].values())
    vals = {v: [r for r in runs.values() if r["step"] == step] for v, runs in variants.items()}
    others = [v for v in vals if v != reference and vals[v]]
    lines = [f"Networks at step {step}, probed on {result['meta']['states']} dataset rows (`probe`): mean ± se over "
             f"seeds; p: Welch's test against the release, and in brackets Holm's adjustment over the {len(PROBE_STATS)} "
             "statistics (when nothing differs, about one test in twenty falls under 0.05 by chance).", "",
             f"| statistic | {reference} (n={len(vals[reference])}) | "
             + " | ".join(f"{v} (n={len(vals[v])}) | p" for v in others) + " |",
             "|---|---|" + "---|---|" * len(others)]

    def cell(xs):
        return _mean_se(_stats(xs), "{:.4g}", "{:.2g}")

    ps = {v: holm([welch([r[k] for r in vals[v]], [r[k] for r in vals[reference]]).get("p") for k, _ in PROBE_STATS])
          for v in others}
    for i, (key, title) in enumerate(PROBE_STATS):
        ref = [r[key] for r in vals[reference]]
        cells = [f"{cell([r[key] for r in vals[v]])} | "
                 + (f"{ps[v][i][0]:.3f} ({ps[v][i][1]:.2f})" if ps[v][i][0] is not None else "-") for v in others]
        lines.append(f"| {title} | {cell(ref)} | " + " | ".join(cells) + " |")
    return lines


def holm(ps: list[float | None]) -> list[tuple[float | None, float | None]]:
    """(p, Holm-adjusted p) for each of a family of tests (None: not tested): the i-th smallest of m p values is
    multiplied by m - i, made monotone and capped at 1, which holds the chance of any false finding at 5%."""
    tested = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    out: list[tuple[float | None, float | None]] = [(None, None)] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        out[i] = (p, running)
    return out


# -- ours, through the trainer's own command ------------------------------------------------------

def ours_command(variant: str, task: str, dataset: str, seeds: list[int], sched: dict, out: Path) -> list[list[str]]:
    """The train commands of a variant: one per seed (single-*) or one for the group (group-*)."""
    base = [sys.executable, "-m", "dtql_fast.train", "--task", task, "--dataset", dataset, "--threads", "1",
            "--epochs", str(sched["epochs"]), "--pretrain-epochs", str(sched["pretrain_epochs"]),
            "--eval-every", str(sched["eval_every"]), "--steps-per-epoch", str(sched["steps_per_epoch"]),
            "--log-every", str(min(1000, sched["steps_per_epoch"]))]
    if sched.get("eval_episodes"):
        base += ["--eval-episodes", str(sched["eval_episodes"])]
    base.append("--compile" if variant.endswith("compiled") else "--no-compile")
    if variant.startswith("group"):
        return [base + ["--seeds", format_seeds(seeds), "--out", str(out / variant)]]
    return [base + ["--seed", str(s), "--out", str(out / variant / f"seed{s}")] for s in seeds]


def record_comparison(out: Path, meta: dict) -> None:
    """out/comparison.json: what every variant under `out` was run with. Two `run` processes share a folder (the
    release on one core, ours on the other), so each adds its variants to what is there, and writes the whole
    file at once (a rename); a folder holding another task, dataset or schedule is refused, since its runs
    could not be compared with these."""
    path = out / "comparison.json"
    if path.exists():
        old = json.loads(path.read_text())
        differ = [k for k in ("task", "dataset", "schedule") if old.get(k) != meta[k]]
        if differ:
            raise SystemExit(f"error: {out} holds runs with another {', '.join(differ)} ({path}); "
                             "give --out a folder of its own")
        meta = {**meta, "seeds": sorted(set(old.get("seeds", [])) | set(meta["seeds"])),
                "variants": [v for v in VARIANTS if v in set(old.get("variants", [])) | set(meta["variants"])]}
    write_json_atomic(path, meta)


def run(args) -> None:
    seeds = list(parse_seeds(args.seeds))
    sched = {"epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs, "eval_every": args.eval_every,
             "steps_per_epoch": args.steps_per_epoch, "eval_episodes": args.eval_episodes}
    args.out.mkdir(parents=True, exist_ok=True)
    record_comparison(args.out, {"task": args.task, "dataset": args.dataset, "seeds": seeds, "schedule": sched,
                                 "variants": args.variants})
    for variant in args.variants:
        if variant in RELEASES:
            for s in seeds:
                folder = args.out / variant / f"seed{s}"
                if (folder / SUMMARY).exists():
                    print(f"{variant} seed {s}: done already ({folder})")
                    continue
                over = {k: sched[k] for k in ("epochs", "pretrain_epochs", "eval_every", "steps_per_epoch")}
                run_release(args.release_src, args.task, args.dataset, s, over, folder, sched["eval_episodes"],
                            log_every=min(1000, args.steps_per_epoch), variant=variant)
            continue
        for cmd in ours_command(variant, args.task, args.dataset, seeds, sched, args.out):
            folder = Path(cmd[cmd.index("--out") + 1])
            if (folder / SUMMARY).exists():
                print(f"{variant}: done already ({folder})")
                continue
            if (folder / CHECKPOINT).exists():  # interrupted: continue it (the same numbers as a straight run)
                cmd = cmd[:cmd.index("--task")] + ["--resume", str(folder), "--threads", "1"]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


# -- the report --------------------------------------------------------------------------------

def _rows(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in open(folder / METRICS) if line.strip()]
    for r in rows:  # ours logs the critic's two terms, the release their sum
        if "loss_critic" not in r and r.get("loss_v") is not None and r.get("loss_q") is not None:
            r["loss_critic"] = r["loss_v"] + r["loss_q"]
    return rows


def read_variant(folder: Path) -> dict[int, list[dict]]:
    """seed -> that seed's metric rows, from a variant's folder (one run folder per seed, or a group's)."""
    per_seed: dict[int, list[dict]] = {}
    if (folder / METRICS).exists():  # a group: rows carry their seed
        for r in _rows(folder):
            per_seed.setdefault(r["seed"], []).append(r)
        return per_seed
    for sub in sorted(folder.glob("seed*")):
        if (sub / METRICS).exists():
            per_seed[int(sub.name[4:])] = _rows(sub)
    return per_seed


def _stats(xs: list[float]) -> dict:
    n = len(xs)
    mean = statistics.fmean(xs)
    std = statistics.stdev(xs) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "se": std / math.sqrt(n) if n > 1 else float("nan"), "values": xs}


def _mean_se(st: dict, fmt: str = "{:.1f}", se_fmt: str | None = None) -> str:
    """A table cell from _stats: mean ± se over seeds, or the mean alone where one seed gives no standard error."""
    return fmt.format(st["mean"]) + (f" ± {(se_fmt or fmt).format(st['se'])}" if st["n"] > 1 else "")


def _scores(rows: list[dict]) -> list[float]:
    return [r["score_mean"] for r in rows if r["kind"] == "eval" and r.get("score_mean") is not None]


def last3_by_seed(per_seed: dict[int, list[dict]]) -> dict[int, float]:
    """Each seed's mean over its last LAST evaluations, by seed (the figure every test here compares)."""
    return {seed: statistics.fmean(ev[-LAST:]) for seed, rows in per_seed.items() if (ev := _scores(rows))}


def summarise(per_seed: dict[int, list[dict]]) -> dict:
    finals, bests, lasts = [], [], []
    for rows in per_seed.values():
        ev = _scores(rows)
        if ev:
            finals.append(ev[-1])
            bests.append(max(ev))
            lasts.append(statistics.fmean(ev[-LAST:]))
    if not finals:
        return {}
    return {"final": _stats(finals), "best": _stats(bests), "last3": _stats(lasts), "seeds": sorted(per_seed)}


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's two-sample t-test of mean(a) - mean(b), and what it can detect: `mde` is the difference
    it finds at the 5% level 80% of the time with these sample sizes and spreads (normal samples)."""
    from scipy import stats as st
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return {"diff": statistics.fmean(a) - statistics.fmean(b), "n": [na, nb]}
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    se = math.sqrt(va + vb)
    diff = statistics.fmean(a) - statistics.fmean(b)
    df = (va + vb) ** 2 / ((va ** 2 / (na - 1) if va else 0.0) + (vb ** 2 / (nb - 1) if vb else 0.0) or 1e-300)
    t = diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0
    p = float(2 * st.t.sf(abs(t), df)) if se > 0 else (0.0 if diff else 1.0)
    mde = float((st.t.ppf(0.975, df) + st.t.ppf(0.8, df)) * se)
    return {"diff": diff, "se": se, "t": t, "df": df, "p": p, "mde80": mde, "n": [na, nb]}


def rank_test(a: list[float], b: list[float]) -> dict:
    """Mann-Whitney's exact two-sided test of a against b: assumes nothing about the scores' shape, which for a
    walker seed is two-humped (it walks at 60-75 or falls below 20), where Welch's normal approximation is
    doubtful with five seeds. Its floor: with 5 against 5 the smallest p it can give is 2/252 = 0.008, with 3
    against 3 it is 0.1, so three seeds a side can never reach 5% with it."""
    from scipy import stats as st
    if len(a) < 2 or len(b) < 2:  # as for Welch: one run is not a sample
        return {}
    r = st.mannwhitneyu(a, b, alternative="two-sided", method="exact")
    return {"u": float(r.statistic), "p": float(r.pvalue), "n": [len(a), len(b)]}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b seed by seed, for two variants that start each seed from the same weights (ours' variants and
    release-ours-init do): the mean difference, its paired t-test, and the exact sign-flip p (under no
    difference every assignment of signs to the per-seed differences is equally likely; assumes nothing about
    their shape). Pairing gains power only as far as a seed's initial weights decide its score; it loses the
    seeds only one side ran."""
    from scipy import stats as st
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    if n < 2:
        return {"seeds": seeds, "n": n}
    diff, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(n)
    t = diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0
    p = float(2 * st.t.sf(abs(t), n - 1)) if se > 0 else (0.0 if diff else 1.0)
    total = abs(sum(d))
    flips = [abs(sum(x if (mask >> i) & 1 else -x for i, x in enumerate(d))) for mask in range(2 ** n)]
    p_flip = sum(f >= total - 1e-9 * max(1.0, total) for f in flips) / 2 ** n  # 2^n: n is a few seeds
    return {"seeds": seeds, "n": n, "diff": diff, "se": se, "t": t, "p": p, "p_signflip": p_flip}


# An episode this short fell from its start state, before it could walk: on the walker data such episodes end
# in 7-10 steps at a return of about -1, while falls from walking take 30 steps or more (every walker run of
# #34, 45k and 150-epoch schedules).
AT_ONCE = 20
STEADINESS = (("fell", "share of episodes that ended before the env's step limit (fell)", "{:.2f}"),
              ("at_once", f"share of episodes that fell within {AT_ONCE} steps (at once, from the start state)", "{:.2f}"),
              ("spread", "spread of episode scores within an evaluation (std)", "{:.1f}"),
              ("full", "score of the episodes that ran to the limit", "{:.1f}"))


def steadiness(per_seed: dict[int, list[dict]], from_step: int, limit: int) -> dict[int, dict]:
    """Per seed, over its evaluations at `from_step` or later: how often an episode ended before the env's step
    limit (a walker that fell) and how often within AT_ONCE steps (at once), the std of episode scores within one
    evaluation (averaged over evaluations), and the mean score of the episodes that ran to the limit. A seed's
    final score mixes these; they say whether a lower score is a policy that falls more often or one that walks
    worse."""
    out = {}
    for seed, rows in per_seed.items():
        ev = [r for r in rows if r["kind"] == "eval" and r["step"] >= from_step and r.get("lengths") and r.get("scores")]
        if not ev:
            continue
        lengths = [n for r in ev for n in r["lengths"]]
        full = [x for r in ev for x, n in zip(r["scores"], r["lengths"]) if n >= limit]
        out[seed] = {"fell": sum(n < limit for n in lengths) / len(lengths),
                     "at_once": sum(n < AT_ONCE for n in lengths) / len(lengths),
                     "spread": statistics.fmean(statistics.pstdev(r["scores"]) if len(r["scores"]) > 1 else 0.0
                                                for r in ev),
                     "full": statistics.fmean(full) if full else float("nan"), "episodes": len(lengths)}
    return out


def _step_limit(task: str | None, rows: list[dict]) -> int:
    """The env's step limit (gymnasium's registry for the task's env), else the longest episode seen."""
    from dtql_fast.tasks import step_limit

    return step_limit(task) or max((n for r in rows if r.get("lengths") for n in r["lengths"]), default=0)


def complete(per_seed: dict[int, list[dict]], final_step: int | None = None) -> dict[int, list[dict]]:
    """The seeds whose evaluations reached `final_step` (default: the furthest any of them reached): a seed
    still running would put an early evaluation among the final ones."""
    last = {s: max((r["step"] for r in rows if r["kind"] == "eval"), default=-1) for s, rows in per_seed.items()}
    target = final_step if final_step is not None else max(last.values(), default=-1)
    return {s: rows for s, rows in per_seed.items() if last[s] >= target >= 0}


def per_evaluation(variants: dict[str, dict[int, list[dict]]], reference: str = "release") -> list[dict]:
    """At every evaluation step any variant reached, the variants that reached it (with the seeds that reached
    it, so n may differ from step to step while seeds are running): each one's mean and standard error over its
    seeds, and Welch's test against `reference` where the reference reached that step too."""
    scores = {v: {} for v in variants}
    for v, d in variants.items():
        for rows in d.values():
            for r in rows:
                if r["kind"] == "eval" and r.get("score_mean") is not None:
                    scores[v].setdefault(r["step"], []).append(r["score_mean"])
    # every step any variant reached with at least one seed (a seed still running counts where it got); at each,
    # the variants that reached it, so a variant behind the others neither hides their later steps nor empties
    # the table
    out = []
    for step in sorted(set().union(*(scores[v] for v in variants))):
        row = {"step": step, "variants": {v: _stats(scores[v][step]) for v in variants if step in scores[v]}}
        if reference in variants:
            row["vs"] = ({v: welch(scores[v][step], scores[reference][step]) for v in row["variants"] if v != reference}
                         if reference in row["variants"] else {})
        out.append(row)
    return out


def agreement(a: dict, b: dict) -> dict:
    """Welch: the difference of means against its standard error; 'agree' when within 2 SE (None when a side
    has one seed, so no standard error)."""
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
    if math.isnan(se):
        return {"diff": diff, "se": se, "z": float("nan"), "within_2se": None}
    return {"diff": diff, "se": se, "z": diff / se if se > 0 else float("inf"), "within_2se": abs(diff) <= 2 * se}


def curves(per_seed: dict[int, list[dict]], kind: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, standard error) of `key` over the seeds, at the steps every seed logged."""
    by_step: dict[int, list[float]] = {}
    for rows in per_seed.values():
        for r in rows:
            if r["kind"] == kind and r.get(key) is not None and (kind == "eval" or r.get("phase") == "train"):
                by_step.setdefault(r["step"], []).append(r[key])
    n = len(per_seed)
    steps = sorted(s for s, v in by_step.items() if len(v) == n)
    mean = np.array([np.mean(by_step[s]) for s in steps])
    se = np.array([np.std(by_step[s], ddof=1) / math.sqrt(n) if n > 1 else 0.0 for s in steps])
    return np.array(steps), mean, se


def _test_cells(w: dict, r: dict) -> str:
    """A table row's last cells for one comparison: diff | t | df | p | mde80 (welch) | rank p ('-' where a side
    had one seed)."""
    return ((f"{w['diff']:+.1f} | {w['t']:.2f} | {w['df']:.1f} | {w['p']:.3f} | {w['mde80']:.1f} |"
             if "p" in w else f"{w['diff']:+.1f} | - | - | - | - |")
            + (f" {r['p']:.3f} |" if "p" in r else " - |"))


def report(root: Path, out: Path, behaviour_score: float | None = None) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = json.loads((root / "comparison.json").read_text()) if (root / "comparison.json").exists() else {}
    variants = {v: read_variant(root / v) for v in VARIANTS if (root / v).is_dir()}
    variants = {v: d for v, d in variants.items() if d}
    sched = meta.get("schedule") or {}
    final_step = ((sched["pretrain_epochs"] + sched["epochs"]) * sched["steps_per_epoch"]
                  if all(sched.get(k) for k in ("epochs", "pretrain_epochs", "steps_per_epoch")) else None)
    done = {v: complete(d, final_step) for v, d in variants.items()}
    partial = {v: sorted(set(d) - set(done[v])) for v, d in variants.items() if set(d) - set(done[v])}
    table = {v: summarise(d) for v, d in done.items()}
    for v, t in table.items():
        if t:  # every seed counted here wrote its summary.json (a group: the group's)
            t["finished"] = set(done[v]) <= {seed for seed, _, _ in _finished_seeds(root / v)}
    if "release" in table and table["release"]:
        for v, t in table.items():
            if v != "release" and t:
                t["vs_release_final"] = agreement(t["final"], table["release"]["final"])
                t["vs_release_best"] = agreement(t["best"], table["release"]["best"])
                t["welch_last3"] = welch(t["last3"]["values"], table["release"]["last3"]["values"])
                t["rank_last3"] = rank_test(t["last3"]["values"], table["release"]["last3"]["values"])
    # every other variant against each other (the compiled path against the eager one; the release started from
    # ours' initial weights against ours): the same two tests on the same per-seed figures, so "the compiled path
    # learns what the eager path learns" is a statistic too
    beside = [v for v, t in table.items() if v != "release" and t and t["last3"]["n"] > 1]
    by_seed = {v: last3_by_seed(done[v]) for v in beside}
    between = {f"{a} vs {b}": {"welch": welch(table[a]["last3"]["values"], table[b]["last3"]["values"]),
                               "rank": rank_test(table[a]["last3"]["values"], table[b]["last3"]["values"]),
                               "paired": paired(by_seed[a], by_seed[b])}
               for i, a in enumerate(beside) for b in beside[i + 1:]}
    evals = per_evaluation(variants)
    # steadiness over the second half of training (the first evaluations are of a policy still forming)
    half = (sched["pretrain_epochs"] + sched["epochs"] / 2) * sched["steps_per_epoch"] if final_step else 0
    limit = _step_limit(meta.get("task"), [r for d in done.values() for rows in d.values() for r in rows])
    steady = {v: steadiness(d, half, limit) for v, d in done.items()}
    if steady.get("release"):
        for v, st_v in steady.items():
            if v != "release" and len(st_v) > 1 and table.get(v):
                table[v]["steadiness"] = {}
                for k, _, _ in STEADINESS:  # a seed none of whose episodes ran to the limit has no 'full' score
                    a, b = ([x[k] for x in d.values() if not math.isnan(x[k])] for d in (st_v, steady["release"]))
                    table[v]["steadiness"][k] = ({"welch": welch(a, b), "rank": rank_test(a, b)}
                                                 if len(a) > 1 and len(b) > 1 else {})
    out.mkdir(parents=True, exist_ok=True)
    panels = [("eval", "score_mean", "normalised score")] + [("train", k, t) for k, t in LOSSES]
    cols = 4
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(5 * cols, 4 * -(-len(panels) // cols)))
    axes = axes.flatten()
    for ax in axes[len(panels):]:
        ax.axis("off")
    for v, d in done.items():  # curves of the seeds that finished (a band over a changing set of seeds would jump)
        for ax, (kind, key, title) in zip(axes, panels):
            x, m, se = curves(d, kind, key)
            if len(x):
                ax.plot(x, m, label=f"{v} (n={len(d)})")
                ax.fill_between(x, m - se, m + se, alpha=0.2)
            ax.set_title(title)
            ax.set_xlabel("step (pretraining included)")
    if behaviour_score is not None:
        axes[0].axhline(behaviour_score, color="k", ls=":", label="behaviour data")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    lines = [f"# Whole runs: {meta.get('task', '?')} on {meta.get('dataset', '?')}", "",
             f"Schedule: {meta.get('schedule')}; seeds {meta.get('seeds')}." +
             (f" Behaviour data: {behaviour_score:.1f}." if behaviour_score is not None else ""), "",
             "| variant | seeds | final score mean ± std (± se) | best-of-run mean ± std (± se) | final vs release: diff ± se, within 2 se |",
             "|---|---|---|---|---|"]

    def spread(x):  # mean ± std (± se), or the mean alone for one seed
        return f"{x['mean']:.1f}" + (f" ± {x['std']:.1f} (± {x['se']:.1f})" if x["n"] > 1 else "")

    for v, t in table.items():
        if not t:
            continue
        f, b = t["final"], t["best"]
        vs = t.get("vs_release_final")
        vs_txt = ("-" if not vs else f"{vs['diff']:+.1f}, - (one seed: no se)" if vs["within_2se"] is None
                  else f"{vs['diff']:+.1f} ± {vs['se']:.1f}, {'yes' if vs['within_2se'] else 'NO'}")
        mark = "" if t["finished"] else " †"
        lines.append(f"| {v}{mark} | {f['n']} | {spread(f)} | {spread(b)} | {vs_txt} |")
    if not all(t.get("finished", True) for t in table.values()):
        lines += ["", "† not finished: its latest evaluation counts as final."]
    if partial:
        lines += ["", "Seeds still running, left out of the final, best and last-three figures (they are in the "
                  "per-evaluation table up to where they got): "
                  + "; ".join(f"{v} {', '.join(map(str, ss))}" for v, ss in partial.items()) + "."]
    welched = {v: t["welch_last3"] for v, t in table.items() if t and "welch_last3" in t}
    if welched:
        lines += ["", f"Each seed's mean over its last {LAST} evaluations, against the release (Welch's t-test; "
                  "mde80: the difference this test detects at the 5% level with 80% probability, given these "
                  "seeds' spreads; a smaller difference can hide here; rank p: Mann-Whitney's exact test, which assumes no "
                  "shape of the scores):", "",
                  "| variant | mean ± se | release mean ± se | diff | t | df | p | mde80 | rank p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        rel = table["release"]["last3"]
        for v, w in welched.items():
            m, r = table[v]["last3"], table[v].get("rank_last3") or {}
            lines.append(f"| {v} | " + " | ".join(_mean_se(x) + ("" if x["n"] > 1 else " (one seed)") for x in (m, rel))
                         + " | " + _test_cells(w, r))
    if between:
        lines += ["", f"The variants beside the release against each other, each seed's mean over its last {LAST} "
                  "evaluations (Welch's test, then Mann-Whitney's exact rank p); they start each seed from the same "
                  "weights, so also seed by seed (paired: the seeds both ran, the mean difference, paired t's p, the "
                  "exact sign-flip p):", "",
                  "| comparison | diff | t | df | p | mde80 | rank p | paired seeds | paired diff | paired p | "
                  "sign-flip p |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, c in between.items():
            q = c["paired"]
            lines.append(f"| {name} | " + _test_cells(c["welch"], c["rank"])
                         + (f" {q['n']} | {q['diff']:+.1f} | {q['p']:.3f} | {q['p_signflip']:.3f} |" if "p" in q
                            else f" {q['n']} | - | - | - |"))
    if evals and "vs" in evals[0]:
        others = [v for v in variants if v != "release" and any(v in e["variants"] for e in evals)]  # evaluated
        lines += ["", "At every evaluation: mean ± se over seeds (n: the seeds that reached it); for each variant, "
                  "Welch's p against the release.", "",
                  "| step | release |" + "".join(f" {v} | p |" for v in others),
                  "|---|---|" + "---|---|" * len(others)]

        def cell(st):
            if st is None:
                return "-"
            return f"{st['mean']:.1f} ± {st['se']:.1f} (n={st['n']})" if st["n"] > 1 else f"{st['mean']:.1f} (n=1)"

        for e in evals:
            cells = [cell(e["variants"].get(v)) + " | "
                     + (f"{e['vs'][v]['p']:.3f}" if "p" in e["vs"].get(v, {}) else "-") for v in others]
            lines.append(f"| {e['step']} | {cell(e['variants'].get('release'))} |" + "".join(f" {c} |" for c in cells))
    if any(steady.values()):
        shown = [v for v in steady if steady[v]]
        lines += ["", f"How steady the policies are, over the evaluations from step {half:.0f} on (the second half of "
                  f"training; an episode 'fell' when it ended before the env's {limit} steps): mean ± se over seeds, "
                  "each seed's value over all its episodes there; p: Welch's test against the release, then "
                  "Mann-Whitney's exact rank p.", "",
                  "| measure | " + " | ".join(f"{v} (n={len(steady[v])})" + (" | p | rank p" if v != "release" else "")
                                           for v in shown) + " |",
                  "|---|" + "".join("---|" + ("---|---|" if v != "release" else "") for v in shown)]
        for k, title, fmt in STEADINESS:
            cells = []
            for v in shown:
                xs = [x[k] for x in steady[v].values() if not math.isnan(x[k])]
                st_ = _stats(xs) if xs else None
                cell = _mean_se(st_, fmt) if st_ else "-"
                if v != "release":
                    t = (table.get(v) or {}).get("steadiness", {}).get(k, {})
                    cell += " | " + (f"{t['welch']['p']:.3f}" if "p" in t.get("welch", {}) else "-")
                    cell += " | " + (f"{t['rank']['p']:.3f}" if "p" in t.get("rank", {}) else "-")
                cells.append(cell)
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if (out / "probe.json").exists():
        lines += [""] + probe_table(json.loads((out / "probe.json").read_text()))
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps({"meta": meta, "behaviour_score": behaviour_score, "variants": table,
                                                "between_ours": between, "per_evaluation": evals, "steadiness": steady}, indent=2, default=float))
    print(text)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dtql_fast.profiling.learning", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train every variant on the same data and schedule")
    r.add_argument("--release-src", type=Path, help="a checkout of the authors' release (needed by --variants release)")
    r.add_argument("--task", default="hopper-medium-v2")
    r.add_argument("--dataset", required=True, help="D4RL-format HDF5 (python -m dtql_fast.behaviour rollout)")
    r.add_argument("--seeds", default="0-2")
    r.add_argument("--variants", default="release,group-compiled",
                   type=lambda s: [v for v in s.split(",") if v],
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    r.add_argument("--pretrain-epochs", type=int, default=2)
    r.add_argument("--epochs", type=int, default=18)
    r.add_argument("--eval-every", type=int, default=3)
    r.add_argument("--steps-per-epoch", type=int, default=1000)
    r.add_argument("--eval-episodes", type=int)
    r.add_argument("--out", type=Path, required=True)
    w = sub.add_parser("swap", help="score run folders' networks under both acting rules (ours, the release's)")
    w.add_argument("folders", type=Path, nargs="+", help="release seed folders (release/seedS) or run folders of ours")
    w.add_argument("--release-src", type=Path, required=True)
    w.add_argument("--task", default="walker2d-medium-v2")
    w.add_argument("--dataset", required=True)
    w.add_argument("--episodes", type=int, default=10)
    w.add_argument("--seed", type=int, help="a group folder's agent (default: the folder's own seed)")
    w.add_argument("--json", type=Path)
    b = sub.add_parser("probe", help="every finished run's networks measured on the same dataset rows "
                       "(its critic's view of its policy, the policy's spread, EDM losses at fixed noise levels)")
    b.add_argument("root", type=Path)
    b.add_argument("--task", help="default: the task in ROOT/comparison.json (what `run` trained)")
    b.add_argument("--dataset", help="default: the dataset in ROOT/comparison.json")
    b.add_argument("--states", type=int, default=PROBE_STATES)
    b.add_argument("--out", type=Path, required=True,
                   help="where probe.json goes (report's --out, to tabulate it); runs a probe.json already there "
                   "holds and ROOT does not are kept")
    q = sub.add_parser("report", help="the figure and table of a run's folder")
    q.add_argument("root", type=Path)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--behaviour-score", type=float, help="the data's own normalised score (dataset .json)")
    a = p.parse_args(argv)
    if a.cmd == "run":
        bad = [v for v in a.variants if v not in VARIANTS]
        if bad:
            p.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
        if set(RELEASES) & set(a.variants) and a.release_src is None:
            p.error(f"--variants {','.join(v for v in a.variants if v in RELEASES)} needs --release-src PATH "
                    "(a checkout of the authors' release)")
        torch.set_num_threads(1)
        run(a)
    elif a.cmd == "swap":
        torch.set_num_threads(1)
        rows = swap(a.release_src, a.folders, a.task, a.dataset, a.episodes, a.seed)
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(rows, indent=1))
    elif a.cmd == "probe":
        torch.set_num_threads(1)
        probe(a.root, a.out, a.task, a.dataset, a.states)
    else:
        report(a.root, a.out, a.behaviour_score)


if __name__ == "__main__":
    main()
