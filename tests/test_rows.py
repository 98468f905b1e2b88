import math

import pytest

from k3batch.rows.check import normalise_row
from k3batch.rows.records import MAX_KEY_CHARS, object_key
from k3batch.rows.rules import RowRules
from k3batch.rows.seeds import derive_seed

RULES = RowRules(width=64, height=64, num_inference_steps=4, seed=7)


def norm(**raw):
    raw.setdefault("id", "r1")
    raw.setdefault("prompt", "a cat")
    return normalise_row(raw, "prompt", RULES)


def test_good_row_takes_defaults_and_derives_a_stable_seed():
    row = norm()
    assert row["status"] == "ok" and row["error"] is None
    assert (row["width"], row["height"], row["num_inference_steps"]) == (64, 64, 4)
    assert row["guidance_scale"] == 3.0 and row["negative_prompt"] is None
    assert row["seed"] == derive_seed(7, "r1") == norm()["seed"]
    assert norm(id="r2")["seed"] != row["seed"]


def test_overrides_are_used_and_integral_floats_accepted():
    row = norm(
        width=128.0,
        height=192,
        num_inference_steps=10,
        guidance_scale=5,
        seed=2**64 - 1,
        negative_prompt="blurry",
    )
    assert row["status"] == "ok", row["error"]
    assert (row["width"], row["height"], row["num_inference_steps"]) == (128, 192, 10)
    assert row["guidance_scale"] == 5.0 and row["seed"] == 2**64 - 1
    assert row["negative_prompt"] == "blurry"


def test_seed_minus_one_picks_and_records_a_seed():
    a, b = norm(seed=-1), norm(seed=-1)
    assert a["status"] == "ok" and 0 <= a["seed"] < 2**63 and a["seed"] != b["seed"]
    picked = normalise_row({"id": "x", "prompt": "p"}, "prompt", RowRules(seed=-1))
    assert picked["seed"] >= 0


@pytest.mark.parametrize(
    ("raw", "field", "shown"),
    [
        ({"prompt": None}, "prompt", "null"),
        ({"prompt": ""}, "prompt", "''"),
        ({"prompt": "  \n\t "}, "prompt", "empty"),
        ({"prompt": 123}, "prompt", "123"),
        ({"prompt": "x" * 100_000}, "prompt", "100000"),
        ({"prompt": "\x00\x07\u200b\x1b"}, "prompt", "no visible characters"),
        ({"width": 0}, "width", "0"),
        ({"width": 63}, "width", "63"),
        ({"height": 100}, "height", "100"),
        ({"width": -64}, "width", "-64"),
        ({"width": 4096}, "width", "4096"),
        ({"width": 100000}, "width", "100000"),
        ({"width": "64"}, "width", "'64'"),
        ({"width": 64.5}, "width", "64.5"),
        ({"num_inference_steps": 0}, "num_inference_steps", "0"),
        ({"num_inference_steps": -1}, "num_inference_steps", "-1"),
        ({"num_inference_steps": 10**6}, "num_inference_steps", "1000000"),
        ({"guidance_scale": math.nan}, "guidance_scale", "nan"),
        ({"guidance_scale": math.inf}, "guidance_scale", "inf"),
        ({"guidance_scale": -1.0}, "guidance_scale", "-1.0"),
        ({"guidance_scale": "high"}, "guidance_scale", "'high'"),
        ({"seed": 2**70}, "seed", str(2**70)),
        ({"seed": -2}, "seed", "-2"),
        ({"seed": "abc"}, "seed", "'abc'"),
        ({"seed": True}, "seed", "True"),
        ({"negative_prompt": 5}, "negative_prompt", "5"),
    ],
)
def test_bad_rows_become_errors_naming_field_and_value(raw, field, shown):
    row = norm(**raw)
    assert row["status"] == "error"
    assert row["error"].startswith(f"{field}:"), row["error"]
    assert shown in row["error"], row["error"]


@pytest.mark.parametrize(
    "prompt", ["a cat\x00 in red\x1b[31m", "кот 猫 cat قطة 🐈", "ẞ\u0301", "1", "🐈"]
)
def test_prompts_with_control_characters_or_mixed_scripts_are_fine(prompt):
    row = norm(prompt=prompt)
    assert row["status"] == "ok" and row["prompt"] == prompt, row["error"]


def test_all_errors_of_a_row_are_reported():
    row = norm(prompt="", width=63, seed=-5)
    assert [p.split(":")[0] for p in row["error"].split("; ")] == ["prompt", "width", "seed"]


def test_error_messages_stay_short_for_huge_values():
    row = norm(prompt=123, negative_prompt=["x"] * 10_000)
    assert len(row["error"]) < 300


@pytest.mark.parametrize(
    "row_id",
    ["../../x", "a/b", "/abs", "..", ".", "a\x00b\nc", "x" * 2000, "ünï cödé", "CON", "a" * 121],
)
def test_object_key_is_a_safe_file_name(row_id):
    key = object_key(row_id)
    assert "/" not in key and "\\" not in key and not key.startswith(".")
    assert key and len(key) <= MAX_KEY_CHARS
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in key)


def test_object_key_keeps_plain_ids_and_never_collides():
    assert object_key("demo-001") == "demo-001"
    ids = [
        "a/b",
        "a_b",
        "a\\b",
        "a b",
        "a_b-h0000000000000000",
        "../x",
        "__x",
        "x" * 2000,
        "x" * 2001,
    ]
    keys = [object_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert object_key("a_b") == "a_b" and object_key("a/b") != "a_b"


HOSTILE_IDS = [
    "../../x",
    "a/b",
    "/abs",
    "..",
    ".",
    "a\x00b\nc\x1b[31m",
    "\r\t",
    "x" * 2000,
    "ünï cödé",
    "a.b",
    "a_b",
    "a.b.png",
    "shard.00001",
    "",
]


@pytest.mark.parametrize("dots", [True, False])
def test_keys_stay_inside_the_prefix_and_never_collide(dots):
    keys = [object_key(i, dots=dots) for i in HOSTILE_IDS]
    assert len(set(keys)) == len(HOSTILE_IDS)
    for key in keys:
        assert key and len(key) <= MAX_KEY_CHARS and key not in (".", "..")
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in key)
        assert not key.startswith(".")
        if not dots:  # webdataset splits a member name at its first dot
            assert "." not in key


def test_webdataset_keys_keep_plain_ids_and_hash_dotted_ones():
    assert object_key("demo-001", dots=False) == "demo-001"
    assert object_key("a.b", dots=True) == "a.b"
    dotted = object_key("a.b", dots=False)
    assert dotted.startswith("a_b-h") and dotted != object_key("a_b", dots=False) == "a_b"


# A valid value for each optional column, and the columns a row needs for it to be read.
COLUMN_VALUES = {
    "seed": (5, {}),
    "width": (128, {}),
    "height": (128, {}),
    "num_images_per_prompt": (2, {}),
    "negative_prompt": ("blurry", {}),
    "guidance_scale": (5.0, {}),
    "num_inference_steps": (3, {}),
    "scheduler": ("unipc", {}),
    "image": ("in.png", {}),
    "strength": (0.5, {"image": "in.png"}),
    "mask": ("m.png", {"image": "in.png"}),
    "hint": ("h.png", {}),
    "controlnet_conditioning_scale": (0.5, {"hint": "h.png"}),
    "control_guidance_start": (0.1, {"hint": "h.png"}),
    "control_guidance_end": (0.9, {"hint": "h.png"}),
    "prior_num_inference_steps": (3, {}),
    "prior_guidance_scale": (2.0, {}),
    "mix": ([{"prompt": "a dog", "weight": 0.7}], {}),
    "ip_images": ([{"image": "ref.png", "weight": 0.6}], {}),
    "ip_adapter_scale": (0.5, {"ip_images": [{"image": "ref.png"}]}),
}


def _variants():
    from k3batch.docs import _CONDITIONED
    from k3batch.model import family

    for member in family.MEMBERS.values():
        yield member, {}
        for _, extra, needs in _CONDITIONED:
            if getattr(member, needs):
                yield member, extra


@pytest.mark.parametrize(
    ("member", "extra"), list(_variants()), ids=lambda v: getattr(v, "name", None) or str(v)
)
def test_declared_input_columns_are_what_validation_takes(member, extra):
    """`RowCapabilities.input_columns` (the config reference's table) is true: each listed
    column is taken without a word, each other one is a warning or an error naming it."""
    from .conftest import row_capabilities

    caps = row_capabilities(name=member.name, **extra)
    rules = RowRules(width=64, height=64, num_inference_steps=4, capabilities=caps)
    base = {"id": "r", "prompt": "a cat"}
    if member.needs_mask:
        base |= {"image": "in.png", "mask": "m.png"}
    if member.needs_hint:
        base |= {"hint": "h.png"}
    assert normalise_row(dict(base), "prompt", rules)["status"] == "ok"
    listed = set(caps.input_columns())
    assert listed <= set(COLUMN_VALUES), listed - set(COLUMN_VALUES)
    for column, (value, needs) in COLUMN_VALUES.items():
        out = normalise_row({**base, **needs, column: value}, "prompt", rules)
        said = f"{out['error'] or ''}; {out['warning'] or ''}"
        if column in listed:
            assert out["status"] == "ok" and column not in said, (column, said)
        else:
            assert f"{column}: " in said, (column, said)
