"""Channel importance criteria: ``score(group, model) -> Tensor[num_channels]`` (higher = keep).

Built-in criteria, computed per :class:`~netcarve.graph.ChannelGroup` by aggregating over every layer of
the group (the layers' current weights in ``model``). For a coupled residual group (several producers
whose outputs are added) that means every producer, pass-through layer and consumer of the whole chain;
parameter-free members (option-A shortcuts) contribute nothing:

``l1``
    Sum over the group's layers of the absolute values of every *weight* element tied to channel ``c``:
    the producer's output-channel row (``weight[c]``), a depthwise conv's filter ``c`` (or the tensors a
    custom handler lists), and every consumer's input-channel columns (``weight[:, c]``; for a Linear
    after ``flatten``, the ``H*W`` columns of channel ``c``). Biases and BatchNorm parameters are not
    part of magnitude scores (BN scale is ``bn_scale``'s job).
``l2``
    Euclidean norm of the same elements (``sqrt`` of the sum of their squares over all layers).
``fpgm``
    Filter Pruning via Geometric Median (He et al., 2019): channel ``c``'s vector is the concatenation of
    the elements ``l2`` uses; its score is the sum of Euclidean distances to every other channel's vector.
    Channels near the geometric median (redundant) score lowest and are pruned first. Deterministic.
``taylor``
    First-order Taylor importance (Molchanov et al., 2019): ``|sum(weight * grad)|`` over every trainable
    parameter element tied to channel ``c``: the producer's output-channel weight row and bias, the
    pass-through layers' parameters (BatchNorm gamma and beta, depthwise filters and bias, PReLU slopes)
    and the consumers' input-channel weight columns (BN running statistics are buffers, not used). It
    reads ``.grad``: run a backward pass on a few batches first, e.g. with
    :func:`accumulate_gradients`; without gradients it raises :class:`~netcarve.errors.ConfigError`.
    The function carries ``needs_gradients = True``.
``bn_scale``
    ``|gamma_c|`` of the group's affine BatchNorm; with several BNs in one group (MobileNetV2 hidden
    channels: after the expand and the depthwise conv), the sum of their ``|gamma_c|``. A group without
    an affine BatchNorm raises :class:`~netcarve.errors.ConfigError`.
``random``
    Uniform random scores, deterministic for a given ``seed`` keyword (default 0) and group name.

For **module-internal groups** (recurrent hidden units, attention heads) the elements tied to a unit are
its rows in every section of the declaring tensors (the 4 LSTM / 3 GRU gate blocks of ``weight_ih`` and
``weight_hh``, the q/k/v sections of a fused projection; ``head_dim`` rows per head) and its input columns
(``weight_hh``'s recurrent column, the next layer's ``weight_ih`` column, the output projection's
``head_dim`` columns, a Linear after the RNN): ``l1``/``l2``/``fpgm``/``taylor`` use them like any slot
(biases only for ``taylor``); ``bn_scale`` raises its ConfigError since such groups hold no BatchNorm.

Register another criterion with ``register_criterion("name")`` on a function ``fn(group, model)``.
"""

from .builtin import bn_scale, fpgm, l1, l2, random_scores, taylor
from .gradients import accumulate_gradients
from .registry import (
    Criterion,
    channel_rows,
    get_criterion,
    list_criteria,
    register_criterion,
    resolve_criterion,
    score_group,
)

__all__ = [
    "Criterion",
    "accumulate_gradients",
    "bn_scale",
    "channel_rows",
    "fpgm",
    "get_criterion",
    "l1",
    "l2",
    "list_criteria",
    "random_scores",
    "register_criterion",
    "resolve_criterion",
    "score_group",
    "taylor",
]
