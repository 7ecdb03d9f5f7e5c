"""Plans of models that take several inputs: ``compile(model, (x1, x2, ...))``, the inputs as plan values
0 .. n-1 in the order of the forward arguments; HF-style ``(input_ids, attention_mask)`` classifiers whose mask
becomes the attention's key padding mask; checks of the call's inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from netcarve.errors import ConfigError, UnsupportedModelError
from netcarve.runtime import compile
from netcarve.sparsity import make_scheme

from ._util import at_threads, switched_off


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class _MaskedClassifier(nn.Module):
    """Token ids and a (B, T) attention mask (1 = token, 0 = padding, as HF tokenizers return it) -> embedding ->
    torch encoder or one nn.MultiheadAttention told the padding by a key padding mask built from the mask ->
    mean over the tokens -> head."""

    def __init__(self, how: str = "eq", mha: bool = False, sparse: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(60, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, 0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True) if mha else None
        self.head = nn.Linear(32, 5)
        self.how = how
        if sparse:
            s = make_scheme("block", block=(4, 16))
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.Linear) and m is not self.head:
                        m.weight.mul_(s.project(m.weight, 0.9))

    def forward(self, input_ids, attention_mask):
        pad = {"eq": lambda m: attention_mask == 0, "not": lambda m: ~m.bool(),
               "logical_not": lambda m: torch.logical_not(m), "given": lambda m: m}[self.how](attention_mask)
        h = self.emb(input_ids)
        if self.attn is not None:
            h = self.attn(h, h, h, key_padding_mask=pad)[0]
        else:
            h = self.enc(h, src_key_padding_mask=pad)
        return self.head(h.mean(1))


def _batch(lens, t=10, gen=None):
    ids = torch.randint(1, 60, (len(lens), t), generator=gen)
    mask = torch.zeros(len(lens), t, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, n:] = 0
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("how,mha", [("eq", False), ("not", False), ("logical_not", False), ("eq", True),
                                     ("given", False)])
def test_input_ids_and_attention_mask(kernels, how, mha):
    """Two inputs, the second an HF-style attention mask turned into the key padding mask by a native step (== 0,
    ~m.bool(), logical_not), or given as the bool padding mask itself: the whole model lowers natively and matches
    it at other batch sizes, and the mask is what decides (the same ids with another mask give other outputs)."""
    m = _MaskedClassifier(how, mha).eval()
    g = torch.Generator().manual_seed(1)
    ids, mask = _batch([10, 6, 3], gen=g)
    if how == "given":
        mask = mask == 0
    with at_threads(2):
        c = compile(m, (ids, mask), sparse="never", fallback=False)
    kinds = [op.kind for op in c.ops]
    assert "python" not in kinds and kinds.count("compare") == {"given": 0, "not": 2}.get(how, 1)
    assert [s for s, _ in c.inputs] == [(3, 10), (3, 10)]
    mhas = [op for op in c.ops if op.kind == "mha"]
    assert mhas and all(len(op.inputs) == 2 for op in mhas)
    with torch.no_grad():
        for lens in ([10, 6, 3], [4], [2, 9, 10, 1, 7]):
            i2, m2 = _batch(lens, gen=g)
            if how == "given":
                m2 = m2 == 0
            ref = m(i2, m2)
            assert _rel(c(i2, m2), ref) <= 1e-4 and _rel(c.reference(i2, m2), ref) <= 1e-4
        # the mask input decides: the same ids with every token kept give another result, the model's
        other = torch.ones_like(mask) if how != "given" else torch.zeros_like(mask)
        assert _rel(c(ids, other), m(ids, other)) <= 1e-4 and not torch.allclose(c(ids, other), c(ids, mask))


def test_several_inputs_sparse_autotuned_and_timed(kernels):
    """Autotuning (every block-sparse linear -- out_proj, linear1, linear2 -- timed on each kernel), the whole-plan check, time() and profile() run
    with the tuple of inputs; with sparse="always" the block-sparse kernels run and match the model."""
    m = _MaskedClassifier("eq", sparse=True).eval()
    ids, mask = _batch([10, 8, 5, 2] * 2, gen=torch.Generator().manual_seed(2))
    with at_threads(2):
        c = compile(m, (ids, mask), sparse="auto", use_cache=False, repeats=4)
        sparse = [lc for lc in c.layers if lc.density < 0.2]
        assert c.native and len(sparse) == 6 and all(lc.sparse_ms and lc.dense_ms for lc in sparse)
        assert c.plan_check is not None and c.plan_check["chosen"] in c.plan_check
        always = compile(m, (ids, mask), sparse="always", use_cache=False)
        assert sum(lc.choice == "sparse" for lc in always.layers) == len(always.layers)
        assert c.time((ids, mask), repeats=3, warmup=1) > 0
        prof = c.profile((ids, mask), repeats=3, warmup=1)
    assert [p["name"] for p in prof] == [op.name for op in c.ops]
    assert c.summary()["inputs"] == [{"shape": [8, 10], "dtype": "int64"}, {"shape": [8, 10], "dtype": "int64"}]
    with torch.no_grad():
        assert _rel(c(ids, mask), m(ids, mask)) <= 1e-4 and _rel(always(ids, mask), m(ids, mask)) <= 1e-4


class _TwoImages(nn.Module):
    """Two float inputs: a conv branch per image, added, then a head (and a third, optional argument unused)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x, y):
        h = torch.relu(self.a(x) + self.b(y))
        return self.head(h.mean((2, 3)))


def test_two_float_inputs_native_and_in_fallback(kernels):
    """Float inputs of different shapes; the second read by a step PyTorch runs (fallback) as well."""
    m = _TwoImages().eval()
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8)
    with at_threads(2):
        c = compile(m, (x, y), sparse="never", fallback=False)
    assert c.native and not c.fallback
    with torch.no_grad():
        for b in (2, 1, 5):
            xb, yb = torch.randn(b, 3, 8, 8), torch.randn(b, 1, 8, 8)
            assert _rel(c(xb, yb), m(xb, yb)) <= 1e-4

    class Odd(_TwoImages):
        def forward(self, x, y):  # torch.atan2 has no native step: a python step reads both inputs
            return super().forward(x, torch.atan2(y, y + 2))

    o = Odd().eval()
    with at_threads(2):
        c = compile(o, (x, y), sparse="never")
    assert c.fallback and any(op.kind == "python" and 1 in op.inputs for op in c.ops)
    with torch.no_grad():
        assert _rel(c(x, y), o(x, y)) <= 1e-4


def test_torch_layer_of_two_inputs_as_the_model(kernels):
    """A torch.nn layer taking two tensors, compiled as the whole model: its wrapper takes both."""
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()

    class Self(nn.Module):  # self-attention over x with a key padding mask given as the second input
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x, pad):
            return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]

    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    c = compile(Self().eval(), (x, pad), sparse="never", fallback=False)
    with torch.no_grad():
        assert _rel(c(x, pad), Self()(x, pad)) <= 1e-4


def test_bad_inputs_get_clear_errors(kernels):
    m = _MaskedClassifier("eq").eval()
    ids, mask = _batch([10, 6], gen=torch.Generator().manual_seed(3))
    with pytest.raises(UnsupportedModelError, match=r"forward argument 'attention_mask' \(input 2\) is not in the"):
        compile(m, ids, sparse="never")
    with pytest.raises(UnsupportedModelError, match=r"3 example inputs for a forward of 2 arguments \(input_ids, "):
        compile(m, (ids, mask, mask), sparse="never")
    with pytest.raises(ConfigError, match="tensor or a tuple of tensors"):
        compile(m, (ids, [1, 2]), sparse="never")
    with pytest.raises(ConfigError, match="float32 tensor .* got torch.float64"):
        compile(m, (ids, mask.double()), sparse="never")
    c = compile(m, (ids, mask), sparse="never")
    with pytest.raises(ConfigError, match=r"expected 2 inputs \(\(N, 10\) int64; \(N, 10\) int64\), got 1"):
        c(ids)
    with pytest.raises(ConfigError, match=r"expected input 2 \(N, 10\), got \(2, 9\)"):
        c(ids, mask[:, :9])
    with pytest.raises(ConfigError, match="expected a int64 input 2, got torch.bool"):
        c(ids, mask == 0)
    # an integer input read by a float step natively is refused, naming the input
    class Scaled(nn.Module):
        def forward(self, x, ids):
            return x * ids

    with pytest.raises(UnsupportedModelError, match=r"reads input 2 \(torch.int64\)"):
        compile(Scaled().eval(), (torch.randn(2, 4), torch.ones(2, 4, dtype=torch.long)), sparse="never",
                fallback=False)


def _decoder(bf=True, norm_first=False, act="relu", layers=2, final_norm=True):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 4, 64, 0.1, activation=act, batch_first=bf, norm_first=norm_first)
    return nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(32) if final_norm else None).eval()


class _Seq2Seq(nn.Module):
    """Source and target token ids -> embeddings -> nn.Transformer (causal target mask, padding masks from the ids:
    the source's as the encoder's and the memory's key padding mask) -> per-token head."""

    def __init__(self, bf=True, norm_first=False):
        super().__init__()
        torch.manual_seed(0)
        self.src_emb, self.tgt_emb = nn.Embedding(40, 32), nn.Embedding(40, 32)
        self.tf = nn.Transformer(32, 4, 2, 2, 64, 0.1, batch_first=bf, norm_first=norm_first)
        self.head = nn.Linear(32, 40)
        self.bf = bf
        self.register_buffer("tri", nn.Transformer.generate_square_subsequent_mask(6))

    def forward(self, src, tgt):
        pad = src == 0
        s, t = self.src_emb(src), self.tgt_emb(tgt)
        if not self.bf:
            s, t = s.transpose(0, 1), t.transpose(0, 1)
        h = self.tf(s, t, tgt_mask=self.tri, src_key_padding_mask=pad, memory_key_padding_mask=pad,
                    tgt_key_padding_mask=tgt == 0)
        return self.head(h.transpose(0, 1) if not self.bf else h)


@pytest.mark.parametrize("cfg", [dict(), dict(bf=False), dict(norm_first=True), dict(act="gelu", final_norm=False),
                                 dict(layers=1)], ids=["base", "seq-first", "norm-first", "gelu", "one-layer"])
def test_torch_transformer_decoder_lowers_natively(kernels, cfg):
    """nn.TransformerDecoder (self-attention, cross-attention to the memory, feed-forward; post- or pre-norm) as the
    whole model of two inputs, with a causal target mask, a (T, S) memory mask and both key padding masks as
    further inputs or buffers: every attention a native "mha" step (cross-attention: q and k | v linears), matching
    the module at other batch sizes and lengths."""
    layers = cfg.pop("layers", 2)
    dec = _decoder(layers=layers, **cfg)
    bf = cfg.get("bf", True)

    def inputs(b, t, s, seed):
        g = torch.Generator().manual_seed(seed)
        shape = (lambda n: (b, n, 32)) if bf else (lambda n: (n, b, 32))
        return torch.randn(*shape(t), generator=g), torch.randn(*shape(s), generator=g)

    tgt, mem = inputs(3, 6, 9, 0)
    with at_threads(2):
        c = compile(dec, (tgt, mem), sparse="never", fallback=False)
    mhas = [op for op in c.ops if op.kind == "mha"]
    assert len(mhas) == 2 * layers and [op.p["cross"] for op in mhas] == [False, True] * layers
    assert any(op.name.endswith("multihead_attn.in_proj_kv") for op in c.ops)
    with torch.no_grad():  # (calls may change dim 0: the batch, or for sequence-first inputs the lengths)
        for b, t, s in ((3, 6, 9), (1, 6, 9), (4, 6, 9)) if bf else ((3, 6, 9), (3, 2, 9), (3, 6, 4)):
            x, m = inputs(b, t, s, b + t + s)
            ref = dec(x, m)
            assert _rel(c(x, m), ref) <= 1e-4 and _rel(c.reference(x, m), ref) <= 1e-4

    # masks: causal target mask (a buffer: the flag), a memory mask (T, S), both key padding masks
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = dec
            self.register_buffer("tri", nn.Transformer.generate_square_subsequent_mask(6))
            self.register_buffer("mm", torch.randn(6, 9))

        def forward(self, tgt, memory, tgt_pad, mem_pad):
            return self.dec(tgt, memory, tgt_mask=self.tri, memory_mask=self.mm, tgt_key_padding_mask=tgt_pad,
                            memory_key_padding_mask=mem_pad)

    mm = Masked().eval()
    tp, mp = torch.zeros(3, 6, dtype=torch.bool), torch.zeros(3, 9, dtype=torch.bool)
    tp[1, 4:], mp[0, 5:], mp[2, 7:] = True, True, True
    with at_threads(2):
        c = compile(mm, (tgt, mem, tp, mp), sparse="never", fallback=False)
    mhas = [op for op in c.ops if op.kind == "mha"]
    assert [(op.p["causal"], op.p["kpm"], op.p["am"]) for op in mhas] == [(True, True, False), (False, True, True)] * layers
    with torch.no_grad():
        ref = mm(tgt, mem, tp, mp)
        assert _rel(c(tgt, mem, tp, mp), ref) <= 1e-4 and _rel(c.reference(tgt, mem, tp, mp), ref) <= 1e-4
        assert not torch.allclose(c(tgt, mem, tp, mp), c(tgt, mem, tp, torch.zeros_like(mp)))
        with switched_off(kernels, "native_transformer"):  # the plan's ATen path of the same steps
            assert _rel(c(tgt, mem, tp, mp), ref) <= 1e-4


def _block_sparse(m: nn.Module) -> nn.Module:
    """``m`` with every linear of its ``nn.Transformer`` (``m.tf``) 80% zero in 4x16 blocks."""
    s = make_scheme("block", block=(4, 16))
    with torch.no_grad():
        for mod in m.tf.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.mul_(s.project(mod.weight, 0.8))
    return m


@pytest.mark.parametrize("cfg", [dict(), dict(bf=False), dict(norm_first=True)], ids=["base", "seq-first", "norm-first"])
def test_nn_transformer_seq2seq_from_token_ids(kernels, cfg):
    """nn.Transformer (encoder + decoder) between source and target token ids, its padding masks computed from the
    ids in the plan: the whole model native, block-sparse linears on the sparse kernel, matching the model."""
    m = _block_sparse(_Seq2Seq(**cfg).eval())
    g = torch.Generator().manual_seed(5)
    src = torch.randint(1, 40, (3, 9), generator=g)
    tgt = torch.randint(1, 40, (3, 6), generator=g)
    src[1, 6:], src[2, 3:], tgt[2, 4:] = 0, 0, 0
    with at_threads(2):
        c = compile(m, (src, tgt), sparse="always", fallback=False)
    kinds = [op.kind for op in c.ops]
    assert "python" not in kinds and kinds.count("mha") == 6 and kinds.count("compare") == 2
    assert sum(lc.choice == "sparse" for lc in c.layers) == len(c.layers)
    with torch.no_grad():
        ref = m(src, tgt)
        assert _rel(c(src, tgt), ref) <= 1e-4 and _rel(c.reference(src, tgt), ref) <= 1e-4
        s2, t2 = src[:2], tgt[:2]
        assert _rel(c(s2, t2), m(s2, t2)) <= 1e-4


def test_attention_of_three_different_tensors_refused(kernels):
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()

    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, q, k, v):
            return self.mha(q, k, v)[0]

    x = torch.randn(2, 5, 16)
    with pytest.raises(UnsupportedModelError, match="key and value are different tensors"):
        compile(Three().eval(), (x, x + 1, x + 2), sparse="never", fallback=False)
    c = compile(Three().eval(), (x, x + 1, x + 2), sparse="never")  # fallback: PyTorch runs it inside the plan
    with torch.no_grad():
        assert _rel(c(x, x + 1, x + 2), Three()(x, x + 1, x + 2)) <= 1e-4


def test_optional_arguments_left_out_are_their_defaults(kernels):
    """``forward(x, mask=None, scale=2.0)`` compiled from ``x`` alone runs with the defaults (traced as constants);
    compiled from ``(x, mask)`` it takes the mask as a second input."""

    class Opt(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x, mask=None, scale=2.0):
            h = torch.relu(self.a(x))
            if mask is not None:
                h = h * mask
            return self.b(h * scale)

    m = Opt().eval()
    x, mask = torch.randn(4, 6), torch.rand(4, 16)
    c1 = compile(m, x, sparse="never", fallback=False)
    c2 = compile(m, (x, mask), sparse="never", fallback=False)
    assert len(c1.inputs) == 1 and len(c2.inputs) == 2 and "mul" in [op.kind for op in c2.ops]
    with torch.no_grad():
        assert _rel(c1(x), m(x)) <= 1e-4 and _rel(c2(x, mask), m(x, mask)) <= 1e-4


def test_inputs_by_name(kernels):
    """An example input given as a dict by forward argument name (HF-style ``model(**batch)``): the tensors are put in
    forward's order, arguments left out take their defaults (traced as constants, even between given ones), and the
    compiled model is called by keyword (or positionally, in forward's order)."""

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.typ = nn.Embedding(60, 32), nn.Embedding(2, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 3)

        def forward(self, input_ids, attention_mask=None, token_type_ids=None, scale=1.0):
            h = self.emb(input_ids)
            if token_type_ids is not None:
                h = h + self.typ(token_type_ids)
            pad = None if attention_mask is None else attention_mask == 0
            return self.head(self.attn(h, h, h, key_padding_mask=pad)[0].mean(1)) * scale

    m = Named().eval()
    ids, mask = _batch([10, 6, 3], gen=torch.Generator().manual_seed(4))
    types = (torch.arange(10) >= 5).long().expand(3, 10).contiguous()
    batch = {"token_type_ids": types, "input_ids": ids}  # (not in forward's order; attention_mask left out)
    c = compile(m, batch, sparse="never", fallback=False)
    assert c.input_names == ["input_ids", "token_type_ids"] and c.summary()["input_names"] == c.input_names
    with torch.no_grad():
        ref = m(ids, token_type_ids=types)
        assert _rel(c(**batch), ref) <= 1e-4 and _rel(c(ids, types), ref) <= 1e-4
        assert _rel(c.reference(**batch), ref) <= 1e-4 and c.time(batch, repeats=2, warmup=1) > 0
        c2 = compile(m, {"input_ids": ids, "attention_mask": mask}, sparse="never", fallback=False)
        assert _rel(c2(input_ids=ids, attention_mask=mask), m(ids, mask)) <= 1e-4
    with pytest.raises(ConfigError, match="expected the inputs input_ids, token_type_ids, got 0 positional and "
                                          "input_ids keyword"):
        c(input_ids=ids)
    with pytest.raises(UnsupportedModelError, match="example input 'labels' is not an argument of forward"):
        compile(m, {"input_ids": ids, "labels": ids}, sparse="never")
    with pytest.raises(UnsupportedModelError, match="forward argument 'input_ids' has no default"):
        compile(m, {"attention_mask": mask}, sparse="never")
    with pytest.raises(ConfigError, match="need a model whose forward is traced"):
        compile(nn.Linear(4, 2), {"input": torch.randn(2, 4)}, sparse="never")


class _Decoding(nn.Module):
    """nn.Transformer translation model whose causal target mask is made in forward for the target's length (as
    greedy decoding calls it: one more target token per call)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.src_emb, self.tgt_emb = nn.Embedding(40, 32), nn.Embedding(40, 32)
        self.tf = nn.Transformer(32, 4, 2, 2, 64, 0.1, batch_first=True)
        self.head = nn.Linear(32, 40)

    def forward(self, src, tgt):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        h = self.tf(self.src_emb(src), self.tgt_emb(tgt), tgt_mask=causal, src_key_padding_mask=src == 0,
                    memory_key_padding_mask=src == 0)
        return self.head(h)


def _greedy(step, src, steps):
    tgt = torch.ones(src.shape[0], 1, dtype=torch.long)
    for _ in range(steps):
        tgt = torch.cat([tgt, step(src, tgt)[:, -1].argmax(-1, keepdim=True)], 1)
    return tgt


def test_dynamic_sizes_greedy_decoding(kernels):
    """``compile(..., dynamic=True)``: a call of other non-batch sizes (here every longer target of a greedy decode)
    gets a plan compiled for them on first use, native, with the example plan's kernel per layer, and kept; the
    decode gives the model's tokens and logits. Without ``dynamic`` the same call is a clear error."""
    m = _block_sparse(_Decoding().eval())
    g = torch.Generator().manual_seed(3)
    src = torch.randint(1, 40, (2, 9), generator=g)
    src[1, 6:] = 0
    tgt = torch.ones(2, 1, dtype=torch.long)
    with at_threads(2):
        c = compile(m, (src, tgt), sparse="auto", fallback=False, dynamic=True, use_cache=False, repeats=3)
    with torch.no_grad():
        ref = _greedy(m, src, 5)
        assert torch.equal(_greedy(c, src, 5), ref)
        assert c.shapes == [[(9,), (t,)] for t in range(1, 6)] and c.summary()["shapes"][-1] == [[9], [5]]
        for v in c._variants.values():
            assert v.native and not v.fallback and not v.dynamic and v.inputs[1][0][1] in range(2, 6)
            # (each layer on the kernel tuned at the example's sizes, untimed)
            assert [lc.choice for lc in v.layers] == [lc.choice for lc in c.layers]
            assert all(lc.sparse_ms is None and lc.dense_ms is None for lc in v.layers)
            # (the example plan's weights and their packed forms, not copies: by name, all linears)
            mine = {op.name: op for op in c.ops if op.kind == "linear"}
            theirs = [op for op in v.ops if op.kind == "linear"]
            assert len(theirs) == len(mine) and all(op.p["weight"] is mine[op.name].p["weight"] for op in theirs)
            assert all(op.p.get("bsr") is mine[op.name].p.get("bsr") for op in theirs)
        # a kept plan: calls of those sizes (other batches too) reuse it, in order of use; also time / reference
        v3 = c._variants[((9,), torch.int64), ((3,), torch.int64)]
        x3 = (src[:1], ref[:1, :3])
        assert _rel(c(*x3), m(*x3)) <= 1e-4 and _rel(c.reference(*x3), m(*x3)) <= 1e-4 and c.time(x3, 2, 1) > 0
        assert list(c._variants.values())[-1] is v3 and len(c._variants) == 4
        assert [p["kind"] for p in c.profile(x3, 2, 1)] == [op.kind for op in v3.ops]
        fixed = compile(m, (src, tgt), sparse="never", fallback=False)
        with pytest.raises(ConfigError, match=r"expected input 2 \(N, 1\), got \(1, 3\) .*dynamic=True"):
            fixed(*x3)
        with pytest.raises(ConfigError, match="expected input 2 \\(N, 1\\), got \\(2, 1, 1\\)$"):
            c(src, tgt[..., None])  # (other number of dimensions: not compiled, named)
        with pytest.raises(ConfigError, match="expected a int64 input 2, got torch.int32"):
            c(src, tgt.int())


def test_dynamic_sizes_kept_plans_and_image_sizes(kernels, caplog):
    """A CNN at other image sizes; ``max_shapes`` bounds the plans kept (least recently used dropped, compiled again
    when needed, with one warning); dict inputs called by keyword; options checked."""
    from netcarve.models import create_model

    m = create_model("resnet20").eval()
    with at_threads(2):
        c = compile(m, torch.randn(2, 3, 32, 32), sparse="never", dynamic=True, max_shapes=2)
    x40, x24 = torch.randn(3, 3, 40, 48), torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        assert _rel(c(x40), m(x40)) <= 1e-4 and c.shapes == [[(3, 32, 32)], [(3, 40, 48)]]
        first = c._variants[(((3, 40, 48), torch.float32),)]
        assert _rel(c(x24), m(x24)) <= 1e-4 and c.shapes == [[(3, 32, 32)], [(3, 24, 24)]]
        assert "larger max_shapes" not in caplog.text
        assert _rel(c(x40), m(x40)) <= 1e-4 and c._variants[(((3, 40, 48), torch.float32),)] is not first
        assert caplog.text.count("larger max_shapes") == 1
        x = torch.randn(5, 3, 32, 32)
        assert _rel(c(x), m(x)) <= 1e-4 and len(c._variants) == 1  # (the example's plan)
    with pytest.raises(ConfigError, match="max_shapes must be an integer >= 1, got 0"):
        compile(m, x, dynamic=True, max_shapes=0)

    ids, mask = _batch([10, 6, 3], gen=torch.Generator().manual_seed(2))
    mc = _MaskedClassifier("eq").eval()
    c = compile(mc, {"input_ids": ids, "attention_mask": mask}, sparse="never", fallback=False, dynamic=True)
    ids7, mask7 = _batch([7, 2], t=7, gen=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _rel(c(input_ids=ids7, attention_mask=mask7), mc(ids7, mask7)) <= 1e-4
        assert c._variants[next(iter(c._variants))].input_names == ["input_ids", "attention_mask"]


def test_dynamic_sequence_lengths_of_a_recurrent_model(kernels):
    """Token ids of other lengths through an embedding, a 2-layer GRU and its last step (``dynamic=True``): each length's
    plan matches the model and shares the example plan's gate matrices and their packed panels (no second copy)."""

    class Gru(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.gru, self.fc = nn.Embedding(100, 32), nn.GRU(32, 48, 2, batch_first=True), nn.Linear(48, 3)

        def forward(self, x):
            return self.fc(self.gru(self.emb(x))[0][:, -1])

    m = Gru().eval()
    c = compile(m, torch.randint(0, 100, (2, 10)), sparse="never", fallback=False, dynamic=True)
    with torch.no_grad():
        for t in (3, 17, 1):
            x = torch.randint(0, 100, (4, t))
            assert _rel(c(x), m(x)) <= 1e-4
    rnn = next(op for op in c.ops if op.kind == "rnn")
    theirs = [next(op for op in v.ops if op.kind == "rnn") for v in c._variants.values()]
    assert len(theirs) == 3 and all(op.p["dense"] is rnn.p["dense"] for op in theirs)
    if rnn.p.get("direct"):  # (the gate matmuls on netcarve's dense panel kernel: packed once)
        assert all(op.p["panels"] is rnn.p["panels"] for op in theirs)


class _SizeBranching(nn.Module):
    """Self-attention written with views (heads by ``-1``) and a Python branch over the length: fx cannot trace
    it, so the plan is lowered from the torch.export capture, at the example's sizes, batch included."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.hd = d // heads
        self.emb = nn.Linear(6, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.emb(x)
        b, t = h.shape[:2]
        q, k, v = (p(h).view(b, t, -1, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        h = h + self.o(a)
        if t > 4:  # fx stops here
            h = h * 0.5
        return self.head(h.mean(1))


def test_torch_export_capture_runs_at_any_batch_and_other_sizes_with_dynamic():
    model = _SizeBranching().eval()
    x = torch.randn(2, 7, 6)
    c = compile(model, x, threads=1)
    assert not c.fixed_batch and c.native
    assert c.fallback == []  # the views read the batch from the tensor (torch.export kept it symbolic)
    for b in (2, 3, 1):
        y = torch.randn(b, 7, 6)
        with torch.no_grad():
            assert _rel(c(y), model(y)) < 1e-4, b
    with pytest.raises(ConfigError, match=r"expected input \(N, 7, 6\), got \(2, 3, 6\) \(the plan is compiled"):
        c(torch.randn(2, 3, 6))
    d = compile(model, torch.randn(1, 7, 6), threads=1, dynamic=True)  # (a batch-1 example is exported at batch 2)
    assert not d.fixed_batch
    for shape in ((3, 7, 6), (1, 3, 6), (4, 3, 6)):
        y = torch.randn(*shape)
        with torch.no_grad():
            assert _rel(d(y), model(y)) < 1e-4, shape
    assert d.shapes == [[(7, 6)], [(3, 6)]]


class _FixedBatch(_SizeBranching):
    """Branches on the batch too: torch.export keeps the example's batch, and the plan is for that batch only."""

    def forward(self, x):
        y = super().forward(x)
        return y * 2.0 if x.shape[0] == 2 else y


def test_torch_export_capture_with_a_fixed_batch():
    model = _FixedBatch().eval()
    x = torch.randn(2, 7, 6)
    c = compile(model, x, threads=1)
    assert c.fixed_batch and c.native
    with torch.no_grad():
        assert _rel(c(x), model(x)) < 1e-4
    with pytest.raises(ConfigError, match=r"expected input \(2, 7, 6\), got \(3, 7, 6\) \(captured by torch.export"):
        c(torch.randn(3, 7, 6))
    d = compile(model, x, threads=1, dynamic=True)
    for shape in ((3, 7, 6), (1, 3, 6), (2, 7, 6)):
        y = torch.randn(*shape)
        with torch.no_grad():
            assert _rel(d(y), model(y)) < 1e-4, shape
    assert d.shapes == [[(2, 7, 6)], [(3, 7, 6)], [(1, 3, 6)]]


class _ReshapedIds(nn.Module):
    """Token ids reshaped before the embedding (as GPT-2's ``input_ids.view(-1, t)``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(50, 16), nn.Linear(16, 3)

    def forward(self, ids):
        ids = ids.view(-1, ids.shape[-1])
        return self.head(self.emb(ids).mean(1))


def test_methods_on_token_ids_run_in_pytorch():
    model = _ReshapedIds().eval()
    x = torch.randint(0, 50, (2, 7))
    c = compile(model, x, threads=1)
    assert any("view" in f for f in c.fallback), c.fallback
    with torch.no_grad():
        assert _rel(c(x), model(x)) < 1e-4
    with pytest.raises(UnsupportedModelError, match="reshape of integer / bool tensors"):
        compile(model, x, threads=1, fallback=False)


class _DictOut(nn.Module):
    """Returns a dict with one tensor (and a None), as a transformers ``ModelOutput`` without loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x, **kwargs):  # (an unused **kwargs: fx makes it a placeholder)
        return {"loss": None, "logits": self.fc(x)}


def test_an_output_dict_of_one_tensor_and_unused_kwargs():
    model = _DictOut().eval()
    x = torch.randn(2, 6)
    c = compile(model, x, threads=1)
    with torch.no_grad():
        assert _rel(c(x), model(x)["logits"]) < 1e-4
