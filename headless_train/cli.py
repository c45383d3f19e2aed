"""``python -m headless_train <hydra overrides>``: train or evaluate one system on one or many
scenes. The config tree is ``headless_train/conf`` (struct mode: unknown keys are errors)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import oom

log = logging.getLogger("headless_train")


class UsageError(ValueError):
    """A configuration that cannot run; the message says what to change."""


def eval_device(gpus_value: Any) -> Any:
    """The device of an ``eval_only`` run: CUDA for ``trainer.gpus`` > 0 when there is one, else
    the CPU. Unlike training, evaluation on the CPU is allowed (the published test line says
    ``trainer.gpus=1``), but the fallback is logged: it ran there without a word."""
    import torch

    from .data import config_number

    gpus = config_number(gpus_value, "trainer.gpus", optional=True) or 0
    if gpus <= 0:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    log.warning("trainer.gpus=%s but no CUDA GPU is available here: evaluating on the CPU (trainer.gpus=0 asks for it)",
                gpus)
    return torch.device("cpu")


def changed_loss_settings(loss_cfg: dict) -> list[str]:
    """The ``loss.*`` keys whose value differs from conf/config.yaml's, as ``loss.key=value``:
    what a user set for a system that reads none of them (coefficients_ft)."""
    defaults = OmegaConf.to_container(OmegaConf.load(os.path.join(os.path.dirname(__file__), "conf", "config.yaml")))
    assert isinstance(defaults, dict)
    own = defaults.get("loss") or {}
    return [f"loss.{k}={v}" for k, v in loss_cfg.items() if k not in own or own[k] != v]


def trainer_kwargs(tcfg: dict, system_name: str) -> dict:
    """Map the published trainer.* keys (trainer.gpus, ...) onto Lightning 2 Trainer arguments."""
    import torch
    from pytorch_lightning.strategies import DDPStrategy

    from .data import config_number

    gpus = config_number(tcfg.get("gpus"), "trainer.gpus", optional=True) or 0
    if gpus > 0:
        if not torch.cuda.is_available():
            raise UsageError(f"trainer.gpus={gpus} but no CUDA GPU is available here; use trainer.gpus=0 (CPU)")
        if gpus > torch.cuda.device_count():
            raise UsageError(f"trainer.gpus={gpus} but only {torch.cuda.device_count()} GPU(s) are visible")
        accelerator, devices = "gpu", gpus
    else:
        accelerator = "cpu"
        devices = config_number(tcfg.get("cpu_processes"), "trainer.cpu_processes", optional=True) or 1
    num_nodes = config_number(tcfg.get("num_nodes"), "trainer.num_nodes", optional=True) or 1
    strategy = tcfg.get("strategy") or "auto"
    if strategy in ("auto", "ddp") and devices * num_nodes > 1:
        # Scenes differ per process (train_data_mode=each), so some parameters see no gradient.
        strategy = DDPStrategy(find_unused_parameters=True)
    counts = {key: config_number(tcfg[key], f"trainer.{key}")
              for key in ("max_epochs", "max_steps", "check_val_every_n_epoch", "reload_dataloaders_every_n_epochs",
                          "log_every_n_steps", "num_sanity_val_steps")}
    return dict(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, **counts,
        limit_train_batches=tcfg["limit_train_batches"], limit_val_batches=tcfg["limit_val_batches"],
        enable_progress_bar=bool(tcfg["enable_progress_bar"]), use_distributed_sampler=False,
    )


def run(cfg: DictConfig, run_dir: str) -> dict | None:
    """Train (or evaluate with eval_only=true) as configured; ``run_dir`` receives checkpoints/,
    tensorboard/, descriptors/, renders/ and metrics.json. The folder is locked for the run
    (:mod:`headless_train.runlock`): a second run into it raises UsageError naming the
    holder's pid. A run stopped by Ctrl-C or SIGTERM raises ``SystemExit(130)`` /
    ``SystemExit(143)`` after saving last.ckpt."""
    from .runlock import RunLock, RunLockedError, is_primary_process

    if not is_primary_process():  # DDP / Slurm: the job's first process holds the lock
        return _run(cfg, run_dir)
    if _EARLY_LOCK is not None and os.path.realpath(_EARLY_LOCK.folder) == os.path.realpath(run_dir):
        return _run(cfg, run_dir)  # taken by LockRunFolder before Hydra wrote into the folder
    try:
        lock = RunLock(run_dir).acquire()
    except RunLockedError as exc:
        raise UsageError(str(exc)) from None
    try:
        return _run(cfg, run_dir)
    finally:
        lock.release()


def _run(cfg: DictConfig, run_dir: str) -> dict | None:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from .checkpoints import (
        EXIT_SIGTERM,
        AtomicCheckpointIO,
        EpochAndLastCheckpoint,
        TrainTimeLimit,
        check_compatible,
        earlier_checkpoints,
        load_checkpoint_file,
        load_source_checkpoint,
        network_differences,
    )
    from .data import SceneDataModule, config_number
    from .evaluate import evaluate
    from .runlock import is_primary_process
    from .systems import build_system
    from .systems.base import check_vgg_weights

    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    scfg = container["system"]
    name = scfg["name"]
    if name != "coefficients_ft":  # which reads no loss.* (coefficients_ft_loss)
        check_vgg_weights(container.get("loss") or {})  # before minutes of loading
    elif not cfg.eval_only and (unread := changed_loss_settings(container.get("loss") or {})):
        log.warning("system=coefficients_ft trains with the published recipe's own loss (L1 at the "
                    "system.loss_factors resolutions) and does not read %s", ", ".join(unread))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    earlier = [] if cfg.resume or cfg.eval_only or not is_primary_process() else earlier_checkpoints(ckpt_dir)
    if earlier:
        # the same command line run twice (resume=true forgotten) replaced a finished run's epoch and last files
        how = ("resume=true continues that run" if "last.ckpt" in earlier else
               "it has no last.ckpt to resume from; weights_path= starts a new run from one of them")
        raise UsageError(f"{ckpt_dir} holds checkpoints of an earlier run ({', '.join(earlier)}), which this new run "
                         f"would replace: {how}; give a new run another hydra.run.dir (or move those files away)")

    oom.step("reading the checkpoints", "")  # weights_path=, resume=true's last.ckpt
    source_ckpt = None
    if cfg.weights_path:
        wp = str(cfg.weights_path)
        source_ckpt = load_source_checkpoint(wp)
        check_compatible(source_ckpt, wp, name, scfg)
        if name == "npbgpp":
            differences = network_differences(source_ckpt, wp, scfg)
            if differences:
                log.warning(
                    "weights_path %s was trained with %s; this run builds %s (a different network: pass the "
                    "checkpoint's values to use it as trained)", wp,
                    " ".join(f"system.{k}={_override(v)}" for k, v, _ in differences),
                    " ".join(f"system.{k}={_override(v)}" for k, _, v in differences))
    resume_path = resume_state = None
    if cfg.resume:
        resume_path = os.path.join(ckpt_dir, "last.ckpt")
        if not os.path.exists(resume_path):  # "checkpoint not found" alone did not say which setting asked for it
            held = earlier_checkpoints(ckpt_dir)
            # with epoch files there, a new run in this folder is refused too (they would be replaced)
            advice = (f" (checkpoints/ holds {', '.join(held)}); start a new run in another hydra.run.dir, from one "
                      "of those with weights_path= if wanted" if held
                      else "; leave resume=true out to start a new run there")
            raise UsageError(f"resume=true continues the run in {run_dir}, but it has no {resume_path}{advice}")
        resume_ckpt = load_checkpoint_file(resume_path)  # fails clearly when corrupt
        check_compatible(resume_ckpt, resume_path, name, scfg)
        if resume_ckpt["npbgpp"]["system"] != name:
            raise UsageError(f"{resume_path} belongs to system '{resume_ckpt['npbgpp']['system']}', not '{name}'")
        check_resumed_warmup(resume_ckpt, resume_path, scfg)
        resumed_meta = resume_ckpt["npbgpp"]
        if source_ckpt is None:
            source_ckpt = resume_ckpt
        if cfg.eval_only:
            resume_state = resume_ckpt["state_dict"]  # evaluated below: the file is read once
        del resume_ckpt

    oom.step("loading the scenes", "")
    datamodule = SceneDataModule(cfg, seed=int(cfg.seed))
    up_spec = scfg.get("world_up")
    resolve_run_world_up(scfg, datamodule.scenes)
    if name == "npbgpp" and cfg.eval_only and cfg.weights_path and resume_path is None:
        note = export_world_up_note(scfg.get("world_up"), str(cfg.weights_path), source_ckpt, datamodule.scenes)
        if note:
            log.warning(note)
    if name == "coefficients_ft":
        # its model continues the resumed checkpoint's, else it is built from weights_path's
        source, source_path = ((resumed_meta, resume_path) if resume_path is not None else
                               ((source_ckpt or {}).get("npbgpp", {}), str(cfg.weights_path or "")))
        resolve_coefficients_frame(scfg, [s.name for s in datamodule.scenes], source, source_path, up_spec)
    if resume_path is not None:
        check_resumed_world_up(resumed_meta.get("config", {}).get("world_up"), resume_path, up_spec,
                               scfg.get("world_up"))
        check_resumed_scenes(resumed_meta, resume_path, name, datamodule.scenes)
    # A resumed run continues the model its checkpoint holds (coefficients_ft builds it from the
    # stored config: its render alignment and up axis), not one rebuilt from weights_path's.
    oom.step("building the model", "")  # not "loading the scenes": they are loaded
    system = build_system(container, datamodule.scenes, {"npbgpp": resumed_meta} if resume_path else source_ckpt)
    if system.loss_message() and not cfg.eval_only:  # an evaluation computes no loss
        log.warning(system.loss_message())
    if cfg.weights_path:
        system.load_initial_weights(source_ckpt, str(cfg.weights_path))
    elif name == "coefficients_ft" and resume_path is None:
        raise UsageError("system=coefficients_ft needs weights_path=<NPBG++ checkpoint> (its frozen basis MLP)")
    seeded_by_npbgpp = source_ckpt is not None and source_ckpt["npbgpp"]["system"] == "npbgpp"
    if name == "coefficients_ft" and not scfg.get("descriptors_pretrained_dir") and seeded_by_npbgpp:
        raise UsageError("system=coefficients_ft needs system.descriptors_pretrained_dir (coefficients written "
                         "by an NPBG++ eval_only run)")
    # a resumed evaluation loads the resumed checkpoint's descriptors (check_resumed_scenes checked them),
    # not weights_path's
    if (cfg.eval_only and name in ("npbg", "coefficients_ft") and resume_path is None and source_ckpt is not None
            and not scfg.get("descriptors_pretrained_dir")):
        check_fitted_scenes(source_ckpt, str(cfg.weights_path), name, datamodule.scenes)
    del source_ckpt

    if cfg.eval_only:
        device = eval_device(container["trainer"].get("gpus"))
        if resume_state is not None:
            system.load_state_dict(resume_state)
            del resume_state
        oom.step("evaluating", evaluation_memory_advice(container), workers_memory_advice(container),
                 fewer_workers_advice(container))
        system.to(device)
        out_dir = scfg.get("descriptors_save_dir") if name == "npbgpp" else None
        return evaluate(system, container, run_dir, write_descriptors=out_dir)

    tcfg = container["trainer"]
    per_epoch = datamodule.per_epoch
    reload_every = config_number(tcfg["reload_dataloaders_every_n_epochs"], "trainer.reload_dataloaders_every_n_epochs")
    if per_epoch and per_epoch < len(datamodule.scenes) and reload_every == 0:
        log.info("rotating %d of %d scenes per epoch: dataloaders are rebuilt every epoch", per_epoch,
                 len(datamodule.scenes))
        tcfg["reload_dataloaders_every_n_epochs"] = 1
    every_n_steps = config_number(tcfg.get("last_checkpoint_every_n_steps"), "trainer.last_checkpoint_every_n_steps",
                                  optional=True)
    saver = EpochAndLastCheckpoint(ckpt_dir, every_n_steps or 0, cfg.trainer.keep_epoch_checkpoints)
    callbacks: list[pl.Callback] = []
    max_minutes = config_number(tcfg.get("max_minutes"), "trainer.max_minutes", float, optional=True)
    if max_minutes is not None:
        # run before the saver (Lightning runs a Checkpoint last): at the batch where the time is up
        # the saver sees the stop and writes last.ckpt mid-epoch
        callbacks.append(TrainTimeLimit(max_minutes * 60.0))
    callbacks.append(saver)
    trainer = pl.Trainer(
        default_root_dir=run_dir,
        logger=TensorBoardLogger(save_dir=run_dir, name="", version="tensorboard"),
        callbacks=callbacks,
        # the saver is the run's checkpoint callback (a Lightning Checkpoint): Lightning adds no
        # ModelCheckpoint of its own and runs the saver after every other callback
        enable_checkpointing=True,
        plugins=[AtomicCheckpointIO()],
        **trainer_kwargs(tcfg, name),
    )
    try:
        with warnings.catch_warnings():
            if resume_path is not None:
                # Lightning warns of any mid-epoch resume whose loader has no state_dict; ours goes on
                # where the checkpoint was taken (data.EpochOrder, data.resumed_batches), so the
                # warning, printed by every stage call, would be false here
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the "
                                        "epoch ended and your dataloader is not resumable")
            # Lightning's own pytree helper builds torch's LeafSpec, deprecated in torch 2.13 (pinned here),
            # at every fit: a FutureWarning addressed to Lightning's code, not to a user of this one
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning, module=r"pytorch_lightning\.utilities\._pytree")
            oom.step("training", training_memory_advice(container), workers_memory_advice(container),
                     fewer_workers_advice(container))
            trainer.fit(system, datamodule=datamodule, ckpt_path=resume_path)
    except SystemExit as exc:
        # Lightning ends a Ctrl-C with exit(1) and a SIGTERM with a bare SystemExit (status
        # 0, which schedulers and `train && export` read as success): report the signal.
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        status = saver.exit_status or (EXIT_SIGTERM if isinstance(exc, SIGTERMException) else None)
        if status is not None:
            log.error("stopped by %s: exit status %d", "SIGTERM" if status == EXIT_SIGTERM else "Ctrl-C", status)
            raise SystemExit(status) from None
        raise
    if trainer.is_global_zero and name in ("npbg", "coefficients_ft") and scfg.get("descriptors_save_dir"):
        paths = system.save_descriptors(str(scfg["descriptors_save_dir"]))
        log.info("descriptors written: %s", ", ".join(paths))
    return None


def training_memory_advice(container: dict) -> str:
    """What needs less memory in training: fewer or smaller samples per step (and fewer input
    views per sample for NPBG++, read and aggregated at twice the crop)."""
    dcfg, lcfg = container.get("datasets") or {}, container.get("dataloader") or {}
    crop = dcfg.get("train_image_size")  # null: whole views, which a crop side makes smaller
    fixes = [f"dataloader.batch_size (now {lcfg.get('batch_size')})",
             "datasets.train_image_size (the crop side, now "
             + ("null: whole views; give one, e.g. 256" if crop is None else f"{crop}") + ")"]
    if dcfg.get("selection_count"):
        fixes.append(f"datasets.selection_count (input views per sample, now {dcfg['selection_count']})")
    advice = f"lower {', '.join(fixes[:-1])} or {fixes[-1]}"
    if dcfg.get("cache_images"):
        advice += f", or datasets.cache_images=false (it holds up to {dcfg.get('cache_images_max_gb')} GB of views)"
    return advice


def fewer_workers_advice(container: dict) -> str:
    """The way to fewer DataLoader workers (none: no batch passes through shared memory)."""
    workers = (container.get("dataloader") or {}).get("num_workers")
    return f"lower dataloader.num_workers (now {workers}; 0 loads the data in the training process, with no worker)"


def workers_memory_advice(container: dict) -> str:
    """What needs less memory when a DataLoader worker was killed: fewer workers (each a process
    holding its own batches) and, with ``cache_images``, fewer decoded views kept in memory."""
    dcfg = container.get("datasets") or {}
    advice = fewer_workers_advice(container)
    if dcfg.get("cache_images"):
        advice += (f", or keep fewer decoded views with datasets.cache_images_max_gb (now "
                   f"{dcfg.get('cache_images_max_gb')}) or datasets.cache_images=false")
    return advice


def evaluation_memory_advice(container: dict) -> str:
    """What needs less memory in an evaluation: it renders each held-out view whole at its own
    size; NPBG++ aggregates its input views at ``datasets.input_view_max_side``."""
    advice = "the evaluation renders each held-out view whole at its own size: evaluate on a computer with more memory"
    if container["system"]["name"] == "npbgpp":
        side = (container.get("datasets") or {}).get("input_view_max_side")
        advice += (", or aggregate smaller input views with datasets.input_view_max_side"
                   + (f" (below {side})" if side else ""))
    return advice


def resolve_run_world_up(scfg: dict, scenes: list) -> None:
    """``system.world_up`` given as ``auto`` (the mean up direction of the scenes' training
    cameras, snapped to an axis within 5 degrees, as the add-on's Up Axis: Auto) or an axis
    name (``+z``, ``-y``, ...) becomes its 3 numbers in ``scfg``, so that the network, the
    checkpoint and its exports all hold the numbers. ValueError naming a bad value."""
    spec = scfg.get("world_up")
    if not isinstance(spec, str):
        return
    from npbgpp_core.models.alignment import resolve_world_up

    cameras = [s.views[i].camera for s in scenes for i in (s.train or range(len(s.views)))]
    try:
        up = resolve_world_up(spec, cameras)
    except ValueError as exc:
        raise UsageError(f"system.world_up: {exc}") from None
    scfg["world_up"] = [float(v) for v in up]
    log.info("system.world_up=%s: %s (from %d cameras of %d scene(s))", spec, _override(scfg["world_up"]),
             len(cameras), len(scenes))


def export_world_up_note(run_up: Any, weights_path: str, source_ckpt: dict | None, scenes: list) -> str | None:
    """A line saying so when this NPBG++ evaluation aggregates a scene about another up axis
    than ``headless_train export`` of the same ``weights_path`` does (a weights file:
    ``--world-up auto`` on the non-held-out views; a checkpoint: the axis its run stored), so
    that metrics.json scores another aggregation than the exported bundle; None when they agree."""
    from npbgpp_core.models.alignment import resolve_world_up, same_world_up

    from .export import aggregated_views

    if weights_path.lower().endswith(".safetensors"):
        how = "--world-up auto, the mean up of the non-held-out cameras"
        ups = [resolve_world_up("auto", [s.views[i].camera for i in aggregated_views(s, "non-held-out")])
               for s in scenes]
    else:
        saved = ((source_ckpt or {}).get("npbgpp") or {}).get("config", {}).get("world_up")
        if saved is None:
            return None
        how = "the system.world_up its run stored"
        ups = [tuple(saved)] * len(scenes)
    try:
        differing = [(s.name, up) for s, up in zip(scenes, ups, strict=True) if not same_world_up(run_up, up)]
    except (TypeError, ValueError):
        return None  # a bad value is reported where the network is built
    if not differing:
        return None
    scene, up = differing[0]
    # the numbers, not auto: this run resolves auto on the training views of all its scenes,
    # export on each scene's non-held-out views (train and val), which differ when val views exist
    if all(same_world_up(u, up) for u in ups):
        fix = f"system.world_up={_override(list(up))} evaluates the bundle export writes"
    else:
        fix = "export's axes differ by scene: evaluate each scene alone with system.world_up= its axis"
    return (f"this evaluation aggregates about system.world_up={_override(list(run_up))}, but `python -m "
            f"headless_train export` of {weights_path} aggregates scene {scene} about {_override(list(up))} ({how}): "
            f"metrics.json and descriptors/ describe another aggregation than the exported bundle; {fix}")


def resolve_coefficients_frame(scfg: dict, scene_names: list[str], source: dict, source_path: str,
                               spec: Any = None) -> None:
    """coefficients_ft's up axis and render alignment, written into ``scfg`` (``world_up``,
    ``align_during_rendering``) before the model is built. The axis is the one its
    ``<scene>`` coefficient files (``descriptors_pretrained_dir``) record: the NPBG++
    evaluation aggregated them about it; a given ``system.world_up`` other than it is
    refused. Files recording none (written before the record): the given axis, else the
    source's, and rendering upright only when asked (``system.align_during_rendering=true``),
    so they render as they did. A continued coefficients_ft checkpoint (``source``: resumed,
    or weights_path) keeps its axis and alignment. ``spec``: world_up as typed, for messages.
    UsageError naming the file and the values."""
    from npbgpp_core.fitting import FIT_ALIGNED
    from npbgpp_core.models.alignment import WORLD_UP, check_world_up, same_world_up

    from .checkpoints import recorded_world_up

    wanted = scfg.get("align_during_rendering")
    if wanted is not None and not isinstance(wanted, bool):
        raise UsageError(f"system.align_during_rendering must be true, false or null, got {wanted!r}")
    given = scfg.get("world_up")
    if given is not None:
        try:
            given = check_world_up(given)
        except ValueError as exc:
            raise UsageError(f"system.world_up: {exc}") from None
    given_text = _override(list(given or ())) if spec is None or spec == scfg.get("world_up") else (
        f"{_override(spec)} -> {_override(list(given or ()))}")
    folder = scfg.get("descriptors_pretrained_dir")
    records = {}
    for path in (os.path.join(str(folder), n) for n in scene_names) if folder else ():
        up = recorded_world_up(path) if os.path.isfile(path) else None
        if up is not None:
            records[path] = up
    record = next(iter(records.items()), None)
    if record and any(not same_world_up(up, record[1]) for up in records.values()):
        raise UsageError("the coefficients of system.descriptors_pretrained_dir were aggregated about different up "
                         "axes (" + ", ".join(f"{p}: {_override(list(up))}" for p, up in records.items())
                         + "): fine-tune those scenes in separate runs")
    if record and given is not None and not same_world_up(given, record[1]):
        raise UsageError(f"coefficients {record[0]} were aggregated about world_up {_override(list(record[1]))} (the "
                         f"run that wrote them), this run was given system.world_up={given_text}: leave it null (the "
                         "run takes the file's)")
    config = source.get("config") if isinstance(source.get("config"), dict) else {}
    if source.get("system") == "coefficients_ft":
        try:
            saved = check_world_up(config.get("world_up", WORLD_UP))
        except ValueError as exc:
            raise UsageError(f"{source_path}: system.world_up: {exc}") from None
        if record and not same_world_up(record[1], saved):
            raise UsageError(f"coefficients {record[0]} were aggregated about world_up {_override(list(record[1]))}, "
                             f"the coefficients_ft checkpoint {source_path} this run continues was trained with "
                             f"system.world_up={_override(list(saved))}: start it from the coefficients that run "
                             "wrote (its descriptors folder)")
        if given is not None and not same_world_up(given, saved):
            raise UsageError(f"{source_path} was trained with system.world_up={_override(list(saved))}; continue it "
                             f"with that value or leave it null (got system.world_up={given_text})")
        had = bool(config.get("align_during_rendering", False))  # absent: written before the choice existed
        if wanted is not None and wanted != had:
            raise UsageError(f"system.align_during_rendering={_override(wanted)}, but the coefficients_ft checkpoint "
                             f"this run continues was trained with {_override(had)}: leave it null")
        up, align = saved, had
    else:
        network = bool(config.get("align_during_rendering", True))
        if wanted and not network:
            raise UsageError(f"system.align_during_rendering=true, but the NPBG++ network {source_path} renders every "
                             "view in its own frame (align_during_rendering=false): leave it null or false")
        if record:
            up, align = record[1], network and (FIT_ALIGNED if wanted is None else wanted)
        else:
            up, align = given or check_world_up(config.get("world_up", WORLD_UP)), bool(wanted)
            if folder and wanted is None:
                log.info("the coefficients in %s record no world_up (written before the record): rendering every "
                         "view in its own frame, as they were; system.align_during_rendering=true renders upright "
                         "about %s", folder, _override(list(up)))
    scfg["world_up"], scfg["align_during_rendering"] = [float(v) for v in up], align


def _override(value: Any) -> str:
    """A config value as a Hydra override writes it (lists without spaces)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _scene_points(scenes: list) -> list[tuple[str, int]]:
    """(name, point count) of each scene, as a checkpoint's ``npbgpp.scenes`` / ``points`` hold them."""
    return [(s.name, int(s.points.shape[0])) for s in scenes]


def _held_points(meta: dict) -> list[tuple[str, int]]:
    """(name, point count) of the scenes a checkpoint's metadata says it was fitted to."""
    return list(zip(meta.get("scenes", []), meta.get("points", []), strict=False))


def _listing(pairs: list[tuple[str, int]]) -> str:
    return ", ".join(f"{n} ({p} points)" for n, p in pairs)


def _changed_clouds(meta: dict, scenes: list) -> list[tuple[str, str | None, str | None]]:
    """(scene, the cloud file the checkpoint records, this run's) for each scene fitted to
    another cloud than this run loads: one of the same size passes the point-count check and
    would get descriptors fitted to other points. With ``point_digests`` the points decide:
    a cloud moved or renamed, or a project folder moved with it, is the same cloud, and the
    recorded file rewritten with other points (a re-run densify, an edited cloud) is not
    (both names then are equal). Checkpoints without digests compare the recorded file
    (path relative to the scene folder, absolute outside it); those written before clouds
    were recorded (no ``point_clouds``) compare nothing. ``meta`` passed
    :func:`~headless_train.checkpoints.checkpoint_system` (check_compatible), which refuses a
    damaged ``point_clouds`` / ``point_digests`` record."""
    from .systems.base import point_cloud_name, points_digest, recorded_digest

    names, clouds = meta.get("scenes", []), meta.get("point_clouds")
    if clouds is None:
        return []
    recorded = dict(zip(names, clouds, strict=True))

    def differs(scene, now: str | None) -> bool:
        digest = recorded_digest(meta, scene.name)  # None: written before digests, the file decides alone
        return digest != points_digest(scene.points) if digest is not None else now != recorded[scene.name]

    return [(s.name, recorded[s.name], now) for s in scenes
            if s.name in recorded and differs(s, now := point_cloud_name(s))]


def _splat_notes(meta: dict, scenes: list, option: str) -> str:
    """The refusals' account of scenes whose point count changed because their splat cloud
    now keeps fewer splats (:func:`~headless_train.systems.base.dropped_splats_note`)."""
    from .systems.base import dropped_splats_note

    held = {n: p for n, p in _held_points(meta) if isinstance(p, int)}
    notes = [dropped_splats_note(s, held[s.name], option) for s in scenes if s.name in held]
    return "".join(f". {n}" for n in notes if n)


def _cloud_listing(mismatches: list[tuple[str, str | None, str | None]], meta: dict) -> str:
    """The refusals' account of :func:`_changed_clouds`, with the rule that applies
    (:func:`_cloud_rule`) after the clouds loaded under another name."""
    def shown(cloud: str | None) -> str:
        return cloud if cloud is not None else "the format's own points (no .ply)"

    def line(n: str, had: str | None, now: str | None) -> str:
        if had == now:  # only a recorded digest tells these apart
            return f"scene {n} was fitted to {shown(had)}, which now holds other points"
        return f"scene {n} was fitted to {shown(had)}, this run loads {shown(now)}"

    text = "; ".join(line(*m) for m in mismatches)
    return text + (f", {_cloud_rule(meta)}" if any(had != now for _, had, now in mismatches) else "")


def _cloud_rule(meta: dict) -> str:
    """How a checkpoint recognises its cloud, for the refusals: by its points when it records
    them, else only by the recorded file."""
    if isinstance(meta.get("point_digests"), list):
        return "and other points: a moved or renamed cloud is accepted when its points are unchanged"
    return ("and this checkpoint records no point digest (written before they were), so only the recorded file "
            "is accepted: put the cloud back there")


def check_fitted_scenes(ckpt: dict, path: str, system_name: str, scenes: list) -> None:
    """UsageError when an NPBG / coefficients_ft evaluation's checkpoint holds no descriptors
    fitted to one of its scenes (another scene, another point count, or another cloud:
    :func:`_changed_clouds`): the refiner loaded, the scene's descriptors stayed at their
    random start (or sat on other points), and the metrics said nothing of it."""
    from .systems.base import module_key

    state = ckpt["state_dict"]
    unfitted = [(n, p) for n, p in _scene_points(scenes)
                if (tensor := state.get(f"scene_models.{module_key(n)}.descriptors")) is None or tensor.shape[0] != p]
    if unfitted:
        held = _listing(_held_points(ckpt["npbgpp"]))
        raise UsageError(f"eval_only=true with system={system_name}: {path} holds no descriptors fitted to "
                         f"{_listing(unfitted)} (it holds {held or 'none'}); evaluate the checkpoint of a run "
                         "fitted on them with the same datasets.* and system.max_points"
                         + _splat_notes(ckpt["npbgpp"], scenes, "datasets.pc_name"))
    other = _changed_clouds(ckpt["npbgpp"], scenes)
    if other:
        raise UsageError(f"eval_only=true with system={system_name}: {path} holds descriptors fitted to another point "
                         f"cloud ({_cloud_listing(other, ckpt['npbgpp'])}); evaluate with the datasets.pc_name of "
                         "that run and the points it was fitted to")


def check_resumed_scenes(meta: dict, path: str, system_name: str, scenes: list) -> None:
    """UsageError when an NPBG / coefficients_ft run resumes on other scenes or other point
    counts than its checkpoint's (their per-point descriptors would not fit: load_state_dict
    answered with a page of unexpected and missing keys), or on another cloud than the one
    it records (:func:`_changed_clouds`; same size: the descriptors would silently sit on
    other points). NPBG++ re-aggregates its points and is never refused here."""
    if system_name not in ("npbg", "coefficients_ft"):
        return  # NPBG++ has no per-scene parameters
    had, now = sorted(_held_points(meta)), sorted(_scene_points(scenes))
    if had and had != now:
        raise UsageError(f"resume=true: {path} holds the descriptors of {_listing(had)}; this run loads "
                         f"{_listing(now)}. Resume with the datasets.* and system.max_points of that run, or start a "
                         "new run folder with weights_path= pointing at it"
                         + _splat_notes(meta, scenes, "datasets.pc_name"))
    other = _changed_clouds(meta, scenes)
    if other:
        raise UsageError(f"resume=true: {path} holds descriptors fitted to another point cloud "
                         f"({_cloud_listing(other, meta)}). Resume with the datasets.pc_name of that run and the "
                         "points it was fitted to, or start a new run folder with weights_path= pointing at it")


def check_resumed_warmup(ckpt: dict, path: str, scfg: dict) -> None:
    """UsageError when ``system.warmup_steps`` turns the warm-up on or off on a resumed run:
    a checkpoint without scheduler state would warm up again from step 0, and one with it
    resumed without a warm-up would keep its reduced lr for good. ValueError naming the
    field for a value that is not an integer >= 0."""
    from npbgpp_core.fitting import warmup_steps_value

    wanted = warmup_steps_value(scfg.get("warmup_steps"), "system.warmup_steps")
    saved = warmup_steps_value(ckpt.get("npbgpp", {}).get("config", {}).get("warmup_steps"),
                               f"{path}: system.warmup_steps")
    if bool(ckpt.get("lr_schedulers")) != (wanted > 0):
        raise UsageError(f"{path} was trained with system.warmup_steps={saved}; resume it with that value "
                         f"(got system.warmup_steps={wanted})")


def check_resumed_world_up(saved: Any, path: str, spec: Any, wanted: Any) -> None:
    """UsageError when a resumed run's ``system.world_up`` (``wanted``, resolved from
    ``spec`` as typed) is another direction than the one its checkpoint was trained with
    (``saved``): the scenes would be aligned in another frame than the descriptors and
    network learned so far. None on either side (coefficients_ft: the source's up, or a
    checkpoint that stored none) is not compared."""
    if saved is None or wanted is None:
        return
    from npbgpp_core.models.alignment import same_world_up

    try:
        same = same_world_up(saved, wanted)
    except ValueError:
        return  # not a direction (a hand-edited checkpoint): nothing to compare with
    if not same:
        given = _override(wanted) if spec is None or spec == wanted else f"{_override(spec)} -> {_override(wanted)}"
        raise UsageError(f"{path} was trained with system.world_up={_override(saved)}; resume it with that value "
                         f"(got system.world_up={given})")


_EARLY_LOCK = None  # the run folder's RunLock when LockRunFolder took it before Hydra wrote into it


class LockRunFolder(Callback):
    """Hydra callback (``hydra.callbacks.run_lock`` in conf/config.yaml) that locks the run
    folder before Hydra writes anything into it (``.hydra/``): Hydra calls it once the run
    (or sweep) folder is known, whatever the command line or the config interpolates into
    it (``outputs/${now:...}``, ``${hydra:job.name}``). The resolved path is written back
    into the config, so Hydra creates exactly the folder that is locked. A folder held by
    another live run exits with status 2, having written nothing into it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._lock(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._lock(config, "sweep")

    @staticmethod
    def _lock(config: DictConfig, mode: str) -> None:
        global _EARLY_LOCK
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict, read_write

        from .runlock import RunLock, RunLockedError, is_primary_process

        if not is_primary_process():  # DDP / Slurm: the job's first process holds the lock
            return
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the folder's name
        folder = os.path.abspath(str(OmegaConf.select(config, f"hydra.{mode}.dir")))
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra[mode].dir = folder  # resolved once: ${now:...} cannot move on
        try:
            _EARLY_LOCK = RunLock(folder, f"hydra.{mode}.dir").acquire()
        except RunLockedError as exc:
            print(_friendly(exc), file=sys.stderr)
            sys.exit(2)


def _friendly(exc: BaseException) -> str:
    return f"error: {exc}"


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from .checkpoints import CheckpointError
    from .data import DataConfigError

    run_dir = HydraConfig.get().runtime.output_dir
    expected = (UsageError, CheckpointError, DataConfigError, OSError, ValueError, TypeError, FloatingPointError)
    try:
        from npbgpp_core.datasets import DatasetError

        expected = expected + (DatasetError,)
    except ImportError:
        pass
    oom.reset()
    try:
        run(cfg, run_dir)
    except expected as exc:
        log.error(_friendly(exc))
        print(_friendly(exc), file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        # out of memory or a DataLoader worker's crash (oom.out_of_memory_exit): the checkpoint saver has
        # already written last.ckpt (atomically) when this run took a step since its last one
        def write(line: str) -> None:
            log.debug("the error", exc_info=True)  # the traceback in the log with hydra.verbose=headless_train
            log.error(line)
            print(line, file=sys.stderr)

        sys.exit(oom.out_of_memory_exit(exc, "cuda", "trainer.gpus=0 (the CPU)" if cfg.eval_only else "", write=write))


# Subcommands handled outside Hydra: name -> (module with a ``main(argv) -> int``, summary).
# Imported only when called, so each keeps its own (possibly heavy) imports.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("headless_train.export", "a trained checkpoint + scene -> a NeuralScene bundle for the add-on"),
    "export-weights": ("headless_train.export_weights", "write a checkpoint's network as a weights file"),
    "average-weights": ("headless_train.average_weights", "mean of several weights files of one run"),
    "fit": ("headless_train.fit", "the short per-scene fit of an aggregated bundle to its photos (Fit to Photos)"),
    "render": ("headless_train.render", "a scene bundle rendered along a dataset's cameras to PNG frames"),
    "check-corpus": ("npbgpp_core.datasets.corpus", "check a training corpus folder"),
    "prepare-capture": ("headless_train.prepare_capture", "downscale and orient a COLMAP capture"),
    "capture-sfm": ("headless_train.capture_sfm", "photos -> COLMAP model (optional pycolmap)"),
    "stage": ("headless_train.stage", "one resumable training stage on a corpus"),
}


def subcommand_help() -> str:
    """The subcommand list printed under Hydra's --help."""
    width = max(len(name) for name in SUBCOMMANDS)
    rows = [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "Subcommands (python -m headless_train NAME --help):\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Entry point: a subcommand of :data:`SUBCOMMANDS` when ``argv`` starts with one,
    otherwise Hydra (the published ``train_net.py`` command lines)."""
    import importlib

    from .lifeline import tie_to_parent_from_env

    # Started by `stage` (or another supervisor): a parent that dies, however, stops this run.
    tie_to_parent_from_env()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        sys.exit(module.main(argv[1:]))
    if argv and argv[0] in ("-h", "--help"):
        print(subcommand_help() + "\n")
    global _EARLY_LOCK
    logging.basicConfig(level=logging.INFO)
    try:
        hydra_main()
    finally:
        if _EARLY_LOCK is not None:
            _EARLY_LOCK.release()
            _EARLY_LOCK = None
