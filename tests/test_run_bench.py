"""The whole-run benchmark, tiny: two runs (the old acting rule, evaluated in-line and by the worker) on a
small synthetic walker file, their time split and evaluation rows in the JSON."""
import json
import pickle

import pytest

from dtql_fast.profiling import run_bench
from dtql_fast.runlog import TIME_PARTS

TINY = ["--epochs", "1", "--pretrain-epochs", "1", "--steps-per-epoch", "3", "--eval-episodes", "1",
        "--batch-size", "32", "--synthetic-rows", "1000", "--compile", "off"]


def test_run_bench_times_the_variants_and_compares_their_rows(tmp_path, capsys):
    assert run_bench.main([*TINY, "--variants", "old-inline,old-worker", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "# data: synthetic: 1,000 random transitions" in text and "pass --dataset" in text
    assert "| old-worker |" in text and "in-line and worker evaluation rows the same numbers" in text
    res = json.loads((tmp_path / "run_bench.json").read_text())
    for key in ("command", "date", "cpu", "torch", "cores", "threads", "schedule", "dataset", "variants"):
        assert key in res, key
    assert res["synthetic"] is True and "dtql_fast.profiling.run_bench" in res["command"]
    inline, worker = res["variants"]
    assert (inline["variant"], worker["variant"]) == ("old-inline", "old-worker")
    assert inline["time"]["evaluated"] == "in-line" and worker["time"]["evaluated"] == "worker"
    for v in (inline, worker):
        t = v["time"]
        assert set(t["split"]) == {f"{k}_s" for k in TIME_PARTS}
        assert sum(t["split"].values()) == pytest.approx(t["total_s"], abs=0.02)
        assert v["process_wall_s"] > t["total_s"] > 0 and [r["step"] for r in v["evals"]] == [6]
        # the child acted with the old rule (and handed it to its worker: pickled by reference)
        assert "acting with dtql_fast.profiling.run_bench.old_rule" in open(v["log"]).read()
    assert worker["evals"] == inline["evals"] and res["rows_equal"] == {"old": True}
    assert res["speedup_over_old_inline"]["old-inline"] == 1.0
    assert pickle.loads(pickle.dumps(run_bench.old_rule)) is run_bench.old_rule


def test_run_bench_refuses_unknown_variants(tmp_path):
    with pytest.raises(SystemExit):
        run_bench.main(["--variants", "old-fast", "--out", str(tmp_path)])
