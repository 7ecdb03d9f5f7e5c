"""Layers netcarve builds when pruning gives a layer a shape torch.nn cannot express.

:class:`StackedRNN` replaces an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` whose layers (or directions) end up
with different hidden widths after pruning (torch's modules force one ``hidden_size`` for all of them).
:class:`HeadPrunedMultiheadAttention` replaces an ``nn.MultiheadAttention`` that lost heads (torch's module ties
``num_heads * head_dim`` to its input / output width ``embed_dim``).
Their layer specs are registered for :mod:`netcarve.serialize`, so a pruned model saves and loads as data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._layer_specs import register_layer_spec
from .errors import ConfigError

_RNN_CLASSES = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}


def rnn_cell(mode: str, input_size: int, hidden_size: int, *, bias: bool = True, batch_first: bool = False):
    """One single-layer, single-direction torch recurrent module of ``mode`` (an ``nn.RNNBase.mode``)."""
    if mode not in _RNN_CLASSES:
        raise ConfigError(f"unknown recurrent mode {mode!r}; expected one of {sorted(_RNN_CLASSES)}")
    kw = {"nonlinearity": "relu" if mode == "RNN_RELU" else "tanh"} if mode.startswith("RNN") else {}
    return _RNN_CLASSES[mode](input_size, hidden_size, 1, bias=bias, batch_first=batch_first, **kw)


class StackedRNN(nn.Module):
    """A multi-layer (bi)directional LSTM / GRU / RNN with a hidden width per layer and direction.

    Same computation as ``nn.LSTM(input_size, H, num_layers, bias, batch_first, dropout, bidirectional)``
    (``nn.GRU``, ``nn.RNN``) when every width equals ``H``: layer ``l`` reads the concatenation
    ``[forward | backward]`` of layer ``l - 1``'s outputs, dropout is applied between layers in training
    mode, and the backward direction runs on the time-reversed sequence. ``layers[l][d]`` is a
    single-layer torch module (its weights are named ``weight_ih_l0`` etc.).

    Returns ``(output, h_n)`` (GRU / RNN) or ``(output, (h_n, c_n))`` (LSTM) like torch, except that
    ``h_n`` / ``c_n`` are *tuples* of ``(batch, width)`` tensors, one per layer and direction in torch's
    order (``h_n[-1]`` is the last layer's last direction), since the widths differ. Initial states and
    ``PackedSequence`` inputs are not supported.

    Args:
        mode: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``.
        input_size: input features of layer 0.
        hidden_sizes: per layer, its width (int) or ``[forward, backward]`` widths when bidirectional.
    """

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_sizes: list,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
    ):
        super().__init__()
        dirs = 2 if bidirectional else 1
        sizes = [[int(h)] * dirs if isinstance(h, int) else [int(v) for v in h] for h in hidden_sizes]
        if not sizes or any(len(s) != dirs or min(s) < 1 for s in sizes):
            raise ConfigError(f"StackedRNN: hidden_sizes {hidden_sizes} must give {dirs} positive width(s) per layer")
        self.mode = mode
        self.input_size = int(input_size)
        self.hidden_sizes = sizes
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        layers, width = [], self.input_size
        for s in sizes:
            layers.append(nn.ModuleList(
                rnn_cell(mode, width, h, bias=self.bias, batch_first=self.batch_first) for h in s
            ))  # fmt: skip
            width = sum(s)
        self.layers = nn.ModuleList(layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def output_size(self) -> int:
        return sum(self.hidden_sizes[-1])

    def forward(self, x: torch.Tensor, hx=None):
        if hx is not None:
            raise NotImplementedError("StackedRNN does not take an initial state")
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise NotImplementedError("StackedRNN does not take a PackedSequence")
        tdim = 1 if (self.batch_first and x.dim() == 3) else 0
        hs, cs = [], []
        for i, dirs in enumerate(self.layers):
            if i and self.dropout and self.training:
                x = F.dropout(x, self.dropout, True)
            outs = []
            for d, cell in enumerate(dirs):
                o, state = cell(x.flip(tdim) if d else x)
                outs.append(o.flip(tdim) if d else o)
                if self.mode == "LSTM":
                    hs.append(state[0][0])
                    cs.append(state[1][0])
                else:
                    hs.append(state[0])
            x = torch.cat(outs, -1) if len(outs) > 1 else outs[0]
        if self.mode == "LSTM":
            return x, (tuple(hs), tuple(cs))
        return x, tuple(hs)

    def extra_repr(self) -> str:
        return (f"{self.mode}, {self.input_size}, hidden_sizes={self.hidden_sizes}, bias={self.bias}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}, bidirectional={self.bidirectional}")  # fmt: skip


register_layer_spec(
    StackedRNN,
    lambda m: dict(
        mode=m.mode,
        input_size=m.input_size,
        hidden_sizes=[list(s) for s in m.hidden_sizes],
        bias=m.bias,
        batch_first=m.batch_first,
        dropout=m.dropout,
        bidirectional=m.bidirectional,
    ),
)


class HeadPrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with ``num_heads * head_dim`` decoupled from ``embed_dim``: what pruning heads of
    a torch attention module leaves (``embed_dim`` in, ``embed_dim`` out, ``num_heads`` heads of ``head_dim``; after
    pruning a model's hidden size, ``out_dim`` out when the output projection's rows belong to another group).

    Same parameters (``in_proj_weight`` ``(3 * num_heads * head_dim, embed_dim)`` rows ``[q | k | v]``,
    ``in_proj_bias``, ``out_proj``) and the same call as ``nn.MultiheadAttention`` (``query, key, value,
    key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal``; batch-first or sequence-first;
    unbatched inputs), returning ``(output, weights or None)``. Not supported: ``kdim`` / ``vdim`` differing from
    ``embed_dim``, ``add_bias_kv``, ``add_zero_attn`` (such modules are not pruned), and a 3-D ``attn_mask`` must
    have ``batch * num_heads`` rows for the *kept* heads.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, out_dim: int | None = None):
        super().__init__()
        out_dim = embed_dim if out_dim is None else out_dim
        if min(embed_dim, num_heads, head_dim, out_dim) < 1:
            raise ConfigError(f"HeadPrunedMultiheadAttention: embed_dim={embed_dim}, num_heads={num_heads}, "
                              f"head_dim={head_dim}, out_dim={out_dim} must be positive")
        self.embed_dim, self.num_heads, self.head_dim = int(embed_dim), int(num_heads), int(head_dim)
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        inner = self.num_heads * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, self.embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, int(out_dim), bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        # read by nn.TransformerEncoderLayer / nn.TransformerEncoder before their fused fast paths, which assume
        # num_heads * head_dim == embed_dim: False keeps them on the regular path, which calls this module
        self._qkv_same_embed_dim = False

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): one sequence
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        tq, n, e = query.shape
        tk = key.shape[0]
        if e != self.embed_dim or key.shape[-1] != e or value.shape[-1] != e:
            raise ConfigError(f"HeadPrunedMultiheadAttention: expected embed_dim {self.embed_dim}, got query / key / "
                              f"value widths {e} / {key.shape[-1]} / {value.shape[-1]}")
        h, hd = self.num_heads, self.head_dim
        inner = h * hd
        w, b = self.in_proj_weight, self.in_proj_bias
        q, k, v = (F.linear(t, w[i * inner:(i + 1) * inner], None if b is None else b[i * inner:(i + 1) * inner])
                   for i, t in enumerate((query, key, value)))
        q = q.reshape(tq, n * h, hd).transpose(0, 1) * (1.0 / math.sqrt(hd))
        k = k.reshape(tk, n * h, hd).transpose(0, 1)
        v = v.reshape(tk, n * h, hd).transpose(0, 1)
        mask = None
        if attn_mask is not None:
            mask = self._additive(attn_mask, q.dtype)
            if mask.dim() == 2:
                mask = mask.unsqueeze(0)
            elif mask.shape[0] != n * h:
                raise ConfigError(f"HeadPrunedMultiheadAttention: a 3-D attn_mask needs batch * num_heads = {n * h} "
                                  f"rows (the kept heads), got {mask.shape[0]}")
        elif is_causal:
            mask = torch.full((1, tq, tk), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        if key_padding_mask is not None:
            kp = self._additive(key_padding_mask, q.dtype).view(n, 1, 1, tk).expand(n, h, 1, tk).reshape(n * h, 1, tk)
            mask = kp if mask is None else mask + kp
        scores = torch.bmm(q, k.transpose(1, 2))
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = torch.bmm(attn, v).transpose(0, 1).reshape(tq, n, inner)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = attn.view(n, h, tq, tk)
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, (weights.squeeze(0) if unbatched else weights)

    @staticmethod
    def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"dropout={self.dropout}, bias={self.in_proj_bias is not None}, batch_first={self.batch_first}")


register_layer_spec(
    HeadPrunedMultiheadAttention,
    lambda m: dict(embed_dim=m.embed_dim, num_heads=m.num_heads, head_dim=m.head_dim, dropout=m.dropout,
                   bias=m.in_proj_bias is not None, batch_first=m.batch_first,
                   **({"out_dim": m.out_proj.out_features} if m.out_proj.out_features != m.embed_dim else {})),
)


def keep_encoders_off_nested(model: nn.Module) -> nn.Module:
    """Turn off the nested-tensor path of every ``nn.TransformerEncoder`` in ``model`` with a
    :class:`HeadPrunedMultiheadAttention` (or a norm other than ``nn.LayerNorm``: a masked twin) in its layers, set
    every ``nn.Transformer``'s ``d_model`` to its layers' width (after its hidden size was pruned), and return
    ``model``.

    Given a key padding mask in eval mode, ``nn.TransformerEncoder`` runs its layers on nested tensors whatever their
    attention modules are; the fused layer path that expects them is off for a head-pruned one, whose regular path
    reads padded tensors. Called after pruning heads and by :func:`netcarve.load`; the outputs are the same, except
    the padded positions, which are then computed instead of zero.
    """
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), HeadPrunedMultiheadAttention)
                or any(not isinstance(getattr(layer, n, None), nn.LayerNorm) for n in ("norm1", "norm2"))
                for layer in m.layers):  # fmt: skip
            m.use_nested_tensor = False
        if isinstance(m, nn.Transformer) and len(m.encoder.layers):  # (its forward checks both inputs' width)
            m.d_model = int(m.encoder.layers[0].self_attn.embed_dim)
    return model
