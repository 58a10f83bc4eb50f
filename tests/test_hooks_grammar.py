"""The hook-name grammar (:mod:`moe_interp.hooks`): parse/format round trips and error messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_interp.hooks import (
    BLOCK_SITES,
    GLOBAL_SITES,
    HookName,
    closest_names,
    format_hook,
    parse_hook,
    validate_names,
)

EXPERT_SITE = "mlp.experts.{e}.hook_out"
PLAIN_SITES = sorted(s for s in BLOCK_SITES if s != EXPERT_SITE)

layers = st.integers(min_value=0, max_value=10_000)
experts = st.integers(min_value=0, max_value=100_000)


@given(layer=layers, site=st.sampled_from(PLAIN_SITES))
def test_block_round_trip(layer: int, site: str) -> None:
    name = format_hook(layer, site)
    assert name == f"blocks.{layer}.{site}"
    assert parse_hook(name) == HookName(layer, site)
    assert str(parse_hook(name)) == name


@given(layer=layers, expert=experts)
def test_expert_round_trip(layer: int, expert: int) -> None:
    name = format_hook(layer, EXPERT_SITE, expert)
    assert name == f"blocks.{layer}.mlp.experts.{expert}.hook_out"
    parsed = parse_hook(name)
    assert (parsed.layer, parsed.site, parsed.expert) == (layer, EXPERT_SITE, expert)
    assert str(parsed) == name


@pytest.mark.parametrize("site", sorted(GLOBAL_SITES))
def test_global_round_trip(site: str) -> None:
    assert parse_hook(site) == HookName(None, site)
    assert format_hook(None, site) == site


@given(st.text(max_size=40))
def test_parse_is_total(text: str) -> None:
    """Any string either parses to a name that formats and parses back to itself, or is a ValueError."""
    try:
        parsed = parse_hook(text)
    except ValueError as err:
        assert "Valid forms" in str(err)
        return
    assert parse_hook(str(parsed)) == parsed


@given(
    prefix=st.sampled_from(["", "blocks.", "blocks.3.", "blocks.3.mlp.", "blocks.3.mlp.experts."]),
    junk=st.text(alphabet="abcxyz_.0123456789", min_size=1, max_size=12),
)
def test_near_misses_rejected_or_canonical(prefix: str, junk: str) -> None:
    """Names built from grammar fragments are rejected unless they are exactly canonical."""
    name = prefix + junk
    try:
        parsed = parse_hook(name)
    except ValueError:
        return
    assert str(parsed) == name


@pytest.mark.parametrize(
    "name",
    [
        "blocks.0.hook_resid_pre\n",  # `$` matches before a trailing newline
        "blocks.01.hook_resid_pre",  # leading zero
        "blocks.\u0663.hook_resid_pre",  # Arabic-Indic digit three matches \d
        "blocks.0.mlp.experts.{e}.hook_out",  # the documentation template itself
    ],
)
def test_non_canonical_names_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        parse_hook(name)


@pytest.mark.parametrize("bad", [None, 3, ["blocks.0.hook_resid_pre"]])
def test_non_string_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="string"):
        parse_hook(bad)  # type: ignore[arg-type]


def test_error_lists_valid_forms() -> None:
    with pytest.raises(ValueError, match="hook_resid_pre") as err:
        parse_hook("blocks.0.hook_nope")
    assert all(site in str(err.value) for site in GLOBAL_SITES)


def test_validate_names_suggests_closest() -> None:
    valid = [format_hook(L, s) for L in range(3) for s in PLAIN_SITES]
    assert validate_names("blocks.1.hook_resid_pre", set(valid), valid) == ["blocks.1.hook_resid_pre"]
    with pytest.raises(ValueError, match="blocks.1.hook_resid_pre") as err:
        validate_names(["blocks.1.hook_resid_pree"], set(valid), valid)
    assert "Closest valid names" in str(err.value)
    with pytest.raises(ValueError, match="strings"):
        validate_names([1], set(valid), valid)  # type: ignore[list-item]
    assert closest_names("zzzz", valid) == []


def test_model_names_parse(tiny_model: object) -> None:
    """Every hook name a model enumerates is canonical in the grammar."""
    for family in ("olmoe", "qwen3_next", "llama"):
        model = tiny_model(family)  # type: ignore[operator]
        for name in model.hook_names():
            assert str(parse_hook(name)) == name
