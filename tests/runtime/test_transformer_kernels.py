"""The native transformer kernels (csrc/transformer.cpp) against their PyTorch twins: attention (strided, causal,
odd lengths and head sizes, 1-3 threads), attention from a packed qkv projection, LayerNorm, activations (NaN), and
a plan with them against the same plan on ATen's ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcarve.errors import ConfigError
from netcarve.runtime import compile
from netcarve.runtime.kernels import ACTIVATIONS, activation, attention, attention_qkv, layer_norm

from ._util import at_threads, forced_parallel, switched_off


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


# (B, H, Lq, Lk, E, Ev): one vector, odd lengths / sizes below and above a vector, Lq != Lk, several query blocks
ATTN = [(1, 4, 32, 32, 16, 16), (2, 3, 7, 7, 8, 8), (3, 2, 65, 65, 64, 64), (2, 1, 5, 9, 24, 40),
        (1, 2, 130, 70, 17, 33), (1, 1, 1, 1, 3, 5)]


@pytest.mark.parametrize("case", ATTN)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_attention_matches_reference(kernels, case, causal, threads):
    b, h, lq, lk, e, ev = case
    g = torch.Generator().manual_seed(lq * 31 + lk)
    q, k, v = torch.randn(b, h, lq, e, generator=g), torch.randn(b, h, lk, e, generator=g) * 2, \
        torch.randn(b, h, lk, ev, generator=g)
    with forced_parallel(kernels, threads):
        for scale in (None, 0.3):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
            out = attention(q, k, v, causal, scale)
            assert out.shape == ref.shape and _rel(out, ref) <= 1e-5, (case, causal, scale)
            assert torch.equal(attention(q, k, v, causal, scale, reference=True), ref)
        # 3-d inputs (no head dim)
        q3, k3, v3 = q[:, 0], k[:, 0], v[:, 0]
        assert _rel(attention(q3, k3, v3, causal), F.scaled_dot_product_attention(q3, k3, v3, is_causal=causal)) <= 1e-5


def test_attention_reads_strided_views(kernels):
    """q, k, v as views into one (B, T, 3, H, hd) projection (the heads split by a permute, not copied); a
    non-contiguous last dim is copied first."""
    qkv = torch.randn(2, 33, 3 * 4 * 16)
    q, k, v = qkv.reshape(2, 33, 3, 4, 16).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    assert _rel(attention(q, k, v), F.scaled_dot_product_attention(q, k, v)) <= 1e-5
    qt = torch.randn(2, 3, 16, 9).transpose(-1, -2)  # last-dim stride 9
    assert _rel(attention(qt, qt, qt), F.scaled_dot_product_attention(qt, qt, qt)) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 32, 4, 16), (3, 17, 3, 24), (2, 70, 2, 64), (1, 5, 1, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_qkv_matches_reference(kernels, shape, causal):
    b, t, h, hd = shape
    qkv = torch.randn(b, t, 3 * h * hd)
    ref = attention_qkv(qkv, h, causal, reference=True)
    q, k, v = qkv.reshape(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
    assert torch.allclose(ref, F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(
        b, t, h * hd))
    for threads in (1, 2):
        with forced_parallel(kernels, threads):
            out = attention_qkv(qkv, h, causal)
            assert out.shape == (b, t, h * hd) and _rel(out, ref) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 32, 4, 16), (3, 17, 3, 24), (2, 70, 2, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_qkv_key_padding_mask(kernels, shape, causal):
    """A (B, T) key padding mask, bool (true = padding) or float (added to the scores), as nn.MultiheadAttention
    takes it; a batch row whose keys are all padding gives NaN (PyTorch too), the other rows are unaffected."""
    b, t, h, hd = shape
    g = torch.Generator().manual_seed(t)
    qkv = torch.randn(b, t, 3 * h * hd, generator=g)
    pad = torch.rand(b, t, generator=g) < 0.4
    pad[:, 0] = False  # (causal: the first query sees only key 0)
    q, k, v = qkv.reshape(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
    bias = torch.zeros(b, t).masked_fill(pad, float("-inf"))
    tri = torch.zeros(t, t).masked_fill(torch.ones(t, t).bool().triu(1), float("-inf")) if causal else 0.0
    am = bias.view(b, 1, 1, t) + tri
    manual = F.scaled_dot_product_attention(q, k, v, attn_mask=am).transpose(1, 2).reshape(b, t, h * hd)
    soft = torch.randn(b, t, generator=g)  # a float mask: any additive bias
    am_soft = soft.view(b, 1, 1, t) + tri
    manual_soft = F.scaled_dot_product_attention(q, k, v, attn_mask=am_soft).transpose(1, 2).reshape(b, t, h * hd)
    for mask, want in ((pad, manual), (bias, manual), (soft, manual_soft)):
        ref = attention_qkv(qkv, h, causal, key_padding_mask=mask, reference=True)
        assert _rel(ref, want) <= 1e-5
        for threads in (1, 2):
            with forced_parallel(kernels, threads):
                assert _rel(attention_qkv(qkv, h, causal, key_padding_mask=mask), want) <= 1e-5
    # with a (T, T) attention mask as well: a band (bool, true = not attended) and a float bias
    band = (torch.arange(t)[:, None] - torch.arange(t)).abs() > 3
    qb = torch.randn(t, t, generator=g)
    for am, am_bias in ((band, torch.zeros(t, t).masked_fill(band, float("-inf"))), (qb, qb)):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=am_soft + am_bias).transpose(1, 2).reshape(b, t, h * hd)
        assert _rel(attention_qkv(qkv, h, causal, key_padding_mask=soft, attn_mask=am, reference=True), want) <= 1e-5
        with forced_parallel(kernels, 2):
            assert _rel(attention_qkv(qkv, h, causal, key_padding_mask=soft, attn_mask=am), want) <= 1e-5
            assert _rel(attention_qkv(qkv, h, False, attn_mask=am),
                        F.scaled_dot_product_attention(q, k, v, attn_mask=am_bias).transpose(1, 2).reshape(
                            b, t, h * hd)) <= 1e-5
    with pytest.raises(ConfigError, match=rf"attention mask must be bool or float of shape \({t}, {t}\)"):
        attention_qkv(qkv, h, attn_mask=band[1:])
    full = pad.clone()
    full[0] = True  # batch row 0: nothing to attend to
    out = attention_qkv(qkv, h, causal, key_padding_mask=full)
    assert out[0].isnan().all() and not out[1:].isnan().any()
    assert attention_qkv(qkv, h, causal, key_padding_mask=full, reference=True)[0].isnan().all()
    with pytest.raises(ConfigError, match=rf"key padding mask must be bool or float of shape \({b}, {t}\)"):
        attention_qkv(qkv, h, key_padding_mask=pad[:, 1:])
    with pytest.raises(ConfigError, match="key padding mask must be bool or float"):
        attention_qkv(qkv, h, key_padding_mask=pad.long())
    with pytest.raises(RuntimeError, match="key padding mask must be"):
        kernels.attention_qkv(qkv, h, False, None, pad[:, :1])


@pytest.mark.parametrize("shape", [(1, 5, 32, 4, 16), (3, 17, 9, 3, 24), (2, 70, 33, 2, 64), (2, 1, 1, 1, 8)])
def test_attention_cross_matches_reference(kernels, shape):
    """Cross-attention from q (B, Tq, C) and a packed k | v projection (B, Tk, 2C) of another sequence: native,
    twin and F.scaled_dot_product_attention on the split heads agree, with and without a (B, Tk) key padding mask and
    a (Tq, Tk) attention mask; bad shapes get clear errors."""
    b, tq, tk, h, hd = shape
    g = torch.Generator().manual_seed(tq * tk)
    q, kv = torch.randn(b, tq, h * hd, generator=g), torch.randn(b, tk, 2 * h * hd, generator=g)
    qh = q.reshape(b, tq, h, hd).transpose(1, 2)
    kh, vh = kv.reshape(b, tk, 2, h, hd).permute(2, 0, 3, 1, 4)
    pad = torch.rand(b, tk, generator=g) < 0.4
    pad[:, 0] = False
    am = torch.randn(tq, tk, generator=g)
    bias = torch.zeros(b, 1, 1, tk).masked_fill(pad.view(b, 1, 1, tk), float("-inf")) + am
    for kpm, mask, want_mask in ((None, None, None), (pad, am, bias)):
        want = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=want_mask).transpose(1, 2).reshape(b, tq, h * hd)
        ref = attention_qkv(q, h, key_padding_mask=kpm, attn_mask=mask, kv=kv, reference=True)
        assert _rel(ref, want) <= 1e-5
        for threads in (1, 2):
            with forced_parallel(kernels, threads):
                out = attention_qkv(q, h, key_padding_mask=kpm, attn_mask=mask, kv=kv)
                assert out.shape == (b, tq, h * hd) and _rel(out, want) <= 1e-5
    with pytest.raises(ConfigError, match=rf"kv of shape \[{b}, {tk}, {h * hd}\] .* is not a \({b}, Tk, {2 * h * hd}\)"):
        attention_qkv(q, h, kv=kv[..., : h * hd])
    with pytest.raises(ConfigError, match=rf"key padding mask must be bool or float of shape \({b}, {tk}\)"):
        attention_qkv(q, h, key_padding_mask=torch.zeros(b, tq + tk, dtype=torch.bool), kv=kv)
    with pytest.raises(RuntimeError, match="kv must be a float32"):
        kernels.attention_qkv(q, h, False, None, None, None, kv[:, :, 1:])


def test_attention_nan_and_bad_input(kernels):
    q = torch.randn(1, 1, 4, 16)
    q[0, 0, 1, 3] = float("nan")  # key 1 is NaN: every row's softmax (and output) is NaN, as in torch
    assert attention(q, q, q).isnan().any(-1).all()
    # no queries: an empty output; no keys: the twin's (torch's) result
    assert attention(q[:, :, :0], q, q).shape == (1, 1, 0, 16)
    k0 = torch.randn(1, 1, 0, 16)
    assert torch.equal(attention(q, k0, k0).isnan(), F.scaled_dot_product_attention(q, k0, k0).isnan())
    with pytest.raises(ConfigError, match="not \\(B, T, 3 x 4 heads"):
        attention_qkv(torch.randn(2, 5, 30), 4)
    with pytest.raises(RuntimeError, match="attention: q, k, v must be"):
        kernels.attention(torch.randn(2, 3, 4), torch.randn(2, 5, 3), torch.randn(2, 5, 3))


@pytest.mark.parametrize("shape,nd", [((4, 7, 100), 1), ((4, 7, 100), 2), ((3, 64), 1), ((2, 5, 16), 1), ((9, 3), 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_reference(kernels, shape, nd, affine):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3 + 1
    norm = shape[len(shape) - nd:]
    w = torch.randn(norm, generator=g) if affine else None
    b = torch.randn(norm, generator=g) if affine else None
    ref = F.layer_norm(x, norm, w, b, 1e-6)
    with forced_parallel(kernels, 2):
        assert _rel(layer_norm(x, norm, w, b, 1e-6), ref) <= 1e-5
    assert _rel(layer_norm(x, norm, w, b, 1e-6), ref) <= 1e-5
    with pytest.raises(ConfigError, match="does not end with it"):
        layer_norm(x, (shape[-1] + 1,))


@pytest.mark.parametrize("fn", ACTIVATIONS)
def test_activations_match_reference(kernels, fn):
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(100_003, generator=g) * 6, torch.tensor([0.0, -1e-6, 1e-6, 50.0, -50.0, -100.0,
                                                                         100.0, float("nan")])])
    ref = activation(x, fn, reference=True)
    exact = activation(x.double(), fn, reference=True)
    # torch's float GELU loses its negative tail to cancellation (1 + erf, erf good to 1.5e-7), and so does ours (the
    # same formula): no more than twice torch's own largest relative error
    torch_err = ((ref.double() - exact) / exact).abs()
    for threads in (1, 2):
        with forced_parallel(kernels, threads):
            out = activation(x, fn)
            fin = ref.isfinite()
            assert out[-1].isnan(), "a NaN input stays NaN"
            assert float((out[fin] - ref[fin]).abs().max()) <= 1e-5 * float(ref[fin].abs().max())
            # relative error where the output is not tiny
            big = fin & (exact.abs() > 1e-3)
            err = ((out[big].double() - exact[big]) / exact[big]).abs()
            assert float(err.max()) <= max(2e-6, 2 * float(torch_err[big].max()))
    with pytest.raises(ConfigError, match="activation 'relu'"):
        activation(x, "relu")


@pytest.mark.parametrize("n", [5, 16, 1000, 70_001])
def test_add_matches_reference(kernels, n):
    a, b = torch.randn(n), torch.randn(n)
    a[n // 2] = float("nan")
    for threads in (1, 2):
        with forced_parallel(kernels, threads):
            assert torch.equal(kernels.add(a, b).nan_to_num(7.0), (a + b).nan_to_num(7.0))
            out = kernels.add(a, b, True)
            assert out[n // 2].isnan() and torch.equal(out.nan_to_num(7.0), torch.relu(a + b).nan_to_num(7.0))
    with pytest.raises(RuntimeError, match="one shape"):
        kernels.add(torch.randn(3, 4), torch.randn(4))


class _Block(nn.Module):
    """A pre-norm block as users write it: LayerNorm, F.scaled_dot_product_attention on permuted heads, GELU MLP."""

    def __init__(self, d=48, heads=3, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.act = nn.GELU()

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.silu(self.fc1(self.norm2(x))) + self.act(self.fc1(self.norm2(x))))


@pytest.mark.parametrize("causal", [False, True])
def test_plan_native_transformer_ops_match_aten(kernels, causal):
    """The same plan with netcarve's attention / LayerNorm / activations and with ATen's: both match the model."""
    torch.manual_seed(0)
    m = _Block(causal=causal).eval()
    x = torch.randn(2, 19, 48)
    with at_threads(2), torch.no_grad():
        c = compile(m, x, fallback=False)
        kinds = [op.kind for op in c.ops]
        assert "sdpa" in kinds and "layernorm" in kinds and "unary" in kinds
        for b in (2, 1, 5):
            xb = torch.randn(b, 19, 48)
            assert _rel(c(xb), m(xb)) <= 1e-4
            with switched_off(kernels, "native_transformer"):
                assert _rel(c(xb), m(xb)) <= 1e-4


class _TorchMHA(nn.Module):
    """A block on torch's nn.MultiheadAttention (self-attention), its weights optionally read too."""

    def __init__(self, batch_first=True, weights=False, mask=None, d=32, heads=4):
        super().__init__()
        self.batch_first, self.weights = batch_first, weights
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.fc = nn.Linear(d, 10)
        g = torch.Generator().manual_seed(3)
        masks = {"causal": torch.ones(7, 7).triu(1).bool(), "window": (torch.arange(7)[:, None] - torch.arange(7)).abs() > 2,
                 "bias": torch.randn(7, 7, generator=g), "batched": torch.zeros(2 * heads, 7, 7)}
        self.register_buffer("mask", masks.get(mask))

    def forward(self, x):  # x: (B, T, d)
        h = self.norm(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        y, w = self.attn(h, h, h, need_weights=self.weights, attn_mask=self.mask)
        if not self.batch_first:
            y = y.transpose(0, 1)
        out = self.fc(x + y)
        return out + w.mean() if self.weights else out


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["never", "always"])
def test_torch_multihead_attention_lowers_natively(kernels, batch_first, mode):
    """nn.MultiheadAttention as self-attention: in_proj linear (sparse when its weight is), one mha step, out_proj;
    sequence-first inputs permuted around them."""
    from netcarve.sparsity import make_scheme

    torch.manual_seed(0)
    m = _TorchMHA(batch_first).eval()
    if mode == "always":
        blk = make_scheme("block", block=[4, 16])
        with torch.no_grad():
            m.attn.in_proj_weight.mul_(blk.project(m.attn.in_proj_weight, 0.8))
            m.attn.out_proj.weight.mul_(blk.project(m.attn.out_proj.weight, 0.8))
    x = torch.randn(2, 7, 32)
    with at_threads(2), torch.no_grad():
        c = compile(m, x, sparse=mode, fallback=False)
        kinds = [op.kind for op in c.ops]
        assert kinds.count("mha") == 1 and "python" not in kinds
        choice = {lc.name: lc.choice for lc in c.layers}
        assert choice["attn.in_proj"] == "sparse" if mode == "always" else choice["attn.in_proj"] in ("dense", "direct")
        for b in (2, 1, 3):
            xb = torch.randn(b, 7, 32)
            assert _rel(c(xb), m(xb)) <= 1e-4 and _rel(c.reference(xb), m(xb)) <= 1e-4


@pytest.mark.parametrize("mask", ["causal", "window", "bias"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_multihead_attention_with_attention_masks(kernels, mask, batch_first):
    """A (T, T) attention mask: the causal one becomes the step's flag, others (a bool band, a float bias) an input
    the attention adds to its scores."""
    torch.manual_seed(0)
    m = _TorchMHA(batch_first, mask=mask).eval()
    x = torch.randn(2, 7, 32)
    with at_threads(2), torch.no_grad():
        c = compile(m, x, sparse="never", fallback=False)
        (step,) = [op for op in c.ops if op.kind == "mha"]
        assert (step.p["causal"], step.p["am"], len(step.inputs)) == ((True, False, 1) if mask == "causal" else
                                                                      (False, True, 2))
        for b in (2, 1, 3):
            xb = torch.randn(b, 7, 32)
            assert _rel(c(xb), m(xb)) <= 1e-4 and _rel(c.reference(xb), m(xb)) <= 1e-4
            with switched_off(kernels, "native_transformer"):
                assert _rel(c(xb), m(xb)) <= 1e-4


@pytest.mark.parametrize("what", ["weights", "batched"])
def test_torch_multihead_attention_unsupported_uses(kernels, what):
    """Its attention weights read, or a mask per batch and head: strict compile names why; the fallback runs it in
    PyTorch."""
    from netcarve.errors import UnsupportedModelError

    torch.manual_seed(0)
    m = _TorchMHA(weights=what == "weights", mask="batched" if what == "batched" else None).eval()
    x = torch.randn(2, 7, 32)
    with pytest.raises(UnsupportedModelError,
                       match="attention weights" if what == "weights" else r"attention mask of shape \[8, 7, 7\]"):
        compile(m, x, fallback=False)
    with at_threads(2), torch.no_grad():
        c = compile(m, x)
        assert "python" in [op.kind for op in c.ops]
        assert _rel(c(x), m(x)) <= 1e-4


class _ClassToken(nn.Module):
    """A class token expanded to the batch (``cls.expand(x.shape[0], -1, -1)``), as ViTs prepend it."""

    def __init__(self, d=16, literal=False):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.literal = literal

    def forward(self, x):
        n = 2 if self.literal else x.shape[0]
        return torch.cat([self.cls.expand(n, -1, -1), x], 1).mean(1)


def test_class_token_expand_is_native(kernels):
    m = _ClassToken().eval()
    with at_threads(2), torch.no_grad():
        c = compile(m, torch.randn(2, 5, 16), fallback=False)
        assert "expand" in [op.kind for op in c.ops]
        for b in (2, 1, 4):
            xb = torch.randn(b, 5, 16)
            assert _rel(c(xb), m(xb)) <= 1e-4 and _rel(c.reference(xb), m(xb)) <= 1e-4
        # a literal batch size does not depend on the input: the expanded token is a constant of that batch, so other
        # batches fail as in eager PyTorch
        m2 = _ClassToken(literal=True).eval()
        c2 = compile(m2, torch.randn(2, 5, 16), fallback=False)
        assert "expand" not in [op.kind for op in c2.ops] and c2.ops[0].p["value"].shape == (2, 1, 16)
        x2 = torch.randn(2, 5, 16)
        assert _rel(c2(x2), m2(x2)) <= 1e-4
        for fn in (m2, c2):
            with pytest.raises(RuntimeError):
                fn(torch.randn(3, 5, 16))


@pytest.mark.parametrize("shape", [(1, 65, 3, 64), (2, 33, 4, 24), (1, 7, 2, 17), (3, 16, 1, 16)])
def test_attention_register_transposes_match_scalar_ones(kernels, shape):
    """K^T built by 16 x 16 / 8 x 8 register transposes (tails scalar) or by scalar copies: the same bits."""
    b, t, h, hd = shape
    qkv = torch.randn(b, t, 3 * h * hd)
    kernels.set_attention_transpose(False)
    try:
        scalar = attention_qkv(qkv, h)
    finally:
        kernels.set_attention_transpose(True)
    assert torch.equal(attention_qkv(qkv, h), scalar)
