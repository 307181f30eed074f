"""The README's commands and code run as written."""
import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert first_block[0].endswith("-e . && python -m dtql_fast.train")
    assert first_block[1].endswith('-e ".[test]" && python -m pytest -q tests && bash .ci/older-torch')
    assert all(line.startswith("python -m pip install torch==2.13.0 ") for line in first_block)
    assert "grep -m1 'pytest'" in (ROOT / ".ci" / "run").read_text()  # CI runs that very line


def test_reference_snippet_runs(tmp_path, capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    path = tmp_path / "snippet.py"
    path.write_text(code)
    runpy.run_path(str(path))
    out = capsys.readouterr().out
    for key in ("loss_v", "loss_q", "loss_bc", "loss_tr", "loss_pq", "loss_policy"):
        assert key in out
