"""bench/bench_quality.py: held-out split, baselines against hand computations, and a
tiny end-to-end run that writes JSON + markdown."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, os.path.dirname(__file__))
from _train_fixtures import make_tiny_scene  # noqa: E402

from bench.bench_quality import evaluate_scene, parse_args, split_views  # noqa: E402
from npbgpp_core.datasets import load_scene  # noqa: E402


def test_held_out_views_are_the_test_split_or_every_8th(tmp_path):
    scene = load_scene(make_tiny_scene(str(tmp_path / "s"), views=6, size=16, splits=(4, 1, 1)))
    inputs, held = split_views(scene)
    assert held == list(scene.test) and set(inputs) == set(range(6)) - set(held)
    scene.test = []
    scene.views = scene.views * 3  # 18 views, no test split: 0, 8, 16 held out
    inputs, held = split_views(scene)
    assert held == [0, 8, 16] and len(inputs) == 15


def test_baselines_match_hand_computed_psnr(tmp_path):
    folder = make_tiny_scene(str(tmp_path / "s"), views=6, size=16, splits=(4, 1, 1))
    args = parse_args(["--scenes", folder, "--methods", "mean_color,mean_image,points"])
    r = evaluate_scene(folder, args, {})
    scene = load_scene(folder)
    inputs = [i for i in range(6) if i not in scene.test]
    ims = torch.stack([scene.load_image(i) for i in inputs])
    gt = scene.load_image(scene.test[0])
    mean_rgb = ims.mean(dim=(0, 2, 3))
    mse_color = float(((gt - mean_rgb.view(3, 1, 1)) ** 2).mean())
    mse_image = float(((gt - ims.mean(0)) ** 2).mean())
    assert math.isclose(r["methods"]["mean_color"]["psnr"], -10 * math.log10(mse_color), rel_tol=1e-4)
    assert math.isclose(r["methods"]["mean_image"]["psnr"], -10 * math.log10(mse_image), rel_tol=1e-4)
    assert r["methods"]["points"]["psnr"] > 0 and r["held_out_views"] == 1 and r["input_views"] == 5
    # sharpness: a constant image has no gradient; the mean image's ratio is its own RMS
    # gradient over the photo's, computed here from the same pixels
    assert r["methods"]["mean_color"]["sharpness"] == 0.0
    mean_image = ims.mean(0)
    by_hand = math.sqrt(brute_energy(mean_image) / brute_energy(gt))
    assert math.isclose(r["methods"]["mean_image"]["sharpness"], by_hand, rel_tol=1e-4)
    assert r["methods"]["mean_image"]["sharpness"] < 1.0  # an average of other views is blurry


def test_report_records_every_held_out_size(tmp_path):
    """A scene whose held-out photos have two sizes (a portrait and landscape capture's) records both,
    with their counts, the most common first; ``size`` stays the first held-out view's (older readers);
    the scores are of every held-out view at its own size, as before."""
    from PIL import Image

    folder = make_tiny_scene(str(tmp_path / "s"), views=6, size=32, splits=(3, 0, 3))
    scene = load_scene(folder)
    path = scene.views[scene.test[1]].image_path
    Image.open(path).resize((32, 24)).save(path)  # 32 wide, 24 high
    r = evaluate_scene(folder, parse_args(["--scenes", folder, "--methods", "mean_color"]), {})
    assert r["held_out_views"] == 3 and r["size"] == [32, 32]
    assert r["held_out_sizes"] == [{"size": [32, 32], "views": 2}, {"size": [24, 32], "views": 1}]
    scene = load_scene(folder)
    mean_rgb = torch.stack([scene.load_image(i) for i in (0, 1, 2)]).mean(dim=(0, 2, 3)).view(3, 1, 1)
    by_hand = [-10 * math.log10(float(((scene.load_image(i) - mean_rgb) ** 2).mean())) for i in scene.test]
    assert [tuple(scene.load_image(i).shape[-2:]) for i in scene.test] == [(32, 32), (24, 32), (32, 32)]
    for got, want in zip(r["methods"]["mean_color"]["psnr_views"], by_hand, strict=True):
        assert math.isclose(got, want, rel_tol=1e-4)
    json.dumps(r)  # the report is written as JSON


def brute_energy(image: torch.Tensor) -> float:
    """Mean squared neighbour difference (horizontal and vertical pairs together)."""
    x = image.double()
    dx, dy = x[:, :, 1:] - x[:, :, :-1], x[:, 1:, :] - x[:, :-1, :]
    return float((dx.pow(2).sum() + dy.pow(2).sum()) / (dx.numel() + dy.numel()))


def test_reports_without_sharpness_still_average_and_tabulate():
    """JSON written before the sharpness column: means and the table still come out."""
    from bench.bench_quality import averages, markdown

    old = {"methods": ["npbgpp"], "scenes": [
        {"scene": "a", "input_views": 5, "held_out_views": 1, "methods": {"npbgpp": {"psnr": 20.0, "ssim": 0.5}}},
        {"scene": "b", "input_views": 5, "held_out_views": 1, "methods": {"npbgpp": {"psnr": 22.0, "ssim": 0.7}}}]}
    old["average"] = averages(old["scenes"], old["methods"])
    assert old["average"]["npbgpp"] == {"psnr": 21.0, "ssim": 0.6, "scenes": 2}
    assert "| **mean of 2** |  | 21.00 / 0.600 |" in markdown(old)
    old["scenes"][0]["methods"]["npbgpp"]["sharpness"] = 0.8
    old["scenes"][1]["methods"]["npbgpp"]["sharpness"] = None  # flat photos: undefined
    assert averages(old["scenes"], old["methods"])["npbgpp"]["sharpness"] == 0.8


def test_group_rows_and_retabulating_an_old_report(tmp_path):
    from bench.bench_quality import QualityError, parse_groups, retabulate

    def scene(name: str, psnr: float, sharp: float | None = None) -> dict:
        m = {"psnr": psnr, "ssim": 0.5, **({"sharpness": sharp} if sharp is not None else {})}
        return {"scene": name, "input_views": 4, "held_out_views": 1, "methods": {"npbg": m}}

    old = tmp_path / "old.json"  # as written before the sharpness column (no groups either)
    old.write_text(json.dumps({"methods": ["npbg"], "scenes": [scene("a", 10.0), scene("b", 14.0), scene("c", 30.0)],
                               "average": {"npbg": {"psnr": 18.0, "ssim": 0.5, "scenes": 3}}}))
    groups = parse_groups(["ab=a,b", "cz=c,z"])
    assert groups == {"ab": ["a", "b"], "cz": ["c", "z"]}
    table = retabulate(str(old), groups)
    assert "| **mean of 3** |  | 18.00 / 0.500 |" in table
    assert "| **mean ab** (2) |  | 12.00 / 0.500 |" in table
    assert "| **mean cz** (1 of 2) |  | 30.00 / 0.500 |" in table  # z is not in the report
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"methods": ["npbg"], "scenes": [scene("a", 10.0, 0.5), scene("b", 14.0, 0.7)]}))
    assert "| **mean ab** (2) |  | 12.00 / 0.500 / 0.60 |" in retabulate(str(new), groups)
    with pytest.raises(QualityError, match="--group 'ab': expected NAME=SCENE"):
        parse_groups(["ab"])
    with pytest.raises(QualityError, match="cannot read report .*missing.json"):
        retabulate(str(tmp_path / "missing.json"), {})
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(QualityError, match="list.json: not a bench_quality report"):
        retabulate(str(tmp_path / "list.json"), {})


def test_end_to_end_writes_json_and_markdown(tmp_path):
    folder = make_tiny_scene(str(tmp_path / "s"), views=6, size=32, splits=(4, 1, 1))
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_quality.py"), "--scenes", folder,
                           "--steps", "2", "--crop", "16", "--out", str(out), "--group", "g=s"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["average"]) == {"points", "mean_color", "mean_image", "npbgpp", "coefficients_ft", "npbg"}
    assert report["scenes"][0]["methods"]["coefficients_ft"]["steps"] == 2
    assert all(0 <= report["average"][m]["sharpness"] < 10 for m in report["average"])
    table = out.with_suffix(".md").read_text()
    assert "| **mean of 1** |" in table and "| **mean g** (1) |" in table
    assert report["groups"]["g"]["average"] == report["average"] and report["groups"]["g"]["missing"] == []
    mean_image = report["average"]["mean_image"]
    assert f"{mean_image['psnr']:.2f} / {mean_image['ssim']:.3f} / {mean_image['sharpness']:.2f}" in table
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_quality.py"), "--scenes", str(tmp_path / "no")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "scene folders not found" in bad.stderr


def test_recipe_flags_reach_fit_coefficients_and_bad_ones_stop_early(tmp_path):
    from bench.bench_quality import fit_options

    assert fit_options(parse_args(["--scenes", "x"])) == {}  # unset: the library defaults
    args = parse_args(["--scenes", "x", "--lr-refiner", "1e-3", "--train-refiner", "decoder", "--crops-per-step",
                       "2", "--schedule", "cosine", "--coefficient-decay", "0.5"])
    assert fit_options(args) == {"lr_refiner": 1e-3, "train_refiner": "decoder", "crops_per_step": 2,
                                 "schedule": "cosine", "coefficient_decay": 0.5}
    folder = make_tiny_scene(str(tmp_path / "s"), views=4, size=16, splits=(3, 0, 1))
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_quality.py"), "--scenes", folder,
                          "--train-refiner", "encoder"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train_refiner must be one of" in bad.stderr


def test_sharpening_loss_flags_reach_fit_coefficients_and_bad_ones_are_named():
    from bench.bench_quality import QualityError, check_fit_options, fit_options

    args = parse_args(["--scenes", "x", "--laplacian-weight", "2", "--perceptual-weight", "0.5"])
    assert fit_options(args) == {"laplacian_weight": 2.0, "perceptual_weight": 0.5}
    check_fit_options(args)
    with pytest.raises(QualityError, match="perceptual_weight must be a finite number >= 0"):
        check_fit_options(parse_args(["--scenes", "x", "--perceptual-weight", "-1"]))


@pytest.mark.parametrize("bad", ["1.5", "-1", "x", ""])
def test_warmup_steps_flag_goes_through_the_project_parser(capsys, bad):
    """--warmup-steps is parsed by npbgpp_core.fitting.warmup_steps_value: its message
    (value as typed), not argparse's 'invalid int value'; a whole number passes as an int."""
    assert parse_args(["--scenes", "x", "--warmup-steps", " 12 "]).warmup_steps == 12
    with pytest.raises(SystemExit) as exc:
        parse_args(["--scenes", "x", "--warmup-steps", bad])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    shown = bad if bad else "''"
    assert f"--warmup-steps must be an integer >= 0, got {shown}" in err, err
    assert "invalid" not in err, err


def test_fit_max_side_shrinks_only_what_the_fit_sees(tmp_path, monkeypatch):
    """--fit-max-side: the fit gets the input photos and cameras at that long side (the
    loader's own resize of each), aggregation and the held-out scores stay at --max-side;
    a value under the crop is refused before any scene is loaded."""
    import bench.bench_quality as bq
    import npbgpp_core.fitting as fitting

    folder = make_tiny_scene(str(tmp_path / "s"), views=6, size=32, splits=(4, 1, 1))
    seen = {}
    real = fitting.fit_coefficients

    def spy(model, agg, views, **kw):
        seen["views"] = views
        return real(model, agg, views, **kw)

    monkeypatch.setattr(fitting, "fit_coefficients", spy)
    args = parse_args(["--scenes", folder, "--methods", "coefficients_ft", "--max-side", "32", "--fit-max-side",
                       "16", "--steps", "1", "--crop", "8"])
    r = evaluate_scene(folder, args, {})
    scene = load_scene(folder)
    inputs = [i for i in range(6) if i not in scene.test]
    assert r["size"] == [32, 32] and r["methods"]["coefficients_ft"]["steps"] == 1
    assert len(seen["views"].images) == len(inputs)
    for k, i in enumerate(inputs):
        img = seen["views"].image(k)
        assert tuple(img.shape[-2:]) == (16, 16)
        assert torch.equal(img[:3], scene.load_image(i, (16, 16)))
        assert torch.allclose(torch.as_tensor(seen["views"].cameras[k].K), torch.as_tensor(scene.camera(i, (16, 16)).K))
    with pytest.raises(bq.QualityError, match="--fit-max-side 4 is below the fitting crop --crop 8"):
        bq.check_fit_options(parse_args(["--scenes", folder, "--fit-max-side", "4", "--crop", "8"]))


def test_crop_none_fits_whole_views(tmp_path, monkeypatch, capsys):
    """--crop none: fit_coefficients gets crop=None (each step a whole view) with the given
    --steps / --crops-per-step; a non-positive or non-numeric side is refused by name, and
    --fit-max-side has no crop to stay above."""
    import bench.bench_quality as bq
    import npbgpp_core.fitting as fitting

    folder = make_tiny_scene(str(tmp_path / "s"), views=6, size=32, splits=(4, 1, 1))
    seen = {}
    real = fitting.fit_coefficients

    def spy(model, agg, views, **kw):
        seen.update(kw)
        return real(model, agg, views, **kw)

    monkeypatch.setattr(fitting, "fit_coefficients", spy)
    args = parse_args(["--scenes", folder, "--methods", "coefficients_ft", "--max-side", "32", "--crop", " None ",
                       "--steps", "2", "--crops-per-step", "1"])
    assert args.crop is None and bq.crop_label(args.crop) == "whole views" and bq.crop_label(128) == "128^2 crops"
    r = evaluate_scene(folder, args, {})
    assert seen["crop"] is None and seen["steps"] == 2 and seen["crops_per_step"] == 1
    assert r["methods"]["coefficients_ft"]["steps"] == 2
    bq.check_fit_options(parse_args(["--scenes", folder, "--crop", "none", "--fit-max-side", "4"]))
    assert parse_args(["--scenes", "x", "--crop", "64"]).crop == 64
    for bad in ("0", "-8", "whole", "12.5"):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--scenes", "x", "--crop", bad])
        assert exc.value.code == 2
        assert f"expected a positive crop side or none, got '{bad}'" in capsys.readouterr().err


def test_check_view_flag_scores_what_the_user_gets(tmp_path, monkeypatch):
    """--check-view on: a fit driven to lose (to the inverted photos) on the kept input view
    leaves the unfitted scene, so the fit's column is NPBG++'s own to the last bit (the user
    gets the source bundle back); the report names the kept input view and the table marks
    the cell; off records no check."""
    from bench.bench_quality import averages, check_fit_options, markdown
    from npbgpp_core import fitting

    folder = make_tiny_scene(str(tmp_path / "s"), views=6, size=32, splits=(4, 1, 1))
    monkeypatch.setattr(fitting, "coefficients_ft_loss", lambda *a, **k: lambda p, t, m: (p - (1 - t)).abs().mean())
    args = parse_args(["--scenes", folder, "--methods", "npbgpp,coefficients_ft", "--steps", "20", "--crop", "16",
                       "--check-view", "on"])
    check_fit_options(args)
    r = evaluate_scene(folder, args, {})
    fit, plain = r["methods"]["coefficients_ft"], r["methods"]["npbgpp"]
    inputs, _ = split_views(load_scene(folder))
    assert fit["check"]["kept"] == "unfitted" and fit["check"]["view"] == 2 and fit["check"]["view_id"] == inputs[2]
    assert fit["check"]["psnr_fitted"] < fit["check"]["psnr_unfitted"]
    assert fit["psnr_views"] == plain["psnr_views"] and fit["ssim"] == plain["ssim"]
    report = {"methods": ["npbgpp", "coefficients_ft"], "scenes": [r]}
    report["average"] = averages(report["scenes"], report["methods"])
    assert " unfitted kept |" in markdown(report).splitlines()[2]
    off = evaluate_scene(folder, parse_args(["--scenes", folder, "--methods", "npbgpp,coefficients_ft",
                                             "--steps", "2", "--crop", "16", "--check-view", "off"]), {})
    assert "check" not in off["methods"]["coefficients_ft"]


def test_fair_check_flag_scores_the_full_scene_when_the_fit_loses(tmp_path, monkeypatch):
    """--fair-check on: a fit driven to lose leaves NPBG++'s render of the full aggregation
    (what the user keeps), the check records the aggregation without the kept view (its refusal
    without --check-view: test_check_flags_are_refused_in_the_flags_words)."""
    from bench.bench_quality import check_fit_options
    from npbgpp_core import fitting

    folder = make_tiny_scene(str(tmp_path / "s"), views=6, size=32, splits=(4, 1, 1))
    monkeypatch.setattr(fitting, "coefficients_ft_loss", lambda *a, **k: lambda p, t, m: (p - (1 - t)).abs().mean())
    args = parse_args(["--scenes", folder, "--methods", "npbgpp,coefficients_ft", "--steps", "20", "--crop", "16",
                       "--check-view", "on", "--fair-check", "on"])
    check_fit_options(args)
    r = evaluate_scene(folder, args, {})
    fit, plain = r["methods"]["coefficients_ft"], r["methods"]["npbgpp"]
    assert fit["check"]["kept"] == "unfitted" and fit["check"]["aggregated_without"] is True
    assert fit["psnr_views"] == plain["psnr_views"]


def test_check_recipes_flag_records_every_candidates_held_out_scores(tmp_path, monkeypatch):
    """--check-recipes crops,whole: a loss that inverts the 16^2 crop targets makes the crop recipe
    lose, so the whole-view one is chosen; every candidate records its kept-photo score and its
    held-out scores, the chosen one's equal to the fit's column, the other's its own fit's (lower
    here)."""
    from bench.bench_quality import check_fit_options
    from npbgpp_core import fitting

    def inverted_crops(*_a, **_k):
        return lambda p, t, m: (p - (1 - t if t.shape[-2] == 16 else t)).abs().mean()

    folder = make_tiny_scene(str(tmp_path / "s"), views=6, size=32, splits=(4, 1, 1))
    monkeypatch.setattr(fitting, "coefficients_ft_loss", inverted_crops)
    args = parse_args(["--scenes", folder, "--methods", "npbgpp,coefficients_ft", "--max-side", "32",
                       "--steps", "20", "--crop", "16", "--check-view", "on", "--check-recipes", "crops, whole"])
    check_fit_options(args)
    fit = evaluate_scene(folder, args, {})["methods"]["coefficients_ft"]
    check = fit["check"]
    crops, whole = check["candidates"]
    assert (crops["recipe"], whole["recipe"], check["recipe"]) == ("crops", "whole", "whole")
    assert (crops["steps"], whole["steps"]) == (20, 50) and fit["steps"] == 50
    assert check["kept"] == "fitted" and check["psnr_fitted"] == whole["psnr_fitted"] > crops["psnr_fitted"]
    assert whole["held_out"]["psnr_views"] == fit["psnr_views"]
    assert crops["held_out"]["psnr"] < whole["held_out"]["psnr"]
    for cand in (crops, whole):  # the bench's kept-photo score is the check's own measure
        assert round(cand["psnr_kept"], 3) == cand["psnr_fitted"]
    mixes = {mix["mix"]: mix for mix in check["mixes"]}
    assert list(mixes) == ["crops+whole", "unfitted+crops", "unfitted+whole", "unfitted+crops+whole"]
    for mix in mixes.values():
        assert math.isfinite(mix["psnr_kept"]) and len(mix["held_out"]["psnr_views"]) == 1


def test_check_combine_average_scores_the_mean_the_mixes_score(tmp_path):
    """--check-combine average: the fit's column is the "crops+whole" mix (the mean of both recipes'
    fits, scored as the mixes are) when the check keeps it, NPBG++'s own when it drops it; its
    kept-photo score is that mix's. Refused in the flags' words without two recipes, and an unknown
    name, before any scene is read."""
    from bench.bench_quality import QualityError, check_fit_options

    folder = make_tiny_scene(str(tmp_path / "s"), views=6, size=32, splits=(4, 1, 1))
    args = parse_args(["--scenes", folder, "--methods", "npbgpp,coefficients_ft", "--max-side", "32",
                       "--steps", "4", "--crop", "16", "--check-view", "on", "--check-recipes", "crops,whole",
                       "--check-combine", "average"])
    check_fit_options(args)
    methods = evaluate_scene(folder, args, {})["methods"]
    fit = methods["coefficients_ft"]
    check = fit["check"]
    assert check["recipe"] == "average" and check["combine"] == "average"
    mean = {mix["mix"]: mix for mix in check["mixes"]}["crops+whole"]
    assert round(mean["psnr_kept"], 3) == check["psnr_fitted"]
    kept = mean["held_out"] if check["kept"] == "fitted" else methods["npbgpp"]
    assert fit["psnr_views"] == kept["psnr_views"]
    for flags, expected in ((["--check-recipes", "whole", "--check-combine", "average"],
                             "--check-combine average takes the mean of the fits of the recipes --check-recipes "
                             "names: it needs --check-recipes with 2 or more"),
                            (["--check-recipes", "crops,whole", "--check-combine", "best"],
                             "--check-combine must be one of ('choose', 'average'), got 'best'")):
        with pytest.raises(QualityError) as refused:
            check_fit_options(parse_args(["--scenes", "unused", "--check-view", "on", *flags]))
        assert str(refused.value).startswith(expected), refused.value


def test_check_mixes_are_the_means_of_the_named_states():
    """The four soups of a crops / whole choice, each the element-wise mean of its states (by hand)."""
    from bench.bench_quality import check_mixes

    unfitted, crops = {"w": torch.tensor([0.0, 3.0])}, {"w": torch.tensor([2.0, 3.0])}
    whole = {"w": torch.tensor([4.0, 0.0])}
    mixes = check_mixes(unfitted, {"crops": crops, "whole": whole})
    expect = {"crops+whole": [3.0, 1.5], "unfitted+crops": [1.0, 3.0], "unfitted+whole": [2.0, 1.5],
              "unfitted+crops+whole": [2.0, 2.0]}
    assert list(mixes) == list(expect)
    for name, values in expect.items():
        assert torch.equal(mixes[name]["w"], torch.tensor(values)), name
    assert list(check_mixes(unfitted, {"crops": crops})) == ["unfitted+crops"]


def test_check_flags_are_refused_in_the_flags_words():
    """bench_quality's --check-recipes splits its names as headless_train fit's does
    (fitting.split_check_recipes): an empty name, or an empty flag, is refused as an unknown
    recipe, not read as no choice (a plain check run under the wrong name); an unknown name, and
    --check-recipes or --fair-check with --check-view off, are refused by the core's rule naming
    the flags, not the keywords (check_recipes, check_view=True), before any scene is read."""
    from bench.bench_quality import QualityError, check_fit_options

    for value, unknown in (("", ""), ("crops,,whole", ""), ("crops,tiles", "tiles")):
        with pytest.raises(QualityError) as refused:
            check_fit_options(parse_args(["--scenes", "unused", "--check-recipes", value]))
        assert str(refused.value).startswith(f"--check-recipes: unknown recipe(s) [{unknown!r}]; choose from ")
    for flags, expected in (
            (["--check-recipes", "whole"], "--check-recipes chooses a recipe on a view kept apart: it needs "
                                           "--check-view on"),
            (["--fair-check", "on"], "--fair-check on is a way of checking the fit on a view kept apart: it needs "
                                     "--check-view on")):
        with pytest.raises(QualityError) as refused:
            check_fit_options(parse_args(["--scenes", "unused", "--check-view", "off", *flags]))
        assert str(refused.value) == expected


def test_check_recipes_auto_fits_what_users_get_by_the_photos_size(tmp_path, monkeypatch):
    """--check-recipes auto: the users' default (npbgpp_core.protocol.auto_check_recipes, the range made
    tiny here) of the photos the fit sees: 32 px photos inside the range are fitted by both recipes
    averaged, outside it (or at a --fit-max-side outside it) by the plain check, recorded as
    recipes_by_size; --check-combine with auto is refused before any scene is read."""
    from bench.bench_quality import QualityError, check_fit_options
    from npbgpp_core import protocol

    folder = make_tiny_scene(str(tmp_path / "s"), views=6, size=32, splits=(4, 1, 1))
    monkeypatch.setattr(protocol, "AUTO_AVERAGE_LOW_SIDE", 30)
    monkeypatch.setattr(protocol, "AUTO_AVERAGE_HIGH_SIDE", 40)
    run = ["--scenes", folder, "--methods", "npbgpp,coefficients_ft", "--max-side", "32", "--steps", "2",
           "--crop", "16", "--check-recipes", "auto"]
    args = parse_args(run)
    check_fit_options(args)
    fit = evaluate_scene(folder, args, {})["methods"]["coefficients_ft"]
    assert fit["recipes_by_size"] == {"long_side": 32, "range": [30, 40], "recipes": ["crops", "whole"],
                                      "combine": "average"}
    assert fit["check"]["recipe"] == "average" and [c["recipe"] for c in fit["check"]["candidates"]] == [
        "crops", "whole"]
    args = parse_args([*run, "--fit-max-side", "24"])  # the fit's photos 24 px: below the range
    check_fit_options(args)
    fit = evaluate_scene(folder, args, {})["methods"]["coefficients_ft"]
    assert fit["recipes_by_size"] == {"long_side": 24, "range": [30, 40], "recipes": [], "combine": "choose"}
    assert "candidates" not in fit["check"] and fit["steps"] == 2
    with pytest.raises(QualityError, match="--check-combine with --check-recipes auto"):
        check_fit_options(parse_args([*run, "--check-combine", "average"]))


def test_whole_max_side_reaches_the_fit_and_is_recorded_and_bad_ones_stop_early(tmp_path, monkeypatch):
    """--whole-max-side 24: the fit gets whole_max_side=24 and the report records it in its fit options and
    as the cap in effect (without the flag: the library's, WHOLE_VIEW_MAX_SIDE); the flag without a whole
    recipe, or below 16 px, is refused in words before any scene is read."""
    from bench.bench_quality import QualityError, check_fit_options, main
    from npbgpp_core import fitting
    from npbgpp_core.protocol import WHOLE_VIEW_MAX_SIDE

    real = fitting.fit_coefficients
    caps: list[object] = []

    def recorded(*args, **kwargs):
        caps.append(kwargs.get("whole_max_side", "unset"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fitting, "fit_coefficients", recorded)
    folder = make_tiny_scene(str(tmp_path / "s"), views=6, size=32, splits=(4, 1, 1))
    common = ["--scenes", folder, "--methods", "coefficients_ft", "--max-side", "32", "--steps", "2", "--crop", "16",
              "--check-view", "on", "--check-recipes", "crops,whole"]
    for flags, cap in ((["--whole-max-side", "24"], 24), ([], WHOLE_VIEW_MAX_SIDE)):
        out = tmp_path / f"res{cap}"
        assert main([*common, *flags, "--out", str(out)]) == 0
        report = json.loads(out.with_suffix(".json").read_text())
        assert report["whole_max_side"] == cap
        assert report["fit_options"].get("whole_max_side", WHOLE_VIEW_MAX_SIDE) == cap
        assert caps.pop() == (cap if flags else "unset")
    for flags, expected in (
            (["--check-recipes", "crops", "--whole-max-side", "512"],
             "--whole-max-side 512 caps the whole-view recipe of a choosing check: it needs --check-recipes with "
             "whole (or auto)"),
            (["--whole-max-side", "512"], "--whole-max-side 512 caps"),
            (["--check-recipes", "crops,whole", "--whole-max-side", "8"],
             "coefficients_ft options: whole_max_side must be an integer >= 16 pixels, got 8")):
        with pytest.raises(QualityError) as refused:
            check_fit_options(parse_args(["--scenes", "unused", "--check-view", "on", *flags]))
        assert str(refused.value).startswith(expected), refused.value


def test_aggregate_max_side_aggregates_smaller_photos_and_scores_at_max_side(tmp_path):
    """--aggregate-max-side 16 on 32-px photos: the no-fitting column equals a hand aggregation of the
    input photos and cameras the loader gives at 16 px, rendered and scored at 32 px; unset, the column
    equals the hand aggregation at 32 px (the run of before, bit for bit) and the two differ; under
    16 px or above --max-side it is refused in words before any scene is read; the report records the side."""
    import numpy as np

    from bench.bench_quality import QualityError, check_aggregate_max_side
    from npbgpp_core.datasets import scene_domain
    from npbgpp_core.metrics import psnr
    from npbgpp_core.models.alignment import resolve_world_up
    from npbgpp_core.pretrained import default_weights_path, load_pretrained_npbgpp

    folder = make_tiny_scene(str(tmp_path / "s"), views=6, size=32, splits=(4, 1, 1))
    scene = load_scene(folder)
    inputs, held = split_views(scene)
    up = resolve_world_up("auto", [scene.views[i].camera for i in inputs])
    model = load_pretrained_npbgpp(default_weights_path("npbgpp", scene_domain(scene)), world_up=up)
    points = torch.from_numpy(np.ascontiguousarray(scene.points, dtype=np.float32))

    def hand_psnr(side: int) -> float:
        with torch.no_grad():
            state = model.begin_scene(points)
            for i in inputs:
                state.add_views(scene.load_image(i, (side, side))[None], [scene.camera(i, (side, side))])
            agg = state.finish()
            rows = [float(psnr(model.render(agg, scene.camera(i, (32, 32))).clamp(0, 1),
                               scene.load_image(i, (32, 32)))[0]) for i in held]
        return sum(rows) / len(rows)

    common = ["--scenes", folder, "--methods", "npbgpp", "--max-side", "32"]
    small = evaluate_scene(folder, parse_args([*common, "--aggregate-max-side", "16"]), {})
    full = evaluate_scene(folder, parse_args(common), {})
    assert small["aggregate_sizes"] == [[16, 16]] * len(inputs) and small["size"] == [32, 32]
    assert full["aggregate_sizes"] == [[32, 32]] * len(inputs)
    assert small["methods"]["npbgpp"]["psnr"] == hand_psnr(16)
    assert full["methods"]["npbgpp"]["psnr"] == hand_psnr(32)
    assert small["methods"]["npbgpp"]["psnr"] != full["methods"]["npbgpp"]["psnr"]
    same = evaluate_scene(folder, parse_args([*common, "--aggregate-max-side", "32"]), {})
    assert same["methods"]["npbgpp"]["psnr"] == full["methods"]["npbgpp"]["psnr"]
    for side, expected in ((15, "--aggregate-max-side 15 is below 16 pixels"),
                           (33, "--aggregate-max-side 33 is above --max-side 32")):
        with pytest.raises(QualityError) as refused:
            check_aggregate_max_side(parse_args([*common, "--aggregate-max-side", str(side)]))
        assert str(refused.value).startswith(expected), refused.value
    check_aggregate_max_side(parse_args([*common, "--aggregate-max-side", "16"]))
    from bench.bench_quality import main

    assert main([*common, "--aggregate-max-side", "16", "--out", str(tmp_path / "res")]) == 0
    report = json.loads((tmp_path / "res.json").read_text())
    assert report["aggregate_max_side"] == 16 and report["max_side"] == 32
    assert report["average"]["npbgpp"]["psnr"] == small["methods"]["npbgpp"]["psnr"]
    assert main([*common, "--aggregate-max-side", "64", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad.json").exists()
