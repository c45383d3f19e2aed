"""One rule for shrinking an image size so its long side is at most N pixels.

Kept free of torch and numpy so that light tools (``headless_train stage pack``, the
capture importer) can use it without loading the heavy stack.
"""

from __future__ import annotations


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
