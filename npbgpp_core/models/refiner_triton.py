"""Fused inference paths of the refiner (:class:`~npbgpp_core.models.refiner.Refiner`)
in Triton: ``impl="triton"`` (everything between the convolutions, convolutions left to
cuDNN) and ``impl="triton_conv"`` (each gated block one implicit-GEMM kernel).

On a GPU the gated U-Net is bound by memory traffic and elementwise ops, not by matrix
throughput (BENCHMARKS.md, "Status"): the torch path reads and writes every
activation once per ``elu``, ``sigmoid``, product, pool, upsample, ``cat`` and pad.
Here each gated block is

- one cuDNN convolution to ``2 * cout`` channels (feature and gate weights stacked), and
- one epilogue kernel that writes ``elu(feature) * sigmoid(gate)`` straight into the
  buffer the next step reads (for the encoder: the skip tensor, whose raster channels
  the same launch copies in),

and each level change is one kernel that writes the next convolution's padded input
(pool + pad, or bilinear upsample + concat + pad).

``triton_conv`` goes further: one kernel per gated block computes both 3x3 convolutions
as an implicit GEMM (``tl.dot`` over the 9 taps x input channels; TF32 for fp32 where
cuDNN would use it, ``torch.backends.cudnn.allow_tf32``), reads its input through the
pool / upsample + concat / reflect padding on the fly, and stores only the gated result:
no intermediate tensor at all. Whether it beats cuDNN + epilogues on a given GPU is for
bench/gpu_speed.py to measure.

Every kernel names its torch twin in ``refiner.py``; tests/test_refiner_triton.py holds
both paths to the torch one.

Dispatch (``Refiner.impl``, or ``model.render(..., refiner_impl=...)``)
happens only where :func:`supported` says so: CUDA tensors with Triton installed, or CPU
tensors when Triton's interpreter is switched on (``TRITON_INTERPRET=1``: numpy, for
tests only, not a speed path). Anywhere else the torch path runs. The kernels are built
on first use, separately for compiled and interpreted mode (Triton reads the switch
when a kernel is defined), so importing this module never imports Triton.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .refiner import GatedBlock, Refiner

# Tile of one program on a GPU: channels x pixels (pixels contiguous in NCHW).
BLOCK_C, BLOCK_P = 4, 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_version() -> str | None:
    """Triton's version, or None when it is not installed."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def supported(device: torch.device) -> bool:
    """Whether the fused path runs on ``device``: CUDA with Triton, or the CPU under
    Triton's interpreter."""
    if triton_version() is None:
        return False
    if device.type == "cuda":
        return not _interpreting()
    return device.type == "cpu" and _interpreting()


def _kernels() -> SimpleNamespace:
    return _build_kernels(_interpreting())


@functools.cache
def _build_kernels(interpret: bool) -> SimpleNamespace:
    """The Triton kernels, defined under the current interpreter switch."""
    import triton
    import triton.language as tl

    # Pieces the kernels below share. Defined here, with the kernels, so that they follow
    # the interpreter switch at definition as the kernels do; Triton's own @jit helpers
    # (tl.zeros, tl.cdiv, tl.sigmoid) follow the mode Triton was imported in instead,
    # which is why the kernels do without them. Compiled kernels find these in their
    # closure; the interpreter re-executes a kernel's source against this module's
    # globals (closures are lost), so the interpreted ones are published there too.
    @triton.jit
    def _pad_index(i, n, REFLECT: tl.constexpr):
        """Index ``i`` in [-1, n] folded into [0, n): refiner._pad's reflect, else replicate."""
        if REFLECT:
            i = tl.where(i < 0, -i, i)
            i = tl.where(i >= n, 2 * n - 2 - i, i)
        else:
            i = tl.minimum(tl.maximum(i, 0), n - 1)
        return i

    @triton.jit
    def _avg_pool2(at, s_h, s_w, mask):
        """Mean of the 2 x 2 block whose top left is ``at`` (F.avg_pool2d(x, 2)), in fp32."""
        return (tl.load(at, mask=mask, other=0.0).to(tl.float32)
                + tl.load(at + s_w, mask=mask, other=0.0).to(tl.float32)
                + tl.load(at + s_h, mask=mask, other=0.0).to(tl.float32)
                + tl.load(at + s_h + s_w, mask=mask, other=0.0).to(tl.float32)) * 0.25

    @triton.jit
    def _bilinear(base, i, j, hs, ws, scale_h, scale_w, s_h, s_w, mask):
        """F.interpolate(mode="bilinear", align_corners=False) of the (hs, ws) plane at
        ``base`` sampled at output pixel (i, j), in fp32."""
        # align_corners=False: source = (dst + 0.5) * in / out - 0.5, clamped at 0.
        sy = tl.maximum((i.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
        sx = tl.maximum((j.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
        y0 = sy.to(tl.int32)
        x0 = sx.to(tl.int32)
        ly = sy - y0.to(tl.float32)
        lx = sx - x0.to(tl.float32)
        y1 = tl.minimum(y0 + 1, hs - 1)
        x1 = tl.minimum(x0 + 1, ws - 1)
        v00 = tl.load(base + y0 * s_h + x0 * s_w, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(base + y0 * s_h + x1 * s_w, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(base + y1 * s_h + x0 * s_w, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(base + y1 * s_h + x1 * s_w, mask=mask, other=0.0).to(tl.float32)
        return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)

    @triton.jit
    def _elu_times_sigmoid(f, g):
        """GatedBlock's ``elu(f) * sigmoid(g)`` in fp32."""
        elu = tl.where(f > 0, f, tl.exp(tl.minimum(f, 0.0)) - 1.0)
        # exp of -|g| only: no overflow for any gate value.
        e = tl.exp(-tl.abs(g))
        return elu * tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    if interpret:
        globals().update(_pad_index=_pad_index, _avg_pool2=_avg_pool2, _bilinear=_bilinear,
                         _elu_times_sigmoid=_elu_times_sigmoid)

    # Sizes and strides are not specialised (Triton would compile a variant per pattern
    # of divisibility by 16, i.e. per image size and level): only the constexprs are.
    @triton.jit(do_not_specialize=("C", "CE", "H", "W", "s_b", "s_c", "s_h", "s_w", "d_b", "d_c", "d_h", "d_w",
                                   "e_b", "e_c", "e_h", "e_w"))
    def gate_kernel(src, dst, extra, C, CE, H, W,
                    s_b, s_c, s_h, s_w, d_b, d_c, d_h, d_w, e_b, e_c, e_h, e_w,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Twin of GatedBlock.forward_unpadded's epilogue ``elu(f) * sigmoid(g)`` (src
        holds f in channels [0, C) and g in [C, 2C)) written to dst's channels [0, C);
        channels [C, C + CE) of dst get ``extra`` copied in (Refiner._run's
        ``torch.cat([gated(block, x), r])``)."""
        b = tl.program_id(2)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
        inside = p < H * W
        y = p // W
        x = p % W
        gated = inside & (c < C)
        copied = inside & (c >= C) & (c < C + CE)
        at = src + b * s_b + c * s_c + y * s_h + x * s_w
        f = tl.load(at, mask=gated, other=0.0).to(tl.float32)
        g = tl.load(at + C * s_c, mask=gated, other=0.0).to(tl.float32)
        e = tl.load(extra + b * e_b + (c - C) * e_c + y * e_h + x * e_w, mask=copied, other=0.0)
        v = tl.where(c < C, _elu_times_sigmoid(f, g), e.to(tl.float32))
        tl.store(dst + b * d_b + c * d_c + y * d_h + x * d_w, v.to(dst.dtype.element_ty), mask=gated | copied)

    @triton.jit(do_not_specialize=("C", "H", "W", "h", "w", "s_b", "s_c", "s_h", "s_w", "d_b", "d_c"))
    def pool_pad_kernel(src, dst, C, H, W, h, w, s_b, s_c, s_h, s_w, d_b, d_c,
                        POOL: tl.constexpr, REFLECT: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Twin of Refiner._run's ``_pad(F.avg_pool2d(x, 2))`` (POOL=2) or of ``_pad(x)``
        (POOL=1): dst is (B, C, h + 2, w + 2) with h = H // POOL, w = W // POOL."""
        b = tl.program_id(2)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
        mask = (p < (h + 2) * (w + 2)) & (c < C)
        i = p // (w + 2) - 1
        j = p % (w + 2) - 1
        i = _pad_index(i, h, REFLECT)
        j = _pad_index(j, w, REFLECT)
        base = src + b * s_b + c * s_c
        if POOL == 2:
            v = _avg_pool2(base + (2 * i) * s_h + (2 * j) * s_w, s_h, s_w, mask)
        else:
            v = tl.load(base + i * s_h + j * s_w, mask=mask, other=0.0)
        tl.store(dst + b * d_b + c * d_c + p, v.to(dst.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=("CX", "CS", "hx", "wx", "h", "w", "x_b", "x_c", "x_h", "x_w",
                                   "s_b", "s_c", "s_h", "s_w", "d_b", "d_c"))
    def up_cat_pad_kernel(x, skip, dst, CX, CS, hx, wx, h, w, scale_h, scale_w,
                          x_b, x_c, x_h, x_w, s_b, s_c, s_h, s_w, d_b, d_c,
                          REFLECT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Twin of Refiner._run's decoder step ``_pad(torch.cat([F.interpolate(x, size,
        mode="bilinear", align_corners=False), skip], 1))``: dst is (B, CX + CS, h + 2,
        w + 2) for a skip of (B, CS, h, w) and x of (B, CX, hx, wx)."""
        b = tl.program_id(2)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
        inside = p < (h + 2) * (w + 2)
        up = inside & (c < CX)
        copied = inside & (c >= CX) & (c < CX + CS)
        i = p // (w + 2) - 1
        j = p % (w + 2) - 1
        i = _pad_index(i, h, REFLECT)
        j = _pad_index(j, w, REFLECT)
        bil = _bilinear(x + b * x_b + c * x_c, i, j, hx, wx, scale_h, scale_w, x_h, x_w, up)
        s = tl.load(skip + b * s_b + (c - CX) * s_c + i * s_h + j * s_w, mask=copied, other=0.0)
        v = tl.where(c < CX, bil, s.to(tl.float32))
        tl.store(dst + b * d_b + c * d_c + p, v.to(dst.dtype.element_ty), mask=up | copied)

    @triton.jit(do_not_specialize=("CIN", "CX", "COUT", "H", "W", "HS", "WS", "s_b", "s_c", "s_h", "s_w",
                                   "k_b", "k_c", "k_h", "k_w", "d_b", "d_c", "d_h", "d_w"))
    def gated_conv_kernel(src, skip, wf, wg, bf, bg, dst,
                          CIN, CX, COUT, H, W, HS, WS, scale_h, scale_w,
                          s_b, s_c, s_h, s_w, k_b, k_c, k_h, k_w, d_b, d_c, d_h, d_w,
                          MODE: tl.constexpr, PAD: tl.constexpr, REFLECT: tl.constexpr,
                          PRECISION: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Twin of a whole GatedBlock.forward_inference with its input step of
        Refiner._run: the two 3x3 convolutions as an implicit GEMM over the 9 taps with
        the padding folded into the loads, and ``elu(f) * sigmoid(g)`` applied before the
        only store. The convolution input, per MODE: 0 ``src`` itself (H x W); 1
        ``F.avg_pool2d(src, 2)``; 2 ``torch.cat([F.interpolate(src, (H, W), bilinear),
        skip], 1)`` with CX channels from src. PAD 1 pads by one pixel (reflect or
        replicate, as refiner._pad); PAD 0 reads an input padded already (tiles).
        Weights are (9 * CIN, COUT) matrices, row ``tap * CIN + k``."""
        b = tl.program_id(2)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        HO = H + 2 * PAD - 2
        WO = W + 2 * PAD - 2
        inside = p < HO * WO
        y = p // WO
        x = p % WO
        acc_f = tl.full((BLOCK_P, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: a @jit helper
        acc_g = tl.full((BLOCK_P, BLOCK_N), 0.0, tl.float32)
        # One flat loop over (tap, channel chunk): unrolling the 9 taps multiplied the
        # compile time (minutes for the upsampling mode on one CPU core).
        chunks = (CIN + BLOCK_K - 1) // BLOCK_K  # not tl.cdiv: a @jit helper
        for step in range(0, 9 * chunks):
            tap = step // chunks
            iy = y + tap // 3 - PAD
            ix = x + tap % 3 - PAD
            if PAD == 1:
                iy = _pad_index(iy, H, REFLECT)
                ix = _pad_index(ix, W, REFLECT)
            iy = iy[:, None]
            ix = ix[:, None]
            k = (step % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            kk = k[None, :]
            m = inside[:, None] & (kk < CIN)
            if MODE == 0:
                a = tl.load(src + b * s_b + kk * s_c + iy * s_h + ix * s_w, mask=m, other=0.0).to(tl.float32)
            elif MODE == 1:
                a = _avg_pool2(src + b * s_b + kk * s_c + (2 * iy) * s_h + (2 * ix) * s_w, s_h, s_w, m)
            else:
                up = _bilinear(src + b * s_b + kk * s_c, iy, ix, HS, WS, scale_h, scale_w, s_h, s_w, m & (kk < CX))
                sk = tl.load(skip + b * k_b + (kk - CX) * k_c + iy * k_h + ix * k_w,
                             mask=m & (kk >= CX), other=0.0).to(tl.float32)
                a = tl.where(kk < CX, up, sk)
            rows = (tap * CIN + k)[:, None]
            wm = (k[:, None] < CIN) & (n[None, :] < COUT)
            w_f = tl.load(wf + rows * COUT + n[None, :], mask=wm, other=0.0)
            w_g = tl.load(wg + rows * COUT + n[None, :], mask=wm, other=0.0)
            a = a.to(w_f.dtype)
            acc_f += tl.dot(a, w_f, input_precision=PRECISION)
            acc_g += tl.dot(a, w_g, input_precision=PRECISION)
        nm = n < COUT
        f = acc_f + tl.load(bf + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        g = acc_g + tl.load(bg + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        v = _elu_times_sigmoid(f, g)
        out = dst + b * d_b + n[None, :] * d_c + y[:, None] * d_h + x[:, None] * d_w
        tl.store(out, v.to(dst.dtype.element_ty), mask=inside[:, None] & nm[None, :])

    return SimpleNamespace(gate=gate_kernel, pool_pad=pool_pad_kernel, up_cat_pad=up_cat_pad_kernel,
                           gated_conv=gated_conv_kernel)


def _tiles(channels: int, pixels: int, batch: int) -> tuple[tuple[int, int, int], dict[str, int]]:
    """Launch grid and tile sizes: on a GPU small (channels x pixels) tiles, coalesced
    along the pixels; under the interpreter, whose cost is per program, every channel in
    one tile."""
    if _interpreting():
        block_c = min(256, _next_pow2(channels))
        block_p = max(16, min(4096, _next_pow2(pixels), 16384 // block_c))
    else:
        block_c, block_p = BLOCK_C, BLOCK_P
    grid = (-(-pixels // block_p), -(-channels // block_c), batch)
    return grid, {"BLOCK_C": block_c, "BLOCK_P": block_p}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _reflect(h: int, w: int) -> bool:
    # refiner._pad: reflect needs at least 2 pixels per side, else replicate.
    return min(h, w) >= 2


# ------------------------------------------------------------------ launchers
def gate(both: torch.Tensor, out: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
    """``elu(both[:, :C]) * sigmoid(both[:, C:])`` into ``out[:, :C]`` and ``extra`` into
    ``out[:, C:]`` (``out`` may be a strided view; allocated when None)."""
    b, c2, h, w = both.shape
    c = c2 // 2
    ce = 0 if extra is None else extra.shape[1]
    if out is None:
        out = both.new_empty(b, c + ce, h, w)
    if out.shape != (b, c + ce, h, w):
        raise ValueError(f"gate: output {tuple(out.shape)} does not fit {(b, c + ce, h, w)}")
    e = out if extra is None else extra
    grid, tiles = _tiles(c + ce, h * w, b)
    _kernels().gate[grid](both, out, e, c, ce, h, w, *both.stride(), *out.stride(), *e.stride(), **tiles)
    return out


def pool_pad(x: torch.Tensor, pool: int) -> torch.Tensor:
    """``refiner._pad(F.avg_pool2d(x, 2))`` (pool 2) or ``refiner._pad(x)`` (pool 1)."""
    b, c, hh, ww = x.shape
    h, w = hh // pool, ww // pool
    out = x.new_empty(b, c, h + 2, w + 2)
    grid, tiles = _tiles(c, (h + 2) * (w + 2), b)
    _kernels().pool_pad[grid](x, out, c, hh, ww, h, w, *x.stride(), out.stride(0), out.stride(1),
                              POOL=pool, REFLECT=_reflect(h, w), **tiles)
    return out


def up_cat_pad(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``refiner._pad(torch.cat([F.interpolate(x, skip's size, bilinear), skip], 1))``."""
    b, cx, hx, wx = x.shape
    _, cs, h, w = skip.shape
    out = x.new_empty(b, cx + cs, h + 2, w + 2)
    grid, tiles = _tiles(cx + cs, (h + 2) * (w + 2), b)
    _kernels().up_cat_pad[grid](x, skip, out, cx, cs, hx, wx, h, w, hx / h, wx / w, *x.stride(), *skip.stride(),
                                out.stride(0), out.stride(1), REFLECT=_reflect(h, w), **tiles)
    return out


def _params_key(params: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple:
    """What identifies a cached weight layout: storage and in-place update count (inference
    tensors, e.g. a model built under inference_mode, have no version counter)."""
    return (dtype, tuple(p.data_ptr() for p in params),
            tuple(-1 if p.is_inference() else p._version for p in params))


def _stacked_weights(block: GatedBlock, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature and gate convolutions as one (2 * cout) convolution, cached on the
    block until its parameters change (in-place updates bump their versions)."""
    params = (block.feature.weight, block.gate.weight, block.feature.bias, block.gate.bias)
    key = _params_key(params, dtype)
    cached = block.__dict__.get("_stacked")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            weight = torch.cat([block.feature.weight, block.gate.weight]).to(dtype)
            bias = torch.cat([block.feature.bias, block.gate.bias]).to(dtype)
        cached = (key, weight, bias)
        block.__dict__["_stacked"] = cached
    return cached[1], cached[2]


def conv_both(block: GatedBlock, padded: torch.Tensor) -> torch.Tensor:
    """Both convolutions of ``block`` on an already padded input, in one cuDNN call."""
    dtype = torch.get_autocast_dtype("cuda") if (padded.is_cuda and torch.is_autocast_enabled("cuda")) \
        else padded.dtype
    weight, bias = _stacked_weights(block, dtype)
    return F.conv2d(padded.to(dtype), weight, bias)


def gated_block(block: GatedBlock, padded: torch.Tensor, out: torch.Tensor | None = None,
                extra: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of :meth:`GatedBlock.forward_unpadded` (plus the optional concat of ``extra``)."""
    return gate(conv_both(block, padded), out, extra)


# ------------------------------------------------------------------ the network
def refine(refiner: Refiner, rasters: Sequence[torch.Tensor],
           background: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Twin of ``Refiner._run(rasters, background, inference=True)``: the same function
    (float rounding aside) with the fused kernels between the convolutions."""
    from .refiner import BACKGROUND_LEVELS

    x = gated_block(refiner.first, pool_pad(rasters[0], 1))
    dtype = x.dtype
    skips = [x]
    for i, block in enumerate(refiner.down, start=1):
        both = conv_both(block, pool_pad(x, 2))
        r = rasters[i]
        if r.shape[-2:] != both.shape[-2:]:
            r = F.interpolate(r, size=both.shape[-2:], mode="nearest")
        x = gate(both, extra=r)
        if background is not None and i in BACKGROUND_LEVELS:
            j = BACKGROUND_LEVELS.index(i)
            bg = background[j]
            if bg.shape[-2:] != x.shape[-2:]:
                bg = F.interpolate(bg, size=x.shape[-2:], mode="nearest")
            x.add_(refiner.background_proj[j](bg.to(dtype)).to(dtype))
        skips.append(x)
    x = gated_block(refiner.center, pool_pad(x, 1))
    for block, skip in zip(refiner.up, reversed(skips[:4]), strict=True):
        x = gated_block(block, up_cat_pad(x, skip))
    return refiner.head(x)


# ------------------------------------------------- implicit-GEMM gated blocks
def _packed_weights(block: GatedBlock, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The feature and gate weights as (9 * cin, cout) matrices (row ``tap * cin + k``,
    tap = 3 * dy + dx) and their biases, cached on the block until its parameters change."""
    params = (block.feature.weight, block.gate.weight, block.feature.bias, block.gate.bias)
    key = _params_key(params, dtype)
    cached = block.__dict__.get("_packed")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cout, cin = block.feature.out_channels, block.feature.in_channels
            wf, wg = (w.permute(2, 3, 1, 0).reshape(9 * cin, cout).to(dtype).contiguous() for w in params[:2])
            bf, bg = (b.to(dtype).contiguous() for b in params[2:])
        cached = (key, wf, wg, bf, bg)
        block.__dict__["_packed"] = cached
    return cached[1:]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def gated_conv(block: GatedBlock, src: torch.Tensor, mode: int = 0, skip: torch.Tensor | None = None,
               pad: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """A whole gated block in one kernel, its input step folded into the loads. ``mode``
    0: ``block.forward_inference(src)`` (``pad=0``: ``block.forward_unpadded(src)``);
    1: ``block.forward_inference(F.avg_pool2d(src, 2))``; 2: ``block.forward_inference(
    torch.cat([F.interpolate(src, skip's size, bilinear), skip], 1))``. ``out``: a
    (possibly strided) view to write into."""
    cin, cout = block.feature.in_channels, block.feature.out_channels
    b, c_src = src.shape[:2]
    if mode == 0:
        h, w = src.shape[-2:]
    elif mode == 1:
        h, w = src.shape[-2] // 2, src.shape[-1] // 2
    else:
        if skip is None:
            raise ValueError("gated_conv: mode 2 needs the skip tensor")
        h, w = skip.shape[-2:]
    if c_src + (0 if mode != 2 else skip.shape[1]) != cin:
        raise ValueError(f"gated_conv: the block takes {cin} channels")
    ho, wo = h + 2 * pad - 2, w + 2 * pad - 2
    dtype = _compute_dtype(src)
    if out is None:
        out = src.new_empty(b, cout, ho, wo, dtype=dtype)
    if out.shape != (b, cout, ho, wo):
        raise ValueError(f"gated_conv: output {tuple(out.shape)} does not fit {(b, cout, ho, wo)}")
    wf, wg, bf, bg = _packed_weights(block, dtype)
    k = skip if skip is not None else src
    precision = "ieee" if dtype == torch.float32 and not (src.is_cuda and torch.backends.cudnn.allow_tf32) \
        else "tf32"
    tiles = conv_tiles(cin, cout, ho * wo)
    grid = (-(-ho * wo // tiles["BLOCK_P"]), -(-cout // tiles["BLOCK_N"]), b)
    _kernels().gated_conv[grid](
        src, k, wf, wg, bf, bg, out, cin, c_src, cout, h, w, src.shape[-2], src.shape[-1],
        src.shape[-2] / h, src.shape[-1] / w, *src.stride(), *k.stride(), *out.stride(),
        MODE=mode, PAD=pad, REFLECT=_reflect(h, w), PRECISION=precision, **tiles)
    return out


def conv_tiles(cin: int, cout: int, pixels: int) -> dict[str, int]:
    """Tile sizes of :func:`gated_conv`: pixels x output channels x input channels per
    step (``tl.dot`` needs 16 or more each). On a GPU a first guess, not tuned; under the
    interpreter, whose cost is per program and step, as few and as large as possible."""
    if _interpreting():
        return {"BLOCK_P": max(16, min(1024, _next_pow2(pixels))), "BLOCK_N": max(16, _next_pow2(cout)),
                "BLOCK_K": max(16, _next_pow2(cin))}
    return {"BLOCK_P": 64, "BLOCK_N": max(16, min(64, _next_pow2(cout))), "BLOCK_K": 16 if cin <= 16 else 32}


def refine_gemm(refiner: Refiner, rasters: Sequence[torch.Tensor],
                background: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Twin of ``Refiner._run(rasters, background, inference=True)`` with every gated
    block one implicit-GEMM kernel (:func:`gated_conv`): no padded, pooled, upsampled
    or concatenated tensor and no pre-activation is ever written."""
    from .refiner import BACKGROUND_LEVELS

    x = gated_conv(refiner.first, rasters[0])
    skips = [x]
    for i, block in enumerate(refiner.down, start=1):
        b, c = x.shape[:2]
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        r = rasters[i]
        if r.shape[-2:] != (h, w):
            r = F.interpolate(r, size=(h, w), mode="nearest")
        cout = block.feature.out_channels
        level = x.new_empty(b, cout + r.shape[1], h, w)
        gated_conv(block, x, mode=1, out=level[:, :cout])
        level[:, cout:].copy_(r)
        if background is not None and i in BACKGROUND_LEVELS:
            j = BACKGROUND_LEVELS.index(i)
            bg = background[j]
            if bg.shape[-2:] != (h, w):
                bg = F.interpolate(bg, size=(h, w), mode="nearest")
            level.add_(refiner.background_proj[j](bg.to(level.dtype)).to(level.dtype))
        x = level
        skips.append(x)
    x = gated_conv(refiner.center, x)
    for block, skip in zip(refiner.up, reversed(skips[:4]), strict=True):
        x = gated_conv(block, x, mode=2, skip=skip)
    return refiner.head(x)
