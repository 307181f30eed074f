"""profiling/learning.py: the whole-run comparison's statistics, folders and commands (the runs
themselves are opt-in, not CI: they take hours)."""
import json
import math

import pytest

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
    steps, mean, se = learning.curves(learning.read_variant(root / "release"), "eval", "score_mean")
    assert list(steps) == [1000, 2000] and mean[1] == pytest.approx(45.0)


def test_ours_commands_are_the_trainers():
    sched = {"epochs": 5, "pretrain_epochs": 1, "eval_every": 2, "steps_per_epoch": 100, "eval_episodes": 4}
    group = learning.ours_command("group-compiled", "hopper-medium-v2", "d.hdf5", [0, 1, 2], sched, learning.Path("o"))
    assert len(group) == 1 and group[0][group[0].index("--seeds") + 1] == "0-2" and "--compile" in group[0]
    singles = learning.ours_command("single-eager", "hopper-medium-v2", "d.hdf5", [3, 4], sched, learning.Path("o"))
    assert [c[c.index("--seed") + 1] for c in singles] == ["3", "4"] and all("--no-compile" in c for c in singles)
    assert singles[0][singles[0].index("--out") + 1] == "o/single-eager/seed3"
    for flag, value in (("--epochs", "5"), ("--eval-episodes", "4"), ("--steps-per-epoch", "100"), ("--threads", "1")):
        assert group[0][group[0].index(flag) + 1] == value
