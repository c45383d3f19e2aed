"""Checkpoint files: atomic writes (temp file + os.replace, the previous file survives any
failure), clear errors for corrupt / foreign checkpoints, per-scene descriptor files.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only, so a planted pickle payload is refused before any of it runs. What
Lightning and headless_train write needs no other type; :data:`SAFE_GLOBALS` lists any
that a future Lightning version might add."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from npbgpp_core.atomic import atomic_copy_file, atomic_write_bytes
from npbgpp_core.memory import is_out_of_memory
from npbgpp_core.pretrained import TRAINER_META_KEY
from npbgpp_core.published import refusal

from .lifeline import EXIT_SIGINT, EXIT_SIGTERM  # a run stopped by Ctrl-C / SIGTERM (128 + N)

if TYPE_CHECKING:
    from npbgpp_core.pretrained import WeightsFile

log = logging.getLogger(__name__)

META_KEY = TRAINER_META_KEY  # the metadata npbgpp_core.pretrained reads back
FORMAT_VERSION = 1

# Which system's weights each system can start from (weights_path).
COMPATIBLE_SOURCES = {
    "npbgpp": {"npbgpp"},
    "npbg": {"npbg"},
    "coefficients_ft": {"npbgpp", "coefficients_ft"},
}


# Extra (non-tensor) types a checkpoint may hold. Every entry is code the unpickler may
# call, so it stays empty unless Lightning starts storing such an object.
SAFE_GLOBALS: tuple[Any, ...] = ()


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or from another system."""


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save into memory, then :func:`atomic_write_bytes`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _missing_hint(path: str) -> str:
    """What a missing checkpoint's folder holds, so the right name can be picked; the published
    NPBG command lines seed from ``<run>/result/checkpoints/``, this trainer writes ``<run>/checkpoints/``."""
    folder = os.path.dirname(path) or "."
    published = os.path.join("result", "checkpoints")
    if not os.path.isdir(folder) and os.path.normpath(folder).endswith(published):
        folder = os.path.normpath(folder)[: -len(published)] + "checkpoints"
        note = "; runs keep their checkpoints in <run dir>/checkpoints/, not result/checkpoints/"
    else:
        note = ""
    if not os.path.isdir(folder):
        return ""
    names = sorted(f for f in os.listdir(folder) if f.endswith(".ckpt"))
    return f" ({folder} holds {', '.join(names) if names else 'no .ckpt file'}{note})"


def _foreign_file(path: str) -> str:
    """Why ``path`` cannot be a torch.save file, judged from its first bytes ('' when it may be):
    torch.load of anything else answers with a page about weights_only that misleads."""
    from npbgpp_core.file_kind import HEAD_SIZE, KIND_NAMES, file_kind

    with open(path, "rb") as f:
        head = f.read(HEAD_SIZE)
    kind = file_kind(head)
    if kind in ("zip", "pickle"):
        return ""
    if kind == "safetensors":
        return (f"not a torch checkpoint: it is {KIND_NAMES[kind]}; weights files are recognised by the "
                ".safetensors suffix")
    if kind:
        return f"not a torch checkpoint: it is {KIND_NAMES[kind]}"
    return f"corrupt or not a torch checkpoint: it starts with {head[:8]!r}, neither a zip archive nor a pickle"


def earlier_checkpoints(ckpt_dir: str) -> list[str]:
    """The checkpoints a run writes (``last.ckpt``, ``epoch{N}.ckpt``) that ``ckpt_dir`` already
    holds, sorted: a new (not resumed) training run there would replace them."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(n for n in os.listdir(ckpt_dir) if n == "last.ckpt" or re.fullmatch(r"epoch\d+\.ckpt", n))


def load_checkpoint_file(path: str, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict with a clear error for missing or corrupt files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}{_missing_hint(path)}")
    foreign = _foreign_file(path)
    if foreign:
        raise CheckpointError(f"checkpoint {path} is {foreign}")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        published = refusal(path)  # a published npbgplusplus file: say so, not 'a reference to omegaconf'
        if published:
            raise CheckpointError(published) from exc
        text = str(exc)
        glob = re.search(r"GLOBAL (\S+)", text)
        reason = re.search(r"WeightsUnpickler error: ([^\n.]+)", text)
        if glob or reason:
            what = f"a reference to {glob.group(1)}" if glob else reason.group(1)  # type: ignore[union-attr]
            raise CheckpointError(
                f"checkpoint {path} holds {what}, not only tensors and plain data; refused without running it "
                "(checkpoints are loaded with weights_only=True)"
            ) from exc
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - every parse failure means a damaged file
        if is_out_of_memory(exc):  # a checkpoint too big for this computer, not a damaged one
            raise
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no state_dict (not a Lightning checkpoint)")
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"checkpoint {path}: state_dict must map names to tensors")
    published = refusal(path, state)  # one saved with plain-data hyper-parameters
    if published:
        raise CheckpointError(published)
    return ckpt


def weights_file_checkpoint(weights: str | WeightsFile, world_up: list[float] | None = None) -> dict:
    """The network of NPBG++ weights file ``weights`` (:mod:`npbgpp_core.pretrained`, e.g. a
    bundled one; its path, or the file as ``read_weights(path, "npbgpp")`` returned it to a
    caller that read it already) as a headless_train NPBG++ checkpoint dict with the file's
    own config, so that ``weights_path=`` can start or evaluate a run from it; ``world_up``
    replaces the file's. WeightsError / FileNotFoundError naming the file."""
    from npbgpp_core.pretrained import read_weights

    wf = read_weights(weights, "npbgpp") if isinstance(weights, str) else weights
    config = dict(wf.config)
    if world_up is not None:
        config["world_up"] = list(world_up)
    return _file_checkpoint(wf.path, "npbgpp", "model.", wf.state, config)


def refiner_file_checkpoint(path: str) -> dict:
    """The refiner of NPBG refiner weights file ``path`` (the bundled
    ``npbg_refiner_procedural.safetensors``, ``export-weights`` of an NPBG run) as a
    headless_train NPBG checkpoint dict, so that ``weights_path=`` can start an NPBG run
    from it."""
    from npbgpp_core.pretrained import read_weights

    wf = read_weights(path, "npbg_refiner")
    dim = int(wf.config.get("descriptor_dim", wf.config.get("feature_dim", 8)))
    return _file_checkpoint(path, "npbg", "refiner.", wf.state, {"descriptor_dim": dim})


def _file_checkpoint(path: str, system: str, prefix: str, state: dict, config: dict) -> dict:
    """A checkpoint dict of ``system`` seeded from weights file ``path``: its float ``state``
    under ``prefix``, step 0, no fitted scenes."""
    return {"state_dict": {prefix + k: v.float() for k, v in state.items()}, "global_step": 0,
            META_KEY: {"system": system, "config": {"name": system, **config}, "scenes": [], "points": [],
                       "version": FORMAT_VERSION, "seeded_from": os.path.abspath(path)}}


def load_source_checkpoint(path: str) -> dict:
    """What ``weights_path=`` (and ``export --checkpoint``) names: a headless_train
    checkpoint, or a weights file (``.safetensors``: the bundled networks,
    ``export-weights`` output) of an NPBG++ network or an NPBG refiner."""
    if path.lower().endswith(".safetensors"):
        if not os.path.isfile(path):
            raise CheckpointError(f"weights file not found: {path}")
        from npbgpp_core.pretrained import describe

        try:
            kind = describe(path).get("kind")
        except Exception:  # noqa: BLE001 - read_weights below names what is wrong with the file
            kind = None
        return refiner_file_checkpoint(path) if kind == "npbg_refiner" else weights_file_checkpoint(path)
    return load_checkpoint_file(path)


def network_differences(ckpt: dict, path: str, system_config: dict) -> list[tuple[str, Any, Any]]:
    """``(option, checkpoint's value, this run's value)`` for every NPBG++ network option
    (:class:`NPBGPlusPlusConfig`) in which an NPBG++ checkpoint differs from the run's
    system config: the run would build another network than the one trained. ``world_up``
    is left out: it belongs to the scenes (their up axis), not to the weights."""
    from npbgpp_core.models import NPBGPlusPlusConfig

    source, source_cfg = checkpoint_system(ckpt, path)
    if source != "npbgpp":
        return []

    def network(options: dict) -> NPBGPlusPlusConfig:
        # world_up left out before the config is built: the run's may still be text
        # (system.world_up=auto or an axis name, resolved from the cameras later)
        return NPBGPlusPlusConfig.from_options({k: v for k, v in options.items() if k != "world_up"})

    try:
        a, b = network(source_cfg), network(system_config)
    except (TypeError, ValueError):
        return []  # a bad config is reported where the network is built
    return a.differences(b)


def checkpoint_system(ckpt: dict, path: str) -> tuple[str, dict]:
    """(system name, system config) stored by headless_train in a checkpoint."""
    meta = ckpt.get(META_KEY)
    if not isinstance(meta, dict) or "system" not in meta:
        raise CheckpointError(f"checkpoint {path} was not written by headless_train (no '{META_KEY}' metadata)")
    scenes, points = meta.get("scenes", []), meta.get("points", [])
    well_formed = (
        isinstance(meta["system"], str) and isinstance(meta.get("config", {}), dict)
        and isinstance(scenes, list) and all(isinstance(x, str) for x in scenes)
        and isinstance(points, list) and all(isinstance(x, int) and x >= 0 for x in points)
        and (not points or len(points) == len(scenes))
        and all(isinstance(ckpt.get(k, 0), int) for k in ("global_step", "epoch"))
    )
    if well_formed:
        try:
            json.dumps(meta.get("config", {}), allow_nan=True)  # the config travels into model cards and bundles
        except (TypeError, ValueError):
            well_formed = False
    if not well_formed:
        raise CheckpointError(f"checkpoint {path}: malformed '{META_KEY}' metadata (system name, config, scene names "
                              "and point counts) or step counters")
    clouds = meta.get("point_clouds")
    if clouds is not None and not (isinstance(clouds, list) and len(clouds) == len(scenes)
                                   and all(c is None or isinstance(c, str) for c in clouds)):
        # export names the recorded cloud to the loader: a damaged entry gave a TypeError naming nothing
        raise CheckpointError(f"checkpoint {path}: malformed '{META_KEY}' metadata: point_clouds is {clouds!r:.80}, "
                              f"not a list of one .ply path (or null) per scene of {scenes}")
    digests = meta.get("point_digests")
    if digests is not None and not (isinstance(digests, list) and len(digests) == len(scenes)
                                    and all(isinstance(d, str) for d in digests)):
        # a damaged digest would turn the check of a cloud's points off without a word
        raise CheckpointError(f"checkpoint {path}: malformed '{META_KEY}' metadata: point_digests is "
                              f"{digests!r:.80}, not a list of one SHA-256 text per scene of {scenes}")
    return meta["system"], dict(meta.get("config", {}))


def check_compatible(ckpt: dict, path: str, system_name: str, system_config: dict | None = None) -> str:
    """Raise CheckpointError unless the checkpoint's system can seed ``system_name``.

    For NPBG++ the aggregator must match too (sphere vs mean have different modules)."""
    source, source_cfg = checkpoint_system(ckpt, path)
    allowed = COMPATIBLE_SOURCES.get(system_name, {system_name})
    if source not in allowed:
        raise CheckpointError(
            f"checkpoint {path} was trained by system '{source}', which cannot seed system '{system_name}' "
            f"(expected one of: {', '.join(sorted(allowed))})"
        )
    if system_config is not None and source == "npbgpp" and system_name == "npbgpp":
        a, b = source_cfg.get("aggregator"), system_config.get("aggregator")
        if a and b and a != b:
            raise CheckpointError(
                f"checkpoint {path} is NPBG++ with aggregator '{a}' but system=npbgpp_{b} was requested"
            )
    return source


# An NPBG++ scene's environment map (C + 1, rows * cols) beside its coefficients:
# <folder>/<scene><BACKGROUND_SUFFIX>, the same file format.
BACKGROUND_SUFFIX = ".background"
# safetensors metadata of NPBG++ coefficients <folder>/<scene>: the up axis their views were
# aligned about when they were aggregated (JSON list). Maps written with one earlier are read
# as any map: the coefficients' record is the run's axis.
WORLD_UP_KEY = "world_up"


def save_descriptors(folder: str, scene_name: str, tensor: torch.Tensor,
                     world_up: Sequence[float] | None = None) -> str:
    """Write a float32 [n_points, D] tensor to ``<folder>/<scene_name>`` (safetensors, atomic).
    ``world_up``: the up axis NPBG++ coefficients were aggregated about, recorded in the
    file's metadata (:func:`recorded_world_up`) so that coefficients_ft started from them
    takes it."""
    from safetensors.torch import save as st_save

    t = tensor.detach().float().cpu().contiguous()
    if t.dim() != 2:
        t = t.reshape(t.shape[0], -1)
    path = os.path.join(folder, scene_name)
    metadata = None if world_up is None else {WORLD_UP_KEY: json.dumps([float(v) for v in world_up])}
    atomic_write_bytes(path, st_save({"descriptors": t}, metadata=metadata))
    return path


def save_scene_files(folder: str, scene_name: str, coefficients: torch.Tensor, environment: torch.Tensor | None,
                     world_up: Sequence[float] | None) -> str:
    """A scene's descriptors ``<folder>/<scene_name>`` (recording ``world_up`` when given) and,
    when it has one, its environment map ``<scene_name>.background`` [C + 1, rows * cols], so
    that a run started from the folder (``descriptors_pretrained_dir``) gets both. The path
    of the descriptors."""
    path = save_descriptors(folder, scene_name, coefficients, world_up)
    if environment is not None:
        env = environment.detach()
        save_descriptors(folder, scene_name + BACKGROUND_SUFFIX, env.reshape(env.shape[0], -1))
    return path


def _descriptor_kind(path: str) -> str | None:
    from npbgpp_core.file_kind import HEAD_SIZE, file_kind

    with open(path, "rb") as f:
        return file_kind(f.read(HEAD_SIZE))


def recorded_world_up(path: str) -> tuple[float, float, float] | None:
    """The up axis NPBG++ coefficients file ``path`` records (:func:`save_descriptors`), read
    from its header only; None when it records none (written before the record existed, or
    a torch.save'd tensor) or its header cannot be read (:func:`load_descriptors` then names
    the damage). ValueError naming the file for a record that is not a direction."""
    from safetensors import safe_open

    from npbgpp_core.models.alignment import check_world_up

    if _descriptor_kind(path) != "safetensors":
        return None
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - load_descriptors names what is wrong with the file
        return None
    record = meta.get(WORLD_UP_KEY)
    if record is None:
        return None
    try:
        return check_world_up(json.loads(record))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"descriptor file {path}: unreadable {WORLD_UP_KEY} record: {exc}") from None


def load_descriptors(folder: str, scene_name: str, n_points: int | None = None,
                     whole_cloud: int | None = None) -> torch.Tensor:
    """Read ``<folder>/<scene_name>`` (safetensors, or a torch.save'd plain tensor) -> float32 [N, D].
    ``whole_cloud``: the point count of the scene's cloud before this run subsampled it to
    ``n_points`` (seed 123); a file with that many rows (an NPBG++ evaluation that kept every
    point) gives the rows of the kept points, in their order."""
    path = os.path.join(folder, scene_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"descriptor file not found: {path} (run the NPBG++ evaluation first?)")
    try:
        if _descriptor_kind(path) == "safetensors":
            from safetensors.torch import load_file

            t = load_file(path)["descriptors"]
        else:
            t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        if is_out_of_memory(exc):  # descriptors too many for this computer's memory: not a bad file
            raise
        raise ValueError(f"cannot read descriptor file {path}: {exc}") from exc
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"descriptor file {path} must hold one 2-D tensor [n_points, D]")
    if n_points is not None and whole_cloud is not None and t.shape[0] == whole_cloud != n_points:
        # the published evaluate -> fine-tune lines: evaluation without max_points, the fine-tune with it
        from npbgpp_core.datasets.scene_data import subsample_indices

        t = t[torch.from_numpy(subsample_indices(whole_cloud, n_points, seed=123))]
        log.info("descriptor file %s holds the whole cloud (%d points): took the rows of the %d points this run "
                 "keeps (seed 123)", path, whole_cloud, n_points)
    if n_points is not None and t.shape[0] != n_points:
        raise ValueError(
            f"descriptor file {path} has {t.shape[0]} rows but the scene's cloud has {n_points} points: a run "
            "must read the cloud (datasets.pc_name) and subsample it (datasets.n_point / system.max_points) as "
            f"the run that wrote the file did{writer_cloud_note(folder)}"
        )
    return t.float()


def writer_cloud_note(folder: str) -> str:
    """'; that run (<run dir>) had datasets.pc_name=... ...' from the Hydra config of the run
    whose ``descriptors/`` folder ``folder`` is (the default ``system.descriptors_save_dir``),
    so a mismatch names the setting to copy; '' when there is no such config."""
    config = os.path.join(os.path.dirname(os.path.abspath(folder)), ".hydra", "config.yaml")
    if not os.path.isfile(config):
        return ""
    try:
        import yaml

        with open(config, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        datasets, system = cfg.get("datasets") or {}, cfg.get("system") or {}
        values = {"datasets.pc_name": datasets.get("pc_name"), "datasets.n_point": datasets.get("n_point"),
                  "system.max_points": system.get("max_points")}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return ""
    settings = " ".join(f"{k}={'null' if v is None else v}" for k, v in values.items())
    return f"; that run ({os.path.dirname(os.path.dirname(config))}) had {settings}"


# ----------------------------------------------------------------------------------------
# Lightning integration
import pytorch_lightning as pl  # noqa: E402
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402
from pytorch_lightning.callbacks import Checkpoint  # noqa: E402


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that never leaves a half-written file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, str(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(str(path), map_location=map_location or "cpu")


@contextlib.contextmanager
def _worker_deaths_ignored() -> Iterator[None]:
    """While the final checkpoint is written, a dying DataLoader worker must not raise in
    the main process (torch's SIGCHLD handler does): restore the default SIGCHLD."""
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


class EpochAndLastCheckpoint(Checkpoint):
    """Writes checkpoints/epoch{N}.ckpt and last.ckpt after every training epoch, refreshes
    last.ckpt every ``every_n_steps`` optimizer steps, and on Ctrl-C / SIGTERM / a crash
    writes last.ckpt before the process ends (so ``resume=true`` can continue). A run that
    ``max_steps`` or ``should_stop`` ends mid-epoch has its last.ckpt written at its last
    batch's end, so that a resume continues that epoch, and that epoch's file is a copy of
    it (also unfinished). With
    ``keep_epochs=N`` only the N newest epoch files are kept (short epochs otherwise fill
    the disk); ``None`` keeps every one, as the published paths (``epoch38.ckpt``) expect.

    The save on an interruption happens only when this run has taken an optimizer step
    that is not on disk yet: a run that fails at start never replaces a good last.ckpt.
    :attr:`exit_status` is 130 after Ctrl-C, 143 after SIGTERM, else None.

    While training runs, a Ctrl-C only sets a flag and the KeyboardInterrupt is raised at the
    next batch boundary (Lightning does the same with SIGTERM). Raised at an arbitrary bytecode
    it can land inside a library's bookkeeping: between TensorBoard's writer queue taking an
    event and waking its thread, the shutdown's flush then waited for the writer's 120 s flush
    interval. A second Ctrl-C stops at once.

    A Lightning ``Checkpoint``, so that Lightning runs it after every other callback, in
    whatever order the list gives them: a stop another callback requests at a batch's end
    (``should_stop``) is then seen at that batch's end here. Run before such a callback, the
    epoch ended early and its checkpoints (the epoch file and last.ckpt) recorded it
    finished, so a resumed run skipped the rest of it."""

    def __init__(self, dirpath: str, every_n_steps: int = 0, keep_epochs: int | None = None):
        from .data import DataConfigError, config_number

        # a bare int() turned 1.5 into 1 and 'abc' / inf into errors not naming the key
        keep_epochs = config_number(keep_epochs, "trainer.keep_epoch_checkpoints", optional=True)
        if keep_epochs is not None and keep_epochs < 1:
            raise DataConfigError(f"trainer.keep_epoch_checkpoints must be null or >= 1, got {keep_epochs}")
        self.dirpath = dirpath
        self.every_n_steps = int(every_n_steps or 0)
        self.keep_epochs = keep_epochs
        self._last_saved_step = -1
        self._start_step: int | None = None
        self.exit_status: int | None = None
        self._sigint_pending = False
        self._sigint_previous: Any = None  # the SIGINT handler replaced while training
        self._at_epoch_end = False  # saving in on_train_epoch_end (see record_epoch_finished)
        self._stopped_mid_epoch: tuple[int, int] | None = None  # (epoch, step) of a stop's last.ckpt

    @property
    def last_path(self) -> str:
        return os.path.join(self.dirpath, "last.ckpt")

    def _save_last(self, trainer: pl.Trainer) -> None:
        # weights_only=False said explicitly: the optimiser and schedulers are what resume needs,
        # and left unset Lightning logged "`weights_only` was not set" at every save
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self._last_saved_step = trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step = trainer.global_step  # after a resume: the restored step
        self._defer_ctrl_c()

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_if_ctrl_c(trainer)  # one that came after the last batch still exits 130
        self._restore_ctrl_c()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_ctrl_c()

    def _defer_ctrl_c(self) -> None:
        """Replace Python's own SIGINT handler (only that one: an ignored SIGINT or a caller's
        handler stays) by :meth:`_on_sigint` while training runs."""
        self._sigint_pending = False
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return
        self._sigint_previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Runs between two bytecodes of the main thread: only set a flag (logging here could
        # re-enter a stream the interrupted code is writing).
        if self._sigint_pending:
            raise KeyboardInterrupt
        self._sigint_pending = True

    def _restore_ctrl_c(self) -> None:
        previous, self._sigint_previous = self._sigint_previous, None
        if previous is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) == self._on_sigint:  # not when Lightning set SIG_IGN since
            signal.signal(signal.SIGINT, previous)

    def _stop_if_ctrl_c(self, trainer: pl.Trainer) -> None:
        """At a batch boundary: raise the KeyboardInterrupt a Ctrl-C asked for."""
        if self._sigint_pending:
            self._sigint_pending = False
            self._restore_ctrl_c()
            log.warning("Ctrl-C: stopping at step %d", trainer.global_step)
            raise KeyboardInterrupt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop_if_ctrl_c(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._stop_if_ctrl_c(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stop_if_ctrl_c(trainer)
        step = trainer.global_step
        if step == self._last_saved_step:
            return
        # A stop mid-epoch writes here, not at the epoch's end that follows: Lightning's
        # checkpoint there records the epoch as finished, so a resumed run skipped the rest of it
        stops = _stops_mid_epoch(trainer)
        if stops or (self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0):
            self._save_last(trainer)
        if stops:
            self._stopped_mid_epoch = (trainer.current_epoch, step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_if_ctrl_c(trainer)
        epoch_path = os.path.join(self.dirpath, f"epoch{trainer.current_epoch}.ckpt")
        if (self._stopped_mid_epoch == (trainer.current_epoch, trainer.global_step)
                and self._last_saved_step == trainer.global_step and _epoch_has_batches_left(trainer)):
            # cut short by a stop: the epoch file is last.ckpt as written at that batch's end, which
            # records the epoch unfinished, so that one copied to last.ckpt resumes the rest of it too
            if trainer.is_global_zero:
                atomic_copy_file(self.last_path, epoch_path)
        else:
            self._at_epoch_end = True
            try:
                trainer.save_checkpoint(epoch_path, weights_only=False)
                # a stop this callback did not see at the batch's end (should_stop set by the module's own
                # hook, which runs after the callbacks') keeps the last.ckpt written there, by
                # every_n_steps, which records the epoch unfinished
                if trainer.global_step != self._last_saved_step or not _epoch_has_batches_left(trainer):
                    self._save_last(trainer)
            finally:
                self._at_epoch_end = False
        if self.keep_epochs is not None and trainer.global_rank == 0:
            self._drop_old_epochs(trainer.current_epoch)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._at_epoch_end:
            record_epoch_finished(checkpoint)

    def _drop_old_epochs(self, current: int) -> None:
        """Remove epoch{N}.ckpt files older than the ``keep_epochs`` newest (written last)."""
        for name in os.listdir(self.dirpath):
            stem = name[len("epoch"):-len(".ckpt")] if name.startswith("epoch") and name.endswith(".ckpt") else ""
            if stem.isdigit() and int(stem) <= current - self.keep_epochs:
                os.remove(os.path.join(self.dirpath, name))

    def _why_not_save(self, trainer: pl.Trainer) -> str | None:
        """None when the interrupted state should be written, else the reason it is not."""
        step = trainer.global_step
        if self._start_step is None or step <= self._start_step:
            return "this run took no training step"
        if self._last_saved_step < 0 and os.path.isfile(self.last_path):
            try:
                on_disk = int(load_checkpoint_file(self.last_path).get("global_step", -1))
            except (CheckpointError, TypeError, ValueError):
                on_disk = -1
            if on_disk >= step:
                return f"the file holds step {on_disk}, this run only reached step {step}"
        return None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        self._restore_ctrl_c()
        if isinstance(exception, KeyboardInterrupt):
            self.exit_status = EXIT_SIGINT
        elif isinstance(exception, SIGTERMException):
            self.exit_status = EXIT_SIGTERM
        if isinstance(exception, OSError | FloatingPointError):  # not after a full disk or a NaN loss
            return
        name = type(exception).__name__
        if trainer.global_step == self._last_saved_step:
            log.warning("interrupted (%s): saved %s at step %d (written when that step ended)", name,
                        self.last_path, trainer.global_step)
            return
        why_not = self._why_not_save(trainer)
        if why_not is not None:
            log.warning("interrupted (%s): %s kept as it was (%s)", name, self.last_path, why_not)
            return
        try:
            # No barrier here: under DDP the other processes may not have failed.
            if trainer.global_rank == 0:
                with _worker_deaths_ignored():
                    state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                    atomic_torch_save(state, self.last_path)
                self._last_saved_step = trainer.global_step
            log.warning("interrupted (%s): saved %s at step %d", name, self.last_path, trainer.global_step)
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            log.error("could not save %s after %s: %s", self.last_path, name, exc)


def record_epoch_finished(checkpoint: dict) -> None:
    """Make a checkpoint taken in ``on_train_epoch_end`` record its epoch as finished, the
    state Lightning itself reaches just after the hook (epoch ``completed`` = ``processed``,
    the next epoch's batch count at 0). Left as taken, a run resumed from it with
    ``trainer.max_steps`` set (every stage call) ended the finished epoch a second time
    (on_train_epoch_end again, without a batch) and numbered the following epochs one too
    far for the samplers (``set_epoch``): the next epoch trained the crops of the one after."""
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(fit, dict) or "epoch_progress" not in fit or "epoch_loop.batch_progress" not in fit:
        return  # another Lightning layout: left as Lightning wrote it
    for tracker in fit["epoch_progress"].values():
        tracker["completed"] = tracker["processed"]
    batches = fit["epoch_loop.batch_progress"]
    batches["current"] = {key: 0 for key in batches["current"]}
    batches["is_last_batch"] = False


def _epoch_has_batches_left(trainer: pl.Trainer) -> bool:
    """Whether the current epoch has batches not trained yet (counted across a resume)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed < trainer.num_training_batches


def _stops_mid_epoch(trainer: pl.Trainer) -> bool:
    """At a batch's end: whether training stops after it (``max_steps`` reached, or
    ``should_stop`` set, e.g. by :class:`TrainTimeLimit`, whose hook must run first) while the
    epoch has batches left."""
    limit_reached = trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step
    return (limit_reached or trainer.should_stop) and _epoch_has_batches_left(trainer)


class TrainTimeLimit(pl.Callback):
    """``trainer.max_minutes``: ends training like ``max_steps`` does (the epoch ends early,
    :class:`EpochAndLastCheckpoint`, which Lightning runs after this callback, sees the stop at
    that batch's end and writes last.ckpt; exit status 0) once this process has
    trained for ``seconds``. Unlike Lightning's ``max_time`` it keeps no state in the
    checkpoint: a resumed run gets the whole budget again, which is what a per-call backstop
    (``stage``) needs."""

    def __init__(self, seconds: float):
        if not seconds > 0:
            raise ValueError(f"trainer.max_minutes must be > 0, got {seconds / 60.0:g}")
        self.seconds = float(seconds)
        self._start: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None or trainer.should_stop:
            return
        # rank 0's clock decides for all (DDP): processes that stop at different steps hang
        if trainer.strategy.broadcast(time.monotonic() - self._start >= self.seconds):
            log.warning("trainer.max_minutes: %.1f min of training reached at step %d, stopping",
                        self.seconds / 60.0, trainer.global_step)
            trainer.should_stop = True
