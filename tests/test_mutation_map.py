"""tests/mutation_map.toml stays true as files move: every module and test it names exists,
and every module has a row in docs/testing.md's mutation table or its not-yet-run list."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_mutation_map_names_files_that_exist():
    modules = tomllib.loads((REPO / "tests" / "mutation_map.toml").read_text())["modules"]
    assert modules
    doc = (REPO / "docs" / "testing.md").read_text().split("## Mutation testing", 1)[1]
    for module, entry in modules.items():
        assert (REPO / module).is_file(), module
        assert f"`{module}`" in doc, f"{module}: not in docs/testing.md's Mutation testing"
        assert entry["tests"], module
        for test in entry["tests"]:
            assert (REPO / test.split("::")[0]).is_file(), (module, test)
