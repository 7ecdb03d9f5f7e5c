"""The lanes layout (16 images per vector): conversions, convs, poolings and shortcuts against their plain PyTorch
twins; the plan rewrite (whole runs in lanes, one conversion in and out) and compiled models against the masked
model at odd batches, threads and kernel settings; clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcarve.errors import ConfigError
from netcarve.runtime import compile
from netcarve.runtime.kernels import from_lanes, lanes_conv2d, lanes_max_pool2d, to_lanes
from netcarve.runtime.lanes import lanes_rewrite

from ._util import at_threads, forced_parallel
from .test_compile import _example, _prepared, _rel


def _sparse(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)


@pytest.mark.parametrize("n", [1, 16, 17, 35])
def test_lanes_round_trip(kernels, n):
    x = torch.randn(n, 5, 7, 6)
    y = to_lanes(x)
    assert y.shape == (-(-n // 16), 5, 9, 8, 16)
    assert torch.equal(y, to_lanes(x, reference=True))
    assert torch.equal(from_lanes(y, n), x)
    assert torch.equal(from_lanes(y, n, reference=True), x)
    # borders and the missing images are zeros
    assert y[:, :, 0].abs().sum() == 0 and y[:, :, :, -1].abs().sum() == 0
    if n % 16:
        assert y[-1, ..., n % 16:].abs().sum() == 0


# (batch, in channels, out channels, H, W, kernel, stride, density)
CASES = [(17, 5, 7, 9, 6, 3, 1, 0.3), (33, 24, 40, 12, 10, 3, 2, 0.2), (3, 8, 16, 5, 7, 1, 1, 0.5),
         (20, 8, 19, 6, 8, 1, 2, 1.0), (16, 64, 32, 8, 8, 3, 1, 0.1), (16, 48, 16, 2, 2, 3, 1, 0.3),
         (16, 3, 16, 32, 32, 3, 1, 1.0)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threads", [1, 3])
def test_lanes_conv_matches_its_twin_and_conv2d(kernels, case, threads):
    n, c, f, h, w, k, s, density = case
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w)
    wt = _sparse((f, c, k, k), density)
    wt[0] = 0  # a filter with no taps: its bias (and residual) only
    b = torch.randn(f)
    pad = (k - 1) // 2
    ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    res = torch.randn(n, f, ho, wo)
    lx, lr = to_lanes(x), to_lanes(res)
    with forced_parallel(kernels, threads):
        for relu, residual in ((True, lr), (False, None)):
            y = lanes_conv2d(lx, wt, b, s, pad, relu, residual)
            twin = lanes_conv2d(lx, wt, b, s, pad, relu, residual, reference=True)
            ref = F.conv2d(x, wt, b, s, pad) + (res if residual is not None else 0)
            ref = torch.relu(ref) if relu else ref
            assert y.shape == twin.shape == (lx.shape[0], f, ho + 2, wo + 2, 16)
            assert _rel(y, twin) <= 1e-5
            assert _rel(from_lanes(y, n), ref) <= 1e-5
            assert y[:, :, 0].abs().sum() == 0 and y[:, :, :, 0].abs().sum() == 0  # zero borders


@pytest.mark.parametrize("chunk_bytes,pixels", [(64, 1), (4096, 16), (1 << 20, 4)])
def test_lanes_conv_chunks_and_blocks(kernels, chunk_bytes, pixels):
    """Chunks of one channel up to all channels at once, and register blocks of 1-16 pixels, give the same result."""
    torch.manual_seed(1)
    x, wt, b = torch.randn(18, 40, 8, 8), _sparse((24, 40, 3, 3), 0.2), torch.randn(24)
    lx = to_lanes(x)
    ref = lanes_conv2d(lx, wt, b, 1, 1, True, reference=True)
    old = kernels.lanes_settings()
    try:
        kernels.set_lanes_chunk_bytes(chunk_bytes)
        kernels.set_lanes_pixels(pixels)
        assert _rel(lanes_conv2d(lx, wt, b, 1, 1, True), ref) <= 1e-5
    finally:
        kernels.set_lanes_pixels(old[0])
        kernels.set_lanes_chunk_bytes(old[1])


def test_lanes_max_pool_matches_and_propagates_nan(kernels):
    x = torch.randn(19, 6, 8, 6)
    x[3, 2, 1, 0] = float("nan")
    lx = to_lanes(x)
    y = lanes_max_pool2d(lx)
    assert torch.equal(y.isnan(), lanes_max_pool2d(lx, reference=True).isnan())
    ref = F.max_pool2d(x, 2, 2)
    out = from_lanes(y, 19)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == 1
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref))
    with pytest.raises(ConfigError, match="even maps"):
        lanes_max_pool2d(to_lanes(torch.randn(2, 3, 5, 4)))


def test_lanes_shortcut_and_gap_match(kernels):
    x = torch.randn(21, 6, 8, 7)
    lx = to_lanes(x)
    y = kernels.lanes_shortcut(lx, 2, 10, 2, None, None)
    ref = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
    assert torch.equal(from_lanes(y, 21), ref)
    src, dst = torch.tensor([0, 3, 5]), torch.tensor([4, 0, 1])
    y = kernels.lanes_shortcut(lx, 1, 6, 0, src, dst)
    ref = torch.zeros(21, 6, 8, 7).index_copy(1, dst, x.index_select(1, src))
    assert torch.equal(from_lanes(y, 21), ref)
    g = from_lanes(kernels.lanes_gap(lx), 21)
    assert g.shape == (21, 6, 1, 1) and _rel(g, x.mean((2, 3), keepdim=True)) <= 1e-5


def test_lanes_errors_are_clear(kernels):
    with pytest.raises(ConfigError, match="3x3 kernel with padding 1"):
        lanes_conv2d(to_lanes(torch.randn(2, 3, 8, 8)), torch.randn(4, 3, 5, 5), padding=2)
    with pytest.raises(ConfigError, match="4 channels"):
        lanes_conv2d(to_lanes(torch.randn(2, 3, 8, 8)), torch.randn(4, 4, 3, 3), padding=1)
    with pytest.raises(ConfigError, match="lanes tensor"):
        from_lanes(torch.randn(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="do not fit"):
        from_lanes(to_lanes(torch.randn(2, 3, 4, 4)), 17)
    m = _prepared("resnet20")
    with pytest.raises(ConfigError, match="lanes must be one of"):
        compile(m, _example(m, 2), lanes="sometimes")


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn", "mobilenetv2", "lenet"])
def test_compiled_models_in_lanes_match_the_masked_model(kernels, name):
    """Every eligible conv in lanes (lanes="always"): the outputs at the tuned batch and at others (1, 33), the
    reference twin, and at 1 and 3 threads."""
    m = _prepared(name)
    x = _example(m, 17)
    with torch.no_grad():
        ref = m(x)
    c = compile(m, x, sparse="always", lanes="always")
    lanes_layers = sum(lc.choice == "lanes" for lc in c.layers)
    kinds = [op.kind for op in c.ops]
    assert lanes_layers > 0 and kinds.count("lanes_in") >= 1 and kinds.count("lanes_out") >= 1
    for threads in (1, 3):
        with at_threads(threads):
            assert _rel(c(x), ref) <= 1e-4
    assert _rel(c.reference(x), ref) <= 1e-4
    for b in (1, 33):
        xb = _example(m, b)
        with torch.no_grad():
            assert _rel(c(xb), m(xb)) <= 1e-4


def test_a_resnet_runs_in_lanes_end_to_end(kernels):
    """ResNet-20: the stem, every block (residuals, the option-A shortcuts) and the global pooling stay in lanes:
    one conversion in (the image) and one out (the pooled features)."""
    m = _prepared("resnet20")
    x = _example(m, 16)
    c = compile(m, x, sparse="always", lanes="always")
    kinds = [op.kind for op in c.ops]
    assert kinds.count("lanes_in") == 1 and kinds.count("lanes_out") == 1
    assert kinds.index("lanes_out") > kinds.index("gap")
    assert all(lc.choice == "lanes" for lc in c.layers if lc.kind == "conv")
    with torch.no_grad():
        assert _rel(c(x), m(x)) <= 1e-4


class _Mixed(nn.Module):
    """A lanes value read by a lanes conv and by non-lanes steps (a 5x5 conv, a concatenation)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 5, padding=2)

    def forward(self, x):
        a = torch.relu(self.a(x))
        return torch.cat([self.b(a) + self.c(a), a], 1)


def test_rewrite_converts_once_per_value_and_keeps_other_readers(kernels):
    m = _Mixed().eval()
    x = torch.randn(18, 3, 8, 8)
    c = compile(m, x, sparse="always", lanes="never")
    ops, nvals, output, count = lanes_rewrite(c.ops, c.nvals, c.output)
    assert count == 2 and nvals == c.nvals + 4
    # in: the image and the 5x5 conv's output (b's fused residual); out: a (read by the 5x5 conv and the
    # concatenation: one copy for both) and b's result
    kinds = [op.kind for op in ops]
    assert kinds.count("lanes_in") == 2 and kinds.count("lanes_out") == 2
    assert [op.kind for op in c.ops].count("lanes_in") == 0  # the ops given are not modified
    cl = compile(m, x, sparse="always", lanes="always")
    with torch.no_grad():
        assert _rel(cl(x), m(x)) <= 1e-4


def test_auto_leaves_small_batches_alone(kernels):
    m = _prepared("resnet20")
    c = compile(m, _example(m, 4), sparse="always")
    assert "lanes_in" not in [op.kind for op in c.ops]
    assert not any(lc.choice == "lanes" for lc in c.layers)


@pytest.mark.parametrize("shape", [(17, 12, 8, 8, 6), (16, 40, 24, 4, 4), (20, 3, 16, 32, 32), (16, 8, 8, 2, 2)])
def test_lanes_conv_with_fused_pooling(kernels, shape):
    """The 2x2 pooling fused into the conv (blocks of 2 rows) equals the conv then the pooling, at any chunking."""
    n, c, f, h, w = shape
    torch.manual_seed(2)
    x, wt, b = torch.randn(n, c, h, w), _sparse((f, c, 3, 3), 0.3), torch.randn(f)
    lx = to_lanes(x)
    ref = F.max_pool2d(torch.relu(F.conv2d(x, wt, b, 1, 1)), 2, 2)
    old = kernels.lanes_settings()
    try:
        for chunk in (64, old[1]):
            kernels.set_lanes_chunk_bytes(chunk)
            y = lanes_conv2d(lx, wt, b, 1, 1, True, pool=True)
            assert y.shape == (lx.shape[0], f, h // 2 + 2, w // 2 + 2, 16)
            assert _rel(y, lanes_conv2d(lx, wt, b, 1, 1, True, pool=True, reference=True)) <= 1e-5
            assert _rel(from_lanes(y, n), ref) <= 1e-5
    finally:
        kernels.set_lanes_chunk_bytes(old[1])
    with pytest.raises(ConfigError, match="even output map"):
        lanes_conv2d(to_lanes(torch.randn(2, c, 5, 4)), wt, b, 1, 1, pool=True)


def test_poolings_fuse_into_the_convs_before_them(kernels):
    """VGG-11: every max pooling follows a conv whose output nothing else reads, so none is left as a step; without
    fusion the same plan has them all, and both give the model's output."""
    m = _prepared("vgg11_bn")
    x = _example(m, 16)
    c = compile(m, x, sparse="always", lanes="never")
    pools = sum(op.kind == "maxpool" for op in c.ops)
    assert pools > 0
    fused, _, _, _ = lanes_rewrite(c.ops, c.nvals, c.output)
    plain, _, _, _ = lanes_rewrite(c.ops, c.nvals, c.output, fuse_pools=False)
    assert sum(op.kind == "maxpool" for op in fused) == 0
    assert sum(bool(op.p.get("pool")) for op in fused if op.kind == "conv") == pools
    assert sum(op.kind == "maxpool" and op.p.get("lanes", False) for op in plain) == pools
    cl = compile(m, x, sparse="always", lanes="always")
    with torch.no_grad():
        assert _rel(cl(x), m(x)) <= 1e-4


def test_a_lanes_plan_kept_by_auto_leaves_small_calls_to_the_plan_without_it(kernels, monkeypatch):
    """lanes="auto" keeps the lanes plan only for calls of 16 images or more; smaller calls (a group of 16 costs the
    same as one image) run the plan without it, with the same outputs."""
    import netcarve.runtime.compiled as compiled_mod

    monkeypatch.setattr(compiled_mod, "LANES_MARGIN", 1e9)  # keep the lanes plan whatever the timing says
    m = _prepared("resnet20")
    x = _example(m, 16)
    c = compile(m, x, sparse="always")
    assert c.plan_check["lanes_chosen"] and c.lanes_min_batch == 16
    assert any(lc.choice == "lanes" for lc in c.layers)
    small = _example(m, 3)
    with torch.no_grad():
        assert _rel(c(small), m(small)) <= 1e-4 and _rel(c(x), m(x)) <= 1e-4
    kinds_small = {st["kind"] for st in c.profile(small, 2, 1)}
    kinds_big = {st["kind"] for st in c.profile(x, 2, 1)}
    assert "lanes_in" in kinds_big and "lanes_in" not in kinds_small
    assert all(st["kernel"] != "lanes" for st in c.profile(small, 2, 1))
    always = compile(m, x, sparse="always", lanes="always")
    assert always.lanes_min_batch == 0 and "lanes_in" in {st["kind"] for st in always.profile(small, 2, 1)}


def test_lanes_plan_called_from_two_threads_at_once(kernels):
    """Two Python threads calling one lanes plan with different batches (per-thread partial sums, the taps cached in
    the plan steps): every call gives the model's output."""
    import threading

    m = _prepared("vgg11_bn", seed=4)
    c = compile(m, _example(m, 16), sparse="always", lanes="always")
    xs = {b: _example(m, b) for b in (5, 20)}
    with torch.no_grad():
        refs = {b: m(x) for b, x in xs.items()}
    errors = []

    def worker(b):
        for _ in range(4):
            err = _rel(c(xs[b]), refs[b])
            if err > 1e-4:
                errors.append((b, err))

    with at_threads(2):
        ts = [threading.Thread(target=worker, args=(b,)) for b in xs]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors
