"""fit_long_side against hand-computed sizes (the rule the datasets, the fits, staging
and the quality bench share)."""

from __future__ import annotations

import pytest

from npbgpp_core.image_size import fit_long_side


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((384, 512), 384, (288, 384)),  # scale 3/4: 288 exactly
        ((512, 384), 384, (384, 288)),  # the same, portrait: order kept
        ((3, 1000), 300, (1, 300)),  # 0.9 rounds to 1
        ((1, 1000), 300, (1, 300)),  # 0.3 rounds to 0: kept at 1 px
        ((333, 500), 256, (170, 256)),  # 333 * 0.512 = 170.496 -> 170
        ((500, 333), 256, (256, 170)),
        ((250, 1000), 2, (1, 2)),  # 0.5 rounds to even 0, then the 1 px minimum
        ((750, 1000), 2, (2, 2)),  # 1.5 rounds to even 2
        ((5, 4), 2, (2, 2)),  # 4 * 0.4 = 1.6 -> 2
        ((1000, 1000), 64, (64, 64)),
        ((1080, 1920), 1000, (562, 1000)),  # 562.5 -> even 562
        ((1080, 1920), 200, (112, 200)),  # 112.5 -> even 112
    ],
)
def test_shrinks_long_side_to_max(size, max_side, expected):
    assert fit_long_side(size, max_side) == expected


@pytest.mark.parametrize(("size", "max_side"), [((384, 512), 512), ((384, 512), 4096), ((7, 3), 7), ((10, 20), None)])
def test_unchanged_when_within_max_or_no_max(size, max_side):
    assert fit_long_side(size, max_side) == size


def test_most_common_size_ties_the_earliest():
    """Import Dataset's render size: the size most photos have, a tie the earliest's; none refused."""
    from npbgpp_core.image_size import most_common_size

    portrait, landscape = (4032, 3024), (3024, 4032)
    assert most_common_size([portrait, landscape, landscape]) == landscape
    assert most_common_size([portrait, landscape, landscape, portrait]) == portrait
    assert most_common_size(iter([landscape, portrait])) == landscape  # one pass over any iterable
    with pytest.raises(ValueError):
        most_common_size([])
