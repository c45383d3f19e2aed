"""Fit an aggregated bundle to its dataset's photos: the per-scene coefficients_ft fit
(:func:`npbgpp_core.fitting.fit_coefficients`, its defaults) of an NPBG++ bundle's
coefficients, environment map and a copy of its refiner, saved as a *fitted bundle*.

The fitted bundle is an ordinary :class:`~npbgpp_core.scene.NeuralScene` of kind
``'coefficients'``: its features are the fitted coefficients and its model weights hold
the fitted refiner, the environment map and the frozen basis, so every reader of bundles
(the add-on's worker, ``NeuralScene.load``) renders it without change. Its metadata keep
the source bundle's and add ``fit`` (steps, losses, seconds, source file).

:class:`BundleFit` runs the fit step by step (the add-on's worker reports progress and
can drop it between steps); :func:`fit_bundle` runs it to the end and saves.

With ``check_view`` (the fit's :func:`~npbgpp_core.fitting.fit_coefficients` option) one
photo is kept apart and scored before and after the fit; when the fit scores more than
``check_tolerance`` (:data:`~npbgpp_core.fitting.CHECK_TOLERANCE_DB`) lower there,
the saved bundle is the source bundle itself (it renders exactly as the unfitted scene),
with ``fit`` metadata saying so (``fit["check"]``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

DEFAULT_STEPS = 200  # BENCHMARKS.md "Sharpening loss in the 200-step fit"
MAX_STEPS = 100_000

# Whether the fit holds undistorted (resampled) photos of 8-bit files rounded to 8 bits
# (SceneData.load_image_pixels' round_resampled): stored as uint8 instead of float32, 4x less
# memory for distorted captures (COLMAP SIMPLE_RADIAL / OPENCV with Undistort). Each target pixel
# moves by at most 1/510, as in the prepared captures' photos (BENCHMARKS.md "Fit to Photos'
# undistorted photos as 8 bits"). False: floats as read, the fit before.
FIT_ROUND_RESAMPLED = True


# What the outcome line calls each recipe a choosing check can choose (fitting.CHECK_RECIPES).
RECIPE_LABELS = {"crops": "crops", "whole": "whole views"}


def check_steps(steps: Any) -> int:
    """``steps`` as an int in 1..MAX_STEPS; ValueError naming the value otherwise."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"fit steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    return steps


def fitting_model(bundle: Any, bundle_path: str, weights: str, device: str = "cpu") -> Any:
    """The NPBG++ model to fit ``bundle`` (a loaded NeuralScene read from ``bundle_path``)
    with: the network of the weights file ``weights`` (which must be the one the bundle was
    aggregated with) carrying the bundle's own weights. Bundles leave out the image
    extractor (rendering does not need it), but the fit's perceptual loss uses its encoder,
    so the model a bundle renders with is not the one to fit with."""
    from .models import NPBGPlusPlusConfig
    from .pretrained import load_pretrained_npbgpp

    model = load_pretrained_npbgpp(weights, device, world_up=bundle.model_config.get("world_up"))
    diff = [k for k, _, _ in model.config.differences(NPBGPlusPlusConfig.from_dict(bundle.model_config))]
    if diff:
        raise ValueError(f"{bundle_path} was aggregated with another NPBG++ network than {weights} "
                         f"(config differs in {diff[:5]}): choose the weights it was aggregated with")
    model.load_state_dict(bundle.model_state, strict=False)  # shapes checked by bundle.check()
    return model


def users_check(check_view: Any, fair_check: Any) -> tuple[Any, Any]:
    """``check_view`` and ``fair_check`` as the users' fits run them (:class:`BundleFit`, and
    bench_quality, which scores what they run): None is :data:`~npbgpp_core.fitting.FIT_CHECK_VIEW`,
    and :data:`~npbgpp_core.fitting.FIT_FAIR_CHECK` when checked; any other value as given (the
    fit's own checks refuse a bad one)."""
    from .fitting import FIT_CHECK_VIEW, FIT_FAIR_CHECK

    if check_view is None:
        check_view = FIT_CHECK_VIEW
    if fair_check is None:
        fair_check = FIT_FAIR_CHECK and check_view
    return check_view, fair_check


def users_check_recipes(checked: bool, image_sizes: Iterable[Sequence[int]]) -> dict[str, Any] | None:
    """What the users' default check recipes are for a fit on photos of ``image_sizes`` ((H, W)
    each, their own sizes, not a padded canvas): :func:`~npbgpp_core.protocol.auto_check_recipes` of
    their largest long side, as ``{"long_side", "range", "recipes", "combine"}`` (the fitted
    bundle's ``fit["recipes_by_size"]``); None when the fit is not ``checked`` (no check applies:
    the rule chooses between a checked fit's recipes). :class:`BundleFit` and bench_quality's
    ``--check-recipes auto`` use it, so the bench scores what users get."""
    from .protocol import AUTO_AVERAGE_HIGH_SIDE, AUTO_AVERAGE_LOW_SIDE, auto_check_recipes

    if not checked:
        return None
    long_side = max(max(int(h), int(w)) for h, w in image_sizes)
    recipes, combine = auto_check_recipes(long_side)
    return {"long_side": long_side, "range": [AUTO_AVERAGE_LOW_SIDE, AUTO_AVERAGE_HIGH_SIDE],
            "recipes": list(recipes), "combine": combine}


def bundle_aggregate_max_side(bundle: Any, path: str) -> int | None:
    """The long side ``bundle`` (read from ``path``) records its photos were aggregated at (metadata
    "aggregate_max_side", written by Aggregate Descriptors and ``headless_train export``); None when
    it records none (their own size; bundles written before the key). ValueError naming the file for
    a value no aggregation writes."""
    from .protocol import check_aggregate_max_side

    try:
        return check_aggregate_max_side(bundle.metadata.get("aggregate_max_side"), "its aggregate_max_side")
    except ValueError as exc:
        raise ValueError(f"{path}: {exc} (the bundle's metadata is damaged: aggregate the dataset again)") from None


class BundleFit:
    """The fit of the NPBG++ bundle ``bundle_path`` to the training views of ``data`` (a
    loaded :class:`~npbgpp_core.datasets.scene_data.SceneData`), ``steps`` steps of
    :func:`~npbgpp_core.fitting.fit_coefficients` on ``device``.

    The perceptual loss needs the NPBG++ file's image encoder, which bundles do not hold:
    ``weights`` is that file; empty: the bundled file of ``domain``, or the weights file or
    checkpoint ``headless_train export`` made the bundle with (its metadata, when that file
    is still there), or the bundled file of the domain the bundle was aggregated for (its
    metadata), or else the dataset's. The bundle's own
    basis and refiner weights are what the fit starts from. ``aligned``: the fit's
    ``aligned`` (rolled views rendered upright); None: :data:`~npbgpp_core.fitting.FIT_ALIGNED`.
    ``check_view``: the fit's ``check_view`` (one training photo kept apart: the fit is
    kept unless it scores more than ``check_tolerance`` dB below the unfitted scene there); None:
    :data:`~npbgpp_core.fitting.FIT_CHECK_VIEW`. ``check_tolerance``: the fit's; None:
    :data:`~npbgpp_core.fitting.CHECK_TOLERANCE_DB`. ``check_recipes``: the fit's (a choosing
    check: each recipe named, :data:`~npbgpp_core.fitting.CHECK_RECIPES`, is fitted and
    the best on the kept photo kept); empty: the fit's own recipe alone. ``check_combine``:
    the fit's (:data:`~npbgpp_core.fitting.CHECK_COMBINES`; None:
    :data:`~npbgpp_core.fitting.FIT_CHECK_COMBINE`, "choose"); "average" keeps the mean of
    every recipe's fit instead of the best (with 2 or more ``check_recipes``). Both None: the users'
    default, decided by the training photos' long side once they are read
    (:func:`~npbgpp_core.protocol.auto_check_recipes`: both recipes averaged within
    :data:`~npbgpp_core.protocol.AUTO_AVERAGE_LOW_SIDE`..``AUTO_AVERAGE_HIGH_SIDE`` px, the plain check
    otherwise; only for a check that applies); ``recipes_by_size`` then says what it decided (also in the
    metadata, ``fit["recipes_by_size"]``, and the outcome line when it averaged). ``check_recipes`` None
    with a ``check_combine`` given: no recipes, as before the rule. ``checked``:
    whether the check applies (it needs :data:`~npbgpp_core.fitting.CHECK_VIEW_MIN_VIEWS`
    training photos).

    ``step()`` runs one unit of work (True once all are done); ``done`` / ``total`` count
    them: the ``steps`` fitting steps (a choosing check: every recipe's), plus one for each of
    the two scoring renders of a checked fit; ``save(out)`` writes the fitted bundle atomically. Every check runs in the
    constructor.

    ``fair_check`` (with ``check_view``): the fit's ``fair_check``: the check scores, and the
    fit starts from, the scene aggregated again from the dataset's training photos without the
    kept one, each read at the long side the bundle records it was aggregated at (its metadata's
    "aggregate_max_side": Aggregate Descriptors' Photo Size, ``headless_train export --max-side``;
    none recorded: the photos' own size), as the bundle was (undistorted photos of 8-bit files as
    the fit holds them, rounded to 8 bits: within 1/510 of Aggregate's); a fit that loses there saves the
    source bundle, as without it. None: :data:`~npbgpp_core.fitting.FIT_FAIR_CHECK` when checked.
    The fit itself fits the photos at their own size, whatever the bundle records.

    ``photo_exposure`` (off by default): the fit's per-photo gain and offset in the loss
    (:class:`~npbgpp_core.fitting.PhotoExposure`); the saved bundle renders without them, its
    metadata's ``fit["exposure"]`` says it was used and the fitted values' range."""

    def __init__(self, bundle_path: str, data: Any, steps: int = DEFAULT_STEPS, weights: str = "",
                 domain: str = "", device: str = "cpu", aligned: bool | None = None,
                 check_view: bool | None = None, fair_check: bool | None = None,
                 check_tolerance: float | None = None, check_recipes: Sequence[str] | None = None,
                 check_combine: str | None = None, photo_exposure: bool = False) -> None:
        from .datasets import scene_domain
        from .fitting import (
            CHECK_TOLERANCE_DB,
            FIT_CHECK_COMBINE,
            candidate_recipes,
            check_view_index,
            coefficients_recipe,
            iter_fit_coefficients,
            read_fit_views,
        )
        from .pretrained import check_domain, default_weights_path
        from .scene import NeuralScene

        self.steps = check_steps(steps)
        check_view, fair_check = users_check(check_view, fair_check)
        if check_tolerance is None:
            check_tolerance = CHECK_TOLERANCE_DB
        # the users' default (both None): decided by the photos' size below, checked now as the plain check
        by_size = check_recipes is None and check_combine is None
        if check_recipes is None:
            check_recipes = ()
        if check_combine is None:
            check_combine = FIT_CHECK_COMBINE
        # the fit's own checks of these five, run now: before the bundle and photos are read (the
        # whole-view cap is the library's, WHOLE_VIEW_MAX_SIDE)
        recipe, check_tolerance, check_recipes, check_combine, _ = coefficients_recipe(
            check_view=check_view, fair_check=fair_check, check_tolerance=check_tolerance, check_recipes=check_recipes,
            check_combine=check_combine, photo_exposure=photo_exposure)
        self.bundle_path = os.fspath(bundle_path)
        bundle = NeuralScene.load(self.bundle_path)
        if bundle.kind != "npbgpp":
            what = "already fitted" if "fit" in bundle.metadata else f"a {bundle.kind!r} bundle"
            raise ValueError(f"{self.bundle_path}: fitting needs an aggregated NPBG++ bundle (kind 'npbgpp'); this "
                             f"one is {what}: fit the bundle Aggregate Descriptors wrote")
        if bundle.model_config.get("aggregator", "sphere") != "sphere" or bundle.features.shape[1] == 1:
            raise ValueError(f"{self.bundle_path}: fitting needs the 'sphere' aggregator's coefficients "
                             f"(features {tuple(bundle.features.shape)})")
        # headless_train export wrote the dataset as "scene_root" before it wrote Aggregate's keys
        source = str(bundle.metadata.get("dataset") or bundle.metadata.get("scene_root") or "")
        if source and os.path.isdir(source) and not os.path.samefile(source, data.root):
            # Fitting to another scene's photos would silently ruin it; a moved dataset is fine.
            raise ValueError(f"{self.bundle_path} was aggregated from the dataset {source}, not {data.root}: fit "
                             "it to its own dataset (or aggregate this one first)")
        self.bundle = bundle
        # the long side its photos were aggregated at (None: their own), which a fair check aggregates again at
        self.aggregate_max_side = bundle_aggregate_max_side(bundle, self.bundle_path)
        source_weights = str(bundle.metadata.get("source_checkpoint") or "")  # headless_train export's network
        if not weights and not domain and source_weights and os.path.isfile(source_weights):
            weights = source_weights
        if not weights:
            domain = domain or str(bundle.metadata.get("domain") or "") or scene_domain(data)
            check_domain(domain)
            weights = default_weights_path("npbgpp", domain)
        self.weights = weights
        model = fitting_model(bundle, self.bundle_path, weights, device)
        aggregated = bundle.aggregated_scene(model.device)
        ids = list(data.train) or list(range(len(data.views)))
        if not ids:
            raise ValueError(f"dataset {data.root} has no views to fit to")
        self.device = str(device)
        # (H, W) of the photo with the most pixels: the worker's out-of-memory advice names it
        self.largest_photo = data.largest_image_size(ids)
        # each photo read once into what the fit holds (8-bit photos stored as uint8, read as uint8: not
        # converted to floats and scanned back; photos of different sizes at their own sizes, not
        # padded): a list of every photo as float32 and then their stack held them twice (BENCHMARKS.md,
        # big photos); undistorted photos of 8-bit files rounded to 8 bits (FIT_ROUND_RESAMPLED)
        self.round_resampled = FIT_ROUND_RESAMPLED  # as read now: the fit record says what the fit held
        views = read_fit_views(lambda k: data.load_image_pixels(ids[k], round_resampled=self.round_resampled),
                               [data.views[i].camera for i in ids])
        self.views = len(ids)
        self.view_names = [data.views[i].name for i in ids]
        self.checked = check_view and check_view_index(len(ids)) is not None
        # what the users' default decided, for the metadata and the outcome (None: not asked for, or
        # no check to apply it to); the photos' own long side, not the padded canvas's
        sizes = [tuple(data.views[i].camera.image_size) for i in ids]  # read_fit_views checked the photos'
        self.recipes_by_size = users_check_recipes(self.checked, sizes) if by_size else None
        if self.recipes_by_size is not None:  # the rule's own values; iter_fit_coefficients checks them as it starts
            check_recipes, check_combine = tuple(self.recipes_by_size["recipes"]), self.recipes_by_size["combine"]
        # each candidate recipe's steps (the fit's own alone without check_recipes; a check that
        # cannot apply runs the first candidate only), plus a checked fit's two scoring renders
        candidate_steps = [c[1] for c in candidate_recipes(check_recipes, self.steps, None, recipe)]
        self.total = sum(candidate_steps) + 2 if self.checked else candidate_steps[0]
        options = {} if aligned is None else {"aligned": aligned}  # checked by iter_fit_coefficients
        self.fair_check = fair_check
        self._fit = iter_fit_coefficients(model, aggregated, views, self.steps, check_view=check_view,
                                          fair_check=fair_check, check_tolerance=check_tolerance,
                                          check_recipes=check_recipes, check_combine=check_combine,
                                          aggregate_max_side=self.aggregate_max_side,
                                          photo_exposure=photo_exposure, **options)
        self.done = 0
        self.result: Any = None  # the FitResult once finished

    def step(self) -> bool:
        """Run one step (a fitting step, or one of a checked fit's two scoring renders); True
        when the fit is finished (then a no-op)."""
        if self.result is not None:
            return True
        from .fitting import run_fit

        self.done = next(self._fit)
        if self.done < self.total:
            return False
        self.result = run_fit(self._fit)  # after the last step: the averaging and the result
        return True

    @property
    def doing(self) -> str:
        """What the next step does when it fits nothing, for a status line ("" for a fitting
        step): a checked fit's first and last steps render the kept photo to score it (a fair
        check's first one aggregates the scene without it before), which at full size can
        take as long as many fitting steps."""
        if not self.checked or self.result is not None or 0 < self.done < self.total - 1:
            return ""
        if self.done == 0 and self.fair_check:
            return "aggregating without the kept photo, then scoring it"
        return "scoring the kept photo"

    def close(self) -> None:
        """Stop a fit that will not be finished (frees it; nothing is written)."""
        self._fit.close()

    def fitted_scene(self) -> Any:
        """The fitted :class:`~npbgpp_core.scene.NeuralScene` (after the last step)."""
        from .scene import NeuralScene

        if self.result is None:
            raise RuntimeError(f"the fit is not finished ({self.done}/{self.total} steps)")
        losses = self.result.losses
        fit = {"steps": self.result.steps, "seconds": round(self.result.seconds, 3), "views": self.views,
               "source": os.path.basename(self.bundle_path), "weights": os.path.basename(self.weights),
               "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               # whether undistorted photos of 8-bit files were held rounded to 8 bits (FIT_ROUND_RESAMPLED);
               # other photos are held as read either way
               "round_resampled": self.round_resampled}
        check = self.check()
        if check is not None:
            fit["check"] = check
        if self.recipes_by_size is not None:
            fit["recipes_by_size"] = self.recipes_by_size
        if self.result.exposure is not None:  # used in the fit's loss only; the bundle renders without it
            fit["exposure"] = self.result.exposure.summary()
        meta = {**self.bundle.metadata, "fit": fit}
        if check is not None and check["kept"] == "unfitted":
            # the fit lost to no fit on the photo kept apart: the source bundle itself, which
            # renders exactly as the unfitted scene, its metadata saying why
            b = self.bundle
            return NeuralScene(b.points, b.colors, b.kind, b.features, b.valid, b.model_config, b.model_state,
                               meta, b.background)
        return NeuralScene.from_npbg(self.result.model, self.bundle.points, self.bundle.colors,
                                     name=str(self.bundle.metadata.get("name", "scene")), metadata=meta)

    def check(self) -> dict[str, Any] | None:
        """The outcome of a checked fit once finished (None without ``check_view``):
        :meth:`~npbgpp_core.fitting.FitCheck.as_dict` plus ``name``, the photo kept apart
        (None when the check was skipped)."""
        if self.result is None or self.result.check is None:
            return None
        check = self.result.check.as_dict()
        k = self.result.check.view
        return {**check, "name": None if k is None else self.view_names[k]}

    def outcome(self) -> str:
        """One line on what a finished fit kept: the check's outcome, or that there was none; and
        when the users' default averaged both recipes by the photos' size, that it did and why (a
        user sees why the fit took about twice as long)."""
        line = self._check_outcome()
        by_size = self.recipes_by_size
        if by_size is not None and by_size["combine"] == "average":
            low, high = by_size["range"]
            line += (f"; both recipes averaged: photos {by_size['long_side']} px, within the {low}-{high} px range "
                     "where the size rule averages them")
        return line

    def _check_outcome(self) -> str:
        """The check's outcome, or that there was none (:meth:`outcome`)."""
        check = self.check()
        if check is None:
            return "the fit was not checked on a photo kept apart"
        raw = self.result.check  # unrounded; +inf is an exact match, NaN a render not scored
        # a choosing check names the recipe it chose ("kept the fit (whole views): ..."), or the
        # one that ran unchecked when the check could not apply; an averaging one what it averaged
        labels = [RECIPE_LABELS.get(c.recipe, c.recipe) for c in raw.candidates]
        if raw.averaged:
            chosen = f" (average of {', '.join(labels[:-1])} and {labels[-1]})"
        else:
            chosen = f" ({RECIPE_LABELS.get(raw.chosen, raw.chosen)})" if raw.chosen else ""
        if check.get("skipped"):
            return f"the fit{chosen} used every photo unchecked: {check['skipped']}"
        if raw.render_not_finite:
            if len(raw.candidates) > 1 and not raw.averaged:  # NaN never wins a choice: no recipe's was finite
                return (f"kept the unfitted scene: no recipe's render of held-apart photo {check['name']} was finite "
                        f"({', '.join(labels)})")
            # an average is broken by any broken recipe: name those whose own render was not finite
            # either (choosing between the recipes would have kept another)
            alone = [label for label, c in zip(labels, raw.candidates, strict=True)
                     if raw.averaged and math.isnan(c.psnr_fitted)]
            either = f" (alone, not finite either: {', '.join(alone)})" if alone else ""
            return (f"kept the unfitted scene: the fit's{chosen} render of held-apart photo {check['name']} was not "
                    f"finite{either}")
        if math.isnan(raw.psnr_unfitted) or math.isnan(raw.psnr_fitted):
            return f"kept the fit{chosen}: held-apart photo {check['name']} could not be scored"
        gain = 0.0 if raw.psnr_fitted == raw.psnr_unfitted else raw.psnr_fitted - raw.psnr_unfitted
        # the allowance before the photo's name: the add-on's report goes on after the name
        allowed = f"the {raw.tolerance:.2f} dB the check allows"
        if check["kept"] == "fitted":
            within = f" (within {allowed})" if gain < 0 else ""
            return f"kept the fit{chosen}: {gain:+.2f} dB{within} on held-apart photo {check['name']}"
        more = f" (more than {allowed})" if raw.tolerance > 0 else ""
        return (f"kept the unfitted scene: the fit{chosen} scored {-gain:.2f} dB below it{more} on held-apart "
                f"photo {check['name']}")

    def save(self, out: str) -> Any:
        """Write the fitted bundle to ``out`` (atomically); returns the scene written."""
        scene = self.fitted_scene()
        if os.path.abspath(out) == os.path.abspath(self.bundle_path):
            raise ValueError(f"{out}: the fitted bundle would replace the bundle it was fitted from; choose another "
                             "file")
        scene.save(out)
        return scene


def fit_bundle(bundle_path: str, dataset: Any, out: str, steps: int = DEFAULT_STEPS, weights: str = "",
               domain: str = "", device: str = "cpu", aligned: bool | None = None,
               check_view: bool | None = None, fair_check: bool | None = None,
               check_tolerance: float | None = None, check_recipes: Sequence[str] | None = None,
               check_combine: str | None = None, photo_exposure: bool = False) -> Any:
    """Fit ``bundle_path`` to ``dataset`` (a folder or a loaded SceneData) and save the
    fitted bundle to ``out``; returns the :class:`~npbgpp_core.fitting.FitResult`. See
    :class:`BundleFit` (``aligned``: None is :data:`~npbgpp_core.fitting.FIT_ALIGNED`;
    ``check_view``: None is :data:`~npbgpp_core.fitting.FIT_CHECK_VIEW`; ``fair_check``: None is
    :data:`~npbgpp_core.fitting.FIT_FAIR_CHECK` when checked; ``check_tolerance``: None is
    :data:`~npbgpp_core.fitting.CHECK_TOLERANCE_DB`; ``check_recipes`` and ``check_combine`` both None:
    the users' default by the photos' size, :func:`~npbgpp_core.protocol.auto_check_recipes`;
    ``check_combine`` alone None: :data:`~npbgpp_core.fitting.FIT_CHECK_COMBINE`)."""
    from .datasets import load_scene

    # the bundle holds the points; the dataset gives photos and cameras (it may have no cloud of its own)
    data = (load_scene(os.fspath(dataset), require_points=False) if isinstance(dataset, (str, os.PathLike))
            else dataset)
    job = BundleFit(bundle_path, data, steps, weights, domain, device, aligned, check_view, fair_check,
                    check_tolerance, check_recipes, check_combine, photo_exposure)
    while not job.step():
        pass
    job.save(out)
    return job.result
