"""netcarve.models.weights: file formats, strict key/shape checking, data-root resolution, tags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from netcarve.errors import CheckpointError, ConfigError, DataError
from netcarve.models import create_model
from netcarve.models.weights import load_pretrained, load_weights


def _randomized(name: str, seed: int = 0, **kwargs):
    """A model whose BN stats are not at their defaults, so a load is visible."""
    torch.manual_seed(seed)
    m = create_model(name, **kwargs)
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v) * 0.1)
    return m.eval()


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_akamaster_style_th_roundtrip(tmp_path):
    """{'state_dict': {'module.' + key: tensor}, 'best_prec1': float} without num_batches_tracked."""
    src = _randomized("resnet20")
    sd = {f"module.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "akamaster_resnet20.th"
    torch.save({"state_dict": sd, "best_prec1": 91.78}, path)
    dst = load_weights(create_model("resnet20"), path)
    _same(src, dst)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst.eval()(x), src(x))


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_plain_state_dict_roundtrip(tmp_path, suffix):
    src = _randomized("lenet")
    path = tmp_path / f"w{suffix}"
    torch.save(src.state_dict(), path)
    _same(src, load_weights(create_model("lenet"), path))


def test_safetensors_roundtrip(tmp_path):
    src = _randomized("transformer_tiny")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    _same(src, load_weights(create_model("transformer_tiny"), path))


def test_plain_npz_roundtrip(tmp_path):
    src = _randomized("gru")
    path = tmp_path / "w.npz"
    np.savez(path, **{k: v.numpy() for k, v in src.state_dict().items()})
    _same(src, load_weights(create_model("gru"), path))


def test_keras_npz_layout_conversion(tmp_path):
    """Keras HWIO conv kernels and (in, out) dense kernels are transposed into PyTorch layout."""
    src = _randomized("resnet8")
    sd = src.state_dict()
    back = {
        "weight": "kernel",
        "bias": "bias",
        "running_mean": "moving_mean",
        "running_var": "moving_variance",
    }
    arrays = {}
    for keras_layer, mod in src.keras_layer_map.items():
        for tparam, kparam in back.items():
            key = f"{mod}.{tparam}"
            if key not in sd:
                continue
            t = sd[key]
            if "batch_normalization" in keras_layer and tparam in ("weight", "bias"):
                kparam = {"weight": "gamma", "bias": "beta"}[tparam]
            elif t.ndim == 4:
                t = t.permute(2, 3, 1, 0)  # OIHW -> HWIO
            elif t.ndim == 2:
                t = t.t()
            arrays[f"{keras_layer}/{kparam}"] = t.contiguous().numpy()
    assert arrays["conv2d_3/kernel"].shape == (3, 3, 16, 32) and arrays["dense/kernel"].shape == (64, 10)
    path = tmp_path / "keras.npz"
    np.savez(path, **arrays)
    _same(src, load_weights(create_model("resnet8"), path))


def test_keras_npz_needs_layer_map(tmp_path):
    path = tmp_path / "keras.npz"
    np.savez(path, **{"conv2d/kernel": np.zeros((3, 3, 1, 32), np.float32)})
    with pytest.raises(CheckpointError, match="keras_layer_map"):
        load_weights(create_model("lenet"), path)


def test_shape_mismatch_lists_keys_and_shapes(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(create_model("resnet20", num_classes=100).state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_weights(create_model("resnet20"), path)
    msg = str(e.value)
    assert str(path) in msg and "linear.weight" in msg and "(100, 64)" in msg and "(10, 64)" in msg


def test_missing_and_unexpected_keys(tmp_path):
    sd = create_model("resnet20").state_dict()
    sd.pop("layer1.0.conv1.weight")
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "r20.pt"
    torch.save(sd, path)
    with pytest.raises(
        CheckpointError, match=r"missing key.*layer1\.0\.conv1\.weight.*unexpected key.*extra"
    ):
        load_weights(create_model("resnet20"), path)


def test_wrong_architecture_is_rejected(tmp_path):
    path = tmp_path / "r32.pt"
    torch.save(create_model("resnet32").state_dict(), path)
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_weights(create_model("resnet20"), path)


@pytest.mark.parametrize("suffix", [".th", ".pt", ".safetensors", ".npz"])
def test_corrupt_file_names_the_file(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"\x80\x02 this is not a weights file" * 7)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(create_model("lenet"), path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(create_model("lenet").state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=str(path)):
        load_weights(create_model("lenet"), path)


def test_non_state_dict_pickle(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_weights(create_model("lenet"), path)


def test_missing_file():
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(create_model("lenet"), "/nonexistent/w.pt")


def _fake_akamaster_root(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    src = _randomized("resnet20", seed=1)
    root = tmp_path / "data"
    (root / "pretrained").mkdir(parents=True)
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": sd}, root / "pretrained" / "akamaster_resnet20-12fca82f.th")
    return root, src


@pytest.mark.parametrize("pretrained", [True, "akamaster"])
def test_create_model_pretrained_tag(tmp_path, pretrained):
    root, src = _fake_akamaster_root(tmp_path)
    _same(src, create_model("resnet20", pretrained=pretrained, data_dir=str(root)))


def test_pretrained_from_env(tmp_path, monkeypatch):
    root, src = _fake_akamaster_root(tmp_path)
    monkeypatch.setenv("NETCARVE_DATA", str(root))
    _same(src, create_model("resnet20", pretrained=True))


def test_pretrained_as_path(tmp_path):
    root, src = _fake_akamaster_root(tmp_path)
    path = root / "pretrained" / "akamaster_resnet20-12fca82f.th"
    _same(src, create_model("resnet20", pretrained=str(path)))


def test_pretrained_tag_file_absent(tmp_path):
    (tmp_path / "pretrained").mkdir()
    with pytest.raises(CheckpointError, match="akamaster_resnet20"):
        create_model("resnet20", pretrained=True, data_dir=str(tmp_path))


def test_pretrained_errors():
    with pytest.raises(ConfigError, match="resnet110.*no pretrained"):
        create_model("resnet110", pretrained=True)
    with pytest.raises(ConfigError, match="akamaster"):
        create_model("resnet20", pretrained="imagenet")


def test_pretrained_without_data_root_is_a_clear_error(tmp_path, monkeypatch):
    from netcarve import paths

    monkeypatch.delenv("NETCARVE_DATA", raising=False)
    monkeypatch.setattr(paths, "_search_starts", lambda: [tmp_path / "nowhere"])
    with pytest.raises(DataError, match="NETCARVE_DATA"):
        load_pretrained(create_model("resnet20"), "resnet20", True)
