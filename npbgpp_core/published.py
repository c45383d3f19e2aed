"""Recognising checkpoints of the published NPBG++ code (``npbgplusplus``, Rakhimov et al.
2022: ``npbgpp_h3ds.ckpt``, ``npbgpp_dtu_nm_mvs_ft_epoch35.ckpt``, the ScanNet
``epoch38.ckpt``), so that a user who passes one gets told why it cannot be read instead
of a pickle error.

They cannot be read because this project's NPBG++ network is not the published one: only
the refiner and the shapes of the extractor decoder and the basis MLP match; the
extractor's encoder is another network and two activations and one upsampling differ
(:data:`DIFFERENCES`; the full comparison is in headless_train/README.md, "Published NPBG++
checkpoints"). Renaming tensors would load numbers into a different function.

Recognition never unpickles: :func:`pickle_names` walks the opcodes of the checkpoint's
``data.pkl`` (:mod:`pickletools`) and collects the strings and class references in it; the
published state-dict names (``feature_extractor.encoder.*``, ``refiner.start.block.conv_f.*``)
and Hydra targets (``npbgplusplus.modeling.*``) identify the file. Standard library only
(the add-on's Blender Python may call it)."""

from __future__ import annotations

import pickletools
import zipfile
from collections.abc import Iterable

# data.pkl holds names and structure only (tensors are separate zip entries): a Lightning
# checkpoint's is well under 1 MB; anything far larger is not worth scanning for a message.
MAX_PICKLE_BYTES = 64 << 20

# Where this project's NPBG++ network differs from the published npbgpp_sphere network in
# ways that no renaming or reshaping of tensors bridges (checked by
# tests/test_published_checkpoints.py against both layouts).
DIFFERENCES = (
    "feature-extractor encoder: published timm spnasnet_100 (stem and 21 blocks with BatchNorm: "
    "378 tensors, 2,765,400 numbers); here a stem and 8 blocks with GroupNorm (72 tensors, "
    "380,936 numbers)",
    "LeakyReLU negative slope: 0.01 there, 0.2 here (extractor decoder and basis MLP)",
    "extractor decoder upsampling: bilinear with align_corners=True there, False here",
    "extractor input padding: replicate, centred, before normalisation there; zeros after "
    "normalisation at the bottom/right here",
)

README_SECTION = "headless_train/README.md, 'Published NPBG++ checkpoints'"

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def pickle_names(path: str) -> set[str] | None:
    """Every string constant and class reference (``module.name``) in the ``data.pkl`` of
    the torch zip checkpoint ``path``, read without unpickling; None when ``path`` is no
    readable torch zip (or its pickle is implausibly large)."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [i for i in archive.infolist() if i.filename.endswith("data.pkl") and i.filename.count("/") == 1]
            if len(entries) != 1 or entries[0].file_size > MAX_PICKLE_BYTES:
                return None
            data = archive.read(entries[0])
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, NotImplementedError):
        return None
    names: set[str] = set()
    recent: list[str] = []  # the last two strings: STACK_GLOBAL's module and name
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in _STRING_OPS and isinstance(arg, str | bytes):
                text = arg if isinstance(arg, str) else arg.decode("latin-1")
                names.add(text)
                recent = [*recent[-1:], text]
            elif op.name == "GLOBAL" and isinstance(arg, str):
                names.add(arg.replace(" ", ".", 1))
            elif op.name == "STACK_GLOBAL" and len(recent) == 2:
                names.add(".".join(recent))
    except (ValueError, TypeError):  # a damaged pickle: keep what was read before the damage
        pass
    return names


def published_system(names: Iterable[str]) -> str | None:
    """Which published system a checkpoint holding the state-dict keys / pickle strings
    ``names`` comes from: 'npbgpp_sphere', 'npbgpp_mean', 'npbg', 'coefficients_ft', 'other'
    (some other npbgplusplus file), or None when it is not one of the published code's."""
    names = set(names)
    extractor = any(n.startswith("feature_extractor.encoder.") for n in names)
    refiner = any(n.startswith("refiner.start.block.conv_f.") for n in names)
    basis = "aggregator.mlp.0.weight" in names
    if extractor and refiner:
        return "npbgpp_sphere" if basis else "npbgpp_mean"
    if refiner:
        return "coefficients_ft" if basis else "npbg"
    if any(n.startswith("npbgplusplus.") for n in names):
        return "other"
    return None


def refusal(path: str, names: Iterable[str] | None = None) -> str | None:
    """Why ``path`` cannot be read, when it is a checkpoint of the published code (judged
    from ``names``, its state-dict keys, or else from its pickle by :func:`pickle_names`);
    None when it is not one. The message names the file, the system and what differs."""
    if names is None:
        names = pickle_names(path)
        if names is None:
            return None
    system = published_system(names)
    if system is None:
        return None
    base = f"{path} is a checkpoint of the published NPBG++ code (npbgplusplus"
    if system in ("npbgpp_sphere", "npbgpp_mean"):
        return (f"{base}, system {system}); its weights cannot be used here: this project's NPBG++ network "
                f"is not the published one, so loading them under our names would compute another "
                f"function. Differences: " + "; ".join(DIFFERENCES) + ". Only the refiner matches tensor for "
                f"tensor. Use the bundled weights or a network trained with python -m headless_train "
                f"(see {README_SECTION}).")
    if system in ("npbg", "coefficients_ft"):
        return (f"{base}, system {system}: per-scene descriptors and a refiner); it is not read here: its "
                f"refiner has the same layout as ours (tensors map one to one by name) but no reader for the "
                f"published files exists, and its descriptors belong to the published point clouds. Train "
                f"with python -m headless_train system=npbg instead (see {README_SECTION}).")
    return (f"{base}, no NPBG++ or NPBG state dict recognised); it is not read here "
            f"(see {README_SECTION}).")

