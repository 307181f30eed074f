"""The CPU step's time split (profiling.breakdown): categories from real profiler events of a compiled step."""
import json
import math

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
                           "--kernels", "5", "--matmuls", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    parts = row["split_ms"]
    # every category the step has is seen: its matmuls, its Adam kernels, other kernels, the wrapper, the guards
    assert all(parts[c] > 0 for c in ("matmul", "optimizer", "elementwise", "wrapper", "guards")), parts
    assert row["profiled_ms_per_step"] == pytest.approx(sum(parts.values()))
    assert row["matmul_gflop_per_step"] > 0 and row["matmul_ceiling_gflops"] > 0
    printed = capsys.readouterr().out
    assert "| threads | step ms |" in printed
    # the costliest rows: five, most self time first, their categories those of the split, the matmuls among them
    top = row["costliest"]
    assert len(top) == 5 and [k["ms_per_step"] for k in top] == sorted((k["ms_per_step"] for k in top), reverse=True)
    assert all(k["category"] == breakdown.category(k["name"]) and k["calls_per_step"] > 0 for k in top)
    assert "matmul" in {k["category"] for k in top}
    assert "costliest rows at 1 thread(s)" in printed
    # by shape: every matmul of a step at hidden 32 and batch 32, its FLOPs counted from its operands
    shapes = row["matmuls_by_shape"]
    assert shapes and all(m["gflops"] > 0 and m["calls_per_step"] > 0 for m in shapes)
    assert all(m["shapes"][0][-1] == m["shapes"][1][-2] for m in shapes)  # inner dimensions agree
    # The FLOP counter counts the eager step's matmuls; inductor lowers those with a dimension of 1 (the value
    # heads and their gradients, outer products) to fused kernels, which then are not matmuls in the profile.
    flop = sum(2 * m["calls_per_step"] * math.prod(m["shapes"][0]) * m["shapes"][1][-1] for m in shapes)
    assert all(1 not in (m["shapes"][0][-1], m["shapes"][1][-1]) for m in shapes)
    assert 0.99 * row["matmul_gflop_per_step"] * 1e9 < flop <= row["matmul_gflop_per_step"] * 1e9
    assert "matmuls by shape at 1 thread(s)" in printed


def test_a_long_kernel_name_keeps_its_number():
    name = "graph_0_cpp_fused__foreach_add__foreach_addcmul_" + "x" * 200 + "_sub_sum_view_where_34"
    cut = breakdown.short(name)
    assert len(cut) == 100 and cut.endswith("_where_34") and cut.startswith("graph_0_cpp_fused__foreach")
    assert breakdown.short("aten::bmm") == "aten::bmm"
