"""Profiler ranges: every phase of a training step shows up in a CPU trace, and they cost little."""
import json
import time

import pytest
import torch

from dtql_fast.ranges import PHASES, ProfileWindow, parse_window, phase
from dtql_fast.tasks import Hyper
from dtql_fast.transitions import Transitions
from dtql_fast.steppers import StepRunner
from dtql_fast.update import FastDTQL


def _agent():
    # lr decay and gamma on, so every branch of the step runs.
    h = Hyper(alpha=1, gamma=1, lr=3e-4, lr_decay=True, epochs=1, batch_size=16, hidden=16)
    g = torch.Generator().manual_seed(0)
    N, S, A = 200, 5, 2
    data = Transitions(torch.randn(N, S, generator=g), torch.rand(N, A, generator=g) * 2 - 1,
                       torch.randn(N, 1, generator=g), torch.randn(N, S, generator=g), torch.ones(N, 1))
    return FastDTQL(S, A, h), data


def _trace_names(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [e.get("name") for e in json.load(f)["traceEvents"]]


def test_profile_window_trace_holds_every_training_phase(tmp_path):
    agent, data = _agent()
    runner = StepRunner(agent, data, mode="eager")
    window = ProfileWindow("1:3", "cpu", tmp_path)
    for step in range(4):
        window.before(step)
        runner()
        window.after(step)
    window.close()
    assert window.trace_path == tmp_path / "trace_steps_1_3.json" and window.trace_path.exists()
    names = _trace_names(window.trace_path)
    missing = set(PHASES) - {"evaluate"} - set(names)
    assert not missing, f"phases missing from the trace: {missing}"
    assert "evaluate" not in names
    assert names.count("step") == 2  # only steps 1 and 2 were recorded


def test_evaluate_phase_appears_when_evaluation_runs():
    agent, _ = _agent()
    states = torch.randn(3, 5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with phase("evaluate"):
            agent.act(states[None], torch.randn(1, 3, 8, 2), torch.rand(1, 3))
    names = {e.name for e in prof.events()}
    assert "evaluate" in names


def test_phase_overhead_without_profiler(record_property):
    """10k enter/exit pairs with no profiler attached; reported, and bounded loosely (shared CPU)."""
    n = 10_000
    for _ in range(100):  # warm up
        with phase("critic"):
            pass
    t0 = time.perf_counter()
    for _ in range(n):
        with phase("critic"):
            pass
    per_range_us = (time.perf_counter() - t0) / n * 1e6
    record_property("phase_overhead_us", per_range_us)
    print(f"\nphase() enter/exit with no profiler attached: {per_range_us:.2f} us per range")
    assert per_range_us < 50.0


def test_phase_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown phase"):
        phase("critc")


@pytest.mark.parametrize("spec", ["3", "a:b", "3:3", "-1:2", "5:2"])
def test_parse_window_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="--profile-steps"):
        parse_window(spec)


def test_parse_window():
    assert parse_window("2:5") == (2, 5) and parse_window(None) is None and parse_window("") is None
