"""Checkpoints of the published NPBG++ code (npbgplusplus, Lightning 1.4, Hydra/OmegaConf
hyper-parameters) are refused by name with what differs, on every path that reads weights,
without unpickling them; and the differences the refusal states hold for both layouts.

The published layout is built here from the published module definitions and
configs/system/npbgpp_sphere.yaml (facts only): the encoder from timm's spnasnet_100
architecture definition (measured with timm 0.4.12, features_only: 378 tensors, 2,765,400
numbers), the decoder, basis MLP and refiner from their constructors."""

from __future__ import annotations

import builtins
import os

import pytest
import torch
from _train_fixtures import make_dataset
from hydra import compose, initialize_config_module

# spnasnet_100: (block type, repeats, kernel, stride, expansion, out channels) per stage,
# from timm's architecture definition; stem 3 -> 32, stride 2.
SPNASNET_STAGES = (
    (("ds", 1, 3, 1, 1, 16),),
    (("ir", 3, 3, 2, 3, 24),),
    (("ir", 1, 5, 2, 6, 40), ("ir", 3, 3, 1, 3, 40)),
    (("ir", 1, 5, 2, 6, 80), ("ir", 3, 3, 1, 3, 80)),
    (("ir", 1, 5, 1, 6, 96), ("ir", 3, 5, 1, 3, 96)),
    (("ir", 4, 5, 2, 6, 192),),
    (("ir", 1, 3, 1, 6, 320),),
)
# published RefinerUnetV2 module paths -> ours (npbgpp_core.models.refiner.Refiner)
REFINER_NAMES = {"start": "first", "down1.conv": "down.0", "down2.conv": "down.1", "down3.conv": "down.2",
                 "down4.conv": "down.3", "center": "center", "up4.conv": "up.0", "up3.conv": "up.1",
                 "up2.conv": "up.2", "up1.conv": "up.3"}


def _batchnorm(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def spnasnet_encoder() -> dict[str, tuple[int, ...]]:
    """Names and shapes of timm's spnasnet_100 feature encoder (features_only)."""
    out = {"conv_stem.weight": (32, 3, 3, 3), **_batchnorm("bn1", 32)}
    cin = 32
    for s, stage in enumerate(SPNASNET_STAGES):
        index = 0
        for kind, repeats, k, _stride, expand, cout in stage:
            for _ in range(repeats):
                p = f"blocks.{s}.{index}"
                if kind == "ds":
                    out |= {f"{p}.conv_dw.weight": (cin, 1, k, k), **_batchnorm(f"{p}.bn1", cin),
                            f"{p}.conv_pw.weight": (cout, cin, 1, 1), **_batchnorm(f"{p}.bn2", cout)}
                else:
                    mid = cin * expand
                    out |= {f"{p}.conv_pw.weight": (mid, cin, 1, 1), **_batchnorm(f"{p}.bn1", mid),
                            f"{p}.conv_dw.weight": (mid, 1, k, k), **_batchnorm(f"{p}.bn2", mid),
                            f"{p}.conv_pwl.weight": (cout, mid, 1, 1), **_batchnorm(f"{p}.bn3", cout)}
                cin = cout
                index += 1
    return out


def published_npbgpp_layout() -> dict[str, tuple[int, ...]]:
    """The state dict of the published NPBGPlusPlus system with npbgpp_sphere.yaml (the
    training-only VGG loss, LPIPS and metric modules left out)."""
    out = {f"feature_extractor.encoder.{k}": v for k, v in spnasnet_encoder().items()}
    out |= {"feature_extractor.mean": (1, 3, 1, 1), "feature_extractor.std": (1, 3, 1, 1)}
    # decoder: in = previous width (320 first), skip = encoder levels reversed then raw RGB
    for i, (cin, skip, cout) in enumerate(zip((320, 256, 128, 64, 32), (96, 40, 24, 16, 3),
                                              (256, 128, 64, 32, 16), strict=True)):
        out[f"feature_extractor.decoder.blocks.{i}.block.0.weight"] = (cout, cin + skip, 3, 3)
    out["feature_extractor.final.weight"] = (8, 16, 1, 1)  # bias=False
    out |= {"aggregator.harmonic_embedding.frequencies": (3,), "aggregator.alpha": (6, 1),
            "aggregator.mlp.0.weight": (16, 18), "aggregator.mlp.0.bias": (16,),
            "aggregator.mlp.2.weight": (16, 16), "aggregator.mlp.2.bias": (16,),
            "aggregator.mlp.4.weight": (6, 16), "aggregator.mlp.4.bias": (6,)}
    filters, raster = (16, 32, 48, 64, 80), 9
    blocks = {"start": (raster, filters[0]), "center": (filters[4], filters[4])}
    for i in range(1, 5):
        blocks[f"down{i}.conv"] = (filters[i - 1], filters[i] - raster)
    cin = filters[4]
    for i, cout in zip((4, 3, 2, 1), (48, 24, 12, 6), strict=True):  # out_channels (3) * 16, 8, 4, 2
        blocks[f"up{i}.conv"] = (cin + filters[i - 1], cout)
        cin = cout
    for name, (bin_, bout) in blocks.items():
        for conv in ("conv_f", "conv_m"):
            out |= {f"refiner.{name}.block.{conv}.weight": (bout, bin_, 3, 3),
                    f"refiner.{name}.block.{conv}.bias": (bout,)}
    out |= {"refiner.final.weight": (3, 6, 1, 1), "refiner.final.bias": (3,)}
    out |= {"rgb_converter.lin1.weight": (3, 8), "rgb_converter.lin1.bias": (3,),
            "rgb_converter.lin2.weight": (8, 3), "rgb_converter.lin2.bias": (8,),
            "rasterizer.bg_feature": (1, 8, 1, 1), "bg_rgb": (1, 3, 1, 1)}
    return out


def _numbers(layout: dict[str, tuple[int, ...]]) -> int:
    return sum(int(torch.Size(s).numel()) for k, s in layout.items() if not k.endswith("num_batches_tracked"))


class _Payload:
    """Unpickling this creates ``flag``: proof that a reader ran code from the file."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self):
        return (builtins.open, (self.flag, "w"))


def save_published_checkpoint(path: str, layout: dict[str, tuple[int, ...]], system_target: str,
                              flag: str, omegaconf: bool = True) -> dict[str, torch.Tensor]:
    """A checkpoint as published training writes it (Lightning 1.4.8 dump_checkpoint of a
    module whose hparams were updated with the Hydra config): random tensors under the
    published names, ``hyper_parameters`` a dict whose config groups are OmegaConf
    DictConfigs (``omegaconf=False``: plain dicts, as a re-saved file may hold). A payload
    planted among the callback states creates ``flag`` if anything unpickles the file."""
    from omegaconf import OmegaConf

    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=gen) if s else torch.tensor(7)) for k, s in layout.items()}
    system_cfg = {"system_class": {"_target_": system_target}, "descriptor_dim": 8, "visibility_scale": 1.0,
                  "aggregator": {"_target_": "npbgplusplus.modeling.SphereAggregator", "type": "learnable_v", "m": 6},
                  "refiner": {"_target_": "npbgplusplus.modeling.RefinerUnetV2", "filters": [16, 32, 48, 64, 80]}}
    hparams = {"system": OmegaConf.create(system_cfg) if omegaconf else system_cfg,
               "weights_path": None, "eval_only": False}
    ckpt = {"epoch": 35, "global_step": 1234, "pytorch-lightning_version": "1.4.8", "state_dict": state,
            "callbacks": {"planted": _Payload(flag)} if omegaconf else {},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}],
            "lr_schedulers": [], "hyper_parameters": hparams}
    torch.save(ckpt, path)
    return state


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("tinydata")), ("sceneA",))


def test_the_stated_differences_hold_for_both_layouts():
    """What the refusal says is checked against our model and the published layout: the
    refiner maps tensor for tensor, the decoder / basis shapes match, the encoders do not,
    and the activation slopes differ."""
    from npbgpp_core.models import NPBGPlusPlus, NPBGPlusPlusConfig
    from npbgpp_core.published import DIFFERENCES

    ours = {k: tuple(v.shape) for k, v in NPBGPlusPlus(NPBGPlusPlusConfig()).state_dict().items()}
    published = published_npbgpp_layout()
    # refiner: one to one by renaming, same shapes, nothing left over on either side
    conv_names = {"conv_f": "feature", "conv_m": "gate"}
    renamed = {}
    for k, shape in published.items():
        if not k.startswith("refiner."):
            continue
        rest = k[len("refiner."):]
        if rest.startswith("final."):
            renamed["refiner.head." + rest[len("final."):]] = shape
            continue
        module, leaf = rest.split(".block.")
        conv, param = leaf.split(".")
        renamed[f"refiner.{REFINER_NAMES[module]}.{conv_names[conv]}.{param}"] = shape
    assert renamed == {k: v for k, v in ours.items() if k.startswith("refiner.")}
    # decoder and basis MLP: equal shapes (the function differs: DIFFERENCES)
    for i in range(5):
        decoder_conv = published[f"feature_extractor.decoder.blocks.{i}.block.0.weight"]
        assert decoder_conv == ours[f"extractor.decoder.{i}.conv.weight"]
    for i in (0, 2, 4):
        for p in ("weight", "bias"):
            assert published[f"aggregator.mlp.{i}.{p}"] == ours[f"basis.net.{i}.{p}"]
    # encoders: counts as the refusal states them
    enc_pub = {k: v for k, v in published.items() if k.startswith("feature_extractor.encoder.")}
    enc_ours = {k: v for k, v in ours.items() if k.startswith("extractor.encoder.")}
    assert (len(enc_pub), _numbers(enc_pub)) == (378, 2_765_400)
    text = DIFFERENCES[0]
    assert f"{len(enc_pub)} tensors, {_numbers(enc_pub):,} numbers" in text
    assert f"{len(enc_ours)} tensors, {_numbers(enc_ours):,} numbers" in text
    assert sum(k.endswith("running_mean") for k in enc_pub) == 63 and not any("running" in k for k in enc_ours)
    # activation slopes: the published nn.LeakyReLU() default against ours
    model = NPBGPlusPlus(NPBGPlusPlusConfig())
    slopes = {m.negative_slope for part in (model.basis, model.extractor.decoder)
              for m in part.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.2} and torch.nn.LeakyReLU().negative_slope == 0.01
    assert "0.01 there, 0.2 here" in DIFFERENCES[1]


def _check_refused_everywhere(path: str, system: str, data_root: str, tmp_path) -> None:
    from headless_train.checkpoints import CheckpointError, load_checkpoint_file
    from npbgpp_core.models.extractor import FeatureExtractor
    from npbgpp_core.pretrained import WeightsError, load_pretrained_npbgpp, read_weights

    name = os.path.basename(path)
    said = rf"{name} is a checkpoint of the published NPBG\+\+ code \(npbgplusplus, system {system}"
    with pytest.raises(WeightsError, match=said):
        read_weights(path, "npbgpp")
    with pytest.raises(WeightsError, match=said):
        load_pretrained_npbgpp(path)
    with pytest.raises(CheckpointError, match=said):
        load_checkpoint_file(path)
    with pytest.raises(ValueError, match=f"extractor_weights: .*{said}"):
        FeatureExtractor(weights=path)
    from headless_train.cli import run

    run_dir = str(tmp_path / f"run_{system}")
    with initialize_config_module("headless_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            f"datasets.data_root={data_root}", "datasets=nerf_blender_one_scene", "datasets.scene_name=sceneA",
            "system=npbgpp_sphere", f"weights_path={path}", f"system.descriptors_save_dir={run_dir}/descriptors"])
    with pytest.raises(CheckpointError, match=said):
        run(cfg, run_dir)


def test_a_published_npbgpp_checkpoint_is_refused_by_name_without_unpickling(data_root, tmp_path):
    flag = str(tmp_path / "unpickled")
    path = str(tmp_path / "npbgpp_h3ds.ckpt")
    save_published_checkpoint(path, published_npbgpp_layout(), "npbgplusplus.modeling.NPBGPlusPlus", flag)
    before = open(path, "rb").read()
    # before this refusal: torch's weights_only page about an unsupported global
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(path, weights_only=True)
    _check_refused_everywhere(path, "npbgpp_sphere", data_root, tmp_path)
    from npbgpp_core.pretrained import WeightsError, read_weights

    with pytest.raises(WeightsError) as info:
        read_weights(path, "npbgpp")
    message = str(info.value)
    assert "spnasnet_100" in message and "0.01 there, 0.2 here" in message and "align_corners=True" in message
    assert "Published NPBG++ checkpoints" in message
    assert not os.path.exists(flag)
    assert open(path, "rb").read() == before
    assert not os.path.exists(tmp_path / "run_npbgpp_sphere" / "checkpoints")


def test_published_files_with_plain_hyper_parameters_and_other_systems(data_root, tmp_path):
    """One saved without OmegaConf objects loads under weights_only: its state-dict names
    still identify it. The mean variant, NPBG and coefficients_ft files are named as such."""
    from npbgpp_core.pretrained import WeightsError, read_weights

    flag = str(tmp_path / "unpickled")
    plain = str(tmp_path / "plain.ckpt")
    save_published_checkpoint(plain, published_npbgpp_layout(), "npbgplusplus.modeling.NPBGPlusPlus", flag,
                              omegaconf=False)
    torch.load(plain, weights_only=True)  # readable: refused for what it holds
    _check_refused_everywhere(plain, "npbgpp_sphere", data_root, tmp_path)

    layout = published_npbgpp_layout()
    mean = {k: v for k, v in layout.items() if not k.startswith("aggregator.")}
    refiner_only = {k: v for k, v in layout.items() if k.startswith(("refiner.", "rasterizer.", "bg_rgb"))}
    coefficients = refiner_only | {k: v for k, v in layout.items() if k.startswith("aggregator.")}
    for layout_, target, system in ((mean, "npbgplusplus.modeling.NPBGPlusPlus", "npbgpp_mean"),
                                    (refiner_only, "npbgplusplus.modeling.NPBG", "npbg"),
                                    (coefficients, "npbgplusplus.modeling.NPBG", "coefficients_ft")):
        path = str(tmp_path / f"{system}.ckpt")
        save_published_checkpoint(path, layout_, target, flag)
        with pytest.raises(WeightsError, match=rf"{system}.ckpt is a checkpoint of the published NPBG\+\+ code "
                                               rf"\(npbgplusplus, system {system}"):
            read_weights(path, "npbgpp")
    assert not os.path.exists(flag)


def test_other_files_keep_their_own_messages(tmp_path):
    """Only the published code's files get this refusal: our checkpoints, a foreign
    pickle and a non-zip file do not."""
    from npbgpp_core.published import pickle_names, refusal

    ours = str(tmp_path / "ours.ckpt")
    torch.save({"state_dict": {"model.refiner.first.feature.weight": torch.zeros(1)}}, ours)
    assert refusal(ours) is None and "model.refiner.first.feature.weight" in (pickle_names(ours) or set())
    foreign = str(tmp_path / "foreign.ckpt")
    torch.save({"x": torch.nn.Linear(1, 1)}, foreign)
    assert "torch.nn.modules.linear.Linear" in (pickle_names(foreign) or set())
    assert refusal(foreign) is None
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    assert pickle_names(str(text)) is None and refusal(str(text)) is None
