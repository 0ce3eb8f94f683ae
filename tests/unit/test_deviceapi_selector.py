"""Kubernetes label selectors: the grammar, the semantics, and refusals naming the selector."""

from __future__ import annotations

import pytest

from gpufleet.deviceapi.errors import InvalidError
from gpufleet.deviceapi.selector import parse

LABELS = {"zone": "a", "tier": "gold", "example.com/pool": "train"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("zone=a", True),
        ("zone==a", True),
        ("zone=b", False),
        ("zone!=b", True),
        ("zone!=a", False),
        ("missing!=x", True),
        ("zone in (a,b)", True),
        ("zone in (b, c)", False),
        ("zone notin (b)", True),
        ("zone notin (a)", False),
        ("missing notin (a)", True),
        ("missing in (a)", False),
        ("zone", True),
        ("missing", False),
        ("!missing", True),
        ("!zone", False),
        ("zone=a,tier=gold", True),
        ("zone=a,tier=silver", False),
        (" zone = a , tier in ( gold ) ", True),
        ("example.com/pool=train", True),
        ("zone=", False),
    ],
)
def test_selector_matches_like_kubernetes(selector: str, expected: bool) -> None:
    assert parse(selector).matches(LABELS) is expected


def test_empty_value_selects_an_empty_label() -> None:
    assert parse("zone=").matches({"zone": ""})


@pytest.mark.parametrize(
    "selector",
    [
        "zone=a,",
        ",zone=a",
        "zone=a b",
        "zone in a",
        "zone in (a",
        "zone in ()",
        "zone notin",
        "=a",
        "!",
        "zone=(a)",
        "Zone_-=a",
        "-zone=a",
        "zone=" + "x" * 64,
        "Bad_Prefix/zone=a",
        "zone=a=b",
        "zone > 3",
    ],
)
def test_malformed_selector_is_refused_naming_it(selector: str) -> None:
    with pytest.raises(InvalidError, match="invalid label selector"):
        parse(selector)


def test_refusal_quotes_the_selector_text() -> None:
    with pytest.raises(InvalidError, match=r"'zone in \(a'"):
        parse("zone in (a")
