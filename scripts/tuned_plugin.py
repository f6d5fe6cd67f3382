"""pytest plugin: run the tests with the tiles that ``scripts/gpu_tune.py`` chose (before they are
committed to ``ops.CONFIGS``), so one GPU call can tune and then check the tuned kernels.

    TUNED_CONFIGS=$OUT/tuned.json python3 -m pytest -p tuned_plugin ...   (scripts/ on PYTHONPATH)
"""

import json
import os


def pytest_configure(config):
    path = os.environ.get("TUNED_CONFIGS")
    if not path or not os.path.exists(path):
        return
    from sparse_transformer.attention.triton import ops

    with open(path) as f:
        for role, cfg in json.load(f).items():
            if role == "SHORT_RUN_TILES":
                ops.SHORT_RUN_TILES = cfg
            else:  # as ops.CONFIGS lays them out: head dims 16 and 32 share the 64 tiles
                for d in (16, 32, 64):
                    ops.CONFIGS[role][d] = tuple(cfg)
