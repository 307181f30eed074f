"""The FlowRL peer benchmark (profiling/peer_flowrl.py) runs only against a checkout the user supplies, with
JAX installed; without them it stops at once, saying what it needs. (Its timings are not part of CI.)"""
import pytest

from dtql_fast.profiling import peer_flowrl


def test_a_folder_without_flowrl_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(SystemExit, match=r"no flowrl/agent/offline/dtql.py there; give a checkout of "
                                         r"github.com/typoverflow/flow-rl"):
        peer_flowrl.main(["--flowrl-src", str(tmp_path)])


def test_a_checkout_whose_stack_is_missing_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "flowrl" / "agent" / "offline").mkdir(parents=True)
    (tmp_path / "flowrl" / "agent" / "offline" / "dtql.py").write_text("import jax_is_not_here_for_this_test\n")
    for f in ("flowrl/__init__.py", "flowrl/agent/__init__.py", "flowrl/agent/offline/__init__.py"):
        (tmp_path / f).write_text("")
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    with pytest.raises(SystemExit, match=r'importing FlowRL failed .*pip install "dtql_fast\[peer\]"'):
        peer_flowrl.main(["--flowrl-src", str(tmp_path)])
