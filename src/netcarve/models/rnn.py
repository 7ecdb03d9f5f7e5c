"""LSTM / GRU sequence classifiers over (B, T, F) float sequences (batch first).

Default input: CIFAR-10 images read row by row (``cifar10-rows``: 32 steps x 96 features = 32 px x RGB).
The logits come from ``fc`` on a pooled summary of the top layer's outputs: ``pool="last"`` (default) takes
the last time step of the forward direction (and, when bidirectional, the first time step of the backward
direction, i.e. each direction's final state); ``pool="mean"`` averages the outputs over time; ``pool="state"``
reads the same features from the final state ``h_n`` (``h_n[-1]``, bidirectional ``cat(h_n[-2], h_n[-1])``),
the way many classifiers are written.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ._presets import CIFAR_PREPROCESS
from ._registry import register_model


class RNNClassifier(nn.Module):
    """``rnn`` (nn.LSTM or nn.GRU, batch_first) -> pool over time -> ``fc``."""

    def __init__(
        self,
        cell: str = "lstm",
        input_size: int = 96,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_classes: int = 10,
        bidirectional: bool = False,
        dropout: float = 0.0,
        pool: str = "last",
        seq_len: int = 32,
    ):
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ConfigError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        if pool not in ("last", "mean", "state"):
            raise ConfigError(f"pool must be 'last', 'mean' or 'state', got {pool!r}")
        self.input_shape = (seq_len, input_size)
        self.pool = pool
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            input_size, hidden_size, num_layers=num_layers, batch_first=True,
            bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0,
        )  # fmt: skip
        self.fc = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, F) -> out: (B, T, D*H) -> (B, num_classes)
        out, state = self.rnn(x)
        if self.pool == "state":
            h = state[0] if self.rnn.mode == "LSTM" else state  # (h_n, c_n); a StackedRNN too
            feat = torch.cat([h[-2], h[-1]], dim=-1) if self.rnn.bidirectional else h[-1]
        elif self.pool == "mean":
            feat = out.mean(dim=1)
        elif self.rnn.bidirectional:
            h = out.shape[-1] // 2
            feat = torch.cat([out[:, -1, :h], out[:, 0, h:]], dim=-1)
        else:
            feat = out[:, -1]
        return self.fc(feat)


_DEFAULTS = dict(
    family="rnn",
    input_shape=(32, 96),
    input_kind="sequence",
    dataset="cifar10-rows",
    preprocess=CIFAR_PREPROCESS,
)


@register_model("lstm", **_DEFAULTS)
def lstm(
    input_size: int = 96,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_classes: int = 10,
    bidirectional: bool = False,
    dropout: float = 0.0,
    pool: str = "last",
    seq_len: int = 32,
) -> RNNClassifier:
    """Multi-layer LSTM sequence classifier (default: CIFAR-10 rows, 32 steps x 96 features)."""
    return RNNClassifier(
        "lstm", input_size, hidden_size, num_layers, num_classes, bidirectional, dropout, pool, seq_len
    )


@register_model("gru", **_DEFAULTS)
def gru(
    input_size: int = 96,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_classes: int = 10,
    bidirectional: bool = False,
    dropout: float = 0.0,
    pool: str = "last",
    seq_len: int = 32,
) -> RNNClassifier:
    """Multi-layer GRU sequence classifier (default: CIFAR-10 rows, 32 steps x 96 features)."""
    return RNNClassifier(
        "gru", input_size, hidden_size, num_layers, num_classes, bidirectional, dropout, pool, seq_len
    )
