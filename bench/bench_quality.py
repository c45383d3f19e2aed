"""Image quality on unseen scenes: the benchmark that picks the shipped NPBG++ weights.

For every scene folder (any ``load_scene`` format) the held-out views are the scene's test
split, or every 8th view when it has none; every other view is an input view
(aggregation, fitting, baselines). Per scene and on average it reports PSNR / SSIM and the
sharpness ratio (``npbgpp_core.metrics.sharpness_ratio``: RMS image gradient of the
rendering over the photo's, all pixels; 1 = as sharp as the photo, < 1 blurrier, > 1
noisier) of

- ``points``: raw nearest-point colours (pixels no point reaches show the background
  colour of RGBA scenes, otherwise the input photos' mean colour);
- ``mean_color``: a constant image of the input photos' mean colour;
- ``mean_image``: the per-pixel average of the input photos;
- ``npbgpp``: NPBG++ without fitting (``--weights`` for every scene, default per scene the
  bundled file of its domain, ``npbgpp_core.datasets.scene_domain``: cut-out objects on a
  plain colour get the objects file, everything else the general one; the file each scene
  used is in the JSON and the table; world_up from ``resolve_world_up('auto', cameras)``);
- ``coefficients_ft`` and ``npbg``: ``npbgpp_core.fitting`` for ``--steps`` steps each
  on ``--crop`` windows (``--crop none``: whole views), with seconds, on every input view
  (photos of different sizes are padded to one canvas, the padding masked out of the loss:
  ``padded_fit_views``); coefficients_ft as the users' fits run it: by default
  (``FIT_CHECK_VIEW``, ``--check-view on|off``) with the middle input view kept apart and
  the unfitted scene scored when the fit lost more than ``CHECK_TOLERANCE_DB`` there (the cell
  says "unfitted kept").

    .venv/bin/python bench/bench_quality.py --scenes /work/captures/* /work/corpus_env_val/*
    .venv/bin/python bench/bench_quality.py --scenes-file val.txt --weights new.safetensors --label new

Images are resized so their long side is at most ``--max-side`` (default 256) to keep a
2-core CPU run short (``--aggregate-max-side N``: NPBG++ aggregates the input photos at long side
N, scoring stays at ``--max-side``). Each scene's JSON records the held-out views' sizes as scored
(``held_out_sizes``: each distinct ``[h, w]`` with its number of views, as a capture with portrait and
landscape photos has two; ``size`` is the first held-out view's, as before). Writes ``<out>.json`` and
``<out>.md``; ``--record`` appends the
table to BENCHMARKS.md. ``--group NAME=SCENE,SCENE`` adds a mean row over those scenes;
``--table REPORT.json`` prints the table of an earlier report (with its groups) without
evaluating anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("points", "mean_color", "mean_image", "npbgpp", "coefficients_ft", "npbg")
LABELS = {
    "points": "raw points", "mean_color": "mean colour", "mean_image": "mean training image",
    "npbgpp": "NPBG++ (no fitting)", "coefficients_ft": "coefficients_ft", "npbg": "NPBG",
}


def warmup_steps_arg(text: str) -> int:
    """``--warmup-steps`` through the project's one warm-up parser
    (npbgpp_core.fitting.warmup_steps_value), so it is refused with the message the
    trainer and its stage give, not argparse's own."""
    from npbgpp_core.fitting import warmup_steps_value

    try:
        return warmup_steps_value(text, "--warmup-steps")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def crop_arg(text: str) -> int | None:
    """``--crop N`` (a positive side in pixels) or ``--crop none``: whole views per fitting
    step (fit_coefficients / fit_npbg ``crop=None``), the recipe video_sfm gained from at 512 px."""
    if text.strip().lower() == "none":
        return None
    try:
        side = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive crop side or none, got {text!r}") from None
    if side < 1:
        raise argparse.ArgumentTypeError(f"expected a positive crop side or none, got {text!r}")
    return side


def crop_label(crop: int | None) -> str:
    """How a run's fitting crop reads in notes: "128^2 crops" or "whole views"."""
    return "whole views" if crop is None else f"{crop}^2 crops"


def on_off_arg(text: str) -> bool:
    """``--aligned on|off`` (also true/false, 1/0, yes/no)."""
    key = text.strip().lower()
    if key in ("on", "true", "1", "yes"):
        return True
    if key in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def check_recipes_arg(text: str) -> tuple[str, ...] | str:
    """``--check-recipes crops,whole``: the recipes a checked fit chooses between on its kept photo
    (fit_coefficients' check_recipes; names from npbgpp_core.fitting.CHECK_RECIPES), split as
    headless_train fit splits them; :func:`check_fit_options` checks them, in the flags' words.
    ``auto``: the string "auto", the users' default decided per scene by the fitting photos' size
    (:func:`users_recipes`)."""
    from npbgpp_core.fitting import split_check_recipes

    if text.strip().lower() == "auto":
        return "auto"
    return split_check_recipes(text)


def users_recipes(keywords: dict[str, Any], image_sizes: list[Any]) -> dict[str, Any] | None:
    """With ``--check-recipes auto`` in ``keywords`` (fit_keywords'), set their check_recipes and
    check_combine to what the users' fits get for fitting photos of ``image_sizes`` ((H, W), their
    own sizes, one per view) by npbgpp_core.scene_fit.users_check_recipes, the function BundleFit
    uses; returns what it decided (None: no check applies, so the plain fit, as BundleFit's)."""
    from npbgpp_core.fitting import FIT_CHECK_COMBINE, check_view_index
    from npbgpp_core.scene_fit import users_check_recipes

    checked = bool(keywords["check_view"]) and check_view_index(len(image_sizes)) is not None
    by_size = users_check_recipes(checked, image_sizes)
    keywords["check_recipes"] = tuple(by_size["recipes"]) if by_size else ()
    keywords["check_combine"] = by_size["combine"] if by_size else FIT_CHECK_COMBINE
    return by_size


# coefficients_ft knobs: flag, type, help; each maps to fit_coefficients' keyword of the
# same name (dashes -> underscores); unset ones keep the library defaults.
FIT_KNOBS = (
    ("--lr-coefficients", float, "coefficient learning rate"),
    ("--lr-refiner", float, "refiner learning rate (Adam)"),
    ("--lr-background", float, "environment map / background learning rate"),
    ("--train-refiner", str, "refiner parameters that train: all, decoder, head, none"),
    ("--crops-per-step", int, "crops averaged per step"),
    ("--warmup-steps", warmup_steps_arg, "linear learning-rate warm-up steps"),
    ("--schedule", str, "learning-rate schedule: constant or cosine"),
    ("--coefficient-decay", float, "decoupled pull of the coefficients toward the aggregated ones"),
    ("--coefficient-optimizer", str, "rmsprop or adam"),
    ("--gradient-weight", float, "weight of the edge (gradient) loss"),
    ("--laplacian-weight", float, "weight of the Laplacian-pyramid band loss"),
    ("--perceptual-weight", float, "weight of the feature loss of the NPBG++ file's own encoder (frozen)"),
    ("--fft-weight", float, "weight of the amplitude-spectrum (FFT) L1"),
    ("--average-from", float, "return the mean of the iterates from this fraction of the steps on"),
    ("--background-rows", int, "rows of the environment map the fit starts from (the aggregated map resampled)"),
    ("--coarse-fraction", float, "share of the steps (the first) fitted on the photos shrunk to --coarse-side"),
    ("--coarse-side", int, "long side in pixels of the photos in the coarse phase"),
    ("--aligned", on_off_arg, "on: the fitted model renders rolled views upright as NPBG++ does (training crops "
     "too); off: in the view's own frame (published NPBG)"),
    ("--check-view", on_off_arg, "on: keep the middle input view apart, fit on the others and keep the unfitted "
     "scene when the fit scores more than CHECK_TOLERANCE_DB (0.5 dB) lower on it, as Fit to Photos and "
     "headless_train fit do (default: "
     "npbgpp_core.fitting.FIT_CHECK_VIEW, what they run)"),
    ("--fair-check", on_off_arg, "on: the checked fit aggregates the scene again without the kept view, scores "
     "that unfitted and fits from it (default: npbgpp_core.fitting.FIT_FAIR_CHECK with a checked fit); it "
     "aggregates the photos the fit sees, so with --fit-max-side at that size, not at --max-side as the "
     "no-fitting column"),
    ("--check-recipes", check_recipes_arg, "comma-separated recipes a checked fit fits and chooses between on its "
     "kept photo (crops: the --crop/--steps/--crops-per-step recipe; whole: npbgpp_core.fitting.WHOLE_VIEW_STEPS "
     "steps of one whole view); every candidate's kept-photo and held-out PSNR are recorded (default: one "
     "recipe, no choice); auto: what the users' fits get (npbgpp_core.protocol.auto_check_recipes of the fitting "
     "photos' long side: both averaged within its range, else one recipe), recorded as recipes_by_size"),
    ("--check-combine", str, "with --check-recipes of 2 or more: choose (default) keeps the recipe scoring best on "
     "the kept photo; average the mean of every recipe's fitted state, scored there and checked as usual "
     "(fit_coefficients' check_combine; the mixes are recorded either way)"),
    ("--photo-exposure", on_off_arg, "on: each input photo's crops are compared with the render through a "
     "per-channel gain and offset of that photo, learned with the fit, mean gain 1 and offset 0 over the photos, "
     "never applied to a render (fit_coefficients' photo_exposure; default off); the fitted values' range is "
     "recorded as coefficients_ft's exposure"),
    ("--lr-exposure", float, "with --photo-exposure on: its Adam's learning rate (default "
     "npbgpp_core.fitting.PHOTO_EXPOSURE_LR)"),
    ("--whole-max-side", int, "with a whole recipe in --check-recipes: the long side in pixels its steps see the "
     "photos shrunk to (larger ones only; the kept photo is still scored at its own size; fit_coefficients' "
     "whole_max_side, default npbgpp_core.protocol.WHOLE_VIEW_MAX_SIDE)"),
)


def fit_options(args: argparse.Namespace) -> dict[str, Any]:
    """fit_coefficients keywords of the FIT_KNOBS flags that were given (``--check-view`` and
    ``--fair-check`` too, but only when given: :func:`fit_keywords` adds the users' defaults)."""
    names = [flag[2:].replace("-", "_") for flag, _, _ in FIT_KNOBS]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def users_check_view(args: argparse.Namespace) -> bool:
    """Whether the fits keep a view apart: ``--check-view``, or else what the users' fits
    do (npbgpp_core.scene_fit.users_check: FIT_CHECK_VIEW; fit_coefficients' own default is off)."""
    from npbgpp_core.scene_fit import users_check

    return users_check(args.check_view, args.fair_check)[0]


def users_fair_check(args: argparse.Namespace) -> bool:
    """Whether a checked fit aggregates again without its kept view: ``--fair-check``, or
    else what the users' fits do (npbgpp_core.scene_fit.users_check: FIT_FAIR_CHECK, when checked)."""
    from npbgpp_core.scene_fit import users_check

    return users_check(args.check_view, args.fair_check)[1]


def fit_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """fit_coefficients keywords of a coefficients_ft fit: :func:`fit_options` with the
    users' check (:func:`users_check_view`, :func:`users_fair_check`)."""
    return {**fit_options(args), "check_view": users_check_view(args), "fair_check": users_fair_check(args)}


def check_fit_options(args: argparse.Namespace) -> None:
    """Reject bad recipe flags before any scene is loaded (QualityError naming the value; the
    check's flags by their names, as headless_train fit does)."""
    from npbgpp_core.fitting import (
        CHECK_TOLERANCE_DB,
        FIT_CHECK_COMBINE,
        CheckOptionNames,
        checked_fit_options,
        coefficients_recipe,
    )

    keywords = fit_keywords(args)
    if "whole_max_side" in keywords and keywords.get("check_recipes") != "auto" \
            and "whole" not in keywords.get("check_recipes", ()):
        raise QualityError(f"--whole-max-side {keywords['whole_max_side']} caps the whole-view recipe of a choosing "
                           "check: it needs --check-recipes with whole (or auto)")
    if keywords.get("check_recipes") == "auto":
        if "check_combine" in keywords:
            raise QualityError("--check-combine with --check-recipes auto: the size rule decides how the fits are "
                               "kept; name the recipes to set it")
        del keywords["check_recipes"]  # checked per scene once its photos' size is known (users_recipes)
    flags = CheckOptionNames(check_view_on="--check-view on", fair_check="--fair-check on",
                             check_recipes="--check-recipes",
                             check_combine="--check-combine")  # no flag sets the tolerance here
    try:
        checked_fit_options(keywords["check_view"], keywords["fair_check"], CHECK_TOLERANCE_DB,
                            keywords.get("check_recipes", ()), flags, keywords.get("check_combine", FIT_CHECK_COMBINE))
    except ValueError as exc:
        raise QualityError(str(exc)) from exc
    try:
        coefficients_recipe(**keywords)
    except ValueError as exc:
        raise QualityError(f"coefficients_ft options: {exc}") from exc
    if args.fit_max_side is not None and args.crop is not None and args.fit_max_side < args.crop:
        raise QualityError(f"--fit-max-side {args.fit_max_side} is below the fitting crop --crop {args.crop}")


def check_aggregate_max_side(args: argparse.Namespace) -> None:
    """Refuse an --aggregate-max-side the run cannot mean: under AGGREGATE_MIN_SIDE, or above
    --max-side (the question it answers is aggregating from photos smaller than the ones scored;
    equal to --max-side is the default run)."""
    from npbgpp_core.protocol import AGGREGATE_MIN_SIDE

    side = args.aggregate_max_side
    if side is None:
        return
    if side < AGGREGATE_MIN_SIDE:
        raise QualityError(f"--aggregate-max-side {side} is below {AGGREGATE_MIN_SIDE} pixels")
    if side > args.max_side:
        raise QualityError(f"--aggregate-max-side {side} is above --max-side {args.max_side}: the aggregation reads "
                           "the photos at most at the scoring size; leave it unset for that")


class QualityError(ValueError):
    """A scene or option the benchmark cannot use; the message names it."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", nargs="*", default=[], help="scene folders (any load_scene format)")
    p.add_argument("--scenes-file", default=None, help="a text file with one scene folder per line (# comments)")
    p.add_argument("--format", default=None, help="force a load_scene format (default: detect)")
    p.add_argument("--pc-name", default=None, help="point cloud inside each scene (e.g. points/sfm.ply)")
    p.add_argument("--weights", default=None, help="NPBG++ weights file for every scene (default: per scene the "
                   "bundled file of its domain)")
    p.add_argument("--npbg-weights", default=None, help="NPBG refiner weights file (default: bundled)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--max-side", type=int, default=256, help="long side of every image (default 256)")
    p.add_argument("--max-points", type=int, default=300000, help="subsample clouds above this (seed 123)")
    p.add_argument("--max-test-views", type=int, default=None, help="score at most this many held-out views")
    p.add_argument("--max-input-views", type=int, default=None, help="use at most this many input views (evenly)")
    p.add_argument("--steps", type=int, default=200, help="fitting steps of coefficients_ft and NPBG")
    p.add_argument("--crop", type=crop_arg, default=128,
                   help="fitting crop side, or none: whole views per step (--crops-per-step views each)")
    p.add_argument("--fit-seed", type=int, default=0, help="seed of the fits' random crops (seed-to-seed spread)")
    p.add_argument("--fit-max-side", type=int, default=None,
                   help="long side of the photos the fits see (default: --max-side); aggregation and scoring stay "
                        "at --max-side")
    p.add_argument("--aggregate-max-side", type=int, default=None,
                   help="long side of the input photos NPBG++ aggregates (cameras scaled alike; the no-fitting "
                        "column and the fits' starting scene), at least 16 and at most --max-side (default: "
                        "--max-side); scoring and the fits' photos stay at --max-side / --fit-max-side (a fair "
                        "check aggregates again from the fits' photos)")
    fit = p.add_argument_group("coefficients_ft recipe (unset: the defaults of npbgpp_core.fitting.fit_coefficients)")
    for flag, kind, help_ in FIT_KNOBS:
        fit.add_argument(flag, type=kind, default=None, help=help_)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--label", default=None, help="name of this run in tables (default: the weights file)")
    p.add_argument("--out", default=str(ROOT / "out" / "bench_quality" / "result"), help="output path stem")
    p.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    p.add_argument("--group", action="append", default=[], metavar="NAME=SCENE,SCENE",
                   help="an extra mean row over these scenes (folder names), e.g. env=env_901,env_902 (repeatable)")
    p.add_argument("--table", default=None, metavar="REPORT.json",
                   help="evaluate nothing: print the table of a report this script wrote (older ones too), "
                        "with the --group rows")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    return args


def scene_list(args: argparse.Namespace) -> list[str]:
    """Scene folders from --scenes and --scenes-file, checked to exist."""
    folders = list(args.scenes)
    if args.scenes_file:
        with open(args.scenes_file, encoding="utf-8") as f:
            folders += [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]
    if not folders:
        raise QualityError("no scenes: pass --scenes DIR ... or --scenes-file FILE")
    missing = [d for d in folders if not os.path.isdir(d)]
    if missing:
        raise QualityError(f"scene folders not found: {', '.join(missing)}")
    return folders


def parse_groups(values: list[str]) -> dict[str, list[str]]:
    """``--group NAME=a,b`` values -> {NAME: [a, b]}; QualityError naming a malformed one."""
    groups: dict[str, list[str]] = {}
    for v in values:
        name, sep, names = v.partition("=")
        scenes = [n.strip() for n in names.split(",") if n.strip()]
        if not sep or not name.strip() or not scenes:
            raise QualityError(f"--group {v!r}: expected NAME=SCENE,SCENE (scene folder names)")
        groups[name.strip()] = scenes
    return groups


def group_means(report: dict[str, Any], groups: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Per group: the scenes of the report it covers, the ones it lacks, and their means
    (:func:`averages`)."""
    by_name = {s["scene"]: s for s in report["scenes"]}
    out = {}
    for name, scenes in groups.items():
        present = [n for n in scenes if n in by_name]
        out[name] = {"scenes": present, "missing": [n for n in scenes if n not in by_name],
                     "average": averages([by_name[n] for n in present], report["methods"])}
    return out


def split_views(scene) -> tuple[list[int], list[int]]:
    """(input views, held-out views): the test split, or every 8th view when there is none."""
    n = len(scene.views)
    held = list(scene.test) or list(range(0, n, 8))
    held_set = set(held)
    inputs = [i for i in range(n) if i not in held_set]
    if not inputs or not held:
        raise QualityError(f"{scene.root}: needs at least one input and one held-out view ({n} views)")
    return inputs, held


def held_out_sizes(cameras: list[Any]) -> list[dict[str, Any]]:
    """The distinct sizes ``[h, w]`` of the held-out views' ``cameras`` (as scored, after
    ``--max-side``), each with its number of views, the most common first (ties: the first
    seen): a phone capture's portrait and landscape photos are two sizes, which the report's
    ``size`` (the first held-out view's, kept for older readers) does not show."""
    from collections import Counter

    counts = Counter(tuple(int(n) for n in camera.image_size) for camera in cameras)
    return [{"size": list(hw), "views": n} for hw, n in counts.most_common()]


def raw_points(points, colors, camera, fill):
    """Nearest-point colours (3, H, W); ``fill`` where no point lands."""
    import torch

    from npbgpp_core import rasterize

    index = rasterize(points, camera, scales=(1.0,))[0]
    h, w = index.shape
    out = fill.view(3, 1, 1).expand(3, h, w).clone()
    hit = index >= 0
    out[:, hit] = colors[index[hit]].T
    return out.clamp(0, 1).to(torch.float32)


def evaluate_scene(folder: str, args: argparse.Namespace, weights: dict[str, str]) -> dict[str, Any]:
    """All methods on one scene: per-method mean PSNR / SSIM (+ seconds for the fits)."""
    import numpy as np
    import torch

    from npbgpp_core.datasets import load_scene, scene_domain
    from npbgpp_core.fitting import fit_coefficients, fit_npbg, padded_fit_views, view_psnr
    from npbgpp_core.metrics import mean_finite, psnr, sharpness_ratio, ssim
    from npbgpp_core.models.alignment import alignment_angle, resolve_world_up
    from npbgpp_core.pretrained import default_weights_path, load_pretrained_npbg_refiner, load_pretrained_npbgpp

    options: dict[str, Any] = {}
    if args.pc_name:
        options["pc_name"] = args.pc_name
    t_load = time.perf_counter()
    scene = load_scene(folder, format=args.format, **options)
    if scene.points.shape[0] == 0:
        raise QualityError(f"{folder}: the point cloud is empty")
    if scene.points.shape[0] > args.max_points:
        scene = scene.subsample_points(args.max_points, seed=123)
    inputs, held = split_views(scene)
    if args.max_input_views and len(inputs) > args.max_input_views:
        pick = np.linspace(0, len(inputs) - 1, args.max_input_views).round().astype(int)
        inputs = [inputs[i] for i in sorted(set(pick.tolist()))]
    if args.max_test_views:
        held = held[: args.max_test_views]

    def at_long_side(ids: list[int], max_side: int | None = args.max_side) -> tuple[list, list]:
        """Photos and cameras of views ``ids`` at most ``max_side`` long, as the add-on's Aggregate
        reads them at its Photo Size (SceneData.view_at_long_side, the one rule)."""
        read = [scene.view_at_long_side(i, max_side) for i in ids]
        return [image for image, _ in read], [camera for _, camera in read]

    in_images, in_cams = at_long_side(inputs)
    if args.aggregate_max_side and args.aggregate_max_side != args.max_side:
        agg_images, agg_cams = at_long_side(inputs, args.aggregate_max_side)
    else:
        agg_images, agg_cams = in_images, in_cams
    gts, test_cams = at_long_side(held)
    load_s = time.perf_counter() - t_load
    points = torch.from_numpy(np.ascontiguousarray(scene.points, dtype=np.float32))
    mean_rgb = torch.stack([im.mean(dim=(1, 2)) for im in in_images]).mean(0)
    rgba = any(v.mask_from_alpha for v in scene.views) and scene.background is not None
    fill = torch.tensor(scene.background, dtype=torch.float32) if rgba else mean_rgb

    def scores(preds: list) -> dict[str, Any]:
        rows = [(float(psnr(p.clamp(0, 1), g)[0]), float(ssim(p.clamp(0, 1), g)[0]),
                 float(sharpness_ratio(p.clamp(0, 1), g)[0])) for p, g in zip(preds, gts, strict=True)]
        # sharpness: None when every held-out photo is flat (the ratio is undefined)
        return {"psnr": sum(r[0] for r in rows) / len(rows), "ssim": sum(r[1] for r in rows) / len(rows),
                "sharpness": mean_finite([r[2] for r in rows]), "psnr_views": [r[0] for r in rows]}

    result: dict[str, Any] = {
        "scene": os.path.basename(os.path.normpath(folder)), "folder": os.path.abspath(folder),
        "format": scene.format, "points": int(points.shape[0]), "input_views": len(inputs),
        "held_out_views": len(held), "size": list(test_cams[0].image_size),
        "held_out_sizes": held_out_sizes(test_cams), "load_s": load_s, "methods": {},
        "aggregate_sizes": [list(im.shape[-2:]) for im in agg_images],
    }
    m = result["methods"]
    if "points" in args.methods:
        if scene.colors is None:
            m["points"] = {"skipped": "the point cloud has no colours"}
        else:
            colors = torch.from_numpy(np.ascontiguousarray(scene.colors, dtype=np.float32))
            m["points"] = scores([raw_points(points, colors, c, fill) for c in test_cams])
    if "mean_color" in args.methods:
        m["mean_color"] = scores([mean_rgb.view(3, 1, 1).expand_as(g) for g in gts])
    if "mean_image" in args.methods:
        by_size: dict[tuple[int, int], torch.Tensor] = {}
        for g in gts:
            hw = tuple(g.shape[-2:])
            if hw not in by_size:
                same = [im for im in in_images if tuple(im.shape[-2:]) == hw]
                if not same:  # differently sized photos: resize them to this view's size
                    same = [torch.nn.functional.interpolate(im[None], size=hw, mode="bilinear",
                                                            align_corners=False)[0] for im in in_images]
                by_size[hw] = torch.stack(same).mean(0)
        m["mean_image"] = scores([by_size[tuple(g.shape[-2:])] for g in gts])
    need_model = any(k in args.methods for k in ("npbgpp", "coefficients_ft"))
    if need_model:
        # No --weights: the bundled file of this scene's domain.
        domain = None if weights.get("npbgpp") else scene_domain(scene)
        npbgpp_file = weights.get("npbgpp") or default_weights_path("npbgpp", domain)
        result["weights"], result["domain"] = npbgpp_file, domain
        up = resolve_world_up("auto", [scene.views[i].camera for i in inputs])
        result["world_up"] = list(up)
        # degrees each held-out view is rolled against the up axis (what alignment turns)
        result["held_out_rolls"] = [round(math.degrees(alignment_angle(c, up)), 1) for c in test_cams]
        model = load_pretrained_npbgpp(npbgpp_file, world_up=up)
        result["background"] = model.config.background  # the weights' own option
        t = time.perf_counter()
        with torch.no_grad():
            state = model.begin_scene(points)
            for im, cam in zip(agg_images, agg_cams, strict=True):
                state.add_views(im[None], [cam])
            agg = state.finish()
        agg_s = time.perf_counter() - t
        if "npbgpp" in args.methods:
            m["npbgpp"] = {**scores([model.render(agg, c) for c in test_cams]), "aggregate_s": agg_s}
    if "coefficients_ft" in args.methods or "npbg" in args.methods:
        if args.fit_max_side and args.fit_max_side != args.max_side:
            fit_images, fit_cams = at_long_side(inputs, args.fit_max_side)
            views = padded_fit_views(fit_images, fit_cams)
        else:
            fit_images = in_images
            views = padded_fit_views(in_images, in_cams)
    if "coefficients_ft" in args.methods:
        keywords = fit_keywords(args)
        auto = keywords.get("check_recipes") == "auto"
        if auto:  # the users' default, by the photos the fit sees
            by_size = users_recipes(keywords, [im.shape[-2:] for im in fit_images])
        choosing = bool(keywords.get("check_recipes"))
        # a fair check aggregates again at the side the scene was aggregated at, as a user's fit of a bundle does
        cap = {"aggregate_max_side": args.aggregate_max_side} if args.aggregate_max_side else {}
        fit = fit_coefficients(model, agg, views, steps=args.steps, crop=args.crop, seed=args.fit_seed,
                               keep_candidates=choosing, **cap, **keywords)
        if fit.check is not None and fit.check.kept == "unfitted":
            # what a user then has: the source bundle itself (scene_fit.BundleFit saves it), NPBG++'s render
            preds = [model.render(agg, c) for c in test_cams]
        else:
            preds = [fit.model.render(agg.points, c) for c in test_cams]
        m["coefficients_ft"] = {**scores(preds), "fit_s": fit.seconds, "steps": fit.steps}
        if fit.exposure is not None:  # the per-photo corrections' range (never applied to preds)
            m["coefficients_ft"]["exposure"] = fit.exposure.summary()
        if auto:  # what the size rule decided (None: no check applied, the plain fit)
            m["coefficients_ft"]["recipes_by_size"] = by_size
        if fit.check is not None:
            m["coefficients_ft"]["check"] = {**fit.check.as_dict(), "view_id": None if fit.check.view is None
                                             else inputs[fit.check.view]}
            # every candidate recipe's held-out scores, the ones not chosen too (last: it reloads the model)
            check = m["coefficients_ft"]["check"]
            for cand in check.get("candidates", []):
                fit.model.load_state_dict(fit.candidate_states[cand["recipe"]])
                cand["held_out"] = scores([fit.model.render(agg.points, c) for c in test_cams])
                # the kept photo scored again as the mixes are below (equal to psnr_fitted: one measure)
                cand["psnr_kept"] = view_psnr(fit.model, agg.points, views, fit.check.view)
            if len(check.get("candidates", [])) >= 2 and fit.unfitted_state is not None:
                check["mixes"] = []
                for name, state in check_mixes(fit.unfitted_state, fit.candidate_states).items():
                    fit.model.load_state_dict(state)
                    check["mixes"].append({"mix": name, "psnr_kept": view_psnr(fit.model, agg.points, views,
                                                                               fit.check.view),
                                           "held_out": scores([fit.model.render(agg.points, c) for c in test_cams])})
    if "npbg" in args.methods:
        refiner = load_pretrained_npbg_refiner(weights["npbg_refiner"])
        fit = fit_npbg(points, views, refiner.state, steps=args.steps, crop=args.crop, config=refiner.config,
                       seed=args.fit_seed)
        m["npbg"] = {**scores([fit.model.render(points, c) for c in test_cams]), "fit_s": fit.seconds,
                     "steps": fit.steps}
    return result


def check_mixes(unfitted: dict[str, Any], candidates: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The "soups" a choosing check's states give, by name: the mean of every candidate ("crops+whole"),
    and the unfitted state's mean with each candidate and with all of them ("unfitted+crops",
    "unfitted+whole", "unfitted+crops+whole"); fine-tunes from one start usually share a basin, so
    their mean is a fit too, with no judge needed (npbgpp_core.fitting.average_states)."""
    from npbgpp_core.fitting import average_states

    names = list(candidates)
    mixes = {"+".join(names): average_states([candidates[n] for n in names])} if len(names) >= 2 else {}
    for n in names:
        mixes[f"unfitted+{n}"] = average_states([unfitted, candidates[n]])
    if len(names) >= 2:
        mixes["unfitted+" + "+".join(names)] = average_states([unfitted, *(candidates[n] for n in names)])
    return mixes


def averages(scenes: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Mean PSNR / SSIM / sharpness (and fit seconds) per method over the scenes that have
    it. Reports written before the sharpness column read too (their means have none)."""
    from npbgpp_core.metrics import mean_finite

    out: dict[str, dict[str, Any]] = {}
    for meth in methods:
        rows = [s["methods"][meth] for s in scenes if "psnr" in s["methods"].get(meth, {})]
        if not rows:
            continue
        out[meth] = {"psnr": sum(r["psnr"] for r in rows) / len(rows),
                     "ssim": sum(r["ssim"] for r in rows) / len(rows), "scenes": len(rows)}
        sharp = mean_finite([r.get("sharpness") for r in rows])
        if sharp is not None:
            out[meth]["sharpness"] = sharp
        if all("fit_s" in r for r in rows):
            out[meth]["fit_s"] = sum(r["fit_s"] for r in rows) / len(rows)
    return out


def markdown(report: dict[str, Any]) -> str:
    """Per-scene table, one column per method (PSNR / SSIM / sharpness ratio, the last left
    out for reports that have none), and the average row (with the NPBG++ weights file of
    each scene when the scenes did not all use the same one)."""
    methods = [m for m in report["methods"] if m in report["average"]]
    files = [os.path.basename(s.get("weights", "")).removesuffix(".safetensors") for s in report["scenes"]]
    per_scene = len(set(files)) > 1 or any(s.get("domain") for s in report["scenes"])
    head = ["scene", "views in/out", *(["NPBG++ weights"] if per_scene else []), *[LABELS[m] for m in methods]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def cell(r: dict[str, Any] | None) -> str:
        if not r or "psnr" not in r:
            return "-"
        text = f"{r['psnr']:.2f} / {r['ssim']:.3f}"
        if r.get("sharpness") is not None:
            text += f" / {r['sharpness']:.2f}"
        text += f" ({r['fit_s']:.0f} s)" if "fit_s" in r else ""
        # a checked fit that kept the unfitted scene (its check view scored lower after the fit)
        return text + (" unfitted kept" if (r.get("check") or {}).get("kept") == "unfitted" else "")

    for s, f in zip(report["scenes"], files, strict=True):
        lines.append("| " + " | ".join([s["scene"], f"{s['input_views']}/{s['held_out_views']}",
                                        *([f or "-"] if per_scene else []),
                                        *[cell(s["methods"].get(m)) for m in methods]]) + " |")
    avg = report["average"]
    lines.append("| " + " | ".join([f"**mean of {len(report['scenes'])}**", "", *([""] if per_scene else []),
                                    *[cell(avg.get(m)) for m in methods]]) + " |")
    for name, g in report.get("groups", {}).items():
        what = f"**mean {name}** ({len(g['scenes'])}" + (f" of {len(g['scenes']) + len(g['missing'])})"
                                                           if g["missing"] else ")")
        lines.append("| " + " | ".join([what, "", *([""] if per_scene else []),
                                        *[cell(g["average"].get(m)) for m in methods]]) + " |")
    return "\n".join(lines)


def retabulate(path: str, groups: dict[str, list[str]]) -> str:
    """The table of a report file, means recomputed (reports from before the sharpness
    column have none, and show PSNR / SSIM only), with the group rows."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError) as exc:
        raise QualityError(f"cannot read report {path}: {exc}") from exc
    if not isinstance(report, dict) or not isinstance(report.get("scenes"), list):
        raise QualityError(f"{path}: not a bench_quality report (no 'scenes' list)")
    report.setdefault("methods", list(METHODS))
    report["average"] = averages(report["scenes"], report["methods"])
    report["groups"] = group_means(report, groups)
    return markdown(report)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from npbgpp_core.pretrained import default_weights_path
    from npbgpp_core.protocol import WHOLE_VIEW_MAX_SIDE

    torch.set_num_threads(max(1, args.threads))
    try:
        groups = parse_groups(args.group)
        if args.table:
            print(retabulate(args.table, groups))
            return 0
        folders = scene_list(args)
        check_aggregate_max_side(args)
        check_fit_options(args)
    except QualityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # npbgpp None: per scene, the bundled file of its domain (each scene's result names it).
    weights = {"npbgpp": os.path.abspath(args.weights) if args.weights else None,
               "npbg_refiner": os.path.abspath(args.npbg_weights) if args.npbg_weights
               else default_weights_path("npbg_refiner")}
    label = args.label or (os.path.basename(weights["npbgpp"]) if weights["npbgpp"] else "bundled NPBG++ by domain")
    t0 = time.perf_counter()
    scenes = []
    for folder in folders:
        print(f"{folder} ...", flush=True)
        r = evaluate_scene(folder, args, weights)
        scenes.append(r)
        print("  " + ", ".join(f"{k} {v['psnr']:.2f}" for k, v in r["methods"].items() if "psnr" in v), flush=True)
    report = {
        "label": label, "weights": weights, "methods": args.methods, "max_side": args.max_side,
        "steps": args.steps, "crop": args.crop, "threads": torch.get_num_threads(), "scenes": scenes,
        "average": averages(scenes, args.methods), "seconds": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "pc_name": args.pc_name,
        "fit_options": fit_options(args), "fit_seed": args.fit_seed, "fit_max_side": args.fit_max_side,
        "aggregate_max_side": args.aggregate_max_side or args.max_side,  # the long side aggregation read at most
        "check_view": users_check_view(args), "fair_check": users_fair_check(args),
        "whole_max_side": fit_options(args).get("whole_max_side", WHOLE_VIEW_MAX_SIDE),  # the cap in effect
    }
    report["groups"] = group_means(report, groups)
    from npbgpp_core.atomic import atomic_write_bytes

    table = markdown(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=2)), (".md", table + "\n")):
        atomic_write_bytes(out.with_name(out.name + suffix), text.encode("utf-8"))
    print(f"\n{label}: PSNR dB / SSIM / sharpness ratio on held-out views (long side {args.max_side} px, "
          f"fits {args.steps} steps)")
    print(table)
    print(f"wrote {out}.json and {out}.md ({report['seconds']:.0f} s)")
    if args.record:
        from bench.bench_common import append_benchmarks

        used = weights["npbgpp"] or "per scene by domain: " + ", ".join(
            f"{r['scene']} {os.path.basename(r['weights'])}" for r in scenes if r.get("weights"))
        notes = [f"weights: {label} ({used})", f"long side {args.max_side} px, fits {args.steps} "
                 f"steps at {crop_label(args.crop)}, torch threads {torch.get_num_threads()}",
                 "PSNR dB / SSIM / sharpness on held-out views (test split or every 8th view); sharpness = RMS "
                 "image gradient of the rendering / of the photo (npbgpp_core.metrics.sharpness_ratio: 1 = as "
                 "sharp as the photo, < 1 blurrier, > 1 noisier); (s) = fitting seconds"]
        if args.fit_seed:
            notes.append(f"fit seed {args.fit_seed}")
        if "coefficients_ft" in args.methods:
            notes.append("coefficients_ft checked on a held-apart input view (unfitted scene kept when it lost)"
                         if users_check_view(args) else "coefficients_ft unchecked (--check-view off)")
            if users_fair_check(args):
                notes.append("the check aggregated the scene again without its kept view (--fair-check on)")
        if args.fit_max_side:
            notes.append(f"fits see the photos at long side {args.fit_max_side} px")
        if args.aggregate_max_side:
            notes.append(f"NPBG++ aggregated the input photos at long side {args.aggregate_max_side} px")
        if fit_options(args):
            notes.append("coefficients_ft options: " + ", ".join(f"{k}={v}" for k, v in fit_options(args).items()))
        if args.pc_name:
            notes.append(f"point clouds: {args.pc_name}")
        append_benchmarks(f"bench_quality: {label}", torch.device("cpu"), table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
