import dataclasses
import math

import pytest

from k3batch.rows.check import normalise_row
from k3batch.rows.records import MAX_KEY_CHARS, object_key
from k3batch.rows.rules import RowRules
from k3batch.rows.seeds import derive_seed

from .conftest import row_capabilities

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


# ------------------------------------------------------------------ sampling settings
@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("num_inference_steps", 1, True),
        ("num_inference_steps", 0, False),
        ("num_inference_steps", 1000, True),  # limits.max_num_inference_steps' default
        ("num_inference_steps", 1001, False),
        ("guidance_scale", 0.0, True),  # guidance off is a setting, not an error
        ("guidance_scale", 0.5, True),
        ("guidance_scale", -0.01, False),
        ("strength", 1.0, True),  # (0, 1]: 1 noises the input image all the way
        ("strength", 1e-9, True),
        ("strength", 0.0, False),
        ("strength", 1.01, False),
    ],
)
def test_sampling_settings_take_their_bounds_and_refuse_past_them(field, value, ok):
    row = norm(**{field: value}, **({"image": "in.png"} if field == "strength" else {}))
    if ok:
        assert row["status"] == "ok" and row[field] == value, row["error"]
    else:
        assert row["status"] == "error" and row["error"].startswith(f"{field}: "), row["error"]
        assert str(value) in row["error"]


def row_under(rules, **raw):
    """Row `r`, prompt "a cat" with `raw`'s columns, normalised under `rules`."""
    return normalise_row({"id": "r", "prompt": "a cat", **raw}, "prompt", rules)


def rules_of(member) -> RowRules:
    """The rules for rows of `member`: a registered member's name, or a `Member` declared in
    the test (the rules read its declarations, not its name)."""
    if isinstance(member, str):
        caps = row_capabilities(name=member)
    else:
        caps = dataclasses.replace(row_capabilities(name="kandinsky3"), member=member)
    return dataclasses.replace(RULES, capabilities=caps)


FLASH_SETTINGS = {
    "negative_prompt": "blurry",
    "guidance_scale": 1.0,
    "num_inference_steps": 8,
    "scheduler": "unipc",
}


def test_flash_names_each_setting_it_ignores_why_and_the_value():
    row = row_under(rules_of("kandinsky3-flash"), **FLASH_SETTINGS)
    why = "(no guidance, 4 fixed steps)"
    assert row["status"] == "ok", row["error"]
    assert row["warning"] == "; ".join(
        [
            f"negative_prompt: ignored by kandinsky3-flash {why}, got 'blurry'",
            f"guidance_scale: ignored by kandinsky3-flash {why}, got 1.0",
            f"num_inference_steps: ignored by kandinsky3-flash {why}, got 8",
            f"scheduler: ignored by kandinsky3-flash {why}, got 'unipc'",
        ]
    )
    # What it runs is recorded, not what the row asked for.
    assert (row["guidance_scale"], row["negative_prompt"]) == (None, None)
    assert (row["num_inference_steps"], row["scheduler"]) == (4, "reference")


def test_flash_is_silent_on_the_settings_it_runs_anyway():
    """Guidance 0 is no guidance, an empty negative prompt none, 4 steps and the reference's
    scheduler are Flash's own: nothing to warn of."""
    same = {"negative_prompt": "", "guidance_scale": 0.0, "num_inference_steps": 4}
    row = row_under(rules_of("kandinsky3-flash"), **same, scheduler="reference")
    assert row["status"] == "ok" and row["warning"] is None, row["warning"]


@pytest.mark.parametrize(
    ("changes", "why", "ignored"),
    [
        # guided, fixed steps: only the steps and scheduler are ignored, for that reason alone
        ({"guidance_scale": 3.0}, "4 fixed steps", ["num_inference_steps", "scheduler"]),
        # unguided, its own steps: only the guidance settings, for that reason alone
        (
            {"fixed_timesteps": None, "num_inference_steps": 50},
            "no guidance",
            ["negative_prompt", "guidance_scale"],
        ),
    ],
)
def test_ignored_settings_follow_what_the_member_declares(changes, why, ignored):
    from k3batch.model import family

    member = dataclasses.replace(family.MEMBERS["kandinsky3-flash"], name="m", **changes)
    row = row_under(rules_of(member), **FLASH_SETTINGS)
    assert row["status"] == "ok", row["error"]
    assert row["warning"] == "; ".join(
        f"{name}: ignored by m ({why}), got {FLASH_SETTINGS[name]!r}" for name in ignored
    )


def test_own_scheduler_members_ignore_a_rows_scheduler_naming_it_and_are_silent_without():
    rules = rules_of("kandinsky2.2")
    row = row_under(rules, scheduler="euler")
    assert row["status"] == "ok" and row["scheduler"] == "reference"
    assert row["warning"] == (
        "scheduler: ignored by kandinsky2.2 (its own diffusers schedulers), got 'euler'"
    )
    for quiet in ({}, {"scheduler": "reference"}):
        row = row_under(rules, **quiet)
        assert row["status"] == "ok" and row["warning"] is None, (quiet, row["warning"])


def test_unknown_scheduler_error_lists_the_choices():
    row = norm(scheduler="ddpm")
    assert row["error"] == "scheduler: unknown 'ddpm', one of reference, dpmsolver++, unipc, euler"


def test_strength_on_a_row_without_an_image_names_who_takes_it_and_the_value():
    row = norm(strength=0.25)
    assert row["status"] == "ok"
    assert row["warning"] == (
        "strength: ignored, only image-to-image rows (kandinsky3 with an image) use it, got 0.25"
    )


# ------------------------------------------------------------------ a prior's settings, mix
def k22(**raw):
    """A Kandinsky 2.2 row, with prior defaults (5 steps, 1.5) apart from the decoder's (4, 3.0)."""
    rules = dataclasses.replace(
        rules_of("kandinsky2.2"), prior_num_inference_steps=5, prior_guidance_scale=1.5
    )
    return row_under(rules, **raw)


def test_prior_settings_default_to_the_priors_and_a_row_sets_them_apart_from_the_decoders():
    row = k22()
    assert row["status"] == "ok", row["error"]
    assert (row["prior_num_inference_steps"], row["prior_guidance_scale"]) == (5, 1.5)
    row = k22(prior_num_inference_steps=7, prior_guidance_scale=2.5)
    assert (row["prior_num_inference_steps"], row["prior_guidance_scale"]) == (7, 2.5)
    assert (row["num_inference_steps"], row["guidance_scale"]) == (4, 3.0)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("prior_num_inference_steps", 2, None),  # diffusers' prior scheduler needs 2
        ("prior_num_inference_steps", 1000, None),
        ("prior_num_inference_steps", 1, "must be in [2, limits.max_num_inference_steps=1000]"),
        ("prior_num_inference_steps", 1001, "must be in [2, limits.max_num_inference_steps=1000]"),
        ("prior_guidance_scale", 0.0, None),
        ("prior_guidance_scale", 0.5, None),  # not held to the steps' lower bound of 2
        ("prior_guidance_scale", -0.5, "must be finite and >= 0"),
        ("prior_guidance_scale", math.inf, "must be finite and >= 0"),
    ],
)
def test_prior_settings_take_their_bounds_and_refuse_past_them(field, value, error):
    row = k22(**{field: value})
    if error is None:
        assert row["status"] == "ok" and row[field] == value, row["error"]
    else:
        assert row["error"] == f"{field}: {error}, got {value}"


def test_a_member_without_a_prior_warns_of_its_settings_and_records_none():
    row = norm(prior_num_inference_steps=3, prior_guidance_scale=2.0)
    assert row["status"] == "ok"
    assert row["warning"] == (
        "prior_num_inference_steps: ignored by kandinsky3 (no prior), got 3; "
        "prior_guidance_scale: ignored by kandinsky3 (no prior), got 2.0"
    )
    assert row["prior_num_inference_steps"] is None and row["prior_guidance_scale"] is None


def test_mix_on_a_member_that_does_not_mix_names_the_one_that_does():
    mix = [{"prompt": "a dog", "weight": 0.7}]
    row = norm(mix=mix)
    assert row["error"] == f"mix: only kandinsky2.2 mixes images and prompts, got {mix!r}"


def test_mix_of_prompts_and_images_with_any_finite_weights_is_taken():
    mix = [{"prompt": "a dog", "weight": 0.7}, {"image": "a.png", "weight": -0.2}]
    row = k22(mix=mix)
    assert row["status"] == "ok" and row["error"] is None, row["error"]
    assert k22(mix=[{"image": b"\x89PNG", "weight": 2}])["status"] == "ok"


SHAPE = "{prompt | image, weight}"


@pytest.mark.parametrize(
    ("mix", "error"),
    [
        ("a dog", f"mix: expected a non-empty list of {SHAPE}, got 'a dog'"),
        ([], f"mix: expected a non-empty list of {SHAPE}, got []"),
        (["a dog"], f"mix[0]: expected {SHAPE}, got 'a dog'"),
        (
            [{"prompt": "a dog", "weight": 1}, {"prompt": "a", "image": "b.png", "weight": 1}],
            "mix[1]: both prompt and image, give one, got "
            "{'prompt': 'a', 'image': 'b.png', 'weight': 1}",
        ),
        ([{"weight": 1}], "mix[0]: neither prompt nor image, give one, got {'weight': 1}"),
        ([{"prompt": " \t", "weight": 1}], "mix[0].prompt: expected visible text, got ' \\t'"),
        ([{"prompt": 5, "weight": 1}], "mix[0].prompt: expected visible text, got 5"),
        ([{"image": " ", "weight": 1}], "mix[0].image: empty URI, got ' '"),
        ([{"image": b"", "weight": 1}], "mix[0].image: empty bytes"),
        ([{"image": 3, "weight": 1}], "mix[0].image: expected a URI or raw bytes, got 3"),
        ([{"prompt": "a dog"}], "mix[0].weight: expected a number, got None"),
        ([{"prompt": "a dog", "weight": "1"}], "mix[0].weight: expected a number, got '1'"),
        ([{"prompt": "a dog", "weight": True}], "mix[0].weight: expected a number, got True"),
        ([{"prompt": "a dog", "weight": math.nan}], "mix[0].weight: must be finite, got nan"),
    ],
)
def test_a_bad_mix_item_is_the_rows_error_naming_the_item(mix, error):
    row = k22(mix=mix)
    assert row["status"] == "error" and row["error"] == error


# ------------------------------------------------------------------ seeds and images per row
def test_derived_seeds_use_63_bits():
    seeds = [derive_seed(7, f"r{i}") for i in range(64)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert max(seeds) >= 2**62  # one of 64 ids below 2**62 by chance: 2**-64


def test_seed_zero_and_the_largest_seed_are_a_rows_own():
    row = norm(seed=0, num_images_per_prompt=2)
    assert row["status"] == "ok" and (row["seed"], row["image_seeds"]) == (0, [0, 1])
    assert norm(seed=1)["seed"] == 1


def test_a_job_seed_of_minus_one_draws_each_rows_seed_and_each_images():
    rules = dataclasses.replace(RULES, seed=-1, num_images_per_prompt=3)
    a, b = (row_under(rules) for _ in range(2))
    assert a["seed"] != b["seed"]
    for row in (a, b, norm(seed=-1, num_images_per_prompt=3)):
        seeds = row["image_seeds"]
        assert seeds[0] == row["seed"] and len(set(seeds)) == 3
        assert seeds[1:] != [row["seed"] + 1, row["seed"] + 2]  # drawn, not consecutive


def test_images_per_prompt_up_to_the_limit_and_no_seeds_for_a_bad_count():
    row = norm(num_images_per_prompt=64)  # limits.max_num_images_per_prompt's default
    assert row["status"] == "ok" and len(row["image_seeds"]) == 64
    for bad in (0, 65, "two"):
        row = norm(num_images_per_prompt=bad)
        assert row["status"] == "error" and row["error"].startswith("num_images_per_prompt: ")
        assert row["num_images_per_prompt"] is None and row["image_seeds"] is None


def test_row_seed_resolves_a_seed_column_as_generation_does():
    from k3batch.rows.seeds import row_seed
    from k3batch.rows.values import RowError

    assert row_seed(None, 7, "r1") == derive_seed(7, "r1") == norm()["seed"]
    assert row_seed(None, 8, "r1") != row_seed(None, 7, "r1") != row_seed(None, 7, "r2")
    for value in (0, 1, 5.0, 2**64 - 1):
        assert row_seed(value, 7, "r1") == value
    for value, base in ((None, -1), (-1, 7)):  # drawn: a new seed each time
        drawn = {row_seed(value, base, "r1") for _ in range(3)}
        assert len(drawn) == 3 and all(0 <= s < 2**63 for s in drawn)
    for value in (2**64, -2):
        with pytest.raises(
            RowError, match=rf"^seed: must be -1 or in \[0, 2\*\*64\), got {value}$"
        ):
            row_seed(value, 7, "r1")
    with pytest.raises(RowError, match=r"^seed: expected an integer, got 'x'$"):
        row_seed("x", 7, "r1")


def test_records_of_a_row_are_its_images_or_one_for_a_bad_count():
    from k3batch.rows.seeds import records_of

    rules = dataclasses.replace(RULES, num_images_per_prompt=3)
    assert [records_of(v, rules) for v in (None, 2, 64)] == [3, 2, 64]
    assert [records_of(v, rules) for v in (0, 65, "x", 1.5)] == [1, 1, 1, 1]


# ------------------------------------------------------------------ image prompts
def test_image_prompt_messages_quote_what_the_row_gave():
    ip = dataclasses.replace(
        RULES, capabilities=row_capabilities(ip_adapter={"path": "ip_adapter.safetensors"})
    )
    images = [{"image": "ref.png", "weight": 0.6}]
    row = norm(ip_images=images, ip_adapter_scale=0.4)
    assert row["error"] == (
        "ip_images: image prompts need model.ip_adapter (kandinsky3 with the IP-Adapter), "
        f"got {images!r}"
    )
    assert row["warning"] == "ip_adapter_scale: ignored without model.ip_adapter, got 0.4"
    row = row_under(ip, ip_adapter_scale=0.4)
    assert row["warning"] == "ip_adapter_scale: ignored, the row has no ip_images, got 0.4"
    item = {"weight": 0.6}
    row = row_under(ip, ip_images=[item])
    assert row["error"] == f"ip_images[0].image: missing (null), got {item!r}"


# ------------------------------------------------------------------ hints, ControlNet settings
DEPTH = "kandinsky2.2-controlnet-depth"


def depth_row(estimator: bool = False, **raw):
    caps = row_capabilities(
        name=DEPTH, **({"depth_estimator": "Intel/dpt-large"} if estimator else {})
    )
    rules = dataclasses.replace(RULES, capabilities=caps)
    return row_under(rules, **raw)


def test_a_depth_row_needs_a_hint_or_an_image_with_an_estimator():
    assert depth_row(hint="h.png")["status"] == "ok"
    assert depth_row(estimator=True, image="in.png")["status"] == "ok"
    assert depth_row()["error"] == (
        f"hint: missing (null), {DEPTH} needs a `hint` depth image, or an `image` to estimate "
        "it from"
    )
    assert depth_row(estimator=True)["error"] == depth_row()["error"]
    assert depth_row(image="in.png")["error"] == (
        "hint: missing (null), and no model.depth_estimator to estimate it from `image`; "
        f"{DEPTH} needs one of them"
    )
    assert depth_row(hint=" ", image="in.png")["error"] == "hint: empty URI, got ' '"


def test_a_hint_where_nothing_takes_one_names_who_does_and_the_value():
    assert norm(hint="h.png")["error"] == (
        f"hint: only {DEPTH} takes a depth hint, or kandinsky3 with model.controlnet an edge "
        "hint; got 'h.png'"
    )


def test_control_settings_take_0_to_1_with_start_before_end():
    rules = dataclasses.replace(RULES, capabilities=row_capabilities(controlnet="controlnet_hed"))

    def row(**raw):
        return row_under(rules, hint="h.png", **raw)

    ends = row(control_guidance_start=0.0, control_guidance_end=1.0)
    assert ends["status"] == "ok", ends["error"]
    assert (ends["control_guidance_start"], ends["control_guidance_end"]) == (0.0, 1.0)
    same = row(control_guidance_start=0.5, control_guidance_end=0.5)
    assert same["error"] == "control_guidance_start: must be < control_guidance_end (0.5), got 0.5"
    assert same["control_guidance_start"] is None
    assert norm(controlnet_conditioning_scale=0.5)["warning"] == (
        "controlnet_conditioning_scale: ignored, without model.controlnet, got 0.5"
    )


# ------------------------------------------------------------------ images, masks, sizes
def test_image_and_mask_messages_name_the_member_and_quote_the_value():
    flash = row_under(rules_of("kandinsky3-flash"), image="in.png")
    assert flash["error"] == "image: kandinsky3-flash is text-to-image only, got 'in.png'"
    assert norm(mask="m.png")["error"] == "mask: only kandinsky3-inpaint takes a mask, got 'm.png'"
    inpaint = row_under(rules_of("kandinsky3-inpaint"), image="in.png", mask=" ")
    assert inpaint["error"] == "mask: empty URI, got ' '"


def test_sizes_up_to_max_side_and_an_image_rows_own_size():
    row = norm(width=2048, height=64)  # limits.max_side's default
    assert row["status"] == "ok" and row["width"] == 2048
    assert norm(width=2112)["error"] == "width: 2112 is above limits.max_side=2048"
    row = norm(image="in.png")
    assert (row["width"], row["height"]) == (None, None)  # the image's, once it is read
    row = norm(image="in.png", width=128)
    assert (row["width"], row["height"]) == (128, None)


def test_values_in_messages_are_quoted_whole_up_to_60_characters_then_cut():
    from k3batch.rows.values import show

    assert show("x" * 58) == "'" + "x" * 58 + "'"  # 60 characters quoted
    assert show("x" * 59) == "'" + "x" * 56 + "... (59 chars)"
    assert norm(width="w" * 100)["error"] == "width: expected an integer, got '" + "w" * 56 + (
        "... (100 chars)"
    )
