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


def require_chromium() -> str:
    """Headless Chromium for the HTML report's browser checks. Missing, the calling test is skipped with
    the reason, except under CI (``CI`` set and not ``0``/``false``, as ``.ci/run`` runs, which installs
    it): there a missing browser fails the test instead of silently dropping the checks."""
    from crosscoder.analysis.browser import find_chromium
    from crosscoder.errors import CrossCoderError

    try:
        return find_chromium()
    except CrossCoderError as e:
        reason = f"{e}: the HTML report's checks in headless Chromium (page errors, table, screenshot)"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI is set and {reason} cannot run", pytrace=False)
        pytest.skip(f"{reason} are skipped outside CI")
