"""`RowCheck`: one row being normalised: its raw values, the rules, and what the per-concern
checks (`prompt`, `images`, `sampling`, `prior`, `hints`, `image_prompts`, `seeds`) resolve,
report as errors, or warn about."""

from __future__ import annotations

from k3batch import schema
from k3batch.rows.values import RowError


class RowCheck:
    def __init__(self, raw: dict, prompt_column: str, rules):
        self.raw = raw
        self.prompt_column = prompt_column
        self.rules = rules
        self.capabilities = rules.capabilities
        self.member = rules.capabilities.member
        self.out: dict = {schema.ID: raw[schema.ID]}
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.has_image = False  # a usable `image` on a member that takes one

    def field(self, name: str, parse, check):
        """The row's `name` parsed and checked, or the rules' default when the row has none;
        None (and the error recorded) when it is bad."""
        value = self.raw.get(name)
        if value is None:
            return getattr(self.rules, name)
        try:
            return check(parse(name, value))
        except RowError as e:
            self.errors.append(str(e))
            return None
