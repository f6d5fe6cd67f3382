"""Shared test setup: `gpu` tests skip without CUDA, `distributed` tests without torch.distributed."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_dist = pytest.mark.skip(reason="needs torch.distributed")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "distributed" in item.keywords and not torch.distributed.is_available():
            item.add_marker(no_dist)
