"""The docs: the generated config reference is current, and every relative link resolves."""

import re
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


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def outside_code(text: str):
    """The lines of a markdown text that are not inside ``` fences."""
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield line


def anchors(path: Path):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    seen: dict[str, int] = {}
    for line in outside_code(path.read_text()):
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            yield slug if count == 0 else f"{slug}-{count}"


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for page in markdown_files():
        text = "\n".join(outside_code(page.read_text()))
        text = re.sub(r"`[^`]*`", "", text)  # inline code is not a link
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in set(anchors(linked)):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_stays_a_first_read():
    lines = (REPO / "README.md").read_text().splitlines()
    assert lines[2:6] == [
        "```bash",
        "bash scripts/demo.sh   # set up .venv, then run the demo job: local Ray, tiny model "
        "built on the spot, output in out/demo",
        "bash scripts/test.sh   # set up .venv with test tools, then lint and run the whole "
        "test suite",
        "```",
    ]
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail into docs/"
