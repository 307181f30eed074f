"""Evaluation: all episodes at once in one vector env, and the spec's acting rule, batched.

FastDTQL's agents (one or a group) evaluate every agent's episodes in one vector env, with one
acting call per env step for all of them (evaluate_group, make_group_act_fn). evaluate and
make_act_fn are the same for one agent's acting rule without the agent dimension (ReferenceDTQL's).

Acting (spec, "Acting and evaluation"): for each state, R = 1024 policy candidates, scored by the
TARGET critic's q_min, one drawn from Categorical(softmax(q)); the agents implement it as
`act(states, eps, u)`. `make_act_fn` draws eps ~ N(0, I) of shape (N, R, A) and then u ~ U[0, 1)
of shape (N,) from its generator, once per env step for all live envs together.

A run's evaluation (evaluate_agents) is seeded by each agent's seed: seed s plays the same envs
(env_seed) and action draws (eval_generator, with the step) in any run, so python -m
dtql_fast.evaluate repeats training's evaluation of a checkpoint.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from . import optional
from .runlog import agent_name

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import RunData
    from .tasks import Hyper

gym = optional.gymnasium()  # absent on a bare GPU machine: evaluation says so when asked for

__all__ = ["evaluate", "evaluate_group", "evaluate_agents", "env_seed", "eval_generator", "make_act_fn",
           "make_group_act_fn"]


def make_act_fn(act: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], action_dim: int,
                num_candidates: int = 1024, device="cpu", generator: torch.Generator | None = None,
                pad_to: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """act_fn(states (N, S) float32, any device) -> actions (N, A) on `device`.

    `act(states, eps, u)` is one agent's acting rule (ReferenceDTQL.act; FastDTQL.act is a group's). Per call:
    eps = randn((N, R, A)), then u = rand((N,)), both from `generator` (on `device`; None: torch's
    default generator for that device). With `pad_to`, every call acts on exactly pad_to rows
    (states zero-padded, the padding's actions dropped), so a compiled `act` sees one shape as
    episodes end and never recompiles.
    """
    group = make_group_act_fn(lambda s, eps, u: act(s[0], eps[0], u[0])[None], action_dim, num_candidates, device,
                              [generator], pad=pad_to is not None)

    def act_fn(states: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(states).to(device=device, dtype=torch.float32)
        N = s.shape[0]
        rows = pad_to if pad_to is not None else N
        live = torch.arange(rows) < N
        return group(torch.cat([s, s.new_zeros(rows - N, s.shape[1])])[None], live[None])[0, :N]

    return act_fn


def make_group_act_fn(act: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], action_dim: int,
                      num_candidates: int, device, generators: Sequence[torch.Generator],
                      pad: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """group_act_fn(states (N, E, S), live (N, E) bool) -> actions (N, E, A): every seed's live envs in
    ONE call of the group's acting rule `act(states (N, W, S), eps (N, W, R, A), u (N, W))`.

    Seed i's live states go first in its row of width W (in env order), zeros after. Its draws come
    from its own generator `generators[i]` as make_act_fn draws them for one agent: eps of shape
    (n_i, R, A), then u of shape (n_i,), for its n_i live envs (E of them with `pad`), zero-padded to
    W. So seed i acts on the states and draws a single-seed evaluation with that generator would feed
    it, whatever the other seeds' episodes do. W = E with `pad` (one shape: a compiled `act` never
    recompiles), else the largest live count.
    """
    R = int(num_candidates)

    @torch.no_grad()
    def group_act_fn(states: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(states).to(device=device, dtype=torch.float32)
        live = torch.as_tensor(live, dtype=torch.bool)
        N, E, S = s.shape
        counts = live.sum(dim=1).tolist()
        W = E if pad else max(counts)
        packed = s.new_zeros(N, W, S)
        eps = s.new_zeros(N, W, R, action_dim)
        u = s.new_zeros(N, W)
        for i, g in enumerate(generators):
            n = E if pad else counts[i]
            packed[i, :counts[i]] = s[i, live[i].to(s.device)]
            eps[i, :n] = torch.randn((n, R, action_dim), generator=g, device=device)
            u[i, :n] = torch.rand((n,), generator=g, device=device)
        picked = act(packed, eps, u)
        out = picked.new_zeros(N, E, picked.shape[-1])
        for i in range(N):
            out[i, live[i].to(out.device)] = picked[i, :counts[i]]
        return out

    return group_act_fn


def evaluate(act_fn: Callable[[torch.Tensor], torch.Tensor], make_env: Callable[[], gym.Env], episodes: int,
             seed: int, task=None) -> dict:
    """Run `episodes` episodes at once, one per sub-env of a SyncVectorEnv, env i seeded seed + i.

    act_fn gets the live envs' states as one (N_live, S) float32 CPU tensor per env step. A sub-env
    counts only up to its first episode end (terminated or truncated); under gymnasium 1.x's
    NEXT_STEP autoreset it is reset on the following step, and what it does after that is ignored.
    The loop stops once every sub-env has finished, so no sub-env is ever stepped into a second
    episode that counts.

    Returns env_seed (the first sub-env's seed), returns/lengths per episode, return_mean/return_std
    (population std, as the release prints), score_mean/score_std and scores (D4RL-normalised, None
    without reference scores), wall_s.
    """
    def one_agent(states: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        actions = act_fn(states[0][live[0]])
        out = actions.new_zeros(*live.shape, actions.shape[-1])
        out[live.to(out.device)] = actions
        return out

    return evaluate_group(one_agent, make_env, episodes, [seed], task)[0]


def evaluate_group(group_act_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   make_env: Callable[[], gym.Env] | Sequence[Callable[[], gym.Env]], episodes: int,
                   env_seeds: Sequence[int], task=None) -> list[dict]:
    """N seeds x `episodes` episodes at once: sub-env i * episodes + j is seed i's episode j, seeded
    env_seeds[i] + j (the envs a single-seed evaluate(..., seed=env_seeds[i]) runs). `make_env` and `task`:
    one for every agent, or one per agent (a run over several tasks); agents sharing a make_env share one
    SyncVectorEnv, and the vector envs step in lockstep.

    One call of group_act_fn (make_group_act_fn) per env step acts for every seed's live envs, given
    their states as (N, E, S) and which are live as (N, E). Returns one result per seed, each as
    evaluate's (its own returns, means and stds over its episodes; wall_s the group's).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    N, E = len(env_seeds), episodes
    makers = list(make_env) if isinstance(make_env, Sequence) else [make_env] * N
    tasks = list(task) if isinstance(task, Sequence) else [task] * N
    t0 = time.perf_counter()

    def act_live(obs: np.ndarray, live: np.ndarray) -> torch.Tensor:
        states = torch.from_numpy(np.asarray(obs, dtype=np.float32).reshape(N, E, -1))
        mask = torch.from_numpy(live.reshape(N, E))
        actions = group_act_fn(states, mask)
        return actions[mask.to(actions.device)]

    returns, lengths = _run_episodes(act_live, [m for m in makers for _ in range(E)],
                                     [s + j for s in env_seeds for j in range(E)])
    wall = time.perf_counter() - t0
    return [{"episodes": E, "env_seed": s, **_scores(returns[i * E:(i + 1) * E], lengths[i * E:(i + 1) * E], tasks[i]),
             "wall_s": wall} for i, s in enumerate(env_seeds)]


def _run_episodes(act_live: Callable[[np.ndarray, np.ndarray], torch.Tensor], make_envs: list[Callable[[], gym.Env]],
                  env_seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One episode per sub-env, sub-env k built by make_envs[k] and seeded env_seeds[k] (a SyncVectorEnv per
    run of equal makers, stepped together); act_live(obs of all sub-envs, live mask) returns the live ones'
    actions, in order. (returns, lengths) per sub-env."""
    M = len(env_seeds)
    spans = []  # [first, end, maker] of each vector env
    for k, maker in enumerate(make_envs):
        if spans and spans[-1][2] is maker:
            spans[-1][1] = k + 1
        else:
            spans.append([k, k + 1, maker])
    vecs = []
    try:
        for first, end, maker in spans:
            vecs.append(gym.vector.SyncVectorEnv([maker] * (end - first),
                                                 autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP))
        space = vecs[0].single_action_space
        obs = np.concatenate([v.reset(seed=list(env_seeds[a:b]))[0] for v, (a, b, _) in zip(vecs, spans)])
        returns = np.zeros(M, dtype=np.float64)
        lengths = np.zeros(M, dtype=np.int64)
        live = np.ones(M, dtype=bool)
        actions = np.zeros((M, *space.shape), dtype=space.dtype)
        while live.any():
            idx = np.flatnonzero(live)
            a = act_live(obs, live)
            a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            if a.shape != (idx.size, *space.shape):
                raise ValueError(f"act_fn returned shape {a.shape} for {idx.size} states; expected "
                                 f"{(idx.size, *space.shape)}")
            actions[:] = 0
            actions[idx] = a
            for v, (first, end, _) in zip(vecs, spans):
                if not live[first:end].any():
                    continue  # every episode of this vector env has ended
                o, rew, term, trunc, _ = v.step(actions[first:end])
                obs[first:end] = o
                mine = idx[(idx >= first) & (idx < end)]
                returns[mine] += rew[mine - first]
                lengths[mine] += 1
                live[mine[(term | trunc)[mine - first]]] = False
    finally:
        for v in vecs:
            v.close()
    return returns, lengths


def _scores(returns: np.ndarray, lengths: np.ndarray, task) -> dict:
    out = {"returns": returns.tolist(), "lengths": lengths.tolist(), "return_mean": float(returns.mean()),
           "return_std": float(returns.std()), "scores": None, "score_mean": None, "score_std": None}
    if task is not None and task.normalized_score(0.0) is not None:
        scores = np.array([task.normalized_score(r) for r in returns])
        out.update(scores=scores.tolist(), score_mean=float(scores.mean()), score_std=float(scores.std()))
    return out


# -- a run's evaluation: each agent seed plays the same envs and draws in any run ---------------------


def env_seed(seed: int) -> int:
    """The first evaluation env's seed of agent seed `seed` (its episode j plays env_seed + j)."""
    return seed * 10_000 + 1000


def eval_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The acting draws of seed `seed`'s evaluation at `step` (python -m dtql_fast.evaluate replays them)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def evaluate_agents(act_rule, loaded: RunData, hyper: Hyper, device: torch.device, cfg: TrainConfig, step: int,
                    episodes: int, padded: bool = False, first_env_seed: int | None = None) -> list[dict]:
    """One evaluation result per agent. Seed s plays the same envs and action draws in any run (env seeds
    s * 10000 + 1000 + j, draws from a generator seeded by s and the step); all the agents' episodes run
    in one vector env, one acting call per env step. Compiled, every call acts on all `episodes` rows an
    agent, finished envs padded, so the acting graph never recompiles."""
    A, R = loaded.transitions.action_dim, hyper.num_candidates
    agents = range(len(cfg.agents))

    def draws(seed: int) -> torch.Generator:
        return eval_generator(seed, step, device)

    def envs(i: int, seed: int) -> int:  # first_env_seed (python -m dtql_fast.evaluate --env-seed): other envs
        return env_seed(seed) if first_env_seed is None else first_env_seed + 10_000 * i

    act = make_group_act_fn(act_rule, A, R, device, [draws(s) for s in cfg.agents], pad=padded)
    return evaluate_group(act, [loaded.agent(i).make_env for i in agents], episodes,
                          [envs(i, s) for i, s in enumerate(cfg.agents)], task=[loaded.agent(i).task for i in agents])


# -- videos: one episode per agent, rendered offscreen ---------------------------------------------------

RENDER_HELP = ("headless rendering needs EGL (MUJOCO_GL=egl, the default here; Debian: apt-get install libegl1 "
               "libgl1-mesa-dri) or OSMesa (MUJOCO_GL=osmesa; apt-get install libosmesa6)")


def record_episode(act_one: Callable[[np.ndarray], np.ndarray], make_env: Callable[..., gym.Env],
                   seed: int, max_frames: int = 1000) -> tuple[list[np.ndarray], float]:
    """One episode of env seed `seed`, acting with act_one(state (S,)) -> action (A,); its rendered frames
    (the first after the reset) and its return."""
    env = make_env(render_mode="rgb_array")
    try:
        obs, _ = env.reset(seed=seed)
        frames, ret, done = [env.render()], 0.0, False
        while not done and len(frames) < max_frames:
            obs, r, term, trunc, _ = env.step(act_one(obs))
            ret += float(r)
            done = bool(term or trunc)
            frames.append(env.render())
    finally:
        env.close()
    return frames, ret


def write_video(frames: list[np.ndarray], path, fps: int = 30):
    """GIF through Pillow (always there with matplotlib); MP4 through imageio's ffmpeg plugin."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"--video {path}: give a .gif or .mp4 file")
    if not (optional.have("imageio") and optional.have("imageio_ffmpeg")):
        raise ValueError(f"--video {path}: MP4 needs imageio and imageio-ffmpeg (pip install imageio "
                         "imageio-ffmpeg); or write a .gif")
    import imageio

    imageio.mimwrite(path, frames, fps=fps)


# -- python -m dtql_fast.evaluate RUN: a trained run evaluated again -----------------------------------


def main(argv=None) -> list[dict]:
    """Evaluate a run folder's agents again, as training does (the same acting rule, draws seeded by the
    checkpoint's step, the same normalisation); print and write the scores as JSON."""
    import argparse
    import glob
    import json
    from pathlib import Path

    from . import checkpoint, footprint, runfolder
    from .agents import build_agent, check_fits_before_data, restore
    from .config import NEGATIVE_NUMBER, ConfigError, TrainConfig, agent_labels, device_problem, resolve_device
    from .data import load_run_data
    from .runlog import eval_rows
    from .seeds import MAX_SEED, SeedListError, parse_seeds
    from .tasks import Hyper
    from .transitions import DatasetError

    p = argparse.ArgumentParser(prog="python -m dtql_fast.evaluate", description=main.__doc__)
    p.add_argument("run", help="a run folder (python -m dtql_fast.train --out)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="last: the newest checkpoint; best: checkpoint.best.pt, the state at the run's best "
                        "evaluation (best-of-run: picked with those evaluations, so its score there overstates)")
    p.add_argument("--episodes", type=int, help="episodes per agent (default: the run's)")
    p.add_argument("--env-seed", type=int, help="the first env's seed (agent i plays env-seed + 10000 i + j); "
                                                "default: training's, which repeats its evaluation at that step")
    p.add_argument("--agents", metavar="SEEDS", help="of a seed group, these seeds only (e.g. 0,2); default all")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--json", metavar="PATH", help="default: RUN/evaluation-<checkpoint>-step<N>.json")
    p.add_argument("--video", metavar="FILE", help="also record one episode per agent (the first env seed's) to "
                   "FILE (.gif, or .mp4 with imageio-ffmpeg); a group writes FILE-seed<k>.gif per agent")
    p._negative_number_matcher = NEGATIVE_NUMBER  # --env-seed -1 reaches its check (config.py)
    a = p.parse_args(argv)
    if a.video:
        import os

        os.environ.setdefault("MUJOCO_GL", "egl")  # before MuJoCo loads: offscreen, no display needed
        if Path(a.video).suffix.lower() not in (".gif", ".mp4"):
            p.error(f"--video {a.video}: give a .gif or .mp4 file")
    if a.episodes is not None and a.episodes < 1:
        p.error(f"--episodes {a.episodes}: takes >= 1")
    if a.env_seed is not None and not 0 <= a.env_seed <= MAX_SEED:
        p.error(f"--env-seed {a.env_seed}: takes 0-{MAX_SEED}")
    if device_problem(a.device):
        p.error(device_problem(a.device))
    run = Path(a.run)
    device = resolve_device(a.device)
    try:
        if not run.exists():
            raise checkpoint.CheckpointError(f"{run} does not exist; give a run folder (python -m dtql_fast.train "
                                             "--out) or a checkpoint file")
        if a.checkpoint == "best":
            if run.is_dir() and not (run / checkpoint.BEST).exists():
                raise checkpoint.CheckpointError(
                    f"{run} has no {checkpoint.BEST} (a run with --no-eval, or from before it was written, keeps "
                    "none); use --checkpoint last")
            ckpt = checkpoint.load(run / checkpoint.BEST if run.is_dir() else run, map_location=device)
        else:
            latest = checkpoint.load_latest(run, map_location=device, set_aside=False)  # evaluate changes no file
            if latest.note:
                print(f"note: {latest.note}")
            ckpt = latest.ckpt
        cfg, hyper = TrainConfig(**ckpt["config"]), Hyper(**ckpt["hyper"])
        agents = cfg.agents
        keep = list(parse_seeds(a.agents, "--agents")) if a.agents else agents
        if set(keep) - set(agents):
            raise SeedListError(f"--agents {a.agents}: the run trains seeds {agents}, not {sorted(set(keep) - set(agents))}")
        step = ckpt["step"]
        folder = run if run.is_dir() else run.parent
        # Outputs are checked before the work that fills them, and never overwritten: a repeat of the default
        # name gets a number (-2, -3, ...), a given --json or --video that exists is refused.
        out = Path(a.json) if a.json else _free_name(folder / f"evaluation-{a.checkpoint}-step{step}.json")
        runfolder.check_writable(out, f"--json {out}" if a.json else "the evaluation's JSON")
        if a.video:  # a group's files are FILE[-setting]-seed<k>.ext (record_videos)
            video = Path(a.video)
            runfolder.check_writable(video if cfg.single_seed else video.parent, f"--video {a.video}",
                                     folder=not cfg.single_seed)
            taken = [] if cfg.single_seed else [v for k in keep for v in video.parent.glob(
                f"{glob.escape(video.stem)}*-seed{k}{glob.escape(video.suffix)}")]
            if taken:
                raise runfolder.CannotWrite(f"--video {a.video}: {taken[0]} exists already and is never "
                                            "overwritten; give another --video")
        check_fits_before_data(cfg, device, a.episodes or cfg.eval_episodes)  # before the data's minutes
        loaded = load_run_data(cfg, device)
        for name, one in zip(cfg.tasks, loaded.per_task):
            if one.env_problem:
                raise DatasetError(f"evaluation for {name} cannot run: {one.env_problem}")
        episodes = a.episodes or cfg.eval_episodes or loaded.eval_episodes()
        agent = build_agent(cfg, loaded.transitions, hyper, loaded.hypers(cfg), device, eval_episodes=episodes)
        restore(agent, ckpt, cfg.task, where=f"the checkpoint in {run}")
    except (checkpoint.CheckpointError, SeedListError, DatasetError, TypeError, ConfigError,
            footprint.GroupTooLarge, runfolder.CannotWrite) as e:
        raise SystemExit(f"error: {e}")
    results = evaluate_agents(agent.act, loaded, hyper, device, cfg, step, episodes, first_env_seed=a.env_seed)
    who = agent_labels(cfg) or [{"seed": s} for s in agents]  # each row names its agent
    picked = [(i, r) for i, r in enumerate(eval_rows(results, step, 0, who)) if r["seed"] in keep]
    rows = [r for _, r in picked]
    for r in rows:
        r.pop("epoch")
        score = f", normalised score {r['score_mean']:.1f} ± {r['score_std']:.1f}" if r["score_mean"] is not None else ""
        print(f"{','.join(cfg.tasks)} | {agent_name(r)} | {a.checkpoint} checkpoint, step {step} | {episodes} "
              f"episodes from env seed {r['env_seed']}: return {r['return_mean']:.2f} ± {r['return_std']:.2f}{score}")
    doc = {"run": str(run), "task": cfg.task, "checkpoint": a.checkpoint, "step": step, "episodes": episodes,
           "best": ckpt.get("best"), "agents": rows}
    if a.video:
        doc["videos"] = record_videos(agent, loaded, hyper, device, cfg, step, picked, Path(a.video))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"written: {out}")
    return rows


def _free_name(path):
    """`path`, or where it exists the first of path-2, path-3, ... that does not."""
    n, free = 2, path
    while free.exists():
        free, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return free


def record_videos(agent, loaded, hyper, device, cfg, step: int, rows: list[tuple[int, dict]], video) -> list[dict]:
    """One episode per agent of `rows` ((agent index, its evaluation row)), acting as evaluation does
    (eval_generator), from that agent's first evaluation env seed; written to `video` (one file per agent
    of a group)."""
    A, R = loaded.transitions.action_dim, hyper.num_candidates
    seeds = cfg.agents
    done = []
    for i, row in rows:
        seed = row["seed"]
        gen = eval_generator(seed, step, device)
        # The agents' acting rule, with only this agent's env live.
        gens = [gen if j == i else torch.Generator(device).manual_seed(0) for j in range(len(seeds))]
        act_g = make_group_act_fn(agent.act, A, R, device, gens)
        live = torch.zeros(len(seeds), 1, dtype=torch.bool)
        live[i] = True

        def act_one(o, i=i, act_g=act_g, live=live):
            states = torch.zeros(len(seeds), 1, len(o))
            states[i, 0] = torch.as_tensor(o, dtype=torch.float32)
            return act_g(states, live)[i, 0].cpu().numpy()
        try:
            frames, ret = record_episode(act_one, loaded.agent(i).make_env, row["env_seed"])
        except Exception as e:  # noqa: BLE001 - a missing GL backend shows up as many exception types
            raise SystemExit(f"error: --video: rendering failed ({type(e).__name__}: {e}); {RENDER_HELP}. "
                             "Evaluation itself works without --video") from None
        cell = f"-{row['setting'].replace(',', '_').replace('/', '_')}" if "setting" in row else ""  # a task id's / too
        path = video if cfg.single_seed else video.with_name(f"{video.stem}{cell}-seed{seed}{video.suffix}")
        try:
            write_video(frames, path)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"video: {agent_name(row)}, env seed {row['env_seed']}: {len(frames)} frames, return {ret:.2f} -> {path}")
        done.append({**{k: row[k] for k in ("setting", "seed") if k in row}, "env_seed": row["env_seed"], "frames": len(frames), "return": ret, "path": str(path)})
    return done


if __name__ == "__main__":
    main()
