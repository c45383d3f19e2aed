"""NPBG (the published recipe): learnable descriptors + background per scene (RMSprop lr
0.1, state reset every epoch) and one refiner shared by all scenes (Adam 1e-4). The
optimisers and the step loss are ``npbgpp_core.fitting``'s, shared with the add-on's
fitting loop."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from npbgpp_core.fitting import npbg_optimizers, npbg_step_loss
from npbgpp_core.models import NPBG, NPBGConfig

from ..checkpoints import BACKGROUND_SUFFIX, load_descriptors, save_scene_files
from .base import BaseSystem, module_key

log = logging.getLogger(__name__)


class NPBGSystem(BaseSystem):
    system_name = "npbg"

    def __init__(self, cfg: dict, scenes: list):
        super().__init__(cfg, scenes)
        self.scene_models = nn.ModuleDict()
        for sid, name in enumerate(self.scene_names):
            self.scene_models[module_key(name)] = NPBG(int(self._points_cpu[sid].shape[0]), self.npbg_config())
        first = self.scene_model(0)
        self.refiner = first.refiner  # one refiner shared by every scene
        for sid in range(1, len(self.scene_names)):
            self.scene_model(sid).refiner = self.refiner
        pretrained = self.scfg.get("descriptors_pretrained_dir")
        if pretrained:
            self.load_pretrained_descriptors(str(pretrained))

    def npbg_config(self) -> NPBGConfig:
        """The network of every scene (coefficients_ft overrides it)."""
        return NPBGConfig.from_options(self.scfg)

    def scene_model(self, scene_id: int) -> NPBG:
        return self.scene_models[module_key(self.scene_names[scene_id])]

    def load_pretrained_descriptors(self, folder: str) -> None:
        for sid, name in enumerate(self.scene_names):
            m = self.scene_model(sid)
            dropped = int(self.scenes[sid].metadata.get("points_dropped") or 0)  # by max_points / n_point
            t = load_descriptors(folder, name, m.num_points, m.num_points + dropped)
            if t.shape[1] != m.descriptors.shape[1]:
                raise ValueError(
                    f"descriptor file {folder}/{name} has {t.shape[1]} numbers per point, "
                    f"system {self.system_name} needs {m.descriptors.shape[1]}"
                )
            with torch.no_grad():
                m.descriptors.copy_(t)
            self.after_descriptors_loaded(m, t)
            if m.environment is not None:
                self.load_pretrained_background(folder, name, m)
        log.info("descriptors of %d scene(s) loaded from %s", len(self.scene_names), folder)

    def after_descriptors_loaded(self, model: NPBG, descriptors: torch.Tensor) -> None:
        """Hook (coefficients_ft marks unseen points inactive)."""

    def load_pretrained_background(self, folder: str, name: str, model: NPBG) -> None:
        """Start the scene's environment map from ``<folder>/<name>.background`` (written by
        an NPBG++ evaluation with ``background='environment'``); zeros ("not observed") with
        a warning when the file is missing. It lies in the frame of the run's world_up, which
        coefficients_ft takes from the coefficients beside it (cli.resolve_coefficients_frame)."""
        assert model.environment is not None
        path = os.path.join(folder, name + BACKGROUND_SUFFIX)
        if not os.path.isfile(path):
            log.warning("no environment map %s%s: scene %s starts from zeros", name, BACKGROUND_SUFFIX, name)
            return
        t = load_descriptors(folder, name + BACKGROUND_SUFFIX)
        shape = tuple(model.environment.shape)
        if t.numel() != model.environment.numel() or t.shape[0] != shape[0]:
            raise ValueError(f"environment map {folder}/{name}{BACKGROUND_SUFFIX} holds {tuple(t.shape)} values, "
                             f"system {self.system_name} needs {shape}")
        with torch.no_grad():
            model.environment.copy_(t.reshape(shape))

    def descriptor_params(self) -> list[nn.Parameter]:
        return [p for sid in range(len(self.scene_names)) for p in self.scene_model(sid).descriptor_parameters()]

    def configure_optimizers(self):
        lr_descriptors = float(self.scfg.get("lr_descriptors", 0.1))
        lr_refiner = float(self.scfg.get("lr_refiner", 1e-4))
        rms, adam = npbg_optimizers(self.descriptor_params(), self.refiner.parameters(), lr_descriptors, lr_refiner)
        return [rms, adam]

    def on_train_epoch_start(self) -> None:
        # The published recipe restarts the descriptor optimiser every epoch.
        self.optimizer_list()[0].optimizer.state.clear()

    def step_loss(self, sample: dict, loss_fn) -> torch.Tensor:
        """The recipe's step loss (``npbg_step_loss``) on one training sample."""
        sid = int(sample["scene"])
        target = sample["image"].to(self.device).unsqueeze(0)
        mask = sample["mask"].to(self.device).unsqueeze(0)
        return npbg_step_loss(self.scene_model(sid), self.points(sid), sample["camera"].to(self.device), target, mask,
                              loss_fn)

    def sample_loss(self, sample: dict):
        loss = self.step_loss(sample, self.loss_fn)
        return loss, {"render": loss}

    def render_eval(self, scene_id: int, camera) -> torch.Tensor:
        return self.scene_model(scene_id).render(self.points(scene_id), camera.to(self.device))

    def save_scene_descriptors(self, folder: str, scene_id: int) -> str:
        """The scene's descriptors, and its environment map when the model has one, so that a
        run started from this folder (``descriptors_pretrained_dir``) gets the learnt map, not
        zeros. coefficients_ft's coefficients record world_up when they were fitted rendering
        upright about it (without, the axis played no part in them, and a run from the folder
        renders them as they were fitted: in the view's frame)."""
        model = self.scene_model(scene_id)
        upright = model.config.use_basis and model.config.align_during_rendering
        return save_scene_files(folder, self.scene_names[scene_id], model.descriptors, model.environment,
                                model.config.world_up if upright else None)

    def load_initial_weights(self, ckpt: dict, path: str) -> None:
        self.load_matching(ckpt["state_dict"], path, required_prefixes=("refiner.",))
