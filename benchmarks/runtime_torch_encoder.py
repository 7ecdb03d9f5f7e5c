"""A model built on torch's ``nn.TransformerEncoder`` in netcarve's runtime: the encoder lowered natively (attention,
LayerNorms, feed-forward linears as plan steps, so block-sparse weights run the BSR kernel) against the same plan
with the encoder left to PyTorch as one python step (what the runtime did before it lowered the module), eager
PyTorch, onnxruntime and OpenVINO.

    python benchmarks/runtime_torch_encoder.py --threads 2 --out benchmarks/results/runtime_torch_encoder-zen4.json
    python benchmarks/runtime_torch_encoder.py --model bert --threads 2 --out benchmarks/results/runtime_torch_encoder-bert-zen4.json
    python benchmarks/runtime_torch_encoder.py --model seq2seq --threads 2 --out benchmarks/results/runtime_torch_encoder-seq2seq-zen4.json

The model: pytorch/examples' word_language_model ``TransformerModel`` (``benchmarks/coverage_models.py``
``TransformerLM``: embedding * sqrt(d), sinusoidal positions, ``nn.TransformerEncoder`` with the causal mask as a
buffer, a vocabulary decoder, log-softmax; batch first) at d_model 256, 4 heads, feed-forward 1024, 2 layers, vocabulary
5000, 32 tokens; random weights (latency does not depend on the values). ``--model bert``: the BERT-style classifier
(``PaddedTextEncoder``: token + position embeddings, LayerNorm, a GELU ``nn.TransformerEncoder`` given the key padding
mask ``tokens == 0``, the first token's output -> Linear) at the same sizes, every sequence's last 8 of 32 tokens
padding. ``--model seq2seq``: the encoder-decoder of PyTorch's translation tutorial (``Seq2SeqTransformer``:
``nn.Transformer`` with 2 + 2 layers at the same sizes, causal target mask and padding masks built from the ids, a
generator Linear over a 5000-word target vocabulary), two inputs: 32 source tokens (the last 8 padding) and 24 target
tokens (the last 4 padding); its "in PyTorch" variant leaves the whole ``nn.Transformer`` to PyTorch. Sparse variant: every linear's weight (the attention in-projections too) pruned to 90% in 4x16 blocks by
netcarve's block scheme. ``--variants ... pruned pruned-hidden`` (``lm`` / ``bert``) adds structurally pruned models:
``prune_channels(model, x, ratio=0.5)`` (half the heads and feed-forward units, ``d_model`` kept) and the same with
``hidden_size=True`` (``d_model`` halved too: embeddings, norms, every projection), run dense everywhere.

    python benchmarks/runtime_torch_encoder.py --model bert --variants dense pruned pruned-hidden --threads 2 \
        --out benchmarks/results/runtime_torch_encoder-bert-pruned-emr.json

1. netcarve and eager PyTorch in this process (they share torch's thread pool), alternated per round: the median of
   ``--repeats`` calls per round, the minimum over ``--rounds`` rounds; every variant's output checked against the
   model. The dense plan also runs with its linears switched from netcarve's dense panel kernel (the autotuner's
   "direct" choice) to ATen's addmm (``set_direct_linear(False)``), the same plan otherwise.
2. onnxruntime and OpenVINO with ``netcarve.measure.measure_latency`` (each in its own process; the dense model and
   the sparse one, which those engines run as dense).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from _timing import median_ms  # noqa: E402

HERE = Path(__file__).resolve().parent


def _coverage_models():
    spec = importlib.util.spec_from_file_location("coverage_models", HERE / "coverage_models.py")
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    return cm


MODELS = {"lm": "word_language_model TransformerModel: d 256, 4 heads, ff 1024, 2 layers, vocab 5000, 32 tokens",
          "bert": "BERT-style classifier (PaddedTextEncoder): d 256, 4 heads, ff 1024 (GELU), 2 layers, vocab 5000, "
                  "32 tokens of which the last 8 are padding, key padding mask tokens == 0, 2 classes",
          "seq2seq": "translation encoder-decoder (Seq2SeqTransformer, nn.Transformer): d 256, 4 heads, ff 1024, 2 + 2 "
                     "layers, vocab 5000 + 5000, inputs 32 source tokens (last 8 padding) and 24 target tokens (last 4 "
                     "padding), causal target mask and padding masks from the ids, logits over the target vocabulary"}


def tokens(model: str, batch: int) -> tuple[torch.Tensor, ...]:
    """The model's inputs (a tuple: one tensor of token ids, two for seq2seq)."""
    if model == "lm":
        return (torch.randint(0, 5000, (batch, 32)),)
    x = torch.randint(1, 5000, (batch, 32))
    x[:, 24:] = 0
    if model == "bert":
        return (x,)
    y = torch.randint(1, 5000, (batch, 24))
    y[:, 20:] = 0
    return x, y


VARIANTS = ("dense", "sparse", "pruned", "pruned-hidden")


def build(variant: str | bool, model: str = "lm") -> nn.Module:
    """The model: ``dense``, ``sparse`` (90% in 4x16 blocks), ``pruned`` (half the heads and feed-forward units
    removed) or ``pruned-hidden`` (``d_model`` halved too); ``True`` / ``False`` mean sparse / dense."""
    from netcarve.sparsity import make_scheme

    variant = {True: "sparse", False: "dense"}.get(variant, variant)
    sparse = variant == "sparse"

    cm = _coverage_models()
    torch.manual_seed(0)
    if model == "lm":
        m = cm.TransformerLM(ntoken=5000, ninp=256, nhead=4, nhid=1024, nlayers=2, dropout=0.2, seq_len=32).eval()
    elif model == "seq2seq":
        m = cm.Seq2SeqTransformer(d=256, nhead=4, nenc=2, ndec=2, nhid=1024).eval()
    else:
        m = cm.PaddedTextEncoder(ntoken=5000, d=256, nhead=4, nhid=1024, nlayers=2).eval()
    if sparse:
        blk = make_scheme("block", block=[4, 16])
        with torch.no_grad():
            for mod in m.modules():
                for name in ("weight", "in_proj_weight"):
                    w = getattr(mod, name, None)
                    if isinstance(mod, (nn.Linear, nn.MultiheadAttention)) and isinstance(w, nn.Parameter):
                        w.mul_(blk.project(w, 0.9))
    if variant.startswith("pruned"):
        from netcarve.compact import prune_channels

        if model == "seq2seq":
            raise SystemExit("--variants pruned / pruned-hidden: --model lm or bert")
        m = prune_channels(m, tokens(model, 2)[0], ratio=0.5, hidden_size=variant == "pruned-hidden").model.eval()
    return m


def _encoder_in_pytorch():
    """A context that makes the plan leave ``nn.TransformerEncoder`` / ``nn.Transformer`` to PyTorch (the runtime
    before it lowered them)."""
    from netcarve.runtime.plan import Lowering

    names = ("_torch_encoder", "_torch_transformer")

    class Ctx:
        def __enter__(self):
            self.orig = {n: getattr(Lowering, n) for n in names}
            for n in names:
                setattr(Lowering, n, lambda self_, node, m: self_._unsupported(node, "left to PyTorch (benchmark)"))

        def __exit__(self, *exc):
            for n, f in self.orig.items():
                setattr(Lowering, n, f)

    return Ctx()


def _aten_linears(plan):
    """``plan`` called with netcarve's dense panel linears switched to ATen's addmm (``set_direct_linear(False)``)."""
    from netcarve.runtime import load_kernels

    mod = load_kernels()

    def call(*x):
        mod.set_direct_linear(False)
        try:
            return plan(*x)
        finally:
            mod.set_direct_linear(True)

    return call


def in_process(batches, threads: int, rounds: int, repeats: int, model: str = "lm",
               tags: tuple[str, ...] = ("dense", "sparse")) -> dict:
    from netcarve.runtime import compile as ncompile

    torch.set_num_threads(threads)
    out = {}
    for b in batches:
        x = tokens(model, b)
        variants, ref = {}, {}
        sparse_linears, dense_choices = [], {}
        for tag in tags:
            sparse = tag == "sparse"
            m = build(tag, model)
            with torch.no_grad():
                ref[tag] = m(*x)
                variants[f"torch eager, {tag}"] = (m, tag)
                if tag in ("dense", "sparse"):
                    with _encoder_in_pytorch():
                        c = ncompile(m, x if len(x) > 1 else x[0], sparse="auto")
                    assert any("Transformer" in f for f in c.fallback), c.fallback
                    variants[f"netcarve, encoder in PyTorch, {tag}"] = (c, tag)
                c = ncompile(m, x if len(x) > 1 else x[0], sparse="auto", fallback=False)
                variants[f"netcarve, native, {tag}"] = (c, tag)
                if tag == "dense":  # the same plan with its dense linears on ATen's addmm instead of the panel kernel
                    variants[f"netcarve, native, {tag}, ATen linears"] = (_aten_linears(c), tag)
                    dense_choices = {lc.name: lc.choice for lc in c.layers}
                if sparse:
                    choice = {lc.name: lc.choice for lc in c.layers}
                    sparse_linears = sorted(k for k, v in choice.items() if v == "sparse")
        times: dict[str, list[float]] = {k: [] for k in variants}
        errors = {}
        with torch.no_grad():
            for name, (fn, tag) in variants.items():
                errors[name] = float((fn(*x) - ref[tag]).abs().max() / ref[tag].abs().max())
                assert errors[name] <= 1e-4, (name, errors[name])
            for _ in range(rounds):
                for name, (fn, _tag) in variants.items():
                    for _ in range(5):
                        fn(*x)
                    times[name].append(median_ms(fn, *x, repeats=repeats))
        best = {k: min(v) for k, v in times.items()}
        out[f"batch{b}"] = {"ms": best, "rounds_ms": times, "max_rel_error": errors,
                            "sparse_linears_on_bsr": sparse_linears, "dense_model_linear_kernels": dense_choices}
        print(f"batch {b}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in best.items()), file=sys.stderr)
    return out


def engines(batches, threads: int, rounds: int, model: str = "lm", tags: tuple[str, ...] = ("dense", "sparse")) -> dict:
    from netcarve.measure.latency import engine_available, measure_latency

    out: dict = {}
    for engine in ("onnxruntime", "openvino"):
        if not engine_available(engine):
            out[engine] = "not installed"
            continue
        for b in batches:
            x = tokens(model, b)
            for tag in tags:
                r = measure_latency(build(tag, model), x if len(x) > 1 else x[0], engine=engine, threads=threads,
                                    repeats=50, rounds=rounds)
                out.setdefault(engine, {})[f"batch{b}, {tag}"] = r.p50_ms
                print(f"{engine} batch {b} {tag}: {r.p50_ms:.3f} ms", file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="lm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["dense", "sparse"],
                   help="models to time (dense first: the ratios are against it)")
    p.add_argument("--out", default=str(HERE / "results" / "runtime_torch_encoder.json"))
    a = p.parse_args()
    tags = tuple(dict.fromkeys(["dense", *a.variants]))
    from netcarve.measure.env import environment

    res = {"benchmark": "runtime_torch_encoder", "command": "python " + " ".join(sys.argv),
           "model": MODELS[a.model],
           "sparse": "every linear (and attention in-projection) weight 90% zero in 4x16 blocks",
           "threads": a.threads, "env": environment(threads=a.threads)}
    if any(t.startswith("pruned") for t in tags):
        from netcarve.measure.counting import count_model

        x = tokens(a.model, 1)
        res["macs_batch1"] = {t: count_model(build(t, a.model), x[0]).total_macs for t in tags if t != "sparse"}
    res["netcarve_and_torch"] = in_process(a.batches, a.threads, a.rounds, a.repeats, a.model, tags)
    res["engines_p50_ms"] = engines(a.batches, a.threads, a.rounds, a.model, tags)
    for b in a.batches:
        ms = res["netcarve_and_torch"][f"batch{b}"]["ms"]
        ratios = {f"native vs encoder in PyTorch, {t}": ms[f"netcarve, encoder in PyTorch, {t}"] /
                  ms[f"netcarve, native, {t}"] for t in ("dense", "sparse") if t in tags}
        ratios["dense: panel linears vs ATen linears"] = (ms["netcarve, native, dense, ATen linears"] /
                                                          ms["netcarve, native, dense"])
        for t in tags[1:]:
            ratios[f"native {t} vs native dense"] = ms["netcarve, native, dense"] / ms[f"netcarve, native, {t}"]
            for engine in ("onnxruntime", "openvino"):
                e = res["engines_p50_ms"].get(engine)
                if isinstance(e, dict):
                    ratios[f"native {t} vs {engine} dense"] = e[f"batch{b}, dense"] / ms[f"netcarve, native, {t}"]
        res["netcarve_and_torch"][f"batch{b}"]["speedups"] = ratios
        print(f"batch {b}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
