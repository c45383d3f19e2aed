"""NPBG++ training (the published recipe): extractor + basis MLP + refiner, Adam 1e-4,
render loss on the target crop + auxiliary loss (refiner on the target's own feature map)."""

from __future__ import annotations

import contextlib
import logging

import torch

from npbgpp_core.losses import masked_l1
from npbgpp_core.models import NPBGPlusPlus, NPBGPlusPlusConfig
from npbgpp_core.pretrained import widen_for_background

from ..checkpoints import save_scene_files
from ..data import sample_targets
from .base import BaseSystem

log = logging.getLogger(__name__)

class NPBGPlusPlusSystem(BaseSystem):
    system_name = "npbgpp"
    trains_shared_input_targets = True  # a sample's aggregate renders each of its targets

    def __init__(self, cfg: dict, scenes: list):
        super().__init__(cfg, scenes)
        # The network's fields of the system config (every NPBGPlusPlusConfig field; the
        # others, e.g. lr, are the trainer's), as the readers of the run's checkpoints map it
        # (npbgpp_core.pretrained.trainer_checkpoint_weights).
        self.model = NPBGPlusPlus(NPBGPlusPlusConfig.from_options(self.scfg))
        lcfg = cfg.get("loss", {})
        self.aux_weight = float(lcfg.get("aux_weight", 1000.0))
        self.aux_drop_prob = float(lcfg.get("aux_drop_prob", 0.5))
        # The batched step aggregates only the points its input views see (same loss; False
        # is the whole-cloud reference that tests and bench_train compare against).
        self.seen_only_aggregation = True
        self.warmup_steps()  # a bad system.warmup_steps fails before any data is read

    def freeze_batchnorm(self) -> None:
        """BatchNorms of the extractor stay in eval mode (as published; also lets tiny crops train)."""
        for m in self.model.extractor.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.freeze_batchnorm()

    def configure_optimizers(self):
        lr = float(self.scfg.get("lr", 1e-4))
        scale = float(self.scfg.get("background_lr_scale", 1.0))
        projections = getattr(self.model.refiner, "background_proj", None)
        if projections is None or scale == 1.0:
            return self.with_warmup(torch.optim.Adam(self.model.parameters(), lr=lr))
        # The environment projections start at zero when old weights are widened: a larger
        # step lets them reach a useful size in the few hundred steps a CPU stage has.
        own = {id(p) for p in projections.parameters()}
        rest = [p for p in self.model.parameters() if id(p) not in own]
        return self.with_warmup(torch.optim.Adam(
            [{"params": rest}, {"params": list(projections.parameters()), "lr": lr * scale}], lr=lr))

    def aggregate_inputs(self, scene_id: int, images: list[torch.Tensor], cameras: list, variant: int | None = None):
        """Aggregate a sample's input views; views of equal size go through the extractor together."""
        state = self.model.begin_scene(self.points(scene_id, variant))
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, img in enumerate(images):
            groups.setdefault(tuple(img.shape), []).append(k)
        for members in groups.values():
            batch = torch.stack([images[k] for k in members]).to(self.device)
            state.add_views(batch, [cameras[k].to(self.device) for k in members])
        return state.finish()

    # ------------------------------------------------------------- batched step
    def _channels_last(self) -> bool:
        mode = str(self.scfg.get("channels_last", False)).lower()
        return self.device.type == "cpu" if mode == "auto" else mode in ("true", "1", "yes")

    def _autocast(self):
        amp = str(self.scfg.get("amp", "none") or "none").lower()
        if amp not in ("none", "bf16"):
            raise ValueError(f"system.amp must be 'none' or 'bf16', got {amp!r}")
        if amp == "none" or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)

    def batch_loss(self, batch: list[dict]):
        """Mean loss over the batch. With ``system.batched_step`` (default) every sample's
        input views go through the extractor together (one call per padded size), the
        aggregation is one accumulation and one solve, and the targets share one refiner
        call and one auxiliary pass: the same loss as the per-sample loop (which remains
        for targets of different sizes), a fraction of the calls. A sample's extra targets
        (``datasets.targets_per_sample``) render its one aggregate; the loss is the mean over
        every target of the batch."""
        targets = [sample_targets(s) for s in batch]
        same_size = len({tuple(t["image"].shape) for ts in targets for t in ts}) == 1
        if not self.scfg.get("batched_step", True) or not same_size:
            return super().batch_loss(batch)
        self.freeze_batchnorm()
        for s in batch:
            if "input_images" not in s:
                raise ValueError("NPBG++ needs input views: datasets.selection_count must be >= 1")
        dev = self.device
        with self._autocast():
            aggs = self.model.aggregate_batch(
                [(self.points(int(s["scene"]), s.get("points_variant")),
                  [im.to(dev, non_blocking=True) for im in s["input_images"]],
                  [c.to(dev) for c in s["input_cameras"]]) for s in batch],
                channels_last=self._channels_last(), seen_only=self.seen_only_aggregation,
            )
            preds = self.model.render_raw_batch([agg for agg, ts in zip(aggs, targets, strict=True) for _ in ts],
                                                [t["camera"].to(dev) for ts in targets for t in ts])
        target = torch.stack([t["image"] for ts in targets for t in ts]).to(dev, non_blocking=True)
        mask = torch.stack([t["mask"] for ts in targets for t in ts]).to(dev, non_blocking=True)
        pred = torch.stack([p[:3] for p in preds]).float()
        main = self.loss_fn(pred, target, mask)
        logs = {"render": main.detach()}
        loss = main
        if self.aux_weight > 0:
            with torch.no_grad(), self._autocast():  # the auxiliary loss never trains the extractor
                feats = self.model.extractor(target)
            with self._autocast():
                aux_pred = self.model.refine_feature_map(feats.float(), self.aux_drop_prob, detach=True)[:, :3]
            aux = masked_l1(aux_pred.float(), target, mask)
            logs["aux"] = aux.detach()
            loss = loss + self.aux_weight * aux
        return loss, logs

    def sample_loss(self, sample: dict):
        """Loss of one sample: its input views aggregated once, the mean over its targets."""
        self.freeze_batchnorm()
        if "input_images" not in sample:
            raise ValueError("NPBG++ needs input views: datasets.selection_count must be >= 1")
        agg = self.aggregate_inputs(int(sample["scene"]), sample["input_images"], sample["input_cameras"],
                                    sample.get("points_variant"))
        targets = sample_targets(sample)
        target = torch.stack([t["image"] for t in targets]).to(self.device)
        mask = torch.stack([t["mask"] for t in targets]).to(self.device)
        pred = torch.stack([self.model.render_raw(agg, t["camera"].to(self.device))[:3] for t in targets])
        main = self.loss_fn(pred, target, mask)
        logs = {"render": main}
        loss = main
        if self.aux_weight > 0:
            feats = self.model.extractor(target)
            aux_pred = self.model.refine_feature_map(feats, self.aux_drop_prob, detach=True)[:, :3]
            aux = masked_l1(aux_pred, target, mask)
            logs["aux"] = aux
            loss = loss + self.aux_weight * aux
        return loss, logs

    # ------------------------------------------------------------------ eval
    def eval_views(self, scene_id: int) -> list[int]:
        """Aggregation views: every view that is not held out (test, or val when there is no test)."""
        scene = self.scenes[scene_id]
        held = set(scene.test) if scene.test else set(scene.val)
        views = [i for i in range(len(scene.views)) if i not in held]
        return views or list(scene.train)

    def input_view_max_side(self) -> int | None:
        """``datasets.input_view_max_side``: the long side training shrinks input views to."""
        from ..data import config_number

        value = (self.cfg.get("datasets") or {}).get("input_view_max_side")
        return config_number(value, "datasets.input_view_max_side", optional=True)

    @torch.no_grad()
    def prepare_eval(self, scene_id: int) -> None:
        """Aggregate the scene from its non-held-out views, shrunk to
        ``datasets.input_view_max_side`` and read from the same copy as in training (and as
        ``export --max-side`` does): the network sees inputs at the scale it was trained
        on, and the evaluation scores the bundle an export of the run gives."""
        from ..data import input_view_scene, load_input_views

        scene = self.scenes[scene_id]
        source = input_view_scene(scene)  # a nerfstudio images_N/ copy when training reads one
        max_side = self.input_view_max_side()
        state = self.model.begin_scene(self.points(scene_id))
        for i in self.eval_views(scene_id):
            (image,), (camera,) = load_input_views(source, [i], max_side)
            state.add_views(image.to(self.device).unsqueeze(0), [camera.to(self.device)])
        agg = state.finish()
        n_valid = int(agg.valid.sum())
        if n_valid == 0:
            log.warning("scene %s: no point is visible in any input view", scene.name)
        self._eval_cache[scene_id] = agg

    def render_eval(self, scene_id: int, camera) -> torch.Tensor:
        if scene_id not in self._eval_cache:
            self.prepare_eval(scene_id)
        return self.model.render(self._eval_cache[scene_id], camera.to(self.device))

    def coefficients(self, scene_id: int) -> torch.Tensor:
        """Saved descriptive coefficients [ym; beta] of a scene (N, rows*C), zero for unseen points."""
        if scene_id not in self._eval_cache:
            self.prepare_eval(scene_id)
        agg = self._eval_cache[scene_id]
        coef = agg.coefficients * agg.valid[:, None, None].to(agg.coefficients.dtype)
        return coef.reshape(coef.shape[0], -1)

    def save_scene_descriptors(self, folder: str, scene_id: int) -> str:
        """The scene's coefficients, recording the run's world_up (its views were aligned about
        it when they were aggregated: coefficients_ft started from them takes it), and its
        environment map (``<scene>.background``) when it has one."""
        coefficients = self.coefficients(scene_id)  # fills the cache the background is read from
        return save_scene_files(folder, self.scene_names[scene_id], coefficients,
                                self._eval_cache[scene_id].background, self.model.config.world_up)

    def load_initial_weights(self, ckpt: dict, path: str) -> None:
        """The network from ``weights_path``; weights of a model without a background
        start a ``background='environment'`` model with its projections at zero
        (:func:`npbgpp_core.pretrained.widen_for_background`: the same function until trained)."""
        state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        if self.model.config.background != "none":
            inner = widen_for_background({k[len("model."):]: v for k, v in state.items()}, self.model)
            if len(inner) != len(state):
                log.info("weights_path %s has no background projections: added at zero", path)
            state = {"model." + k: v for k, v in inner.items()}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith("model.")]
        if missing or unexpected:
            hint = ("; its network has an environment background: add system.background=environment"
                    if self.model.config.background == "none" and any(".background_proj." in k for k in unexpected)
                    else "")
            raise ValueError(
                f"checkpoint {path} does not fit this NPBG++ model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                f"{hint}"
            )
        log.info("loaded NPBG++ weights from %s", path)
