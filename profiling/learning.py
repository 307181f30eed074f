"""Whole runs held against the authors' release: same data, same schedule, several seeds each.

    python -m dtql_fast.profiling.learning run --release-src ~/src/Diffusion_Trusted_Q_Learning \\
        --task hopper-medium-v2 --dataset data/hopper-sac-medium.hdf5 --seeds 0-2 \\
        --pretrain-epochs 2 --epochs 18 --eval-every 3 --out runs/learning
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

from dtql_fast.seeds import format_seeds, parse_seeds
from dtql_fast.runfolder import CONFIG, METRICS, SUMMARY
from dtql_fast.train import env_seed  # every variant plays the envs train's evaluation plays

VARIANTS = ("release", "single-eager", "single-compiled", "group-eager", "group-compiled")
LOSSES = (("loss_bc", "behaviour cloning"), ("loss_tr", "trust region"), ("loss_pq", "policy: -Q"))


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


def run_release(src: Path, task: str, dataset: str, seed: int, over: dict, out: Path,
                episodes: int | None = None, log_every: int = 1000) -> dict:
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
    sampler = _ReleaseSampler(data)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / METRICS, "w")
    (out / CONFIG).write_text(json.dumps({"variant": "release", "src": str(src), "task": task,
                                                 "dataset": dataset, "seed": seed, "hyper": h.__dict__}, indent=2))
    spe, t0 = h.steps_per_epoch, time.perf_counter()
    pre_total = h.pretrain_epochs * spe

    def write(row):
        log.write(json.dumps(row) + "\n")
        log.flush()

    def act_fn(states):  # the release's own acting rule, one state at a time
        return torch.as_tensor(np.stack([agent.sample_action(s.numpy()) for s in states]), dtype=torch.float32)

    for start in range(0, pre_total, log_every):
        n = min(log_every, pre_total - start)
        agent.pretrain(sampler, h.batch_size, n)
        write({"kind": "train", "phase": "pretrain", "step": start + n, "loss_bc": agent.bc_loss.item()})
    sums, last = {}, None
    for i in range(1, h.total_steps + 1):
        m = agent.train(sampler, batch_size=h.batch_size)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v[0]
        if i % log_every == 0 or i == h.total_steps:
            n = log_every if i % log_every == 0 else i % log_every
            write({"kind": "train", "phase": "train", "step": pre_total + i, "loss_bc": sums["bc_loss"] / n,
                   "loss_tr": sums["distill_loss"] / n, "loss_pq": sums["ql_loss"] / n,
                   "loss_critic": sums["critic_loss"] / n, "loss_policy": sums["actor_loss"] / n,
                   "steps_per_s": i / (time.perf_counter() - t0)})
            sums = {}
        if i % spe == 0 and ((i // spe) % h.eval_every == 0 or i == h.total_steps):
            res = evaluate(act_fn, loaded.make_env, episodes or loaded.task.eval_episodes, seed=env_seed(seed),
                           task=loaded.task)
            last = {"kind": "eval", "step": pre_total + i, "epoch": i // spe, **res}
            write(last)
            print(f"release seed {seed} step {pre_total + i}: score {res['score_mean']}", flush=True)
    log.close()
    summary = {"variant": "release", "seed": seed, "steps": pre_total + h.total_steps,
               "score_mean": last["score_mean"] if last else None, "wall_s": time.perf_counter() - t0}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


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


def run(args) -> None:
    seeds = list(parse_seeds(args.seeds))
    sched = {"epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs, "eval_every": args.eval_every,
             "steps_per_epoch": args.steps_per_epoch, "eval_episodes": args.eval_episodes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps({"task": args.task, "dataset": args.dataset, "seeds": seeds,
                                                          "schedule": sched, "variants": args.variants}, indent=2))
    for variant in args.variants:
        if variant == "release":
            for s in seeds:
                folder = args.out / "release" / f"seed{s}"
                if (folder / SUMMARY).exists():
                    print(f"release seed {s}: done already ({folder})")
                    continue
                over = {k: sched[k] for k in ("epochs", "pretrain_epochs", "eval_every", "steps_per_epoch")}
                run_release(args.release_src, args.task, args.dataset, s, over, folder, sched["eval_episodes"],
                            log_every=min(1000, args.steps_per_epoch))
            continue
        for cmd in ours_command(variant, args.task, args.dataset, seeds, sched, args.out):
            folder = Path(cmd[cmd.index("--out") + 1])
            if (folder / SUMMARY).exists():
                print(f"{variant}: done already ({folder})")
                continue
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


# -- the report --------------------------------------------------------------------------------

def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in open(folder / METRICS) if line.strip()]


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


def _finished(folder: Path) -> bool:
    """Every run of a variant's folder wrote its summary.json (a group: one; per seed: each)."""
    if (folder / METRICS).exists():
        return (folder / SUMMARY).exists()
    return all((sub / SUMMARY).exists() for sub in folder.glob("seed*") if (sub / METRICS).exists())


def _stats(xs: list[float]) -> dict:
    n = len(xs)
    mean = statistics.fmean(xs)
    std = statistics.stdev(xs) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "se": std / math.sqrt(n) if n > 1 else float("nan"), "values": xs}


def summarise(per_seed: dict[int, list[dict]]) -> dict:
    finals, bests = [], []
    for rows in per_seed.values():
        ev = [r for r in rows if r["kind"] == "eval" and r.get("score_mean") is not None]
        if ev:
            finals.append(ev[-1]["score_mean"])
            bests.append(max(r["score_mean"] for r in ev))
    if not finals:
        return {}
    return {"final": _stats(finals), "best": _stats(bests), "seeds": sorted(per_seed)}


def agreement(a: dict, b: dict) -> dict:
    """Welch: the difference of means against its standard error; 'agree' when within 2 SE."""
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
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


def report(root: Path, out: Path, behaviour_score: float | None = None) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = json.loads((root / "comparison.json").read_text()) if (root / "comparison.json").exists() else {}
    variants = {v: read_variant(root / v) for v in VARIANTS if (root / v).is_dir()}
    variants = {v: d for v, d in variants.items() if d}
    table = {v: summarise(d) for v, d in variants.items()}
    for v, t in table.items():
        if t:
            t["finished"] = _finished(root / v)
    if "release" in table and table["release"]:
        for v, t in table.items():
            if v != "release" and t:
                t["vs_release_final"] = agreement(t["final"], table["release"]["final"])
                t["vs_release_best"] = agreement(t["best"], table["release"]["best"])
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 1 + len(LOSSES), figsize=(5 * (1 + len(LOSSES)), 4))
    for v, d in variants.items():
        for ax, (kind, key, title) in zip(axes, [("eval", "score_mean", "normalised score")] +
                                          [("train", k, t) for k, t in LOSSES]):
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
    for v, t in table.items():
        if not t:
            continue
        f, b = t["final"], t["best"]
        vs = t.get("vs_release_final")
        vs_txt = f"{vs['diff']:+.1f} ± {vs['se']:.1f}, {'yes' if vs['within_2se'] else 'NO'}" if vs else "-"
        mark = "" if t["finished"] else " †"
        lines.append(f"| {v}{mark} | {f['n']} | {f['mean']:.1f} ± {f['std']:.1f} (± {f['se']:.1f}) | "
                     f"{b['mean']:.1f} ± {b['std']:.1f} (± {b['se']:.1f}) | {vs_txt} |")
    if not all(t.get("finished", True) for t in table.values()):
        lines += ["", "† not finished: its latest evaluation counts as final."]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps({"meta": meta, "behaviour_score": behaviour_score, "variants": table},
                                               indent=2, default=float))
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
    q = sub.add_parser("report", help="the figure and table of a run's folder")
    q.add_argument("root", type=Path)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--behaviour-score", type=float, help="the data's own normalised score (dataset .json)")
    a = p.parse_args(argv)
    if a.cmd == "run":
        bad = [v for v in a.variants if v not in VARIANTS]
        if bad:
            p.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
        if "release" in a.variants and a.release_src is None:
            p.error("--variants release needs --release-src PATH (a checkout of the authors' release)")
        torch.set_num_threads(1)
        run(a)
    else:
        report(a.root, a.out, a.behaviour_score)


if __name__ == "__main__":
    main()
