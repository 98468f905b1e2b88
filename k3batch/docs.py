"""The config reference (docs/config.md), generated from the pydantic models' descriptions.

`k3batch config --reference > docs/config.md` regenerates it; a test fails when the committed
file differs from what the models say, so the reference cannot go stale.
"""

from __future__ import annotations

import json

REFERENCE_PATH = "docs/config.md"

HEADER = """\
# Config reference

<!-- Generated from k3batch/config/ by `.venv/bin/k3batch config --reference > docs/config.md`;
     edit the Field descriptions there, not this file (tests/test_docs.py checks it). -->

A job is one YAML file with the sections below. Unknown keys are errors. Any field can be
overridden on the command line with `--set section.field=value` (a YAML value), e.g.
`--set resources.batch_size=8`. Fields without a default are required.
"""


def _resolve(schema: dict, node: dict) -> dict:
    """Follow a `$ref` (directly or inside a one-element allOf) into `$defs`."""
    ref = node.get("$ref") or next((a["$ref"] for a in node.get("allOf", []) if "$ref" in a), None)
    return schema["$defs"][ref.split("/")[-1]] if ref else node


def _type(node: dict) -> str:
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return " | ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    if "anyOf" in node:
        return " or ".join(_type(option) for option in node["anyOf"])
    text = node.get("type", "object")
    bounds = [
        f"{op} {node[key]}"
        for key, op in (
            ("minimum", "≥"),
            ("exclusiveMinimum", ">"),
            ("maximum", "≤"),
            ("exclusiveMaximum", "<"),
        )
        if key in node
    ]
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _default(node: dict, required: bool) -> str:
    if "default" in node:
        return f"`{json.dumps(node['default'])}`"
    return "**required**" if required else "see fields"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(schema: dict, model: dict, prefix: str) -> list[str]:
    rows = []
    required = set(model.get("required", []))
    for name, prop in model.get("properties", {}).items():
        target = _resolve(schema, prop)
        if target is not prop and "properties" in target:
            rows.append(
                f"| `{prefix}{name}` | object | {_default(prop, name in required)} | "
                f"{_cell(prop.get('description', ''))} |"
            )
            rows.extend(_rows(schema, target, f"{prefix}{name}."))
            continue
        options = [_resolve(schema, o) for o in prop.get("anyOf", [])]
        nested = [o for o in options if "properties" in o]
        if len(nested) == 1 and len(options) == 2 and {"type": "null"} in options:
            # An optional section (model.ip_adapter): off when null, its fields below.
            rows.append(
                f"| `{prefix}{name}` | object or null | {_default(prop, name in required)} | "
                f"{_cell(prop.get('description', ''))} |"
            )
            rows.extend(_rows(schema, nested[0], f"{prefix}{name}."))
            continue
        item = _resolve(schema, prop.get("items", {}))
        if prop.get("type") == "array" and "properties" in item:
            # A list of objects (model.lora): its item fields as `name[].field`.
            rows.append(
                f"| `{prefix}{name}` | list of objects | "
                f"{'**required**' if name in required else '`[]`'} | "
                f"{_cell(prop.get('description', ''))} |"
            )
            rows.extend(_rows(schema, item, f"{prefix}{name}[]."))
            continue
        rows.append(
            f"| `{prefix}{name}` | {_cell(_type(prop))} | {_default(prop, name in required)} | "
            f"{_cell(prop.get('description', ''))} |"
        )
    return rows


def config_reference() -> str:
    """Markdown: one table per config section, every field with type, default and description."""
    from k3batch.config import JobConfig

    schema = JobConfig.model_json_schema()
    parts = [HEADER.rstrip()]
    required = set(schema.get("required", []))
    for section, prop in schema["properties"].items():
        model = _resolve(schema, prop)
        need = " (required)" if section in required else ""
        # The section's class docstring says more than the one-line field description.
        about = model.get("description") or prop.get("description", "")
        table = "\n".join(
            [
                "| field | type | default | description |",
                "|---|---|---|---|",
                *_rows(schema, model, f"{section}."),
            ]
        )
        parts.append(f"## `{section}`{need}\n\n{about}\n\n{table}")
    parts.append(row_columns())
    return "\n\n".join(parts) + "\n"


# A config per row of the table below: each member plain, and with each conditioning model
# its family takes (what `k3batch.model.family.row_capabilities` reads from `model:`).
_CONDITIONED = (
    ("model.controlnet", {"controlnet": "controlnet_hed"}, "conditioning"),
    ("model.ip_adapter", {"ip_adapter": {"path": "ip_adapter.safetensors"}}, "conditioning"),
    ("model.depth_estimator", {"depth_estimator": "Intel/dpt-large"}, "needs_hint"),
)


def row_columns() -> str:
    """Markdown: the optional input columns a row may bring, per member and conditioning model,
    from the same declaration validation reads (`RowCapabilities`)."""
    from k3batch.config import ModelConfig
    from k3batch.model import family

    lines = [
        "## Input columns a row may bring",
        "",
        "Besides `input.prompt_column` and `input.id_column`, by `model.name` and the "
        "conditioning models configured (the same declaration validates rows and Serve "
        "requests; a column the job cannot use is a row error or, for a setting, a warning):",
        "",
        "| model | columns |",
        "|---|---|",
    ]
    for member in family.MEMBERS.values():
        variants = [(f"`{member.name}`", {})]
        variants += [
            (f"`{member.name}` with `{field}`", extra)
            for field, extra, needs in _CONDITIONED
            if getattr(member, needs)
        ]
        for label, extra in variants:
            caps = family.row_capabilities(ModelConfig(name=member.name, **extra))
            columns = ", ".join(f"`{c}`" for c in caps.input_columns())
            lines.append(f"| {label} | {columns} |")
    return "\n".join(lines)
