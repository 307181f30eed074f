"""The README's and the docs' commands and code run as written."""
import json
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The sweep hands every flag it does not know to the train CLI (sweep.parse_args), so a sweep command
# may give the train CLI's flags too.
FORWARDS_TO = {"dtql_fast.sweep": "dtql_fast.train"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "2>", "2>&1"}


def bash_blocks(text: str) -> list[str]:
    """Every ```bash block of a Markdown text, those indented inside a list item too."""
    return [textwrap.dedent(m.group(2)) for m in
            re.finditer(r"^([ \t]*)```bash\n(.*?)^\1```", text, re.S | re.M)]


def dtql_commands(block: str) -> list[tuple[str, list[str]]]:
    """(module, its arguments) for each `python -m dtql_fast.<module> ...` of a bash block."""
    found = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        for m in re.finditer(r"python -m (dtql_fast(?:\.\w+)+)", line):
            lex = shlex.shlex(line[m.end():], posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            args = []
            for token in lex:
                if token in SHELL_OPERATORS:
                    break
                args.append(token)
            found.append((m.group(1), args))
    return found


def documented_commands() -> list[tuple[str, str, list[str]]]:
    return [(page.relative_to(ROOT).as_posix(), module, args)
            for page in PAGES for block in bash_blocks(page.read_text()) for module, args in dtql_commands(block)]


# Run in a child process, which imports each module as `python -m` would and stops it at its first
# argument parse, reporting the parser's option strings (and each subcommand's) instead of parsing.
PROBE = r'''
import argparse, json, runpy, sys

class Parsed(BaseException):
    pass

def stop(parser, args=None, namespace=None):
    subcommands = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subcommands = {name: sorted(sub._option_string_actions) for name, sub in action.choices.items()}
    raise Parsed(sorted(parser._option_string_actions), subcommands)

argparse.ArgumentParser.parse_known_args = stop
found = {}
for module in sys.argv[1:]:
    sys.argv = [module]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        found[module] = {"error": "ran to the end without parsing its arguments"}
    except Parsed as p:
        found[module] = {"options": p.args[0], "subcommands": p.args[1]}
    except BaseException as e:
        found[module] = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(found))
'''


def parsers(modules) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *sorted(modules)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def problems(commands, found) -> list[str]:
    """What is wrong with each documented command: a module that does not run, or a flag it does not take."""
    bad = []
    for page, module, args in commands:
        parser = found[module]
        if "error" in parser:
            bad.append(f"{page}: python -m {module}: {parser['error']}")
            continue
        accepted = set(parser["options"])
        if module in FORWARDS_TO:
            accepted |= set(found[FORWARDS_TO[module]].get("options", ()))
        subcommand = next((a for a in args if not a.startswith("-")), None) if parser["subcommands"] else None
        if parser["subcommands"]:
            if subcommand not in parser["subcommands"]:
                bad.append(f"{page}: python -m {module} {subcommand}: not one of its subcommands "
                           f"{sorted(parser['subcommands'])}")
                continue
            accepted |= set(parser["subcommands"][subcommand])
        for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
            if flag not in accepted:
                bad.append(f"{page}: python -m {module} {' '.join(args)}: {module} takes no {flag}")
    return bad


def test_readme_starts_with_the_two_setup_commands():
    first_block = bash_blocks(README)[0].strip().splitlines()
    assert first_block[0].endswith("-e . && python -m dtql_fast.train")
    assert first_block[1].endswith('-e ".[test]" && python -m pytest -q tests && bash .ci/older-torch')
    assert all(line.startswith("python -m pip install torch==2.13.0 ") for line in first_block)
    assert "grep -m1 'pytest'" in (ROOT / ".ci" / "run").read_text()  # CI runs that very line
    # the docs site's home repeats them: the same two lines
    assert bash_blocks((ROOT / "docs" / "index.md").read_text())[0] == bash_blocks(README)[0]


def test_reference_snippet_runs(tmp_path, capsys):
    page = (ROOT / "docs" / "fast-path.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    path = tmp_path / "snippet.py"
    path.write_text(code)
    runpy.run_path(str(path))
    out = capsys.readouterr().out
    for key in ("loss_v", "loss_q", "loss_bc", "loss_tr", "loss_pq", "loss_policy"):
        assert key in out


def test_command_extraction_reads_what_a_shell_would():
    block = textwrap.dedent("""\
        python -m dtql_fast.sweep --tasks a,b --seeds 0-4 --out sweeps/gym \\
            --dataset ~/.d4rl/datasets --compile     # every other flag goes to --train
        TORCHINDUCTOR_CPP_WRAPPER=0 python -m dtql_fast.train --candidate '{"a": 1}' --lr=1e-4 && ls --all
        python -m pip install -e . && python -m dtql_fast.behaviour rollout --out x.hdf5 > log.txt
        """)
    assert dtql_commands(block) == [
        ("dtql_fast.sweep", ["--tasks", "a,b", "--seeds", "0-4", "--out", "sweeps/gym", "--dataset",
                             "~/.d4rl/datasets", "--compile"]),
        ("dtql_fast.train", ["--candidate", '{"a": 1}', "--lr=1e-4"]),
        ("dtql_fast.behaviour", ["rollout", "--out", "x.hdf5"])]
    assert bash_blocks("- item\n\n  ```bash\n  python -m dtql_fast.toy --steps 1\n  ```\n") == [
        "python -m dtql_fast.toy --steps 1\n"]


def test_every_documented_command_names_a_module_and_flags_it_takes():
    commands = documented_commands()
    modules = {module for _, module, _ in commands}
    # the tour's commands and the topic pages' are all found (a broken extraction must not pass empty)
    assert {"dtql_fast.train", "dtql_fast.evaluate", "dtql_fast.sweep", "dtql_fast.report",
            "dtql_fast.profiling.bench", "dtql_fast.profiling.gpu_check", "dtql_fast.toy"} <= modules
    assert len(commands) >= 30
    found = parsers(modules | set(FORWARDS_TO.values()))
    assert problems(commands, found) == []
    # and the check does catch a flag a parser does not take, a missing module, a wrong subcommand
    wrong = [("x.md", "dtql_fast.train", ["--task", "t", "--no-such-flag", "1"]),
             ("x.md", "dtql_fast.no_such_module", []),
             ("x.md", "dtql_fast.behaviour", ["fly", "--out", "x"])]
    found.update(parsers({"dtql_fast.no_such_module"}))
    assert [p.split(": ", 1)[0] for p in problems(wrong, found)] == ["x.md"] * 3
    assert "takes no --no-such-flag" in problems(wrong[:1], found)[0]
