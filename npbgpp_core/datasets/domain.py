"""Which bundled NPBG++ network suits a loaded scene: its data *domain*.

One rule, used by the demo, ``bench/bench_quality.py``, the worker service (the add-on's
Aggregate Descriptors with Network = Auto) and anyone calling
``load_pretrained_npbgpp(domain=scene_domain(scene))``:

- ``"object"``: a cut-out object composited over a plain colour. The views are RGBA
  images whose alpha is the mask (``View.mask_from_alpha``), the loader composites them
  over a colour (``SceneData.background is not None``), and the alpha really cuts
  something out: at least :data:`MIN_TRANSPARENT` of the pixels of the first and middle
  views have alpha below 0.5 (read at :data:`PROBE_SIDE` px: cheap).
- ``"scene"``: everything else (RGB photos and renders, COLMAP captures, rooms, Blender
  environments, and RGBA renders whose alpha is opaque everywhere, e.g. a room exported
  with a transparent film: the walls fill the frame).

The domains and their files are defined in :mod:`npbgpp_core.pretrained`.
"""

from __future__ import annotations

from ..image_size import fit_long_side
from .images import read_alpha
from .scene_data import SceneData

MIN_TRANSPARENT = 0.01  # fraction of pixels with alpha < 0.5 that makes a cut-out
PROBE_SIDE = 64  # long side, in pixels, at which the alpha is read


def transparent_fraction(scene: SceneData, views: int = 2) -> float:
    """Mean fraction of pixels with alpha < 0.5 over ``views`` evenly spaced training views
    (all views when there is no train split; ``views=2``: the first and the middle one)
    that store their mask as alpha; 0.0 when none does."""
    order = list(scene.train) or list(range(len(scene.views)))
    picks = sorted({order[(k * len(order)) // views] for k in range(views)}) if order and views > 0 else []
    fractions = []
    for i in picks:
        v = scene.views[i]
        if not v.mask_from_alpha:
            continue
        h, w = v.camera.image_size
        alpha = read_alpha(v.image_path, fit_long_side((h, w), PROBE_SIDE))
        fractions.append(float((alpha < 0.5).float().mean()))
    return sum(fractions) / len(fractions) if fractions else 0.0


def scene_domain(scene: SceneData) -> str:
    """``"object"`` for a cut-out object over a plain colour, ``"scene"`` otherwise (the
    module doc gives the rule)."""
    if scene.background is None or not any(v.mask_from_alpha for v in scene.views):
        return "scene"
    return "object" if transparent_fraction(scene) >= MIN_TRANSPARENT else "scene"
