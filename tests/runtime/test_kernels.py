"""The native sparse conv kernel against its PyTorch twin: odd sizes, strides, 1x1 / 5x5, residual, ReLU."""

from __future__ import annotations

import pytest
import torch

from netcarve.errors import ConfigError
from netcarve.runtime import SparseConv2d, conv_taps
from netcarve.runtime.kernels import DIRECT_FILTERS, direct_conv2d, direct_pack

from ._util import at_threads, forced_parallel, switched_off


def _sparse_weight(f, c, k, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(f, c, k, k, generator=g)
    return w * (torch.rand(w.shape, generator=g) < density)


def _fused_case(n, c, f, h, w, k, s, p, d, seed, zero_every):
    """A sparse conv with bias, residual and ReLU fused and every ``zero_every``-th filter (from ``zero_every // 2``)
    all-zero, with its input and residual: (module, x, residual, bias, reference output, the zeroed filters' slice)."""
    weight = _sparse_weight(f, c, k, d, seed=seed)
    zeroed = slice(zero_every // 2, None, zero_every)
    weight[zeroed] = 0
    bias = torch.randn(f)
    x = torch.randn(n, c, h, w)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    res = torch.randn(n, f, ho, wo)
    m = SparseConv2d(weight, bias, stride=s, padding=p, relu=True)
    return m, x, res, bias, m.forward_reference(x, res), zeroed


def _zeroed_filters_are_bias_residual_relu(out, bias, res, zeroed):
    return torch.equal(out[:, zeroed], torch.relu(bias[zeroed].view(1, -1, 1, 1) + res[:, zeroed]))


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


# (N, C, F, H, W, k, stride, pad, density): odd sizes, widths not multiples of 16, strides 1/2/3, 1x1 and 5x5
CASES = [
    (1, 3, 5, 7, 9, 3, 1, 1, 0.5),
    (2, 16, 17, 31, 33, 3, 2, 1, 0.12),
    (3, 8, 16, 8, 8, 1, 1, 0, 0.3),
    (1, 5, 7, 6, 6, 3, 2, 0, 0.6),
    (4, 20, 40, 4, 4, 3, 1, 1, 0.1),
    (1, 4, 4, 11, 5, 5, 1, 2, 0.4),
    (2, 6, 9, 13, 13, 3, 3, 1, 0.5),
    (5, 33, 19, 1, 1, 1, 1, 0, 0.2),
    (1, 64, 64, 32, 32, 3, 1, 1, 1.0),
    # output widths that are multiples of the vector (8 / 16): the direct conv's row layout, incl. stride 2,
    # several images, rows that straddle images inside one register block, filters not a multiple of 8
    (2, 16, 12, 32, 32, 3, 2, 1, 0.5),
    (3, 5, 11, 7, 16, 3, 1, 1, 0.7),
    (1, 24, 20, 8, 8, 3, 1, 1, 0.8),
    # many channels, tiny outputs: the im2col path (C * kh * kw >= 1024, N * Ho * Wo <= 64)
    (1, 130, 24, 4, 4, 3, 1, 1, 0.2),
    (2, 128, 16, 6, 6, 3, 2, 1, 0.3),
    (1, 1100, 8, 3, 3, 1, 1, 0, 0.1),
    (3, 120, 9, 2, 2, 3, 1, 1, 0.15),
    # 8x8 with many channels: row vectors on the planes where the width allows (AVX2), else the im2col path
    (1, 128, 16, 8, 8, 3, 1, 1, 0.2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:8])))
@pytest.mark.parametrize("fuse", ["plain", "bias_relu", "bias_residual_relu"])
@pytest.mark.parametrize("layout", ["rows", "rows_buffered", "shared", "shared_buffered", "wide"])
def test_sparse_conv_matches_reference(kernels, case, fuse, layout):
    """The sparse kernel against its reference twin; "rows": the row layout wherever the output width is a
    multiple of the vector (the default; banded at small batches), "shared": the row layout on planes shared by
    the threads (banding off), "wide": always the wide grid of the phase planes; "_buffered": the row layout's
    epilogue through the accumulator buffer instead of from the registers (set_fused_store(False))."""
    n, c, f, h, w, k, s, p, d = case
    weight = _sparse_weight(f, c, k, d, seed=h * w + f)
    bias = torch.randn(f) if fuse != "plain" else None
    m = SparseConv2d(weight, bias, stride=s, padding=p, relu=fuse != "plain")
    x = torch.randn(n, c, h, w)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    res = torch.randn(n, f, ho, wo) if fuse == "bias_residual_relu" else None
    ref = m.forward_reference(x, res)
    kernels.set_row_layout(layout != "wide")
    kernels.set_banded(layout.startswith("rows"))
    kernels.set_fused_store(not layout.endswith("_buffered"))
    try:
        out = m(x, res)
    finally:
        kernels.set_row_layout(True)
        kernels.set_banded(True)
        kernels.set_fused_store(True)
    assert out.shape == ref.shape == (n, f, ho, wo)
    assert _rel_err(out, ref) <= 1e-4
    assert not torch.equal(m.forward_reference(x * 2, res), ref)  # the comparison is not vacuous


@pytest.mark.parametrize("layout", ["rows", "wide"])
@pytest.mark.parametrize("shape", [(2, 6, 10, 8, 16), (1, 4, 9, 9, 11)], ids=["width16", "width11"])
def test_sparse_conv_all_zero_filters(kernels, layout, shape):
    """Filters with no non-zero weight (connectivity pruning removes whole filters) output bias + residual,
    ReLU'd, in both layouts."""
    n, c, f, h, w = shape
    weight = _sparse_weight(f, c, 3, 0.5, seed=7)
    weight[::3] = 0
    bias = torch.randn(f)
    m = SparseConv2d(weight, bias, stride=1, padding=1, relu=True)
    x = torch.randn(n, c, h, w)
    res = torch.randn(n, f, h, w)
    kernels.set_row_layout(layout == "rows")
    try:
        out = m(x, res)
    finally:
        kernels.set_row_layout(True)
    ref = m.forward_reference(x, res)
    assert _rel_err(out, ref) <= 1e-4
    assert torch.equal(out[:, ::3], torch.relu(bias[::3].view(1, -1, 1, 1) + res[:, ::3]))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:8])))
@pytest.mark.parametrize("fuse", ["plain", "bias_residual_relu"])
@pytest.mark.parametrize("rows", ["rows", "shared", "planes", "im2col"])
def test_direct_conv_matches_reference(kernels, case, fuse, rows):
    """The dense direct kernel (every tap) on the same cases in each of its layouts: output rows where the width
    allows ("rows", the default; banded at small batches), output rows on planes shared by the threads ("shared"),
    the wide grid of the phase planes, an im2col matrix."""
    n, c, f, h, w, k, s, p, d = case
    weight = _sparse_weight(f, c, k, max(d, 0.7), seed=h * w + f + 1)
    bias = torch.randn(f) if fuse != "plain" else None
    x = torch.randn(n, c, h, w)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    res = torch.randn(n, f, ho, wo) if fuse != "plain" else None
    relu = fuse != "plain"
    ref = direct_conv2d(x, weight, bias, s, p, relu, res, reference=True)
    old = 1 << 17
    kernels.set_direct_im2col_max({"rows": old, "shared": old, "planes": 0, "im2col": -1}[rows])
    kernels.set_row_layout(rows in ("rows", "shared"))
    kernels.set_banded(rows == "rows")
    try:
        out = direct_conv2d(x, weight, bias, s, p, relu, res)
    finally:
        kernels.set_direct_im2col_max(old)
        kernels.set_row_layout(True)
        kernels.set_banded(True)
    assert out.shape == ref.shape == (n, f, ho, wo)
    assert _rel_err(out, ref) <= 1e-4
    assert not torch.equal(direct_conv2d(x * 2, weight, bias, s, p, relu, res, reference=True), ref)


# (N, C, F, H, W, stride): one image split in row bands (32x32, 16x16), a small output split by filters (8x8),
# bands that cross images (3 images of 7 rows), stride 2, fewer filter blocks than threads (F = 4), batches of
# whole images per thread (5 images; 4 at stride 2)
BANDED = [(1, 16, 20, 32, 32, 1), (1, 64, 64, 8, 8, 1), (3, 5, 11, 7, 16, 1), (2, 16, 12, 32, 32, 2),
          (1, 8, 4, 16, 16, 1), (1, 24, 40, 16, 16, 2), (5, 8, 12, 16, 16, 1), (4, 16, 20, 16, 16, 2)]


@pytest.mark.parametrize("case", BANDED, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("kernel", ["sparse", "direct"])
def test_banded_split_matches_reference(kernels, case, threads, kernel):
    """Row-layout convs split output rows (or, at 8x8 and batch 1, filters) over the threads, each building
    its own padded input: with every layer forced parallel (threshold 0) and 2 or 3 threads, both kernels match
    the reference, with bias, residual, ReLU and all-zero filters."""
    n, c, f, h, w, s = case
    weight = _sparse_weight(f, c, 3, 0.3 if kernel == "sparse" else 1.0, seed=h + f + s)
    weight[1::4] = 0
    bias = torch.randn(f)
    x = torch.randn(n, c, h, w)
    ho, wo = (h + 2 - 3) // s + 1, (w + 2 - 3) // s + 1
    res = torch.randn(n, f, ho, wo)
    m = SparseConv2d(weight, bias, stride=s, padding=1, relu=True)
    ref = m.forward_reference(x, res)
    run = (lambda: m(x, res)) if kernel == "sparse" else (lambda: direct_conv2d(x, weight, bias, s, 1, True, res))
    with forced_parallel(kernels, threads), switched_off(kernels, "kx_split"):  # (the banded rows, not kx-split)
        out = run()
        with switched_off(kernels, "banded"):
            shared = run()
    assert out.shape == ref.shape == (n, f, ho, wo)
    assert _rel_err(out, ref) <= 1e-4
    assert _rel_err(shared, ref) <= 1e-4
    assert not torch.equal(m.forward_reference(x * 2, res), ref)


# (N, C, F, H, W, stride, pad, density): 4x4 / 2x2 outputs over several vectors of positions (batches), where the
# wide grid would compute mostly padding: several column tiles, a partial last tile (2x2: 33 images), stride 2
# (4x4 -> 2x2), no padding (6x6 -> 4x4), more filters than fit one group, few filters (groups of one)
BATCHED = [(16, 40, 24, 4, 4, 1, 1, 0.2), (33, 30, 13, 2, 2, 1, 1, 0.3), (33, 32, 10, 4, 4, 2, 1, 0.25),
           (10, 40, 8, 6, 6, 1, 0, 0.3), (9, 64, 70, 4, 4, 1, 1, 0.1), (64, 29, 3, 2, 2, 1, 1, 0.5)]


@pytest.mark.parametrize("case", BATCHED, ids=lambda c: "x".join(map(str, c[:7])))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batched_small_outputs_match_reference(kernels, case, threads):
    """Small maps at large batches (the sparse weight times L1-sized tiles of the im2col matrix): equal to the
    reference with bias, residual, ReLU and all-zero filters, forced parallel at 1-3 threads, and equal to the
    wide grid the path replaces (set_batched_small(False))."""
    n, c, f, h, w, s, p, d = case
    m, x, res, bias, ref, zeroed = _fused_case(n, c, f, h, w, 3, s, p, d, seed=n + c + f, zero_every=5)
    with forced_parallel(kernels, threads):
        out = m(x, res)
        plain = SparseConv2d(m.weight, None, stride=s, padding=p)(x)
        with switched_off(kernels, "batched_small"):
            wide = m(x, res)
    assert out.shape == ref.shape == res.shape
    assert _rel_err(out, ref) <= 1e-4
    assert _rel_err(plain, torch.nn.functional.conv2d(x, m.weight, None, s, p)) <= 1e-4
    assert _rel_err(out, wide) <= 1e-4
    assert _zeroed_filters_are_bias_residual_relu(out, bias, res, zeroed)


# 8x8 maps (64 of the 100 positions of the padded wide grid) with many taps per im2col row: batched with AVX-512
# (set_batched_fill), the row layout on AVX2; and a batch whose positions give 16+ tiles of 8 vectors
BATCHED_TILES = BATCHED[:3] + [(8, 30, 40, 8, 8, 1, 1, 0.6), (40, 30, 32, 8, 8, 1, 1, 0.6)]


@pytest.mark.parametrize("case", BATCHED_TILES, ids=lambda c: "x".join(map(str, c[:7])))
@pytest.mark.parametrize("tile", [(2, 4096), (4, 16384), (8, 4096), (0, 49152)], ids=lambda t: f"nv{t[0]}-{t[1]}")
def test_batched_tiles_of_every_shape_match_reference(kernels, case, tile):
    """The batched path at each tile width (2, 4, 8 vectors; 0 = by output size) and block size (4 KiB blocks:
    many row tiles of 16-32 rows, a partial last one), 2 threads forced parallel: equal to the reference with
    bias, residual, ReLU and all-zero filters."""
    n, c, f, h, w, s, p, d = case
    m, x, res, bias, ref, zeroed = _fused_case(n, c, f, h, w, 3, s, p, d, seed=n + c + f + 1, zero_every=7)
    old_fill, old_tile = kernels.batched_fill(), kernels.batched_tile()
    kernels.set_batched_tile(*tile)
    kernels.set_batched_fill(0.7)
    try:
        with forced_parallel(kernels, 2):
            out = m(x, res)
    finally:
        kernels.set_batched_tile(*old_tile)
        kernels.set_batched_fill(old_fill)
    assert _rel_err(out, ref) <= 1e-4
    assert _zeroed_filters_are_bias_residual_relu(out, bias, res, zeroed)


# (N, C, F, H, W, density, kernel, padding): outputs narrower than a vector at large batches (several rows per vector:
# 8x8 on AVX-512, 4x4 and 2x2 on both ISAs), few channels so the im2col paths do not take them; a partial last block
# of vectors. 'Same' convs (output width = input width) build the shifted copies from masked flat loads, the others
# (padding 0, a 5x5 kernel with padding 1) row by row.
MULTIROW = [(16, 12, 10, 8, 8, 0.3, 3, 1), (20, 9, 17, 8, 8, 0.2, 3, 1), (64, 6, 9, 4, 4, 0.5, 3, 1),
            (257, 4, 5, 2, 2, 0.5, 3, 1), (16, 7, 6, 10, 10, 0.3, 3, 0), (64, 5, 7, 4, 4, 0.5, 5, 2),
            (16, 6, 5, 10, 10, 0.4, 5, 1)]


@pytest.mark.parametrize("case", MULTIROW, ids=lambda c: "x".join(map(str, c[:5])) + f"-k{c[6]}p{c[7]}")
@pytest.mark.parametrize("threads", [1, 2])
def test_multirow_outputs_match_reference(kernels, case, threads):
    """Rows narrower than a vector, several per vector, read from kw shifted copies of the input: equal to the
    reference with bias, residual, ReLU and all-zero filters, forced parallel, and to the wide grid it replaces
    (set_multirow(False))."""
    n, c, f, h, w, d, k, p = case
    m, x, res, bias, ref, zeroed = _fused_case(n, c, f, h, w, k, 1, p, d, seed=n + c + f + 2, zero_every=4)
    with forced_parallel(kernels, threads), switched_off(kernels, "half_rows"), switched_off(kernels, "kx_split"):
        # (AVX-512 8x8: else half rows or kx-split)
        out = m(x, res)
        plain = SparseConv2d(m.weight, None, padding=p)(x)
        with switched_off(kernels, "multirow"):
            wide = m(x, res)
    assert _rel_err(out, ref) <= 1e-4
    assert _rel_err(plain, torch.nn.functional.conv2d(x, m.weight, None, 1, p)) <= 1e-4
    assert _rel_err(out, wide) <= 1e-4
    assert _zeroed_filters_are_bias_residual_relu(out, bias, res, zeroed)


# (N, C, F, H, W, stride): outputs whose rows are a multiple of 8 floats but not of 16 (8x8, 8x24), incl. stride 2 and
# a wide input channel count that the im2col path took before
HALF_ROWS = [(1, 64, 64, 8, 8, 1), (1, 32, 40, 16, 16, 2), (2, 12, 10, 8, 24, 1), (1, 130, 9, 8, 8, 1),
             (3, 8, 19, 8, 8, 1)]


@pytest.mark.parametrize("case", HALF_ROWS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("threads", [1, 2])
def test_half_width_rows_match_reference(kernels, case, threads):
    """AVX-512 builds run 8x8-style outputs in the banded row layout with 8-float vectors (set_half_rows; elsewhere
    the switch changes nothing): equal to the reference with bias, residual, ReLU and all-zero filters, forced
    parallel, and to the path it replaces."""
    n, c, f, h, w, s = case
    m, x, res, bias, ref, zeroed = _fused_case(n, c, f, h, w, 3, s, 1, 0.2, seed=n + c + f + 3, zero_every=3)
    with forced_parallel(kernels, threads), switched_off(kernels, "kx_split"):  # (stride 1 8x8: else kx-split)
        out = m(x, res)
        with switched_off(kernels, "half_rows"):
            old = m(x, res)
    assert _rel_err(out, ref) <= 1e-4
    assert _rel_err(out, old) <= 1e-4
    assert _zeroed_filters_are_bias_residual_relu(out, bias, res, zeroed)


def _nan_inf_reach_like_reference(weight, x, nan_at, inf_at):
    """With channel 0 read by every filter at every kernel position, a NaN at ``nan_at`` and an inf at ``inf_at``
    (input indices) reach exactly the outputs they reach in F.conv2d (stride 1, padding 1)."""
    weight = weight.clone()
    weight[:, 0] = 0.5
    m = SparseConv2d(weight, None, padding=1)
    xn = x.clone()
    xn[nan_at] = float("nan")
    xn[inf_at] = float("inf")
    got, want = m(xn), m.forward_reference(xn)
    return torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))


# (N, C, F, H, W, density): 3x3 stride-1 pad-1 outputs whose rows are 1, 2, 4 or 8 vectors of 16 floats or one of 8
# (AVX-512: the kx-split path): one-row images (top and bottom at once), blocks ending on the last row, several
# images, 8x8 maps (one block of 8-float rows), a dense weight, more filters than fit one group
KX_SPLIT = [(1, 16, 16, 32, 32, 0.12), (3, 8, 13, 5, 16, 0.3), (1, 5, 7, 1, 16, 0.8), (2, 6, 9, 2, 128, 0.4),
            (1, 9, 11, 17, 64, 0.25), (1, 64, 64, 8, 8, 0.12), (3, 16, 8, 5, 8, 0.3), (2, 7, 9, 1, 8, 1.0),
            (1, 40, 70, 16, 16, 0.1)]


@pytest.mark.parametrize("case", KX_SPLIT, ids=lambda c: "x".join(map(str, c[:5])))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kx_split_matches_reference(kernels, case, threads):
    """The kx-split path (per kernel column, taps summed over whole aligned rows of the unpadded input, shifted by
    one lane afterwards; rows outside the image skipped): equal to the reference with bias, residual, ReLU and
    all-zero filters, forced parallel at 1-3 threads, and to the banded rows it replaces (set_kx_split(False)); a
    NaN in the input reaches exactly the outputs the reference's does (every filter reads its channel)."""
    n, c, f, h, w, d = case
    m, x, res, bias, ref, zeroed = _fused_case(n, c, f, h, w, 3, 1, 1, d, seed=n + c + f + h, zero_every=4)
    with forced_parallel(kernels, threads):
        out = m(x, res)
        plain = SparseConv2d(m.weight, None, padding=1)(x)
        with switched_off(kernels, "kx_split"):
            old = m(x, res)
    assert _rel_err(out, ref) <= 1e-4
    assert _rel_err(plain, torch.nn.functional.conv2d(x, m.weight, None, 1, 1)) <= 1e-4
    assert _rel_err(out, old) <= 1e-4
    assert _zeroed_filters_are_bias_residual_relu(out, bias, res, zeroed)
    assert _nan_inf_reach_like_reference(m.weight, x, (n - 1, 0, h // 2, w - 1), (0, 0, 0, 0))


# (N, C, F, H, W, density, stage_bytes): kx-split blocks of 4+ rows from channel planes a multiple of 4 KiB apart
# (32x32, 64x16 maps), staged in a per-thread copy of their rows: 48 channels over the default 32 KiB, a smaller block
# staged with the threshold at 0, non-square maps (8-row blocks of one vector per row), several images
KX_STAGE = [(1, 48, 20, 32, 32, 0.12, None), (2, 8, 13, 32, 32, 0.3, 0), (1, 12, 9, 64, 16, 0.25, 0),
            (3, 5, 7, 32, 32, 1.0, 0)]


@pytest.mark.parametrize("case", KX_STAGE, ids=lambda c: "x".join(map(str, c[:5])))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kx_stage_matches_reference(kernels, case, threads):
    """The kx-split path with staged rows (each block's input rows and halo copied into a per-thread buffer first):
    equal to the reference with bias, residual, ReLU and all-zero filters, forced parallel at 1-3 threads, and to the
    same path reading the input in place (set_kx_stage(False)); a second call on new values in the same input tensor
    sees them (no stale copy); a NaN / inf reaches exactly the outputs the reference's does."""
    n, c, f, h, w, d, stage_bytes = case
    m, x, res, bias, ref, zeroed = _fused_case(n, c, f, h, w, 3, 1, 1, d, seed=n + c + f + h, zero_every=4)
    old_bytes = kernels.kx_stage_bytes()
    try:
        if stage_bytes is not None:
            kernels.set_kx_stage_bytes(stage_bytes)
        with forced_parallel(kernels, threads):
            staged = kernels.kx_stage_calls()
            out = m(x, res)
            staged = kernels.kx_stage_calls() - staged
            with switched_off(kernels, "kx_stage"):
                in_place = m(x, res)
            x2 = x.clone()
            x.mul_(-0.5).add_(0.25)  # new values, same storage
            again = m(x, res)
            nan_ok = _nan_inf_reach_like_reference(m.weight, x, (n - 1, 0, h // 2, w - 1), (0, 0, h - 1, 0))
    finally:
        kernels.set_kx_stage_bytes(old_bytes)
    assert staged == (1 if "AVX-512" in kernels.build_info() else 0)
    assert _rel_err(out, ref) <= 1e-4
    assert _rel_err(out, in_place) <= 1e-4
    assert _zeroed_filters_are_bias_residual_relu(out, bias, res, zeroed)
    assert _rel_err(again, m.forward_reference(x, res)) <= 1e-4 and not torch.allclose(x, x2)
    assert nan_ok


# (N, C, F, H, density): 3x3 stride-1 pad-1 convs on 4x4 / 2x2 maps at batches up to 16 (AVX-512: the tiny-map
# path, one image per vector): batch 1 (four accumulator chains), 3 and 8 (one per image), many channels, a dense
# weight, a partial last filter group
TINY_MAPS = [(1, 130, 24, 4, 0.2), (1, 96, 40, 2, 0.12), (3, 40, 24, 4, 0.3), (8, 20, 9, 2, 0.5), (2, 7, 9, 4, 1.0),
             (5, 33, 70, 2, 0.05), (1, 64, 24, 2, 0.45), (3, 50, 17, 2, 0.6), (13, 24, 20, 4, 0.3), (16, 30, 12, 2, 0.5)]


@pytest.mark.parametrize("case", TINY_MAPS, ids=lambda c: "x".join(map(str, c[:4])))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_tiny_maps_match_reference(kernels, case, threads):
    """The tiny-map path (per kernel position a sum of whole input channels, shifted and masked in registers; 2x2 maps
    whose kernels hold 2.5+ taps on average as one 4 x 4 matrix per kernel): equal to the reference with bias,
    residual, ReLU and all-zero filters, forced parallel at 1-3 threads, to the per-position sums
    (set_tiny_2x2_kernels(False)) and to the im2col gather it replaces (set_tiny_maps(False)); a NaN / inf in the
    input reaches exactly the outputs the reference's does (every filter reads its channel at every position)."""
    n, c, f, h, d = case
    m, x, res, bias, ref, zeroed = _fused_case(n, c, f, h, h, 3, 1, 1, d, seed=n + c + f + h, zero_every=4)
    with forced_parallel(kernels, threads):
        out = m(x, res)
        plain = SparseConv2d(m.weight, None, padding=1)(x)
        with switched_off(kernels, "tiny_2x2_kernels"):
            per_pos = m(x, res)
        with switched_off(kernels, "tiny_maps"):
            old = m(x, res)
    assert _rel_err(out, ref) <= 1e-4
    assert _rel_err(plain, torch.nn.functional.conv2d(x, m.weight, None, 1, 1)) <= 1e-4
    assert _rel_err(out, old) <= 1e-4 and _rel_err(per_pos, ref) <= 1e-4
    assert _zeroed_filters_are_bias_residual_relu(out, bias, res, zeroed)
    assert _nan_inf_reach_like_reference(m.weight, x, (n - 1, 0, h - 1, 0), (0, 0, 0, h - 1))


def test_tiny_maps_batch_limit(kernels):
    """Batches above set_tiny_max_batch (default 16) leave the tiny-map path; any limit gives the reference's output,
    also with batches over 8 (several blocks of 8 images)."""
    m, x, res, bias, ref, zeroed = _fused_case(20, 40, 16, 4, 4, 3, 1, 1, 0.3, seed=5, zero_every=4)
    assert kernels.tiny_max_batch() == 16
    try:
        for limit in (0, 8, 20):
            kernels.set_tiny_max_batch(limit)
            assert _rel_err(m(x, res), ref) <= 1e-4
    finally:
        kernels.set_tiny_max_batch(16)


def _direct_case(case, seed):
    """A 3x3 pad-1 direct conv case (N, C, F, H, W, stride) at 90% density: ``run(fused=True, reference=False)`` (with
    bias, residual and ReLU, or none of them) and the fused reference output."""
    n, c, f, h, w, s = case
    weight = _sparse_weight(f, c, 3, 0.9, seed=seed)
    bias = torch.randn(f)
    x = torch.randn(n, c, h, w)
    res = torch.randn(n, f, (h + 2 - 3) // s + 1, (w + 2 - 3) // s + 1)

    def run(fused=True, reference=False):
        if fused:
            return direct_conv2d(x, weight, bias, s, 1, True, res, reference=reference)
        return direct_conv2d(x, weight, None, s, 1, False, None, reference=reference)

    return run, run(reference=True)


@pytest.mark.parametrize("case", HALF_ROWS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("threads", [1, 2])
def test_direct_conv_half_width_rows_match_reference(kernels, case, threads):
    """The dense direct kernel's half-width row layout (AVX-512, 8x8-style outputs; set_half_rows): equal to the
    reference with bias, residual and ReLU, forced parallel, and to the path it replaces; filters not a multiple of
    8 (a partial packed block)."""
    run, ref = _direct_case(case, seed=sum(case[:3]))
    with forced_parallel(kernels, threads):
        out = run()
        with switched_off(kernels, "half_rows"):
            old = run()
        with switched_off(kernels, "fused_store"):
            buffered = run()
    assert out.shape == ref.shape
    assert _rel_err(out, ref) <= 1e-4 and _rel_err(out, old) <= 1e-4
    assert torch.equal(out, buffered)


def test_direct_split_balances_the_busiest_thread(kernels):
    """direct_conv2d's banded split over 2 threads: 24 filters (3 blocks of 8) on a 16x16 batch-1 output split the
    rows (filter blocks would leave one thread 2 of 3), 64 filters on 8x8 split the filter blocks 4 / 4, 32 filters
    on 16x16 keep the earlier choice on a tie (filters), one filter block never splits filters; with the switch off
    the earlier rule (filters for outputs under 4 register blocks per thread) comes back."""
    assert kernels.direct_split(1, 16, 1, 3, 2) == 2
    assert kernels.direct_split(1, 8, 1, 8, 2) == 1
    assert kernels.direct_split(1, 16, 1, 4, 2) == 1
    assert kernels.direct_split(1, 32, 2, 1, 2) == 2
    assert kernels.direct_split(64, 16, 1, 3, 2) == 2
    assert kernels.direct_split(1, 16, 1, 3, 1) == 1
    with switched_off(kernels, "direct_balanced_split"):
        assert kernels.direct_split(1, 16, 1, 3, 2) == 1


# (N, C, F, H, W, stride): filter blocks that do not divide over 2 threads (24, 40 filters), rows of 16 / 8 / 32
# floats, several images, a width whose padded rows span 3 vectors, an input wider than the masked copy
# (stride 2: odd input widths, rows of more than 32 floats split into phases by permutes)
SPLIT_CASES = [(1, 24, 24, 16, 16, 1), (1, 8, 24, 32, 32, 2), (1, 48, 40, 8, 8, 1), (3, 16, 24, 16, 16, 1),
               (1, 8, 8, 32, 32, 1), (2, 5, 11, 40, 48, 1), (1, 3, 8, 4, 272, 1), (1, 6, 10, 31, 31, 2),
               (2, 4, 9, 15, 47, 2), (1, 3, 16, 9, 95, 2)]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("threads", [1, 2])
def test_direct_conv_split_and_band_copy_match_reference(kernels, case, threads):
    """The dense direct kernel with the balanced split (set_direct_balanced_split), the masked band copies
    (set_band_copy_rows, AVX-512) and the epilogue from the registers (set_fused_store): equal to the reference with
    bias, residual and ReLU (and without any), forced parallel, and bitwise to the earlier split, to memset + memcpy
    bands and to the epilogue through the buffer."""
    run, ref = _direct_case(case, seed=sum(case[:3]) + case[4])
    with forced_parallel(kernels, threads):
        out = run()
        with switched_off(kernels, "direct_balanced_split"):
            old_split = run()
        with switched_off(kernels, "band_copy_rows"):
            old_copy = run()
        with switched_off(kernels, "fused_store"):
            buffered = run()
            plain = run(fused=False)
        fused_plain = run(fused=False)
    assert out.shape == ref.shape
    assert _rel_err(out, ref) <= 1e-4
    assert torch.equal(out, old_split) and torch.equal(out, old_copy) and torch.equal(out, buffered)
    assert torch.equal(fused_plain, plain)
    assert _rel_err(plain, run(fused=False, reference=True)) <= 1e-4


@pytest.mark.parametrize("case", [(1, 16, 20, 32, 32, 2), (1, 24, 9, 16, 16, 1), (1, 12, 10, 8, 8, 1),
                                  (3, 8, 7, 16, 16, 2)], ids=lambda c: "x".join(map(str, c)))
def test_sparse_conv_band_split_matches_reference(kernels, case):
    """Banded sparse convs split the output rows over the threads (set_sparse_band_min_vectors(0)) or the filters
    (a threshold no output reaches): both equal to the reference, forced parallel on 2 threads; the default is 8
    row vectors per thread."""
    n, c, f, h, w, s = case
    m, x, res, bias, ref, zeroed = _fused_case(n, c, f, h, w, 3, s, 1, 0.3, seed=n + c + f + s, zero_every=4)
    old = kernels.sparse_band_min_vectors()
    assert old == 8
    outs = []
    try:
        with forced_parallel(kernels, 2):
            for v in (0, 1 << 30):
                kernels.set_sparse_band_min_vectors(v)
                outs.append(m(x, res))
    finally:
        kernels.set_sparse_band_min_vectors(old)
    for out in outs:
        assert _rel_err(out, ref) <= 1e-4
        assert _zeroed_filters_are_bias_residual_relu(out, bias, res, zeroed)


@pytest.mark.parametrize("case", [(1, 16, 20, 32, 32, 1), (2, 24, 9, 16, 16, 1), (1, 7, 5, 13, 21, 1),
                                  (1, 32, 24, 16, 16, 2), (2, 5, 9, 15, 13, 2), (1, 6, 8, 12, 40, 2),
                                  (1, 4, 8, 16, 33, 2)],
                         ids=lambda c: "x".join(map(str, c)))
def test_sparse_conv_band_copy_matches_reference(kernels, case):
    """The sparse kernel's banded rows read the masked band copies too: equal to the reference and bitwise to the
    memset + memcpy bands, forced parallel on 2 threads (a width not a multiple of 8 takes the wide grid). Stride 2:
    rows split into both column phases at once (nck::split_even_odd), widths of at most 16 from one load, odd ones,
    and rows of more than 32 floats."""
    n, c, f, h, w, s = case
    m, x, res, bias, ref, zeroed = _fused_case(n, c, f, h, w, 3, s, 1, 0.3, seed=n + c + f, zero_every=4)
    with forced_parallel(kernels, 2), switched_off(kernels, "kx_split"):  # (stride 1: else kx-split, no bands)
        out = m(x, res)
        with switched_off(kernels, "band_copy_rows"):
            old = m(x, res)
        with switched_off(kernels, "phase_split"):
            earlier = m(x, res)
    assert _rel_err(out, ref) <= 1e-4 and torch.equal(out, old) and torch.equal(out, earlier)
    assert _zeroed_filters_are_bias_residual_relu(out, bias, res, zeroed)


def test_multirow_at_batch_one_when_allowed(kernels):
    """set_multirow_min_vectors(0) lets a batch-1 8x8 / 4x4 output take the multi-row path (a single, partial block
    of vectors; the flat shifted copies cover the whole map): equal to the reference and to the wide grid."""
    old = kernels.multirow_min_vectors()
    assert old == 64
    kernels.set_half_rows(False)  # (AVX-512 8x8: else the half-width rows)
    try:
        for c, h in ((40, 8), (24, 4)):
            weight = _sparse_weight(12, c, 3, 0.2, seed=c + h)
            x = torch.randn(1, c, h, h)
            m = SparseConv2d(weight, torch.randn(12), padding=1, relu=True)
            kernels.set_multirow_min_vectors(0)
            out = m(x)
            kernels.set_multirow_min_vectors(old)
            wide = m(x)
            assert _rel_err(out, m.forward_reference(x)) <= 1e-4 and _rel_err(out, wide) <= 1e-4
    finally:
        kernels.set_multirow_min_vectors(old)
        kernels.set_half_rows(True)


def test_batched_small_outputs_keep_nan_and_inf_where_the_reference_does(kernels):
    """The im2col gather reads a valid element for padding positions and selects zero: an inf or NaN in the
    input (also at the first element, which the padding positions read) reaches exactly the outputs whose
    windows hold it, as in F.conv2d (channel 0, which every filter reads with non-zero weights: elsewhere a
    dense conv would also spread a NaN through the zero weights, which a sparse kernel skips)."""
    weight = _sparse_weight(12, 40, 3, 0.4, seed=3)
    weight[:, 0] = 0.5  # every filter reads channel 0 at every kernel position
    m = SparseConv2d(weight, None, padding=1)
    for bad in (float("inf"), float("nan")):
        x = torch.randn(20, 40, 4, 4)
        x[0, 0, 0, 0] = bad
        x[7, 0, 2, 1] = float("nan")
        out, ref = m(x), m.forward_reference(x)
        assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))
        assert torch.isfinite(out[1:7]).all() and torch.isnan(out[7]).any()
        fin = torch.isfinite(ref)
        assert _rel_err(out[fin], ref[fin]) <= 1e-4


def test_direct_pack_layout_and_bad_shapes(kernels):
    w = torch.randn(11, 3, 3, 3)
    packed = direct_pack(w)
    fb = -(-11 // DIRECT_FILTERS)
    assert packed.shape == (fb, 27, DIRECT_FILTERS)
    unpacked = packed.permute(0, 2, 1).reshape(fb * DIRECT_FILTERS, 27)
    assert torch.equal(unpacked[:11].reshape(w.shape), w) and not unpacked[11:].any()
    with pytest.raises(ConfigError, match="direct_pack"):
        direct_pack(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="packed weight must be"):
        kernels.direct_conv2d(torch.randn(1, 4, 5, 5), packed, None, None, 11, 3, 3, 1, 1, False)


def test_all_zero_filters_output_bias_only(kernels):
    weight = _sparse_weight(8, 4, 3, 0.5, 0)
    weight[[1, 5]] = 0.0
    bias = torch.arange(8, dtype=torch.float32) - 3
    m = SparseConv2d(weight, bias, padding=1, relu=True)
    x = torch.randn(2, 4, 5, 5)
    out = m(x)
    assert _rel_err(out, m.forward_reference(x)) <= 1e-4
    assert torch.equal(out[:, 1], torch.zeros(2, 5, 5))  # bias -2, ReLU
    assert torch.equal(out[:, 5], torch.full((2, 5, 5), 2.0))


def test_thread_counts_give_the_same_result(kernels):
    weight = _sparse_weight(32, 16, 3, 0.2, 1)
    m = SparseConv2d(weight, torch.randn(32), padding=1)
    x = torch.randn(3, 16, 12, 12)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = m(x)
        torch.set_num_threads(2)
        b = m(x)
    finally:
        torch.set_num_threads(old)
    assert _rel_err(a, b) <= 1e-6 and _rel_err(a, m.forward_reference(x)) <= 1e-4


def test_conv_taps_rebuild_the_weight_heaviest_filters_first():
    weight = _sparse_weight(10, 6, 3, 0.3, 2)
    weight[4] = 0.0
    t = conv_taps(weight)
    counts = (t["ptr"][1:] - t["ptr"][:-1]).tolist()
    assert counts == sorted(counts, reverse=True) and 4 not in t["order"].tolist()
    rebuilt = torch.zeros(10, 6 * 9)
    filt = torch.repeat_interleave(t["order"].long(), torch.tensor(counts))
    rebuilt[filt, t["chan"].long() * 9 + t["pos"].long()] = t["w"]
    assert torch.equal(rebuilt.reshape(weight.shape), weight)


def test_bad_inputs_are_clear(kernels):
    m = SparseConv2d(_sparse_weight(4, 3, 3, 0.5, 0), padding=1)
    with pytest.raises(ConfigError, match=r"expected input \(N, 3, H, W\)"):
        m(torch.randn(1, 4, 8, 8))
    with pytest.raises(ConfigError, match="weight must be"):
        SparseConv2d(torch.randn(4, 3))
    from netcarve.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="groups=1"):
        SparseConv2d.from_conv(torch.nn.Conv2d(4, 4, 3, groups=2), where="features.3")
    # grad-requiring inputs run the reference (autograd works there)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None


# tiles of 8 and 16 columns (one / two AVX2 vectors), 16-row tiles (passes of 4 rows), ragged tiles; batches
# below 8 (row path) and from 8 on (transposed path; 17: a partial vector of batch rows)
@pytest.mark.parametrize("bh,bw", [(1, 16), (2, 16), (4, 16), (8, 16), (16, 16), (4, 32), (4, 8), (16, 8), (4, 4),
                                   (2, 5)])
@pytest.mark.parametrize("m", [1, 3, 8, 17, 32])
def test_bsr_linear_matches_f_linear(kernels, bh, bw, m):
    from netcarve.runtime.kernels import bsr_linear, bsr_tensors
    from netcarve.sparsity import make_scheme

    torch.manual_seed(bh * 100 + bw * 10 + m)
    rows, cols = 37, 70  # neither a multiple of the tile
    w = torch.randn(rows, cols)
    w = w * make_scheme("block", block=[bh, bw]).project(w, 0.7)
    b = torch.randn(rows)
    x = torch.randn(m, cols)
    ref = torch.nn.functional.linear(x, w, b)
    out = kernels.bsr_linear(x, *bsr_tensors(w, (bh, bw)), b, rows)
    assert out.shape == (m, rows) and _rel_err(out, ref) <= 1e-4
    if m <= 8:  # (AVX-512: 16 rows per reduction up to batch 8 by default) the per-block-row path too
        with switched_off(kernels, "bsr_rows16"):
            assert _rel_err(kernels.bsr_linear(x, *bsr_tensors(w, (bh, bw)), b, rows), ref) <= 1e-4
    # and with the batch threshold moved past the batch (AVX-512): 8 and larger batches on the 16-row reductions
    old_min = kernels.bsr_batched_min()
    kernels.set_bsr_batched_min(max(9, m + 1))
    try:
        assert _rel_err(kernels.bsr_linear(x, *bsr_tensors(w, (bh, bw)), b, rows), ref) <= 1e-4
    finally:
        kernels.set_bsr_batched_min(old_min)
    assert _rel_err(bsr_linear(x, w, None), torch.nn.functional.linear(x, w)) <= 1e-4  # auto block choice



# The transposed (batched) path in parallel: every thread its chunk of block rows, its outputs transposed into y;
# batches that fill whole vectors (8, 64), leave a partial one (9, 41) or make a power-of-two row stride (128:
# the padded leading dimension); no bias; every register block (tile heights 1 / 2 / 4 and passes of 4 rows for
# 8 / 16); a last block row cut short (R = 203); the transposes in 16 x 16 blocks (with 8 x 8 and scalar edges) and,
# switched off, in 8 x 8 blocks only: bitwise the same result
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bh,bw", [(1, 16), (2, 8), (4, 16), (8, 16), (16, 16)])
def test_bsr_linear_batched_parallel(kernels, threads, bh, bw):
    from netcarve.runtime.kernels import bsr_tensors
    from netcarve.sparsity import make_scheme

    old_threads, old_threshold = torch.get_num_threads(), kernels.parallel_threshold()
    torch.set_num_threads(threads)
    kernels.set_parallel_threshold(0)
    try:
        torch.manual_seed(threads * 1000 + bh * 10 + bw)
        rows, cols = 203, 96
        w = torch.randn(rows, cols)
        w = w * make_scheme("block", block=[bh, bw]).project(w, 0.85)
        bt = bsr_tensors(w, (bh, bw))
        b = torch.randn(rows)
        for m in (1, 5, 8, 9, 41, 64, 128):  # (1, 5: the 16-row reductions, chunks cut at any block row)
            x = torch.randn(m, cols)
            out = kernels.bsr_linear(x, *bt, b, rows)
            assert out.shape == (m, rows) and _rel_err(out, torch.nn.functional.linear(x, w, b)) <= 1e-4, m
            plain = kernels.bsr_linear(x, *bt, None, rows)
            assert _rel_err(plain, torch.nn.functional.linear(x, w)) <= 1e-4, m
            with switched_off(kernels, "transpose16"):  # (AVX-512: 16 x 16 transposes by default) 8 x 8 blocks
                assert torch.equal(kernels.bsr_linear(x, *bt, b, rows), out), m
        # a strided (non-contiguous) input gives the same result
        xs = torch.randn(cols, 40).t()
        assert _rel_err(kernels.bsr_linear(xs, *bt, b, rows), torch.nn.functional.linear(xs, w, b)) <= 1e-4
    finally:
        kernels.set_parallel_threshold(old_threshold)
        torch.set_num_threads(old_threads)

# Many rows (a transformer's batch x tokens) run in row tiles (set_bsr_row_tile, default 32), tiles split over the
# threads: the same outputs as all rows at once, for every tile height, ragged last tiles and a last block row cut
# short; also as a plan's sparse linear step on a 3-d input
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bh,bw", [(1, 16), (4, 16), (16, 16), (4, 8)])
def test_bsr_linear_row_tiles(kernels, threads, bh, bw):
    from netcarve.runtime.kernels import bsr_tensors
    from netcarve.sparsity import make_scheme

    old_threads, old_tile = torch.get_num_threads(), kernels.bsr_row_tile()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(threads * 100 + bh + bw)
        rows, cols = 203, 96
        w = torch.randn(rows, cols)
        w = w * make_scheme("block", block=[bh, bw]).project(w, 0.85)
        bt = bsr_tensors(w, (bh, bw))
        b = torch.randn(rows)
        for m, tile in ((129, 64), (300, 64), (1024, 64), (65, 32), (97, 32)):
            x = torch.randn(m, cols)
            kernels.set_bsr_row_tile(tile)
            tiled = kernels.bsr_linear(x, *bt, b, rows)
            kernels.set_bsr_row_tile(0)
            whole = kernels.bsr_linear(x, *bt, b, rows)
            ref = torch.nn.functional.linear(x, w, b)
            assert _rel_err(tiled, ref) <= 1e-4 and _rel_err(whole, ref) <= 1e-4, m
            assert torch.equal(tiled, whole), m
        kernels.set_bsr_row_tile(64)
        plan = kernels.Plan(2, 1)
        plan.add_linear("fc", 0, 1, w, b, True, list(bt), True, False)
        x3 = torch.randn(5, 61, cols)  # 305 rows in tiles of 64
        assert _rel_err(plan.run(x3), torch.relu(torch.nn.functional.linear(x3, w, b))) <= 1e-4
    finally:
        kernels.set_bsr_row_tile(old_tile)
        torch.set_num_threads(old_threads)


# Tiles 16 rows tall with their transposed copy (bsr_linear_t, as plans call it: MatW keeps bsr_tiles_t of the
# tiles) run with the output rows in the vector lanes (bsr_cols, AVX-512): every batch-row register block (8, 4, 2,
# 1 and their mixes), tiles narrower than a vector and of an odd width, K padded to the tile, a last block row cut
# short (203 rows), an empty block row, bias or none, a strided input, 1-3 threads with the work split forced; against
# F.linear and against the same call with bsr_cols off. A plan's sparse linear step takes the same path.
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bw", [16, 8, 5])
def test_bsr_cols_matches_f_linear(kernels, threads, bw):
    from netcarve.runtime.kernels import bsr_tensors
    from netcarve.sparsity import make_scheme

    torch.manual_seed(threads * 100 + bw)
    rows, cols = 203, 70
    w = torch.randn(rows, cols)
    w = w * make_scheme("block", block=[16, bw]).project(w, 0.8)
    w[32:48] = 0  # an empty block row
    bt = bsr_tensors(w, (16, bw))
    vt = kernels.bsr_tiles_t(bt[2])
    assert vt.shape == (bt[2].shape[0], bw, 16) and torch.equal(vt, bt[2].transpose(1, 2))
    b = torch.randn(rows)
    with forced_parallel(kernels, threads):
        for m in (1, 2, 3, 4, 5, 8, 9, 13, 33):
            x = torch.randn(m, cols)
            for bias in (b, None):
                ref = torch.nn.functional.linear(x, w, bias)
                out = kernels.bsr_linear_t(x, *bt[:3], vt, bias, rows)
                assert out.shape == (m, rows) and _rel_err(out, ref) <= 1e-4, (m, bias is None)
                with switched_off(kernels, "bsr_cols"):
                    assert _rel_err(kernels.bsr_linear_t(x, *bt[:3], vt, bias, rows), ref) <= 1e-4
        xs = torch.randn(cols, 40).t()
        assert _rel_err(kernels.bsr_linear_t(xs, *bt[:3], vt, b, rows), torch.nn.functional.linear(xs, w, b)) <= 1e-4
        plan = kernels.Plan(2, 1)
        plan.add_linear("fc", 0, 1, w, b, False, list(bt), True, False)
        for m in (1, 6, 32):
            x = torch.randn(m, cols)
            assert _rel_err(plan.run(x), torch.nn.functional.linear(x, w, b)) <= 1e-4, m


def test_bsr_tiles_t_only_for_16_row_tiles_and_checked(kernels):
    from netcarve.runtime.kernels import bsr_tensors

    w = torch.randn(32, 32)
    bt = bsr_tensors(w, (4, 16))
    assert kernels.bsr_tiles_t(bt[2]) is None  # other tile heights keep their paths
    bt16 = bsr_tensors(w, (16, 16))
    with pytest.raises(RuntimeError, match="transposed tiles do not match"):
        kernels.bsr_linear_t(torch.randn(2, 32), *bt16[:3], torch.zeros(1, 16, 16), None, 32)


# Dense linear steps of at most 4 batch rows run netcarve's dot-product kernel (dense_small): 1-5 rows (5: ATen),
# K with and without a vector tail (3, 70, 128), R not a multiple of its 4-row blocks (37), bias or none, a strided
# input, 1-3 threads with the work split forced; against F.linear and against the same plan on ATen's addmm.
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("k", [3, 70, 128])
def test_dense_small_linear_matches_f_linear(kernels, threads, k):
    with forced_parallel(kernels, threads):
        torch.manual_seed(threads * 100 + k)
        rows = 37
        w = torch.randn(rows, k)
        b = torch.randn(rows)
        for bias in (b, None):
            plan = kernels.Plan(2, 1)
            plan.add_linear("fc", 0, 1, w, bias, False, [], False, False)
            for m in (1, 2, 3, 4, 5):
                for x in (torch.randn(m, k), torch.randn(k, m).t()):
                    ref = torch.nn.functional.linear(x, w, bias)
                    out = plan.run(x)
                    assert out.shape == (m, rows) and _rel_err(out, ref) <= 1e-4, (m, bias is None)
                    with switched_off(kernels, "dense_small_linear"):
                        aten = plan.run(x)
                    assert _rel_err(out, aten) <= 1e-4, (m, bias is None)
            assert plan.run(torch.randn(0, k)).shape == (0, rows)  # an empty batch: ATen's path


def test_choose_block_follows_the_zero_structure():
    from netcarve.runtime.kernels import choose_block
    from netcarve.sparsity import make_scheme

    torch.manual_seed(0)
    w = torch.randn(384, 128)
    assert choose_block(w * make_scheme("block", block=[4, 16]).project(w, 0.9)) == (4, 16)
    assert choose_block(w * make_scheme("block", block=[16, 16]).project(w, 0.9)) == (16, 16)
    # unstructured 90%: almost every tile of any size holds a non-zero, so BSR stores nearly everything
    # (autotuning then keeps the dense kernel)
    from netcarve.pack import pack

    wu = w * make_scheme("unstructured").project(w, 0.9)
    p = pack(wu, "bsr", block=list(choose_block(wu)))
    assert p.stored_values / wu.numel() > 0.8


# (N, C, H, W, kernel, stride, padding, ceil_mode): the 2x2 / 2 vector path (even and odd sizes, widths beyond
# a vector, a 1-wide output), overlapping 3x3 / 2 windows with padding (ResNet stems), ceil mode that adds a
# partial window and one whose last window would start in the padding (dropped), 1x1 and non-square windows
POOL_CASES = [
    (1, 64, 32, 32, 2, 2, 0, False),
    (3, 5, 17, 19, 2, 2, 0, False),
    (2, 3, 2, 42, 2, 2, 0, False),
    (1, 4, 9, 9, 3, 2, 1, False),
    (2, 3, 7, 6, 3, 2, 1, True),
    (1, 2, 5, 5, 2, 2, 0, True),
    (1, 2, 6, 6, 3, 2, 1, True),
    (2, 3, 5, 8, 1, 1, 0, False),
    (1, 2, 8, 7, (2, 3), (1, 2), (1, 1), False),
    (1, 1, 3, 4200, 3, 2, 1, True),  # rows wider than the kernel's 2048-float buffer: pooled in chunks
    (1, 1, 4, 4097, 2, 2, 0, True),
    # AVX-512's flat 2x2 / 2 path (even maps 2-32 wide): whole chunks of 16 outputs, chunks plus a tail, a tail
    # only, 32 / 16 / 8 / 4 / 2 columns, ceil mode on even sizes (the same windows)
    (2, 3, 4, 8, 2, 2, 0, False),
    (3, 7, 4, 4, 2, 2, 0, False),
    (1, 5, 2, 2, 2, 2, 0, False),
    (2, 3, 2, 32, 2, 2, 0, False),
    (1, 3, 6, 16, 2, 2, 0, True),
    (2, 64, 8, 8, 2, 2, 0, False),
    (1, 300, 2, 2, 2, 2, 0, False),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "x".join(map(str, c)))
def test_max_pool_matches_reference(kernels, case):
    from netcarve.runtime.kernels import max_pool2d

    n, c, h, w, k, s, p, ceil = case
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(n, c, h, w, generator=g) - 3.0  # mostly negative: the padding must never win
    x.view(-1)[:: max(1, x.numel() // 7)] = float("nan")  # a NaN in a window makes that output NaN
    x.view(-1)[1 :: max(1, x.numel() // 5)] = float("-inf")
    ref = torch.nn.functional.max_pool2d(x, k, s, p, ceil_mode=ceil)
    got = max_pool2d(x, k, s, p, ceil_mode=ceil)
    assert got.shape == ref.shape
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.nan_to_num(0.0), ref.nan_to_num(0.0))
    with pytest.raises(RuntimeError, match="smaller than"):
        kernels.max_pool2d(torch.randn(1, 1, 2, 2), 3, 3, 1, 1, 0, 0, False)


@pytest.mark.parametrize("shape", [(2, 3, 4, 8), (3, 7, 4, 4), (64, 40, 4, 4), (8, 37, 8, 8), (5, 9, 2, 2)])
def test_flat_max_pool_equals_per_plane(kernels, shape):
    """The flat 2x2 / 2 pooling (AVX-512; elsewhere the same path runs twice) split over 1-3 threads is bitwise
    equal to the per-plane kernel (set_pool_flat(False)), NaNs included."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
    x.view(-1)[::11] = float("nan")
    for threads in (1, 2, 3):
        with forced_parallel(kernels, threads):
            got = kernels.max_pool2d(x, 2, 2, 2, 2, 0, 0, False)
            with switched_off(kernels, "pool_flat"):
                per_plane = kernels.max_pool2d(x, 2, 2, 2, 2, 0, 0, False)
        assert torch.equal(got.isnan(), per_plane.isnan()), threads
        assert torch.equal(got.nan_to_num(0.0), per_plane.nan_to_num(0.0)), threads


@pytest.mark.parametrize("shape", [(1, 64, 8, 8), (3, 5, 7, 9), (2, 3, 1, 1), (1, 2, 4, 37)])
def test_global_avg_pool_matches_mean(kernels, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 3 + 1
    ref = x.mean((2, 3), keepdim=True)
    got = kernels.global_avg_pool(x)
    assert got.shape == ref.shape
    assert _rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("mapped", [False, True])
def test_shortcut_subsample_matches_slicing(kernels, stride, mapped):
    """The option-A shortcut: rows / columns 0, stride, ... (odd sizes included), channels at an offset with zeros
    around them, or placed by a channel map (a pruned model's), zeros in the unmapped channels."""
    x = torch.randn(2, 6, 9, 7, generator=torch.Generator().manual_seed(stride))
    y = x[:, :, ::stride, ::stride]
    if mapped:
        src, dst = torch.tensor([0, 2, 5, 3]), torch.tensor([7, 1, 4, 0])
        ref = torch.zeros(2, 9, y.shape[2], y.shape[3])
        ref[:, dst] = y[:, src]
        got = kernels.shortcut_subsample(x, stride, 9, 0, src, dst)
    else:
        ref = torch.nn.functional.pad(y, (0, 0, 0, 0, 2, 4))
        got = kernels.shortcut_subsample(x, stride, 12, 2, None, None)
    assert torch.equal(got, ref)
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.shortcut_subsample(x, stride, 7, 2, None, None)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.shortcut_subsample(x, stride, 4, 0, torch.tensor([0]), torch.tensor([4]))


DEPTHWISE_CASES = [  # (N, C, H, W, k, stride, pad)
    (1, 32, 32, 32, 3, 1, 1), (2, 7, 17, 9, 3, 1, 1), (1, 96, 32, 32, 3, 2, 1), (3, 5, 15, 15, 3, 2, 1),
    (1, 12, 8, 8, 5, 1, 2), (2, 4, 9, 11, 5, 2, 2), (1, 3, 6, 20, 3, 3, 0), (1, 6, 4, 4, 3, 1, 1),
    (2, 3, 5, 7, 1, 1, 0), (1, 2, 9, 9, 7, 1, 3),
]


@pytest.mark.parametrize("case", DEPTHWISE_CASES)
@pytest.mark.parametrize("fuse", ["none", "bias_relu", "bias_res_relu"])
def test_depthwise_conv_matches_reference(kernels, case, fuse):
    """netcarve's depthwise kernel equals F.conv2d(groups=C) (+ residual, ReLU) at 1-3 threads, forced parallel too:
    odd sizes, strides 1-3, 1x1 to 7x7 windows, rows that are not a whole vector."""
    n, c, h, w, k, s, p = case
    torch.manual_seed(sum(case))
    x = torch.randn(n, c, h, w)
    wt = torch.randn(c, 1, k, k)
    b = torch.randn(c) if fuse != "none" else None
    ref = torch.nn.functional.conv2d(x, wt, b, s, p, 1, c)
    r = torch.randn_like(ref) if fuse == "bias_res_relu" else None
    if r is not None:
        ref = ref + r
    relu = fuse != "none"
    if relu:
        ref = ref.relu()
    for threads in (1, 2, 3):
        with forced_parallel(kernels, threads) if threads == 3 else at_threads(threads):
            got = kernels.depthwise_conv2d(x, wt, b, r, s, p, relu)
        assert got.shape == ref.shape
        assert _rel_err(got, ref) <= 1e-5, (threads, _rel_err(got, ref))
    # the plane buffer is laid out per geometry: a second geometry in the same threads, then this one again
    kernels.depthwise_conv2d(torch.randn(1, 2, h + 3, w + 1), torch.randn(2, 1, k, k), None, None, 1, p, False)
    assert _rel_err(kernels.depthwise_conv2d(x, wt, b, r, s, p, relu), ref) <= 1e-5


def test_depthwise_conv_nan_and_bad_inputs(kernels):
    """A NaN input makes exactly the outputs whose windows hold it NaN (ReLU keeps it, as torch.relu); wrong weight
    shapes, channel counts and inputs smaller than the window are clear errors."""
    x = torch.randn(2, 4, 10, 10)
    x[1, 2, 3, 4] = float("nan")
    wt = torch.randn(4, 1, 3, 3)
    for relu in (False, True):
        ref = torch.nn.functional.conv2d(x, wt, None, 1, 1, 1, 4)
        ref = ref.relu() if relu else ref
        got = kernels.depthwise_conv2d(x, wt, None, None, 1, 1, relu)
        assert torch.equal(got.isnan(), ref.isnan()) and int(got.isnan().sum()) == 9
        assert torch.allclose(got.nan_to_num(0.0), ref.nan_to_num(0.0), atol=1e-5)
    with pytest.raises(RuntimeError, match="weight must be"):
        kernels.depthwise_conv2d(x, torch.randn(4, 2, 3, 3), None, None, 1, 1, False)
    with pytest.raises(RuntimeError, match="one per channel"):
        kernels.depthwise_conv2d(x, torch.randn(5, 1, 3, 3), None, None, 1, 1, False)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        kernels.depthwise_conv2d(torch.randn(1, 4, 2, 2), wt, None, None, 1, 0, False)
    with pytest.raises(RuntimeError, match="residual shape"):
        kernels.depthwise_conv2d(x, wt, None, torch.randn(2, 4, 9, 9), 1, 1, False)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 7, 33, 256])
def test_dense_panel_linear_matches_reference(kernels, threads, k):
    """The dense panel kernel (the plan's "direct" linear): every row tail (1-8 rows per job and more), column tails
    that are not multiples of the panel width, with and without bias, split over the threads."""
    from netcarve.runtime.kernels import dense_linear

    torch.manual_seed(k)
    with forced_parallel(kernels, threads):
        for m in (1, 5, 7, 8, 9, 17, 40):
            for n in (1, 17, 32, 47, 100):
                x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
                for bias in (b, None):
                    y, ref = dense_linear(x, w, bias), torch.nn.functional.linear(x, w, bias)
                    assert y.shape == ref.shape
                    assert (y - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item()), (m, n, k)
                    assert torch.equal(dense_linear(x, w, bias, reference=True), ref)
    wp, bp = kernels.pack_panels(torch.randn(8, 5), None)
    with pytest.raises(RuntimeError, match="dense_panel: x"):
        kernels.dense_panel(torch.randn(3, 6), wp, bp, 8)
    with pytest.raises(RuntimeError, match="dense_panel: 99 output features do not match"):
        kernels.dense_panel(torch.randn(3, 5), wp, bp, 99)
