"""The users' default for a checked fit (issue #11): both check recipes averaged when the fitting
photos' long side is within protocol.AUTO_AVERAGE_LOW_SIDE..AUTO_AVERAGE_HIGH_SIDE, the plain check
otherwise; decided by the library's BundleFit / fit_bundle once the photos are read, recorded in the
fitted bundle's metadata and the outcome line. (The command line's and the add-on's and bench's
entry points: their own test files.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _train_fixtures import make_tiny_scene, scores_in_turn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_check_recipes_by_long_side_with_the_real_range():
    """384..768 px inclusive averages both recipes (hand-computed edges), anything else the plain
    check with the core's default combine; the module stays torch-free."""
    from npbgpp_core import protocol

    assert (protocol.AUTO_AVERAGE_LOW_SIDE, protocol.AUTO_AVERAGE_HIGH_SIDE) == (384, 768)
    averaged = (("crops", "whole"), "average")
    plain = ((), "choose")
    for side, expected in ((256, plain), (383, plain), (384, averaged), (512, averaged), (768, averaged),
                           (769, plain), (1024, plain)):
        assert protocol.auto_check_recipes(side) == expected, side
    code = "import sys; import npbgpp_core.protocol as P; print(P.auto_check_recipes(500), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "(('crops', 'whole'), 'average') False"


def test_users_check_recipes_takes_the_largest_photo_side_and_needs_the_check():
    """The photos' own sizes decide (a portrait 300x500 and a landscape 400x200: 500, not the padded
    canvas's); no check, no rule."""
    from npbgpp_core.scene_fit import users_check_recipes

    assert users_check_recipes(True, [(300, 500), (400, 200)]) == {
        "long_side": 500, "range": [384, 768], "recipes": ["crops", "whole"], "combine": "average"}
    assert users_check_recipes(True, [(256, 192)]) == {"long_side": 256, "range": [384, 768], "recipes": [],
                                                       "combine": "choose"}
    assert users_check_recipes(False, [(300, 500)]) is None


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A 24 px scene of 3 training photos (checked) and one of 2 (the check skipped), with bundles."""
    from headless_train.export import main as export_main
    from npbgpp_core.pretrained import default_weights_path

    root = tmp_path_factory.mktemp("auto")
    out = {}
    for name, splits in (("three", (3, 0, 1)), ("two", (2, 0, 1))):
        folder = make_tiny_scene(str(root / name), views=sum(splits), size=24, n_points=300, splits=splits)
        bundle = str(root / f"{name}.npbgpp")
        assert export_main(["--checkpoint", default_weights_path("npbgpp", "object"), "--scene", folder,
                            "--out", bundle]) == 0
        out[name] = (folder, bundle)
    return out


def test_fit_bundle_users_default_averages_inside_the_range_only(scenes, tmp_path, monkeypatch):
    """fit_bundle with check_recipes and check_combine left None: 24 px photos inside a (tiny) range
    are fitted by both recipes averaged, recorded in fit["recipes_by_size"] and the outcome; outside
    it the plain check, recorded too; explicit recipes (none, or both chosen between) keep their
    meaning with no size rule recorded."""
    from npbgpp_core import fitting, protocol
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.scene_fit import BundleFit, fit_bundle

    folder, bundle = scenes["three"]
    monkeypatch.setattr(protocol, "AUTO_AVERAGE_LOW_SIDE", 16)
    monkeypatch.setattr(protocol, "AUTO_AVERAGE_HIGH_SIDE", 24)
    monkeypatch.setattr(fitting, "view_psnr", scores_in_turn(20.0, 19.0, 19.5, 20.3))
    out = str(tmp_path / "averaged.npbgpp")
    result = fit_bundle(bundle, folder, out, steps=2)
    assert result.check.averaged and [c.recipe for c in result.check.candidates] == ["crops", "whole"]
    fit = NeuralScene.load(out).metadata["fit"]
    assert fit["recipes_by_size"] == {"long_side": 24, "range": [16, 24], "recipes": ["crops", "whole"],
                                      "combine": "average"}
    assert fit["check"]["recipe"] == "average"

    monkeypatch.setattr(fitting, "view_psnr", scores_in_turn(20.0, 19.0, 19.5, 20.3))
    from npbgpp_core.datasets import load_scene

    data = load_scene(folder, require_points=False)
    job = BundleFit(bundle, data, 2)
    assert job.total == 2 + fitting.WHOLE_VIEW_STEPS + 2
    while not job.step():
        pass
    assert job.outcome().endswith("; both recipes averaged: photos 24 px, within the 16-24 px range where the "
                                  "size rule averages them")
    assert job.outcome().startswith("kept the fit (average of crops and whole views): +0.30 dB")

    for recipes, combine, candidates in (((), None, []), (("crops", "whole"), "choose", ["crops", "whole"])):
        monkeypatch.setattr(fitting, "view_psnr", scores_in_turn(20.0, 21.0, 20.5))
        job = BundleFit(bundle, data, 2, check_recipes=recipes, check_combine=combine)
        while not job.step():
            pass
        assert job.recipes_by_size is None and not job.result.check.averaged
        assert [c.recipe for c in job.result.check.candidates] == candidates
        assert "recipes_by_size" not in job.fitted_scene().metadata["fit"] and "averaged" not in job.outcome()

    monkeypatch.setattr(protocol, "AUTO_AVERAGE_HIGH_SIDE", 23)  # 24 px now above the range
    monkeypatch.setattr(fitting, "view_psnr", scores_in_turn(20.0, 21.0))
    job = BundleFit(bundle, data, 2)
    assert job.total == 2 + 2
    while not job.step():
        pass
    assert job.recipes_by_size == {"long_side": 24, "range": [16, 23], "recipes": [], "combine": "choose"}
    assert job.fitted_scene().metadata["fit"]["recipes_by_size"] == job.recipes_by_size
    assert job.result.check.candidates == [] or [c.recipe for c in job.result.check.candidates] == ["crops"]
    assert job.outcome() == f"kept the fit: +1.00 dB on held-apart photo {job.check()['name']}"


def test_users_default_with_too_few_photos_or_no_check_is_the_plain_fit(scenes, tmp_path, monkeypatch):
    """2 training photos: the check is skipped as before (the metadata and outcome say so) and the
    size rule does not apply (nothing recorded, one recipe fitted); check_view False: neither."""
    from npbgpp_core import protocol
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.scene_fit import BundleFit

    monkeypatch.setattr(protocol, "AUTO_AVERAGE_LOW_SIDE", 16)
    monkeypatch.setattr(protocol, "AUTO_AVERAGE_HIGH_SIDE", 24)
    folder, bundle = scenes["two"]
    job = BundleFit(bundle, load_scene(folder, require_points=False), 2)
    assert job.total == 2 and job.recipes_by_size is None
    while not job.step():
        pass
    fit = job.fitted_scene().metadata["fit"]
    assert "recipes_by_size" not in fit and fit["check"]["skipped"].startswith("2 input views, fewer than the 3")
    assert job.outcome().startswith("the fit used every photo unchecked: 2 input views")
    folder, bundle = scenes["three"]
    job = BundleFit(bundle, load_scene(folder, require_points=False), 2, check_view=False)
    assert job.total == 2 and job.recipes_by_size is None
