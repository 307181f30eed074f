"""The docs' measured tables are the render of profiling/results/, not typed (profiling/tables.py)."""
import json
import re
import shutil
from pathlib import Path

from dtql_fast.profiling import tables

ROOT = Path(__file__).resolve().parents[1]


def copy_sources(dest: Path) -> Path:
    """Every results file a table reads, copied under dest as it lies under profiling/results/."""
    for spec in tables.TABLES.values():
        for source in spec.sources:
            target = dest / source.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tables.RESULTS / source.path, target)
    return dest


def test_committed_pages_equal_their_render(capsys):
    assert tables.main(["--check"]) == 0, capsys.readouterr().err


def test_a_changed_result_fails_the_check_naming_its_table(tmp_path, capsys):
    results = copy_sources(tmp_path / "results")
    assert tables.main(["--check", "--results", str(results)]) == 0
    bench = results / "cpu-walker2d-threads2.json"
    data = json.loads(bench.read_text())
    data["variants"]["compile"]["timing"]["median_ms"] *= 1.5
    bench.write_text(json.dumps(data))
    assert tables.main(["--check", "--results", str(results)]) == 1
    err = capsys.readouterr().err
    assert "performance.md: step-compiled" in err
    assert "step-eager" not in err  # only the table that reads the file

    # rendering (no --check) rewrites that table alone, and the page then checks clean
    docs = tmp_path / "docs"
    shutil.copytree(tables.DOCS, docs)
    assert tables.main(["--docs", str(docs), "--results", str(results)]) == 0
    assert tables.main(["--check", "--docs", str(docs), "--results", str(results)]) == 0
    before, after = (tables.DOCS / "performance.md").read_text(), (docs / "performance.md").read_text()
    assert "| 35.1 ms (min 22.5) |" in after  # the median 23.4 ms x 1.5, now more than a fifth over the min
    changed = [a for a, b in zip(after.splitlines(), before.splitlines()) if a != b]
    assert len(changed) == 1 and changed[0].startswith("| walker2d (17/6, batch 256), `--steps 30` |")


def test_every_table_names_its_files_machine_date_and_command():
    for name, spec in tables.TABLES.items():
        text = tables.render(name)
        for source in spec.sources:
            line = next(line for line in text.splitlines() if f"`profiling/results/{source.path}`" in line)
            assert "python -m dtql_fast." in line, (name, line)
            assert any(cpu in line for cpu in ("AMD EPYC", "Intel", "compile-time count")), (name, line)
            assert re.search(r"\b20\d\d-\d\d-\d\d\b", line), (name, line)


def test_a_page_with_a_broken_marker_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "p.md").write_text("<!-- table: step-compiled -->\nno end marker\n")
    assert tables.main(["--check", "--docs", str(tmp_path)]) == 1
    assert capsys.readouterr().err == ("error: p.md: a `<!-- table: NAME -->` marker without its "
                                       "`<!-- /table -->`\n")
    (tmp_path / "p.md").write_text("<!-- table: no-such -->\n<!-- /table -->\n")
    assert tables.main(["--check", "--docs", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("error: p.md: unknown table 'no-such'; the tables are step-compiled, ")
