"""The per-scene recipes NPBG and coefficients_ft: their optimisers and step loss, shared
by the plain-PyTorch fitting loops here (the demo and the add-on) and the headless
trainer's Lightning systems (headless_train/systems/npbg.py, coefficients_ft.py).

- :func:`fit_coefficients`: coefficients_ft: the 56 NPBG++ coefficients per point become
  learnable descriptors of an NPBG model with the NPBG++ basis MLP frozen; RMSprop on the
  coefficients and the environment map (lr 0.01 by default here, published 0.1), Adam on
  the refiner (3e-4 here, published 1e-4), two crops per step (published one): short-fit
  defaults, see the function; L1 at full, 1/2 and 1/4 resolution plus 3 x the feature L1 of the
  NPBG++ file's own frozen encoder (:func:`coefficients_ft_loss`).
- :func:`fit_npbg`: NPBG: descriptors start at zero, RMSprop (lr 0.1) on descriptors +
  background, Adam (lr 1e-4) on a refiner that starts from pretrained weights.

Both train on random ``crop`` x ``crop`` windows of the given views (``crops_per_step``
of :class:`FitRecipe` per step) for a fixed number of steps and report the losses and
seconds taken. One step of either recipe is :func:`npbg_step_loss`; the headless
trainer's systems pair it with :func:`npbg_optimizers` (the published optimisers).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from .camera import Camera
from .datasets.images import eight_bit_levels, float_pixels
from .image_size import fit_long_side
from .losses import EncoderFeatureLoss, fft_amplitude_loss, gradient_loss, laplacian_pyramid_loss, multiscale_l1
from .models import NPBG, NPBGConfig, NPBGPlusPlus
from .models.aggregator import AggregatedScene
from .models.background import check_rows, resample_map
from .protocol import CHECK_COMBINES, CHECK_RECIPES, FIT_CHECK_COMBINE, WHOLE_VIEW_MAX_SIDE, WHOLE_VIEW_STEPS

# Rows of the environment map a fit starts from (the aggregated map resampled to it;
# None: the map's own rows), see fit_coefficients.
BACKGROUND_FIT_ROWS: int | None = None

# Whether fit_coefficients' model renders rolled views upright, as NPBG++ does (its
# ``aligned``; the model's config records it, so fitted bundles render the way they were fitted).
# BENCHMARKS.md "Upright fitted scenes": +0.19 to +0.48 dB mean on 4 real captures.
FIT_ALIGNED = True

# Linear learning-rate warm-up of fit_coefficients, in steps: a fixed ramp, so that a fit of
# any length is the start of a longer one and a few-step fit only nudges the aggregated scene.
FIT_WARMUP_STEPS = 20

# Long side, in pixels, of the photos in fit_coefficients' coarse phase (its first
# ``coarse_fraction`` of the steps): the size its short-fit recipe was tuned at (bench_quality's
# default long side; BENCHMARKS.md "Short fits at the photos' own size"). Photos no larger are
# fitted as they are throughout.
FIT_COARSE_SIDE = 256
# photo_exposure (opt-in, off by default: on flowerpot it did not give back what darkening its
# bright photos by hand did): each input photo's rendered crop is given a per-channel gain and
# offset before its loss, so that photos of different exposure do not pull the shared scene
# (BENCHMARKS.md "An opt-in per-photo exposure term in the 200-step fit"). Its own Adam at this
# rate: a photo is in ~6 of a 70-photo fit's 400 crops, and Adam's momentum moves its row ~30x the
# rate after each; at 1e-2 the offsets reached +-50/255 and the fit lost 0.2-2.6 dB there.
PHOTO_EXPOSURE_LR = 1e-3

# Whether the users' fits (scene_fit.BundleFit: the add-on's Fit to Photos, headless_train fit;
# and bench_quality, which scores what they run) keep one input view apart and keep the unfitted
# scene when the fit scores more than CHECK_TOLERANCE_DB lower there (fit_coefficients' check_view;
# these figures were measured with no tolerance, which changes none of them). On: at 6 input views it
# removed the default fit's losses to no fit (beer -0.91, meetingroom -1.26 dB) and raised the
# mean of 9 captures by 0.27 dB; with all input views it kept every fit, mean +0.03 dB
# (BENCHMARKS.md "A fit that cannot make a scene worse").
FIT_CHECK_VIEW = True

# How far (dB) a checked fit may score below the unfitted scene on the kept-apart photo and
# still be kept: that photo also built the aggregated scene, so the unfitted scene starts ahead
# on it, and a near tie is noise. The 12 other fits the check dropped at 6 input views lost
# 1.52-2.62 dB there (beer, test_colmap, meetingroom, perikles; 256 px seeds 0 and 1, 512 px
# seed 0), and no kept fit lost at all; mouse's, dropped at 512 px for 0.07 dB, is kept now:
# held-out 18.70 -> 18.94 dB, mean of 9 16.51 -> 16.54. 0.5 is read off those runs, not tuned
# on a separate set (BENCHMARKS.md "A tolerance for the check").
CHECK_TOLERANCE_DB = 0.5

# CHECK_RECIPES (imported above from npbgpp_core.protocol, which is torch-free, so that the add-on
# sends the same tuple; this module re-exports it): the recipes a checked fit can choose between on
# its kept-apart photo (fit_coefficients' check_recipes): "crops" is the call's own crop, steps and
# crops_per_step; "whole" is WHOLE_VIEW_STEPS steps of one whole input view each (crop=None,
# crops_per_step=1), the recipe that beat the crops on some captures and lost on others
# (BENCHMARKS.md "Whole-view steps at the photos' own size", "Fits for captures with few photos").
# Opt-in, not the users' fits: choosing on the kept photo won at 512 px / 6 views (mean of 9
# +0.47 dB, video_sfm +3.51) but lost elsewhere (256 px / 6 views -0.12, flowerpot -0.60; 512 px
# all views beer -0.84 on a 0.11 dB kept-photo margin; BENCHMARKS.md "A checked fit that chooses
# its recipe on the kept photo").

# CHECK_COMBINES (imported above from npbgpp_core.protocol; re-exported): how a choosing check turns its
# recipes' fits into one (fit_coefficients' check_combine): "choose" (FIT_CHECK_COMBINE, the default,
# imported and re-exported likewise) keeps the best on the
# kept photo; "average" (opt-in) the element-wise mean of every recipe's fitted state (average_states),
# scored there and checked as usual: a mean of fits that started from one scene needs no judge between
# them, only the check against no fit. Opt-in: at 512 px it gained over the plain check (mean of 9,
# 6 / all views: +0.26 / +0.27 dB at seed 0, +0.09 / +0.16 at seed 1; no capture more than 0.3 dB below
# it in those runs, where choosing lost up to 0.84); at 256 px about level on the mean (-0.02 / -0.12 at
# seed 0, +0.04 / +0.11 at seed 1) with desk 0.38-0.49 dB below it in all four runs;
# BENCHMARKS.md "Averaged fits ("soups") of a choosing check's states").

# WHOLE_VIEW_STEPS (imported above from npbgpp_core.protocol, for the add-on's text; re-exported):
# steps of the "whole" candidate recipe of a choosing check (CHECK_RECIPES). WHOLE_VIEW_MAX_SIDE (likewise):
# the long side that recipe fits its photos at (None: their own; fit_coefficients' whole_max_side).

# The fewest input views a checked fit keeps one apart from: with fewer, the fit would lose a
# third or more of its photos to the check, so it fits on all of them unchecked (and says so).
CHECK_VIEW_MIN_VIEWS = 3

# The most pixels a checked fit's scoring render of its kept-apart photo computes at once:
# larger photos render in windows (scene.render_model_windowed), as the add-on's frames do
# at its default Tile Size (2048): a whole 3000x3000 frame peaked at 6.0 GB, in windows at
# 2.9 GB (BENCHMARKS.md "Tiled neural frames (bounded memory)").
CHECK_VIEW_MAX_PIXELS = 2048 * 2048

# Whether the users' checked fits also leave the kept-apart photo out of the aggregation the
# check scores unfitted and the fit starts from (fit_coefficients' fair_check): the aggregated
# bundle was built from every photo, the kept one included, so its unfitted score there runs
# ahead of held-out views and the check leans towards dropping the fit. Off: at 6 input views it
# kept beer's fit 0.30 dB below no fitting and the mean of 9 captures fell 17.72 -> 17.61 dB (a
# kept fit starts from K - 1 photos' aggregation); with all views 19.43 -> 19.38 (BENCHMARKS.md
# "A fair check: the kept photo left out of the aggregation too").
FIT_FAIR_CHECK = False

# How many elements of a state average_states sums at a time (float64, 8 MB): summed whole, a state
# of millions of points held three float64 copies of its descriptors at once (~4 GB at 3M points).
AVERAGE_CHUNK = 1 << 20

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class FitViews:
    """Training views: images (K, 3, H, W) or K photos of their own sizes, one camera each,
    optional masks (K, 1, H, W) of valid pixels (pixels outside never contribute to the loss).

    ``images`` is the stored stack: float in [0, 1], or uint8 holding k/255 (photos read from
    8-bit files, 4x smaller: 12-MP photos held as float32 took 129 MB each, BENCHMARKS.md "A
    user's capture with big photos"); ``masks`` float or bool. Or ``images`` is a list of
    photos (3, h, w) of their own sizes, each uint8 or float (:func:`read_fit_views` for photos
    of different sizes): the canvas is then the largest height and width, each photo reads as
    padded with zeros at the bottom and right to it, and its mask (implied: ``masks`` must be
    None) marks its own pixels, exactly as a padded stack with bool masks gives them, without
    holding the padding (a portrait and landscape capture padded every photo to a square) or
    the masks. Read them through :meth:`image` and :meth:`mask`, which give floats (a uint8 k as
    float32(k) / 255, bit for bit what the image reader gives; bool masks as float32; float
    stacks as stored; a list's photos as its :attr:`float_dtype`), so that no caller sees uint8
    or bool. ``rows``: the row of the stack (or list) each camera's view is (None: row k), so
    that :func:`views_without` shares the stored photos instead of copying all but one; there
    may then be more rows than views, so view k is row ``row(k)``, never ``k``, and the count is
    ``len(cameras)``."""

    images: torch.Tensor | list[torch.Tensor]
    cameras: list[Camera]
    masks: torch.Tensor | None = None
    rows: list[int] | None = None
    # canvas and float_dtype, found once from the stored photos (every image() call asks for them)
    _canvas: tuple[int, int] = field(init=False, repr=False, compare=False)
    _float_dtype: torch.dtype = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.images, tuple):
            self.images = list(self.images)
        if isinstance(self.images, list):
            for k, im in enumerate(self.images):
                if im.ndim != 3 or im.shape[0] != 3:
                    raise ValueError(f"image {k} must be (3, H, W), got {tuple(im.shape)}")
                if im.dtype != torch.uint8 and not im.is_floating_point():
                    raise ValueError(f"image {k} must be float in [0, 1] or uint8, got {im.dtype}")
            if self.masks is not None:
                raise ValueError("photos of their own sizes (a list) have implied masks: masks must be None")
        else:
            if self.images.ndim != 4 or self.images.shape[1] != 3:
                raise ValueError(f"images must be (K, 3, H, W), got {tuple(self.images.shape)}")
            if self.images.dtype != torch.uint8 and not self.images.is_floating_point():
                raise ValueError(f"images must be float in [0, 1] or uint8, got {self.images.dtype}")
        stored = len(self.images)
        if self.rows is None:
            if len(self.cameras) != stored:
                raise ValueError(f"{stored} images but {len(self.cameras)} cameras")
        else:
            self.rows = [int(r) for r in self.rows]
            if len(self.rows) != len(self.cameras) or any(not 0 <= r < stored for r in self.rows):
                raise ValueError(f"rows {self.rows} must name one of the {stored} images for each of "
                                 f"{len(self.cameras)} cameras")
        if self.masks is not None and (self.masks.shape[0] != stored or self.masks.shape[1] != 1):
            raise ValueError(f"masks must be (K, 1, H, W), got {tuple(self.masks.shape)}")
        if not self.cameras:
            raise ValueError("fitting needs at least one view")
        stored = self.images if isinstance(self.images, list) else [self.images]
        self._canvas = max(int(im.shape[-2]) for im in stored), max(int(im.shape[-1]) for im in stored)
        dtype = None
        for im in stored:
            own = torch.float32 if im.dtype == torch.uint8 else im.dtype
            dtype = own if dtype is None else torch.promote_types(dtype, own)
        self._float_dtype = dtype

    @property
    def own_sizes(self) -> bool:
        """Whether the photos are stored at their own sizes (a list), not as a padded stack."""
        return isinstance(self.images, list)

    @property
    def canvas(self) -> tuple[int, int]:
        """Height and width every view's image has (the padded canvas: for photos of their own
        sizes, the largest height and width among them, the rows views_without left out too)."""
        return self._canvas

    @property
    def float_dtype(self) -> torch.dtype:
        """The float type :meth:`image` gives: a stack's (float32 for uint8); for a list, the
        photos' types promoted (an 8-bit photo's float32), the type their padded stack had."""
        return self._float_dtype

    @property
    def stored_bytes(self) -> int:
        """Bytes the stored photos and masks take (shared rows counted once)."""
        stored = self.images if isinstance(self.images, list) else [self.images]
        return sum(im.nbytes for im in stored) + (0 if self.masks is None else self.masks.nbytes)

    def row(self, k: int) -> int:
        """The row of the stored stack (or index of the stored list) that view ``k`` is."""
        return k if self.rows is None else self.rows[k]

    def image(self, k: int, top: int = 0, left: int = 0, height: int | None = None,
              width: int | None = None) -> torch.Tensor:
        """View ``k``'s image (3, h, w) as float in [0, 1], the window at ``top``, ``left`` of
        ``height`` x ``width`` (None: to the canvas's edge): only the window is converted."""
        if isinstance(self.images, list):
            photo = self.images[self.row(k)]
            window = float_pixels(self._padded(photo, top, left, height, width))
            return window.to(self.float_dtype)
        return float_pixels(self._window(self.images, k, top, left, height, width))

    def mask(self, k: int, top: int = 0, left: int = 0, height: int | None = None,
             width: int | None = None) -> torch.Tensor | None:
        """View ``k``'s mask (1, h, w) as float (1 valid, 0 not; bool masks as float32, float
        ones as stored), the same window as :meth:`image`; None for unmasked views."""
        if isinstance(self.images, list):
            # ones on the photo's own pixels, zeros on the padding: only the window is made
            (rows, cols), (h, w) = self._padded_extent(self.images[self.row(k)], top, left, height, width)
            window = torch.zeros((1, rows, cols), dtype=torch.float32)
            window[:, :h, :w] = 1.0
            return window
        if self.masks is None:
            return None
        window = self._window(self.masks, k, top, left, height, width)
        return window.to(torch.float32) if window.dtype == torch.bool else window

    def _window(self, stack: torch.Tensor, k: int, top: int, left: int, height: int | None,
                width: int | None) -> torch.Tensor:
        """View ``k``'s window of ``stack`` (the images or the masks) as :meth:`image` names it,
        stored type (a view of the stack, nothing copied)."""
        bottom = None if height is None else top + height
        right = None if width is None else left + width
        return stack[self.row(k), :, top:bottom, left:right]

    def _padded_extent(self, photo: torch.Tensor, top: int, left: int, height: int | None,
                       width: int | None) -> tuple[tuple[int, int], tuple[int, int]]:
        """The window's (rows, columns) as a padded stack's slicing gives them (clipped to the
        canvas) and how many of those lie on ``photo`` (c, h, w) itself."""
        H, W = self.canvas
        bottom = H if height is None else min(top + height, H)
        right = W if width is None else min(left + width, W)
        h, w = int(photo.shape[-2]), int(photo.shape[-1])
        window = (max(bottom - top, 0), max(right - left, 0))
        return window, (max(min(h, bottom) - top, 0), max(min(w, right) - left, 0))

    def _padded(self, photo: torch.Tensor, top: int, left: int, height: int | None,
                width: int | None) -> torch.Tensor:
        """The window of ``photo`` (c, h, w) as if it were padded with zeros at the bottom and
        right to the canvas (the window a padded stack gives), stored type: a view of the photo
        when the window lies inside it, else only the window, zeros outside the photo."""
        (rows, cols), (h, w) = self._padded_extent(photo, top, left, height, width)
        if (h, w) == (rows, cols):
            return photo[:, top:top + h, left:left + w]
        out = photo.new_zeros((photo.shape[0], rows, cols))
        out[:, :h, :w] = photo[:, top:top + h, left:left + w]
        return out


def eight_bit_pixels(image: torch.Tensor) -> torch.Tensor | None:
    """``image`` as uint8 when it is float32 holding exactly k/255 in every pixel (a photo read
    from an 8-bit file, not resampled), so that storing it as uint8 loses nothing
    (:func:`float_pixels` gives the same floats back); None otherwise (resampled or
    16-bit photos, other float types, NaN), which are then kept as floats."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype != torch.float32:
        return None
    # the one rounding rule; it clamps rather than range-checks (three passes and three masks
    # fewer on a 12-MP photo): a pixel out of [0, 1] (or NaN) becomes a level whose float differs
    # from it, so the comparison refuses it
    eight = eight_bit_levels(image)
    return eight if torch.equal(float_pixels(eight), image) else None


@dataclass
class FitCandidate:
    """One recipe of a choosing check (``check_recipes``): its name (:data:`CHECK_RECIPES`), the
    kept-apart photo's PSNR in dB after its fit, its steps and fitting seconds."""

    recipe: str
    psnr_fitted: float
    steps: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (PSNR rounded to 0.001 dB; not finite as None)."""
        db = round(self.psnr_fitted, 3) if math.isfinite(self.psnr_fitted) else None
        return {"recipe": self.recipe, "psnr_fitted": db, "steps": self.steps, "seconds": round(self.seconds, 3)}


@dataclass
class FitCheck:
    """The outcome of a checked fit (``check_view``): ``view`` is the index, among the
    views given, of the one kept apart (None when the check could not apply: ``skipped``
    says why, and the fit used every view); ``psnr_unfitted`` / ``psnr_fitted`` its PSNR
    in dB before step 1 and after the last step; ``kept`` "fitted" or "unfitted" (the
    fitted model scored more than ``tolerance`` dB below the unfitted one, or its render was
    not finite, so the result is the unfitted model; a loss of ``tolerance`` or less, or an
    unfitted score of NaN, keeps the fit).
    ``aggregated_without``: a fair check (``fair_check``): both scores and the fit came from
    an aggregation without the kept view, which took ``aggregate_seconds``.
    A choosing check (``check_recipes``): ``combine`` what it was asked to do with the recipes' fits
    (``check_combine``: "choose" or "average"), also when it could not apply; "" for a plain check.
    ``candidates``: every recipe fitted, in order, with its score on the kept view (none when the
    check could not apply). ``chosen``: the recipe whose fit is the result's: the best-scoring one of
    a choice (``psnr_fitted`` is its), or, when the check could not apply, the one that ran unchecked
    (the first named; ``skipped`` then names the average or choice asked for, with two or more
    recipes); "" for an average. ``averaged`` and ``recipe`` are derived from these: one record, no
    two fields that could disagree."""

    view: int | None
    psnr_unfitted: float | None = None
    psnr_fitted: float | None = None
    kept: str = "fitted"
    skipped: str = ""
    aggregated_without: bool = False
    aggregate_seconds: float = 0.0
    tolerance: float = 0.0
    chosen: str = ""
    candidates: list[FitCandidate] = field(default_factory=list)
    combine: str = ""

    @property
    def averaged(self) -> bool:
        """Whether the check took the mean of every candidate's fit (asked "average", and the check
        applied) and judged it, whether ``kept`` or not: ``psnr_fitted`` is then the mean's score."""
        return self.combine == "average" and self.view is not None

    @property
    def recipe(self) -> str:
        """What the result's fit is, for the metadata and the lines: "average" for an average, else
        ``chosen`` ("" for a plain check)."""
        return "average" if self.averaged else self.chosen

    @property
    def render_not_finite(self) -> bool:
        """Whether the fit was dropped because its render of the kept view was not finite
        (its score NaN; +inf is an exact match): the fit itself is broken, so no setting of the
        check is a way to keep it, unlike a fit that merely scored lower."""
        return self.kept == "unfitted" and self.psnr_fitted is not None and math.isnan(self.psnr_fitted)

    @property
    def choosing_keeps(self) -> str:
        """For an average dropped because its render was not finite: the recipe a choosing check
        ("choose") would keep of the same candidates (the best own score that is not NaN, the first
        on a tie, as choosing picks, and kept by the check: no more than ``tolerance`` below the
        unfitted score); "" when no candidate would be kept, or for any other check. Why: one
        broken recipe breaks the mean, while choosing would have kept a sound one, so the advice
        for such a fit is a setting and not that the fit itself broke."""
        if not self.averaged or not self.render_not_finite:
            return ""
        best: FitCandidate | None = None
        for candidate in self.candidates:
            if beats_best(candidate.psnr_fitted, None if best is None else best.psnr_fitted):
                best = candidate
        unfitted = math.nan if self.psnr_unfitted is None else self.psnr_unfitted
        if best is None or not check_keeps_fit(best.psnr_fitted, unfitted, self.tolerance):
            return ""
        return best.recipe

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (PSNRs rounded to 0.001 dB; +inf, an exact match, as None)."""
        def db(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else round(value, 3)

        out: dict[str, Any] = {"view": self.view, "kept": self.kept}
        if self.skipped:
            out["skipped"] = self.skipped
        else:
            out.update(psnr_unfitted=db(self.psnr_unfitted), psnr_fitted=db(self.psnr_fitted),
                       tolerance_db=self.tolerance)
        if self.aggregated_without:
            out.update(aggregated_without=True, aggregate_s=round(self.aggregate_seconds, 3))
        if self.recipe:
            out["recipe"] = self.recipe
        if self.combine:
            out["combine"] = self.combine
        if self.candidates:
            out["candidates"] = [c.as_dict() for c in self.candidates]
        return out


@dataclass
class FitResult:
    """The fitted model, the loss of every step and the wall time; ``check`` the
    :class:`FitCheck` of a fit with ``check_view`` (None without). ``candidate_states``: with
    ``keep_candidates``, each fitted candidate recipe's model state (CPU), by recipe name, so
    that a benchmark can score the recipes the check did not choose; ``unfitted_state`` with it
    the state every candidate started from (CPU; a fair check's: the scene without the kept view),
    for a benchmark's mixes of the two (:func:`average_states`)."""

    model: NPBG
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    check: FitCheck | None = None
    candidate_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    unfitted_state: dict[str, torch.Tensor] | None = None
    exposure: PhotoExposure | None = None  # photo_exposure's fitted corrections, one per fitted photo

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def steps_in_all(self) -> int:
        """The steps of every recipe a choosing check fitted (``check.candidates``, each from the
        unfitted scene), of which ``steps`` and ``losses`` are one fit's (the chosen one, or an
        average's first); 0 when no choosing check fitted any (no check, a plain one, or one that
        could not apply: ``steps`` are then all there were). One sum for every report of it."""
        return 0 if self.check is None else sum(c.steps for c in self.check.candidates)


def padded_fit_views(images: Sequence[torch.Tensor], cameras: Sequence[Camera]) -> FitViews:
    """FitViews of photos of different sizes (3, H_k, W_k): each reads as padded at the bottom
    and right to the largest height and width, its camera widened to that canvas
    (:meth:`Camera.cropped` keeps the intrinsics), and a mask marks its own pixels, so that
    the padding never enters the loss. Without it a caller would have to drop or resample
    the odd-sized views (a COLMAP capture's undistorted photos differ by a row or two,
    phone captures mix portrait and landscape). Same-sized photos give unmasked views.
    Photos exactly k/255 are stored as uint8, photos of different sizes at their own sizes with
    the padding and masks implied (:func:`read_fit_views`)."""
    if len(images) != len(cameras):
        raise ValueError(f"{len(images)} images but {len(cameras)} cameras")
    return read_fit_views(lambda k: images[k], cameras)


def read_fit_views(load: Callable[[int], torch.Tensor], cameras: Sequence[Camera]) -> FitViews:
    """:func:`padded_fit_views` of the photos ``load(k)`` gives for k = 0 .. K-1, each read
    once and stored as it will be held, so that the photos are never held twice (a list read,
    then the stack). A photo exactly k/255 (:func:`eight_bit_pixels`: an 8-bit file, not
    resampled) is stored as uint8: 4x smaller, and the floats read back are the photo's own, so a
    fit is bit for bit the same. Photos that are not (undistorted, resized or 16-bit ones) are
    kept as read: not rounded, so no fit changes; they read back as the photos' float types
    promoted (an 8-bit photo's float32), as :func:`torch.stack` gave them.

    Photos of one size are read into one stack (uint8 while every photo is 8-bit; at the first
    that is not, the stack turns float, the earlier photos converted exactly). Photos of
    different sizes are kept at their own sizes (a list, :class:`FitViews`), their cameras
    widened to the canvas and their masks implied: the padding a stack needs to hold a portrait
    and a landscape photo (and one byte a pixel of mask) is never held, while every window and
    mask reads as the padded stack's."""
    cameras = list(cameras)
    if not cameras:
        raise ValueError("fitting needs at least one view")
    sizes = [(int(c.image_size[0]), int(c.image_size[1])) for c in cameras]
    H = max(h for h, _ in sizes)
    W = max(w for _, w in sizes)
    padded = len(set(sizes)) > 1
    out = torch.zeros((0 if padded else len(cameras), 3, H, W), dtype=torch.uint8)
    photos: list[torch.Tensor] = []
    for k, (h, w) in enumerate(sizes):
        im = load(k)
        if im.ndim != 3 or im.shape[0] != 3:
            raise ValueError(f"image {k} must be (3, H, W), got {tuple(im.shape)}")
        if tuple(im.shape[-2:]) != (h, w):
            raise ValueError(f"image {k} is {tuple(im.shape[-2:])} but its camera {(h, w)}")
        if im.dtype != torch.uint8 and not im.is_floating_point():
            raise ValueError(f"image {k} must be float in [0, 1] or uint8, got {im.dtype}")
        if padded:  # stored at its own size: 8-bit as uint8 whatever came before, others as read
            eight = eight_bit_pixels(im)
            photos.append(eight if eight is not None else im)
            del im, eight
            continue
        eight = eight_bit_pixels(im) if out.dtype == torch.uint8 else None
        if eight is not None:
            out[k] = eight
        else:
            pixels = float_pixels(im)  # a uint8 photo read after the stack turned float: k/255, not k
            # the stack's type is the photos' types promoted (8-bit ones float32), as torch.stack gave
            # it: a float32 photo after a float16 one is not rounded, and a float64 stack holds the
            # 8-bit photos' float32 values widened (float64(k) / 255 would differ in the last bits)
            stored = torch.float32 if out.dtype == torch.uint8 else out.dtype
            stored = pixels.dtype if k == 0 else torch.promote_types(stored, pixels.dtype)
            if out.dtype != stored:  # exact: k/255 as float32, then a float type at least as wide
                out = float_pixels(out).to(stored)
            out[k] = pixels
        del im, eight
    if padded:
        return FitViews(photos, [c.cropped(0, 0, H, W) for c in cameras])
    return FitViews(out, cameras)


def as_fit_views(views: FitViews | tuple | Sequence) -> FitViews:
    """Accept FitViews or a tuple (images, cameras[, masks])."""
    if isinstance(views, FitViews):
        return views
    return FitViews(*views)


def downsized_fit_views(views: FitViews, max_side: int) -> FitViews:
    """``views`` shrunk so that the long side is at most ``max_side`` pixels (``views``
    itself when it already is): images area-averaged (as the datasets resize photos),
    cameras scaled to the same canvas (:meth:`Camera.scaled`), a pixel of the masks valid
    only where every pixel it covers was (so padding never leaks into the loss). One view at a
    time, so that an 8-bit stack is never converted to floats whole; the result is float32."""
    max_side = coarse_side_value(max_side)
    H, W = views.canvas
    if max(H, W) <= max_side:
        return views
    size = fit_long_side((H, W), max_side)
    count = len(views.cameras)
    dtype = views.float_dtype
    images = torch.empty((count, 3, *size), dtype=dtype)
    masked = views.masks is not None or views.own_sizes  # a list's masks are implied, not stored
    masks = torch.empty((count, 1, *size), dtype=torch.float32) if masked else None
    for k in range(count):
        images[k] = torch.nn.functional.interpolate(views.image(k)[None], size=size, mode="area")[0]
        mask = views.mask(k)
        if masks is not None and mask is not None:
            # the least mask value over the pixels each area-averaged pixel covers (max pooling
            # over the same windows): an average's threshold would let one invalid pixel through
            # once a coarse pixel covers more than a thousand
            least = -torch.nn.functional.adaptive_max_pool2d(-mask[None], size)[0]
            masks[k] = (least > 0.999).to(torch.float32)
    return FitViews(images, [c.scaled(size) for c in views.cameras], masks)


def coarse_side_value(value: Any, name: str = "coarse_side") -> int:
    """A coarse-phase long side as an int >= 16 (the refiner's coarsest level needs a few
    pixels); ValueError naming ``name`` otherwise (fractional, bool, text)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 16:
        raise ValueError(f"{name} must be an integer >= 16 pixels, got {value!r}")
    return value


def random_crop(
    views: FitViews, rng: np.random.Generator, crop: int | None
) -> tuple[int, torch.Tensor, torch.Tensor | None, Camera]:
    """One random view's random ``crop`` x ``crop`` window (the whole image when ``crop`` is
    None or not smaller): the view's index (photo_exposure's correction is per photo), image
    (1, 3, h, w), mask (1, 1, h, w) or None, its camera."""
    k = int(rng.integers(len(views.cameras)))
    camera = views.cameras[k]
    h, w = views.canvas
    ch, cw = (h, w) if crop is None else (min(crop, h), min(crop, w))
    top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    image, mask = views.image(k, top, left, ch, cw), views.mask(k, top, left, ch, cw)
    if (ch, cw) != (h, w):
        camera = camera.cropped(top, left, ch, cw)
    return k, image[None], (None if mask is None else mask[None]), camera


def npbg_optimizers(
    descriptor_params: Iterable[torch.nn.Parameter], refiner_params: Iterable[torch.nn.Parameter],
    lr_descriptors: float, lr_refiner: float,
) -> tuple[torch.optim.RMSprop, torch.optim.Adam]:
    """The optimisers of the NPBG recipes: RMSprop on the per-point descriptors (or
    coefficients) and background, Adam on the refiner's trainable parameters."""
    rms = torch.optim.RMSprop(list(descriptor_params), lr=lr_descriptors)
    adam = torch.optim.Adam([p for p in refiner_params if p.requires_grad], lr=lr_refiner)
    return rms, adam


def npbg_step_loss(
    model: NPBG, points: torch.Tensor, camera: Camera, target: torch.Tensor, mask: torch.Tensor | None,
    loss_fn: LossFn, correction: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One training step's loss of the NPBG recipes: ``model``'s raw (unclamped) RGB from
    ``camera`` against ``target`` (1, 3, h, w) with ``mask`` (1, 1, h, w) or None.
    ``correction`` (gain, offset), 3 values each: the target photo's exposure applied to the
    render before the loss (``photo_exposure``), never to a render anyone sees."""
    pred = model.render_raw(points, camera)[:3].unsqueeze(0)
    if correction is not None:
        gain, offset = correction
        pred = pred * gain.view(1, 3, 1, 1) + offset.view(1, 3, 1, 1)  # gain x render + offset
    return loss_fn(pred, target, mask)


class PhotoExposure(torch.nn.Module):
    """A per-photo colour correction of the fit (``photo_exposure``): for each of ``count``
    input photos a gain and an offset per channel, identity at the start. Its mean gain is held
    at 1 and mean offset at 0 over the photos (the stored values are centred when read): a shift
    shared by every photo is the scene's colour, which the correction must not take from it;
    it only explains how the photos differ from one another. An L2 pull to identity would need a
    weight, and short of a large one it still lets part of a shared shift into every correction."""

    def __init__(self, count: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.zeros(count, 3, device=device))  # centred: gain - 1
        self.offset = torch.nn.Parameter(torch.zeros(count, 3, device=device))

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gains, offsets), (count, 3) each, of ``gain x render + offset``: mean gain 1 and mean
        offset 0 over the photos. Learned as a gain about mid-grey (the stored offset is the shift
        at 0.5): about 0, a gain and an offset both move a photo's mean, and Adam, stepping each
        alike, matched the mean and left the contrast off (tests/test_fit_exposure.py's scene,
        300 steps at rate 2e-3: largest gain error 0.10 about 0, 0.06 about mid-grey)."""
        gain = 1.0 + self.gain - self.gain.mean(0)
        shift = self.offset - self.offset.mean(0)
        return gain, shift + 0.5 * (1.0 - gain)

    def of(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Photo ``k``'s (gain, offset), 3 values each."""
        gains, offsets = self.values()
        return gains[k], offsets[k]

    def summary(self) -> dict[str, Any]:
        """What a fit's metadata records: that the term was used, and its fitted values' range per
        channel (R, G, B; offsets in 0-1 colour units)."""
        with torch.no_grad():
            gains, offsets = (v.detach().cpu() for v in self.values())

        def rounded(t: torch.Tensor) -> list[float]:
            return [round(float(x), 4) for x in t]

        return {"photo_exposure": True, "photos": int(gains.shape[0]),
                "gain_min": rounded(gains.min(0).values), "gain_max": rounded(gains.max(0).values),
                "offset_min": rounded(offsets.min(0).values), "offset_max": rounded(offsets.max(0).values)}


LOSS_WEIGHTS = ("gradient_weight", "laplacian_weight", "perceptual_weight", "fft_weight")


def check_loss_weights(**weights: float) -> None:
    """Raise ValueError naming a sharpening-loss weight (:data:`LOSS_WEIGHTS`) that is not
    a finite number >= 0."""
    for name, value in weights.items():
        if name not in LOSS_WEIGHTS:
            raise ValueError(f"unknown loss weight {name!r}; choose from {LOSS_WEIGHTS}")
        try:
            ok = math.isfinite(float(value)) and float(value) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def coefficients_ft_loss(
    factors: Sequence[int] = (1, 2, 4), gradient_weight: float = 0.0, laplacian_weight: float = 0.0,
    perceptual_weight: float = 0.0, perceptual: EncoderFeatureLoss | None = None, fft_weight: float = 0.0,
) -> LossFn:
    """coefficients_ft's loss: masked L1 at full resolution and at 1/f for each factor f,
    plus the sharpening terms whose weight is > 0: ``gradient_weight`` x
    :func:`npbgpp_core.losses.gradient_loss` (edges), ``laplacian_weight`` x
    :func:`npbgpp_core.losses.laplacian_pyramid_loss` (band-pass detail) and
    ``perceptual_weight`` x ``perceptual`` (an :class:`EncoderFeatureLoss`, needed then),
    ``fft_weight`` x :func:`npbgpp_core.losses.fft_amplitude_loss` (missing frequencies)."""
    factors = tuple(int(f) for f in factors)
    check_loss_weights(gradient_weight=gradient_weight, laplacian_weight=laplacian_weight,
                       perceptual_weight=perceptual_weight, fft_weight=fft_weight)
    if perceptual_weight > 0 and perceptual is None:
        raise ValueError("perceptual_weight > 0 needs the perceptual loss network (an EncoderFeatureLoss)")
    terms: list[tuple[float, LossFn]] = [
        (w, fn) for w, fn in ((gradient_weight, gradient_loss), (laplacian_weight, laplacian_pyramid_loss),
                              (perceptual_weight, perceptual), (fft_weight, fft_amplitude_loss)) if w > 0
    ]
    if not terms:
        return lambda p, t, m: multiscale_l1(p, t, m, factors)
    return lambda p, t, m: multiscale_l1(p, t, m, factors) + sum(w * fn(p, t, m) for w, fn in terms)


def warmup_steps_value(value: Any, name: str = "warmup_steps") -> int:
    """A learning-rate warm-up length in steps (0, or None: no warm-up) as an int, from a
    recipe, a training config, a checkpoint's metadata or a command line (its text): the one
    check of this setting, shared by :class:`FitRecipe`, the headless trainer
    (``system.warmup_steps``) and its stage (``--warmup-steps``). ValueError naming
    ``name`` for anything but a whole number >= 0 (negative, fractional, text, bool)."""
    if value is None:
        return 0
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        shown = value if isinstance(value, str) and value.strip() else repr(value)  # as typed
        raise ValueError(f"{name} must be an integer >= 0, got {shown}")
    return number


REFINER_PARTS = ("all", "decoder", "head", "none")
SCHEDULES = ("constant", "cosine")
DESCRIPTOR_OPTIMIZERS = ("rmsprop", "adam")


@dataclass(frozen=True)
class FitRecipe:
    """The knobs of a fitting loop beyond its loss (see :func:`fit_coefficients`).

    ``lr_background`` None: the descriptors' rate. ``train_refiner``: which refiner
    parameters train ("decoder" = the up-sampling blocks and the 1x1 head, "head" = the
    head only: a per-scene colour affine). ``crops_per_step`` crops (of different random
    views) are summed into one step. The rate of every optimiser is scaled by
    :func:`lr_factor`. ``descriptor_decay`` pulls the descriptors back toward their start
    after each optimiser step (decoupled, like AdamW's weight decay, but toward the start
    instead of zero): ``d -= lr_t * descriptor_decay * (d - d_start)``. ``average_from``
    < 1: the returned model holds the mean of the trained parameters after every step from
    ``int(average_from * steps)`` on (iterate averaging: the last iterate of a short
    noisy fit leans toward the last few crops' views). ``coarse_fraction``: the share of
    the steps (the first ones) whose crops come from the views shrunk to a long side of
    ``coarse_side`` pixels (:func:`downsized_fit_views`; coarse-to-fine)."""

    lr_descriptors: float
    lr_refiner: float
    lr_background: float | None = None
    train_refiner: str = "all"
    crops_per_step: int = 1
    warmup_steps: int = 0
    schedule: str = "constant"
    descriptor_decay: float = 0.0
    descriptor_optimizer: str = "rmsprop"
    average_from: float = 1.0
    coarse_fraction: float = 0.0
    coarse_side: int = FIT_COARSE_SIDE
    photo_exposure: bool = False
    lr_exposure: float = PHOTO_EXPOSURE_LR

    def __post_init__(self) -> None:
        if not isinstance(self.photo_exposure, bool):
            raise ValueError(f"photo_exposure must be True or False, got {self.photo_exposure!r}")
        if self.train_refiner not in REFINER_PARTS:
            raise ValueError(f"train_refiner must be one of {REFINER_PARTS}, got {self.train_refiner!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.descriptor_optimizer not in DESCRIPTOR_OPTIMIZERS:
            raise ValueError(f"descriptor_optimizer must be one of {DESCRIPTOR_OPTIMIZERS}, "
                             f"got {self.descriptor_optimizer!r}")
        if self.crops_per_step < 1:
            raise ValueError(f"crops_per_step must be >= 1, got {self.crops_per_step}")
        object.__setattr__(self, "warmup_steps", warmup_steps_value(self.warmup_steps))
        if not 0.0 <= self.average_from <= 1.0:
            raise ValueError(f"average_from must be in [0, 1], got {self.average_from}")
        if not 0.0 <= self.coarse_fraction <= 1.0:
            raise ValueError(f"coarse_fraction must be in [0, 1], got {self.coarse_fraction}")
        coarse_side_value(self.coarse_side)
        if self.descriptor_decay < 0:
            raise ValueError(f"descriptor_decay must be >= 0, got {self.descriptor_decay}")
        for name in ("lr_descriptors", "lr_refiner", "lr_background", "lr_exposure"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


def lr_factor(step: int, steps: int, warmup_steps: int = 0, schedule: str = "constant") -> float:
    """The multiplier of every learning rate at ``step`` (0-based) of ``steps``: a linear
    ramp (step + 1) / (warmup_steps + 1) over the first ``warmup_steps`` steps, then 1
    ("constant") or a cosine from 1 down to 0 at the end of the run ("cosine") over the
    remaining steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def refiner_parameters(refiner: torch.nn.Module, part: str) -> list[torch.nn.Parameter]:
    """The parameters of ``refiner`` that ``part`` (:data:`REFINER_PARTS`) trains."""
    if part not in REFINER_PARTS:
        raise ValueError(f"train_refiner must be one of {REFINER_PARTS}, got {part!r}")
    if part == "none":
        return []
    if part == "all":
        return [p for p in refiner.parameters() if p.requires_grad]
    modules = [refiner.head] if part == "head" else [refiner.up, refiner.head]
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _fit_loop(
    model: NPBG, points: torch.Tensor, views: FitViews, steps: int, crop: int | None, loss_fn: LossFn,
    recipe: FitRecipe, seed: int, device: torch.device,
) -> FitResult:
    return run_fit(_fit_steps(model, points, views, steps, crop, loss_fn, recipe, seed, device))


def run_fit(fit: Generator[int, None, FitResult]) -> FitResult:
    """Run a step-by-step fit (:func:`iter_fit_coefficients`) to the end; its result."""
    while True:
        try:
            next(fit)
        except StopIteration as end:
            return end.value


def check_tolerance_db(value: object, name: str = "check_tolerance") -> float:
    """``value`` as a checked fit's tolerance in dB (:data:`CHECK_TOLERANCE_DB`); raises
    ValueError naming it ``name`` for anything but a finite number >= 0 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of dB, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of dB >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CheckOptionNames:
    """How the messages of :func:`checked_fit_options` name a checked fit's options:
    fit_coefficients' keywords by default; a command line passes its flags, so that its user
    reads what to change (``check_view_on``: what turns the check on)."""

    check_view_on: str = "check_view=True"
    fair_check: str = "fair_check"
    check_tolerance: str = "check_tolerance"
    check_recipes: str = "check_recipes"
    check_combine: str = "check_combine"


KEYWORD_NAMES = CheckOptionNames()


def checked_fit_options(check_view: object, fair_check: object, check_tolerance: object, check_recipes: object,
                        names: CheckOptionNames = KEYWORD_NAMES,
                        check_combine: object = FIT_CHECK_COMBINE,
                        tolerance_given: bool | None = None) -> tuple[float, tuple[str, ...]]:
    """The rules of a checked fit's options (fit_coefficients' ``check_view``, ``fair_check``,
    ``check_tolerance``, ``check_recipes``, ``check_combine``), in one place for the library and its
    command lines: raises ValueError naming a bad value or a missing ``check_view`` (for
    ``fair_check``, ``check_recipes`` and a tolerance the caller gave) as ``names`` spell them;
    returns the tolerance in dB and the recipe names (``check_combine``, once accepted, is one of
    :data:`CHECK_COMBINES` as given). ``tolerance_given``: whether the caller's user set the
    tolerance (a command line can tell a flag from none); None: a tolerance other than
    :data:`CHECK_TOLERANCE_DB`, which is what a caller that sets none passes."""
    for name, flag in (("check_view", check_view), ("fair_check", fair_check)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if fair_check and not check_view:
        raise ValueError(f"{names.fair_check} is a way of checking the fit on a view kept apart: it needs "
                         f"{names.check_view_on}")
    tolerance = check_tolerance_db(check_tolerance, names.check_tolerance)
    if tolerance_given is None:
        # the default is what every caller passes when it sets none (fit_coefficients', BundleFit's None,
        # the bench's), so only another value is known to be chosen by the user
        tolerance_given = tolerance != CHECK_TOLERANCE_DB
    if tolerance_given and not check_view:  # a tolerance the fit would ignore
        raise ValueError(f"{names.check_tolerance} {check_tolerance!r} is how many dB the fit may lose on the view "
                         f"a check keeps apart; without the check no view is kept apart: it needs "
                         f"{names.check_view_on}")
    recipes = check_recipe_names(check_recipes, names.check_recipes)
    if recipes and not check_view:
        raise ValueError(f"{names.check_recipes} chooses a recipe on a view kept apart: it needs "
                         f"{names.check_view_on}")
    if not isinstance(check_combine, str) or check_combine not in CHECK_COMBINES:
        raise ValueError(f"{names.check_combine} must be one of {CHECK_COMBINES}, got {check_combine!r}")
    if check_combine == "average" and len(recipes) < 2:
        # nothing to average: one recipe's fit is the plain check's
        raise ValueError(f"{names.check_combine} average takes the mean of the fits of the recipes "
                         f"{names.check_recipes} names: it needs {names.check_recipes} with 2 or more of "
                         f"{CHECK_RECIPES} (and {names.check_view_on}), got "
                         f"{list(recipes) if recipes else 'none'}")
    return tolerance, recipes


def beats_best(score: float, best: float | None) -> bool:
    """Whether a choosing check's candidate scoring ``score`` on the kept photo takes the place
    of the best so far (``best``; None before the first): a higher score, or any score over a
    NaN. A NaN never wins and a tie keeps the earlier candidate. The one rule of choosing, for
    :func:`_checked_steps` and :attr:`FitCheck.choosing_keeps`."""
    return best is None or score > best or (math.isnan(best) and not math.isnan(score))


def check_keeps_fit(fitted: float, unfitted: float, tolerance: float) -> bool:
    """Whether a checked fit scoring ``fitted`` on the kept photo is kept against the unfitted
    scene's ``unfitted``: a loss of up to ``tolerance`` dB keeps it (the kept photo built the
    unfitted scene, which starts ahead there); a fitted render that is not finite (NaN) loses;
    an unfitted one that could not be scored (NaN: no valid pixel) cannot judge, so the fit is
    kept."""
    if math.isnan(fitted):
        return math.isnan(unfitted)
    return not fitted < unfitted - tolerance


def check_view_index(count: int) -> int | None:
    """The input view a checked fit keeps apart among ``count`` views: the middle one of the
    order they are given in (index ``count // 2``: a capture's photos are usually in shooting
    order, so its neighbours stay in the fit, as a held-out view between input views is);
    None below :data:`CHECK_VIEW_MIN_VIEWS` views."""
    return count // 2 if count >= CHECK_VIEW_MIN_VIEWS else None


def view_extent(views: FitViews, k: int) -> tuple[int, int]:
    """Height and width of view ``k``'s own photo: the canvas less the padding
    :func:`padded_fit_views` added at the bottom and right (the last row and column its
    mask marks valid); (0, 0) when the mask marks none."""
    H, W = views.canvas
    if views.own_sizes:  # a photo of its own size: its mask marks exactly its pixels
        photo = views.images[views.row(k)]
        return int(photo.shape[-2]), int(photo.shape[-1])
    mask = views.mask(k)
    if mask is None:
        return H, W
    valid = mask[0] > 0
    rows, cols = torch.nonzero(valid.any(dim=1)), torch.nonzero(valid.any(dim=0))
    if rows.numel() == 0:
        return 0, 0
    return int(rows.max()) + 1, int(cols.max()) + 1


def view_psnr(model: NPBG, points: torch.Tensor, views: FitViews, k: int) -> float:
    """PSNR in dB of ``model``'s inference render of view ``k`` against its photo, over the
    view's valid pixels (its mask; padding never counts); +inf for an exact match, NaN when
    the view has no valid pixel or the render's error there is not finite (a NaN or infinite
    pixel, or a squared error overflowing): no score (a checked fit drops a fit scoring NaN as
    broken, :attr:`FitCheck.render_not_finite`). The view is rendered at its photo's own size
    (the padded canvas would give the network other borders than the photo's camera gets from
    a saved bundle), in windows when it has more than :data:`CHECK_VIEW_MAX_PIXELS` pixels, as the
    add-on's Tile Size renders large frames (a 12-megapixel photo rendered whole needs
    several GB)."""
    from .scene import render_model_windowed

    h, w = view_extent(views, k)
    if h == 0:
        return math.nan
    camera = views.cameras[k].cropped(0, 0, h, w).to(model.device)
    was_training = model.training
    model.eval()
    try:
        if h * w > CHECK_VIEW_MAX_PIXELS:
            pred = render_model_windowed(model, points, camera, CHECK_VIEW_MAX_PIXELS)
        else:
            with torch.no_grad():
                pred = model.render(points, camera).float().cpu()
    finally:
        model.train(was_training)
    err = (pred - views.image(k, 0, 0, h, w).float()) ** 2
    mask = views.mask(k, 0, 0, h, w)
    if mask is None:
        mse = float(err.mean())
    else:
        # where, not a product: an invalid pixel's NaN or inf times 0 would be NaN
        mse = float(torch.where(mask > 0, err * mask, 0.0).sum()) / (3.0 * float(mask.sum()))
    if not math.isfinite(mse):  # NaN, or inf (math.log10(1 / inf) raised a math domain error)
        return math.nan
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def views_without(views: FitViews, k: int) -> FitViews:
    """``views`` less view ``k``, sharing the stored stack (``rows``): a copy of all but one
    photo would hold them twice for the whole of a checked fit."""
    keep = [i for i in range(len(views.cameras)) if i != k]
    return FitViews(views.images, [views.cameras[i] for i in keep], views.masks, [views.row(i) for i in keep])


# One recipe a checked fit runs: its name ("" for a plain check, else one of CHECK_RECIPES),
# steps, crop and FitRecipe.
Candidate = tuple[str, int, int | None, FitRecipe]


def candidate_recipes(names: Sequence[str], steps: int, crop: int | None,
                      recipe: FitRecipe, whole_max_side: int | None = None) -> list[Candidate]:
    """The recipes a choosing check fits (:data:`CHECK_RECIPES`): "crops" the call's own
    ``steps``, ``crop`` and ``recipe``; "whole" :data:`WHOLE_VIEW_STEPS` steps of one whole
    view (``crop=None``, ``crops_per_step=1``), the rest of ``recipe`` as it is, but with
    ``whole_max_side`` every one of its steps on the photos shrunk to that long side
    (``coarse_fraction=1``, ``coarse_side=whole_max_side``; photos no larger are left alone). No
    names: the call's own recipe alone (a plain check)."""
    if not names:
        return [("", steps, crop, recipe)]
    whole = dataclasses.replace(recipe, crops_per_step=1)
    if whole_max_side is not None:
        whole = dataclasses.replace(whole, coarse_fraction=1.0, coarse_side=whole_max_side)
    out: list[Candidate] = []
    for name in names:
        if name == "crops":
            out.append((name, steps, crop, recipe))
        else:
            out.append((name, WHOLE_VIEW_STEPS, None, whole))
    return out


def whole_max_side_value(value: Any, name: str = "whole_max_side") -> int | None:
    """``value`` as the whole-view recipe's long-side cap (:data:`WHOLE_VIEW_MAX_SIDE`): None (no
    cap) or, as :func:`coarse_side_value`, an int >= 16; ValueError naming ``name`` otherwise."""
    return None if value is None else coarse_side_value(value, name)


def check_recipe_names(names: object, name: str = "check_recipes") -> tuple[str, ...]:
    """``names`` as a choosing check's recipes (:data:`CHECK_RECIPES`); raises ValueError naming
    them ``name`` for anything but a sequence of distinct known names (a string is not one)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ValueError(f"{name} must be a list of names from {CHECK_RECIPES}, got {names!r}")
    unknown = [n for n in names if n not in CHECK_RECIPES]
    if unknown:
        raise ValueError(f"{name}: unknown recipe(s) {unknown}; choose from {CHECK_RECIPES}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name} names a recipe twice: {list(names)}")
    return tuple(names)


def split_check_recipes(text: str) -> tuple[str, ...]:
    """The comma-separated names of a ``--check-recipes`` flag (``headless_train fit``,
    ``bench_quality``), spaces around each dropped, not yet checked: an empty name stays, so
    :func:`check_recipe_names` refuses it as unknown rather than one flag reading "" as no choice.
    ``none`` alone is no recipes (the plain check): the flag's way to opt out of the users' default."""
    if text.strip().lower() == "none":
        return ()
    return tuple(name.strip() for name in text.split(","))


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of model states with the same keys and shapes (a "soup" of fits that
    started from one scene: they usually sit in one basin, so their mean renders as a fit too), as
    new CPU tensors. Floating tensors are averaged in float64 and stored back in their own dtype; any
    other tensor (a count, a mask) must be equal in every state and is kept as is. ValueError naming
    the key for states that differ in keys, shapes or such a tensor, or for no state at all."""
    _check_same_states(states)
    mean = {key: torch.empty(value.shape, dtype=value.dtype) for key, value in states[0].items()}
    _average_into(mean, states)
    return mean


def _check_same_states(states: Sequence[dict[str, torch.Tensor]]) -> None:
    """:func:`average_states`' refusals, all before anything is written."""
    if isinstance(states, dict) or len(states) == 0:
        raise ValueError("average_states needs a list of at least one state dict")
    first = states[0]
    for i, state in enumerate(states[1:], start=1):
        if set(state) != set(first):
            odd = sorted(set(state) ^ set(first))[:5]
            raise ValueError(f"state {i} has other keys than state 0 (e.g. {odd})")
        for key, value in state.items():
            if value.shape != first[key].shape:
                raise ValueError(f"state {i}: {key} is {tuple(value.shape)}, state 0 has {tuple(first[key].shape)}")
            if value.is_floating_point() != first[key].is_floating_point():
                raise ValueError(f"state {i}: {key} is {value.dtype}, state 0 has {first[key].dtype}")
            if not value.is_floating_point() and not torch.equal(value.cpu(), first[key].cpu()):
                raise ValueError(f"state {i}: {key} ({value.dtype}) differs from state 0's and cannot be averaged")


@torch.no_grad()
def _average_into(out: dict[str, torch.Tensor], states: Sequence[dict[str, torch.Tensor]]) -> None:
    """Write the mean of ``states`` (checked by :func:`_check_same_states`) into ``out``'s tensors
    (same keys and shapes, any device; one of ``states`` may be ``out`` itself: each chunk is read
    from every state before it is written), :data:`AVERAGE_CHUNK` elements at a time, so that
    averaging holds no whole float64 copy of a state (the sum in float64, in the states' order,
    divided once and rounded once to ``out``'s dtype)."""
    for key, target in out.items():
        first = states[0][key]
        if not first.is_floating_point():
            target.copy_(first)
            continue
        sources = [state[key].detach().reshape(-1) for state in states]
        whole = target if target.is_contiguous() else torch.empty(target.shape, dtype=target.dtype,
                                                                   device=target.device)
        flat = whole.view(-1)
        for begin in range(0, flat.numel(), AVERAGE_CHUNK):
            end = min(begin + AVERAGE_CHUNK, flat.numel())
            total = sources[0][begin:end].to("cpu", torch.float64, copy=True)
            for source in sources[1:]:
                total += source[begin:end].to("cpu", torch.float64)
            flat[begin:end].copy_(total / len(states))
        if whole is not target:
            target.copy_(whole)


def _cpu_state(model: NPBG) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state in CPU memory, for a checked fit to load back later: on a
    GPU a copy there would hold one more set of coefficients for the whole fit (~0.7 GB at
    3M points); load_state_dict copies it back onto the model's device."""
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def _checked_steps(
    model: NPBG, points: torch.Tensor, views: FitViews, candidates: list[Candidate], loss_fn: LossFn,
    seed: int, device: torch.device, tolerance: float, keep_candidates: bool = False,
    combine: str = FIT_CHECK_COMBINE,
) -> Generator[int, None, FitResult]:
    """:func:`_fit_steps` with one view kept apart (:func:`check_view_index`): its PSNR is
    scored before step 1 and after each candidate recipe's fit (each from the unfitted state,
    same seed); the best-scoring candidate is kept (the first on a tie), and if it scores more than
    ``tolerance`` dB below the unfitted model the result's model is put back to the unfitted
    state. Yields units of work: each candidate's steps, plus one for the first scoring render and
    one for the last candidate's (``steps + 2`` for a single recipe; the other candidates'
    renders are not counted). Below :data:`CHECK_VIEW_MIN_VIEWS` views it is :func:`_fit_steps`
    of the first candidate on every view, its result's check saying it was skipped (and, with two or
    more candidates, that the first ran alone, no average or choice as ``combine`` asked).
    ``keep_candidates``: the result holds each candidate's fitted state (CPU) and the unfitted one.
    ``combine`` "average": instead of the best candidate, the model takes the mean of every
    candidate's fitted state (:func:`average_states`), scored on the kept view (one more render, not
    counted) and checked as above; the result's ``losses`` are the first candidate's."""
    k = check_view_index(len(views.cameras))
    if k is None:
        name, steps, crop, recipe = candidates[0]
        result = yield from _fit_steps(model, points, views, steps, crop, loss_fn, recipe, seed, device)
        # a choosing check's first recipe ran: named, since it need not be the call's own
        skipped = f"{len(views.cameras)} input views, fewer than the {CHECK_VIEW_MIN_VIEWS} a check needs"
        if len(candidates) > 1:  # what was asked and not done, so that the metadata and the line keep it
            asked = "average of" if combine == "average" else "choice between"
            skipped += f", so the first recipe ran alone (no {asked} {' and '.join(c[0] for c in candidates)})"
        result.check = FitCheck(None, skipped=skipped, chosen=name, combine=combine if name else "")
        return result
    start = time.perf_counter()
    unfitted = _cpu_state(model)
    before = view_psnr(model, points, views, k)
    scoring = time.perf_counter() - start
    yield 1
    rest = views_without(views, k)
    done_units = 1
    fitting = 0.0
    scored: list[FitCandidate] = []
    best: tuple[int, FitResult] | None = None  # index into scored, that candidate's result
    best_state: dict[str, torch.Tensor] | None = None
    states: dict[str, dict[str, torch.Tensor]] = {}
    averaging = combine == "average"
    first: FitResult | None = None  # an average's losses: the first candidate's (a choice keeps the best's)
    for i, (name, steps, crop, recipe) in enumerate(candidates):
        if i > 0:
            model.load_state_dict(unfitted)  # every candidate starts from the unfitted scene
        fit = _fit_steps(model, points, rest, steps, crop, loss_fn, recipe, seed, device)
        try:
            while True:
                try:
                    done = next(fit)
                except StopIteration as end:
                    result: FitResult = end.value
                    break
                yield done_units + done
        finally:
            fit.close()  # a caller that stops early: restores the refiner's frozen flags
        done_units += steps
        fitting += result.seconds
        start = time.perf_counter()
        after = view_psnr(model, points, views, k)
        scoring += time.perf_counter() - start
        scored.append(FitCandidate(name, after, result.steps, result.seconds))
        if keep_candidates or (averaging and i < len(candidates) - 1):
            states[name] = _cpu_state(model)  # the last candidate an average takes from the model itself
        if averaging:
            if i == 0:
                first = result
            continue
        if beats_best(after, None if best is None else scored[best[0]].psnr_fitted):
            best = (i, result)
            if i < len(candidates) - 1:  # a later candidate refits the model: keep this state
                best_state = states.get(name) or _cpu_state(model)
            else:
                best_state = None  # the model holds it
    if averaging:
        assert first is not None
        result = first
        # the mean written into the model, which holds the last candidate's fit (each chunk read
        # before it is written): no copy of a state beyond the unfitted and earlier candidates' ones
        own = model.state_dict()
        fitted = [states[name] for name, *_ in candidates[:-1]] + [own]
        _check_same_states(fitted)
        _average_into(own, fitted)
        del fitted, own
        if not keep_candidates:
            states = {}  # the copies the mean was made of, freed before the scoring render
        start = time.perf_counter()
        after = view_psnr(model, points, views, k)
        scoring += time.perf_counter() - start
    else:
        assert best is not None
        chosen, result = best
        if best_state is not None:
            model.load_state_dict(best_state)
        after = scored[chosen].psnr_fitted
    kept = "fitted" if check_keeps_fit(after, before, tolerance) else "unfitted"
    if kept == "unfitted":
        model.load_state_dict(unfitted)
    result.model = model
    result.seconds = fitting + scoring
    result.check = FitCheck(k, before, after, kept, tolerance=tolerance)
    if candidates[0][0]:  # a choosing check: say what each recipe scored and which was chosen
        result.check.chosen = "" if averaging else scored[chosen].recipe
        result.check.candidates = scored
        result.check.combine = combine
    result.candidate_states = states  # without keep_candidates: empty
    if keep_candidates:
        result.unfitted_state = unfitted
    yield done_units + 1
    return result


def _fit_steps(
    model: NPBG, points: torch.Tensor, views: FitViews, steps: int, crop: int | None, loss_fn: LossFn,
    recipe: FitRecipe, seed: int, device: torch.device,
) -> Generator[int, None, FitResult]:
    """The fitting loop, yielding the number of steps done after each step (so that a
    caller can report progress or stop between steps: closing the generator restores the
    refiner's frozen flags); returns the :class:`FitResult`."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    rng = np.random.default_rng(seed)
    extra = [p for p in (model.background, model.environment) if p is not None]
    lr_bg = recipe.lr_descriptors if recipe.lr_background is None else recipe.lr_background
    groups = [{"params": [model.descriptors], "lr": recipe.lr_descriptors}, {"params": extra, "lr": lr_bg}]
    if recipe.descriptor_optimizer == "adam":
        desc_opt: torch.optim.Optimizer = torch.optim.Adam(groups)
    else:
        desc_opt = torch.optim.RMSprop(groups)
    trained = refiner_parameters(model.refiner, recipe.train_refiner)
    frozen = [p for p in model.refiner.parameters() if p.requires_grad and all(p is not q for q in trained)]
    for p in frozen:
        p.requires_grad_(False)
    ref_opt = torch.optim.Adam(trained, lr=recipe.lr_refiner) if trained else None
    optims = [desc_opt] + ([ref_opt] if ref_opt is not None else [])
    exposure = PhotoExposure(len(views.cameras), device) if recipe.photo_exposure else None
    if exposure is not None:  # its own Adam (see PHOTO_EXPOSURE_LR), on the same schedule
        optims.append(torch.optim.Adam(exposure.parameters(), lr=recipe.lr_exposure))
    base = [[g["lr"] for g in o.param_groups] for o in optims]
    start_desc = model.descriptors.detach().clone() if recipe.descriptor_decay > 0 else None
    averaged = [model.descriptors, *extra, *trained]
    mean: list[torch.Tensor] | None = None
    first_averaged = int(recipe.average_from * steps) if recipe.average_from < 1.0 else steps
    coarse_steps = round(recipe.coarse_fraction * steps)
    coarse_views = downsized_fit_views(views, recipe.coarse_side) if coarse_steps else views
    result = FitResult(model, exposure=exposure)
    model.train()
    busy = 0.0
    start = time.perf_counter()
    try:
        for step in range(steps):
            f = lr_factor(step, steps, recipe.warmup_steps, recipe.schedule)
            for o, lrs in zip(optims, base, strict=True):
                for g, lr in zip(o.param_groups, lrs, strict=True):
                    g["lr"] = lr * f
            for o in optims:
                o.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(recipe.crops_per_step):
                k, image, mask, camera = random_crop(coarse_views if step < coarse_steps else views, rng, crop)
                image = image.to(device)
                mask = None if mask is None else mask.to(device)
                loss = npbg_step_loss(model, points, camera.to(device), image, mask, loss_fn,
                                      None if exposure is None else exposure.of(k))
                if not bool(torch.isfinite(loss)):
                    raise FloatingPointError(f"fitting loss became {float(loss)} at step {result.steps}")
                (loss / recipe.crops_per_step).backward()
                total += float(loss.detach()) / recipe.crops_per_step
            for o in optims:
                o.step()
            if start_desc is not None:
                with torch.no_grad():
                    pull = recipe.lr_descriptors * f * recipe.descriptor_decay
                    model.descriptors.sub_(pull * (model.descriptors - start_desc))
            result.losses.append(total)
            if step >= first_averaged:
                with torch.no_grad():
                    if mean is None:
                        mean = [p.detach().clone() for p in averaged]
                    else:
                        n = step - first_averaged + 1
                        for m, p in zip(mean, averaged, strict=True):
                            m.add_((p.detach() - m) / n)
            busy += time.perf_counter() - start
            yield step + 1
            start = time.perf_counter()  # the caller's time between steps is not the fit's
        if mean is not None:
            with torch.no_grad():
                for m, p in zip(mean, averaged, strict=True):
                    p.copy_(m)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    result.seconds = busy + time.perf_counter() - start
    model.eval()
    return result


class CoefficientsRecipe(NamedTuple):
    """:func:`coefficients_recipe`'s checked keywords, normalised: the fitting loop's
    :class:`FitRecipe`, and the checked fit's tolerance in dB, recipe names, combine (one of
    :data:`CHECK_COMBINES`) and whole-view cap, so that a caller does not check them a second time."""

    recipe: FitRecipe
    check_tolerance: float
    check_recipes: tuple[str, ...]
    check_combine: str = FIT_CHECK_COMBINE
    whole_max_side: int | None = WHOLE_VIEW_MAX_SIDE


def coefficients_recipe(
    lr_coefficients: float = 0.01,
    lr_refiner: float = 3e-4,
    lr_background: float | None = None,
    train_refiner: str = "all",
    crops_per_step: int = 2,
    warmup_steps: int = FIT_WARMUP_STEPS,
    schedule: str = "constant",
    coefficient_decay: float = 0.0,
    coefficient_optimizer: str = "rmsprop",
    gradient_weight: float = 0.0,
    average_from: float = 1.0,
    laplacian_weight: float = 0.0,
    perceptual_weight: float = 3.0,
    fft_weight: float = 0.0,
    background_rows: int | None = BACKGROUND_FIT_ROWS,
    aligned: bool = FIT_ALIGNED,
    coarse_fraction: float = 0.0,
    coarse_side: int = FIT_COARSE_SIDE,
    check_view: bool = False,
    fair_check: bool = False,
    check_tolerance: float = CHECK_TOLERANCE_DB,
    check_recipes: Sequence[str] = (),
    check_combine: str = FIT_CHECK_COMBINE,
    whole_max_side: int | None = WHOLE_VIEW_MAX_SIDE,
    photo_exposure: bool = False,
    lr_exposure: float = PHOTO_EXPOSURE_LR,
) -> CoefficientsRecipe:
    """The :class:`FitRecipe` of :func:`fit_coefficients` for its keywords (same names and
    defaults) with the check's tolerance and recipe names (:class:`CoefficientsRecipe`); raises
    ValueError naming a bad value. The loss weights (:data:`LOSS_WEIGHTS`),
    ``background_rows``, ``aligned``, ``check_view`` and ``fair_check`` are only checked here
    (they belong to the loss, the model and the loop around the fit)."""
    check_loss_weights(gradient_weight=gradient_weight, laplacian_weight=laplacian_weight,
                       perceptual_weight=perceptual_weight, fft_weight=fft_weight)
    if background_rows is not None:
        check_rows(background_rows)
    if not isinstance(aligned, bool):
        raise ValueError(f"aligned must be True or False, got {aligned!r}")
    tolerance, recipes = checked_fit_options(check_view, fair_check, check_tolerance, check_recipes,
                                             check_combine=check_combine)
    cap = whole_max_side_value(whole_max_side)
    recipe = FitRecipe(lr_coefficients, lr_refiner, lr_background, train_refiner, crops_per_step, warmup_steps,
                       schedule, coefficient_decay, coefficient_optimizer, average_from, coarse_fraction, coarse_side,
                       photo_exposure, lr_exposure)
    return CoefficientsRecipe(recipe, tolerance, recipes, str(check_combine), cap)


def fit_coefficients(
    model: NPBGPlusPlus,
    aggregated: AggregatedScene,
    views: FitViews | tuple,
    steps: int = 100,
    crop: int | None = 128,
    lr_coefficients: float = 0.01,
    lr_refiner: float = 3e-4,
    loss_fn: LossFn | None = None,
    loss_factors: Sequence[int] = (1, 2, 4),
    seed: int = 0,
    lr_background: float | None = None,
    train_refiner: str = "all",
    crops_per_step: int = 2,
    warmup_steps: int = FIT_WARMUP_STEPS,
    schedule: str = "constant",
    coefficient_decay: float = 0.0,
    coefficient_optimizer: str = "rmsprop",
    gradient_weight: float = 0.0,
    average_from: float = 1.0,
    laplacian_weight: float = 0.0,
    perceptual_weight: float = 3.0,
    fft_weight: float = 0.0,
    background_rows: int | None = BACKGROUND_FIT_ROWS,
    aligned: bool = FIT_ALIGNED,
    coarse_fraction: float = 0.0,
    coarse_side: int = FIT_COARSE_SIDE,
    check_view: bool = False,
    fair_check: bool = False,
    check_tolerance: float = CHECK_TOLERANCE_DB,
    check_recipes: Sequence[str] = (),
    check_combine: str = FIT_CHECK_COMBINE,
    whole_max_side: int | None = WHOLE_VIEW_MAX_SIDE,
    keep_candidates: bool = False,
    aggregate_max_side: int | None = None,
    photo_exposure: bool = False,
    lr_exposure: float = PHOTO_EXPOSURE_LR,
) -> FitResult:
    """coefficients_ft: fine-tune ``aggregated``'s coefficients and a copy of ``model``'s
    refiner on ``views`` for ``steps`` steps; ``model`` itself is not changed. The result's
    ``.model`` is an :class:`NPBG` rendering with ``render(aggregated.points, camera)``.
    With an environment background (``background='environment'``) the scene's map
    becomes a learnable tensor of that model, optimised with the coefficients.

    ``aligned`` (default :data:`FIT_ALIGNED`, True): the fitted model renders, in training crops
    and final renders alike, as ``model`` does: a view rolled against ``world_up`` on NPBG++'s
    upright canvas (``align_during_rendering``, ``render_canvas``), so a zero-step fit renders
    exactly ``model.render`` and the refiner keeps seeing the world upright, as it was trained.
    False: as the published NPBG, in the view's own frame; a zero-step fit then differs from
    ``model.render`` on rolled views (equal at roll 0; the video_sfm held-out view, rolled
    57.5 degrees: 15.21 vs 15.40 dB). Measured (BENCHMARKS.md "Upright fitted scenes", 4 real
    handheld captures, held-out views rolled 4-58 degrees, 200 steps, seeds 0 and 1): mean
    PSNR +0.19 / +0.22 dB (dense clouds) and +0.42 / +0.48 dB (sparse), SSIM +0.004 to +0.010;
    the view rolled 57.5 degrees +0.1 to +1.6 dB; the least rolled capture (test_colmap, all
    views within 9 degrees) -0.06 to +0.17 dB, within the seed spread. The price: a rolled
    training crop is rendered on its upright bounding box (multiples of 16 pixels: 1.3x a
    128-pixel crop's pixels at 5 degrees, 2.25x at 45), about 20% more fitting time there.

    The defaults are a short-fit recipe, not the published one (``headless_train``'s
    ``system=coefficients_ft`` keeps RMSprop 0.1 / Adam 1e-4 / one crop for its 40k-step
    runs). ``lr_coefficients`` 0.01, not 0.1: the coefficients start from the aggregated
    values, and RMSprop's first steps move every touched value by about 10 x lr, which at
    0.1 undoes much of the aggregation in a short fit (demo scene, 200 steps: 27.8 dB /
    SSIM 0.903 at 0.1, below the unfitted 0.936). ``lr_refiner`` 3e-4 and two crops per
    step (BENCHMARKS.md "Short coefficient fits", 200 steps, held-out views): the refiner
    barely moves at 1e-4, 1e-3 drifts (room-scale captures lose up to 1 dB), and one crop
    per step leaves the result leaning toward the last crops' views. 9 real captures
    17.75 -> 18.24 dB, ``make demo`` (c) 29.30 -> 29.91 dB (objects file), at about twice
    the seconds per fit (demo (c): 19 s -> 38 s on one loaded CPU thread).

    ``warmup_steps`` 20 (:data:`FIT_WARMUP_STEPS`): the rates ramp up as (step + 1) / 21 over
    the first 20 steps, whatever ``steps`` is. Without it a few-step fit was worse than no
    fit: RMSprop's running mean square starts at zero, so its first steps move every
    coefficient and environment-map texel touched by about 10 x lr at once (held-out views,
    BENCHMARKS.md "Few-step fits": test_colmap 16.69 dB unfitted, 12.70 after 2 steps;
    video_sfm 15.40, 13.42 after 1 step; mouse 21.09, 14.52 after 1 step; with the ramp 16.87,
    15.30, 21.05). It does not make every length safe: at 5-20 steps, as the rates reach full
    size, a fit can pass through a worse state (mouse 18.73 after 20 steps), so the add-on asks
    for 50 at least. 200-step fits are unchanged within the seed spread (4 captures 18.56 ->
    18.58 dB, same section).

    The short-fit knobs (:class:`FitRecipe`): ``lr_background`` the rate of the environment
    map and the background vector (None: ``lr_coefficients``); ``train_refiner`` which
    refiner parameters train ("all", "decoder", "head", "none"); ``crops_per_step`` crops
    averaged per step; ``warmup_steps`` and ``schedule`` ("constant" or "cosine", see
    :func:`lr_factor`) scale every rate; ``coefficient_decay`` pulls the coefficients
    back toward the aggregated ones after every step; ``coefficient_optimizer``
    "rmsprop" (published) or "adam"; ``average_from`` < 1 returns the mean of the iterates
    from that fraction of the steps on; ``coarse_fraction`` the share of the steps (the
    first ones) fitted on the photos shrunk to a long side of ``coarse_side`` pixels
    (:data:`FIT_COARSE_SIDE`, :func:`downsized_fit_views`; photos no larger are left alone).
    Off by default: at 512 px, 75% of the steps at 256 px gave +0.10 dB on the 9 real captures
    at seed 0, all of it from two captures, which lost it at seed 1 (BENCHMARKS.md "Fitting at
    the photos' own size").

    Sharpening terms added to the default loss (:func:`coefficients_ft_loss`; ignored with
    ``loss_fn``): ``gradient_weight`` the multi-scale edge loss, ``laplacian_weight`` the
    Laplacian-pyramid band loss, ``perceptual_weight`` the feature L1 of a frozen copy of
    ``model``'s own extractor encoder (:class:`npbgpp_core.losses.EncoderFeatureLoss`; it
    must be the trained one, read from a weights file: ValueError for a model built from a
    scene bundle, whose extractor is random), ``fft_weight`` the amplitude-spectrum L1
    (:func:`npbgpp_core.losses.fft_amplitude_loss`).
    ``perceptual_weight`` is 3 by default (BENCHMARKS.md "Sharpening loss in the 200-step
    fit", 13 unseen scenes): sharper renders (sharpness ratio 4 environment scenes 0.34 ->
    0.36, 9 captures 0.27 -> 0.30) at no cost in PSNR (22.78 -> 22.92, 18.35 -> 18.40 dB)
    or SSIM, for about 11 s more per 200-step fit (27 ms per 128^2 crop); the other three stay 0 (the edge and
    band losses gave SSIM, not sharpness; the spectrum loss sharpened but lowered SSIM).

    ``background_rows``: the rows of the environment map the fit starts from: the
    aggregated map resampled bilinearly to that resolution
    (:func:`npbgpp_core.models.background.resample_map`; the fitted model's config records
    the rows, so its bundle loads as any other); None keeps the aggregated map's rows. Off
    by default: 32 rows instead of 16 gave 19.26 vs 19.19 dB (seed 0) and 19.13 vs 19.14
    (seed 1) on the 4 dense real captures, within the seed-to-seed spread (BENCHMARKS.md
    "A finer or parallax-keyed environment map").

    ``check_view`` (off here: this function fits exactly the views it is given, e.g. for the
    demo; the users' fits, :class:`npbgpp_core.scene_fit.BundleFit`, and bench_quality turn it
    on by :data:`FIT_CHECK_VIEW`): a fit that cannot make the scene worse
    on a photo it did not see. One input view (:func:`check_view_index`: the middle one of
    those given) is kept apart, the fit runs on the others, and that view's PSNR is scored
    (:func:`view_psnr`, over its valid pixels) with the model before step 1 and after the
    last step; if the fitted one scores more than ``check_tolerance`` dB lower
    (:data:`CHECK_TOLERANCE_DB`, 0.5; a finite number >= 0, 0 drops any loss; another value
    without ``check_view`` is a ValueError, not ignored), the result's
    model is the unfitted one (the aggregated scene as NPBG++ renders it). The result's
    ``check`` (:class:`FitCheck`) says
    which view, both scores and what was kept. With fewer than :data:`CHECK_VIEW_MIN_VIEWS`
    views the fit runs on all of them unchecked and ``check`` says so. The step-by-step
    generator (:func:`iter_fit_coefficients`) then counts the two scoring renders as one step
    each (``steps + 2``); ``seconds`` includes them. The aggregated scene is usually built
    from every input view, the kept one included, so the unfitted model starts ahead on it:
    the check leans towards the unfitted scene (BENCHMARKS.md: perikles at 6 input views
    scored 19.52 dB unfitted on its kept photo, 14.80 on its held-out views).

    ``fair_check`` (with ``check_view``; off here, the users' fits by
    :data:`FIT_FAIR_CHECK`): the check without that lean. ``model`` aggregates the scene again
    from the views less the kept one (:func:`aggregation_without`: each photo at its own
    size, or at ``aggregate_max_side``, as Aggregate Descriptors, ``headless_train export`` and
    bench_quality add them),
    that aggregation is scored unfitted on the kept view, fitted on the others and scored
    again; the fit (from that aggregation) is kept if it scores no lower, else the result is
    the unfitted model of ``aggregated`` itself, as without ``fair_check``. The
    re-aggregation's seconds count in the first scoring unit and in ``seconds`` (256 px, 9 real
    captures: 0.3-0.9 s at 6 input views, up to 8.7 s for 111 photos). Measured not better than
    the plain check: at 6 views mean 17.61 vs 17.72 dB, one capture below no fitting (BENCHMARKS.md
    "A fair check: the kept photo left out of the aggregation too").

    ``check_recipes`` (with ``check_view``; empty by default: the call's own recipe alone): a
    choosing check. Each named recipe (:data:`CHECK_RECIPES`: "crops", the call's own ``steps``,
    ``crop`` and ``crops_per_step``; "whole", :data:`WHOLE_VIEW_STEPS` steps of one whole view,
    ``crop=None``, ``crops_per_step=1``; the other knobs as given) is fitted in turn from the
    unfitted scene with the same ``seed`` on the views less the kept one and scored there; the
    best score is kept (the earlier recipe on a tie, NaN never), then checked against the
    unfitted scene with ``check_tolerance`` as above. Off by default for the users' fits (opt-in:
    ``headless_train fit --check-recipes``, the add-on's Also Try Whole Views): measured, it won at
    512 px / 6 input views (mean of 9 captures +0.47 dB, video_sfm +3.51) and lost elsewhere
    (256 px / 6 views -0.12, flowerpot -0.60; 512 px all views beer -0.84): one photo is a coin
    between two fits tenths of a dB apart, and the lean above favours the gentler fit too (at 256 px
    the whole-view one; BENCHMARKS.md "A checked fit that chooses its recipe on the kept photo").
    The check's ``candidates`` give every recipe's score, steps and seconds, ``recipe`` the chosen
    one; the result's ``losses`` are the chosen recipe's, ``seconds`` all the fits' and scorings'.
    The step-by-step generator counts every candidate's steps (``sum + 2``).
    ``check_combine`` (:data:`CHECK_COMBINES`; with ``check_recipes`` of 2 or more): "choose" (default)
    as above; "average" (opt-in) keeps the element-wise mean of every recipe's fitted state
    (:func:`average_states`) instead of the best one, scored on the kept view and checked against the
    unfitted scene as above (``check.recipe`` "average", ``psnr_fitted`` the mean's; ``losses`` the first
    recipe's): no single photo picks between fits a few tenths of a dB apart (BENCHMARKS.md "Averaged
    fits ("soups") of a choosing check's states": above the plain check at 512 px, below at 256 px).
    ``whole_max_side`` (:data:`WHOLE_VIEW_MAX_SIDE`, None: no cap; else an int >= 16): the "whole"
    recipe's steps all see the photos shrunk to that long side (``coarse_fraction=1``, ``coarse_side``
    it, for that recipe alone; photos no larger are fitted as they are, bit for bit as without the cap);
    the kept photo is still scored at its own size. It bounds the whole-view steps' cost, which grows
    with the pixels. Ignored without a "whole" recipe.
    ``aggregate_max_side`` (with ``fair_check``; None: each photo at its own size): the long side
    ``aggregated`` was aggregated at (a bundle's "aggregate_max_side": the add-on's Photo Size,
    ``headless_train export --max-side``); the fair check's aggregation without the kept view reads
    the photos shrunk to it as that aggregation did (:func:`aggregation_without`), so it compares
    like with like. The fit itself and the check's scores stay at the photos' own size.
    ``keep_candidates`` (for benchmarks): the result's ``candidate_states`` hold each recipe's
    fitted state (CPU), to score the ones not chosen, and ``unfitted_state`` the state they all
    started from, to score mixes of them (:func:`average_states`).
    ``photo_exposure`` (opt-in, off by default): the loss of each crop compares the render with a
    per-channel gain and offset of its photo applied (:class:`PhotoExposure`: identity at the start,
    mean gain 1 and mean offset 0 over the fitted photos, its own Adam at ``lr_exposure``),
    so that photos of different exposure do not pull the shared coefficients and refiner toward
    their brightness. The corrections are never applied to a render: not the fitted model's, not
    the check's (the kept photo has none of its own: the check scores the uncorrected render
    against it, before and after, as without the term), not a saved bundle's. ``exposure`` of the
    result holds them (:meth:`PhotoExposure.summary` for metadata)."""
    return run_fit(_coefficients_steps(**locals()))


def iter_fit_coefficients(
    model: NPBGPlusPlus, aggregated: AggregatedScene, views: FitViews | tuple, steps: int = 100, **options: Any,
) -> Generator[int, None, FitResult]:
    """:func:`fit_coefficients` step by step (same keywords and defaults, checked now): a
    generator yielding the number of steps done after each step (a ``check_view`` fit of
    :data:`CHECK_VIEW_MIN_VIEWS` views or more counts its two scoring renders one each:
    ``steps + 2`` in all) and returning the
    :class:`FitResult` (``StopIteration.value``; :func:`run_fit` runs it to the end). For
    callers that report progress or may stop early (the add-on's worker)."""
    bound = inspect.signature(fit_coefficients).bind(model, aggregated, views, steps, **options)
    bound.apply_defaults()
    return _coefficients_steps(**bound.arguments)


def _coefficients_steps(
    model: NPBGPlusPlus, aggregated: AggregatedScene, views: FitViews | tuple, steps: int, crop: int | None,
    lr_coefficients: float, lr_refiner: float, loss_fn: LossFn | None, loss_factors: Sequence[int], seed: int,
    lr_background: float | None, train_refiner: str, crops_per_step: int, warmup_steps: int, schedule: str,
    coefficient_decay: float, coefficient_optimizer: str, gradient_weight: float, average_from: float,
    laplacian_weight: float, perceptual_weight: float, fft_weight: float, background_rows: int | None,
    aligned: bool, coarse_fraction: float, coarse_side: int, check_view: bool, fair_check: bool,
    check_tolerance: float, check_recipes: Sequence[str], check_combine: str, whole_max_side: int | None,
    keep_candidates: bool, aggregate_max_side: int | None, photo_exposure: bool, lr_exposure: float,
) -> Generator[int, None, FitResult]:
    """The model, loss and recipe of :func:`fit_coefficients` (every argument checked
    here, before a step runs) and its fitting loop, not started yet."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    views = as_fit_views(views)
    device = model.device
    if model.basis is None:
        raise ValueError("coefficient fine-tuning needs an NPBG++ model with the 'sphere' aggregator")
    recipe, tolerance, recipe_names, combine, whole_cap = coefficients_recipe(
        lr_coefficients, lr_refiner, lr_background, train_refiner, crops_per_step, warmup_steps, schedule,
        coefficient_decay, coefficient_optimizer, gradient_weight, average_from, laplacian_weight, perceptual_weight,
        fft_weight, background_rows, aligned, coarse_fraction, coarse_side, check_view, fair_check, check_tolerance,
        check_recipes, check_combine, whole_max_side, photo_exposure, lr_exposure)
    if not isinstance(keep_candidates, bool):
        raise ValueError(f"keep_candidates must be True or False, got {keep_candidates!r}")
    from .protocol import check_aggregate_max_side

    aggregate_max_side = check_aggregate_max_side(aggregate_max_side, "aggregate_max_side")
    if loss_fn is None:
        perceptual = None
        if perceptual_weight > 0:  # ValueError for an encoder no file was read into
            perceptual = EncoderFeatureLoss(model.extractor.encoder).to(device)
        loss_fn = coefficients_ft_loss(loss_factors, gradient_weight, laplacian_weight, perceptual_weight,
                                       perceptual, fft_weight)
    points = aggregated.points.detach().to(device, torch.float32)

    def start_model(scene: AggregatedScene) -> NPBG:
        return coefficients_model(model, scene, background_rows, aligned)

    candidates = candidate_recipes(recipe_names, steps, crop, recipe, whole_cap)
    if check_view and fair_check:
        return _fair_checked_steps(model, aggregated, start_model, points, views, candidates, loss_fn, seed,
                                   device, tolerance, keep_candidates, combine, aggregate_max_side)
    if check_view:
        return _checked_steps(start_model(aggregated), points, views, candidates, loss_fn, seed, device,
                              tolerance, keep_candidates, combine)
    return _fit_steps(start_model(aggregated), points, views, steps, crop, loss_fn, recipe, seed, device)


def coefficients_model(model: NPBGPlusPlus, aggregated: AggregatedScene, background_rows: int | None,
                       aligned: bool) -> NPBG:
    """The NPBG model coefficients_ft fits, on ``model``'s device: ``aggregated``'s
    coefficients (and environment map, resampled to ``background_rows``) with copies of
    ``model``'s basis and refiner; before any step it renders as ``model`` renders
    ``aggregated``."""
    background = None if aggregated.background is None else aggregated.background.detach().cpu().float()
    config = model.config
    if background is not None:
        if background_rows is not None and background.ndim == 3 and background.shape[1] != background_rows:
            background = resample_map(background, background_rows, config.world_up)
        # The fitted model's map has the rows it is fitted at (its config records them).
        config = dataclasses.replace(config, background_rows=int(background.shape[1]))
    return NPBG.from_npbgpp_coefficients(
        aggregated.points.detach().cpu(), aggregated.coefficients.detach().cpu(),
        {k: v.detach().cpu() for k, v in model.basis.state_dict().items()},
        {k: v.detach().cpu() for k, v in model.refiner.state_dict().items()},
        config, valid=aggregated.valid.detach().cpu(), background=background, aligned=aligned,
    ).to(model.device)


def aggregation_without(model: NPBGPlusPlus, points: torch.Tensor, views: FitViews, k: int,
                        max_side: int | None = None) -> AggregatedScene:
    """``model``'s aggregation of ``points`` from every view of ``views`` but ``k``, each
    photo at its own size (the padding :func:`padded_fit_views` added cut off again) or, with
    ``max_side``, shrunk to that long side with its camera
    (:func:`~npbgpp_core.datasets.scene_data.shrink_photo`, what the loader reads at that size),
    one at a time, as Aggregate Descriptors (at its Photo Size), ``headless_train export``
    (--max-side) and bench_quality add them: the scene a fair check scores unfitted, in which
    view ``k``'s pixels play no part."""
    from .datasets.scene_data import shrink_photo

    device = model.device
    with torch.no_grad():
        state = model.begin_scene(points.detach().to(device, torch.float32))
        for i in range(len(views.cameras)):
            if i == k:
                continue
            h, w = view_extent(views, i)
            if h == 0:
                continue  # no valid pixel: nothing to add
            image, camera = shrink_photo(views.image(i, 0, 0, h, w), views.cameras[i].cropped(0, 0, h, w), max_side)
            state.add_views(image.to(device, torch.float32)[None], [camera.to(device)])
        return state.finish()


def _fair_checked_steps(
    model: NPBGPlusPlus, aggregated: AggregatedScene, start_model: Callable[[AggregatedScene], NPBG],
    points: torch.Tensor, views: FitViews, candidates: list[Candidate], loss_fn: LossFn,
    seed: int, device: torch.device, tolerance: float, keep_candidates: bool = False,
    combine: str = FIT_CHECK_COMBINE, max_side: int | None = None,
) -> Generator[int, None, FitResult]:
    """:func:`_checked_steps` on the scene aggregated without the kept view
    (:func:`aggregation_without`, photos at most ``max_side`` long); when the fit loses there, the result's model is the
    unfitted one of ``aggregated`` (every view's aggregation, as without the fair check).
    Below :data:`CHECK_VIEW_MIN_VIEWS` views: the unchecked fit of ``aggregated``."""
    k = check_view_index(len(views.cameras))
    if k is None:
        return (yield from _checked_steps(start_model(aggregated), points, views, candidates, loss_fn, seed, device,
                                          tolerance, keep_candidates, combine))
    start = time.perf_counter()
    without = aggregation_without(model, points, views, k, max_side)
    aggregate_seconds = time.perf_counter() - start
    result = yield from _checked_steps(start_model(without), points, views, candidates, loss_fn, seed, device,
                                       tolerance, keep_candidates, combine)
    check = result.check  # set by _checked_steps, on view k
    if check is not None and check.kept == "unfitted":
        result.model = start_model(aggregated).eval()
    result.seconds += aggregate_seconds
    if check is not None:
        check.aggregated_without = True
        check.aggregate_seconds = aggregate_seconds
    return result


def fit_npbg(
    points: torch.Tensor,
    views: FitViews | tuple,
    refiner_state: dict[str, torch.Tensor] | None,
    steps: int = 100,
    crop: int | None = 128,
    config: NPBGConfig | dict | None = None,
    lr_descriptors: float = 0.1,
    lr_refiner: float = 1e-4,
    loss_fn: LossFn | None = None,
    loss_factors: Sequence[int] = (1, 2, 4),
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FitResult:
    """NPBG: zero-initialised descriptors and background for ``points``, the refiner from
    ``refiner_state`` (None: random init), fitted on ``views`` for ``steps`` steps.
    The default loss is the same multi-scale L1 as :func:`fit_coefficients` (so that a
    fixed budget compares the two fairly; the published NPBG uses a VGG loss)."""
    views = as_fit_views(views)
    points = torch.as_tensor(points, dtype=torch.float32)
    model = NPBG(points.shape[0], config)
    if refiner_state is not None:
        try:
            model.refiner.load_state_dict(refiner_state)
        except RuntimeError as exc:
            raise ValueError(f"refiner weights do not fit the NPBG refiner: {str(exc).splitlines()[0]}") from exc
    device = torch.device(device)
    model.to(device)
    loss = loss_fn or coefficients_ft_loss(loss_factors)
    recipe = FitRecipe(lr_descriptors, lr_refiner)
    return _fit_loop(model, points.to(device), views, steps, crop, loss, recipe, seed, device)
