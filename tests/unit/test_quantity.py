"""Kubernetes quantity parsing, checked against the values the API server computes."""

from decimal import Decimal

import pytest

from cdi.api import QuantityError, format_size, parse_quantity, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10Gi", 10 * 2**30),
        ("1.5G", 1_500_000_000),
        ("500M", 500_000_000),
        ("1Ki", 1024),
        ("1k", 1000),
        ("1.5Gi", 1610612736),
        ("0", 0),
        ("1e3", 1000),
        ("1E6", 1_000_000),
        ("100", 100),
        ("2Ti", 2 * 2**40),
        ("1Ei", 2**60),
        (" 64Mi ", 64 * 2**20),
        (".5Ki", 512),
        ("1500m", 2),  # 1.5 bytes rounds up, as the API server does for integer values
    ],
    ids=str,
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_quantity_is_exact() -> None:
    assert parse_quantity("1.1Gi") == Decimal("1.1") * 2**30
    assert parse_quantity("100m") == Decimal("0.1")


@pytest.mark.parametrize(
    "text", ["", "Gi", "10GB", "ten", "1.2.3", "10 Gi", "1e", "--1", "1Mib", "1e99"]
)
def test_parse_rejects_garbage(text: str) -> None:
    with pytest.raises(QuantityError, match=r"quantity|exponent"):
        parse_quantity(text)


def test_parse_size_rejects_negative() -> None:
    with pytest.raises(QuantityError, match="negative"):
        parse_size("-1Gi")


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (10 * 2**30, "10Gi"),
        (1_500_000_000, "1500M"),
        (1023, "1023"),
        (2**20 + 1, "1048577"),
    ],
)
def test_format_size_round_trips(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size
