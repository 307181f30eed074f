"""The GPU-time proxy, counted without a GPU (profiling/launches.py): the walker step's compile-time launch
count under a faked CUDA device. A compile-time fact, not a timing; the count must not grow (#25)."""
from dtql_fast.profiling import launches

WALKER_LAUNCHES = 148  # python -m dtql_fast.profiling.launches --task walker2d-medium-v2 (torch 2.13.0)


def test_the_walker_step_launches_no_more_kernels_than_before():
    r = launches.count("walker2d-medium-v2", ["torch"])["torch"]
    assert r["ok"], r.get("error")
    total = r["total_launches"]
    assert 0 < total <= WALKER_LAUNCHES, f"the compiled walker step now launches {total} kernels on a GPU"
