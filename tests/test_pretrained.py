"""Weights files (npbgpp_core.pretrained), ``python -m headless_train export-weights`` and the
plain-PyTorch fitting loops (npbgpp_core.fitting), on tiny scenes made here."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _train_fixtures import make_tiny_scene

from headless_train.export_weights import main as export_main
from npbgpp_core.datasets import load_scene
from npbgpp_core.fitting import FitViews, fit_coefficients, fit_npbg
from npbgpp_core.losses import multiscale_l1
from npbgpp_core.models import NPBG, NPBGConfig, NPBGPlusPlus
from npbgpp_core.pretrained import (
    WeightsError,
    default_weights_path,
    load_pretrained_npbg_refiner,
    load_pretrained_npbgpp,
    read_weights,
    save_weights,
)

NPBGPP_SYSTEM_CONFIG = {"name": "npbgpp", "aggregator": "sphere", "feature_dim": 8, "basis_dim": 6,
                        "ridge_alpha": 1.0, "visibility_scale": 1.0, "align_input_views": True,
                        "align_during_rendering": True, "predict_mask": False, "min_view_depth": 0.0, "lr": 1e-4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_scene(str(tmp_path_factory.mktemp("scene") / "s"), views=6, size=32, n_points=400)
    return load_scene(folder)


def _views(scene, which):
    return FitViews(torch.stack([scene.load_image(i) for i in which]), [scene.camera(i) for i in which],
                    torch.stack([scene.load_mask(i) for i in which]))


def _npbgpp_checkpoint(path, model, steps=12):
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "npbgpp": {"system": "npbgpp", "config": NPBGPP_SYSTEM_CONFIG, "scenes": ["a"], "points": [1]},
            "global_step": steps, "epoch": 1}
    torch.save(ckpt, path)


def test_export_weights_card_json_is_an_input(tmp_path, capsys):
    """--card-json reads keys for the card; a README reader took card.json for an output, and the
    missing file now says what the option is for; nothing is written."""
    torch.manual_seed(0)
    _npbgpp_checkpoint(tmp_path / "last.ckpt", NPBGPlusPlus().eval())
    out = tmp_path / "w.safetensors"
    args = ["--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(out), "--card-json", str(tmp_path / "card.json")]
    assert export_main(args) == 2
    assert "reads an existing JSON file of keys to add to the model card" in capsys.readouterr().err
    assert not out.exists()


def test_export_weights_round_trip_renders_the_same(tmp_path, tiny):
    torch.manual_seed(0)
    model = NPBGPlusPlus().eval()
    ckpt = tmp_path / "last.ckpt"
    _npbgpp_checkpoint(ckpt, model)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"corpus_recipe": "make corpus", "hardware": "2-core CPU"}))
    out = tmp_path / "w.safetensors"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out), "--fp16", "--card-json", str(card)]) == 0
    wf = read_weights(str(out), "npbgpp")
    assert wf.card["steps"] == 12 and wf.card["corpus_recipe"] == "make corpus" and wf.card["dtype"] == "float16"
    assert os.path.getsize(out) < 0.6 * sum(p.numel() * 4 for p in model.parameters())  # fp16 on disk
    loaded = load_pretrained_npbgpp(str(out))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b, rtol=1e-3, atol=1e-4), k
    points = torch.from_numpy(tiny.points)
    images = torch.stack([tiny.load_image(i) for i in tiny.train])
    cams = [tiny.camera(i) for i in tiny.train]
    with torch.no_grad():
        ref = model.render(model.aggregate(points, images, cams), tiny.camera(tiny.test[0]))
        got = loaded.render(loaded.aggregate(points, images, cams), tiny.camera(tiny.test[0]))
    assert ref.std() > 0
    assert (ref - got).abs().max() < 2e-2


def test_npbg_checkpoint_exports_its_refiner(tmp_path):
    """A run with 4 descriptor numbers (not the default 8): its refiner has 4 input features."""
    torch.manual_seed(1)
    m = NPBG(5, NPBGConfig(descriptor_dim=4, feature_dim=4))
    state = {f"refiner.{k}": v for k, v in m.refiner.state_dict().items()}
    state.update({f"scene_models.a.{k}": v for k, v in m.state_dict().items()})
    torch.save({"state_dict": state, "npbgpp": {"system": "npbg", "config": {"name": "npbg", "descriptor_dim": 4,
                                                                             "lr_refiner": 1e-4}},
                "global_step": 3}, tmp_path / "n.ckpt")
    out = tmp_path / "r.safetensors"
    assert export_main(["--checkpoint", str(tmp_path / "n.ckpt"), "--out", str(out)]) == 0
    refiner = load_pretrained_npbg_refiner(str(out))
    assert refiner.config == NPBGConfig(descriptor_dim=4, feature_dim=4) and refiner.card["steps"] == 3
    for k, v in m.refiner.state_dict().items():
        assert torch.equal(refiner.state[k], v), k  # fp32 export is exact


def test_export_weights_rejects_per_scene_systems(tmp_path, capsys):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "npbgpp": {"system": "coefficients_ft", "config": {}}},
               tmp_path / "c.ckpt")
    assert export_main(["--checkpoint", str(tmp_path / "c.ckpt"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "coefficients_ft" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
    # the suffix is checked before the checkpoint is read, in any letter case
    assert export_main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o.pt")]) == 2
    assert f"--out {tmp_path / 'o.pt'} must end with .safetensors" in capsys.readouterr().err


def test_export_weights_takes_the_suffix_in_any_letter_case(tmp_path):
    torch.manual_seed(0)
    _npbgpp_checkpoint(tmp_path / "last.ckpt", NPBGPlusPlus())
    out = tmp_path / "W.SafeTensors"
    assert export_main(["--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(out)]) == 0
    assert read_weights(str(out), "npbgpp").card["steps"] == 12


class _Trap:
    """Unpickling this writes a file: proof that a loader executed pickle code."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self):
        return (open, (self.flag, "w"))


def test_bad_weights_files_are_named_and_never_unpickled(tmp_path, monkeypatch):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(FileNotFoundError, match="weights file not found") as info:
        load_pretrained_npbgpp(str(missing))
    assert str(missing) in str(info.value)
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WeightsError, match="corrupt") as info:
        load_pretrained_npbgpp(str(corrupt))
    assert str(corrupt) in str(info.value)
    # A user's own file gets no advice to regenerate the bundled network over it (the add-on
    # showed `git checkout -- <their file>` and an average-weights command writing into the repo).
    assert "git checkout" not in str(info.value) and "average-weights" not in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained_npbgpp(str(missing))
    assert "average-weights" not in str(info.value)
    # The bundled files do get it.
    import npbgpp_core.pretrained as pretrained

    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", str(tmp_path / "bundled"))
    with pytest.raises(FileNotFoundError, match="regenerate it with: .*average-weights"):
        load_pretrained_npbgpp()
    (tmp_path / "bundled").mkdir()
    (tmp_path / "bundled" / os.path.basename(default_weights_path("npbgpp"))).write_bytes(corrupt.read_bytes())
    with pytest.raises(WeightsError, match="corrupt.*git checkout --.*average-weights"):
        load_pretrained_npbgpp()
    monkeypatch.undo()
    flag = tmp_path / "executed"
    pickled = tmp_path / "pickle.safetensors"
    torch.save({"x": _Trap(str(flag))}, pickled)
    with pytest.raises(WeightsError):
        load_pretrained_npbgpp(str(pickled))
    assert not flag.exists()
    refiner_file = tmp_path / "r.safetensors"
    save_weights(str(refiner_file), NPBG(0).refiner.state_dict(), "npbg_refiner", NPBGConfig().to_dict(), {})
    with pytest.raises(WeightsError, match="'npbg_refiner' weights, expected 'npbgpp'"):
        load_pretrained_npbgpp(str(refiner_file))
    assert default_weights_path("npbgpp").endswith(os.path.join("npbgpp_core", "weights",
                                                                "npbgpp_sphere.safetensors"))


def _full_loss(model: NPBG, points: torch.Tensor, views: FitViews) -> float:
    with torch.no_grad():
        preds = torch.stack([model.render_raw(points, c)[:3] for c in views.cameras])
    return float(multiscale_l1(preds, views.images, views.masks))


def test_fitting_loops_lower_the_loss(tiny, tmp_path):
    torch.manual_seed(2)
    model = NPBGPlusPlus().eval()
    # as the fits receive it: read from a weights file (the perceptual loss needs a loaded encoder)
    save_weights(str(tmp_path / "m.safetensors"), model.state_dict(), "npbgpp", model.config.to_dict(), {},
                 fp16=False)
    model = load_pretrained_npbgpp(str(tmp_path / "m.safetensors"))
    points = torch.from_numpy(tiny.points)
    views = _views(tiny, tiny.train)
    with torch.no_grad():
        agg = model.aggregate(points, views.images, views.cameras)
    before = fit_coefficients(model, agg, views, steps=0)
    after = fit_coefficients(model, agg, views, steps=25, crop=None, seed=0)
    assert after.steps == 25 and after.seconds > 0
    assert _full_loss(after.model, points, views) < 0.8 * _full_loss(before.model, points, views)
    basis = {k: v.clone() for k, v in model.basis.state_dict().items()}
    assert all(torch.equal(basis[k], v) for k, v in after.model.basis.state_dict().items())  # frozen

    refiner = NPBG(0).refiner.state_dict()
    start = fit_npbg(points, views, refiner, steps=0)
    fitted = fit_npbg(points, views, refiner, steps=25, crop=24, seed=0)
    assert torch.count_nonzero(start.model.descriptors) == 0  # zeros init
    assert _full_loss(fitted.model, points, views) < 0.8 * _full_loss(start.model, points, views)


def test_bundled_npbgpp_world_up_is_plus_z_and_can_be_overridden():
    from npbgpp_core.pretrained import load_pretrained_npbgpp

    assert load_pretrained_npbgpp().config.world_up == (0.0, 0.0, 1.0)  # trained on Blender's Z-up scenes
    assert load_pretrained_npbgpp(world_up=(0, 2, 0)).config.world_up == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="world_up must be"):
        load_pretrained_npbgpp(world_up=(0, 0, 0))


def test_torch_checkpoints_load_strictly_and_never_unpickle(tmp_path):
    """The one weights reader also takes a torch checkpoint ({config, state_dict}, keys
    optionally prefixed 'model.'): same weights as the model saved; pickled code, NaN
    tensors and missing parameters are refused naming the file."""
    torch.manual_seed(1)
    model = NPBGPlusPlus()
    path = tmp_path / "w.ckpt"
    torch.save({"config": model.config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded = load_pretrained_npbgpp(str(path), world_up=(0.0, 0.0, 1.0))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.float()), k
    assert list(loaded.config.world_up) == [0.0, 0.0, 1.0]
    flag = tmp_path / "executed"
    trap = tmp_path / "trap.pt"
    torch.save({"x": _Trap(str(flag))}, trap)
    with pytest.raises(WeightsError, match="trap.pt"):
        load_pretrained_npbgpp(str(trap))
    assert not flag.exists()
    state = model.state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point())
    nan = tmp_path / "nan.pt"
    torch.save({"config": model.config.to_dict(), "state_dict": {**state, first: state[first] * float("nan")}}, nan)
    with pytest.raises(WeightsError, match=f"nan.pt: tensor {first} holds NaN"):
        load_pretrained_npbgpp(str(nan))
    partial = tmp_path / "partial.pt"
    torch.save({"config": model.config.to_dict(), "state_dict": {first: state[first]}}, partial)
    with pytest.raises(WeightsError, match="partial.pt does not fit"):
        load_pretrained_npbgpp(str(partial))


def test_a_headless_train_checkpoint_loads_with_its_own_config(tmp_path):
    """``load_pretrained_npbgpp`` on a last.ckpt of ``python -m headless_train`` builds the
    network that run trained (background, world_up, input_canvas and background rows of
    its system config, not the defaults) and renders exactly as the fp32 export of it."""
    from _train_fixtures import make_dataset
    from hydra import compose, initialize_config_module

    from headless_train.cli import run

    root = make_dataset(str(tmp_path / "data"), ("sceneA",), views=6, size=32, n_points=150)
    run_dir = str(tmp_path / "run")
    overrides = ["datasets=nerf_blender_pretrain", f"datasets.data_root={root}", "system=npbgpp_sphere",
                 "system.background=environment", "system.world_up=[0,0,1]", "system.background_rows=4",
                 "system.input_canvas=bounds", "datasets.train_num_samples=1", "trainer.max_steps=1",
                 "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0",
                 "dataloader=small", "datasets.train_image_size=16", f"system.descriptors_save_dir={run_dir}/d"]
    with initialize_config_module("headless_train.conf", version_base="1.3"):
        run(compose("config", overrides=overrides), run_dir)
    ckpt = os.path.join(run_dir, "checkpoints", "last.ckpt")
    out = str(tmp_path / "w.safetensors")
    assert export_main(["--checkpoint", ckpt, "--out", out]) == 0
    from_ckpt, exported = load_pretrained_npbgpp(ckpt), load_pretrained_npbgpp(out)
    cfg = from_ckpt.config
    assert (cfg.background, cfg.world_up, cfg.background_rows, cfg.input_canvas) == (
        "environment", (0.0, 0.0, 1.0), 4, "bounds")
    assert cfg.to_dict() == exported.config.to_dict()
    assert read_weights(ckpt, "npbgpp").card["steps"] == 1
    scene = load_scene(os.path.join(root, "sceneA"))
    points = torch.from_numpy(scene.points)
    images = torch.stack([scene.load_image(i) for i in scene.train])
    cams = [scene.camera(i) for i in scene.train]
    with torch.no_grad():
        agg = [m.aggregate(points, images, cams) for m in (from_ckpt, exported)]
        assert agg[0].background is not None and agg[0].background.shape[0] == cfg.feature_dim + 1
        a, b = (m.render(s, scene.camera(scene.test[0])) for m, s in zip((from_ckpt, exported), agg, strict=True))
    assert a.std() > 0 and torch.equal(a, b)  # fp32 export: the same tensors, the same image
    with pytest.raises(WeightsError, match="holds 'npbgpp' weights, expected 'npbg_refiner'"):
        load_pretrained_npbg_refiner(ckpt)


def test_a_checkpoint_without_a_model_config_is_refused_by_name(tmp_path):
    """A torch checkpoint with a state dict but no config (neither 'config' nor headless_train's
    metadata) is an error naming the file and the field, never a guess with the default config."""
    bare = tmp_path / "bare.pt"
    torch.save({"state_dict": NPBGPlusPlus().state_dict()}, bare)
    with pytest.raises(WeightsError, match="bare.pt holds no model config: .*'config'"):
        load_pretrained_npbgpp(str(bare))
    foreign = tmp_path / "c.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "npbgpp": {"system": "coefficients_ft", "config": {}}}, foreign)
    with pytest.raises(WeightsError, match="c.ckpt: system 'coefficients_ft' has no scene-independent weights"):
        read_weights(str(foreign), "npbgpp")


def test_check_command_has_help(capsys):
    """`python -m npbgpp_core.pretrained --help` answered '--help: missing' and exit 2."""
    from npbgpp_core.pretrained import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "FILE" in capsys.readouterr().out
    assert main(["nothere.safetensors"]) == 2
