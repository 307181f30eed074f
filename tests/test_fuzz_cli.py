"""A fuzzer for the four command lines (train, evaluate, report, sweep --dry-run): Hypothesis draws argument
vectors -- numbers at and past their bounds, huge, negative, NaN, empty and malformed lists, paths that are
files, folders, read-only or missing -- and runs each CLI's main() in this process on a tiny dataset with a short
budget. Whatever it is given, a CLI must end with status 0, 1 or 2, raise nothing else (no traceback), refuse in
one line starting `error:` (argparse's own refusals, status 2, print their usage line above it), and leave every
file that existed before unchanged (checksums), except the run a successful --resume continues.

Deterministic in CI (derandomize=True: the same examples every run); DTQL_FUZZ_EXAMPLES=500 runs a longer
profile locally."""
import contextlib
import hashlib
import io
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtql_fast import evaluate, report, sweep, train
from dtql_fast.profiling.gpu_check import write_d4rl

SCALE = int(os.environ.get("DTQL_FUZZ_EXAMPLES", "0"))
FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=SCALE or 25,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

# A short budget every train example starts from (a mutation may change any of it within SMALL).
BUDGET = {"--epochs": "1", "--steps-per-epoch": "4", "--pretrain-epochs": "0", "--eval-every": "1",
          "--eval-episodes": "1", "--batch-size": "8", "--log-every": "2"}
SMALL = ["-1", "0", "1", "2", "nan", "-1e-3", "", "x", "1,2", ",", "1.5"]  # never a long run
NUMBERS = SMALL + ["inf", "-inf", "1e-300", "99999999999999999999", "4294967296", "1000000000", "-0", "0x10"]
LISTS = ["0-4", "0,0", "4-0", "", ",", "0-", "-1", "a,b", "0-99999999999", "3", "0,1"]
PATHS = ["FILE", "FOLDER", "RUN", "/sys/dtql-fuzz", "/sys/dtql-fuzz/x.json", "MISSING/deep/x", "", "DATA"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run, a D4RL file, a text file and an empty folder: what the paths point at."""
    root = tmp_path_factory.mktemp("fuzz")
    mp = pytest.MonkeyPatch()
    mp.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.getbasetemp() / "minari"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train.main(["--threads", "1", "--no-compile", *sum(BUDGET.items(), ()), "--out", str(root / "run")])
    write_d4rl(root / "data.hdf5", 11, 3, rows=64)
    (root / "file.txt").write_text("not a run\n")
    (root / "folder").mkdir()
    shutil.copytree(root / "run", root / "run-pristine")
    yield root
    mp.undo()


def _sums(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _path(token: str, root: Path) -> str:
    return {"FILE": str(root / "file.txt"), "FOLDER": str(root / "folder"), "RUN": str(root / "run"),
            "DATA": str(root / "data.hdf5"), "MISSING/deep/x": str(root / "missing" / "deep" / "x")}.get(token, token)


def _call(main, argv: list[str], root: Path, resumed: str | None = None):
    """Run main(argv) in this process; assert the CLI contract; the files that existed before unchanged
    (a successful --resume of `resumed` may change that run's files)."""
    before = _sums(root)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if e.code is not None else 0
    if isinstance(code, str):  # python -m exits 1 printing the message
        assert code.startswith("error: ") and "\n" not in code, (argv, code)
        status = 1
    else:
        status = code
    assert status in (0, 1, 2), (argv, status, err.getvalue()[-2000:])
    assert "Traceback" not in err.getvalue(), (argv, err.getvalue())
    if status == 2:
        assert ": error: " in err.getvalue().strip().splitlines()[-1], (argv, err.getvalue())
    after = _sums(root)
    changed = {k for k in before if after.get(k) != before[k]}
    if status == 0 and resumed:
        changed = {k for k in changed if not (root / k).is_relative_to(Path(resumed))}
    assert not changed, (argv, status, sorted(changed))
    return status


def _flags(pool: dict, n_max: int = 3):
    """1..n_max (flag, value) pairs drawn from pool {flag: values}."""
    return st.lists(st.sampled_from(sorted(pool)).flatmap(lambda f: st.tuples(st.just(f), st.sampled_from(pool[f]))),
                    min_size=1, max_size=n_max, unique_by=lambda fv: fv[0])


TRAIN = {**{f: SMALL for f in BUDGET}, "--seed": NUMBERS, "--seeds": LISTS, "--lr": NUMBERS, "--alpha": NUMBERS,
         "--gamma": NUMBERS, "--expectile": NUMBERS, "--noise-levels": NUMBERS, "--checkpoint-every": NUMBERS,
         "--batch-size": NUMBERS, "--eval-episodes": NUMBERS, "--device": ["tpu", "cuda:99", "", "cpu", "cuda"],
         "--profile-steps": ["5:2", "x", "", "0:1", "-1:3"], "--task": ["", ",", "nope-v0", "hopper-medium-v2"],
         "--dataset": PATHS, "--resume": PATHS, "--out": PATHS}


@FUZZ
@given(_flags(TRAIN))
def test_train(world, flags):
    argv = {"--threads": "1", **BUDGET, "--out": str(world / "new")}
    argv.update({f: _path(v, world) for f, v in flags})
    if "--resume" in argv and dict(flags).get("--out") is None:
        argv.pop("--out")
    vector = ["--no-compile", *(x for fv in argv.items() for x in fv)]
    resumed = argv.get("--resume")
    try:
        _call(train.main, vector, world, resumed=resumed)
    finally:
        shutil.rmtree(world / "new", ignore_errors=True)
        if resumed == str(world / "run"):  # the next example starts from the finished run again
            shutil.rmtree(world / "run")
            shutil.copytree(world / "run-pristine", world / "run")


EVALUATE = {"--episodes": NUMBERS, "--env-seed": NUMBERS, "--agents": LISTS, "--device": ["tpu", "", "cpu"],
            "--json": PATHS, "--video": ["/sys/dtql-fuzz/v.gif", "x.avi", "FILE", ""], "--checkpoint": ["best", "x"]}


@FUZZ
@given(st.sampled_from(PATHS), _flags(EVALUATE))
def test_evaluate(world, run, flags):
    argv = [_path(run, world), *(x for f, v in flags for x in (f, _path(v, world)))]
    try:
        _call(evaluate.main, argv, world)
    finally:
        for p in (world / "run").glob("evaluation-*.json"):
            p.unlink()


REPORT = {"--out": PATHS, "--strict": [None]}


@FUZZ
@given(st.sampled_from(PATHS), _flags(REPORT, 2))
def test_report(world, folder, flags):
    argv = [_path(folder, world), *(x for f, v in flags for x in ((f,) if v is None else (f, _path(v, world))))]
    try:
        _call(report.main, argv, world)
    finally:
        for p in world.rglob("report"):
            shutil.rmtree(p, ignore_errors=True)
        for p in world.rglob("*.png"):
            if p.name != "learning_curves.png":
                p.unlink()


SWEEP = {"--tasks": ["", ",", "hopper-medium-v2,hopper-medium-v2", "nope", "all", "hopper-medium-v2"],
         "--seeds": LISTS, "--out": PATHS, "--cpus-per-run": NUMBERS, "--gpus-per-run": NUMBERS,
         "--max-retries": NUMBERS, "--refresh": NUMBERS, "--max-group": NUMBERS, "--num-cpus": NUMBERS,
         "--pack": [None], **{f: SMALL for f in ("--epochs", "--batch-size")}, "--lr": NUMBERS, "--seed": NUMBERS}


@FUZZ
@given(_flags(SWEEP, 4))
def test_sweep_dry_run(world, flags):
    argv = {"--tasks": "hopper-medium-v2", "--seeds": "0-1", "--out": str(world / "sweep")}
    argv.update({f: _path(v, world) if v is not None else None for f, v in flags})
    vector = ["--dry-run", *(x for f, v in argv.items() for x in ((f,) if v is None else (f, v)))]
    _call(sweep.main, vector, world)
    assert not (world / "sweep").exists()  # a dry run writes nothing
