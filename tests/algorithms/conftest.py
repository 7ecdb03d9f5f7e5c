"""A small trained LeNet on the built-in digits data, shared by the algorithm tests."""

from __future__ import annotations

import copy

import pytest

from netcarve.data import make_loaders
from netcarve.models import create_model, example_input, get_model_info
from netcarve.train import TrainConfig, evaluate, fit
from netcarve.utils import seed_everything


def digits_loaders(seed: int = 0):
    return make_loaders("digits", get_model_info("lenet").preprocess, 64, subset=(480, 200), seed=seed)


@pytest.fixture(scope="session")
def trained_small_lenet():
    """LeNet with 16/32/32 channels trained 8 epochs on 480 digits; (model, baseline top-1)."""
    seed_everything(0)
    model = create_model("lenet", width=16)
    train, test = digits_loaders()
    fit(model, train, test, TrainConfig(epochs=8, batch_size=64, lr=0.1), progress=False)
    model.eval()
    return model, evaluate(model, test)["top1"]


@pytest.fixture
def lenet_job(trained_small_lenet):
    """Fresh loaders and a copy of the trained model for one algorithm run."""
    model, top1 = trained_small_lenet
    train, test = digits_loaders()
    return {"model": copy.deepcopy(model), "example_input": example_input(model, batch=2), "train_loader": train,
            "test_loader": test, "baseline_top1": top1}


@pytest.fixture
def new_loaders():
    """A factory of fresh (train, test) digits loaders, identical to the ones of ``lenet_job``."""
    return digits_loaders
