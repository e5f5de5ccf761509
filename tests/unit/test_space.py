"""CDI's space arithmetic (reference §5.7), with expected values worked out by hand."""

from fractions import Fraction

import pytest

from cdi.api import (
    DEFAULT_FILESYSTEM_OVERHEAD,
    MIB,
    OverheadError,
    parse_overhead,
    required_size,
    resize_target,
    round_down,
    round_up,
    usable_size,
)

GI = 2**30


@pytest.mark.parametrize("text", ["0", "1", "0.06", "0.5", "0.055", "0.0"])
def test_valid_overheads(text: str) -> None:
    parse_overhead(text)


@pytest.mark.parametrize("text", ["abc", "1.abc", "1.5", "0.0555", "-0.1", "2", ".5", "", "0."])
def test_invalid_overheads_are_refused_with_advice(text: str) -> None:
    with pytest.raises(OverheadError, match="between 0 and 1"):
        parse_overhead(text)


def test_default_overhead() -> None:
    assert parse_overhead(DEFAULT_FILESYSTEM_OVERHEAD) == Fraction(6, 100)


def test_alignment() -> None:
    assert round_up(1) == MIB
    assert round_up(MIB) == MIB
    assert round_down(MIB + 1) == MIB
    assert round_down(MIB - 1) == 0


def test_required_size_inflates_for_overhead() -> None:
    # CDI's GetRequiredSpace: ceil(10 GiB / 0.94) = ceil(11422785361.70...)
    assert required_size(10 * GI, Fraction(6, 100)) == 11422785362
    # a size that is not MiB-aligned is first rounded up to 1 MiB: 1 byte -> 1 MiB -> / 0.94
    assert required_size(1, Fraction(6, 100)) == 1115507  # ceil(1048576 / 0.94) = ceil(1115506.38)
    assert required_size(10 * GI, Fraction(0)) == 10 * GI


def test_overhead_of_one_has_no_required_size() -> None:
    with pytest.raises(OverheadError, match="no room"):
        required_size(GI, Fraction(1))


def test_usable_size_deflates_and_aligns_down() -> None:
    # CDI's GetUsableSpace: ceil(10 GiB * 0.94) = 10093173146 -> round down to MiB: 9625 MiB
    assert usable_size(10 * GI, Fraction(6, 100)) == 9625 * MIB
    assert usable_size(10 * GI, Fraction(0)) == 10 * GI
    assert usable_size(MIB - 1, Fraction(0)) == 0


def test_usable_of_required_fits_the_request() -> None:
    # What the controller requests for an image must hold that image after the worker deflates it.
    overhead = Fraction(6, 100)
    for size in (MIB, 10 * GI, 3 * GI + 12345, 20 * MIB + 1):
        assert usable_size(required_size(size, overhead), overhead) >= round_up(size)


def test_resize_target_uses_smaller_of_space_and_request() -> None:
    overhead = Fraction(6, 100)
    assert resize_target(requested=10 * GI, available=100 * GI, overhead=overhead) == 9625 * MIB
    assert resize_target(requested=100 * GI, available=10 * GI, overhead=overhead) == 9625 * MIB
