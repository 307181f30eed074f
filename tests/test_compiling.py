"""When a run compiles (the default's rule) and the compile cache it keeps between runs."""
import json
import re
from pathlib import Path

import pytest
import torch

from dtql_fast import compiling
from dtql_fast.train import parse_args, train

TINY = ["--epochs", "1", "--steps-per-epoch", "20", "--pretrain-epochs", "1", "--eval-every", "1",
        "--eval-episodes", "1", "--batch-size", "32", "--log-every", "10", "--threads", "1"]


@pytest.fixture(autouse=True)
def _minari_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.getbasetemp() / "minari"))


def test_rule_short_runs_stay_eager_long_runs_compile():
    short = compiling.decide(eager_step_s=0.04, steps_left=500, graphs=2, warm=False)
    long = compiling.decide(eager_step_s=0.04, steps_left=200_000, graphs=2, warm=False)
    assert short.compile is False and long.compile is True
    # a run in between compiles only when the cache is warm
    mid_steps = int(2 * compiling.WARM_S_PER_GRAPH / (0.04 * (1 - compiling.COMPILED_OVER_EAGER))) * 2
    assert compiling.decide(0.04, mid_steps, 2, warm=True).compile is True
    assert compiling.decide(0.04, mid_steps, 2, warm=False).compile is False
    assert "cold compiling for 2 graph(s)" in short.why


def test_requests_and_cuda_decide_at_once():
    assert compiling.initial(True, torch.device("cpu")).compile is True
    assert compiling.initial(False, torch.device("cpu")).compile is False
    assert compiling.initial(None, torch.device("cpu")).compile is None
    assert compiling.initial(None, torch.device("cuda")).compile is True


def test_cache_folder_is_per_torch_version_and_instruction_set(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    path = compiling.use_cache()
    assert path.is_dir() and path.parent == tmp_path / "dtql_fast" / "compile"
    assert torch.__version__.split("+")[0] in path.name
    assert torch.backends.cpu.get_cpu_capability().lower() in path.name
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compiling.use_cache() == tmp_path / "mine"  # the user's choice wins


def test_compile_record_survives_garbage(tmp_path):
    assert not compiling.compiled_before(tmp_path, "sig")
    compiling.remember(tmp_path, "sig", 12.5)
    assert compiling.compiled_before(tmp_path, "sig")
    (tmp_path / compiling.RECORD).write_text("{not json")
    assert not compiling.compiled_before(tmp_path, "sig")  # unreadable: cold, never an error


def test_default_short_cpu_run_stays_eager(tmp_path, capsys):
    summary = train(parse_args([*TINY, "--out", str(tmp_path / "run")]))
    text = capsys.readouterr().out
    assert "step: auto (timing 10 eager steps to decide)" in text
    assert "step: eager for the rest of the run: 27 steps left" in text
    assert summary["step_mode"] == "eager" and "compiled_graphs" not in summary


def test_default_compiles_where_it_pays_and_a_corrupt_cache_only_costs_time(tmp_path, monkeypatch, capsys):
    """The rule says compile (a free compile here): the run switches after its timed eager steps.
    Then every file of the cache it wrote is overwritten with garbage, and the same run again
    recompiles and ends on the same numbers. (Under the C++ wrapper, torch imports the garbage module
    file and fails: the step is compiled with the Python wrapper instead and the file removed.)"""
    monkeypatch.setattr(compiling, "COLD_S_PER_GRAPH", 0.0)
    monkeypatch.setattr(compiling, "WARM_S_PER_GRAPH", 0.0)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    torch._dynamo.reset()
    first = train(parse_args([*TINY, "--out", str(tmp_path / "a")]))
    text = capsys.readouterr().out
    assert "step: compiled for the rest of the run" in text and first["step_mode"] == "compile"
    assert "compiled the pretraining step in" in text and f"kept for the next run in {tmp_path / 'cache'}" in text
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(files) > 10
    for p in files:  # a new file in its place: this process still maps the old .so files
        p.unlink()
        p.write_bytes(b"\x00garbage" * 7)
    torch._dynamo.reset()
    second = train(parse_args([*TINY, "--out", str(tmp_path / "b")]))
    assert second["step_mode"] == "compile"
    err = capsys.readouterr().err
    assert "compiling the step with inductor's C++ wrapper failed" in err and "with the Python wrapper instead" in err
    removed = re.search(r"removed the unreadable cache file\(s\) (\S+\.py)", err)
    assert removed and not Path(removed.group(1)).exists()
    rows = lambda d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k not in ("steps_per_s", "wall_s")}  # noqa: E731
    assert [strip(r) for r in rows("a")] == [strip(r) for r in rows("b")]
