"""Build the CUDA rasterizer ahead of time: ``python -m kernels.build [--no-gpu]``.

Compiles kernels/csrc into the cache directory that ``load_rasterizer()`` uses
(``$TORCH_EXTENSIONS_DIR/npbgpp_rasterizer``, else ``$NPBGPP_KERNELS_DIR`` or
``~/.cache/npbgpp_kernels``), printing the compiler output. On a machine without a GPU
pass ``--no-gpu`` and set ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``) to choose the
architectures; it needs a CUDA build of torch and nvcc either way.
"""

from __future__ import annotations

import argparse
import sys

from kernels import build_directory, build_extension


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--no-gpu", action="store_true", help="build without a visible GPU (set TORCH_CUDA_ARCH_LIST)")
    parser.add_argument("--quiet", action="store_true", help="do not print the compiler commands")
    args = parser.parse_args(argv)
    try:
        module = build_extension(verbose=not args.quiet, need_gpu=not args.no_gpu)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built {module.__name__} in {build_directory()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
