"""``python -m headless_train average-weights --out F.safetensors [--fp16] A B [C ...]``:
the element-wise mean of weights files of one training run (e.g. the snapshots of the
last stage cycles). With the small, noisy batches of a CPU stage, the mean of a few
late snapshots scores better and more steadily than any one of them. The inputs must
agree on kind, network config and tensor names and shapes; the card is the last
input's with the list of averaged files added. Written atomically."""

from __future__ import annotations

import argparse
import hashlib
import os
from typing import Any

from . import oom


class AverageWeightsError(ValueError):
    """Weights files that cannot be averaged."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m headless_train average-weights", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="weights files (.safetensors) of one kind and config")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--kind", default="npbgpp", help="kind of the inputs (npbgpp or npbg_refiner)")
    p.add_argument("--fp16", action="store_true", help="store tensors as float16 (half the size)")
    oom.add_debug_flag(p)
    return p.parse_args(argv)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def average_weights(inputs: list[str], out: str, kind: str = "npbgpp", fp16: bool = False) -> dict[str, Any]:
    """Write the mean of ``inputs`` to ``out``; returns ``{out, kind, bytes, inputs}``."""
    from npbgpp_core.pretrained import read_weights, save_weights

    if len(inputs) < 2:
        raise AverageWeightsError(f"average-weights needs at least 2 files, got {len(inputs)}")
    from npbgpp_core.atomic import check_output_suffix

    try:
        check_output_suffix(out, ".safetensors")
    except ValueError as exc:
        raise AverageWeightsError(f"--out {exc}") from None
    if os.path.abspath(out) in {os.path.abspath(p) for p in inputs}:
        raise AverageWeightsError(f"--out {out} is one of the inputs")
    files = [read_weights(p, kind) for p in inputs]
    first = files[0]
    for f in files[1:]:
        if f.config != first.config:
            diff = sorted(k for k in set(f.config) | set(first.config) if f.config.get(k) != first.config.get(k))
            raise AverageWeightsError(f"{f.path} has another network config than {first.path} (differs in {diff})")
        if set(f.state) != set(first.state):
            extra = sorted(set(f.state) ^ set(first.state))[:5]
            raise AverageWeightsError(f"{f.path} and {first.path} hold different tensors (e.g. {extra})")
        for k, v in f.state.items():
            if v.shape != first.state[k].shape:
                raise AverageWeightsError(f"{f.path}: tensor {k} is {tuple(v.shape)}, "
                                          f"{first.path} has {tuple(first.state[k].shape)}")
    state = {}
    for k, v in first.state.items():
        if v.is_floating_point():
            state[k] = sum(f.state[k] for f in files[1:]) / len(files) + v / len(files)
        else:  # integer buffers (e.g. BatchNorm's step counter): the last file's
            state[k] = files[-1].state[k]
    from npbgpp_core.pretrained import REGENERATE

    card = dict(files[-1].card)
    card["regenerate"] = REGENERATE[kind]  # the inputs' own hint names their export, not this file
    card["averaged_from"] = [{"file": os.path.basename(f.path), "sha256": _sha256(f.path),
                              "steps": f.card.get("steps")} for f in files]
    size = save_weights(out, state, kind, first.config, card, fp16=fp16)
    return {"out": out, "kind": kind, "bytes": size, "inputs": len(files)}


def main(argv: list[str]) -> int:
    """0 on success, 2 with a one-line message on bad input or when memory runs out
    (:func:`headless_train.oom.run_command`; ``--debug``: the error with its traceback)."""
    from npbgpp_core.pretrained import WeightsError

    args = parse_args(argv)
    oom.step(f"averaging {len(args.inputs)} weights files", "")

    def body() -> int:
        info = average_weights(args.inputs, args.out, args.kind, args.fp16)
        print(f"wrote {info['out']}: mean of {info['inputs']} {info['kind']} weights files, "
              f"{info['bytes'] / 1e6:.2f} MB")
        return 0

    return oom.run_command(body, (AverageWeightsError, WeightsError, FileNotFoundError, ValueError), args.debug)
