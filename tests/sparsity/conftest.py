import pytest
import torch
from _sparsity_helpers import TinyCNN, make_data


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture
def loader():
    return make_data()
