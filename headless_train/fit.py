"""``python -m headless_train fit --bundle B.npbgpp --scene S --out F.npbgpp [--steps 200]``:
the short per-scene fit of an aggregated NPBG++ bundle to its dataset's training photos
(:func:`npbgpp_core.scene_fit.fit_bundle`, what the add-on's Fit to Photos runs), without
Blender or Python code. Every output check runs before the fit; the bundle is written
atomically. ``--check-view`` keeps one training photo apart and writes the unfitted scene
if the fit scores more than :data:`~npbgpp_core.fitting.CHECK_TOLERANCE_DB` lower on it; the
last line on stderr says what was kept; ``--check-tolerance DB`` sets that allowance;
without ``--check-recipes`` the users' default decides by the photos' long side (both recipes
averaged within 384-768 px, the plain check otherwise: ``npbgpp_core.protocol.auto_check_recipes``);
``--check-recipes crops`` or ``none`` is the plain check; ``crops,whole`` fits both recipes and keeps
the better one there, with ``--check-combine average`` the mean of both fits instead, checked there as usual."""

from __future__ import annotations

import argparse
import os
import sys

from . import oom


class FitError(RuntimeError):
    """An input the fit command refuses (one line, exit 2)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    from npbgpp_core.fitting import (
        CHECK_COMBINES,
        CHECK_RECIPES,
        CHECK_TOLERANCE_DB,
        WHOLE_VIEW_STEPS,
        split_check_recipes,
    )
    from npbgpp_core.protocol import AUTO_AVERAGE_HIGH_SIDE, AUTO_AVERAGE_LOW_SIDE
    from npbgpp_core.scene_fit import DEFAULT_STEPS

    p = argparse.ArgumentParser(prog="python -m headless_train fit", description=__doc__)
    p.add_argument("--bundle", required=True, help="an aggregated NPBG++ bundle (export of a weights file or "
                   "NPBG++ checkpoint, the add-on's Aggregate)")
    p.add_argument("--scene", required=True, help="the dataset folder the bundle was aggregated from")
    p.add_argument("--out", required=True, help="the fitted bundle to write (.npbgpp)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"fitting steps (default {DEFAULT_STEPS})")
    p.add_argument("--weights", default="", help="NPBG++ weights file for the perceptual loss's encoder "
                   "(default: the file the bundle was exported with, else the bundled one of its domain)")
    p.add_argument("--format", default=None, help="dataset format (default: detected)")
    p.add_argument("--undistort", action="store_true", help="distorted COLMAP / nerfstudio cameras (as export)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.add_argument("--check-view", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the middle training photo apart, fit on the others and write the unfitted scene "
                   "if the fit scores more than --check-tolerance dB lower on it (needs 3 photos or more; "
                   "default: npbgpp_core.fitting.FIT_CHECK_VIEW)")
    p.add_argument("--check-tolerance", type=float, default=None, metavar="DB",
                   help="how many dB the fit may score below the unfitted scene on the photo --check-view keeps "
                   f"apart and still be kept: a finite number >= 0, 0 drops any loss (default {CHECK_TOLERANCE_DB})")
    # names checked in fit() by the core's rule, in the flags' words (argparse would turn a ValueError into its
    # own "invalid value")
    p.add_argument("--check-recipes", type=split_check_recipes, default=None, metavar="NAMES",
                   help=f"comma-separated recipes from {','.join(CHECK_RECIPES)}: fit each (crops: --steps steps of "
                   f"crops; whole: {WHOLE_VIEW_STEPS} steps of whole photos) on the photos less the one --check-view "
                   "keeps apart and keep the one scoring best there, then check it as usual; none or crops: the "
                   "plain check (crops alone). Default (flag left out, no --check-combine): by the photos' long "
                   f"side, both recipes averaged within {AUTO_AVERAGE_LOW_SIDE}-{AUTO_AVERAGE_HIGH_SIDE} px "
                   "(about 2x the fit time or more: the whole-view steps grow with the pixels), the plain check "
                   "otherwise; the last line says when it averaged (BENCHMARKS.md)")
    p.add_argument("--check-combine", choices=CHECK_COMBINES, default=None,
                   help="with --check-recipes of 2 or more: choose keeps the recipe scoring best on the kept photo "
                   "(default); average keeps the element-wise mean of every recipe's fit, scored and checked there "
                   "as usual (see BENCHMARKS.md); given without --check-recipes: no recipes (the plain check), as "
                   "before the size rule")
    p.add_argument("--photo-exposure", action="store_true",
                   help="learn a per-channel gain and offset for each training photo, applied to the render in "
                   "the fit's loss only (mean gain 1, offset 0 over the photos), so that photos of different "
                   "exposure do not pull the shared scene; the bundle renders without them, its metadata records "
                   "their range (off by default: measured on one capture, BENCHMARKS.md)")
    oom.add_debug_flag(p)
    return p.parse_args(argv)


def fit(args: argparse.Namespace) -> str:
    """Fit and write ``args.out``; returns its path."""
    import torch

    from npbgpp_core.atomic import check_output_file, check_output_suffix, same_file
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.datasets.scene_data import scene_input_at
    from npbgpp_core.fitting import CHECK_TOLERANCE_DB, FIT_CHECK_COMBINE, CheckOptionNames, checked_fit_options
    from npbgpp_core.scene_fit import BundleFit, check_steps, users_check

    check_steps(args.steps)
    check_view, fair_check = users_check(args.check_view, None)
    # the core's rules for the check's options, refused now (before the scene is read) in the
    # flags' words; BundleFit checks them again with the same function
    flags = CheckOptionNames(check_view_on="--check-view" + (", not --no-check-view" if args.check_view is False
                                                             else ""),
                             check_tolerance="--check-tolerance", check_recipes="--check-recipes",
                             check_combine="--check-combine")
    # only here can a flag given at the default be told from none: it too would be ignored without
    # the check, so any --check-tolerance is refused then, in the one message of the core's rule
    checked_fit_options(check_view, fair_check,
                        CHECK_TOLERANCE_DB if args.check_tolerance is None else args.check_tolerance,
                        () if args.check_recipes is None else args.check_recipes, flags,
                        FIT_CHECK_COMBINE if args.check_combine is None else args.check_combine,
                        tolerance_given=args.check_tolerance is not None)
    check_output_suffix(args.out, ".npbgpp")
    if os.path.exists(args.out) and same_file(args.out, args.bundle):
        raise FitError(f"--out {args.out} is the --bundle it fits; write the fitted bundle to another file")
    check_output_file(args.out, "fitted.npbgpp")
    # the bundle holds the points: the dataset gives photos and cameras, its cloud is not needed
    # (as the add-on's Fit to Photos reads it; several .ply files or none are no error)
    scene = load_scene(args.scene, format=args.format, require_points=False,
                       **({"undistort": True} if args.undistort else {}))
    replaced = scene_input_at(scene, args.out, (".npbgpp",))
    if replaced is not None:
        raise FitError(f"--out {args.out} is an input of the scene ({replaced}); write the bundle to another file")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = device  # the device the out-of-memory message names
    oom.step(f"loading the bundle {args.bundle} and the photos", photos_advice(scene))
    # both left out: the users' default (BundleFit decides by the photos' size); a --check-combine alone
    # keeps its meaning from before the size rule (BundleFit reads check_recipes None then as no recipes:
    # choose is the plain check, average refused)
    job = BundleFit(args.bundle, scene, args.steps, args.weights, "", device, check_view=args.check_view,
                    check_tolerance=args.check_tolerance, check_recipes=args.check_recipes,
                    check_combine=args.check_combine, photo_exposure=args.photo_exposure)
    # a checked fit counts its two scoring renders as steps (and a choosing check every recipe's
    # steps); the line names a scoring render while it runs
    # (BundleFit.doing: a full-size photo's render can take as long as many fitting steps)
    width = 0
    advice = photos_advice(scene)
    try:
        while True:
            line = f"step {job.done}/{job.total}" + (f", {job.doing}" if job.doing else "")
            oom.step(f"fitting, {line}", advice)
            print("\r" + line.ljust(width), end="", file=sys.stderr, flush=True)
            width = len(line)
            if job.step():
                break
    finally:
        print(file=sys.stderr)  # ends the step line, also before a failing step's error line
    oom.step(f"writing {args.out}", "")
    job.save(args.out)
    losses = job.result.losses
    # a checked fit trained on every photo but the one it kept apart
    views = f"{job.views - 1} of {job.views} views (one kept apart)" if job.checked else f"{job.views} views"
    loss = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    raw = job.result.check
    if raw is not None and len(raw.candidates) > 1:
        # the seconds all the fits', the steps and losses one fit's: the chosen one, or an average's first
        did, which = ("averaged them", raw.candidates[0].recipe) if raw.averaged else ("chose one", raw.chosen)
        print(f"fitted {views}, {job.result.steps_in_all} steps in {job.result.seconds:.1f} s over "
              f"{len(raw.candidates)} recipes and {did} (the {which} fit: {job.result.steps} steps, {loss})",
              file=sys.stderr)
    else:
        print(f"fitted {views}, {job.result.steps} steps in {job.result.seconds:.1f} s ({loss})", file=sys.stderr)
    print(job.outcome(), file=sys.stderr)
    if job.result.exposure is not None:
        e = job.result.exposure.summary()
        print(f"per-photo exposure (in the fit's loss only): gains {min(e['gain_min']):.3f}-{max(e['gain_max']):.3f}, "
              f"offsets {min(e['offset_min']) * 255:+.1f} to {max(e['offset_max']) * 255:+.1f} /255 over "
              f"{e['photos']} photos", file=sys.stderr)
    return os.path.abspath(args.out)


def photos_advice(scene) -> str:
    """What needs less memory in a fit: it holds every training photo at its own size, so a
    dataset with smaller photos (which needs its own bundle: a bundle fits the dataset it was
    aggregated from)."""
    from npbgpp_core.image_size import SMALLER_PHOTOS_COMMAND
    from npbgpp_core.memory import FIT_PHOTOS_MEMORY

    size = scene.largest_image_size(list(scene.train) or list(range(len(scene.views))))
    largest = "" if size is None else f"the largest here is {size[1]}x{size[0]} px; "
    return (f"the fit holds every training photo at its own size ({largest}{FIT_PHOTOS_MEMORY}): make a copy of the "
            f"dataset with smaller photos (a COLMAP capture: {SMALLER_PHOTOS_COMMAND}), export a bundle of it and fit "
            "that one")


def main(argv: list[str]) -> int:
    """0 on success, 2 with a one-line message on bad input or when memory runs out (what ran
    out, during which step, what to do: :mod:`headless_train.oom`)."""
    args = parse_args(argv)
    oom.reset()

    def body() -> int:
        print(fit(args))
        return 0

    # DatasetError and the bundle's errors are ValueErrors
    return oom.run_command(body, (FitError, OSError, ValueError), args.debug, args.device)
