"""The n-model planted preset (`crosscoder synth --preset multi`) and pattern recovery."""

import hashlib
import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from crosscoder.analysis.recovery import (
    format_pattern_recovery,
    latent_patterns,
    pattern_recovery,
    planted_cosines,
)
from crosscoder.cli import main
from crosscoder.config import CrossCoderConfig
from crosscoder.data.paired import PairedCache
from crosscoder.data.synthetic import (
    MULTI_PRESETS,
    PRESETS,
    GroundTruth,
    SyntheticConfig,
    generate,
    plant,
    preset_config,
)
from crosscoder.data.synthetic_config import auto_subsets, parse_subsets
from crosscoder.errors import ConfigError
from crosscoder.model import CrossCoder

# sha256 of (rows, vectors, freq, offset) of every two-model preset at d_model 16, 2000 rows in chunks of
# 700, computed with the generator before the n-model preset existed: n_models 2 must stay bit-identical.
TWO_MODEL_SHA = {
    "default": "1c8dda837ab0db44f2c285d060342cf7e7425736a8ab3f3626efa3444c2ae9a5",
    "offset": "12d2d18757b81a05b3122bebc040486753302dfb8c34446890e6fe40df30f712",
    "norm_gap": "1f12b423841e6c2da93112ebd925cbdb53528aaa834c36afd8c871ae2a0a8d60",
    "crowded": "38d8418e441c32b2f31ba588332ce5fc08a8bdf24fbb31cfdb7589f6c302b225",
    "correlated": "d064bd44afe3d96a3d6ff2fd74c1daab07f81e1e1abafd7333650fc578873299",
    "mixed": "c7e07cdc1c84b23e4c543603719cec8d3f0300b6840d2dd6de11d39b8d58df67",
}


@pytest.mark.parametrize("name", list(TWO_MODEL_SHA))
def test_two_model_presets_generate_the_same_rows_as_before(name):
    gt, chunks = generate(preset_config(name, d_model=16), 2000, chunk=700)
    x = torch.cat(list(chunks))
    h = hashlib.sha256(x.numpy().tobytes())
    for t in (gt.vectors(), gt.freq, gt.offset):
        h.update(t.numpy().tobytes())
    assert h.hexdigest() == TWO_MODEL_SHA[name]
    assert gt.n_models == 2 and set(gt.patterns) <= {"0", "1", "0+1"}
    assert [p for p, c in zip(gt.patterns, gt.classes, strict=True) if c == "base_only"] == ["0"] * (
        gt.config.n_base_only
    )


def test_subsets():
    assert auto_subsets(3) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]  # every proper subset
    assert auto_subsets(4) == [
        *[(i,) for i in range(4)],
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 2),
        (1, 3),
        (2, 3),
        (0, 1, 2),
        (1, 2, 3),
    ]
    assert len(auto_subsets(8)) == 28 and all(0 < len(s) < 8 for s in auto_subsets(8))
    assert parse_subsets("1+2+3, 0+1:5", 4, 7) == [((0, 1), 5), ((1, 2, 3), 7)]
    for spec, msg in (("0+4", "outside 0..3"), ("0+1,1+0", "given twice"), ("a+b", "bad entry")):
        with pytest.raises(ConfigError, match=f"^subsets: .*{msg}"):
            preset_config("multi", subsets=spec)
    with pytest.raises(ConfigError, match="^n_models: must be in 2..8"):
        preset_config("multi", n_models=9)


def test_multi_preset_ground_truth():
    cfg = preset_config("multi")
    assert "multi" in MULTI_PRESETS and "multi" not in PRESETS and cfg.n_models == 4 and cfg.d_model == 64
    gt = plant(cfg)
    m = cfg.n_models
    assert gt.dirs.shape == (224, m, 64) and gt.strength.shape == (224, m) and gt.offset.shape == (m, 64)
    assert Counter(gt.classes) == {"shared": 64, "shared_weak": 16, "exclusive": 48, "subset": 96}
    pats = Counter(gt.patterns)
    assert pats["0+1+2+3"] == 80 and len(pats) == 13
    assert all(pats["+".join(map(str, s))] == 12 for s in auto_subsets(4))
    # per model about as many features as the two-model presets (default 144, crowded 208)
    assert (gt.strength > 0).sum(0).tolist() == [140, 152, 152, 140]
    # directions: unit where present, zero where absent; the recorded patterns are the non-zero models
    norms = gt.dirs.norm(dim=-1)
    present = gt.strength > 0
    assert torch.allclose(norms[present], torch.ones(int(present.sum())), atol=1e-5)
    assert torch.all(norms[~present] == 0)
    assert gt.patterns == ["+".join(str(i) for i in range(m) if present[f, i]) for f in range(224)]
    # drift: consecutive models' directions are shared_drift apart (a random walk, so 0 and 3 further)
    cos = (gt.dirs[:64, :-1] * gt.dirs[:64, 1:]).sum(-1)
    assert torch.allclose(cos, torch.full_like(cos, math.cos(cfg.shared_drift)), atol=1e-5)
    assert float((gt.dirs[:64, 0] * gt.dirs[:64, 3]).sum(-1).mean()) < math.cos(cfg.shared_drift) - 0.02
    # norm gaps: model m scaled by norm_gap ** (m / 3); weak features ramp from weak_scale to 1
    gaps = gt.model_gaps()
    assert torch.allclose(gaps, torch.tensor([cfg.norm_gap ** (i / 3) for i in range(m)]))
    weak = gt.strength[64:80] / gaps
    assert torch.allclose(weak[:, 0], torch.full((16,), cfg.weak_scale)) and torch.allclose(
        weak[:, -1], torch.ones(16)
    )
    assert gt.gain.shape == (224, m) and float(gt.gain[:64].log().std()) > 0.2
    assert torch.all(gt.gain[64:80] == 1) and torch.all(gt.gain[80:128] == 1)  # weak, exclusive: none
    assert torch.allclose(gt.offset.double().norm(dim=-1), cfg.mean_offset * gt.feature_rms(), rtol=1e-4)
    assert 2.0 <= gt.expected_active() <= 8.0


def test_multi_rows_follow_the_ground_truth(tmp_path):
    cfg = preset_config("multi", d_model=32, n_shared=16, n_shared_weak=4, subset_size=3, seed=3)
    gt, chunks = generate(cfg, 20_000)
    x = torch.cat(list(chunks))
    assert x.shape == (20_000, 4, 32) and torch.isfinite(x).all()
    feat = x.double() - gt.offset.double()
    noise = cfg.d_model * (cfg.noise * gt.model_gaps().double()) ** 2
    rms = (feat.norm(dim=-1).pow(2).mean(0) - noise).sqrt()
    assert torch.allclose(rms, gt.feature_rms(), rtol=0.05), (rms, gt.feature_rms())
    gt.save(tmp_path / "gt")
    back = GroundTruth.load(tmp_path / "gt")
    for k in ("dirs", "strength", "freq", "offset", "gain"):
        assert torch.equal(getattr(back, k), getattr(gt, k)), k
    assert back.patterns == gt.patterns and back.classes == gt.classes and back.config == cfg
    # a folder from before `patterns` existed: derived from the strengths
    meta = json.loads((tmp_path / "gt" / "ground_truth.json").read_text())
    del meta["patterns"]
    (tmp_path / "gt" / "ground_truth.json").write_text(json.dumps(meta))
    assert GroundTruth.load(tmp_path / "gt").patterns == gt.patterns


def _model_from(
    vectors: torch.Tensor, arch: str = "vanilla", norm_scale: list[float] | None = None
) -> CrossCoder:
    n, m, d = vectors.shape
    cfg = CrossCoderConfig(arch=arch, d_latent=n, n_models=m, d_model=d, k=4, norm_scale=norm_scale)
    model = CrossCoder(cfg)
    with torch.no_grad():
        model.W_dec.copy_(vectors)
    return model


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_pattern_recovery_on_exact_and_damaged_decoders(arch):
    gt = plant(preset_config("multi"))
    vec = gt.vectors()
    scale = (1 / gt.model_gaps()).tolist()  # normalisation undoes the norm gaps (roughly)

    def model(v):
        return _model_from(v, arch, scale)

    res = pattern_recovery(model(vec), gt)
    assert res["pattern_recovery"] == 1.0 and res["found"] == 1.0 and res["mmcs"] == pytest.approx(1.0)
    assert set(res["per_pattern"]) == set(gt.patterns) and res["per_pattern"]["0+2"]["n"] == 12
    assert "recovered 100.0%" in format_pattern_recovery(res)
    # leak every exclusive feature's decoder into the next model at full strength: the cosine stays
    # >= 0.7 (found) but the pattern is wrong
    bad = vec.clone()
    excl = [i for i, c in enumerate(gt.classes) if c == "exclusive"]
    for i in excl:
        j = int(gt.patterns[i])
        bad[i, (j + 1) % 4] = bad[i, j]
    res = pattern_recovery(model(bad), gt)
    assert res["pattern_recovery"] == pytest.approx(1 - len(excl) / 224)
    assert res["per_class"]["exclusive"]["recovered"] == 0.0 and res["per_pattern"]["0"]["called"] == {
        "0+1": 12
    }
    # patterns given (e.g. the analysis table's column) are used as they are
    assert list(latent_patterns(model(vec))) == gt.patterns
    res = pattern_recovery(model(vec), gt, patterns=["0"] * 224)
    assert res["pattern_recovery"] == pytest.approx(12 / 224)


def test_planted_cosines_keep_two_model_results():
    gt = plant(SyntheticConfig())
    model = _model_from(gt.vectors())
    with torch.no_grad():
        model.W_dec.add_(0.05 * torch.randn(model.W_dec.shape, generator=torch.Generator().manual_seed(0)))
    scale = model.norm_scale
    planted = (gt.vectors() * scale[None, :, None]).reshape(176, -1)
    dec = (model.W_dec.detach() * scale[None, :, None]).reshape(176, -1)
    ref = torch.nn.functional.normalize(dec, dim=-1) @ torch.nn.functional.normalize(planted, dim=-1).T
    assert torch.equal(planted_cosines(model, gt), ref)


def test_cli_synth_multi_writes_a_paired_cache(tmp_path, capsys):
    from crosscoder.analysis.analyze_config import find_ground_truth

    out = tmp_path / "multi"
    argv = ["synth", str(out), "--preset", "multi", "--rows", "3000", "--d-model", "16", "--n-models", "5"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "rows of 5 models" in text and "crosscoder train --cache" in text and "--k" in text
    cache = PairedCache(out / "cache")
    assert (cache.n_models, cache.d_model, len(cache)) == (5, 16, 3000)
    assert [m["name"] for m in cache.meta["models"]] == [f"synthetic_{i}" for i in range(5)]
    assert cache.read(torch.arange(10).numpy()).shape == (10, 5, 16)
    gt = GroundTruth.load(out / "ground_truth")
    assert gt.n_models == 5 and len(set(gt.patterns)) == len(auto_subsets(5)) + 1
    found = find_ground_truth(SimpleNamespace(ground_truth=None, base_data=None), cache)
    assert found is not None and GroundTruth.load(found).patterns == gt.patterns
    # two models: the HF pair as before; a bad subset: one error line, nothing written
    assert main(["synth", str(tmp_path / "pair"), "--rows", "100", "--d-model", "8"]) == 0
    assert (tmp_path / "pair" / "base").is_dir() and not (tmp_path / "pair" / "cache").exists()
    # a run trained with --base-data PAIR/base and analyzed from its recorded (converted) cache: the ground
    # truth is found beside the base data the run recorded
    elsewhere = SimpleNamespace(path=tmp_path / "converted")
    no_flags = SimpleNamespace(ground_truth=None, base_data=None)
    assert find_ground_truth(no_flags, elsewhere) is None
    run_cfg = {"data": {"base_data": str(tmp_path / "pair" / "base")}}
    assert find_ground_truth(no_flags, elsewhere, run_cfg) == tmp_path / "pair" / "ground_truth"
    capsys.readouterr()
    assert main(["synth", str(tmp_path / "bad"), "--preset", "multi", "--subsets", "0+7", "--rows", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: subsets:") and not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    """A small n-model set: 3 models, every proper subset planted (8 features each), 32 shared and weak
    features, with the multi preset's drift, gains, norm gaps and offsets; 300k rows."""
    out = tmp_path_factory.mktemp("synth") / "tri"
    over = ["--n-models", "3", "--d-model", "32", "--n-shared", "24", "--n-shared-weak", "8"]
    over += ["--subset-size", "8", "--freq-min", "0.01", "--freq-max", "0.05", "--seed", "7"]
    assert main(["synth", str(out), "--preset", "multi", "--rows", "300000", *over]) == 0
    return out


# BatchTopK keeps small decoder norms in the models a latent is absent from (hence its wider exclusive band
# and presence ratio 1/3): at this size it recovers 0.94-0.99 of the patterns (vanilla 1.0) over seeds.
@pytest.mark.parametrize(("arch", "target"), [("vanilla", 0.9), ("batchtopk", 0.85)])
def test_train_on_three_models_recovers_the_planted_patterns(tmp_path, three_models, arch, target):
    # trained through the real CLI with the architecture's default flags (k just above the planted L0)
    gt = GroundTruth.load(three_models / "ground_truth")
    assert len(gt.patterns) == 80 and len(set(gt.patterns)) == 7
    run = tmp_path / arch
    argv = ["train", "--cache", str(three_models / "cache"), "--arch", arch, "--dict-size", "160"]
    argv += ["--num-tokens", "1200000", "--batch-size", "512", "--val-tokens", "8192", "--seed", "0"]
    argv += ["--out", str(run), "--threads", "1", "--wandb", "off", "--no-progress"]
    if arch == "batchtopk":
        argv += ["--k", str(math.ceil(gt.expected_active()) + 1)]
    assert main(argv) == 0
    model = CrossCoder.from_pretrained(run)
    assert model.cfg.n_models == 3
    res = pattern_recovery(model, gt)
    assert res["pattern_recovery"] >= target, format_pattern_recovery(res)
    assert res["per_class"]["shared"]["recovered"] >= 0.9
    # the same run scored against the wrong subsets fails: the check is about the patterns
    shuffled = GroundTruth.load(three_models / "ground_truth")
    shuffled.patterns = shuffled.patterns[::-1]
    assert pattern_recovery(model, shuffled)["pattern_recovery"] < 0.5
