"""Kubernetes quantities: the grammar, bounded work for hostile text, rounding and the upper bound."""

from __future__ import annotations

from fractions import Fraction

import pytest

from virtlet import quantity

GiB = 1024**3
MiB = 1024**2
TiB = 1024**4


@pytest.mark.parametrize(("text", "expected"), [
    ("1073741824", 1073741824),
    ("4Gi", 4 * GiB),
    ("500M", 500_000_000),
    ("500Mi", 500 * MiB),
    ("1.5Gi", 3 * GiB // 2),
    ("1k", 1000),
    ("1Ki", 1024),
    ("1e3", 1000),
    ("1E3", 1000),
    ("1E", 10**18),
    ("2E3", 2000),
    ("1e+3", 1000),
    ("1e30", 10**30),
    ("5.", 5),
    (" 2G ", 2 * 10**9),
    ("+3", 3),
    (".5Ki", 512),
])
def test_grammar(text: str, expected: int) -> None:
    assert quantity.parse(text) == expected


def test_exact_fractions_and_signs() -> None:
    assert quantity.parse("100m") == Fraction(1, 10)
    assert quantity.parse("1e-3") == Fraction(1, 1000)
    assert quantity.parse("1n") == Fraction(1, 10**9)
    assert quantity.parse("-1Ki") == -1024


@pytest.mark.parametrize("text", ["", "Gi", "4 Gi", "4gi", "4GB", "abc", "1.2.3", "4Gi4", "--1", "1e", "0x10",
                                  "1e3Gi", "1.5e", "e3", "1_000", "4Gi\n1", "Infinity", "nan", "1ei"])
def test_refuses_what_is_not_the_grammar(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity.parse(text)


@pytest.mark.parametrize("text", ["\u00b2", "1\u00b2Gi", "\u0663Gi", "\uff11Gi", "1e\u00b3", "\U0001d7d9"])
def test_only_ascii_digits(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity.parse(text)


@pytest.mark.parametrize("text", ["1e99999999", "1e5000", "1e31", "1e-31", "9" * 10 + "e-99999999"])
def test_exponents_are_bounded(text: str) -> None:
    with pytest.raises(ValueError, match="exponent"):
        quantity.parse(text)


def test_length_is_bounded() -> None:
    assert quantity.parse("1" * quantity.MAX_TEXT) == int("1" * quantity.MAX_TEXT)
    with pytest.raises(ValueError, match="too long"):
        quantity.parse("1" * (quantity.MAX_TEXT + 1))
    with pytest.raises(ValueError, match="too long"):
        quantity.parse("9" * 100_000)  # int() would refuse this with its own (4300 digits) error


def test_not_a_string() -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity.parse(12)


@pytest.mark.parametrize(("text", "expected"), [
    ("0.5", 1), ("100m", 1), ("1.0000001", 2), ("1.5Ki", 1536), ("1n", 1), ("1e-30", 1), ("4Gi", 4 * GiB)])
def test_bytes_round_up(text: str, expected: int) -> None:
    assert quantity.parse_bytes(text, TiB) == expected


@pytest.mark.parametrize("text", ["0", "-1", "-4Gi", "0.0", "-1m"])
def test_bytes_must_be_positive(text: str) -> None:
    with pytest.raises(ValueError, match="not a positive size"):
        quantity.parse_bytes(text, TiB)


def test_bytes_upper_bound_names_the_maximum() -> None:
    assert quantity.parse_bytes("1Ti", TiB) == TiB
    assert quantity.parse_bytes("1e12", TiB) == 10**12
    with pytest.raises(ValueError, match="largest allowed, 1Ti"):
        quantity.parse_bytes("8Ei", TiB)
    with pytest.raises(ValueError, match="largest allowed, 1Ti"):
        quantity.parse_bytes("1e30", TiB)
    with pytest.raises(ValueError, match="largest allowed, 1Ti"):
        quantity.parse_bytes(f"{TiB + 1}", TiB)


@pytest.mark.parametrize(("size", "text"), [
    (2**40, "1Ti"), (3 * 2**30, "3Gi"), (1536, "1536"), (1024, "1Ki"), (0, "0"), (2**60, "1Ei"), (1000, "1000")])
def test_format_bytes(size: int, text: str) -> None:
    assert quantity.format_bytes(size) == text
