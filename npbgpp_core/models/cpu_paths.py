"""Exact CPU speed paths of the extractor's U-Net decoder (training on the CPU spends most
of its time there): bilinear x2 upsampling fused with the skip concatenation, and a 3x3
convolution whose input gradient is computed as a forward convolution.

Upsampling: on the CPU, ``F.interpolate(..., mode='bilinear')`` and especially its
backward are scalar loops over NCHW tensors (about 40 ms for the backward of one
(6, 32, 288, 288) output on one core). An exact doubling is a fixed separable stencil:
output pixel ``2i`` is ``0.75 x[i] + 0.25 x[i-1]`` and ``2i+1`` is ``0.75 x[i] + 0.25
x[i+1]``, with the edge pixel repeated outside the image. Written as whole-tensor slices
it runs vectorised in both directions (forward and backward about 2x faster in the
decoder), and the upsampled tensor goes straight into the concatenation buffer instead
of being copied there. The result equals ``torch.cat([F.interpolate(y, size,
'bilinear'), skip], 1)`` up to float rounding.

Convolution: the input gradient of a stride-1, padding-1 3x3 convolution is the forward
convolution of the output gradient with the kernel transposed (in/out channels swapped)
and flipped. oneDNN's forward kernels run that faster than its backward-data kernels at
the decoder's shapes (e.g. 296 -> 128 channels at 36x36: 67 vs 95 ms for 6 views); the
forward pass and the weight gradient are PyTorch's own. Same values up to float rounding.
:func:`upsample_cat_conv3x3` does upsampling, concatenation and convolution as one
autograd step, and skips the input-gradient channels of a skip that needs none (the raw
image of the last block: 32 instead of 35 channels at full resolution).

tests/test_train_speedpaths.py checks both against the reference functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _up_last(x: torch.Tensor, out: torch.Tensor) -> None:
    """Write the x2 upsampling of ``x`` (..., n) along its last dim into ``out`` (..., n, 2)."""
    a = x * 0.75
    torch.add(a[..., 1:], x[..., :-1], alpha=0.25, out=out[..., 1:, 0])
    out[..., 0, 0] = x[..., 0]
    torch.add(a[..., :-1], x[..., 1:], alpha=0.25, out=out[..., :-1, 1])
    out[..., -1, 1] = x[..., -1]


def _up_rows(x: torch.Tensor, out: torch.Tensor) -> None:
    """Write the x2 upsampling of ``x`` (..., n, w) along its rows into ``out`` (..., n, 2, w)."""
    a = x * 0.75
    torch.add(a[..., 1:, :], x[..., :-1, :], alpha=0.25, out=out[..., 1:, 0, :])
    out[..., 0, 0, :] = x[..., 0, :]
    torch.add(a[..., :-1, :], x[..., 1:, :], alpha=0.25, out=out[..., :-1, 1, :])
    out[..., -1, 1, :] = x[..., -1, :]


def _adjoint(ge: torch.Tensor, go: torch.Tensor, dim: int) -> torch.Tensor:
    """The transpose of one x2 pass: gradients at the even (``ge``) and odd (``go``)
    outputs, both (..., n) along ``dim`` (-1 or -2), to the gradient of the input."""
    def sl(t: torch.Tensor, s: slice | int) -> torch.Tensor:
        return t[..., s] if dim == -1 else t[..., s, :]

    g = ge + go
    g.mul_(0.75)
    sl(g, slice(1, None)).add_(sl(go, slice(None, -1)), alpha=0.25)
    sl(g, slice(None, -1)).add_(sl(ge, slice(1, None)), alpha=0.25)
    sl(g, 0).add_(sl(ge, 0), alpha=0.25)
    sl(g, -1).add_(sl(go, -1), alpha=0.25)
    return g


def _up2cat(y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """The concatenation buffer [up(y), skip] (no autograd)."""
    n, c, h, w = y.shape
    wide = y.new_empty(n, c, h, w, 2)
    _up_last(y, wide)
    out = y.new_empty(n, c + skip.shape[1], 2 * h, 2 * w)
    _up_rows(wide.view(n, c, h, 2 * w), out[:, :c].unflatten(2, (h, 2)))
    out[:, c:] = skip
    return out


def _up2_adjoint(grad: torch.Tensor) -> torch.Tensor:
    """Gradient of ``y`` from the gradient (n, c, 2h, 2w) of its x2 upsampling."""
    g = grad.unflatten(2, (-1, 2))  # (n, c, h, 2, 2w)
    g = _adjoint(g[:, :, :, 0], g[:, :, :, 1], -2)  # (n, c, h, 2w)
    return _adjoint(g[..., 0::2], g[..., 1::2], -1)


class _Up2Cat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.channels = y.shape[1]
        return _up2cat(y, skip)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        c = ctx.channels
        gy = _up2_adjoint(grad[:, :c]) if ctx.needs_input_grad[0] else None
        gskip = grad[:, c:] if ctx.needs_input_grad[1] else None
        return gy, gskip


def _fits(y: torch.Tensor, skip: torch.Tensor) -> bool:
    """Whether the fused stencil applies: CPU tensors (N, C, h, w) of one float dtype, skip at 2h x 2w."""
    return (y.device.type == "cpu" and y.ndim == 4 and skip.ndim == 4 and y.is_floating_point()
            and y.dtype == skip.dtype and skip.shape[0] == y.shape[0]
            and tuple(skip.shape[-2:]) == (2 * y.shape[-2], 2 * y.shape[-1]))


def upsample_cat(y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``cat([bilinear(y, skip's size, align_corners=False), skip], dim=1)`` for (N, C, h, w)
    tensors: the fused stencil when the size exactly doubles on a CPU tensor (the
    decoders' usual case), the reference functions otherwise."""
    if _fits(y, skip):
        return _Up2Cat.apply(y.contiguous(), skip)
    up = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([up, skip.to(up.dtype)], dim=1)


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, padding=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = F.conv2d(grad, weight.transpose(0, 1).flip([2, 3]), padding=1)
        if ctx.needs_input_grad[1]:
            gw = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])[1]
        return gx, gw


def conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=1)`` (no bias, stride 1, 3x3 kernel); on the CPU with
    autograd the input gradient comes from a forward convolution."""
    if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) \
            and x.dtype == weight.dtype and tuple(weight.shape[-2:]) == (3, 3):
        return _Conv3x3.apply(x, weight)
    return F.conv2d(x, weight, padding=1)


class _Up2CatConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = _up2cat(y, skip)
        ctx.save_for_backward(x, weight)
        ctx.channels = y.shape[1]
        return F.conv2d(x, weight, padding=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need_y, need_skip, need_w = ctx.needs_input_grad
        c = ctx.channels
        grad = grad.contiguous()
        gy = gskip = gw = None
        if need_w:
            gw = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])[1]
        if need_y or need_skip:
            # Input gradient only for the channels that need one (the raw image skip needs none).
            rows = weight if need_skip else weight[:, :c]
            gx = F.conv2d(grad, rows.transpose(0, 1).flip([2, 3]), padding=1)
            gy = _up2_adjoint(gx[:, :c]) if need_y else None
            gskip = gx[:, c:] if need_skip else None
        return gy, gskip, gw


def upsample_cat_conv3x3(y: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv3x3(upsample_cat(y, skip), weight)`` as one autograd step on the CPU: the
    concatenation is not a graph node, and when ``skip`` needs no gradient (the decoder's
    last block, whose skip is the raw image) its input-gradient channels are not computed."""
    if _fits(y, skip) and weight.dtype == y.dtype and tuple(weight.shape[-2:]) == (3, 3) \
            and torch.is_grad_enabled() and (y.requires_grad or skip.requires_grad or weight.requires_grad):
        return _Up2CatConv3x3.apply(y.contiguous(), skip, weight)
    return conv3x3(upsample_cat(y, skip), weight)
