"""BatchTopK's global selection across ranks equals the single-process selection, for both selection
methods (host-assisted threshold on CPU; sync-free topk + mask as on CUDA)."""

import pytest
import torch

from crosscoder.config import CrossCoderConfig
from crosscoder.model import CrossCoder, StepInput


class FakeDist:
    """Stands in for two ranks: all_gather_cat returns the candidates both ranks sent."""

    world_size = 2

    def __init__(self):
        self.sent = []

    def all_gather_cat(self, t):
        return torch.cat(self.sent)


@pytest.mark.parametrize("method", ["threshold", "topk"])
def test_union_of_rank_selections_is_the_global_selection(method):
    g = torch.Generator().manual_seed(0)
    b, h, k = 64, 256, 4
    pre = torch.randn(b, h, generator=g)
    w = torch.rand(h, generator=g) + 0.5
    arch = CrossCoder(CrossCoderConfig(arch="batchtopk", d_latent=h, k=k, d_model=4)).arch
    local, fake = StepInput(), FakeDist()
    on_two_ranks = StepInput(dist=fake)
    flat, scores, kept, mask = arch.select_batch(pre, w, k * b, method, local)  # one process
    assert mask is None and flat.numel() == k * b
    single = set(flat.tolist())
    halves = (pre[: b // 2], pre[b // 2 :])
    # each rank's local top n_global candidates, padded to n_global, as select_batch sends them
    for half in halves:
        _, sc, _, _ = arch.select_batch(half, w, k * b, method, local)
        padded = torch.full((k * b,), -1.0)
        padded[: sc.numel()] = sc
        fake.sent.append(padded)
    union, kept_all = set(), None
    for r, half in enumerate(halves):
        f, sc, kept_r, m = arch.select_batch(half, w, k * (b // 2), method, on_two_ranks)
        if m is not None:  # topk method: all candidates returned, the mask marks the kept ones
            f = f[m > 0]
        union |= {int(i) + r * (b // 2) * h for i in f.tolist()}
        kept_all = kept_r
    assert union == single
    assert float(kept_all[kept_all > 0].min()) == pytest.approx(float(scores[scores > 0].min()))
