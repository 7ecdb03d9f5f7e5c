"""Convolutions on small feature maps as one matrix product, for training.

oneDNN's backward pass of a convolution whose output has only a few pixels is slow on CPU (its weight
gradient above all). Measured on a 2-core Intel Xeon (Emerald Rapids), 2 threads, bf16 autocast,
channels-last, batch 128 (``python benchmarks/train_small_conv.py``, variants alternated in one process):
VGG-16's 512 -> 512 3x3 conv on 2x2 maps takes 60-62 ms forward + backward in oneDNN and 15-16 ms written
as one matrix product -- rows = batch x output pixels, columns = kernel taps x input channels -- (3.9x); on
4x4 maps 1.9-2.1x; and VGG-16's whole CIFAR-10 training step runs 1.60x faster (two runs) when every conv
with at most 16 output pixels goes this way (its 4x4 and 2x2 stages). In fp32 the gain is small (1.05-1.08x).
On larger maps the copy of the taps costs more than it saves (256 -> 256 at 8x8: 0.41-0.46x), hence the
pixel limit.

:func:`conv2d_gemm` is the plain tensor function (reference twin: ``F.conv2d``); :func:`small_map_convs`
routes the eligible ``nn.Conv2d`` modules of a model through it while training (``model.training`` and at
most ``max_pixels`` output pixels) and restores them on exit. The training loop uses it by default
(``TrainConfig.small_conv_gemm``). Parametrized convs (masks kept as parametrizations) qualify: the weight
is read through ``module.weight`` as the module's own forward would.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

__all__ = ["conv2d_gemm", "small_map_convs", "gemm_eligible"]

_ATTR = "_netcarve_small_conv_limit"


def _out_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of a convolution (each argument a pair)."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(size, kernel, stride, padding, dilation))


def conv2d_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation)`` (groups 1, zero padding) as one matrix
    product of the gathered taps with the weight; differentiable (autograd of pad, slicing, cat, matmul).

    The result has channels-last strides (a permuted ``(N, Ho, Wo, K)`` tensor) with the logical shape
    ``(N, K, Ho, Wo)``."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d_gemm: expected 4-D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    n, c, h, w = x.shape
    k, cw, kh, kw = weight.shape
    if cw != c:
        raise ValueError(f"conv2d_gemm: input has {c} channels, the weight expects {cw} (groups must be 1)")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho, wo = _out_size((h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv2d_gemm: input {tuple(x.shape)} is too small for a {kh}x{kw} kernel")
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # (N, H + 2ph, W + 2pw, C)
    taps = [
        xp[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    cols = torch.cat(taps, dim=3).reshape(n * ho * wo, kh * kw * c)
    wm = weight.permute(0, 2, 3, 1).reshape(k, kh * kw * c)  # columns ordered (tap row, tap col, channel)
    y = cols @ wm.t() if bias is None else torch.addmm(bias, cols, wm.t())
    return y.view(n, ho, wo, k).permute(0, 3, 1, 2)


def gemm_eligible(module: nn.Module) -> bool:
    """A ``nn.Conv2d`` (or a parametrized one) with groups 1, zero padding given as numbers and
    ``nn.Conv2d``'s own forward."""
    return (
        isinstance(module, nn.Conv2d)
        and type(module).forward is nn.Conv2d.forward
        and "forward" not in vars(module)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _small_map_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if self.training and x.dim() == 4 and math.prod(
        _out_size(x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation)
    ) <= getattr(self, _ATTR):
        return conv2d_gemm(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
    return type(self).forward(self, x)


@contextmanager
def small_map_convs(model: nn.Module, max_pixels: int = 16) -> Iterator[list[str]]:
    """Within the block, every eligible conv of ``model`` (:func:`gemm_eligible`) runs as
    :func:`conv2d_gemm` while the model is in training mode and the conv's output has at most
    ``max_pixels`` pixels (per image); otherwise, and after the block, as before. Yields the names of the
    routed modules. ``max_pixels <= 0`` routes none. Deep copies made inside the block (e.g. a weight
    average) keep the routing, bound to their own weights."""
    names: list[str] = []
    mods: list[nn.Module] = []
    if max_pixels > 0:
        for name, m in model.named_modules():
            if gemm_eligible(m):
                setattr(m, _ATTR, int(max_pixels))
                m.forward = types.MethodType(_small_map_forward, m)
                names.append(name)
                mods.append(m)
    try:
        yield names
    finally:
        for m in mods:
            vars(m).pop("forward", None)
            vars(m).pop(_ATTR, None)
