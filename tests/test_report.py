"""The report on run folders written by hand: the numbers, unfinished and failed runs, resumed logs, the CLI."""
import csv
import json
from statistics import mean, stdev

import pytest

from dtql_fast import report

HYPER = {"pretrain_epochs": 1, "epochs": 3, "steps_per_epoch": 10}
# The paper's schedule for a Gym task (dtql_fast.tasks): 50 pretraining + 1000 epochs of 1000 steps.
PAPER_HYPER = {"pretrain_epochs": 50, "epochs": 1000, "steps_per_epoch": 1000, "eval_every": 50}
MACHINE = "AMD EPYC, 1 torch threads"


def _time(steps, pretrain_steps, total_s, train_s, eval_s, compile_s=0.0, first_step=0, hardware=MACHINE):
    """summary.json's "time" as train.py writes it."""
    return {"total_s": total_s, "compile_s": compile_s, "eval_s": eval_s, "train_s": train_s,
            "first_step": first_step, "steps": steps, "pretrain_steps": pretrain_steps, "hardware": hardware}


def _run(d, task, seed, evals, finished=True, status=None, score=True, hyper=HYPER, time=None, dataset=None,
         source=None, episodes=1, steps=None):
    """A run folder as train.py (and the sweep) leave it; evals: [(step, value)]. time: summary.json's
    "time" (None: a run made before train.py wrote one); dataset, source: config.json's --dataset and
    the file it read."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"task": task, "hyper": hyper, "source": source,
                                               "config": {"seed": seed, "seeds": None, "dataset": dataset}}))
    with open(d / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"kind": "train", "step": 5, "loss_q": 1.0}) + "\n")
        for step, v in evals:
            f.write(json.dumps({"kind": "eval", "step": step, "env_seed": 1000 + seed, "episodes": episodes,
                                "return_mean": v * 10, "score_mean": v if score else None}) + "\n")
    if finished:
        steps = steps or (hyper["pretrain_epochs"] + hyper["epochs"]) * hyper["steps_per_epoch"]
        with open(d / "metrics.jsonl", "a") as f:  # train.py logs the last step
            f.write(json.dumps({"kind": "train", "step": steps, "loss_q": 1.0}) + "\n")
        (d / "summary.json").write_text(json.dumps({"task": task, "steps": steps,
                                                    **({} if time is None else {"time": time})}))
    if status:
        (d / "status.json").write_text(json.dumps(status))


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    _run(root / "a" / "s0", "hopper-medium-v2", 0, [(20, 10.0), (30, 50.0), (40, 40.0)])
    _run(root / "a" / "s1", "hopper-medium-v2", 1, [(20, 20.0), (30, 30.0), (40, 60.0)])
    _run(root / "deeper" / "x" / "s2", "hopper-medium-v2", 2, [(20, 5.0), (30, 25.0)], finished=False,
         status={"state": "running", "task": "hopper-medium-v2", "seed": 2})
    _run(root / "b" / "s0", "mujoco/pusher/none-v0", 0, [(20, 1.0), (40, 2.0)], score=False)
    _run(root / "b" / "s1", "mujoco/pusher/none-v0", 1, [], finished=False,
         status={"state": "failed", "task": "mujoco/pusher/none-v0", "seed": 1, "error": "error: bad | data"})
    return root


def test_table_numbers(runs_root, tmp_path):
    md, rows, _ = report.report(runs_root, tmp_path / "out")
    hopper, pusher = rows[0], rows[1]
    assert hopper.task == "hopper-medium-v2" and pusher.task == "mujoco/pusher/none-v0"
    last, best = [40.0, 60.0, 25.0], [50.0, 60.0, 25.0]   # the unfinished seed counts with its latest evaluation
    assert hopper.last == pytest.approx((mean(last), stdev(last)))
    assert hopper.best == pytest.approx((mean(best), stdev(best)))
    assert (hopper.seeds, hopper.unfinished, hopper.failed, hopper.kind) == (3, 1, 0, "score")
    assert hopper.paper == 99.6 and hopper.best_diff == pytest.approx(mean(best) - 99.6)
    assert (pusher.seeds, pusher.failed, pusher.kind, pusher.paper) == (1, 1, "return", None)
    assert pusher.last == (20.0, None)   # one seed: no std
    assert (f"| hopper-medium-v2 {report.MARK_UNFINISHED} | 3 (1 not finished) | {mean(last):.1f} ± "
            f"{stdev(last):.1f} |") in md
    assert hopper.last_se == pytest.approx(stdev(last) / 3 ** 0.5) and pusher.last_se is None
    assert ("| mujoco/pusher/none-v0 (return) | 1 (1 failed) | 20.0 | 20.0 | – | – | – | – | – | – | – | – | "
            "Minari dataset, re-collected on newer environments: not the paper's data, no Table 1 comparison |") in md
    # Runs made before summary.json had a "time" (and runs still going, which have no summary): unknown.
    assert "| hopper-medium-v2 | 2 | running | 5/40 | 2 | 25.0 | 25.0 | unknown |  |" in md
    assert "| mujoco/pusher/none-v0 | 1 | failed | 5/40 | 0 | – | – | unknown | error: bad \\| data |" in md
    assert ("| hopper-medium-v2 | 0 of 3 | unknown | unknown | 5.0 | – | – | unknown: 3 run(s) without a time in "
            "summary.json |") in md
    assert "not finished (still going, or stopped)" in md
    csv_lines = (tmp_path / "out" / "report.csv").read_text().splitlines()
    assert csv_lines[1].startswith(f"hopper-medium-v2,normalised_score,3,1,0,{round(mean(last), 4)},")
    assert csv_lines[2].startswith("mujoco/pusher/none-v0,return,1,0,1,20.0,,20.0,,,,")
    for name in ("curves_hopper-medium-v2.png", "curves_mujoco_pusher_none-v0.png", "paper_vs_ours.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"


def _group(d, task, evals_by_seed, finished=True, status=None, time=None, episodes=1):
    """A seed group's run folder as train --seeds leaves it: the seed list in config.json, rows tagged by seed."""
    d.mkdir(parents=True)
    seeds = list(evals_by_seed)
    (d / "config.json").write_text(json.dumps({"task": task, "config": {"seed": None, "seeds": seeds},
                                               "hyper": HYPER}))
    with open(d / "metrics.jsonl", "w") as f:
        for seed in seeds:
            f.write(json.dumps({"kind": "train", "step": 5, "seed": seed, "loss_q": 1.0}) + "\n")
        for step in sorted({step for evals in evals_by_seed.values() for step, _ in evals}):
            for seed, evals in evals_by_seed.items():
                for v in [v for t, v in evals if t == step]:
                    f.write(json.dumps({"kind": "eval", "step": step, "seed": seed, "env_seed": 1000 + 10_000 * seed,
                                        "episodes": episodes, "return_mean": v * 10, "score_mean": v}) + "\n")
    if finished:
        with open(d / "metrics.jsonl", "a") as f:
            for seed in seeds:
                f.write(json.dumps({"kind": "train", "step": 40, "seed": seed, "loss_q": 1.0}) + "\n")
        (d / "summary.json").write_text(json.dumps({"task": task, "steps": 40, "seeds": seeds,
                                                    **({} if time is None else {"time": time})}))
    if status:
        (d / "status.json").write_text(json.dumps(status))


def test_a_seed_group_folder_reads_as_its_seeds(tmp_path):
    """One group folder of seeds 0-2 gives the table, curve and per-seed rows of three single-seed folders."""
    evals = {0: [(20, 10.0), (30, 50.0), (40, 40.0)], 1: [(20, 20.0), (30, 30.0), (40, 60.0)],
             2: [(20, 5.0), (30, 25.0), (40, 35.0)]}
    for seed, ev in evals.items():
        _run(tmp_path / "singles" / f"s{seed}", "hopper-medium-v2", seed, ev)
    _group(tmp_path / "group" / "hopper-medium-v2", "hopper-medium-v2", evals)
    md_s, (single,), _ = report.report(tmp_path / "singles", tmp_path / "out_s")
    md_g, (group,), _ = report.report(tmp_path / "group", tmp_path / "out_g")
    last, best = [40.0, 60.0, 35.0], [50.0, 60.0, 35.0]
    assert group.last == pytest.approx((mean(last), stdev(last))) and group.best == pytest.approx((mean(best), stdev(best)))
    assert (group.seeds, group.unfinished, group.failed) == (3, 0, 0)
    assert (group.last, group.best, group.seeds) == (single.last, single.best, single.seeds)
    runs_g = report.discover(tmp_path / "group")
    assert [(r.seed, r.evals) for r in runs_g] == [(s, ev) for s, ev in evals.items()]
    assert report.curve(runs_g) == report.curve(report.discover(tmp_path / "singles"))
    assert md_g.split("## Runs")[1] == md_s.split("## Runs")[1]


def test_a_failed_seed_group_counts_each_seed_failed(tmp_path):
    """A group that failed before writing config.json (bad data): the sweep's status.json names its seeds."""
    _group(tmp_path / "ok", "hopper-medium-v2", {0: [(40, 30.0)], 1: [(40, 50.0)]})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "status.json").write_text(json.dumps(
        {"state": "failed", "task": "walker2d-medium-v2", "seeds": [0, 1], "error": "error: NaN in row 7"}))
    md, rows, _ = report.report(tmp_path, tmp_path / "out")
    by = {r.task: r for r in rows}
    assert (by["walker2d-medium-v2"].failed, by["walker2d-medium-v2"].seeds) == (2, 0)
    assert by["hopper-medium-v2"].last == pytest.approx((40.0, stdev([30.0, 50.0])))
    assert md.count("| walker2d-medium-v2 | ") == 3 and "| walker2d-medium-v2 | 1 | failed |" in md


def test_resumed_run_counts_each_evaluation_once(tmp_path):
    """A run killed after logging step 30 and resumed from its step-20 checkpoint logs step 30 again."""
    d = tmp_path / "r"
    _run(d, "walker2d-medium-v2", 0, [(20, 1.0), (30, 2.0), (30, 3.0), (40, 4.0)])
    (run,) = report.discover(d)
    assert run.evals == [(20, 1.0), (30, 3.0), (40, 4.0)] and run.state == "finished"


def test_curve_is_mean_and_std_over_the_seeds_at_each_step(runs_root):
    hopper = [r for r in report.discover(runs_root) if r.task == "hopper-medium-v2"]
    pts = report.curve(hopper)
    assert [p[0] for p in pts] == [20, 30, 40] and [p[3] for p in pts] == [3, 3, 2]
    assert pts[1][1] == pytest.approx(mean([50.0, 30.0, 25.0])) and pts[1][2] == pytest.approx(stdev([50, 30, 25]))


def test_cli(runs_root, tmp_path, capsys):
    report.main([str(runs_root)])
    out = capsys.readouterr().out
    assert out.startswith(f"# DTQL sweep report: {runs_root}") and "report.md, report.csv, paper_vs_ours.png" in out
    assert (runs_root / "report" / "paper_vs_ours.png").read_bytes()[:4] == b"\x89PNG"
    assert (runs_root / "report" / "report.md").read_text() in out
    with pytest.raises(SystemExit, match="is not a folder"):
        report.main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no run folders under"):
        report.main([str(tmp_path / "empty")])


# -- the paper's columns, domain averages, data that is not the paper's, time per task ----------------------

def _seeds(root, task, lasts, **kw):
    """One single-seed run folder per value of lasts, each evaluated twice: 1.0 above its last, then its last."""
    for seed, v in enumerate(lasts):
        _run(root / task.replace("/", "_") / f"s{seed}", task, seed, [(20, v + 1.0), (40, v)], **kw)


def _row(md, task):
    (line,) = [line for line in md.splitlines() if line.startswith(f"| {task} | ") and "±" in line]
    return line


def test_the_paper_columns(tmp_path):
    """Per task: last mean ± std, its SE and the seeds; best-of-run; the paper's mean ± spread, its row's
    strongest baseline, whether ours lies within the spread and by how many SEs it differs."""
    hopper, walker, ant = [99.0, 100.0, 99.5, 100.5, 99.5], [80.0, 82.0, 84.0], [90.0, 94.0]
    _seeds(tmp_path, "hopper-medium-v2", hopper)
    _seeds(tmp_path, "walker2d-medium-v2", walker)
    _seeds(tmp_path, "antmaze-umaze-v2", ant)
    md, rows, _ = report.report(tmp_path, tmp_path / "out")
    by = {r.task: r for r in rows}

    h = by["hopper-medium-v2"]
    se = stdev(hopper) / 5 ** 0.5
    assert (h.seeds, h.paper, h.paper_row.dtql.spread, h.paper_row.table) == (5, 99.6, 0.87, "Table 1")
    assert h.last == pytest.approx((mean(hopper), stdev(hopper))) and h.last_se == pytest.approx(se)
    assert h.best == pytest.approx((mean(hopper) + 1.0, stdev(hopper)))       # each seed's earlier, higher one
    assert h.within_spread is True and h.diff_in_se == pytest.approx((mean(hopper) - 99.6) / se)
    assert _row(md, "hopper-medium-v2") == (
        f"| hopper-medium-v2 | 5 | {mean(hopper):.1f} ± {stdev(hopper):.1f} | {mean(hopper) + 1:.1f} ± "
        f"{stdev(hopper):.1f} | 99.6 | {mean(hopper) - 99.6:+.1f} | {mean(hopper) + 1 - 99.6:+.1f} | ± {se:.2f} | "
        f"± 0.87 | yes | {(mean(hopper) - 99.6) / se:+.1f} | SRPO 95.5 | Table 1 |")

    w = by["walker2d-medium-v2"]
    se = stdev(walker) / 3 ** 0.5
    assert w.within_spread is False and w.diff_in_se == pytest.approx((82.0 - 89.4) / se)
    assert _row(md, "walker2d-medium-v2").endswith(
        f"| ± {se:.2f} | ± 0.13 | no | {(82.0 - 89.4) / se:+.1f} | DQL 87.0 | Table 1 |")

    # AntMaze -v2: Table 6 (DTQL 92.6 ± 1.24, SRPO its only other column), never Table 1's -v0 row.
    a = by["antmaze-umaze-v2"]
    assert (a.paper, a.paper_row.table, a.paper_row.strongest_baseline()) == (92.6, "Table 6", ("SRPO", 97.1))
    assert a.within_spread is True                                             # 92.0 in 92.6 ± 1.24
    assert _row(md, "antmaze-umaze-v2").endswith("| ± 1.24 | yes | -0.3 | SRPO 97.1 | Table 6 |")
    assert "best-of-run" in md and "overstates" in md

    csv_rows = {r["task"]: r for r in csv.DictReader(open(tmp_path / "out" / "report.csv"))}
    assert csv_rows["walker2d-medium-v2"]["within_paper_spread"] == "False"
    assert (csv_rows["antmaze-umaze-v2"]["strongest_baseline"], csv_rows["antmaze-umaze-v2"]["paper_table"]) == (
        "SRPO", "Table 6")
    assert float(csv_rows["hopper-medium-v2"]["last_se"]) == pytest.approx(stdev(hopper) / 5 ** 0.5, abs=1e-4)
    assert (tmp_path / "out" / "paper_vs_ours.png").read_bytes()[:4] == b"\x89PNG"


def test_domain_averages_as_the_paper_forms_them(tmp_path):
    """The mean over a domain's tasks of our per-task means, beside the printed average when every task is
    there (Kitchen: 71.8) and the paper's rows of the same tasks when not (2 of Gym's 9)."""
    kitchen = {"kitchen-complete-v0": [70.0, 74.0], "kitchen-partial-v0": [60.0, 66.0],
               "kitchen-mixed-v0": [50.0, 52.0]}
    gym = {"hopper-medium-v2": [90.0, 94.0], "walker2d-medium-v2": [80.0, 86.0]}
    for task, lasts in {**kitchen, **gym}.items():
        _seeds(tmp_path, task, lasts)
    _seeds(tmp_path, "mujoco/walker2d/medium-v0", [10.0, 12.0])      # not the paper's data: in no average
    md, rows, _ = report.report(tmp_path, tmp_path / "out")
    doms = {d.domain.name: d for d in report.domain_averages(rows)}
    assert set(doms) == {"Kitchen", "Gym"}

    k = doms["Kitchen"]
    ours = mean(mean(v) for v in kitchen.values())
    se = sum((stdev(v) / 2 ** 0.5) ** 2 for v in kitchen.values()) ** 0.5 / 3
    assert k.complete and k.paper == 71.8 and k.last == pytest.approx(ours) and k.last_se == pytest.approx(se)
    assert k.best == pytest.approx(ours + 1.0)
    assert (f"| Kitchen | Table 1 | 3 of 3 | {ours:.1f} | ± {se:.2f} | {ours + 1:.1f} | 71.8 | "
            f"{ours - 71.8:+.1f} |") in md

    g = doms["Gym"]
    ours = mean(mean(v) for v in gym.values())
    assert not g.complete and set(g.tasks) == set(gym)
    assert g.paper == pytest.approx((99.6 + 89.4) / 2) and g.last == pytest.approx(ours)
    assert (f"| Gym | Table 1 | 2 of 9 | {ours:.1f} |" in md
            and "94.5 (its rows for these 2 of its 9 tasks; printed average of all 9: 88.7)" in md)


def test_data_that_is_not_the_papers(tmp_path):
    """A Minari id is re-collected data: its row says so and has no Table 1 number. A D4RL task trained on
    another file (config.json's "dataset") is not the paper's data either; D4RL's file read from a folder of
    --dataset is."""
    _seeds(tmp_path / "minari", "mujoco/walker2d/medium-v0", [70.0, 72.0])
    _run(tmp_path / "own" / "s0", "walker2d-medium-v2", 0, [(40, 50.0)], dataset="/data/mine.hdf5",
         source="/data/mine.hdf5")
    _run(tmp_path / "folder" / "s0", "walker2d-medium-v2", 0, [(40, 88.0)], dataset="/data/d4rl",
         source="/data/d4rl/walker2d_medium-v2.hdf5")
    _run(tmp_path / "cache" / "s1", "walker2d-medium-v2", 1, [(40, 90.0)])
    md, rows, _ = report.report(tmp_path, tmp_path / "out")
    by = {(r.task, r.data_note is None): r for r in rows}
    assert len(rows) == 3

    minari = by[("mujoco/walker2d/medium-v0", False)]
    assert (minari.kind, minari.seeds, minari.paper, minari.paper_row, minari.within_spread) == (
        "score", 2, None, None, None)
    assert "re-collected on newer environments: not the paper's data, no Table 1 comparison" in minari.data_note
    assert _row(md, "mujoco/walker2d/medium-v0") == (
        f"| mujoco/walker2d/medium-v0 | 2 | 71.0 ± {stdev([70.0, 72.0]):.1f} | 72.0 ± {stdev([70.0, 72.0]):.1f} | "
        f"– | – | – | ± 1.00 | – | – | – | – | {minari.data_note} |")

    own = by[("walker2d-medium-v2", False)]
    assert own.data_note == ("not the paper's data: trained on /data/mine.hdf5 (--dataset), not D4RL's "
                             "walker2d_medium-v2.hdf5")
    assert (own.seeds, own.last, own.paper, own.within_spread) == (1, (50.0, None), None, None)
    assert f"| walker2d-medium-v2 | 1 | 50.0 | 50.0 | – | – | – | – | – | – | – | – | {own.data_note} |" in md

    paper_data = by[("walker2d-medium-v2", True)]      # D4RL's file from a --dataset folder, and from the cache
    assert (paper_data.seeds, paper_data.paper, paper_data.last[0]) == (2, 89.4, 89.0)
    assert [d.tasks for d in report.domain_averages(rows)] == [("walker2d-medium-v2",)]
    for name in ("curves_walker2d-medium-v2.png", "curves_walker2d-medium-v2_other-data.png",
                 "curves_mujoco_walker2d_medium-v0.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"


def test_time_per_task(tmp_path):
    """Hours beside Table 7's: measured when one process ran the paper's whole schedule, else projected
    from the training rate (labelled so); a seed group's hours shared by its seeds; no time: unknown."""
    full = (50 + 1000) * 1000
    # hopper: the whole schedule in one process (2 h, 20 evaluations of 10 episodes).
    _run(tmp_path / "hopper", "hopper-medium-v2", 0, [(50_000 + 1000 * e, 90.0) for e in range(50, 1001, 50)],
         hyper=PAPER_HYPER, episodes=10, time=_time(full, 50_000, 7200.0, 6750.0, 350.0, compile_s=100.0))
    # walker: a seed group of 3 on the tests' short schedule (10 pretraining + 30 steps, 3 evaluations of 2
    # episodes), the example time.
    _group(tmp_path / "walker", "walker2d-medium-v2", {s: [(20, 1.0), (30, 2.0), (40, 3.0)] for s in range(3)},
           episodes=2, time=_time(40, 10, 66.0, 36.83, 24.16, compile_s=5.0))
    # antmaze: resumed at step 500,000 of its 550,000, its summary times only the last process (one evaluation
    # of 100 episodes); a second run made before summary.json had a time.
    _run(tmp_path / "ant" / "s0", "antmaze-umaze-v0", 0, [(300_000, 50.0), (550_000, 90.0)],
         hyper={**PAPER_HYPER, "epochs": 500}, episodes=100,
         time=_time(50_000, 0, 1500.0, 1200.0, 300.0, first_step=500_000, hardware="NVIDIA H200"))
    _run(tmp_path / "ant" / "s1", "antmaze-umaze-v0", 1, [(40, 80.0)])
    md, rows, _ = report.report(tmp_path, tmp_path / "out")
    by = {r.task: r.time for r in rows}

    h = by["hopper-medium-v2"]
    assert (len(h.runs), h.untimed, h.projected, h.paper_hours) == (1, 0, 0, 5.0)
    assert h.hours_per_run == h.hours_per_seed == pytest.approx(2.0) and h.speedup == pytest.approx(2.5)
    assert h.s_per_1k == pytest.approx(6750.0 / full * 1000)
    assert ("| hopper-medium-v2 | 1 of 1 | 2.00 | 2.00 | 5.0 | 2.50× (AMD EPYC, 1 torch threads vs RTX A5000) | "
            f"{6750.0 / full * 1000:.1f} | measured |") in md

    w = by["walker2d-medium-v2"]
    # compile once + training at 36.83 s / 40 steps for all 1,050,000 + 24.16 s / 3 evaluations, scaled from
    # 2 to the task's 10 episodes, for the schedule's 20 evaluations (1000 epochs, one every 50).
    projected_h = (5.0 + 36.83 / 40 * full + 24.16 / 3 * 10 / 2 * 20) / 3600
    (run,) = w.runs
    assert run.projected and run.seeds == 3 and run.hours == pytest.approx(projected_h)
    assert w.hours_per_seed == pytest.approx(projected_h / 3) and w.speedup == pytest.approx(4.9 / (projected_h / 3))
    assert (f"| walker2d-medium-v2 | 1 of 1 | {projected_h:.2f} | {projected_h / 3:.2f} | 4.9 | "
            f"{4.9 / (projected_h / 3):.2f}× (AMD EPYC, 1 torch threads vs RTX A5000) | {36.83 / 40 * 1000:.1f} | "
            "projection from the training rate: 1 of 1 run(s) ran 40 of 1,050,000 steps in their timed process |") in md

    a = by["antmaze-umaze-v0"]
    ant_h = (0.0 + 1200.0 / 50_000 * 550_000 + 300.0 * 10) / 3600    # 10 evaluations: 500 epochs, one every 50
    assert (len(a.runs), a.untimed, a.projected) == (1, 1, 1) and a.hours_per_run == pytest.approx(ant_h)
    assert (f"| antmaze-umaze-v0 | 1 of 2 | {ant_h:.2f} | {ant_h:.2f} | 3.3 | {3.3 / ant_h:.2f}× (NVIDIA H200 vs "
            "RTX A5000) |") in md
    assert ("projection from the training rate: 1 of 1 run(s) ran 50,000 of 550,000 steps in their timed process; "
            "1 run(s) unknown (no time in summary.json) |") in md
    assert "DTQL trains at 21.83 s per 1k steps" in md
    assert "| antmaze-umaze-v0 | 1 | finished | 40/40 | 1 | 80.0 | 80.0 | unknown |  |" in md
    assert f"| hopper-medium-v2 | 0 | finished | {full:,}/{full:,} | 20 | 90.0 | 90.0 | 2.000 |  |" in md

    csv_rows = {r["task"]: r for r in csv.DictReader(open(tmp_path / "out" / "report.csv"))}
    assert float(csv_rows["walker2d-medium-v2"]["hours_per_seed"]) == pytest.approx(projected_h / 3, abs=1e-4)
    assert csv_rows["hopper-medium-v2"]["time_basis"] == "measured"
    assert csv_rows["hopper-medium-v2"]["hardware"] == MACHINE


def test_time_split_beside_table7(tmp_path):
    """Where the timed processes' hours went, part by part as shares of their wall time, beside Table 7's hours;
    a process from before the split counts among the timed runs but not in the split."""
    parts = {"startup_s": 10.0, "data_s": 20.0, "compile_s": 30.0, "steps_s": 500.0, "eval_s": 5.0,
             "eval_wait_s": 15.0, "checkpoint_s": 8.0, "logging_s": 7.0, "other_s": 5.0}   # 600 s
    split = {**_time(40, 10, 600.0, 550.0, 20.0, compile_s=30.0), "split": parts, "eval_off_path_s": 180.0}
    half = {**split, "total_s": 300.0, "split": {k: v / 2 for k, v in parts.items()}, "eval_off_path_s": 90.0}
    _run(tmp_path / "w0", "walker2d-medium-v2", 0, [(40, 1.0)], time=split)
    _run(tmp_path / "w1", "walker2d-medium-v2", 1, [(40, 1.0)], time=half)
    _run(tmp_path / "w2", "walker2d-medium-v2", 2, [(40, 1.0)], time=_time(40, 10, 600.0, 550.0, 20.0))
    md, rows, _ = report.report(tmp_path, tmp_path / "out")
    n, total, seconds, off = rows[0].time.split
    assert (n, total, off) == (2, 900.0, 270.0) and seconds["steps"] == 750.0 and seconds["eval_wait"] == 22.5
    shares = " | ".join(f"{100 * v / 600:.1f}%" for v in parts.values())
    assert f"| walker2d-medium-v2 | 2 of 3 | 0.250 | {shares} | 0.075 | 4.9 |" in md
    assert "| start-up | data | compile | training steps | evaluation | waiting for evaluation |" in md
    row = next(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    assert float(row["steps_s"]) == 750.0 and float(row["eval_off_path_s"]) == 270.0


def test_what_could_not_be_read_is_said_per_run_and_strict_fails(tmp_path, capsys):
    """Broken run folders are named with what was wrong; --strict exits non-zero, the report is written anyway."""
    import os
    import socket

    _run(tmp_path / "whole", "hopper-medium-v2", 0, [(20, 10.0), (40, 40.0)])
    _run(tmp_path / "cut", "hopper-medium-v2", 1, [(20, 10.0), (40, 40.0)])
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cut" / "metrics.jsonl").write_text("".join(lines[:2]) + '{"kind": "ev')  # cut mid-row
    _run(tmp_path / "badcfg", "hopper-medium-v2", 2, [(20, 10.0), (40, 40.0)])
    (tmp_path / "badcfg" / "config.json").write_text('{"task": ')
    _run(tmp_path / "nocfg", "hopper-medium-v2", 3, [(20, 10.0), (40, 40.0)])
    (tmp_path / "nocfg" / "config.json").unlink()
    _run(tmp_path / "stopped", "hopper-medium-v2", 4, [(20, 10.0)], finished=False)
    _run(tmp_path / "diverged", "hopper-medium-v2", 5, [(20, 10.0)], finished=False)
    with open(tmp_path / "diverged" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 22, "loss_q": float("nan")}) + "\n")
    _run(tmp_path / "live", "hopper-medium-v2", 6, [(20, 10.0)], finished=False)
    (tmp_path / "live" / "run.lock").write_text(f"{os.getpid()} {socket.gethostname()} 2026-11-30 12:00:00\n")

    _, _, warned = report.report(tmp_path, tmp_path / "out")
    by = {}
    for d, w in warned:
        by.setdefault(d.name, []).append(w)
    assert by == {
        "cut": ["metrics.jsonl ends at step 5 but summary.json says the run reached step 40: rows are missing "
                "(the file was cut short or replaced)"],
        "badcfg": ["config.json cannot be read (not JSON: cut short or edited?)"],
        "nocfg": ["config.json is missing: task, seed and schedule unknown (the task is taken from the folder name)"],
        "stopped": [f"stopped at step 5 and not running; resume with python -m dtql_fast.train --resume "
                    f"{tmp_path / 'stopped'}"],
        "diverged": ["diverged at step 22 (non-finite values in its last metric row)"],
    }  # "whole" and "live" (its lock held by a running process) have nothing to say
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Warnings" in md and f"- `{tmp_path / 'diverged'}`: diverged at step 22" in md
    assert "| hopper-medium-v2 | 5 | unfinished | 22/40 | 1 | 10.0 | 10.0 | unknown | diverged at step 22" in md

    capsys.readouterr()
    report.main([str(tmp_path), "--out", str(tmp_path / "out2")])  # exit 0, the warnings on stderr
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'badcfg'}: config.json cannot be read" in err and len(err.splitlines()) == 5
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path), "--out", str(tmp_path / "out3"), "--strict"])
    assert e.value.code == "error: --strict: 5 run folder(s) with warnings (above)"
    assert (tmp_path / "out3" / "report.md").exists()
    report.main([str(tmp_path / "whole"), "--out", str(tmp_path / "out4"), "--strict"])  # a whole run: exit 0
