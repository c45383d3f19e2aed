"""``python -m headless_train export-weights --checkpoint C --out F.safetensors [--fp16]
[--card-json extra.json]``: turn a headless_train checkpoint into a weights file of
:mod:`npbgpp_core.pretrained` (an NPBG++ system -> the whole network, kind ``npbgpp``;
an NPBG system -> its shared refiner, kind ``npbg_refiner``). Written atomically."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from . import oom


class ExportWeightsError(RuntimeError):
    """A checkpoint or card that cannot become a weights file."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m headless_train export-weights", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by headless_train (npbgpp or npbg)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--fp16", action="store_true", help="store tensors as float16 (half the size)")
    p.add_argument("--card-json", default=None, help="JSON file whose keys are added to the model card "
                   "(corpus recipe, time, hardware, metrics, ...)")
    oom.add_debug_flag(p)
    return p.parse_args(argv)


def _run_overrides(checkpoint: str) -> list[str] | None:
    """The Hydra overrides of the run that wrote ``checkpoint`` (<run>/.hydra/overrides.yaml)."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    path = os.path.join(run_dir, ".hydra", "overrides.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return [str(x) for x in data] if isinstance(data, list) else None


def weights_from_checkpoint(ckpt: dict, path: str) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(kind, state dict, model config dict) of a headless_train checkpoint, as
    :func:`npbgpp_core.pretrained.trainer_checkpoint_weights` reads it (the loader of the
    checkpoint itself builds the same network), checked against a freshly built one."""
    from npbgpp_core.pretrained import WeightsError, build_network, trainer_checkpoint_weights

    from .checkpoints import checkpoint_system

    checkpoint_system(ckpt, path)  # CheckpointError naming malformed metadata
    try:
        kind, config, weights = trainer_checkpoint_weights(ckpt, path)
        build_network(kind, config, weights, path)
    except WeightsError as exc:
        raise ExportWeightsError(str(exc)) from None
    return kind, weights, config


def build_card(ckpt: dict, path: str, kind: str, extra: dict[str, Any], fp16: bool, out: str) -> dict[str, Any]:
    from npbgpp_core.pretrained import REGENERATE

    meta = ckpt.get("npbgpp", {})
    card: dict[str, Any] = {
        "kind": kind,
        "system": meta.get("system"),
        "system_config": meta.get("config", {}),
        "steps": int(ckpt.get("global_step", 0)),
        "epochs": int(ckpt.get("epoch", 0)),
        "training_scenes": list(meta.get("scenes", [])),
        "source_checkpoint": os.path.basename(path),
        "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dtype": "float16" if fp16 else "float32",
        "export_command": f"python -m headless_train export-weights --checkpoint {path} --out {out}"
                          + (" --fp16" if fp16 else ""),
        "regenerate": REGENERATE[kind],
    }
    overrides = _run_overrides(path)
    if overrides is not None:
        card["training_overrides"] = overrides
        card["training_command"] = "python -m headless_train " + " ".join(overrides)
    card.update(extra)
    return card


def export_weights(args: argparse.Namespace) -> dict[str, Any]:
    from npbgpp_core.pretrained import save_weights

    from .checkpoints import load_checkpoint_file

    extra: dict[str, Any] = {}
    if args.card_json:
        if not os.path.isfile(args.card_json):
            raise ExportWeightsError(f"card JSON not found: {args.card_json} (--card-json reads an existing JSON "
                                     "file of keys to add to the model card; leave it out for none)")
        try:
            with open(args.card_json, encoding="utf-8") as f:
                extra = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ExportWeightsError(f"card JSON {args.card_json} is not valid JSON: {exc}") from exc
        if not isinstance(extra, dict):
            raise ExportWeightsError(f"card JSON {args.card_json} must hold an object, got {type(extra).__name__}")
    from npbgpp_core.atomic import check_output_suffix

    try:
        check_output_suffix(args.out, ".safetensors")
    except ValueError as exc:
        raise ExportWeightsError(f"--out {exc}") from None
    ckpt = load_checkpoint_file(args.checkpoint)
    kind, state, config = weights_from_checkpoint(ckpt, args.checkpoint)
    card = build_card(ckpt, args.checkpoint, kind, extra, args.fp16, args.out)
    size = save_weights(args.out, state, kind, config, card, fp16=args.fp16)
    return {"out": args.out, "kind": kind, "bytes": size, "steps": card["steps"]}


def main(argv: list[str]) -> int:
    """0 on success, 2 with a one-line message on bad input or when memory runs out
    (:func:`headless_train.oom.run_command`; ``--debug``: the error with its traceback)."""
    from npbgpp_core.pretrained import WeightsError

    from .checkpoints import CheckpointError

    args = parse_args(argv)
    oom.step(f"exporting the weights of {args.checkpoint}", "")

    def body() -> int:
        info = export_weights(args)
        print(f"wrote {info['out']}: {info['kind']} weights after {info['steps']} steps, "
              f"{info['bytes'] / 1e6:.2f} MB")
        return 0

    return oom.run_command(body, (ExportWeightsError, CheckpointError, WeightsError, FileNotFoundError, ValueError),
                           args.debug)
