"""Bundled pretrained weights: file format, default locations and safe loading.

A weights file is a safetensors file (tensors only, never pickled code) whose string
metadata holds:

- ``format``: ``"npbgpp-weights"`` and ``format_version``: ``"1"``;
- ``kind``: ``"npbgpp"`` (the whole NPBG++ network: extractor, basis MLP, refiner) or
  ``"npbg_refiner"`` (the refiner of an NPBG model trained on the same corpus, the start
  of per-scene NPBG fitting);
- ``config``: JSON of the model config (:class:`NPBGPlusPlusConfig` or :class:`NPBGConfig`);
- ``card``: JSON of the model card (steps, corpus recipe, regeneration command, ...).

Tensors may be stored in fp16 (the bundled files are, to stay small); they are turned
into fp32 on load. This module imports torch only inside its functions, so the Blender
add-on can ask for :func:`default_weights_path` without torch.

Two NPBG++ files are bundled, one per data *domain* (as the published NPBG++ ships one
network per kind of data):

- ``"scene"`` (the default): anything with a real background: photo captures, rooms,
  Blender environments. ``npbgpp_sphere.safetensors``, trained on all of those plus
  objects on white (``background: environment``).
- ``"object"``: a cut-out object composited over a plain colour (RGBA renders such as
  NeRF-Synthetic or the add-on's Export Dataset with transparent film).
  ``npbgpp_sphere_objects.safetensors``, trained on procedural objects on white only; it
  is about 1 dB better than the general file there (``make demo`` (b) 26.96 against 25.48
  dB) and useless on scenes with a background.

:func:`npbgpp_core.datasets.scene_domain` says which domain a loaded scene belongs to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .memory import is_out_of_memory

if TYPE_CHECKING:
    import torch

    from .models import NPBGConfig, NPBGPlusPlus, NPBGPlusPlusConfig

FORMAT_NAME = "npbgpp-weights"
FORMAT_VERSION = "1"
KINDS = ("npbgpp", "npbg_refiner")
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DOMAINS = ("scene", "object")
DEFAULT_DOMAIN = "scene"
# The bundled NPBG++ file of each domain (the module doc says what each is for).
DOMAIN_FILES = {
    "scene": "npbgpp_sphere.safetensors",
    "object": "npbgpp_sphere_objects.safetensors",
}
DEFAULT_FILES = {
    "npbgpp": DOMAIN_FILES[DEFAULT_DOMAIN],
    "npbg_refiner": "npbg_refiner_procedural.safetensors",
}
# The objects file is a historical artifact: the procedural file of 2026-11-28, kept as
# it was (its card, inside the file, names the run); git history restores it byte for byte.
REGENERATE_OBJECTS = (
    "git show 02641b0^:npbgpp_core/weights/npbgpp_sphere_procedural.safetensors > "
    f"npbgpp_core/weights/{DOMAIN_FILES['object']}   (the procedural file of 2026-11-28, trained on objects on "
    "white; its training stages are in npbgpp_core/weights/MODEL_CARD.md, \"Lineage\")"
)
# How to make each file again (also written into the card by export-weights).
REGENERATE = {
    "npbgpp": (
        "python -m headless_train average-weights --fp16 --out "
        f"npbgpp_core/weights/{DEFAULT_FILES['npbgpp']} <the stage snapshots>   (see npbgpp_core/weights/MODEL_CARD.md)"
    ),
    "npbg_refiner": (
        "python -m headless_train export-weights --checkpoint <npbg run>/checkpoints/last.ckpt "
        f"--out npbgpp_core/weights/{DEFAULT_FILES['npbg_refiner']} --fp16   (see npbgpp_core/weights/MODEL_CARD.md)"
    ),
}


class WeightsError(ValueError):
    """A weights file that exists but cannot be used (corrupt, wrong kind, wrong shapes)."""


@dataclass
class WeightsFile:
    """The parsed content of a weights file (tensors already fp32)."""

    path: str
    kind: str
    config: dict[str, Any]
    card: dict[str, Any]
    state: dict[str, torch.Tensor] = field(repr=False)


@dataclass
class RefinerWeights:
    """Pretrained NPBG refiner: ``state`` (fp32, keys of :class:`Refiner`), its ``config``."""

    path: str
    config: NPBGConfig
    card: dict[str, Any]
    state: dict[str, torch.Tensor] = field(repr=False)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown weights kind {kind!r}; expected one of {KINDS}")


def check_domain(domain: str) -> str:
    """``domain`` when it is one of :data:`DOMAINS`; ValueError naming the choices otherwise."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown data domain {domain!r}; expected one of {DOMAINS}")
    return domain


def default_weights_path(kind: str = "npbgpp", domain: str = DEFAULT_DOMAIN) -> str:
    """Where the bundled weights of ``kind`` live (the file may be missing). For
    ``kind='npbgpp'``, ``domain`` picks the file ("scene" or "object"); the NPBG refiner
    has one file for every domain."""
    _check_kind(kind)
    check_domain(domain)
    name = DOMAIN_FILES[domain] if kind == "npbgpp" else DEFAULT_FILES[kind]
    return os.path.join(WEIGHTS_DIR, name)


def bundled_files() -> list[tuple[str, str]]:
    """``(kind, path)`` of every bundled weights file (the files may be missing)."""
    return [("npbgpp", default_weights_path("npbgpp", d)) for d in DOMAINS] + [
        ("npbg_refiner", default_weights_path("npbg_refiner"))]


def is_bundled(path: str) -> bool:
    """Whether ``path`` is one of the bundled weights files (only those have a regeneration
    command; a user's own file does not)."""
    real = os.path.realpath(path)
    return any(os.path.realpath(p) == real for _, p in bundled_files())


def regenerate_hint(kind: str, path: str | None = None) -> str:
    """The command that writes the ``kind`` file at ``path`` again (the bundled objects
    file has its own: it is restored from git history, not retrained)."""
    _check_kind(kind)
    if kind == "npbgpp" and path is not None and os.path.basename(path) == DOMAIN_FILES["object"]:
        return REGENERATE_OBJECTS
    return REGENERATE[kind]


def float_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors converted to ``dtype`` (contiguous, on the CPU); others unchanged."""
    return {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in state.items()
    }


def weights_bytes(state: dict[str, torch.Tensor], kind: str, config: dict[str, Any], card: dict[str, Any],
                  fp16: bool = True) -> bytes:
    """Serialize a weights file (safetensors bytes) for ``kind``."""
    import torch
    from safetensors.torch import save

    _check_kind(kind)
    tensors = float_state(state, torch.float16 if fp16 else torch.float32)
    for k, v in tensors.items():
        if fp16 and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise WeightsError(f"tensor {k} is not finite in fp16 (values beyond +-65504?)")
    metadata = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind,
        "dtype": "float16" if fp16 else "float32",
        "config": json.dumps(config, sort_keys=True), "card": json.dumps(card, sort_keys=True),
    }
    return save(tensors, metadata=metadata)


def save_weights(path: str, state: dict[str, torch.Tensor], kind: str, config: dict[str, Any],
                 card: dict[str, Any], fp16: bool = True) -> int:
    """Write a weights file atomically (temp file + os.replace); returns its size in bytes."""
    from .atomic import atomic_write_bytes

    data = weights_bytes(state, kind, config, card, fp16)
    atomic_write_bytes(path, data, make_dirs=False)
    return len(data)


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def read_weights(path: str, kind: str) -> WeightsFile:
    """Parse and validate a weights file of ``kind``; fp32 tensors on the CPU.

    A weights file (safetensors, see the module doc), or a torch checkpoint (``.pt``,
    ``.pth``, ``.ckpt``), read with ``weights_only=True`` so that no pickled code runs:
    either one written by ``python -m headless_train`` (its network and config as
    :func:`trainer_checkpoint_weights` finds them, the same as ``export-weights``), or a
    dict with ``config``/``model_config`` and ``state_dict``/``model`` (keys optionally
    prefixed ``model.``; its kind is taken as asked). FileNotFoundError (with the
    regeneration command) when missing, :class:`WeightsError` naming the file when it is
    corrupt, of another kind or holds no model config."""
    import torch

    _check_kind(kind)
    if not os.path.isfile(path):
        hint = f"\n  regenerate it with: {regenerate_hint(kind, path)}" if is_bundled(path) else ""
        raise FileNotFoundError(f"{kind} weights file not found: {path}{hint}")
    if path.lower().endswith(CHECKPOINT_SUFFIXES):
        config, card, state = _read_checkpoint(path, kind)
    else:
        config, card, state = _read_safetensors(path, kind)
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"weights file {path}: entry {k} is a {type(v).__name__}, not a tensor")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise WeightsError(f"weights file {path}: tensor {k} holds NaN or infinite values")
    return WeightsFile(path, kind, config, card, float_state(state, torch.float32))


def _read_safetensors(path: str, kind: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        state: dict[str, torch.Tensor] = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for key in f.keys():
                state[key] = f.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - every parse failure means a damaged file
        if is_out_of_memory(exc):  # a file too big for this computer's memory is not a damaged one
            raise
        hint = (f"; replace it, e.g. `git checkout -- {os.path.relpath(path)}` or: {regenerate_hint(kind, path)}"
                if is_bundled(path) else "")
        raise WeightsError(
            f"weights file {path} is corrupt or not a safetensors file ({type(exc).__name__}: {exc}){hint}"
        ) from exc
    if meta.get("format") != FORMAT_NAME:
        raise WeightsError(f"weights file {path} is a safetensors file but not NPBG++ weights "
                           f"(metadata format={meta.get('format')!r}, expected {FORMAT_NAME!r})")
    if meta.get("kind") != kind:
        raise WeightsError(f"weights file {path} holds {meta.get('kind')!r} weights, expected {kind!r}")
    try:
        config = json.loads(meta.get("config", "{}"))
        card = json.loads(meta.get("card", "{}"))
    except json.JSONDecodeError as exc:
        raise WeightsError(f"weights file {path}: unreadable config/card metadata: {exc}") from exc
    return config, card, state


def _read_checkpoint(path: str, kind: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    import torch

    from .published import refusal

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable, truncated, or pickled code refused
        if is_out_of_memory(exc):  # a file too big for this computer's memory is not an unreadable one
            raise
        published = refusal(path)  # a published npbgplusplus file: say so, not 'unsupported global'
        if published:
            raise WeightsError(published) from exc
        raise WeightsError(f"weights file {path} is not a readable torch checkpoint "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(ckpt, dict):
        raise WeightsError(f"weights file {path} holds a {type(ckpt).__name__}, not a dict with a state dict")
    card = {"source": os.path.basename(path)}
    if TRAINER_META_KEY in ckpt:
        found, config, state = trainer_checkpoint_weights(ckpt, path)
        if found != kind:
            raise WeightsError(f"weights file {path} holds {found!r} weights, expected {kind!r}")
        meta = ckpt[TRAINER_META_KEY]
        card.update(system=meta["system"], steps=ckpt.get("global_step", 0))
        return config, card, state
    config = ckpt["config"] if "config" in ckpt else ckpt.get("model_config")
    state_keys = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else {}
    published = refusal(path, [k for k in state_keys if isinstance(k, str)])
    if published:  # plain-data hyper-parameters passed weights_only; the state dict tells
        raise WeightsError(published)
    if config is None:
        # Loading with the default config would build another network than the one trained
        # (world_up, background, input_canvas, ...) or fail on a confusing key mismatch.
        raise WeightsError(f"weights file {path} holds no model config: a torch checkpoint needs a 'config' "
                           f"(or 'model_config') dict beside its 'state_dict', or headless_train's "
                           f"'{TRAINER_META_KEY}' metadata")
    state = ckpt.get("state_dict") or ckpt.get("model")
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise WeightsError(f"weights file {path}: 'config' and 'state_dict' must be dicts")
    prefix = "model."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(config), card, dict(state)


# The metadata headless_train writes into its checkpoints (headless_train.checkpoints):
# {"system": name, "config": the system config, "scenes": [...], ...}.
TRAINER_META_KEY = "npbgpp"
# The scene-independent network each training system holds: state-dict prefix, weights kind.
_TRAINER_NETWORKS = {"npbgpp": ("model.", "npbgpp"), "npbg": ("refiner.", "npbg_refiner")}


def trainer_checkpoint_weights(ckpt: dict[str, Any], path: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """``(kind, model config dict, state dict)`` of the network in a checkpoint written by
    ``python -m headless_train``: an NPBG++ run -> the whole network (``npbgpp``), its
    config from the run's system config (every :class:`NPBGPlusPlusConfig` field stored
    there: ``background``, ``world_up``, ``input_canvas``, ...); an NPBG run -> its shared
    refiner (``npbg_refiner``). The one reading of such a checkpoint, for
    :func:`read_weights` and ``export-weights``. WeightsError naming the file for other
    systems (their weights are per scene) and malformed metadata; tensors unchanged."""
    from .models import NPBGConfig, NPBGPlusPlusConfig

    meta = ckpt.get(TRAINER_META_KEY)
    system = meta.get("system") if isinstance(meta, dict) else None
    scfg = meta.get("config", {}) if isinstance(meta, dict) else None
    state = ckpt.get("state_dict")
    if not isinstance(system, str) or not isinstance(scfg, dict) or not isinstance(state, dict):
        raise WeightsError(f"weights file {path}: malformed headless_train checkpoint (needs "
                           f"'{TRAINER_META_KEY}' metadata with a system name and config, and a 'state_dict')")
    if system not in _TRAINER_NETWORKS:
        raise WeightsError(f"weights file {path}: system '{system}' has no scene-independent weights "
                           "(expected an npbgpp or npbg checkpoint)")
    prefix, kind = _TRAINER_NETWORKS[system]
    try:
        if system == "npbgpp":
            # the checkpoint holds the trained extractor: its starting file is neither read nor recorded
            config = NPBGPlusPlusConfig.from_options(scfg, extractor_weights=None).to_dict()
        else:
            config = NPBGConfig.from_options(scfg).to_dict()
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"weights file {path}: bad {system} config in its '{TRAINER_META_KEY}' metadata: "
                           f"{exc}") from exc
    weights = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
    if not weights:
        raise WeightsError(f"weights file {path}: no {kind} weights (keys '{prefix}*') in its state_dict")
    return kind, config, weights


def build_network(kind: str, config: dict[str, Any], state: dict[str, torch.Tensor], path: str) -> torch.nn.Module:
    """The network a weights file (or a headless_train checkpoint) ``path`` of ``kind``
    holds: an :class:`NPBGPlusPlus` (``npbgpp``) or the :class:`Refiner` of an NPBG model
    (``npbg_refiner``), built from the model ``config`` (the file's dict, read by
    :func:`network_config`) and loaded strictly with ``state``, on the CPU, in train mode.
    The one construction for every reader (:func:`load_pretrained_npbgpp`,
    :func:`load_pretrained_npbg_refiner`, ``headless_train export`` and
    ``export-weights``). An NPBG++ network records ``path`` as the file of its trained
    extractor (``model.extractor.encoder.weights_file``, which the fit's perceptual loss
    asks for). WeightsError naming ``path`` when the config is bad or the state does not
    fit."""
    from .models import NPBG, NPBGPlusPlus

    cfg = network_config(kind, config, path)  # checks kind too
    try:
        module: torch.nn.Module = NPBGPlusPlus(cfg) if kind == "npbgpp" else NPBG(0, cfg).refiner
    except (TypeError, ValueError) as exc:
        raise _bad_config(kind, path, exc) from exc
    what = "NPBG++ network" if kind == "npbgpp" else "NPBG refiner"
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights file {path} does not fit the {what}: {str(exc).splitlines()[0]}") from exc
    if kind == "npbgpp":
        module.extractor.encoder.weights_file = os.fspath(path)
    return module


def network_config(kind: str, config: dict[str, Any], path: str) -> NPBGPlusPlusConfig | NPBGConfig:
    """The model config dict of a weights file ``path`` of ``kind`` as its dataclass
    (:class:`NPBGPlusPlusConfig` or :class:`NPBGConfig`); WeightsError naming ``path``."""
    from .models import NPBGConfig, NPBGPlusPlusConfig

    _check_kind(kind)
    try:
        return NPBGPlusPlusConfig.from_dict(config) if kind == "npbgpp" else NPBGConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise _bad_config(kind, path, exc) from exc


def _bad_config(kind: str, path: str, exc: Exception) -> WeightsError:
    return WeightsError(f"weights file {path}: bad {'NPBG++' if kind == 'npbgpp' else 'NPBG'} config: {exc}")


BACKGROUND_PREFIX = "refiner.background_proj."


def widen_for_background(state: dict[str, torch.Tensor], model: NPBGPlusPlus) -> dict[str, torch.Tensor]:
    """``state`` (NPBG++ network keys) of a model without a background, completed for
    ``model`` with ``background='environment'``: the refiner's background projections it
    lacks are added at zero (weights and bias), so the widened network computes exactly
    the old function until trained. The one way old weights enter such a model (the
    trainer's ``weights_path=``); every other key must already be there. ValueError when
    ``model`` has no background or ``state`` holds only some of the projections."""
    import torch

    own = {k: v for k, v in model.state_dict().items() if k.startswith(BACKGROUND_PREFIX)}
    if not own:
        raise ValueError("widen_for_background: the model has no background projections (background='none')")
    present = sorted(k for k in own if k in state)
    if present and len(present) != len(own):
        raise ValueError(f"widen_for_background: the weights hold only some background projections {present}")
    if present:
        return dict(state)
    return {**state, **{k: torch.zeros_like(v, device="cpu") for k, v in own.items()}}


def load_pretrained_npbgpp(
    path: str | None = None, device: str | torch.device = "cpu", world_up: Sequence[float] | None = None,
    domain: str = DEFAULT_DOMAIN,
) -> NPBGPlusPlus:
    """The NPBG++ network from a weights file, fp32, eval mode. Without ``path``, the
    bundled file of ``domain`` ("scene", the default, or "object": see the module doc and
    :func:`npbgpp_core.datasets.scene_domain`); ``domain`` is ignored when ``path`` is given.

    ``world_up`` is the up axis of the scenes it will aggregate and render (in-plane
    alignment); None keeps the file's (+Z for both bundled files, trained on Blender's Z-up
    scenes). It belongs to the data: pass
    ``npbgpp_core.models.alignment.resolve_world_up('auto', cameras)`` or the axis of your
    dataset's convention (the published rule is +Y)."""
    from .models.alignment import check_world_up

    check_domain(domain)
    if world_up is not None:
        world_up = check_world_up(world_up)  # ValueError about the argument, not the file
    path = path or default_weights_path("npbgpp", domain)
    wf = read_weights(path, "npbgpp")
    config = wf.config if world_up is None else {**wf.config, "world_up": list(world_up)}
    model = build_network("npbgpp", config, wf.state, path)
    model.card = wf.card  # type: ignore[attr-defined]
    return model.to(device).eval()  # type: ignore[return-value]


def load_pretrained_npbg_refiner(path: str | None = None) -> RefinerWeights:
    """The pretrained NPBG refiner (state dict fp32 + config) from a weights file
    (default: the bundled one); checked against a freshly built refiner."""
    path = path or default_weights_path("npbg_refiner")
    wf = read_weights(path, "npbg_refiner")
    build_network("npbg_refiner", wf.config, wf.state, path)
    return RefinerWeights(path, network_config("npbg_refiner", wf.config, path), wf.card, wf.state)  # type: ignore[arg-type]


def describe(path: str) -> dict[str, Any]:
    """kind, dtype, card and size of a weights file (no tensors loaded)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
    return {"path": path, "bytes": os.path.getsize(path), "kind": meta.get("kind"), "dtype": meta.get("dtype"),
            "card": json.loads(meta.get("card", "{}"))}


def check_file(path: str, kind: str | None = None) -> dict[str, Any]:
    """:func:`describe` of a weights file after loading it fully as ``kind`` (default: the
    kind its metadata names) into the network it is for; FileNotFoundError, WeightsError
    or ValueError naming the file when it cannot be used."""
    info = describe(path)
    kind = kind or str(info.get("kind"))
    if kind not in KINDS:
        raise WeightsError(f"weights file {path}: metadata kind {info.get('kind')!r}, expected one of {KINDS}")
    if kind == "npbgpp":
        model = load_pretrained_npbgpp(path)
        info["background"] = model.config.background
        info["world_up"] = list(model.config.world_up)
    else:
        load_pretrained_npbg_refiner(path)
    info["kind"] = kind
    info["valid"] = True
    domain = bundled_domain(path)
    if kind == "npbgpp" and domain:
        info["domain"] = domain
    return info


def bundled_domain(path: str) -> str | None:
    """The data domain of ``path`` when it is one of the bundled NPBG++ files, else None."""
    for domain in DOMAINS:
        if os.path.abspath(path) == os.path.abspath(default_weights_path("npbgpp", domain)):
            return domain
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m npbgpp_core.pretrained [FILE ...]``: load and check weights files (default:
    every bundled one, each as its own kind), then print kind, size and model card; 2 when
    one is missing or unusable."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m npbgpp_core.pretrained",
        description="Load and check NPBG++ weights files (default: every bundled one) and print their model cards.",
    )
    parser.add_argument("files", nargs="*", metavar="FILE", help="weights files (.safetensors) or checkpoints")
    given = parser.parse_args(argv).files
    files: list[tuple[str | None, str]] = [(None, p) for p in given] or list(bundled_files())
    status = 0
    for kind, path in files:
        if not os.path.isfile(path):
            hint = f"; regenerate it with: {regenerate_hint(kind, path)}" if kind else ""
            print(f"{path}: missing{hint}", file=sys.stderr)
            status = 2
            continue
        try:
            info = check_file(path, kind)
        except Exception as exc:  # noqa: BLE001 - any parse or load failure: an unusable file
            print(f"{path}: unusable ({exc})", file=sys.stderr)
            status = 2
            continue
        print(json.dumps(info, indent=2, sort_keys=True))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
