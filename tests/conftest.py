"""Shared test setup: `gpu` tests skip without CUDA, `distributed` tests skip without torchrun."""

import shutil

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_torchrun = pytest.mark.skip(reason="needs torchrun on PATH")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "distributed" in item.keywords and shutil.which("torchrun") is None:
            item.add_marker(no_torchrun)
