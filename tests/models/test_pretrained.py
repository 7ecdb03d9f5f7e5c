"""Real pretrained checkpoints from ../shared/data load and reach their published accuracy."""

from __future__ import annotations

import pytest
import torch

from netcarve.models import create_model, get_model_info

pytestmark = pytest.mark.data


def _accuracy(name: str, x: torch.Tensor, y: torch.Tensor, data_root) -> float:
    pp = get_model_info(name).preprocess
    x = x * pp["scale"]
    if "mean" in pp:
        x = (x - torch.tensor(pp["mean"])[:, None, None]) / torch.tensor(pp["std"])[:, None, None]
    model = create_model(name, pretrained=True, data_dir=str(data_root)).eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), 500):
            correct += (model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum().item()
    return 100.0 * correct / len(x)


# correct predictions among the first 500 test images (measured with torch 2.13 CPU)
FIRST_500 = {"resnet8": 445, "resnet20": 455, "resnet32": 466, "resnet44": 465, "resnet56": 470}


@pytest.mark.parametrize("name", sorted(FIRST_500))
def test_pretrained_first_500(name, require_data, cifar_test, data_root):
    require_data(*get_model_info(name).pretrained.values())
    x, y = cifar_test
    acc = _accuracy(name, x[:500], y[:500], data_root)
    assert acc == pytest.approx(100.0 * FIRST_500[name] / 500, abs=0.25)  # at most 1 image off


@pytest.mark.slow
@pytest.mark.parametrize(("name", "published"), [("resnet8", 87.19)])  # resnet20/56: tests/flows/test_evaluate.py
def test_pretrained_full_test_set(name, published, require_data, cifar_test, data_root):
    require_data(*get_model_info(name).pretrained.values())
    x, y = cifar_test
    assert _accuracy(name, x, y, data_root) == pytest.approx(published, abs=0.015)
