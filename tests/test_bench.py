"""The benchmark harness: it runs, checks every variant against the reference, and fails loudly.

Tiny shapes (batch 32, hidden 32) keep the compile to seconds once inductor's on-disk cache holds
the graph (the first compile on a cold cache takes about a minute on 2 cores).
"""
import json
import subprocess
import sys

import pytest
import torch

from dtql_fast.profiling import bench, equivalence

TINY = ["--device", "cpu", "--threads", "1", "--batch-size", "32", "--hidden", "32"]


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_cpu_reference_eager_compile_pass_and_json_has_documented_keys(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(TINY + ["--variants", "reference,eager,compile", "--steps", "3", "--warmup", "2",
                            "--memory-steps", "4", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "RESULT: PASS" in text and "median ms" in text and "round-off floor" in text
    res = _load(out)
    assert res["passed"] is True
    meta = res["meta"]
    for key in ("task", "state_dim", "action_dim", "batch_size", "hidden", "device", "variants", "steps",
                "warmup", "seed", "tolerances", "command", "timestamp", "machine", "phase_overhead_us"):
        assert key in meta, key
    for key in ("cpu", "gpu", "torch", "triton", "python", "git_commit"):
        assert key in meta["machine"], key
    assert (meta["state_dim"], meta["action_dim"], meta["batch_size"], meta["hidden"]) == (17, 6, 32, 32)
    assert "dtql_fast.profiling.bench" in meta["command"] and "--memory-steps" in meta["command"]
    assert list(res["variants"]) == ["reference", "eager", "compile"]
    for name, row in res["variants"].items():
        assert row["status"] == "PASS", (name, row.get("equivalence", {}) and row["equivalence"]["failures"])
        t = row["timing"]
        assert len(t["times_ms"]) == 3 and t["min_ms"] <= t["median_ms"] <= t["max_ms"]
        assert t["steps_per_s"] > 0 and t["speedup"] > 0 and t["gflops_per_s"] > 0
        assert row["launches"]["launches"] > 0 and row["flops"] > 0 and row["max_rss_bytes"] > 0
        assert row["first_call_s"] > 0
    assert res["variants"]["reference"]["timing"]["speedup"] == pytest.approx(1.0)
    assert res["variants"]["compile"]["compile_s"] > 0 and res["variants"]["eager"]["compile_s"] is None
    # The compiled step fuses: far fewer launches than the eager step's dispatched ops.
    assert res["variants"]["compile"]["launches"]["launches"] < res["variants"]["eager"]["launches"]["launches"]
    eq = res["variants"]["eager"]["equivalence"]
    assert eq["steps_compared"] == 5
    assert set(eq["metrics"]) == {"loss_v", "loss_q", "loss_bc", "loss_tr", "loss_pq", "loss_policy",
                                  "q_mean", "v_mean"}  # walker: gamma = 0, no entropy term
    for entry in eq["metrics"].values():
        assert {"max_abs", "max_rel", "worst_over_tol"} <= set(entry)
    assert "critic.q1.0.weight" in eq["params"]
    for entry in eq["params"].values():
        assert {"max_abs", "frac_gt_1e-6", "tol"} <= set(entry)
    mem = res["memory_steps"]
    assert mem["variant"] == "compile" and mem["steps"] == 4
    assert mem["step_0"]["rss_bytes"] > 0 and mem["step_4"]["rss_bytes"] > 0


def test_perturbed_variant_fails_and_is_not_timed(tmp_path):
    """The --perturb self-test, through the real command line: exit status 1, FAIL, no timing."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "dtql_fast.profiling.bench", *TINY, "--variants", "reference,eager",
           "--steps", "3", "--warmup", "1", "--perturb", "eager", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "RESULT: FAIL (eager)" in proc.stdout
    assert "not timed: failed equivalence" in proc.stdout
    res = _load(out)
    assert res["passed"] is False
    eager = res["variants"]["eager"]
    assert eager["status"] == "FAIL" and eager["timing"] is None
    assert any("critic.q1.0.weight" in msg for msg in eager["equivalence"]["failures"])
    assert res["variants"]["reference"]["status"] == "PASS"


def test_compare_flags_a_wrong_loss_and_passes_round_off():
    keys = ["loss_v"]
    p = {"critic.w": torch.ones(4, 4)}
    ref = {"hist": [[1.0], [1.0], [1.0], [1.0]], "params": p}
    floor = {"hist": [[1.0], [1.0], [1.0], [1.0 + 1e-6]], "params": {"critic.w": torch.ones(4, 4)}}
    lrs = {"critic": 3e-4}
    ok = {"hist": [[1.0 + 1e-6], [1.0], [1.0], [1.0 + 5e-4]], "params": {"critic.w": torch.ones(4, 4) + 1e-7}}
    assert equivalence.compare(ref, ok, floor, keys, lrs)["passed"]
    bad_loss = {"hist": [[1.0], [1.0 + 1e-4], [1.0], [1.0]], "params": p}  # step 2: 1e-4 > 1e-5 + 1e-5
    res = equivalence.compare(ref, bad_loss, floor, keys, lrs)
    assert not res["passed"] and res["metrics"]["loss_v"]["worst_step"] == 2
    bad_param = {"hist": ref["hist"], "params": {"critic.w": torch.ones(4, 4) + 1e-2}}
    assert not equivalence.compare(ref, bad_param, floor, keys, lrs)["passed"]
    nan = {"hist": [[1.0], [float("nan")], [1.0], [1.0]], "params": p}
    assert not equivalence.compare(ref, nan, floor, keys, lrs)["passed"]


def test_cuda_only_variants_are_refused_on_cpu(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu", "--variants", "reference,cudagraph"])
    assert e.value.code == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_help_documents_the_perturb_self_test(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert "self-test" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_all_variants_pass(tmp_path):
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cuda", "--batch-size", "256", "--hidden", "64", "--steps", "5", "--warmup", "4",
                     "--variants", ",".join(bench.VARIANTS), "--memory-steps", "20", "--json", str(out)])
    res = _load(out)
    assert rc == 0, {n: r.get("equivalence") and r["equivalence"]["failures"] for n, r in res["variants"].items()}
    for row in res["variants"].values():
        assert row["peak_mem_bytes"] > 0 and row["launches"]["launches"] > 0
    assert res["memory_steps"]["growth_bytes"] <= 0


def test_seeds_mode_times_a_group_beside_its_single_seed_steps(tmp_path, capsys):
    """--seeds: each group size is timed against its single-seed steps in one run, and each seed of
    the group is checked against its single-seed run first."""
    out = tmp_path / "seeds.json"
    rc = bench.main(TINY + ["--seeds", "1,3", "--seeds-mode", "eager", "--steps", "4", "--warmup", "1",
                            "--seeds-block", "2", "--json", str(out)])  # 5 steps: blocks 2, 2, 1
    text = capsys.readouterr().out
    assert rc == 0 and "RESULT: PASS" in text and "ms/seed-step" in text
    res = _load(out)
    assert [len(g["seeds"]) for g in res["groups"]] == [1, 3] and res["passed"]
    for g in res["groups"]:
        assert len(g["times_group_ms"]) == len(g["times_singles_ms"]) == 4 and g["block"] == 2
        assert g["seed_step_ms"] == pytest.approx(g["group_ms"] / len(g["seeds"]))
        assert g["seed_step_over_single_step"] == pytest.approx(g["seed_step_ms"] / g["single_step_ms"])
        assert g["worst_over_tol"] <= 1.0
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--seeds", "0,2"])
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--seeds", "2", "--seeds-block", "0"])
