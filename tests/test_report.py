"""The report on run folders written by hand: the numbers, unfinished and failed runs, resumed logs, the CLI."""
import json
from statistics import mean, stdev

import pytest

from dtql_fast import report

HYPER = {"pretrain_epochs": 1, "epochs": 3, "steps_per_epoch": 10}


def _run(d, task, seed, evals, finished=True, status=None, score=True):
    """A run folder as train.py (and the sweep) leave it; evals: [(step, value)]."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"task": task, "config": {"seed": seed}, "hyper": HYPER}))
    with open(d / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"kind": "train", "step": 5, "loss_q": 1.0}) + "\n")
        for step, v in evals:
            f.write(json.dumps({"kind": "eval", "step": step, "env_seed": 1000 + seed, "return_mean": v * 10,
                                "score_mean": v if score else None}) + "\n")
    if finished:
        (d / "summary.json").write_text(json.dumps({"task": task, "steps": 40}))
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
    md, rows = report.report(runs_root, tmp_path / "out")
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
    assert "| mujoco/pusher/none-v0 (return) | 1 (1 failed) | 20.0 | 20.0 | – | – | – |" in md
    assert "| hopper-medium-v2 | 2 | running | 5/40 | 2 | 25.0 | 25.0 |  |" in md
    assert "| mujoco/pusher/none-v0 | 1 | failed | 5/40 | 0 | – | – | error: bad \\| data |" in md
    assert "not finished (still going, or stopped)" in md
    csv_lines = (tmp_path / "out" / "report.csv").read_text().splitlines()
    assert csv_lines[1].startswith(f"hopper-medium-v2,normalised_score,3,1,0,{round(mean(last), 4)},")
    assert csv_lines[2].startswith("mujoco/pusher/none-v0,return,1,0,1,20.0,,20.0,,,,")
    for name in ("curves_hopper-medium-v2.png", "curves_mujoco_pusher_none-v0.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"


def _group(d, task, evals_by_seed, finished=True, status=None):
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
                                        "return_mean": v * 10, "score_mean": v}) + "\n")
    if finished:
        (d / "summary.json").write_text(json.dumps({"task": task, "steps": 40, "seeds": seeds}))
    if status:
        (d / "status.json").write_text(json.dumps(status))


def test_a_seed_group_folder_reads_as_its_seeds(tmp_path):
    """One group folder of seeds 0-2 gives the table, curve and per-seed rows of three single-seed folders."""
    evals = {0: [(20, 10.0), (30, 50.0), (40, 40.0)], 1: [(20, 20.0), (30, 30.0), (40, 60.0)],
             2: [(20, 5.0), (30, 25.0), (40, 35.0)]}
    for seed, ev in evals.items():
        _run(tmp_path / "singles" / f"s{seed}", "hopper-medium-v2", seed, ev)
    _group(tmp_path / "group" / "hopper-medium-v2", "hopper-medium-v2", evals)
    md_s, (single,) = report.report(tmp_path / "singles", tmp_path / "out_s")
    md_g, (group,) = report.report(tmp_path / "group", tmp_path / "out_g")
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
    md, rows = report.report(tmp_path, tmp_path / "out")
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
    assert out.startswith(f"# DTQL sweep report: {runs_root}") and "report.md, report.csv" in out
    assert (runs_root / "report" / "report.md").read_text() in out
    with pytest.raises(SystemExit, match="is not a folder"):
        report.main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no run folders under"):
        report.main([str(tmp_path / "empty")])
