"""One rule for shrinking an image size so its long side is at most N pixels, and the one
message for an image too large to read at all.

Kept free of torch and numpy so that light tools (``headless_train stage pack``, the
capture importer, ``capture-sfm``) can use it without loading the heavy stack.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable


def fit_long_side(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``size`` shrunk so its long side is at most ``max_side`` pixels.

    Both sides are scaled by ``max_side / max(size)`` and rounded (``round``, so halves
    go to the even neighbour), each kept at least 1 px so a thin strip never vanishes.
    ``size`` comes back unchanged when ``max_side`` is None or it already fits (never
    enlarged). The rule is symmetric, so ``(h, w)`` and ``(w, h)`` both work.
    """
    a, b = size
    if max_side is None or max(a, b) <= max_side:
        return a, b
    scale = max_side / max(a, b)
    return max(1, round(a * scale)), max(1, round(b * scale))


def most_common_size(sizes: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The size most of ``sizes`` have (ties: the earliest); ValueError for none. The render size
    Import Dataset sets from its photos' sizes (a phone capture mixes portrait and landscape)."""
    counts = Counter((int(a), int(b)) for a, b in sizes)  # one pass: a scan can have thousands of views
    if not counts:
        raise ValueError("no sizes to choose from")
    return max(counts, key=counts.__getitem__)  # ties: the first counted, the earliest


# The command that makes a copy of a capture with smaller photos and cameras scaled to match: the one
# wording for every message that advises such a copy (photos too large to read, Aggregate's and Fit
# to Photos' out of memory in the add-on, headless fit's).
SMALLER_PHOTOS_COMMAND = "python -m headless_train prepare-capture SRC --out DST --max-size 2048"

# What to do about a photo too large to read, for a dataset (its cameras scale with the photos).
SMALLER_COPY = ("Make a copy of the dataset with smaller photos and cameras scaled to match (a COLMAP capture: "
                f"{SMALLER_PHOTOS_COMMAND})")


def too_many_pixels(path: str, exc: BaseException, fix: str = SMALLER_COPY) -> str:
    """The message for an image PIL refuses as too large (``exc``, its DecompressionBombError,
    which says how many pixels the file claims and PIL's limit), ending with ``fix``."""
    counts = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(exc))
    size = (f"{int(counts[1]):,} pixels, more than the {int(counts[2]):,}" if counts
            else "more pixels than the")
    return (f"{path}: the image has {size} this project reads (PIL's guard against decompression bombs, files that "
            f"claim a huge image). {fix}")
