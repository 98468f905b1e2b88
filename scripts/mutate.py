"""Mutation testing of one numeric module with mutmut, against the tests mapped to it.

    .venv/bin/python scripts/mutate.py k3batch/model/schedule.py

`tests/mutation_map.toml` names each module's tests. mutmut 3 mutates a copy of the source
(`mutants/`) and reads its settings from `[tool.mutmut]` of the `pyproject.toml` in its
working directory; those settings differ per module (what to mutate, which tests), so each
run gets a working directory of its own, `.cache/mutation/<module>/` (gitignored, outside
ruff and pytest's reach), holding the repo's pyproject.toml with the module's `[tool.mutmut]`
appended, and links to the sources and tests. It starts fresh each time: mutmut keeps
results per function across runs but not per test change, so a test written to kill a
survivor would not be rerun against it. `--survivors` instead reruns, in the last run's
folder, only the mutants that were not killed, against the map's tests as they are now
(tests new since that run are traced first): the check that new tests kill them. `--resume`
goes on with an interrupted run's untested mutants in its folder (mutmut keeps each mutant's
result as it goes). Both need the module's map entry unchanged since that run: mutmut
discards every result when its test selection changes. Prints the score and each
survivor's diff.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "tests" / "mutation_map.toml"
WORK = ROOT / ".cache" / "mutation"
# Copied into mutants/ by mutmut (the package mutated, the other imported by some tests).
SOURCES = ["k3batch", "pipelines"]
# Read by tests at run time, relative to the repo root; linked rather than copied.
LINKED = ["configs", "data", "docs", "README.md"]


def load_map() -> dict[str, dict]:
    with open(MAP, "rb") as f:
        return tomllib.load(f)["modules"]


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def mutmut_section(module: str, entry: dict) -> str:
    tests = entry["tests"]
    args = list(entry.get("args", []))
    return "\n".join(
        [
            "",
            "[tool.mutmut]",
            f"source_paths = {toml_list(SOURCES)}",
            f"only_mutate = {toml_list([module])}",
            # Which tests run: mutmut runs these once to learn which test calls which
            # function, then per mutant only the tests that called its function.
            f"pytest_add_cli_args_test_selection = {toml_list(tests + args)}",
            # Every pytest call: no cache, no slow runs, no per-file durations table.
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not slow", "-o", "addopts="]',
            # torch is not fork-safe once it has run ops: fork the workers from a server
            # that has only imported and collected the tests.
            'process_isolation = "forkserver"',
            "",
        ]
    )


def work_dir(module: str) -> Path:
    return WORK / module.replace("/", "__").removesuffix(".py")


def settings(module: str, entry: dict) -> str:
    pyproject = (ROOT / "pyproject.toml").read_text()
    if "[tool.mutmut]" in pyproject:
        sys.exit("pyproject.toml has a [tool.mutmut] table: scripts/mutate.py writes its own")
    return pyproject + mutmut_section(module, entry)


def prepare(module: str, entry: dict) -> Path:
    work = work_dir(module)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "pyproject.toml").write_text(settings(module, entry))
    for name in SOURCES + ["tests"]:
        (work / name).symlink_to(ROOT / name)
    mutants = work / "mutants"
    mutants.mkdir()
    for name in LINKED:
        (mutants / name).symlink_to(ROOT / name)
    return work


def score(work: Path, module: str) -> tuple[dict[str, str], int]:
    from mutmut.stats import status_by_exit_code

    meta = json.loads((work / "mutants" / (module + ".meta")).read_text())
    status = {k: status_by_exit_code[v] for k, v in meta["exit_code_by_key"].items()}
    return status, sum(s == "killed" for s in status.values())


def not_killed(status: dict[str, str]) -> list[str]:
    return sorted(k for k, s in status.items() if s != "killed")


def earlier_run(module: str, entry: dict, flag: str) -> Path:
    """The folder of the module's last run, for `flag`; exits when there is none, or when
    the module's settings changed since: mutmut starts over when the test selection changes,
    which would throw the earlier results away. New tests in the mapped files are fine
    (mutmut traces tests it has not seen before)."""
    work = work_dir(module)
    if not (work / "mutants" / (module + ".meta")).is_file():
        sys.exit(f"{flag}: no earlier run of {module} in {work}")
    if (work / "pyproject.toml").read_text() != settings(module, entry):
        sys.exit(
            f"{flag}: {module}'s settings (its map entry, or pyproject.toml) changed since "
            "that run, and mutmut would start over: run it without " + flag
        )
    return work


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="a module path in tests/mutation_map.toml")
    parser.add_argument("--show", action="store_true", help="print each survivor's diff")
    again = parser.add_mutually_exclusive_group()
    again.add_argument(
        "--survivors",
        action="store_true",
        help="rerun only the last run's surviving mutants, against the tests as they are now",
    )
    again.add_argument(
        "--resume",
        action="store_true",
        help="go on with an interrupted run's untested mutants, against the tests as they are now",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="mutants tested at once (default 1: a shared machine)"
    )
    a = parser.parse_args()
    modules = load_map()
    module = a.module.removeprefix("./")
    if module not in modules:
        sys.exit(f"module {module!r} is not in {MAP.relative_to(ROOT)}: {sorted(modules)}")
    if a.survivors or a.resume:
        work = earlier_run(module, modules[module], "--survivors" if a.survivors else "--resume")
    else:
        work = prepare(module, modules[module])
    names = not_killed(score(work, module)[0]) if a.survivors else []
    if a.survivors and not names:
        print(f"{module}: no survivors in the last run")
        return 0
    mutmut = Path(sys.executable).parent / "mutmut"
    # The mutated copy first on the path of every process the tests start, too.
    env = {**os.environ, "PYTHONPATH": str(work / "mutants")}
    # Lowest priority, one worker unless asked: the machines this runs on are shared.
    cmd = ["nice", "-n", "19", str(mutmut), "run", "--max-children", str(a.jobs), *names]
    rc = subprocess.run(cmd, cwd=work, env=env).returncode
    if rc != 0:
        print(f"mutmut run exited with {rc}", file=sys.stderr)
        return rc
    status, killed = score(work, module)
    survivors = not_killed(status)
    print(f"\n{module}: {killed} / {len(status)} killed ({100 * killed / len(status):.0f}%)")
    for name in survivors:
        print(f"  {status[name]}: {name}")
        if a.show:
            show = subprocess.run(
                [str(mutmut), "show", name], cwd=work, env=env, capture_output=True, text=True
            )
            print(show.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
