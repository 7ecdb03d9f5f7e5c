"""Python faces of the native kernels, each with its reference twin in plain PyTorch.

:class:`SparseConv2d` runs a conv whose weight has zeros (any pattern: unstructured, pattern + connectivity,
N:M, ...) by visiting only the non-zero taps (``csrc/sparse_conv.cpp``). ``reference=True`` (or no compiled
kernels) computes the same thing with ``F.conv2d`` on the dense weight; the tests compare the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ._build import load_kernels


def _native(reference: bool, *ts: torch.Tensor):
    """The kernels module, or None where the reference twin runs (asked for, no kernels, autograd, not float32)."""
    if reference or any(t.dtype != torch.float32 or t.requires_grad for t in ts):
        return None
    return load_kernels()


def conv_taps(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The non-zero taps of a conv weight (F, C, kh, kw), grouped per filter.

    Filters are ordered by number of taps, most first (PatDNN's filter reorder: threads get similar work
    and the heaviest filters are scheduled first); inside a filter, taps by (channel, position), so the taps
    reading one input plane are consecutive. Returns int32 ``ptr`` (L+1), ``chan`` / ``pos`` (E), fp32
    ``w`` (E) and int32 ``order`` (L: the output channel of each list; filters with no taps are left out).
    """
    if weight.dim() != 4:
        raise ConfigError(f"conv_taps: expected a (F, C, kh, kw) weight, got shape {tuple(weight.shape)}")
    f, c, kh, kw = weight.shape
    w = weight.detach().float().reshape(f, c * kh * kw)
    nz = w != 0
    counts = nz.sum(1)
    order = torch.argsort(-counts, stable=True)
    order = order[counts[order] > 0]
    rows, cols = nz[order].nonzero(as_tuple=True)
    ptr = torch.zeros(order.numel() + 1, dtype=torch.int64)
    ptr[1:] = counts[order].cumsum(0)
    return {"ptr": ptr.int(), "chan": (cols // (kh * kw)).int(), "pos": (cols % (kh * kw)).int(),
            "w": w[order][rows, cols].contiguous(), "order": order.int()}


class SparseConv2d(nn.Module):
    """A conv (groups 1, dilation 1, square stride / padding) executed over its non-zero taps.

    Built from a dense ``nn.Conv2d`` (or weight + options) whose zeros are the sparsity; BN can be folded
    into it beforehand (:func:`netcarve.runtime.fold_bn`). ``forward(x, residual=None)`` returns
    ``relu?(conv(x) + bias + residual)``. ``reference=True`` runs the PyTorch twin.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1, padding: int = 0,
                 relu: bool = False, reference: bool = False):
        super().__init__()
        if weight.dim() != 4:
            raise ConfigError(f"SparseConv2d: weight must be (F, C, kh, kw), got {tuple(weight.shape)}")
        self.out_channels, self.in_channels, self.kh, self.kw = (int(s) for s in weight.shape)
        self.stride, self.padding, self.relu = int(stride), int(padding), bool(relu)
        self.register_buffer("weight", weight.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        for k, v in conv_taps(self.weight).items():
            self.register_buffer(f"tap_{k}", v)
        self.reference = bool(reference)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, relu: bool = False, reference: bool = False, where: str = "") -> SparseConv2d:
        name = where or type(conv).__name__
        if conv.groups != 1 or tuple(conv.dilation) != (1, 1):
            raise UnsupportedModelError(f"{name}: SparseConv2d handles groups=1, dilation=1 convs only "
                                        f"(groups={conv.groups}, dilation={tuple(conv.dilation)})")
        if isinstance(conv.padding, str) or len(set(conv.stride)) != 1 or len(set(conv.padding)) != 1 \
                or conv.padding_mode != "zeros":
            raise UnsupportedModelError(f"{name}: SparseConv2d needs equal stride / zero padding on both axes "
                                        f"(stride={conv.stride}, padding={conv.padding})")
        return cls(conv.weight, conv.bias, conv.stride[0], conv.padding[0], relu=relu, reference=reference)

    @property
    def density(self) -> float:
        return self.tap_w.numel() / max(1, self.weight.numel())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel=({self.kh}, {self.kw}), stride={self.stride}, "
                f"padding={self.padding}, relu={self.relu}, density={self.density:.3f}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"SparseConv2d: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        mod = _native(self.reference, x)
        if mod is None:
            return self.forward_reference(x, residual)
        return mod.sparse_conv2d(x, self.tap_ptr, self.tap_chan, self.tap_pos, self.tap_w, self.tap_order,
                                 self.bias, residual, self.out_channels, self.kh, self.kw, self.stride,
                                 self.padding, self.relu)

    def forward_reference(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = F.conv2d(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                     self.stride, self.padding)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


# ------------------------------------------------------------------------------------------- direct conv

DIRECT_FILTERS = 8  # output channels per register block of csrc direct_conv2d


def direct_pack(weight: torch.Tensor) -> torch.Tensor:
    """A (F, C, kh, kw) conv weight packed for the direct kernel: (ceil(F/8), C*kh*kw, 8), each block of eight
    filters interleaved per input row; filters beyond F are zeros."""
    if weight.dim() != 4:
        raise ConfigError(f"direct_pack: expected a (F, C, kh, kw) weight, got shape {tuple(weight.shape)}")
    f = weight.shape[0]
    fb = -(-f // DIRECT_FILTERS)
    w = weight.detach().float().reshape(f, -1)
    padded = w.new_zeros(fb * DIRECT_FILTERS, w.shape[1])
    padded[:f] = w
    return padded.reshape(fb, DIRECT_FILTERS, -1).permute(0, 2, 1).contiguous()


def direct_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                  padding: int = 0, relu: bool = False, residual: torch.Tensor | None = None,
                  reference: bool = False) -> torch.Tensor:
    """``relu?(conv2d(x, weight, bias, stride, padding) + residual)`` with the dense direct kernel
    (``csrc`` ``direct_conv2d``), or its reference twin in PyTorch (``reference=True`` or no kernels)."""
    mod = _native(reference, x)
    if mod is None:
        y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
    f, _, kh, kw = weight.shape
    return mod.direct_conv2d(x, direct_pack(weight), None if bias is None else bias.detach().float(), residual,
                             int(f), int(kh), int(kw), int(stride), int(padding), bool(relu))


# ------------------------------------------------------------------------------------------- lanes layout
# 16 images in the 16 lanes of each vector: (ceil(N / 16), C, H + 2, W + 2, 16), zero borders and zero missing
# images (csrc/lanes.cpp). The functions below run natively, or as their plain PyTorch twins.

LANES = 16


def to_lanes(x: torch.Tensor, reference: bool = False) -> torch.Tensor:
    """(N, C, H, W) -> the lanes layout."""
    if x.dim() != 4:
        raise ConfigError(f"to_lanes: expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    mod = _native(reference, x)
    if mod is not None:
        return mod.to_lanes(x)
    n, c, h, w = x.shape
    g = -(-n // LANES)
    x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, g * LANES - n)).reshape(g, LANES, c, h, w).permute(0, 2, 3, 4, 1)
    return F.pad(x, (0, 0, 1, 1, 1, 1)).contiguous()


def from_lanes(x: torch.Tensor, n: int | None = None, reference: bool = False) -> torch.Tensor:
    """The lanes layout -> (n, C, H, W) (n: the first n images; default all 16 per group)."""
    if x.dim() != 5 or x.shape[-1] != LANES:
        raise ConfigError(f"from_lanes: expected a (G, C, H + 2, W + 2, 16) lanes tensor, got shape {tuple(x.shape)}")
    g, c, hp, wp, _ = x.shape
    n = g * LANES if n is None else int(n)
    if not 0 <= n <= g * LANES:
        raise ConfigError(f"from_lanes: {n} images do not fit {g} groups of {LANES}")
    mod = _native(reference, x)
    if mod is not None:
        return mod.from_lanes(x.contiguous(), n)
    return x[:, :, 1:-1, 1:-1].permute(0, 4, 1, 2, 3).reshape(g * LANES, c, hp - 2, wp - 2)[:n].contiguous()


def lanes_ok(weight: torch.Tensor, stride: int, padding: int, groups: int = 1) -> bool:
    """Whether the lanes conv runs this conv: groups 1, a 3x3 kernel with padding 1 or a 1x1 one with padding 0,
    stride 1 or 2."""
    k = tuple(weight.shape[2:])
    return groups == 1 and k in ((3, 3), (1, 1)) and int(padding) == (k[0] - 1) // 2 and int(stride) in (1, 2)


def lanes_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                 padding: int = 0, relu: bool = False, residual: torch.Tensor | None = None,
                 reference: bool = False, pool: bool = False) -> torch.Tensor:
    """``relu?(conv2d + bias + residual)`` of a lanes tensor to a lanes tensor (the residual in lanes too), with the
    lanes kernel (zero weights skipped), or its twin: ``from_lanes`` -> ``F.conv2d`` -> ``to_lanes``. ``pool``: then a
    2x2 max pooling at stride 2, fused (even output maps, no residual)."""
    if not lanes_ok(weight, stride, padding):
        raise ConfigError(f"lanes_conv2d: needs groups 1 and a 3x3 kernel with padding 1 or a 1x1 one with padding "
                          f"0, stride 1 or 2; got kernel {tuple(weight.shape[2:])}, padding {padding}, stride {stride}")
    if x.dim() != 5 or x.shape[1] != weight.shape[1]:
        raise ConfigError(f"lanes_conv2d: expected a lanes tensor with {weight.shape[1]} channels, got shape "
                          f"{tuple(x.shape)}")
    if pool:
        h, w = ((s + 2 * int(padding) - weight.shape[2]) // int(stride) + 1 for s in (x.shape[2] - 2, x.shape[3] - 2))
        if h % 2 or w % 2 or residual is not None:
            raise ConfigError(f"lanes_conv2d: a fused 2x2 pooling needs an even output map and no residual, got "
                              f"{h}x{w}{' and a residual' if residual is not None else ''}")
    mod = _native(reference, x, weight)
    if mod is not None:
        return mod.lanes_conv(x.contiguous(), weight.detach().float().contiguous(),
                              None if bias is None else bias.detach().float(),
                              None if residual is None else residual.contiguous(), int(stride), int(padding),
                              bool(relu), bool(pool))
    y = F.conv2d(from_lanes(x, reference=True), weight, bias, stride=stride, padding=padding)
    if residual is not None:
        y = y + from_lanes(residual, reference=True)
    y = torch.relu(y) if relu else y
    return to_lanes(F.max_pool2d(y, 2, 2) if pool else y, reference=True)


def lanes_max_pool2d(x: torch.Tensor, reference: bool = False) -> torch.Tensor:
    """2x2 max pooling at stride 2 of a lanes tensor with even maps (NaN propagates, as in torch)."""
    if x.dim() != 5 or (x.shape[2] - 2) % 2 or (x.shape[3] - 2) % 2:
        raise ConfigError(f"lanes_max_pool2d: expected a lanes tensor with even maps, got shape {tuple(x.shape)}")
    mod = _native(reference, x)
    if mod is not None:
        return mod.lanes_maxpool2(x.contiguous())
    return to_lanes(F.max_pool2d(from_lanes(x, reference=True), 2, 2), reference=True)


# ------------------------------------------------------------------------------------------- max pooling


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               reference: bool = False) -> torch.Tensor:
    """``F.max_pool2d`` (dilation 1) with the native kernel (``csrc/pool.cpp``: torch's semantics, -inf padding,
    ceil mode, NaN propagation), or its reference twin ``F.max_pool2d`` (``reference=True``, no kernels, autograd
    or a dtype other than float32)."""
    k = nn.modules.utils._pair(kernel_size)
    s = nn.modules.utils._pair(k if stride is None or stride == [] else stride)
    p = nn.modules.utils._pair(padding)
    mod = _native(reference, x)
    if mod is None or x.dim() != 4:
        return F.max_pool2d(x, k, s, p, ceil_mode=ceil_mode)
    return mod.max_pool2d(x, k[0], k[1], s[0], s[1], p[0], p[1], bool(ceil_mode))


# ------------------------------------------------------------------------------------------- BSR linear

BSR_BLOCKS = ((16, 16), (8, 16), (4, 16), (2, 16), (1, 16))
_TILE_OVERHEAD = 8  # per stored tile, in value-equivalents (index load, loop, horizontal sums)


def choose_block(weight: torch.Tensor) -> tuple[int, int]:
    """The BSR tile of :data:`BSR_BLOCKS` that stores a 2-D weight's non-zeros most cheaply (values kept, zero
    padding inside kept tiles included, plus a per-tile overhead): 4x16 for a 4x16-block-pruned weight,
    1x16 for unstructured sparsity."""
    w = weight.detach().reshape(weight.shape[0], -1) != 0
    rows, cols = w.shape
    best, best_cost = BSR_BLOCKS[-1], None
    for bh, bw in BSR_BLOCKS:
        pr, pc = -(-rows // bh) * bh, -(-cols // bw) * bw
        padded = torch.zeros(pr, pc, dtype=torch.bool)
        padded[:rows, :cols] = w
        tiles = int(padded.reshape(pr // bh, bh, pc // bw, bw).any(3).any(1).sum())
        cost = tiles * (bh * bw + _TILE_OVERHEAD)
        if best_cost is None or cost < best_cost:
            best, best_cost = (bh, bw), cost
    return best


def bsr_tensors(weight: torch.Tensor, block: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """``[indptr, indices, values]`` of a 2-D weight in BSR tiles (``netcarve.pack`` "bsr" layout)."""
    from ..pack import pack

    w = weight.detach().float().reshape(weight.shape[0], -1)
    p = pack(w, "bsr", block=list(block or choose_block(w)))
    return [p.tensors["indptr"], p.tensors["indices"], p.tensors["values"]]


def bsr_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               block: tuple[int, int] | None = None, reference: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` with the weight in BSR tiles (native kernel), or ``F.linear`` (reference)."""
    mod = _native(reference, x)
    if mod is None:
        return F.linear(x, weight, bias)
    ptr, idx, val = bsr_tensors(weight, block)
    return mod.bsr_linear(x, ptr, idx, val, None if bias is None else bias.detach().float(), int(weight.shape[0]))


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 reference: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` (x 2-d) by netcarve's dense panel kernel (the plan's "direct" linear for more than 4
    rows; weights packed per call here), or ``F.linear`` (reference)."""
    mod = _native(reference, x)
    if mod is None:
        return F.linear(x, weight, bias)
    wp, bp = mod.pack_panels(weight.detach().float(), None if bias is None else bias.detach().float())
    return mod.dense_panel(x, wp, bp, int(weight.shape[0]))


# ------------------------------------------------------------------------------------------- transformer ops

# element-wise activations by plan code (csrc plan "unary" steps; transformer.cpp has all but tanh natively)
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid")
_ACTIVATION_REFS = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu,
                    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "hardswish": F.hardswish,
                    "hardsigmoid": F.hardsigmoid}


def activation(x: torch.Tensor, fn: str, reference: bool = False) -> torch.Tensor:
    """An activation of :data:`ACTIVATIONS` by name (``csrc/transformer.cpp``: vectorised exp / erf, relative error
    ~2e-7, NaN stays NaN), or its reference twin (``F.gelu``, ``F.silu``, ... ; always for ``tanh``)."""
    if fn not in ACTIVATIONS:
        raise ConfigError(f"activation {fn!r}: expected one of {', '.join(ACTIVATIONS)}")
    mod = _native(reference, x)
    if mod is None or fn == "tanh":
        return _ACTIVATION_REFS[fn](x)
    return mod.activation(x, ACTIVATIONS.index(fn))


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, reference: bool = False) -> torch.Tensor:
    """``F.layer_norm`` over the trailing dims (native kernel: two passes per row, vectorised), or the twin."""
    shape = (int(normalized_shape),) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ConfigError(f"layer_norm over {list(shape)}: input of shape {list(x.shape)} does not end with it")
    mod = _native(reference, x, *(t for t in (weight, bias) if t is not None))
    if mod is None:
        return F.layer_norm(x, shape, weight, bias, eps)
    return mod.layer_norm(x, len(shape), weight, bias, float(eps))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
              scale: float | None = None, reference: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` without mask or dropout for (B, [H,] L, E) tensors with equal
    leading dims (native kernel: K transposed per head, eight query rows at a time, vectorised softmax; any strides),
    or the twin (other shapes too)."""
    mod = _native(reference, q, k, v)
    if mod is None or q.dim() not in (3, 4) or not (q.dim() == k.dim() == v.dim()) \
            or q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1] \
            or k.shape[-2] == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    return mod.attention(q, k, v, bool(is_causal), scale)


def attention_qkv(qkv: torch.Tensor, heads: int, is_causal: bool = False, scale: float | None = None,
                  key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                  kv: torch.Tensor | None = None, reference: bool = False) -> torch.Tensor:
    """Multi-head self-attention from a packed (B, T, 3 x heads x hd) projection (q | k | v, each heads x hd) to the
    merged heads (B, T, heads x hd), as netcarve's ``MultiHeadSelfAttention`` computes it (native: no head split /
    merge copies), or the twin (reshape, permute, ``F.scaled_dot_product_attention``, transpose).

    ``key_padding_mask`` (B, T), as ``nn.MultiheadAttention`` takes it: bool (true: the key is padding, never
    attended to) or float (added to the scores); ``attn_mask`` (T, T) likewise per query and key (bool: true = not
    attended, as ``nn.MultiheadAttention`` reads it, the opposite of ``F.scaled_dot_product_attention``). A query that
    may attend to no key gets NaN, as from ``nn.MultiheadAttention``.

    Cross-attention: ``kv`` given, ``qkv`` is the query projection (B, Tq, heads x hd) and ``kv`` the packed key |
    value projection of another sequence (B, Tk, 2 x heads x hd); the masks are then (B, Tk) and (Tq, Tk)."""
    parts = 1 if kv is not None else 3
    if qkv.dim() != 3 or heads < 1 or qkv.shape[-1] % (parts * heads):
        what = "q" if kv is not None else "qkv"
        raise ConfigError(f"attention_qkv: {what} of shape {list(qkv.shape)} is not (B, T, "
                          f"{'' if kv is not None else '3 x '}{heads} heads x head_dim)")
    b, t, w = qkv.shape
    c = w // parts
    if kv is not None and (kv.dim() != 3 or kv.shape[0] != b or kv.shape[2] != 2 * c or kv.dtype != qkv.dtype):
        raise ConfigError(f"attention_qkv: kv of shape {list(kv.shape)} ({kv.dtype}) is not a ({b}, Tk, {2 * c}) "
                          f"{qkv.dtype} key | value projection")
    tk = kv.shape[1] if kv is not None else t
    for what, mask, shape in (("key padding mask", key_padding_mask, (b, tk)), ("attention mask", attn_mask, (t, tk))):
        if mask is not None and (tuple(mask.shape) != shape or not (mask.dtype == torch.bool
                                                                     or mask.is_floating_point())):
            raise ConfigError(f"attention_qkv: the {what} must be bool or float of shape {shape}, got {mask.dtype} "
                              f"{list(mask.shape)}")
    mod = _native(reference, qkv)
    if mod is None:
        if kv is None:
            q, kk, vv = qkv.reshape(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        else:
            q = qkv.reshape(b, t, heads, c // heads).transpose(1, 2)
            kk, vv = kv.reshape(b, tk, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        if key_padding_mask is not None or attn_mask is not None:

            def bias(m):  # bool: true = not attended
                return torch.zeros(m.shape).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.float()

            mask = torch.zeros(b, 1, t, tk)
            if key_padding_mask is not None:
                mask = mask + bias(key_padding_mask).view(b, 1, 1, tk)
            if attn_mask is not None:
                mask = mask + bias(attn_mask)
            if is_causal:
                mask = mask + torch.zeros(t, tk).masked_fill(torch.ones(t, tk, dtype=torch.bool).triu(1),
                                                             float("-inf"))
            # (softmax written out: F.scaled_dot_product_attention returns zeros for a row with every key masked,
            # nn.MultiheadAttention NaN, as the native kernel does)
            s = q @ kk.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5) + mask
            o = torch.softmax(s, -1) @ vv
        else:
            o = F.scaled_dot_product_attention(q, kk, vv, is_causal=is_causal, scale=scale)
        return o.transpose(1, 2).reshape(b, t, c)
    return mod.attention_qkv(qkv, int(heads), bool(is_causal), scale, key_padding_mask, attn_mask, kv)


def pad_zero(x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, E) with the positions a bool (B, T) key padding mask marks set to zero, if in every row the
    padding follows the tokens ("left-aligned", PyTorch's test before it runs ``nn.TransformerEncoder`` on nested
    tensors, whose padded outputs are zero); else ``x`` itself."""
    m = key_padding_mask
    if m.dtype != torch.bool or m.dim() != 2 or x.dim() != 3 or tuple(m.shape) != tuple(x.shape[:2]):
        raise ConfigError(f"pad_zero: expected a (B, T, E) value and a bool (B, T) mask, got {list(x.shape)} and "
                          f"{m.dtype} {list(m.shape)}")
    if m.shape[1] > 1 and bool((m[:, :-1] & ~m[:, 1:]).any()):
        return x
    return x.masked_fill(m.unsqueeze(-1), 0.0)
