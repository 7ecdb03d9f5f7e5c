"""Per-layer generated conv code (netcarve.runtime.codegen + the plan's gen_conv2d) against F.conv2d on the masked
weight: odd sizes, strides, 1x1, chunks and blocks cut anywhere, empty blocks, bias / residual / ReLU, threads,
the cache, and clear errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from netcarve.errors import ConfigError
from netcarve.runtime import codegen

from ._util import forced_parallel

pytestmark = pytest.mark.skipif(not codegen.host_supported()[0], reason=codegen.host_supported()[1] or "n/a")


def _weight(f, c, k, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(f, c, k, k, generator=g)
    return w * (torch.rand(w.shape, generator=g) < density)


def _run(kernels, lib, w, b, x, stride, pad, relu, residual=False):
    """A plan with the generated conv; with ``residual`` the conv adds relu(x) (value 1) to its output."""
    if residual:
        p = kernels.Plan(3, 2)
        p.add_relu("r", 0, 1)
        p.add_conv_gen("c", [0, 1], 2, w, b, str(lib), stride, pad, relu)
    else:
        p = kernels.Plan(2, 1)
        p.add_conv_gen("c", [0], 1, w, b, str(lib), stride, pad, relu)
    return p.run(x)


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


# (N, C, F, H, W, k, stride, pad, density, kc): F past a block of 16 and not a multiple of it, K not a multiple of kc
# (chunks cut inside a kernel's taps), outputs not a multiple of 16 columns, 1x1 and strided convs, batch 1 and more
CASES = [
    (3, 20, 37, 5, 7, 3, 1, 1, 0.15, 100),
    (2, 64, 64, 8, 8, 3, 1, 1, 0.12, 384),
    (1, 7, 5, 9, 9, 3, 2, 0, 0.3, 16),
    (2, 33, 17, 6, 6, 1, 1, 0, 0.2, 10),
    (5, 16, 48, 4, 4, 3, 1, 1, 0.1, 1),
    (1, 3, 16, 11, 13, 5, 2, 2, 0.5, 7),
]


@pytest.mark.parametrize("n, c, f, h, w, k, s, p, d, kc", CASES)
@pytest.mark.parametrize("threads", [1, 3])
def test_generated_conv_matches_the_masked_dense_conv(kernels, n, c, f, h, w, k, s, p, d, kc, threads):
    weight = _weight(f, c, k, d, seed=n * 100 + c)
    weight[f // 2] = 0  # a filter with no taps: bias (+ residual) only
    bias = torch.randn(f)
    lib = codegen.build_conv(weight, kc=kc, name="test")
    assert kernels.gen_conv_info(str(lib)) == [f, c * k * k, (f + 15) // 16, (c * k * k + kc - 1) // kc, kc]
    x = torch.randn(n, c, h, w)
    ref = F.conv2d(x, weight, bias, s, p)
    with forced_parallel(kernels, threads):
        for tiles, outer in ((0, False), (1, False), (3, False), (3, True), (0, True)):
            kernels.set_gen_tiles(tiles)
            kernels.set_gen_block_outer(outer)
            try:
                assert _rel_err(_run(kernels, lib, weight, bias, x, s, p, False), ref) <= 1e-5
                assert _rel_err(_run(kernels, lib, weight, None, x, s, p, True), torch.relu(ref - bias.view(1, -1, 1, 1))) <= 1e-5
            finally:
                kernels.set_gen_tiles(0)
                kernels.set_gen_block_outer(False)
    # rip-relative addressing everywhere (compact=False) computes the same
    wide = codegen.build_conv(weight, kc=kc, name="test", compact=False)
    assert wide != lib and _rel_err(_run(kernels, wide, weight, bias, x, s, p, False), ref) <= 1e-5


def test_generated_conv_fuses_residual_and_relu(kernels):
    weight = _weight(24, 24, 3, 0.2, seed=3)
    weight[:16] = 0  # a whole block of 16 filters without taps
    bias = torch.randn(24)
    lib = codegen.build_conv(weight, kc=50)
    x = torch.randn(2, 24, 6, 6)
    out = _run(kernels, lib, weight, bias, x, 1, 1, True, residual=True)
    ref = torch.relu(F.conv2d(x, weight, bias, 1, 1) + torch.relu(x))
    assert _rel_err(out, ref) <= 1e-5
    assert torch.equal(out[:, :16], torch.relu(bias[:16].view(1, -1, 1, 1) + torch.relu(x[:, :16])))


def test_generated_source_loads_each_used_row_once_per_block():
    """The property the generated code exists for: per block, one load per im2col row any of its filters uses, and
    one FMA per non-zero weight."""
    w = torch.zeros(20, 2, 3, 3)
    w[0, 0, 1, 1] = w[3, 0, 1, 1] = w[15, 0, 1, 1] = 1.5  # row 4 used by three filters of block 0
    w[7, 1, 2, 2] = -2.0  # row 17, one filter
    w[17, 1, 0, 0] = 0.25  # block 1: row 9
    src = codegen.generate_conv_source(w, kc=8, compact=False)
    b0 = "".join(re.findall(r"^\.Lg0_\d+:\n.*?\tret$", src, re.S | re.M))
    b1 = "".join(re.findall(r"^\.Lg1_\d+:\n.*?\tret$", src, re.S | re.M))
    assert b0.count("(%rdi), %zmm") == 2 and b0.count("vfmadd231ps") == 4
    assert b1.count("(%rdi), %zmm") == 1 and b1.count("vfmadd231ps") == 1
    # row 4 in chunk 0 (rows 0-7): 4 x 64 bytes in; row 17 in chunk 2 (16-23) and row 9 in chunk 1: 64 bytes in
    assert "vmovups 256(%rdi)" in b0 and "vmovups 64(%rdi)" in b0 and "vmovups 64(%rdi)" in b1
    # the three users of row 4 accumulate into zmm0 / zmm3 / zmm15, and only the used accumulators are loaded
    assert all(f"%zmm{i}\n" in b0 for i in (0, 3, 7, 15)) and "(%rsi), %zmm1\n" not in b0
    assert src.count(".quad .Lg") == 2 * 3  # 2 blocks x 3 chunks
    assert "0x3fc00000" in src and "0xc0000000" in src and "0x3e800000" in src  # 1.5, -2.0, 0.25 exactly
    compact = codegen.generate_conv_source(w, kc=8)
    assert "vmovups -7936(%rcx), %zmm" in compact  # row 4: 256 bytes past xs, from xs + 8 KiB
    assert compact.count("vfmadd231ps") == 5 and "(%rdx){1to16}" in compact and "(%rip){1to16}" not in compact


def test_generated_conv_cache_and_errors(kernels, tmp_path, monkeypatch):
    monkeypatch.setenv("NETCARVE_CACHE", str(tmp_path))
    w = _weight(8, 4, 3, 0.3, seed=1)
    lib = codegen.build_conv(w)
    assert lib.parent == tmp_path / "gen" and lib.exists()

    def no_compiler(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(codegen.subprocess, "run", no_compiler)
    monkeypatch.setattr(codegen, "_compiler_id", lambda cxx: "cached")
    with pytest.raises(AssertionError):  # (another compiler id is another key)
        codegen.build_conv(w)
    monkeypatch.undo()
    monkeypatch.setenv("NETCARVE_CACHE", str(tmp_path))
    assert codegen.build_conv(w) == lib  # the same weight: the cached library, not compiled again
    assert codegen.build_conv(w * 2) != lib
    # an input with other channels than the code was made for
    p = kernels.Plan(2, 1)
    p.add_conv_gen("c", [0], 1, w, None, str(lib), 1, 1, False)
    with pytest.raises(RuntimeError, match="made for 36 im2col rows"):
        p.run(torch.randn(1, 5, 6, 6))
    # the library of another layer
    with pytest.raises(RuntimeError, match="is for 8 filters x 36 rows, the layer has 9 x 36"):
        kernels.Plan(2, 1).add_conv_gen("c", [0], 1, torch.zeros(9, 4, 3, 3), None, str(lib), 1, 1, False)
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"not a library")
    with pytest.raises(RuntimeError, match="cannot load the generated conv"):
        kernels.gen_conv_info(str(bad))
    with pytest.raises(ConfigError, match="NaN or inf"):
        codegen.generate_conv_source(torch.full((2, 2, 3, 3), float("nan")))
    with pytest.raises(ConfigError, match="conv weight"):
        codegen.generate_conv_source(torch.zeros(4, 4))


@pytest.mark.parametrize("name", ["resnet20", "lenet"])
def test_every_conv_on_generated_code_matches_the_masked_model(kernels, name):
    """A whole plan with every groups=1 conv on its generated code (BN folded, ReLU and residual additions fused,
    strided and 1x1 convs) equals the masked model, at a batch whose columns end mid-tile and forced parallel."""
    from .test_compile import every_conv_on

    with forced_parallel(kernels, 2):
        plan, x, ref, gen = every_conv_on(kernels, name, "generated", 3)
        assert _rel_err(plan.run(x), ref) <= 1e-4
    assert all("gen" in op.p for op in gen)


def test_compile_with_codegen_times_and_picks_generated_code(kernels, tmp_path, monkeypatch):
    from netcarve.runtime import compile
    from netcarve.runtime.compiled import SPARSE_MARGIN

    from .test_compile import _prepared

    monkeypatch.setenv("NETCARVE_CACHE", str(tmp_path))
    m = _prepared("resnet8")
    x = torch.randn(8, 3, 32, 32)
    c = compile(m, x, sparse="auto", repeats=3, codegen=True)
    convs = [lc for lc in c.layers if lc.kind == "conv" and lc.sparse_ms is not None]
    assert convs and all(lc.generated_ms is not None for lc in convs)
    assert all(lc.generated_ms is None for lc in c.layers if lc.sparse_ms is None)
    if (c.plan_check or {}).get("chosen", "tuned") == "tuned":
        for lc in convs:
            dense = min(lc.dense_ms, lc.direct_ms)
            fast = min(("sparse", lc.sparse_ms), ("generated", lc.generated_ms), key=lambda t: t[1])
            assert lc.choice == (fast[0] if fast[1] < SPARSE_MARGIN * dense else
                                 "dense" if lc.dense_ms <= lc.direct_ms else "direct")
    with torch.no_grad():
        assert _rel_err(c(x), m(x)) <= 1e-4
    always = compile(m, x, sparse="always", repeats=3, codegen=True, use_cache=False)
    for lc in always.layers:
        if lc.kind == "conv" and lc.generated_ms is not None:
            assert lc.choice == ("generated" if lc.generated_ms < lc.sparse_ms else "sparse")
    assert {lc.choice for lc in always.layers if lc.kind == "conv"} <= {"sparse", "generated"}
    with torch.no_grad():
        assert _rel_err(always(x), m(x)) <= 1e-4
    assert list((tmp_path / "gen").glob("conv-*.so"))


def test_pick_holds_generated_code_to_the_sparse_margin():
    from netcarve.runtime.compiled import _pick

    t = {"dense_ms": 1.0, "direct_ms": 1.2, "sparse_ms": 0.8, "generated_ms": 0.95}
    assert _pick(["dense", "direct", "sparse", "generated"], t) == "sparse"
    t["generated_ms"] = 0.5
    assert _pick(["dense", "direct", "sparse", "generated"], t) == "generated"
    t.update(sparse_ms=2.0, generated_ms=0.97)
    assert _pick(["dense", "direct", "sparse", "generated"], t) == "dense"  # within noise of dense
    assert _pick(["sparse", "generated"], {"sparse_ms": 2.0, "generated_ms": 3.0}) == "sparse"


def test_generated_conv_propagates_nan_like_torch(kernels):
    """A NaN input reaches exactly the outputs that read it through a non-zero weight (zeros are skipped, as in every
    sparse kernel: a dense conv also spreads it through its zeros, 0 * NaN), through ReLU, on both output paths
    (16-aligned maps: vector stores; 3x3 maps: per element)."""
    for h in (4, 3):
        w = _weight(16, 8, 3, 0.6, seed=h)
        lib = codegen.build_conv(w)
        x = torch.randn(2, 8, h, h)
        x[1, 3, 1, 1] = float("nan")
        out = _run(kernels, lib, w, None, x, 1, 1, True)
        reads = F.conv2d(x.isnan().float(), (w != 0).float(), None, 1, 1) > 0
        assert torch.equal(out.isnan(), reads) and reads.any()
        ref = torch.relu(F.conv2d(x.nan_to_num(0.0), w, None, 1, 1))  # the outputs that do not read it
        assert _rel_err(out[~reads], ref[~reads]) <= 1e-5


def test_generated_conv_step_rejects_a_weight_that_is_not_4d(kernels):
    lib = codegen.build_conv(_weight(4, 2, 3, 0.5, seed=0))
    with pytest.raises(RuntimeError, match="needs the \\(F, C, kh, kw\\) weight"):
        kernels.Plan(2, 1).add_conv_gen("c", [0], 1, torch.zeros(4, 18), None, str(lib), 1, 1, False)
