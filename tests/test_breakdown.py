"""The CPU step's time split (profiling.breakdown): categories from real profiler events of a compiled step."""
import json

import pytest

from dtql_fast.profiling import breakdown


@pytest.mark.parametrize("name, cat", [
    ("aten::mm", "matmul"), ("aten::bmm", "matmul"), ("aten::addmm", "matmul"),
    ("graph_0_cpp_fused__foreach_add__foreach_addcmul__foreach_div_12", "optimizer"),
    ("graph_0_cpp_fused_add_clamp_exp_3", "elementwise"),
    ("## Call CompiledFxGraph fpeujsqcrgu ##", "wrapper"), ("TorchDynamo Cache Lookup", "guards"),
    ("step", "other"),
])
def test_categories(name, cat):
    assert breakdown.category(name) == cat


@pytest.mark.slow
def test_a_small_compiled_step_is_split(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert breakdown.main(["--threads", "1", "--steps", "3", "--warmup", "2", "--batch-size", "32", "--hidden", "32",
                           "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    parts = row["split_ms"]
    # every category the step has is seen: its matmuls, its Adam kernels, other kernels, the wrapper, the guards
    assert all(parts[c] > 0 for c in ("matmul", "optimizer", "elementwise", "wrapper", "guards")), parts
    assert row["profiled_ms_per_step"] == pytest.approx(sum(parts.values()))
    assert row["matmul_gflop_per_step"] > 0 and row["matmul_ceiling_gflops"] > 0
    assert "| threads | step ms |" in capsys.readouterr().out
