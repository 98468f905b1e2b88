"""The registry of model families: each declared once in its package
(`k3batch/model/<family>/family.py`: its members, what it loads, estimates and builds) and
registered in `FAMILIES` here. Torch-free: the config and the pre-flight checks use it
before any model loads.

Code outside a family asks it through `of(member_name)` (a `member.Family`) or a member's own
fields (`member.Member`), never by comparing family names; `row_capabilities` declares what
the rows of a job may bring. Adding a family is adding its package and one entry in
`FAMILIES`.
"""

from __future__ import annotations

from k3batch.model.kandinsky3 import family as kandinsky3
from k3batch.model.kandinsky3.members import BASE, FLASH, INPAINT
from k3batch.model.kandinsky22 import family as kandinsky22
from k3batch.model.kandinsky22.members import K22, K22_DEPTH, K22_INPAINT
from k3batch.model.member import Family, Member
from k3batch.rows.capabilities import RowCapabilities

FAMILIES: dict[str, Family] = {f.name: f for f in (kandinsky3.KANDINSKY3, kandinsky22.KANDINSKY22)}
MEMBERS: dict[str, Member] = {m.name: m for f in FAMILIES.values() for m in f.members}
NAMES = tuple(MEMBERS)
DEFAULT = BASE  # `model.name` when the config names none

__all__ = ["BASE", "FLASH", "INPAINT", "K22", "K22_DEPTH", "K22_INPAINT"]


def of(name: str) -> Family:
    """The family that declares member `name`."""
    return FAMILIES[MEMBERS[name].family]


def members_with(**capabilities) -> list[str]:
    """Names of the members whose fields equal these, e.g. `members_with(needs_mask=True)`."""
    return [
        m.name for m in MEMBERS.values() if all(getattr(m, k) == v for k, v in capabilities.items())
    ]


def row_capabilities(model) -> RowCapabilities:
    """What the rows of a job on `model` (its `ModelConfig`) may bring."""
    return _capabilities(MEMBERS[model.name], of(model.name).conditioning(model))


def default_row_capabilities() -> RowCapabilities:
    """The default member's, without conditioning models (a job that names no model)."""
    return _capabilities(MEMBERS[DEFAULT], {})


def _capabilities(member: Member, conditioning: dict) -> RowCapabilities:
    family = FAMILIES[member.family]

    def names(**fields) -> str:
        return ", ".join(members_with(**fields))

    takers = {
        # The member's own family's: a Kandinsky 3 row with a mask is pointed to 3's inpainting.
        "mask": names(needs_mask=True, family=member.family),
        "strength": names(image_input="optional", needs_hint=False, family=member.family),
        "depth_hint": names(needs_hint=True),
        "conditioning": names(conditioning=True),
        "mix": names(mixes=True),
    }
    return RowCapabilities(
        member, own_schedulers=family.own_schedulers, takers=takers, **conditioning
    )
