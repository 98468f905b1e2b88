"""The config reference is generated from the models and the committed copy is current."""

import subprocess
import sys
from pathlib import Path

from k3batch.config import JobConfig
from k3batch.docs import REFERENCE_PATH, config_reference

REPO = Path(__file__).resolve().parent.parent


def field_paths(schema: dict, model: dict, prefix: str = ""):
    for name, prop in model.get("properties", {}).items():
        yield f"{prefix}{name}"
        ref = prop.get("$ref")
        if ref:
            yield from field_paths(schema, schema["$defs"][ref.split("/")[-1]], f"{prefix}{name}.")


def test_committed_config_reference_is_current():
    committed = (REPO / REFERENCE_PATH).read_text()
    assert committed == config_reference(), (
        f"{REFERENCE_PATH} is stale: regenerate it with "
        f"`.venv/bin/k3batch config --reference > {REFERENCE_PATH}`"
    )


def test_reference_lists_every_field_with_its_description():
    reference = config_reference()
    schema = JobConfig.model_json_schema()
    paths = list(field_paths(schema, schema))
    assert "model.dtype.unet" in paths and "ray.metrics_export_port" in paths
    for path in paths:
        if "." in path:  # sections are headings, fields are table rows
            assert f"| `{path}` |" in reference, path
    description = JobConfig.model_fields["output"].annotation.model_fields["quality"].description
    assert description in reference


def test_cli_prints_the_reference_and_readme_links_it():
    out = subprocess.run(
        [sys.executable, "-m", "k3batch.cli", "config", "--reference"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == config_reference()
    assert f"]({REFERENCE_PATH})" in (REPO / "README.md").read_text()
