"""``python -m headless_train fit``: the library's bundle fit (fit_bundle) from the command
line, with every output refusal made before the fit starts."""

from __future__ import annotations

import inspect
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _train_fixtures import kept_photo_scores, make_tiny_scene, scores_in_turn, tiny_scene_and_bundle  # noqa: E402


@pytest.fixture(scope="module")
def scene_and_bundle(tmp_path_factory):
    return tiny_scene_and_bundle(str(tmp_path_factory.mktemp("fit")), views=4, splits=(3, 0, 1))


def test_fit_command_writes_what_fit_bundle_writes(scene_and_bundle, tmp_path):
    from headless_train.fit import main
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.scene_fit import fit_bundle

    folder, bundle = scene_and_bundle
    out = str(tmp_path / "fitted.npbgpp")
    assert main(["--bundle", bundle, "--scene", folder, "--out", out, "--steps", "2", "--device", "cpu",
                 "--no-check-view"]) == 0  # the fitted path; the check: the test below
    fitted = NeuralScene.load(out)
    assert fitted.kind != "npbgpp" and fitted.metadata["fit"]["steps"] == 2
    assert fitted.metadata["fit"]["views"] == 3  # the training views only: the held-out one stays unseen
    reference = str(tmp_path / "reference.npbgpp")
    fit_bundle(bundle, folder, reference, steps=2, check_view=False)
    expected = NeuralScene.load(reference)
    assert torch.equal(fitted.features, expected.features)
    assert torch.equal(fitted.points, expected.points)


def test_fit_command_refuses_bad_outputs_before_fitting(scene_and_bundle, tmp_path, monkeypatch, capsys):
    from headless_train import fit as fit_cli
    from npbgpp_core import scene_fit

    folder, bundle = scene_and_bundle
    with open(bundle, "rb") as f:
        original = f.read()

    def no_fit(*args, **kwargs):
        raise AssertionError("the fit started before the refusal")

    monkeypatch.setattr(scene_fit, "BundleFit", no_fit)
    link = str(tmp_path / "link.npbgpp")
    os.symlink(bundle, link)
    for out, message in ((bundle, "is the --bundle"), (link, "is the --bundle"),
                         (str(tmp_path / "fitted.ply"), "must end with .npbgpp"),
                         (str(tmp_path / "missing" / "fitted.npbgpp"), "does not exist")):
        assert fit_cli.main(["--bundle", bundle, "--scene", folder, "--out", out, "--steps", "2"]) == 2
        assert message in capsys.readouterr().err
    assert fit_cli.main(["--bundle", bundle, "--scene", folder, "--out", str(tmp_path / "a.npbgpp"),
                         "--steps", "0"]) == 2
    assert "fit steps must be" in capsys.readouterr().err
    with open(bundle, "rb") as f:
        assert f.read() == original


def test_fit_needs_no_cloud_of_the_dataset(tmp_path):
    """The bundle holds the points, the dataset only photos and cameras (as the add-on's Fit
    to Photos reads it): a folder whose cloud the loader cannot tell (two .ply files, no
    default name) or that has none fits all the same, on the command line and in fit_bundle."""
    import shutil

    from headless_train.export import main as export_main
    from headless_train.fit import main
    from npbgpp_core.datasets import DatasetError, load_scene
    from npbgpp_core.pretrained import default_weights_path
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.scene_fit import fit_bundle

    several = make_tiny_scene(str(tmp_path / "several"), views=4, size=24, n_points=300, splits=(3, 0, 1))
    bundle = str(tmp_path / "several.npbgpp")
    assert export_main(["--checkpoint", default_weights_path("npbgpp", "object"), "--scene", several,
                        "--out", bundle]) == 0
    os.rename(os.path.join(several, "points3d.ply"), os.path.join(several, "a.ply"))
    shutil.copyfile(os.path.join(several, "a.ply"), os.path.join(several, "b.ply"))
    with pytest.raises(DatasetError, match="several point clouds"):
        load_scene(several)  # the case at hand
    out = str(tmp_path / "fitted.npbgpp")
    assert main(["--bundle", bundle, "--scene", several, "--out", out, "--steps", "1", "--device", "cpu"]) == 0
    assert NeuralScene.load(out).metadata["fit"]["steps"] == 1
    for name in ("a.ply", "b.ply"):
        os.remove(os.path.join(several, name))
    assert fit_bundle(bundle, several, str(tmp_path / "library.npbgpp"), steps=1).steps == 1


def test_fit_command_check_view_prints_and_records_what_it_kept(scene_and_bundle, tmp_path, monkeypatch, capsys):
    """--check-view: a fit driven to lose (to the inverted photos) on the photo kept apart writes the
    unfitted scene (the source bundle's features, kind 'npbgpp') and says so in one line that
    names the photo and the gap the metadata record; --no-check-view fits unchecked."""
    from headless_train.fit import main
    from npbgpp_core import fitting
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.scene import NeuralScene

    folder, bundle = scene_and_bundle
    monkeypatch.setattr(fitting, "coefficients_ft_loss", lambda *a, **k: lambda p, t, m: (p - (1 - t)).abs().mean())
    out = str(tmp_path / "checked.npbgpp")
    capsys.readouterr()
    assert main(["--bundle", bundle, "--scene", folder, "--out", out, "--steps", "20", "--device", "cpu",
                 "--check-view"]) == 0
    err = capsys.readouterr().err
    saved, source = NeuralScene.load(out), NeuralScene.load(bundle)
    check = saved.metadata["fit"]["check"]
    data = load_scene(folder, require_points=False)
    assert check["kept"] == "unfitted" and check["name"] == data.views[list(data.train)[1]].name
    assert saved.kind == "npbgpp" and torch.equal(saved.features, source.features)
    gap = check["psnr_unfitted"] - check["psnr_fitted"]
    line = [ln for ln in err.splitlines() if ln.startswith("kept the unfitted scene")]
    assert len(line) == 1 and line[0].endswith(f"dB below it (more than the 0.50 dB the check allows) on held-apart "
                                               f"photo {check['name']}")
    assert "fitted 2 of 3 views (one kept apart), 20 steps in " in err  # the photo kept apart is not fitted
    # the progress line names the two scoring steps while they run, and only them
    assert "step 0/22, scoring the kept photo" in err and "step 21/22, scoring the kept photo" in err
    assert "step 1/22 " in err and err.count("scoring the kept photo") == 2
    assert float(line[0].split("scored ")[1].split(" dB")[0]) == pytest.approx(gap, abs=0.006)
    plain = str(tmp_path / "plain.npbgpp")
    assert main(["--bundle", bundle, "--scene", folder, "--out", plain, "--steps", "2", "--device", "cpu",
                 "--no-check-view"]) == 0
    assert "check" not in NeuralScene.load(plain).metadata["fit"]
    err = capsys.readouterr().err
    assert "the fit was not checked on a photo kept apart" in err and "fitted 3 views, 2 steps in " in err
    assert "step 1/2" in err and "scoring" not in err


@pytest.mark.parametrize(("unfitted", "fitted", "tolerance", "kept"), [
    (20.0, 19.0, None, "unfitted"),    # 1 dB lost: more than the default 0.5 dB
    (20.0, 19.0, "0.75", "unfitted"),  # more than 0.75 dB
    (20.0, 19.0, "1", "fitted"),       # exactly the tolerance (exact in binary): kept
    (20.0, 19.0, "1.25", "fitted"),
    (20.0, 19.75, None, "fitted"),     # 0.25 dB lost: within the default
    (20.0, 19.75, "0", "unfitted"),    # no tolerance: any loss drops the fit
])
def test_fit_command_check_tolerance_decides_and_is_recorded(scene_and_bundle, tmp_path, monkeypatch, capsys,
                                                            unfitted, fitted, tolerance, kept):
    """--check-tolerance DB: a fit whose kept-photo scores are set here (its loss there known
    exactly) is kept or dropped on either side of the tolerance; the bundle written is the fit or
    the source bundle, its metadata record the tolerance, the last line names it."""
    from headless_train.fit import main
    from npbgpp_core import fitting
    from npbgpp_core.scene import NeuralScene

    folder, bundle = scene_and_bundle
    monkeypatch.setattr(fitting, "view_psnr", kept_photo_scores(unfitted, fitted))
    out = str(tmp_path / "fitted.npbgpp")
    flag = [] if tolerance is None else ["--check-tolerance", tolerance]
    capsys.readouterr()
    assert main(["--bundle", bundle, "--scene", folder, "--out", out, "--steps", "1", "--device", "cpu",
                 *flag]) == 0
    saved = NeuralScene.load(out)
    allowed = fitting.CHECK_TOLERANCE_DB if tolerance is None else float(tolerance)
    check = saved.metadata["fit"]["check"]
    assert check["kept"] == kept and check["tolerance_db"] == allowed
    assert (check["psnr_unfitted"], check["psnr_fitted"]) == (unfitted, fitted)
    assert (saved.kind == "npbgpp") == (kept == "unfitted")
    if kept == "unfitted":
        assert torch.equal(saved.features, NeuralScene.load(bundle).features)
    last = capsys.readouterr().err.splitlines()[-1]
    if allowed:
        assert f"the {allowed:.2f} dB the check allows" in last
    assert last.startswith("kept the fit: -" if kept == "fitted" else "kept the unfitted scene: ")


def refused_before_fitting(scene_and_bundle, tmp_path, monkeypatch) -> tuple[list[str], str]:
    """The fit command's arguments for ``scene_and_bundle`` writing to a file in ``tmp_path``,
    with ``BundleFit`` made to fail the test if a fit starts (a refusal must come first); the
    arguments and that output path."""
    from npbgpp_core import scene_fit

    folder, bundle = scene_and_bundle

    def no_fit(*args, **kwargs):
        raise AssertionError("the fit started before the refusal")

    monkeypatch.setattr(scene_fit, "BundleFit", no_fit)
    out = str(tmp_path / "fitted.npbgpp")
    return ["--bundle", bundle, "--scene", folder, "--out", out, "--steps", "2"], out


def test_fit_command_refuses_a_bad_check_tolerance_before_fitting(scene_and_bundle, tmp_path, monkeypatch, capsys):
    """A negative or non-finite --check-tolerance is refused by the library's rule in the flag's
    words (not the keyword check_tolerance), and any tolerance with --no-check-view (no photo is
    kept apart to apply it to), the default too, in one message; exit 2, before the fit, nothing written. --help shows
    the default."""
    from headless_train import fit as fit_cli
    from npbgpp_core.fitting import CHECK_TOLERANCE_DB, check_tolerance_db

    run, out = refused_before_fitting(scene_and_bundle, tmp_path, monkeypatch)
    for value in ("-0.1", "nan", "inf", "-inf"):
        with pytest.raises(ValueError) as core:
            check_tolerance_db(float(value))
        assert str(core.value).startswith("check_tolerance must be a finite number of dB >= 0, got ")
        assert fit_cli.main([*run, f"--check-tolerance={value}"]) == 2
        assert capsys.readouterr().err == f"error: --{str(core.value).replace('_', '-')}\n"
    # any tolerance given with --no-check-view, the default too (ignored all the same, and only the command
    # can tell it from no flag): the core's rule, one message in the flags' words
    for value in ("1", str(CHECK_TOLERANCE_DB)):
        assert fit_cli.main([*run, "--no-check-view", "--check-tolerance", value]) == 2
        assert capsys.readouterr().err == (f"error: --check-tolerance {float(value)!r} is how many dB the fit may "
                                           "lose on the view a check keeps apart; without the check no view is kept "
                                           "apart: it needs --check-view, not --no-check-view\n")
    with pytest.raises(SystemExit) as bad:
        fit_cli.main([*run, "--check-tolerance", "half"])
    assert bad.value.code == 2 and "--check-tolerance: invalid float value: 'half'" in capsys.readouterr().err
    assert not os.path.exists(out) and os.listdir(tmp_path) == []
    with pytest.raises(SystemExit):
        fit_cli.parse_args(["--help"])
    assert f"(default {CHECK_TOLERANCE_DB})" in " ".join(capsys.readouterr().out.split())


def test_fit_command_check_recipes_keeps_the_whole_view_fit_when_it_scores_best(scene_and_bundle, tmp_path,
                                                                              monkeypatch, capsys):
    """--check-recipes crops,whole with the whole-view fit scoring best on the kept photo: the
    bundle written is, bit for bit, the whole-view recipe fitted alone (as the choice's other
    candidate it starts from the unfitted scene with the same seed), its metadata name the
    recipe and both candidates, the progress counts both fits' steps, the line of the fit says its
    steps and losses are the chosen one's and the last line names the recipe."""
    from headless_train.fit import main
    from npbgpp_core import fitting
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.scene_fit import fit_bundle

    folder, bundle = scene_and_bundle
    monkeypatch.setattr(fitting, "view_psnr", scores_in_turn(20.0, 19.0, 21.9))
    out = str(tmp_path / "fitted.npbgpp")
    capsys.readouterr()
    assert main(["--bundle", bundle, "--scene", folder, "--out", out, "--steps", "2", "--device", "cpu",
                 "--check-recipes", "crops,whole"]) == 0
    err = capsys.readouterr().err
    total = 2 + fitting.WHOLE_VIEW_STEPS + 2  # both fits' steps and the two scoring renders
    assert f"step {total - 1}/{total}, scoring the kept photo" in err
    saved = NeuralScene.load(out)
    check = saved.metadata["fit"]["check"]
    assert check["kept"] == "fitted" and check["recipe"] == "whole"
    assert [(c["recipe"], c["psnr_fitted"], c["steps"]) for c in check["candidates"]] == [
        ("crops", 19.0, 2), ("whole", 21.9, fitting.WHOLE_VIEW_STEPS)]
    fit = saved.metadata["fit"]
    assert fit["steps"] == fitting.WHOLE_VIEW_STEPS
    assert err.splitlines()[-1] == f"kept the fit (whole views): +1.90 dB on held-apart photo {check['name']}"
    # the line before counts both recipes' steps and says its steps and losses are the chosen fit's
    assert re.fullmatch(rf"fitted 2 of 3 views \(one kept apart\), {2 + fitting.WHOLE_VIEW_STEPS} steps in [0-9.]+ s "
                        rf"over 2 recipes and chose one \(the whole fit: {fitting.WHOLE_VIEW_STEPS} steps, loss "
                        rf"{fit['loss_first']:.4f} -> {fit['loss_last']:.4f}\)", err.splitlines()[-2]), err
    monkeypatch.setattr(fitting, "view_psnr", scores_in_turn(20.0, 21.9))
    reference = str(tmp_path / "whole_alone.npbgpp")
    fit_bundle(bundle, folder, reference, steps=2, check_view=True, check_recipes=("whole",))
    assert torch.equal(saved.features, NeuralScene.load(reference).features)
    assert saved.model_state.keys() == NeuralScene.load(reference).model_state.keys()
    for name, value in NeuralScene.load(reference).model_state.items():
        assert torch.equal(saved.model_state[name], value), name


def test_fit_command_without_check_recipes_records_no_choice(scene_and_bundle, tmp_path, monkeypatch, capsys):
    """By default the check fits the crop recipe alone, as before: no recipe in the metadata or
    the last line, the progress counting its own steps only."""
    from headless_train.fit import main
    from npbgpp_core import fitting
    from npbgpp_core.scene import NeuralScene

    folder, bundle = scene_and_bundle
    monkeypatch.setattr(fitting, "view_psnr", scores_in_turn(20.0, 21.0))
    out = str(tmp_path / "fitted.npbgpp")
    capsys.readouterr()
    assert main(["--bundle", bundle, "--scene", folder, "--out", out, "--steps", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    check = NeuralScene.load(out).metadata["fit"]["check"]
    assert "recipe" not in check and "candidates" not in check and "step 3/4" in err
    assert err.splitlines()[-1] == f"kept the fit: +1.00 dB on held-apart photo {check['name']}"


def test_fit_command_refuses_bad_check_recipes_before_fitting(scene_and_bundle, tmp_path, monkeypatch, capsys):
    """Unknown or repeated --check-recipes names, and --check-recipes with --no-check-view (no
    photo kept apart to choose on), are refused by the core's rule in the flags' words (not the
    keywords check_recipes, check_view=True) in one line; exit 2, before the fit, nothing written."""
    from headless_train import fit as fit_cli
    from npbgpp_core.fitting import coefficients_recipe

    run, out = refused_before_fitting(scene_and_bundle, tmp_path, monkeypatch)
    for value, names, check_view, expected in (
            ("crops,wide", ("crops", "wide"), True, "--check-recipes: unknown recipe(s) ['wide']; choose from "),
            ("whole,whole", ("whole", "whole"), True, "--check-recipes names a recipe twice: ['whole', 'whole']"),
            ("", ("",), True, "--check-recipes: unknown recipe(s) ['']; choose from "),
            ("crops,whole", ("crops", "whole"), False,
             "--check-recipes chooses a recipe on a view kept apart: it needs --check-view, not --no-check-view")):
        with pytest.raises(ValueError) as core:  # the library's rule, in its keywords' words
            coefficients_recipe(check_view=check_view, check_recipes=names)
        assert str(core.value).startswith("check_recipes") and "--" not in str(core.value)
        flags = [] if check_view else ["--no-check-view"]
        assert fit_cli.main([*run, *flags, f"--check-recipes={value}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {expected}") and err.count("\n") == 1
        assert "check_recipes" not in err and "check_view" not in err
    assert str(core.value).endswith("it needs check_view=True")
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_fit_command_refuses_check_combine_average_without_two_recipes(scene_and_bundle, tmp_path, monkeypatch,
                                                                     capsys):
    """--check-combine average without --check-recipes, with one recipe or with --no-check-view is
    refused by the core's rule in the flags' words (not the keywords check_combine, check_recipes), and
    a name not in CHECK_COMBINES by argparse; exit 2, before the fit, nothing written."""
    from headless_train import fit as fit_cli
    from npbgpp_core.fitting import coefficients_recipe

    run, out = refused_before_fitting(scene_and_bundle, tmp_path, monkeypatch)
    for flags, names, check_view in (([], (), True), (["--check-recipes", "whole"], ("whole",), True),
                                     (["--no-check-view", "--check-recipes", "crops,whole"], ("crops", "whole"),
                                      False)):
        with pytest.raises(ValueError) as core:  # the library's rule, in its keywords' words
            coefficients_recipe(check_view=check_view, check_recipes=names, check_combine="average")
        assert str(core.value).startswith("check_") and "--" not in str(core.value)
        assert fit_cli.main([*run, *flags, "--check-combine", "average"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --check-") and err.count("\n") == 1, err
        assert "check_combine" not in err and "check_recipes" not in err and "check_view" not in err
        if check_view:
            assert err.startswith("error: --check-combine average takes the mean of the fits of the recipes "
                                  "--check-recipes names: it needs --check-recipes with 2 or more"), err
    with pytest.raises(SystemExit) as bad:
        fit_cli.main([*run, "--check-recipes", "crops,whole", "--check-combine", "mean"])
    assert bad.value.code == 2 and "--check-combine: invalid choice: 'mean'" in capsys.readouterr().err
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_fit_command_check_combine_average_writes_the_mean_of_both_recipes(scene_and_bundle, tmp_path,
                                                                         monkeypatch, capsys):
    """--check-recipes crops,whole --check-combine average: the bundle written holds, bit for bit, the
    element-wise mean of the two recipes fitted alone (each from the unfitted scene, same seed; their
    states from a choosing check's keep_candidates), its metadata and last line name the average."""
    from headless_train.fit import main
    from npbgpp_core import fitting
    from npbgpp_core.scene import NeuralScene

    folder, bundle = scene_and_bundle
    kept_states: dict = {}
    real_fit = fitting._checked_steps

    def keeping(*args, **kwargs):  # the same check, its candidates' states kept for the reference
        # bound by name, so that the real function's parameter order is no part of this test
        bound = inspect.signature(real_fit).bind(*args, **kwargs)
        bound.arguments["keep_candidates"] = True
        result = yield from real_fit(*bound.args, **bound.kwargs)
        kept_states.update(result.candidate_states)
        return result

    monkeypatch.setattr(fitting, "_checked_steps", keeping)
    monkeypatch.setattr(fitting, "view_psnr", scores_in_turn(20.0, 19.0, 19.5, 20.3))
    out = str(tmp_path / "fitted.npbgpp")
    capsys.readouterr()
    assert main(["--bundle", bundle, "--scene", folder, "--out", out, "--steps", "2", "--device", "cpu",
                 "--check-recipes", "crops,whole", "--check-combine", "average"]) == 0
    err = capsys.readouterr().err
    saved = NeuralScene.load(out)
    check = saved.metadata["fit"]["check"]
    assert check["kept"] == "fitted" and check["recipe"] == "average" and check["combine"] == "average"
    assert check["psnr_fitted"] == 20.3 and [c["psnr_fitted"] for c in check["candidates"]] == [19.0, 19.5]
    assert err.splitlines()[-1] == ("kept the fit (average of crops and whole views): +0.30 dB on held-apart photo "
                                    f"{check['name']}")
    # the line before counts both recipes' steps (2 + WHOLE_VIEW_STEPS), its steps and losses the crops fit's
    fit = saved.metadata["fit"]
    assert re.fullmatch(rf"fitted 2 of 3 views \(one kept apart\), {2 + fitting.WHOLE_VIEW_STEPS} steps in [0-9.]+ s "
                        rf"over 2 recipes and averaged them \(the crops fit: 2 steps, loss {fit['loss_first']:.4f} -> "
                        rf"{fit['loss_last']:.4f}\)", err.splitlines()[-2]), err.splitlines()[-2]
    assert fit["steps"] == 2 and check["candidates"][0]["steps"] == 2
    mean = fitting.average_states([kept_states["crops"], kept_states["whole"]])
    assert torch.equal(saved.features, mean["descriptors"])
    assert not torch.equal(saved.features, kept_states["crops"]["descriptors"])
    assert set(saved.model_state) == set(mean) - {"descriptors", "active"}
    for name, value in saved.model_state.items():
        assert torch.equal(value, mean[name]), name


def test_fit_command_without_check_recipes_averages_both_recipes_by_photo_size(scene_and_bundle, tmp_path,
                                                                               monkeypatch, capsys):
    """No --check-recipes: the users' default by the photos' long side (24 px here; the range made
    tiny so that the test stays fast): within it both recipes averaged, the metadata and the last
    line saying the size rule chose them; outside it the plain check, the metadata saying why;
    --check-recipes none / crops opt out (the plain check, no size rule recorded) inside the range."""
    from headless_train.fit import main
    from npbgpp_core import fitting, protocol
    from npbgpp_core.scene import NeuralScene

    folder, bundle = scene_and_bundle
    run = ["--bundle", bundle, "--scene", folder, "--steps", "2", "--device", "cpu"]
    monkeypatch.setattr(protocol, "AUTO_AVERAGE_LOW_SIDE", 24)
    monkeypatch.setattr(protocol, "AUTO_AVERAGE_HIGH_SIDE", 30)
    monkeypatch.setattr(fitting, "view_psnr", scores_in_turn(20.0, 19.0, 19.5, 20.3))
    out = str(tmp_path / "averaged.npbgpp")
    capsys.readouterr()
    assert main([*run, "--out", out]) == 0
    err = capsys.readouterr().err
    fit = NeuralScene.load(out).metadata["fit"]
    assert fit["check"]["recipe"] == "average" and [c["recipe"] for c in fit["check"]["candidates"]] == [
        "crops", "whole"]
    assert fit["recipes_by_size"] == {"long_side": 24, "range": [24, 30], "recipes": ["crops", "whole"],
                                      "combine": "average"}
    assert f"step {2 + fitting.WHOLE_VIEW_STEPS + 1}/{2 + fitting.WHOLE_VIEW_STEPS + 2}" in err
    assert err.splitlines()[-1] == (f"kept the fit (average of crops and whole views): +0.30 dB on held-apart photo "
                                    f"{fit['check']['name']}; both recipes averaged: photos 24 px, within the 24-30 "
                                    "px range where the size rule averages them")
    for flags in (["--check-recipes", "none"], ["--check-recipes", "crops"], ["--check-combine", "choose"]):
        monkeypatch.setattr(fitting, "view_psnr", scores_in_turn(20.0, 21.0))
        out = str(tmp_path / f"plain_{flags[1]}.npbgpp")
        assert main([*run, "--out", out, *flags]) == 0
        err = capsys.readouterr().err
        fit = NeuralScene.load(out).metadata["fit"]
        # crops alone: a choosing check of one candidate, which fits as the plain check does
        recipes = [c["recipe"] for c in fit["check"].get("candidates", [])]
        assert "recipes_by_size" not in fit and recipes in ([], ["crops"]) and "step 3/4" in err, flags
        assert err.splitlines()[-1].endswith(f": +1.00 dB on held-apart photo {fit['check']['name']}"), flags
        assert "averaged" not in err, flags
    monkeypatch.setattr(protocol, "AUTO_AVERAGE_LOW_SIDE", 25)  # 24 px photos now below the range
    monkeypatch.setattr(fitting, "view_psnr", scores_in_turn(20.0, 21.0))
    out = str(tmp_path / "below.npbgpp")
    assert main([*run, "--out", out]) == 0
    err = capsys.readouterr().err
    fit = NeuralScene.load(out).metadata["fit"]
    assert fit["recipes_by_size"] == {"long_side": 24, "range": [25, 30], "recipes": [], "combine": "choose"}
    assert "candidates" not in fit["check"] and "step 3/4" in err
    assert err.splitlines()[-1] == f"kept the fit: +1.00 dB on held-apart photo {fit['check']['name']}"
