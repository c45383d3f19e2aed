"""Evaluation: render held-out views at native resolution, PSNR / SSIM / LPIPS (or skipped
with the reason) per image and per scene, images beside the ground truth, metrics.json."""

from __future__ import annotations

import json
import logging
import os

import torch
from PIL import Image

from npbgpp_core.datasets.images import eight_bit_levels
from npbgpp_core.metrics import MetricSuite, mean_finite

from .checkpoints import atomic_write_bytes
from .data import check_eval_border, config_number, eval_border_crop

log = logging.getLogger(__name__)


def save_png(image: torch.Tensor, path: str) -> None:
    """(3,H,W) in [0,1] -> 8-bit PNG (eight_bit_levels, the one rounding), written atomically."""
    import io

    arr = eight_bit_levels(image.detach().cpu()).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def held_out_views(scene) -> list[int]:
    """Test views, or validation views when a scene has no test split."""
    return list(scene.test) or list(scene.val)


@torch.no_grad()
def evaluate(system, cfg: dict, run_dir: str, write_descriptors: str | None = None) -> dict:
    """Evaluate every scene of ``system`` and write ``<run_dir>/metrics.json``; returns the dict.

    With ``write_descriptors`` (NPBG++) each scene's coefficients go to ``<dir>/<scene>``."""
    system.eval()
    dcfg, mcfg = cfg["datasets"], cfg.get("metrics", {})
    suite = MetricSuite.create(
        mcfg.get("lpips_vgg_weights"), mcfg.get("lpips_lin_weights"),
        eval_border_crop(dcfg),
        device=str(system.device),
    )
    if suite.lpips_skip_reason:
        log.warning(suite.lpips_skip_reason)
    save_renders = bool(mcfg.get("save_renders", True))
    max_views = config_number(dcfg.get("max_eval_views"), "datasets.max_eval_views", optional=True)
    result: dict = {"system": system.system_name, "lpips": "computed" if suite.lpips else suite.lpips_skip_reason,
                    "border_crop": suite.border, "scenes": {}}
    scene_views = []
    for scene in system.scenes:  # every scene's views are checked before any is rendered
        views = held_out_views(scene)
        if max_views is not None:
            views = views[:max_views]
        if not views:
            raise ValueError(
                f"scene {scene.name} ({scene.root}) has no test or validation views to evaluate: choose them with "
                "+datasets.options.test_indices=[...] (H3DS: +datasets.options.views_config=[...] names the input "
                "views, the others are tested)" + (f"; datasets.max_eval_views={max_views}" if max_views is not None
                                                    else ""))
        check_eval_border(suite.border, scene, views)
        scene_views.append(views)
    for sid, (scene, views) in enumerate(zip(system.scenes, scene_views, strict=True)):
        system.prepare_eval(sid)
        per_image = {}
        for v in views:
            gt = scene.load_image(v)
            pred = system.render_eval(sid, scene.camera(v)).float().cpu()
            per_image[scene.views[v].name] = suite(pred, gt)
            if save_renders:
                base = os.path.join(run_dir, "renders", scene.name, os.path.basename(scene.views[v].name))
                save_png(pred, base + "_pred.png")
                save_png(gt, base + "_gt.png")
        averages = {k: mean_finite([m[k] for m in per_image.values()]) for k in ("psnr", "ssim", "lpips")}
        result["scenes"][scene.name] = {"images": per_image, "mean": averages, "views": len(views)}
        log.info("%s: PSNR %.3f SSIM %.4f LPIPS %s (%d %s views)", scene.name, averages["psnr"] or float("nan"),
                 averages["ssim"] or float("nan"), averages["lpips"], len(views), "test" if scene.test else "val")
        if write_descriptors:
            result["scenes"][scene.name]["descriptors"] = system.save_scene_descriptors(write_descriptors, sid)
        system._eval_cache.pop(sid, None)
    result["mean"] = {k: mean_finite([s["mean"][k] for s in result["scenes"].values()])
                      for k in ("psnr", "ssim", "lpips")}
    path = os.path.join(run_dir, "metrics.json")
    atomic_write_bytes(path, json.dumps(result, indent=2, allow_nan=True).encode())
    log.info("metrics written to %s", path)
    return result
