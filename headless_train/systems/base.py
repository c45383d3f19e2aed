"""What every training system shares: manual optimisation (several optimisers, one step
count), per-scene point tensors, the render loss, validation PSNR, checkpoint metadata."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from npbgpp_core.losses import RenderLoss
from npbgpp_core.metrics import psnr, scored_pair

from ..checkpoints import FORMAT_VERSION, META_KEY

log = logging.getLogger(__name__)


def module_key(scene_name: str) -> str:
    """A scene name usable as an nn.ModuleDict key (no dots)."""
    return "s_" + re.sub(r"[^0-9A-Za-z_]", "_", scene_name)



def process_loss_scale(local_count: Any, global_count: Any, world_size: int) -> Any:
    """The factor on one process's mean loss over its ``local_count`` targets that makes DDP's
    gradient, the average over ``world_size`` processes, the mean over all ``global_count``
    targets: sum_p (n_p W / N) L_p / W = sum_p n_p L_p / N. Without it a process with fewer
    targets (samples with fewer extra targets, a short last batch) weighs each of them more."""
    return local_count * world_size / global_count


def distributed_loss_scale(local_count: int, device: torch.device | str) -> torch.Tensor | float:
    """:func:`process_loss_scale` of this process under ``torch.distributed`` (1.0 alone):
    the global count is one all-reduce of the local ones, on ``device`` (NCCL reduces device
    tensors only); every process of the group must call it at the same step, as backward."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return 1.0
    total = torch.tensor(float(local_count), device=device)
    dist.all_reduce(total)  # sum
    return process_loss_scale(float(local_count), total, dist.get_world_size())


def point_cloud_name(scene) -> str | None:
    """The .ply a scene's cloud came from, relative to its folder (absolute when it lies
    elsewhere, or when no relative path exists: another drive on Windows, where
    ``os.path.relpath`` raises and would stop the checkpoint being saved): what ``export``
    passes as ``pc_name`` so that descriptors meet the cloud they were fitted to. None for a
    cloud that is no .ply (a COLMAP model's points3D, the default of its loader)."""
    path = scene.metadata.get("point_cloud")
    if not path or not str(path).lower().endswith(".ply"):
        return None
    return pc_name_of(str(path), scene.root)


def pc_name_of(path: str, root: str) -> str:
    """The ``pc_name`` that names the file ``path`` from scene folder ``root`` (see
    :func:`point_cloud_name`)."""
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    except ValueError:  # Windows: the cloud is on another drive than the scene folder
        return os.path.abspath(path)
    return os.path.abspath(path) if rel.startswith(os.pardir) else rel.replace(os.sep, "/")


def points_digest(points: Any) -> str:
    """SHA-256 of a scene's cloud as float32 xyz: what identifies the points a run fitted
    descriptors to when the file that held them was moved or renamed (a recorded path does
    not survive moving the project folder)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(points, dtype=np.float32).tobytes()).hexdigest()


def recorded_digest(meta: dict, name: str) -> str | None:
    """The :func:`points_digest` a checkpoint's metadata (``npbgpp``) records for scene
    ``name``'s cloud (``point_digests``), None when it records none (checkpoints written
    before the digests): where it is recorded, the points decide whether a cloud is the one
    the scene's descriptors were fitted to, whatever the file is called. ``meta`` passed
    ``checkpoints.checkpoint_system``, which refuses a damaged ``point_digests`` record."""
    names, digests = meta.get("scenes", []), meta.get("point_digests")
    if digests is None or name not in names:
        return None
    return digests[names.index(name)]


def dropped_splats_note(scene, recorded: int, option: str) -> str:
    """Why scene ``scene`` now has fewer points than the ``recorded`` count its checkpoint's
    descriptors were fitted to, when its cloud tells: a Gaussian-splat file with exactly that
    many splats. Runs before splat clouds kept only the splats with opacity >=
    ``ply.SCENE_MIN_OPACITY`` were fitted to every splat; the point-count refusal said nothing
    of it. ``option``: how the caller names a cloud (``--pc-name``, ``datasets.pc_name``).
    "" when the cloud does not tell."""
    from npbgpp_core.ply import SCENE_MIN_OPACITY, load_ply

    path = scene.metadata.get("point_cloud")
    now = int(scene.points.shape[0])
    if not path or not str(path).lower().endswith(".ply") or now >= recorded:
        return ""
    try:
        every = load_ply(path)  # min_opacity 0: every splat, as such runs read the file
    except (OSError, ValueError):
        return ""
    if not every.is_splat or len(every) != recorded:
        return ""
    plain = os.path.join(os.path.dirname(str(path)), "all_splats.ply")
    # the name the option takes (relative to the scene folder): a splat file in a subfolder
    # (exports/splat.ply) was followed by a bare 'all_splats.ply', which names no file
    named = option_argument(option, pc_name_of(plain, scene.root))
    return (f"{path} is a Gaussian-splat file of {recorded} splats: the run was fitted to every splat, and a splat "
            f"file read as a scene's cloud now keeps those with opacity >= {SCENE_MIN_OPACITY:g} ({now} of them). "
            f"To use this checkpoint, write every splat as a plain cloud ({plain_cloud_command(str(path), plain)}) "
            f"and name that file with {named} (its points are the recorded ones), or fit the scene again")


def plain_cloud_command(splat_path: str, plain_path: str) -> str:
    """The shell command that writes every splat of ``splat_path`` as the plain cloud
    ``plain_path``. It runs as printed in a POSIX shell whatever the paths hold (quotes,
    spaces, ``$``): the paths are JSON-quoted Python literals inside one shell-quoted
    argument; pasted into Python quotes, a path holding ``'`` ended the literal."""
    src, dst = (json.dumps(p, ensure_ascii=False) for p in (splat_path, plain_path))
    code = f"from npbgpp_core.ply import load_ply, save_ply; c = load_ply({src}); save_ply({dst}, c.points, c.colors)"
    return f"python -c {shlex.quote(code)}"


def option_argument(option: str, value: str) -> str:
    """``option`` given ``value`` as typed in a POSIX shell: ``--pc-name VALUE`` (two
    arguments) or the Hydra override ``datasets.pc_name=VALUE``, its value Hydra-quoted when
    Hydra's grammar needs it (a quote, a space, a letter outside ASCII: Hydra's unquoted
    values take ASCII alone), backslashes before a quote doubled, and ``${`` escaped: the
    config (OmegaConf) resolves it as an interpolation, in quotes too."""
    if option.startswith("-"):
        return f"{option} {shlex.quote(value)}"
    if not re.fullmatch(r"[\w./+-]+", value, re.ASCII):
        value = "'" + re.sub(r"(\\*)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'") + "'"
        value = value.replace("${", "\\${")
    return shlex.quote(f"{option}={value}")


def check_vgg_weights(lcfg: dict) -> None:
    """Refuse a ``loss.vgg_weights`` that is no file, naming the option: the core loader's
    'weights file: file not found' did not say which setting gave the path."""
    path = lcfg.get("vgg_weights")
    if path and not os.path.isfile(str(path)):
        raise FileNotFoundError(
            f"loss.vgg_weights={path}: file not found. It names a local torchvision-format VGG-19 weights file "
            "for the perceptual loss (nothing is downloaded): give the path of one, or leave loss.vgg_weights "
            "unset (null) to train with L1 + SSIM instead")


class BaseSystem(pl.LightningModule):
    """Subclasses implement ``sample_loss``, ``prepare_eval``, ``render_eval``,
    ``configure_optimizers`` and ``load_initial_weights``."""

    system_name = "base"

    def __init__(self, cfg: dict, scenes: list):
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        self.scfg = dict(cfg["system"])
        self.scenes = scenes  # SceneData list (not a module; cameras and image paths)
        self.scene_names = [s.name for s in scenes]
        self._points_cpu = [torch.from_numpy(np.ascontiguousarray(s.points, dtype=np.float32)) for s in scenes]
        self._point_digests = [points_digest(p.numpy()) for p in self._points_cpu]  # once: written with every save
        self._points_dev: dict[tuple[int, str], torch.Tensor] = {}
        lcfg = cfg.get("loss", {})
        self._holder: dict[str, Any] = {}
        if self.uses_render_loss:
            check_vgg_weights(lcfg)
            self._holder["loss"] = RenderLoss(
                vgg_weights=lcfg.get("vgg_weights"), vgg_weight=lcfg.get("vgg_weight", 1.0),
                l1_weight=lcfg.get("l1_weight", 2500.0), l1_downsample=lcfg.get("l1_downsample", 4),
                ssim_weight=lcfg.get("ssim_weight", 0.2), gradient_weight=lcfg.get("gradient_weight", 0.0),
                gradient_scales=lcfg.get("gradient_scales", 3),
            )
        self._eval_cache: dict[int, Any] = {}
        from ..data import eval_border_crop, targets_per_sample

        # read as the data module and the evaluation read it: a bare int() took what they
        # accept ("1e1") for an error at the first validation, an epoch into the run
        self.eval_border = eval_border_crop(cfg.get("datasets"))
        count = targets_per_sample(cfg.get("datasets"))
        if count > 1 and not self.trains_shared_input_targets:
            raise ValueError(f"datasets.targets_per_sample={count}: several target views share one set of input "
                             f"views only in system=npbgpp training; system={self.system_name} trains one target "
                             "per sample (its samples would carry views it never renders): leave it at 1")

    uses_render_loss = True
    # Whether sample_loss renders a sample's extra_targets (datasets.targets_per_sample > 1).
    trains_shared_input_targets = False

    # ------------------------------------------------------------------ helpers
    @property
    def loss_fn(self) -> RenderLoss:
        loss = self._holder["loss"]
        if self._holder.get("loss_device") != self.device:
            loss.to(self.device)
            self._holder["loss_device"] = self.device
        return loss

    def points(self, scene_id: int, variant: int | None = None) -> torch.Tensor:
        """A scene's cloud on this device: the default one, or point-cloud variant ``variant``
        (``scene.metadata['point_variants']``, see datasets.point_cloud_variants)."""
        key = (scene_id, str(self.device), variant)
        if key not in self._points_dev:
            self._points_dev = {k: v for k, v in self._points_dev.items() if k[1] == str(self.device)}
            if variant is None:
                cpu = self._points_cpu[scene_id]
            else:
                cloud = self.scenes[scene_id].metadata["point_variants"][variant][1]
                cpu = torch.from_numpy(np.ascontiguousarray(cloud, dtype=np.float32))
            self._points_dev[key] = cpu.to(self.device)
        return self._points_dev[key]

    def loss_message(self) -> str | None:
        loss = self._holder.get("loss")
        return None if loss is None else loss.message

    def metadata(self) -> dict:
        return {"system": self.system_name, "config": self.scfg, "scenes": self.scene_names,
                "points": [int(p.shape[0]) for p in self._points_cpu],
                "point_clouds": [point_cloud_name(s) for s in self.scenes], "point_digests": self._point_digests,
                "version": FORMAT_VERSION}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[META_KEY] = self.metadata()

    # ----------------------------------------------------------------- training
    def sample_loss(self, sample: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def optimizer_list(self) -> list:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, list | tuple) else [opts]

    def warmup_steps(self) -> int:
        """``system.warmup_steps`` (0: none); ValueError naming the field when it is not an
        integer >= 0 (``npbgpp_core.fitting.warmup_steps_value``)."""
        from npbgpp_core.fitting import warmup_steps_value

        return warmup_steps_value(self.scfg.get("warmup_steps"), "system.warmup_steps")

    def with_warmup(self, optimizer: torch.optim.Optimizer):
        """``optimizer`` alone (no warm-up: the run is exactly as without this option), or with
        a LambdaLR that ramps every param group's lr linearly up to its configured value over
        the first ``system.warmup_steps`` optimiser steps (``npbgpp_core.fitting.lr_factor``:
        step s uses (s + 1) / (N + 1)). A fresh Adam moves every weight by about lr on its
        first steps whatever the gradient, which knocks trained weights off their optimum.
        Lightning saves the scheduler in checkpoints, so a resumed run does not warm up again."""
        n = self.warmup_steps()
        if n == 0:
            return optimizer
        from npbgpp_core.fitting import lr_factor

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, 0, n))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def scheduler_list(self) -> list:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return list(schedulers) if isinstance(schedulers, list | tuple) else [schedulers]

    def batch_loss(self, batch: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over the targets of a batch (samples may differ in size): a sample's
        ``sample_loss`` is the mean over its targets (``datasets.targets_per_sample``), so it
        weighs as many targets as it has, as in one mean over every target of the batch."""
        weights = self.sample_weights(batch)
        total, parts, count = None, {}, sum(weights)
        for sample, weight in zip(batch, weights, strict=True):
            loss, logs = self.sample_loss(sample)
            loss = loss if weight == 1 else loss * weight
            total = loss if total is None else total + loss
            for k, v in logs.items():
                parts[k] = parts.get(k, 0.0) + v.detach() * weight / count
        assert total is not None
        return total / count, parts

    def sample_weights(self, batch: list[dict]) -> list[int]:
        """Targets each sample of ``batch`` adds to the mean :meth:`batch_loss` takes: its
        targets when the system renders its extra ones, else 1."""
        from ..data import sample_targets

        return [len(sample_targets(s)) if self.trains_shared_input_targets else 1 for s in batch]

    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        loss, parts = self.batch_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {self.global_step}")
        opts = self.optimizer_list()
        for o in opts:
            o.zero_grad()
        # DDP averages gradients over processes: scaled, they are those of the mean over every
        # process's targets (batch_loss is the mean over this process's); the log keeps the local mean
        self.manual_backward(loss * distributed_loss_scale(sum(self.sample_weights(batch)), self.device))
        opts[0].step()  # the Lightning-wrapped step counts global_step once per batch
        for o in opts[1:]:
            o.optimizer.step()
        for schedule in self.scheduler_list():  # manual optimisation: Lightning steps none itself
            schedule.step()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch))
        for k, v in parts.items():
            self.log(f"train/{k}", v, batch_size=len(batch))
        return loss.detach()

    # --------------------------------------------------------------- evaluation
    def prepare_eval(self, scene_id: int) -> None:
        """Build whatever rendering a scene needs (NPBG++: aggregate its input views)."""

    def render_eval(self, scene_id: int, camera) -> torch.Tensor:
        raise NotImplementedError

    def on_validation_epoch_start(self) -> None:
        self._eval_cache.clear()

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        # the evaluation's PSNR of a view (MetricSuite: clamped, datasets.eval_border_crop cropped),
        # so that on the same views and weights val/psnr is the figure metrics.json gives
        for sample in batch:
            scene_id = int(sample["scene"])
            if scene_id not in self._eval_cache:
                self.prepare_eval(scene_id)
            pred = self.render_eval(scene_id, sample["camera"])
            value = psnr(*scored_pair(pred, sample["image"].to(pred.device), self.eval_border))[0]
            self.log("val/psnr", value, prog_bar=True, batch_size=1, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._eval_cache.clear()

    def on_validation_end(self) -> None:
        """One line with val/psnr to 3 decimals and what it averages: the progress bar rounds
        it to 3 significant figures (14.582 shows as 14.60), and its views (a scene's val
        views, its test views when it has none) and weights (the last finished epoch's; a
        stop mid-epoch runs no validation) need not be those of the test line."""
        trainer = self.trainer
        value = trainer.callback_metrics.get("val/psnr")
        if value is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        views = getattr(trainer.datamodule, "val_summary", None) or "the validation views"
        log.info("validation after step %d (epoch %d): val/psnr %.3f, the mean over %s", trainer.global_step,
                 trainer.current_epoch, float(value), views)

    # ----------------------------------------------------------------- weights
    def load_initial_weights(self, ckpt: dict, path: str) -> None:
        raise NotImplementedError

    def load_matching(self, state: dict[str, torch.Tensor], path: str, required_prefixes: tuple[str, ...]) -> None:
        """Copy every tensor whose name and shape match; fail if a required part is absent."""
        own = self.state_dict()
        loaded, skipped = {}, []
        for k, v in state.items():
            if k in own and own[k].shape == v.shape:
                loaded[k] = v
            elif k in own:
                skipped.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
        for prefix in required_prefixes:
            if not any(k.startswith(prefix) for k in loaded):
                raise ValueError(f"checkpoint {path} has no usable weights for '{prefix}*'")
        self.load_state_dict(loaded, strict=False)
        log.info("loaded %d tensors from %s (%d skipped for shape)", len(loaded), path, len(skipped))
        for s in skipped[:5]:
            log.info("  shape differs: %s", s)

    def save_scene_descriptors(self, folder: str, scene_id: int) -> str:
        """Write one scene's per-point descriptors/coefficients to ``<folder>/<scene>``."""
        raise NotImplementedError

    def save_descriptors(self, folder: str) -> list[str]:
        """Write every scene's descriptors/coefficients; returns the paths."""
        return [self.save_scene_descriptors(folder, sid) for sid in range(len(self.scene_names))]
