"""The nn.TransformerEncoder runtime benchmark's model and variants: the sparse model is 90% zero in 4x16 blocks in
every linear (attention in-projections too), the "before" variant really leaves the encoder to PyTorch, and one tiny
timing pass checks every variant against the model (no engines)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
_spec = importlib.util.spec_from_file_location("netcarve_bench_runtime_torch_encoder", BENCH / "runtime_torch_encoder.py")
rte = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = rte
_spec.loader.exec_module(rte)


def test_sparse_model_is_block_sparse_everywhere():
    m = rte.build("sparse")
    weights = [mod.weight for mod in m.modules() if isinstance(mod, nn.Linear)]
    weights += [layer.self_attn.in_proj_weight for layer in m.transformer_encoder.layers]
    assert len(weights) == 2 * 4 + 1
    for w in weights:
        blocks = w.detach().reshape(w.shape[0] // 4, 4, w.shape[1] // 16, 16).abs().sum((1, 3))
        assert (blocks == 0).float().mean().item() == pytest.approx(0.9, abs=0.01)
    assert all((w != 0).any() for w in weights)


@pytest.mark.parametrize("variant", ["pruned", "pruned-hidden"])
def test_pruned_variants_are_half_as_wide(variant):
    """--variants pruned / pruned-hidden: half the heads and feed-forward units removed (and half of d_model)."""
    m = rte.build(variant, "bert")
    layer = m.encoder.layers[0]
    assert layer.self_attn.num_heads == 2 and layer.linear1.out_features == 512
    assert layer.self_attn.embed_dim == (128 if variant == "pruned-hidden" else 256)
    (x,) = rte.tokens("bert", 2)
    with torch.no_grad():
        assert m(x).shape == (2, 2)


def test_variants_run_and_match():
    from netcarve.runtime import compile as ncompile
    from netcarve.runtime import kernel_status

    if not kernel_status()["available"]:
        pytest.skip(f"native kernels unavailable: {kernel_status()['reason']}")

    res = rte.in_process([1], threads=1, rounds=1, repeats=1)["batch1"]
    assert set(res["ms"]) == {f"{v}, {t}" for v in ("torch eager", "netcarve, encoder in PyTorch", "netcarve, native")
                              for t in ("dense", "sparse")} | {"netcarve, native, dense, ATen linears"}
    assert max(res["max_rel_error"].values()) <= 1e-4
    assert "transformer_encoder.layers.1.linear2" in res["sparse_linears_on_bsr"]
    m, x = rte.build(False), torch.randint(0, 5000, (1, 32))
    with rte._encoder_in_pytorch():
        assert "module 'transformer_encoder' (TransformerEncoder)" in ncompile(m, x, sparse="never").fallback
    assert ncompile(m, x, sparse="never").fallback == []  # the context restored the lowering


def test_bert_variant_runs_and_matches():
    """--model bert: the padded BERT-style classifier, its key padding mask computed in the plan."""
    from netcarve.runtime import kernel_status

    if not kernel_status()["available"]:
        pytest.skip(f"native kernels unavailable: {kernel_status()['reason']}")
    (x,) = rte.tokens("bert", 2)
    assert (x[:, 24:] == 0).all() and (x[:, :24] != 0).all()
    res = rte.in_process([2], threads=1, rounds=1, repeats=1, model="bert")["batch2"]
    assert max(res["max_rel_error"].values()) <= 1e-4
    assert "encoder.layers.0.linear1" in res["sparse_linears_on_bsr"]


def test_seq2seq_variant_runs_and_matches():
    """--model seq2seq: nn.Transformer between two inputs (source and target ids), the "in PyTorch" variant leaving
    the whole nn.Transformer to PyTorch; every variant matches the model, the decoder's cross-attention linears run
    the BSR kernel."""
    from netcarve.runtime import compile as ncompile
    from netcarve.runtime import kernel_status

    if not kernel_status()["available"]:
        pytest.skip(f"native kernels unavailable: {kernel_status()['reason']}")
    src, tgt = rte.tokens("seq2seq", 1)
    assert src.shape == (1, 32) and tgt.shape == (1, 24) and (src[:, 24:] == 0).all() and (tgt[:, 20:] == 0).all()
    res = rte.in_process([1], threads=1, rounds=1, repeats=1, model="seq2seq")["batch1"]
    assert max(res["max_rel_error"].values()) <= 1e-4
    assert "transformer.decoder.layers.1.multihead_attn.in_proj_kv" in res["sparse_linears_on_bsr"]
    m = rte.build(False, "seq2seq")
    with rte._encoder_in_pytorch():
        assert "module 'transformer' (Transformer)" in ncompile(m, (src, tgt), sparse="never").fallback
