"""Masks as parametrizations: the module computes with the masked weight, training cannot revive zeros,
masks are in checkpoints, squash leaves dense weights with zeros under the model's own keys."""

import pytest
import torch
from torch import nn

from netcarve.errors import ConfigError
from netcarve.sparsity import apply_masks, get_masks, mask_stats, masks_from_zeros, squash


def _rand_mask(shape, density=0.4, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


def test_forward_uses_masked_weight_and_squash_keeps_keys(tiny_cnn):
    x = torch.randn(4, 3, 8, 8)
    keys = set(tiny_cnn.state_dict())
    m = _rand_mask(tiny_cnn[3].weight.shape)
    ref = TinyCNNCopy(tiny_cnn)
    with torch.no_grad():
        ref[3].weight.mul_(m)
    apply_masks(tiny_cnn, {"3.weight": m})
    tiny_cnn.eval(), ref.eval()
    assert torch.allclose(tiny_cnn(x), ref(x), atol=1e-6)
    assert "3.parametrizations.weight.0.mask" in tiny_cnn.state_dict()
    got = get_masks(tiny_cnn)
    assert set(got) == {"3.weight"} and torch.equal(got["3.weight"], m)
    squash(tiny_cnn)
    assert set(tiny_cnn.state_dict()) == keys
    assert torch.equal(tiny_cnn[3].weight != 0, m)
    assert torch.allclose(tiny_cnn(x), ref(x), atol=1e-6)
    assert get_masks(tiny_cnn) == {}


def TinyCNNCopy(model):
    import copy

    return copy.deepcopy(model)


def test_optimizer_with_momentum_and_weight_decay_does_not_revive_zeros(tiny_cnn, loader):
    m = _rand_mask(tiny_cnn[0].weight.shape, 0.3)
    apply_masks(tiny_cnn, {"0.weight": m})
    opt = torch.optim.SGD(tiny_cnn.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    for x, y in loader:
        loss = nn.functional.cross_entropy(tiny_cnn(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = tiny_cnn[0].weight
    assert bool((w[~m] == 0).all()) and bool((w[m] != 0).all())


def test_mask_update_in_place_and_shape_errors(tiny_cnn):
    w = tiny_cnn[3].weight
    apply_masks(tiny_cnn, {"3.weight": _rand_mask(w.shape, 0.5, 1)})
    m2 = _rand_mask(w.shape, 0.2, 2)
    apply_masks(tiny_cnn, {"3.weight": m2})  # updates the buffer, no second parametrization
    assert len(tiny_cnn[3].parametrizations.weight) == 1
    assert torch.equal(get_masks(tiny_cnn)["3.weight"], m2)
    with pytest.raises(ConfigError, match="shape"):
        apply_masks(tiny_cnn, {"3.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="no module"):
        apply_masks(tiny_cnn, {"nope.weight": m2})


def test_checkpoint_state_dict_round_trip(tiny_cnn):
    m = _rand_mask(tiny_cnn[6].weight.shape)
    apply_masks(tiny_cnn, {"6.weight": m})
    sd = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    from _sparsity_helpers import TinyCNN

    torch.manual_seed(1)
    other = TinyCNN()
    apply_masks(other, {"6.weight": torch.ones_like(m)})  # same structure, then the checkpoint restores the mask
    other.load_state_dict(sd, strict=True)
    assert torch.equal(get_masks(other)["6.weight"], m)
    x = torch.randn(2, 3, 8, 8)
    other.eval(), tiny_cnn.eval()
    assert torch.equal(other(x), tiny_cnn(x))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_and_attention_weights(cell):
    torch.manual_seed(0)
    rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(6, 8, num_layers=2, batch_first=True, bidirectional=True)
    ref = TinyCNNCopy(rnn)
    names = [n for n in rnn._flat_weights_names if n.startswith("weight")]
    masks = {n: _rand_mask(getattr(rnn, n).shape, 0.3, i) for i, n in enumerate(names)}
    with torch.no_grad():
        for n, m in masks.items():
            getattr(ref, n).mul_(m)
    apply_masks(rnn, masks)
    x = torch.randn(3, 5, 6)
    assert torch.allclose(rnn(x)[0], ref(x)[0], atol=1e-6)
    squash(rnn)
    assert torch.allclose(rnn(x)[0], ref(x)[0], atol=1e-6)  # _flat_weights follow the squashed weights
    assert all(torch.equal(v, masks[k]) for k, v in masks_from_zeros(rnn, names).items())


def test_multihead_attention_in_proj():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    ref = TinyCNNCopy(mha)
    m = _rand_mask(mha.in_proj_weight.shape, 0.3)
    with torch.no_grad():
        ref.in_proj_weight.mul_(m)
    apply_masks(mha, {"in_proj_weight": m})
    x = torch.randn(2, 5, 16)
    for mode in (True, False):  # train path and eval (fast path) must both use the masked weight
        mha.train(mode), ref.train(mode)
        with torch.no_grad():
            assert torch.allclose(mha(x, x, x)[0], ref(x, x, x)[0], atol=1e-5)


def test_mask_stats():
    s = mask_stats({"a": torch.tensor([True, False, False, False]), "b": torch.ones(4, dtype=torch.bool)})
    assert s["a"]["sparsity"] == 0.75 and s["b"]["sparsity"] == 0.0
    assert s["total"] == {"numel": 8, "nonzero": 5, "sparsity": 1 - 5 / 8}
