import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/user_models.py as `user_models`

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none visible to torch")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
