"""What only a GPU can show, and what the first GPU window runs (profiling.gpu_check): the CUDA-graph
step against the compiled step it captured, fresh noise on every replay, a seed group against its
single-seed runs on the device, a checkpoint resumed on the device. Tests that make sense on a CPU
too run there as well (the "cpu" parameter), so their logic is checked in every CI run."""
import pytest
import torch

from dtql_fast.draws import sample_draws
from dtql_fast.profiling import gpu_check, seeds_bench
from dtql_fast.profiling.variants import SHAPES, Variant, make_draws, synthetic_transitions
from dtql_fast.reference import ReferenceDTQL
from dtql_fast.tasks import TASKS
from dtql_fast.steppers import CUDAGraphStep
from test_train import straight_and_resumed
from tree import tensors

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# Small networks keep each compile short; batch 256 is the walker's, where a step is launch-bound.
HYPER = TASKS["walker2d-medium-v2"].hyper.replace(hidden=64)


def _walker(device, rows=5000):
    S, A = SHAPES["walker2d"]
    return S, A, synthetic_transitions(S, A, rows, 0, device, HYPER.max_action)


@pytest.mark.cuda
def test_cuda_graph_step_equals_the_compiled_step_over_50_steps():
    device = torch.device("cuda")
    S, A, data = _walker(device)
    draws = make_draws(data.n, HYPER, A, 54, 1, device)
    torch.manual_seed(0)
    init = ReferenceDTQL(S, A, HYPER, device)
    compiled, graphed = (Variant(name, init, data, HYPER, draws, device) for name in ("compile", "cudagraph"))
    for i, d in enumerate(draws):
        a, b = compiled.step(d).clone(), graphed.step(d).clone()
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"metrics of step {i}: {m}")
    assert graphed._k.item() == len(draws)  # every step read its own draws from the device buffers
    for net, params in compiled.agent.params().items():
        for k, p in params.items():
            torch.testing.assert_close(graphed.agent.params()[net][k], p, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{net}.{k} after {len(draws)} steps: {m}")


@pytest.mark.cuda
def test_cuda_graph_replays_draw_fresh_noise():
    """Draws made inside a captured graph come from the CUDA generator's philox offsets, which each
    replay advances: no two replays may repeat a draw."""
    graph = CUDAGraphStep(lambda: sample_draws(10_000, 256, 6, 4, device="cuda").tensors(), warmup=3)
    outs = [[t.clone() for t in graph()] for _ in range(8)]  # 3 plain calls, the capture, 4 replays
    assert graph.graph is not None
    for prev, cur in zip(outs[3:], outs[4:]):
        for p, c in zip(prev, cur):
            assert not torch.equal(p, c)
    idx = outs[-1][0]
    assert idx.min() >= 0 and idx.max() < 10_000


@pytest.mark.parametrize("device", DEVICES)
def test_seed_group_equals_its_single_seed_runs(device):
    S, A, data = _walker(device)
    row = seeds_bench.run_group(3, S, A, HYPER, data, torch.device(device), steps=4, warmup=1,
                                compiled=device == "cuda", seed=0, block=2)
    assert row["passed"], row
    assert row["worst_over_tol"] <= 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_resumed_on_the_device_continues_the_run(device, tmp_path, monkeypatch, capsys):
    """Stopped mid-run and resumed (on CUDA: compiled, in CUDA graphs) against a run never stopped.
    Bitwise on CPU; on CUDA within 1e-5 of the weights' scale, since some backward kernels (index_add's
    atomics) do not fix their summation order, and the difference found is printed."""
    data = gpu_check.write_d4rl(tmp_path / "d.hdf5", *gpu_check.HOPPER, rows=3000)
    args = ["--task", "hopper-medium-v2", "--dataset", str(data), "--device", device, "--no-eval",
            "--pretrain-epochs", "1", "--epochs", "2", "--steps-per-epoch", "12", "--batch-size", "64",
            "--log-every", "4", "--seed", "3", "--threads", "1",
            "--compile" if device == "cuda" else "--no-compile"]
    a, b = straight_and_resumed(args, tmp_path, monkeypatch)
    assert a["step"] == b["step"] == 36
    ta, tb = dict(tensors(a["agent"])), dict(tensors(b["agent"]))
    assert ta.keys() == tb.keys() and len(ta) > 50
    worst = max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta if ta[k].is_floating_point())
    with capsys.disabled():
        print(f"\n{device}: resumed vs straight, largest weight difference {worst:.3g}")
    if device == "cpu":
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    else:
        scale = max(ta[k].abs().max().item() for k in ta if ta[k].is_floating_point())
        assert worst <= 1e-5 * scale
