"""Layers netcarve builds when pruning gives a layer a shape torch.nn cannot express.

:class:`StackedRNN` replaces an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` whose layers (or directions) end up
with different hidden widths after pruning (torch's modules force one ``hidden_size`` for all of them).
Its layer spec is registered for :mod:`netcarve.serialize`, so a pruned model saves and loads as data.
"""

from __future__ import annotations

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
