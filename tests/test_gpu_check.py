"""The GPU check's stages, run on CPU at tiny sizes as on a bare GPU machine (gymnasium, MuJoCo,
Minari, Ray and nvtx hidden by tests/bare), so that the first GPU window measures instead of debugging."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtql_fast.data import load_dataset
from dtql_fast.profiling import gpu_check

BARE = {"PYTHONPATH": str(Path(__file__).parent / "bare"), "DTQL_HIDE": "gymnasium,mujoco,minari,ray,nvtx",
        "OMP_NUM_THREADS": "1"}


def _check(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "check"
    p = subprocess.run([sys.executable, "-m", "dtql_fast.profiling.gpu_check", "--device", "cpu", "--quick",
                        "--out", str(out), *args], env={**os.environ, **BARE}, capture_output=True, text=True,
                       timeout=600, cwd=Path(__file__).parent.parent)
    return p, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_check_passes_on_a_bare_machine(tmp_path):
    p, res = _check(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    stages = {s["name"]: s for s in res["stages"]}
    assert list(stages) == ["environment", "cuda-tests", "bench-walker", "bench-antmaze", "seed-groups", "launches",
                            "trainer"]
    assert res["complete"]
    assert {"gymnasium", "mujoco", "minari", "ray", "nvtx"} <= set(stages["environment"]["data"]["missing_packages"])
    assert stages["cuda-tests"]["status"] == stages["launches"]["status"] == "skipped"
    assert stages["cuda-tests"]["reason"] == "no CUDA"
    for name in ("bench-walker", "bench-antmaze"):
        assert stages[name]["status"] == "ok" and stages[name]["data"]["passed"]
        assert {v["status"] for v in stages[name]["data"]["variants"].values()} == {"PASS"}
    assert stages["bench-antmaze"]["data"]["meta"]["task"] == "antmaze-umaze-v0"
    assert [len(g["seeds"]) for g in stages["seed-groups"]["data"]["groups"]] == [1, 2]
    assert stages["trainer"]["status"] == "ok" and stages["trainer"]["data"]["steps"] == 3 * gpu_check.TRAINER_SPE[True]
    md = (tmp_path / "check" / "summary.md").read_text()
    assert "| trainer | ok |" in md and "## seed groups" in md and "Missing packages: gymnasium" in md


def test_deadline_stops_the_check_and_keeps_what_it_has(tmp_path):
    """A deadline the stages cannot meet: the check stops, writes every stage's state and exits 1."""
    p, res = _check(tmp_path, "--deadline", "11")
    assert p.returncode == 1 and res["complete"]
    stages = res["stages"]
    assert [s["name"] for s in stages][:1] == ["environment"] and stages[0]["status"] == "ok"
    assert len(stages) == 7  # every stage listed, reached or not
    assert stages[-1]["status"] == "skipped" and stages[-1]["reason"] == gpu_check.DEADLINE_REASON
    assert "not passed: " in p.stdout and "trainer" in p.stdout.split("not passed: ")[1]


def test_training_without_gymnasium_says_what_is_missing(tmp_path):
    data = gpu_check.write_d4rl(tmp_path / "d.hdf5", *gpu_check.HOPPER, rows=300)
    p = subprocess.run([sys.executable, "-m", "dtql_fast.train", "--task", "hopper-medium-v2", "--dataset", str(data),
                        "--epochs", "1", "--out", str(tmp_path / "run")], env={**os.environ, **BARE},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (
        "error: evaluation for hopper-medium-v2 cannot run: evaluation env 'Hopper-v4' needs gymnasium, which is "
        'not installed: pip install "gymnasium[mujoco]" (or pass --no-eval)')


def test_the_check_writes_a_d4rl_file_the_loader_reads(tmp_path):
    loaded = load_dataset("hopper-medium-v2", str(gpu_check.write_d4rl(tmp_path / "d.hdf5", 11, 3, rows=1000)))
    assert (loaded.transitions.state_dim, loaded.transitions.action_dim) == (11, 3)
    assert loaded.transitions.n == 1000 - 10  # a timeout every 100 rows ends an episode: no transition from it
