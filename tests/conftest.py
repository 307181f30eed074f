import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors under the interpreter, chosen when a kernel is defined.
if not torch.cuda.is_available(): os.environ.setdefault("TRITON_INTERPRET", "1")  # noqa: E701


def pytest_configure(config):
    # The tests' tensors are small: a second intra-op thread costs more in sync than it saves,
    # and on a loaded 2-core machine it makes every small op wait for the other core.
    torch.set_num_threads(1)
    # The tests compile into the trainer's per-instruction-set cache (compiling.use_cache): in torch's default
    # folder, a run under ATEN_CPU_CAPABILITY=avx2 loaded graphs built for AVX-512 and AMX and got inf losses
    # (test_update.py::test_compiled_step_matches_reference, Intel Xeon, 2026-12-06).
    from dtql_fast import compiling
    compiling.use_cache()
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
