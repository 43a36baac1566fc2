import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """All crosscoder caches (conversions, synthetic pairs, demo models) go to a session temp dir."""
    d = tmp_path_factory.mktemp("crosscoder_cache")
    old = os.environ.get("CROSSCODER_CACHE_DIR")
    os.environ["CROSSCODER_CACHE_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("CROSSCODER_CACHE_DIR", None)
    else:
        os.environ["CROSSCODER_CACHE_DIR"] = old
