"""flask_datastar.consts carries every name of datastar_py.consts, with the same values."""

from __future__ import annotations

import enum

import pytest

from flask_datastar import SSE, ElementPatchMode, consts
from tests.helpers import require_module


def public_names(module: object) -> list[str]:
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and (name.isupper() or isinstance(value, enum.EnumMeta))
    ]


def test_every_name_of_datastar_py_consts_has_the_same_value() -> None:
    theirs = require_module("datastar_py.consts", "datastar-py")
    # Their module also holds the Enum and StrEnum base classes it imports or defines.
    names = [n for n in public_names(theirs) if n not in {"Enum", "StrEnum"}]
    assert "DEFAULT_SSE_RETRY_DURATION" in names
    for name in names:
        mine = getattr(consts, name)
        value = getattr(theirs, name)
        if isinstance(value, enum.EnumMeta):
            assert {m.name: m.value for m in mine} == {m.name: m.value for m in value}, name
        else:
            assert mine == value, name


@pytest.mark.parametrize("member", list(ElementPatchMode))
def test_their_enum_members_work_with_our_builders(member: ElementPatchMode) -> None:
    theirs = require_module("datastar_py.consts", "datastar-py")
    event = SSE.patch_elements("<p></p>", selector="#x", mode=theirs.ElementPatchMode(member.value))
    assert event == SSE.patch_elements("<p></p>", selector="#x", mode=member)


def test_the_enums_are_the_packages_own() -> None:
    assert consts.ElementPatchMode is ElementPatchMode
    assert consts.__all__ == sorted(consts.__all__, key=lambda n: (not n.isupper(), n))
