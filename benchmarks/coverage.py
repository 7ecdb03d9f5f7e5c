"""Structural-pruning coverage: netcarve vs Torch-Pruning on the netcarve zoo and external architectures.

    python benchmarks/coverage.py [--out benchmarks/results/coverage.json] [--models a,b] [--markdown docs/coverage.md]
    python benchmarks/coverage.py --from-json benchmarks/results/coverage.json --markdown docs/coverage.md

For every model of ``netcarve.models.list_models()`` and every architecture of
``benchmarks/coverage_models.py`` (random init, eval mode, batch 1):

* **netcarve**: ``build_channel_groups`` -> ``prune_channels(model, x, ratio=0.3, criterion="l1")`` -> the
  compact model's output is compared with ``mask_channels(model, groups, result.keep)``'s output
  (max abs error <= 1e-4 x the masked output's max abs value). ``ok`` = at least one group, MACs drop,
  outputs agree.
* **Torch-Pruning** (on a fresh copy): the README recipe, ``tp.pruner.BasePruner`` (``MetaPruner`` is its
  deprecated alias) with ``tp.importance.MagnitudeImportance(p=1)``, ``pruning_ratio=0.3``,
  ``ignored_layers=[final classifier]``, ``num_heads`` for attention layers as in its ViT examples (plus the
  timm example's attention ``forward`` and ``num_heads``/``head_dim`` update, and the torchvision example's
  ``hidden_dim`` update); groups are pruned via ``step(interactive=True)`` so the removed indices are
  recorded. ``ok`` = the step runs, the pruned model runs with the original output shape and MACs and
  parameters drop, and the outputs agree with a masked twin when one can be built (see below).
  **TP masked twin**: the same removed indices are zeroed in a copy of the unpruned model (Conv/Linear/
  ConvTranspose rows or columns, depthwise conv rows, BatchNorm weight and bias, mapped to the original numbering); when a group touches a
  layer for which zeroing is not equivalent to removal (LayerNorm statistics, LSTM, attention,
  embeddings, raw parameters) the check is ``unchecked`` with the reason. Grouped convs are masked
  row-wise on the output side and per group on the input side.

MACs and parameters of both sides come from ``netcarve.measure.count_model``. Each side of each model runs
in its own forked process with a timeout (``--timeout``), so a crash or a hang is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import multiprocessing as mp
import re
import sys
import time
import traceback
import types
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import coverage_hf  # noqa: E402
import coverage_models  # noqa: E402

RATIO = 0.3
RTOL = 1e-4
HIDDEN_SIZE = False  # --hidden-size: netcarve also prunes transformers' hidden size (build_channel_groups(hidden_size=))
DEFAULT_OUT = HERE / "results" / "coverage.json"
HF_OUT = HERE / "results" / "coverage-hf.json"
SOURCES = {"netcarve": "netcarve zoo", "external": "external architectures",
           "huggingface": "Hugging Face transformers architectures"}


# ---------------------------------------------------------------------------------------------- models
def model_names(hf: bool = False) -> list[tuple[str, str]]:
    """``(name, source)`` for every model: the netcarve zoo first, then the external architectures; with ``hf`` the
    Hugging Face transformers architectures of ``benchmarks/coverage_hf.py`` instead."""
    if hf:
        return [(n, "huggingface") for n in coverage_hf.MODELS]
    import netcarve

    names = [(n, "netcarve") for n in netcarve.models.list_models()]
    names += [(n, "external") for n in coverage_models.MODELS]
    return names


def build(name: str, source: str) -> tuple[nn.Module, torch.Tensor]:
    """A fresh model (seeded, eval mode) and its example input."""
    torch.manual_seed(0)
    if source == "netcarve":
        import netcarve

        model = netcarve.create_model(name).eval()
        return model, netcarve.example_input(model)
    if source == "huggingface":
        return coverage_hf.create(name), coverage_hf.example_input(name)
    return coverage_models.create(name), coverage_models.example_input(name)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        for o in out.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def run(model: nn.Module, x) -> torch.Tensor:
    """``model``'s (first) output on ``x``: a tensor, a tuple of the inputs of a model of several, or a dict of them by
    forward argument name."""
    model.eval()
    with torch.no_grad():
        return _first_tensor(model(*x) if isinstance(x, tuple) else model(**x) if isinstance(x, dict) else model(x))


def final_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier: the last registered Conv/Linear (for every model here it produces the output)."""
    last = None
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            last = (n, m)
    if last is None:
        raise RuntimeError("no Linear/Conv layer")
    return last


def created_channels(m: nn.Module) -> int:
    """Output channels a layer creates: non-depthwise convs, transposed convs, Linear (incl. attention
    projections), the q/k/v input projection of nn.MultiheadAttention, recurrent hidden units (per layer and
    direction), embedding dims; 0 for anything else (BatchNorm, depthwise convs, parameter-free maps)."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return 0 if (m.groups > 1 and m.groups == m.in_channels == m.out_channels) else m.out_channels
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.MultiheadAttention):
        return 3 * m.embed_dim
    if isinstance(m, nn.RNNBase):
        return m.hidden_size * m.num_layers * (2 if m.bidirectional else 1)
    if isinstance(m, nn.Embedding):
        return m.embedding_dim
    return 0


def producer_channels(model: nn.Module) -> int:
    """All output channels of channel-creating layers (:func:`created_channels`); the classifier counts too."""
    return sum(created_channels(m) for m in model.modules())


def prunable_channels(model: nn.Module, groups) -> int:
    """Output channels of channel-creating layers that lie in a prunable group (a coupled group counts once
    per such producer; a grouped conv sliced as a pass-through layer counts too; parameter-free producers
    such as option-A shortcuts do not count)."""
    total = 0
    for g in groups:
        for path in dict.fromkeys(s.path for s in g.slots if s.role in ("producer", "passthrough")):
            m = model.get_submodule(path)
            if created_channels(m):
                total += g.num_channels
    return total


def count(model: nn.Module, x) -> tuple[int, int]:
    from netcarve.measure import count_model

    c = count_model(model, x)
    return int(c.total_macs), int(c.total_params)


def one_line(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = msg[0] if msg else type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."


def _where(exc: BaseException) -> str:
    """The innermost frame of the traceback (file:line function), to tell which library raised."""
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return ""
    f = tb[-1]
    path = f.filename
    for key in ("torch_pruning/", "netcarve/", "torch/", "benchmarks/"):
        if key in path:
            path = key + path.split(key, 1)[1]
            break
    return f"{path}:{f.lineno} ({f.name})"


_PATH = r"\b(?!e\.g\b)[A-Za-z_]\w*(?:\.\w+)+"


def shorten_reason(reason: str) -> str:
    """A skip reason without module paths / node names, so that reasons can be counted."""
    r = reason
    m = re.match(r"used by .*? \((\w+)\), which has no channel handler", r)
    if m:
        return f"no channel handler for {m.group(1)}"
    if r.startswith("coupled by residual adds"):
        return "coupled by residual adds with a blocked member"
    if r.startswith("added at") and "cannot be pruned with this group" in r:
        return "residual add with an addend that cannot be pruned with the group"
    r = re.sub(r" in (the model forward|[\w.]+)(?=[;,)]|$| \()", "", r)
    r = re.sub(_PATH, "<path>", r)
    r = re.sub(r"^used by <path>: ", "consumer: ", r)
    r = re.sub(r" \(groups=\d+\)", "", r)
    r = re.sub(r"\b([a-z]+(?:_[a-z]+)*)_\d+\b", r"\1", r)
    r = re.sub(r"\s+", " ", r).strip()
    return r if len(r) <= 120 else r[:117] + "..."


# ---------------------------------------------------------------------------------------------- netcarve
def netcarve_side(model: nn.Module, x) -> dict:
    from netcarve.compact import mask_channels, prune_channels
    from netcarve.graph import build_channel_groups

    rec: dict = {"status": None, "error": None}
    t0 = time.perf_counter()
    try:
        model.eval()
        y_ref = run(model, x)
        gs = build_channel_groups(model, x, hidden_size=HIDDEN_SIZE)
        reasons: Counter = Counter()
        for s in gs.skipped:
            for r in sorted({shorten_reason(r) for r in s.reasons}):
                reasons[r] += 1
        prunable = prunable_channels(model, gs.groups)
        total = producer_channels(model)
        rec.update(groups=len(gs.groups), skipped=len(gs.skipped), skip_reasons=dict(reasons.most_common()),
                   opaque=dict(gs.opaque), prunable_channels=prunable, producer_channels=total,
                   prunable_fraction=round(prunable / total, 4) if total else None)
        if not gs.groups:
            macs, params = count(model, x)
            rec.update(status="no prunable groups", macs_before=macs, macs_after=macs, params_before=params,
                       params_after=params, macs_reduction=1.0, params_reduction=1.0, equivalent=None)
            return rec
        res = prune_channels(model, x, ratio=RATIO, criterion="l1", groups=gs)
        rec.update(macs_before=res.macs_before, macs_after=res.macs_after, params_before=res.params_before,
                   params_after=res.params_after, macs_reduction=round(res.macs_reduction, 4),
                   params_reduction=round(res.params_reduction, 4))
        y_c = run(res.model, x)
        y_m = run(mask_channels(model, gs, res.keep), x)
        if tuple(y_c.shape) != tuple(y_ref.shape):
            rec.update(status="wrong output shape", equivalent=False,
                       error=f"compact output {tuple(y_c.shape)} != original {tuple(y_ref.shape)}")
            return rec
        err = float((y_c - y_m).abs().max())
        scale = float(y_m.abs().max())
        ok = err <= RTOL * max(scale, 1e-12)
        rec.update(max_abs_err=err, output_scale=scale, equivalent=bool(ok))
        if not ok:
            rec["status"] = "not equivalent"
            rec["error"] = f"compact vs masked: max abs error {err:.3g} > {RTOL:g} x scale {scale:.3g}"
        elif res.macs_after >= res.macs_before:
            rec["status"] = "no reduction"
        else:
            rec["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        rec.update(status="error", error=one_line(exc), where=_where(exc))
    finally:
        rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


# ---------------------------------------------------------------------------------------------- Torch-Pruning
def _timm_attention_forward(self, x):
    """The attention forward of Torch-Pruning's timm ViT example (``reshape(B, N, -1)`` instead of C)."""
    import torch.nn.functional as F

    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    x = x.transpose(1, 2).reshape(B, N, -1)
    x = self.proj(x)
    x = self.proj_drop(x)
    return x


def _tp_prepare(model: nn.Module) -> dict:
    """``num_heads`` for the pruner, as Torch-Pruning's ViT examples set it."""
    num_heads = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            num_heads[m] = m.num_heads
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            num_heads[m.qkv] = m.num_heads
            if isinstance(m, coverage_models.Attention):  # timm Attention: the example's forward
                m.forward = types.MethodType(_timm_attention_forward, m)
        elif _hf_attention(m):  # transformers' self-attention: as its prune_bert.py / prune_vit.py examples
            for lin in _hf_attention(m):
                num_heads[lin] = m.num_attention_heads
    return num_heads


def _hf_attention(m: nn.Module) -> tuple[nn.Linear, ...]:
    """q, k, v of a transformers self-attention with ``num_attention_heads`` (BERT's query / key / value, or ViT's
    q_proj / k_proj / v_proj with ``head_dim``, key/value heads equal to the query heads); () otherwise."""
    if not isinstance(getattr(m, "num_attention_heads", None), int):
        return ()
    for names in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj")):
        lins = tuple(getattr(m, k, None) for k in names)
        if all(isinstance(lin, nn.Linear) for lin in lins) and len({lin.out_features for lin in lins}) == 1:
            return lins
    return ()


def _tp_finish(model: nn.Module, pruner) -> None:
    """Attribute updates Torch-Pruning's examples do after pruning (timm ViT heads, torchvision ViT)."""
    for m in model.modules():
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            m.num_heads = pruner.num_heads.get(m.qkv, m.num_heads)
            if hasattr(m, "head_dim"):
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        if _hf_attention(m):  # (the examples' updates after pruning)
            q = _hf_attention(m)[0]
            m.num_attention_heads = pruner.num_heads.get(q, m.num_attention_heads)
            for attr in ("attention_head_size", "head_dim"):
                if hasattr(m, attr):
                    setattr(m, attr, q.out_features // m.num_attention_heads)
            if hasattr(m, "all_head_size"):
                m.all_head_size = q.out_features
    if isinstance(model, coverage_models.TorchvisionViT):
        model.hidden_dim = model.conv_proj.out_channels


def _mask_plan(module, is_out: bool):
    """How to zero the removed channels of one TP dependency in the masked twin: ``(key, width, params)``
    with ``params`` a list of ``(param_name, dim)`` (``None`` for parameter-free nodes), or a string saying
    why it cannot be done. ``key`` names the sliced dimension ("out", "in", or "ch" for layers whose input
    and output channels are the same), ``width`` is its original size."""
    if isinstance(module, nn.Parameter):
        return "raw parameter"
    if not isinstance(module, nn.Module):
        return type(module).__name__
    if not [n for n, _ in module.named_parameters(recurse=False)]:
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups == 1:
            if is_out:
                return "out", module.out_channels, [("weight", 0), ("bias", 0)]
            return "in", module.in_channels, [("weight", 1)]
        if module.groups == module.in_channels == module.out_channels:
            return "ch", module.out_channels, [("weight", 0), ("bias", 0)]
        if is_out:  # grouped conv: output channels are rows whatever the groups
            return "out", module.out_channels, [("weight", 0), ("bias", 0)]
        return "in", module.in_channels, [("weight", "grouped_in")]
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        if module.groups != 1:
            return "grouped ConvTranspose"
        if is_out:
            return "out", module.out_channels, [("weight", 1), ("bias", 0)]
        return "in", module.in_channels, [("weight", 0)]
    if isinstance(module, nn.Linear):
        if is_out:
            return "out", module.out_features, [("weight", 0), ("bias", 0)]
        return "in", module.in_features, [("weight", 1)]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "ch", module.num_features, [("weight", 0), ("bias", 0)]
    return type(module).__name__


class _TwinPlan:
    """The removed channels of every sliced dimension, in the *original* numbering.

    Torch-Pruning gives each group's indices in the numbering of the model as it is when that group is
    pruned: a dimension shared by several groups (a layer after a concatenation) has already lost the
    channels of the groups pruned before, so the indices are mapped through the channels still alive."""

    def __init__(self):
        self.alive: dict[tuple[str, str], list[int]] = {}
        self.params: dict[tuple[str, str], list] = {}
        self.removed: dict[tuple[str, str], set[int]] = {}
        self.unchecked: set[str] = set()

    def add_group(self, group, pruner, names) -> None:
        import torch_pruning as tp

        pending: dict[tuple[str, str], set[int]] = {}
        for dep, idxs in group:
            target = dep.target.module
            how = _mask_plan(target, pruner.DG.is_out_channel_pruning_fn(dep.handler))
            if how is None:
                continue
            if isinstance(how, str):
                self.unchecked.add(how)
                continue
            side, width, params = how
            key = (names[id(target)], side)
            alive = self.alive.setdefault(key, list(range(width)))
            self.params[key] = params
            cur = [int(i) for i in tp._helpers.to_plain_idxs(idxs)]
            pending.setdefault(key, set()).update(alive[i] for i in cur)
        for key, orig in pending.items():
            self.removed.setdefault(key, set()).update(orig)
            self.alive[key] = [i for i in self.alive[key] if i not in orig]

    def apply(self, twin: nn.Module) -> None:
        with torch.no_grad():
            for (path, _side), idx in self.removed.items():
                mod = twin.get_submodule(path)
                index = torch.tensor(sorted(idx), dtype=torch.long)
                for pname, dim in self.params[(path, _side)]:
                    t = getattr(mod, pname, None)
                    if not isinstance(t, nn.Parameter):
                        continue
                    if dim == "grouped_in":  # input channel c: group c // cin_g, column c % cin_g
                        cin_g = mod.in_channels // mod.groups
                        cout_g = mod.out_channels // mod.groups
                        for c in index.tolist():
                            g = c // cin_g
                            t[g * cout_g:(g + 1) * cout_g, c % cin_g] = 0.0
                    else:
                        t.index_fill_(dim, index, 0.0)


def tp_side(model: nn.Module, x) -> dict:
    import torch_pruning as tp

    rec: dict = {"status": None, "error": None}
    t0 = time.perf_counter()
    try:
        model.eval()
        y_ref = run(model, x)
        macs0, params0 = count(model, x)
        rec.update(macs_before=macs0, params_before=params0)
        fname, fmod = final_layer(model)
        rec["ignored_layers"] = [fname]
        num_heads = _tp_prepare(model)
        twin = copy.deepcopy(model)
        names = {id(m): n for n, m in model.named_modules()}
        sink = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            pruner = tp.pruner.BasePruner(
                model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=RATIO,
                ignored_layers=[fmod], num_heads=num_heads,
            )
            plan = _TwinPlan()
            n_groups = 0
            for group in pruner.step(interactive=True):
                n_groups += 1
                plan.add_group(group, pruner, names)
                group.prune()
            _tp_finish(model, pruner)
        rec["groups_pruned"] = n_groups
        y = run(model, x)
        macs1, params1 = count(model, x)
        rec.update(macs_after=macs1, params_after=params1, macs_reduction=round(macs0 / max(macs1, 1), 4),
                   params_reduction=round(params0 / max(params1, 1), 4))
        if tuple(y.shape) != tuple(y_ref.shape):
            rec.update(status="wrong output shape", error=f"pruned output {tuple(y.shape)} != {tuple(y_ref.shape)}")
            return rec
        if n_groups == 0 or macs1 >= macs0 or params1 >= params0:
            rec.update(status="no reduction", error=f"{n_groups} groups pruned; MACs {macs0} -> {macs1}")
            return rec
        # masked twin
        if plan.unchecked:
            rec["equivalence"] = "unchecked: " + ", ".join(sorted(plan.unchecked))
            rec["status"] = "ok"
            return rec
        plan.apply(twin)
        y_m = run(twin, x)
        err = float((y - y_m).abs().max())
        scale = float(y_m.abs().max())
        ok = err <= RTOL * max(scale, 1e-12)
        rec.update(max_abs_err=err, output_scale=scale, equivalence="passed" if ok else "failed")
        if ok:
            rec["status"] = "ok"
        else:
            rec.update(status="not equivalent",
                       error=f"pruned vs masked twin: max abs error {err:.3g} > {RTOL:g} x scale {scale:.3g}")
    except Exception as exc:  # noqa: BLE001
        rec.update(status="error", error=one_line(exc), where=_where(exc))
    finally:
        rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


# ---------------------------------------------------------------------------------------------- driver
SIDES = {"netcarve": netcarve_side, "torch_pruning": tp_side}


def _child(conn, side: str, name: str, source: str) -> None:
    try:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        model, x = build(name, source)
        rec = SIDES[side](model, x)
    except BaseException as exc:  # noqa: BLE001
        rec = {"status": "error", "error": one_line(exc), "where": _where(exc)}
    conn.send(rec)
    conn.close()


def run_side(side: str, name: str, source: str, timeout: float | None) -> dict:
    """One side of one model; in a forked process with a timeout unless ``timeout`` is None."""
    if timeout is None:
        try:
            model, x = build(name, source)
            return SIDES[side](model, x)
        except Exception as exc:  # noqa: BLE001
            return {"status": "error", "error": one_line(exc), "where": _where(exc)}
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(child, side, name, source), daemon=True)
    proc.start()
    child.close()
    rec = None
    if parent.poll(timeout):
        try:
            rec = parent.recv()
        except EOFError:
            rec = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if rec is None:
        if time.perf_counter() - t0 >= timeout:
            rec = {"status": "timeout", "error": f"no result within {timeout:.0f} s"}
        else:
            rec = {"status": "error", "error": f"worker process died (exit code {proc.exitcode})"}
        rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def coverage_record(name: str, source: str, timeout: float | None = None) -> dict:
    """The coverage record of one model: both sides."""
    if source == "netcarve":
        ref, note = "netcarve.models", ""
        shape = None
    elif source == "huggingface":
        ref, note = f"transformers {_dist_version('transformers')}", coverage_hf.NOTES.get(name, "")
        shapes = coverage_hf.input_shapes(name)
        shape = list(shapes[0]) if len(shapes) == 1 else [list(sh) for sh in shapes]
    else:
        ref, note = coverage_models.SOURCES[name], coverage_models.NOTES[name]
        shapes = coverage_models.input_shapes(name)
        shape = list(shapes[0]) if len(shapes) == 1 else [list(s) for s in shapes]
    rec = {"model": name, "source": source, "reference": ref, "note": note, "input_shape": shape}
    if shape is None:
        # from the registry, not by building the model here: a parallel op in this process (a large model's init)
        # before forking the workers leaves their OpenMP pool deadlocked (vit_tiny_cifar's hung until the timeout)
        from netcarve.models import get_model_info

        try:
            rec["input_shape"] = list(get_model_info(name).input_shape)
        except Exception as exc:  # noqa: BLE001
            rec["input_shape"] = None
            rec["build_error"] = one_line(exc)
    rec["netcarve"] = run_side("netcarve", name, source, timeout)
    rec["torch_pruning"] = run_side("torch_pruning", name, source, timeout)
    return rec


def totals(results: list[dict]) -> dict:
    n = len(results)
    out = {"models": n}
    for side in SIDES:
        ok = [r for r in results if r[side].get("status") == "ok"]
        out[side] = {"ok": len(ok), "of": n, "by_source": {}}
        for src in dict.fromkeys(r["source"] for r in results):
            sub = [r for r in results if r["source"] == src]
            out[side]["by_source"][src] = {"ok": sum(r[side].get("status") == "ok" for r in sub), "of": len(sub)}
    out["netcarve"]["equivalent"] = sum(r["netcarve"].get("equivalent") is True for r in results)
    out["torch_pruning"]["equivalence_passed"] = sum(r["torch_pruning"].get("equivalence") == "passed"
                                                     for r in results)
    out["torch_pruning"]["equivalence_unchecked"] = sum(str(r["torch_pruning"].get("equivalence", "")).startswith(
        "unchecked") for r in results)
    return out


# ---------------------------------------------------------------------------------------------- output
# Known causes of failures, checked by hand on this list (side, model regex, "status error where" regex,
# explanation); the page shows the explanation next to the recorded error when both regexes match.
EXPLAIN = [
    ("torch_pruning", r"resnet(8|20|32|44|56|110)$", r"mat1 and mat2",
     "the CIFAR option-A shortcut zero-pads the channel dim (`F.pad`, width read at run time), which "
     "Torch-Pruning's dependency graph does not model: after pruning the widths no longer match at the "
     "classifier (resnet8, with 1x1-conv shortcuts, prunes fine)"),
    ("torch_pruning", r".", r"function\.py:\d+ \(prune_out_channels\)|AssertionError",
     "Torch-Pruning's LSTMPruner asserts `num_layers == 1` (torch_pruning/pruner/function.py): "
     "multi-layer LSTMs cannot be pruned"),
    ("torch_pruning", r"gru", r"no reduction",
     "Torch-Pruning's root layers are Conv, Linear and LSTM; a GRU is not one and the only Linear is the "
     "ignored classifier, so there is nothing to prune"),
    ("torch_pruning", r"shufflenet", r"update_reshape_index_mapping",
     "channel shuffle (view / transpose / view of the channel dim): Torch-Pruning's own torchvision "
     "example lists the ShuffleNetV2 models as unsupported (\"TODO: support channel shuffling\")"),
    ("torch_pruning", r"mixer", r"IndexError",
     "raised in its importance computation; 256 and 16 are the widths of the token-mixing MLP (a "
     "Linear(16 tokens, 256) applied after `transpose(1, 2)`), so the token-mixing path is the likely "
     "trigger; not investigated further"),
    ("torch_pruning", r"transformer_tiny", r"IndexError",
     "raised in its importance computation, with or without `num_heads` (checked by hand); the model has a "
     "Linear embedding plus a learned position-embedding parameter and a qkv reshape with head_dim derived "
     "at run time; not investigated further"),
]


def explain(side: str, rec: dict) -> str | None:
    s = rec[side]
    text = f"{s.get('status')} {s.get('error') or ''} {s.get('where') or ''}"
    for sd, model_re, err_re, why in EXPLAIN:
        if sd == side and re.search(model_re, rec["model"]) and re.search(err_re, text):
            return why
    return None


def _x(v) -> str:
    return f"{v:.2f}x" if isinstance(v, (int, float)) else "-"


def _pct(v) -> str:
    return f"{100 * v:.0f}%" if isinstance(v, (int, float)) else "-"


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        nc, tp_ = r["netcarve"], r["torch_pruning"]
        eq = {True: "passed", False: "FAILED", None: "-"}[nc.get("equivalent")]
        groups = f"{nc['groups']} / {nc['skipped']}" if "groups" in nc else "-"
        tpeq = tp_.get("equivalence", "-")
        if tpeq.startswith("unchecked"):
            tpeq = "unchecked"
        rows.append([r["model"], r["reference"] if r["source"] != "netcarve" else "netcarve zoo", nc["status"],
                     groups, _pct(nc.get("prunable_fraction")), _x(nc.get("macs_reduction")), eq,
                     tp_["status"], _x(tp_.get("macs_reduction")), tpeq])
    return rows


HEADER = ["model", "source", "netcarve", "groups / skipped", "prunable ch.", "MACs red.", "equivalence",
          "Torch-Pruning", "TP MACs red.", "TP masked twin"]


def print_table(results: list[dict]) -> None:
    rows = table_rows(results)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADER)] if rows else []
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _regenerate(results: list[dict], hidden: bool = False) -> list[str]:
    if hidden:
        hf = " --hf" if any(r["source"] == "huggingface" for r in results) else ""
        stem = "coverage-hf-hidden" if hf else "coverage-hidden"
        return [f"Regenerate: `python benchmarks/coverage.py{hf} --hidden-size --out benchmarks/results/{stem}.json "
                f"--markdown docs/{stem}.md`, or only this page from the JSON: `python benchmarks/coverage.py "
                f"--from-json benchmarks/results/{stem}.json --markdown docs/{stem}.md`."]
    if any(r["source"] == "huggingface" for r in results):
        return ["Regenerate (where transformers is installed): `python benchmarks/coverage.py --hf --markdown "
                "docs/coverage-hf.md`, or only this page from the JSON: `python benchmarks/coverage.py --from-json "
                "benchmarks/results/coverage-hf.json --markdown docs/coverage-hf.md`."]
    return ["Regenerate: `python benchmarks/coverage.py --markdown docs/coverage.md` (runs everything), or only this "
            "page from the JSON: `python benchmarks/coverage.py --from-json benchmarks/results/coverage.json "
            "--markdown docs/coverage.md`."]


def _hf_note(data: dict) -> list[str]:
    if not any(r["source"] == "huggingface" for r in data["results"]):
        return []
    return [f"* The Hugging Face architectures (`benchmarks/coverage_hf.py`, transformers {data.get('transformers')}) "
            "are built from small configs (random init), their example inputs given by forward argument name "
            "(`input_ids` + `attention_mask`, or `pixel_values`). torch.fx cannot trace them (transformers 5), so "
            "netcarve captures them with torch.export (`netcarve.graph.exported`). Torch-Pruning gets the dict as its "
            "`example_inputs` and, for self-attention with `num_attention_heads` and `query` / `key` / `value` (BERT) or "
            "`q_proj` / `k_proj` / `v_proj` (ViT, Llama) Linears of equal width, `num_heads` and the head-size updates "
            "of its `examples/hf_transformers/prune_bert.py` / `prune_vit.py` (`attention_head_size` or `head_dim`, "
            "`all_head_size`)."]


def to_markdown(data: dict) -> str:
    results, tot = data["results"], data["totals"]
    env = data["environment"]
    hf = any(r["source"] == "huggingface" for r in results)
    ln = ["# Pruning coverage: netcarve vs Torch-Pruning" + (" on Hugging Face transformers models" if hf else "")
          + (", netcarve with `hidden_size=True`" if data.get("hidden_size") else ""), "",
          "<!-- generated by benchmarks/coverage.py from benchmarks/results/coverage"
          + ("-hf" if hf else "") + ("-hidden" if data.get("hidden_size") else "") + ".json; do not edit by hand -->",
          "",
          f"Run: `{data['command']}` on {data['date']} ({env.get('cpu_model')}, {env.get('usable_cores')} cores, "
          f"torch {data['torch']}, torch-pruning {data['torch_pruning']}, netcarve {env.get('netcarve')}); "
          f"{data['seconds']:.0f} s in all.", "",
          *_regenerate(results, bool(data.get("hidden_size"))), "",
          "## Totals", "",
          f"**netcarve {tot['netcarve']['ok']}/{tot['models']}, Torch-Pruning {tot['torch_pruning']['ok']}/"
          f"{tot['models']}** (status `ok`)."]
    for src in tot["netcarve"]["by_source"]:
        label = SOURCES[src]
        a, b = tot["netcarve"]["by_source"][src], tot["torch_pruning"]["by_source"][src]
        ln.append(f"* {label}: netcarve {a['ok']}/{a['of']}, Torch-Pruning {b['ok']}/{b['of']}")
    ln.append(f"* compact == masked for netcarve on {tot['netcarve']['equivalent']} models; Torch-Pruning's "
              f"pruned model == its masked twin on {tot['torch_pruning']['equivalence_passed']} models "
              f"(unchecked on {tot['torch_pruning']['equivalence_unchecked']})")
    both = [r for r in results if r["netcarve"].get("status") == "ok" and r["torch_pruning"].get("status") == "ok"]
    fr = [r["netcarve"].get("prunable_fraction") or 0.0 for r in results if r["netcarve"].get("status") == "ok"]
    tp_more = [r["model"] for r in both
               if r["torch_pruning"]["macs_reduction"] > 1.1 * r["netcarve"]["macs_reduction"]]
    whole = [m for m in tp_more if next(r for r in results if r["model"] == m)["netcarve"].get("skipped", 0) <= 1]
    ln += ["", "`ok` means the tool prunes *something* correctly; how much of the model it reaches differs: of "
           f"the {len(fr)} models netcarve prunes, {sum(f >= 0.9 for f in fr)} have >= 90% of their "
           f"channel-creating outputs in prunable groups and {sum(f < 0.5 for f in fr)} less than 50% (column "
           f"*prunable ch.*). Of the {len(both)} models both prune, Torch-Pruning reaches a MAC reduction more "
           f"than 10% larger than netcarve's on {len(tp_more)}" + (f" ({', '.join(tp_more)})" if tp_more else "")
           + ": the groups netcarve skips (reasons below) are the difference"
           + (f", except on {', '.join(whole)}, where netcarve skips nothing but the classifier: there it keeps "
              "every grouped conv's width a multiple of its conv groups (the multiple nearest the ratio), while "
              "Torch-Pruning cuts the grouped convs deeper than the ratio asks (ResNeXt-50's 128-wide 32-group "
              "convs to 64 at ratio 0.3, checked by hand)." if whole else ".")]
    ln += ["", "## What is measured", "",
           f"Every model is built with random weights (seed 0) in eval mode, batch 1. Both tools remove "
           f"{RATIO:.0%} of the channels of every group they find (L1 magnitude).", "",
           "* **netcarve** `ok`: `build_channel_groups"
           + ("(model, x, hidden_size=True)` (the hidden size too: embeddings, LayerNorm / RMSNorm)"
              if data.get("hidden_size") else "`") + " finds at least one group, `prune_channels(model, x, "
           f"ratio={RATIO}, criterion=\"l1\")` runs, MACs drop, and the compact model's output equals "
           f"`mask_channels(model, groups, result.keep)`'s (max abs error <= {RTOL:g} x output scale). "
           "*groups / skipped*: prunable groups and producers left whole (reasons below). *prunable ch.*: "
           "output channels in prunable groups (a coupled group counts once per producer) over all output "
           "channels of channel-creating layers (non-depthwise convs, transposed convs, Linear incl. the "
           "classifier and attention projections, MHA q/k/v, recurrent hidden units, embeddings).",
           "* **Torch-Pruning** `ok`: its README recipe (`tp.pruner.BasePruner`, `MagnitudeImportance(p=1)`, "
           f"`pruning_ratio={RATIO}`, `ignored_layers=[classifier]`, `num_heads` for attention layers and the "
           "attribute updates of its ViT examples) runs, the pruned model runs with the original output shape, "
           "MACs and parameters drop, and, where a masked twin can be built, the pruned output equals it. "
           "*TP masked twin*: Torch-Pruning has no masked model, so the indices it removes (recorded from "
           "`step(interactive=True)`) are zeroed in a copy of the unpruned model (Conv/Linear rows or "
           "columns, depthwise rows, BatchNorm weight and bias) and the outputs compared with the same "
           "tolerance; `unchecked` where zeroing is not the same function as removal or is not implemented "
           "here (LayerNorm statistics, LSTM, attention, embeddings, raw parameters such as layer scales and "
           "position embeddings).",
           "* MACs and parameters of both come from `netcarve.measure.count_model` (hooks on modules: "
           "functional attention matmuls such as `F.scaled_dot_product_attention` are not counted).",
           "* The external architectures (`benchmarks/coverage_models.py`) are plain-PyTorch rewrites of the "
           "torchvision / timm / reference definitions (same layers, connections and forward code style; "
           "parameter counts of the full-size ones equal torchvision's), 64x64 inputs; shrunk ones are noted below.",
           *_hf_note(data), "", "## Results", "",
           "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in table_rows(results):
        ln.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    ln += ["", "MACs red. = MACs before / after (1.43x = 30% fewer).", "", "## Failures and partial coverage", ""]
    for side, label in (("netcarve", "netcarve"), ("torch_pruning", "Torch-Pruning")):
        ln += [f"### {label}", ""]
        bad = [r for r in results if r[side].get("status") != "ok"]
        if not bad:
            ln.append("No failures.")
        for r in bad:
            s = r[side]
            why = s.get("error") or ""
            if side == "netcarve" and s.get("status") == "no prunable groups":
                why = "every producer is skipped: " + "; ".join(f"{k} ({v})" for k, v in
                                                                 list(s.get("skip_reasons", {}).items())[:4])
            where = f" (raised at `{s['where']}`)" if s.get("where") else ""
            cause = explain(side, r)
            cause = f" Cause: {cause}." if cause else ""
            ln.append(f"* **{r['model']}**: `{s.get('status')}`: {why}{where}.{cause}")
        ln.append("")
    ln += ["### Skip reasons of netcarve (producers left whole, per model)", "",
           "The final classifier is always skipped (`reaches the model output`); other reasons mean channels "
           "netcarve cannot prune yet.", ""]
    for r in results:
        reasons = r["netcarve"].get("skip_reasons") or {}
        other = {k: v for k, v in reasons.items() if k != "reaches the model output"}
        if other:
            ln.append(f"* **{r['model']}** ({r['netcarve'].get('skipped')} skipped): "
                      + "; ".join(f"{k} x{v}" for k, v in other.items()))
    ln += ["", "### Torch-Pruning masked-twin checks left unchecked", ""]
    for r in results:
        eq = str(r["torch_pruning"].get("equivalence", ""))
        if eq.startswith("unchecked"):
            ln.append(f"* **{r['model']}**: {eq[len('unchecked: '):]}")
    ln += ["", "## External architectures", "", "| model | mirrors | input | size |", "|---|---|---|---|"]
    for r in results:
        if r["source"] != "netcarve":
            shape = r["input_shape"]  # (a list of shapes for a model of several inputs)
            shown = (" + ".join("x".join(map(str, s)) for s in shape) if shape and isinstance(shape[0], list)
                     else "x".join(map(str, shape)))
            ln.append(f"| {r['model']} | {r['reference']} | {shown} | {r['note']} |")
    ln.append("")
    return "\n".join(ln)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT.relative_to(HERE.parent)} "
                   f"({HF_OUT.relative_to(HERE.parent)} with --hf)")
    p.add_argument("--hf", action="store_true", help="the Hugging Face transformers architectures of coverage_hf.py "
                   "instead (needs transformers installed)")
    p.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    p.add_argument("--hidden-size", action="store_true",
                   help="netcarve also prunes the hidden size of transformers (embeddings, LayerNorm / RMSNorm)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model and side (0: no subprocess)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the markdown page here")
    p.add_argument("--from-json", type=Path, default=None, help="only render --markdown from this JSON")
    a = p.parse_args(argv)
    if a.from_json is not None:
        data = json.loads(a.from_json.read_text())
        print_table(data["results"])
        if a.markdown:
            a.markdown.write_text(to_markdown(data))
        return 0

    import torch_pruning as tp

    import netcarve  # noqa: F401
    from netcarve.measure import environment

    if a.out is None:
        a.out = HF_OUT if a.hf else DEFAULT_OUT
    global HIDDEN_SIZE
    HIDDEN_SIZE = bool(a.hidden_size)  # (the forked workers inherit it)
    names = model_names(a.hf)
    if a.models:
        wanted = [m.strip() for m in a.models.split(",") if m.strip()]
        known = {n for n, _ in names}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            p.error(f"unknown models: {', '.join(unknown)}")
        names = [(n, s) for n, s in names if n in wanted]
    timeout = a.timeout if a.timeout > 0 else None
    t0 = time.perf_counter()
    results = []
    for name, source in names:
        rec = coverage_record(name, source, timeout)
        results.append(rec)
        nc, tpr = rec["netcarve"], rec["torch_pruning"]
        print(f"[{time.perf_counter() - t0:6.0f}s] {name:<22} netcarve {nc['status']:<18} "
              f"{_x(nc.get('macs_reduction')):>6}  TP {tpr['status']:<18} {_x(tpr.get('macs_reduction')):>6}",
              flush=True)
    data = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 1),
        "ratio": RATIO,
        "rtol": RTOL,
        "hidden_size": HIDDEN_SIZE,
        "torch": torch.__version__,
        "torch_pruning": _dist_version("torch-pruning"),
        "torch_pruning_module_version": getattr(tp, "__version__", None),
        **({"transformers": _dist_version("transformers")} if a.hf else {}),
        "environment": environment(),
        "totals": totals(results),
        "results": results,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(data, indent=1) + "\n")
    print()
    print_table(results)
    t = data["totals"]
    print(f"\nnetcarve {t['netcarve']['ok']}/{t['models']}, Torch-Pruning {t['torch_pruning']['ok']}/{t['models']}"
          f"  ({data['seconds']:.0f} s; JSON: {a.out})")
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(to_markdown(data))
        print(f"markdown: {a.markdown}")
    return 0


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
