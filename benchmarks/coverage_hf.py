"""Hugging Face transformers architectures for the coverage benchmark (``benchmarks/coverage.py --hf``).

Each is built from a small config (random init, eval mode, no weights downloaded) with an example input of batch 1
by forward argument name, as a tokenizer or image processor would give it. ``transformers`` is not a netcarve
dependency: run the benchmark where it is installed (a virtualenv with ``--system-site-packages`` beside torch).
Since transformers 5 these models cannot be traced by torch.fx; netcarve captures them with torch.export.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

SEQ = 16
IMAGE = 32
VOCAB = 1000


def _text(cfg_cls, model_cls, **cfg):
    def build():
        return model_cls(cfg_cls(**cfg))

    return build, "text"


@contextlib.contextmanager
def without_benchmarks_on_path():
    """transformers imports a package named ``kernels`` if it finds one: not benchmarks/kernels.py."""
    here = Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    ours = sys.modules.pop("kernels", None)
    try:
        yield
    finally:
        sys.path[:] = saved
        if ours is not None:
            sys.modules["kernels"] = ours


def _registry() -> dict:
    with without_benchmarks_on_path():
        return _classes()


def _classes() -> dict:
    import transformers as tf

    enc = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB)
    dec = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB)
    for cls in ("T5ForConditionalGeneration", "T5Config", "ViTForImageClassification", "ViTConfig",
                "ConvNextForImageClassification", "ConvNextConfig", "ResNetForImageClassification", "ResNetConfig"):
        getattr(tf, cls)  # (imports the modeling module now, with benchmarks/ off the path)
    return {
        "hf_bert": _text(tf.BertConfig, tf.BertForSequenceClassification, **enc),
        "hf_roberta": _text(tf.RobertaConfig, tf.RobertaForSequenceClassification, **enc),
        "hf_electra": _text(tf.ElectraConfig, tf.ElectraForSequenceClassification, embedding_size=64, **enc),
        "hf_albert": _text(tf.AlbertConfig, tf.AlbertForSequenceClassification, embedding_size=32, **enc),
        "hf_distilbert": _text(tf.DistilBertConfig, tf.DistilBertForSequenceClassification, dim=64, n_layers=2,
                               n_heads=4, hidden_dim=128, vocab_size=VOCAB),
        "hf_gpt2": _text(tf.GPT2Config, tf.GPT2ForSequenceClassification, n_embd=64, n_layer=2, n_head=4,
                         vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False),
        "hf_llama": _text(tf.LlamaConfig, tf.LlamaForCausalLM, num_key_value_heads=4, use_cache=False, **dec),
        "hf_qwen2_gqa": _text(tf.Qwen2Config, tf.Qwen2ForCausalLM, num_key_value_heads=2, use_cache=False, **dec),
        "hf_t5": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2,
                                                                     num_heads=4, vocab_size=VOCAB, use_cache=False)),
                   "seq2seq"),
        "hf_vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(
            image_size=IMAGE, patch_size=8, num_labels=10, **{k: v for k, v in enc.items() if k != "vocab_size"})),
            "image"),
        "hf_convnext": (lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10, image_size=IMAGE)), "image"),
        "hf_resnet": (lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)), "image"),
    }


MODELS = ("hf_bert", "hf_roberta", "hf_electra", "hf_albert", "hf_distilbert", "hf_gpt2", "hf_llama", "hf_qwen2_gqa",
          "hf_t5", "hf_vit", "hf_convnext", "hf_resnet")
NOTES = {
    "hf_albert": "one encoder layer shared by all (called once per layer: pruned alike for every call)",
    "hf_gpt2": "q/k/v fused in one transformers Conv1D, split by a stored size (its heads stay whole)",
    "hf_qwen2_gqa": "grouped-query attention: 4 query heads, 2 key/value heads",
    "hf_t5": "encoder-decoder; input_ids and decoder_input_ids",
}
# decoders are built with use_cache=False: a key/value cache object in the output is not a tensor torch.export can
# return (transformers' own export recipes set it too)


def create(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _registry()[name][0]().eval()


def example_input(name: str) -> dict:
    kind = _registry()[name][1]
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        return {"pixel_values": torch.randn(1, 3, IMAGE, IMAGE, generator=g)}
    ids = torch.randint(1, VOCAB, (1, SEQ), generator=g)
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, VOCAB, (1, SEQ // 2), generator=g)}
    return {"input_ids": ids, "attention_mask": torch.ones(1, SEQ, dtype=torch.long)}


def input_shapes(name: str) -> list[list[int]]:
    return [list(t.shape[1:]) for t in example_input(name).values()]
