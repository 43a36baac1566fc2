"""The family of synthetic pairs (issue 10): knobs, presets, `crosscoder synth --preset`, benchmark scores."""

import hashlib
import importlib.util
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from crosscoder.analysis.recovery import family_scores, planted_cosines
from crosscoder.cli import main
from crosscoder.config import CrossCoderConfig
from crosscoder.data.synthetic import (
    PRESETS,
    GroundTruth,
    SyntheticConfig,
    activity,
    generate,
    plant,
    preset_config,
)
from crosscoder.errors import ConfigError
from crosscoder.model import CrossCoder


def rows(cfg: SyntheticConfig, n: int) -> tuple[GroundTruth, torch.Tensor]:
    gt, chunks = generate(cfg, n)
    return gt, torch.cat(list(chunks))


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_default_pair_is_bit_identical_to_the_original_generator():
    # Checksums computed with the generator as it was before the family knobs existed (commit 47d1b33):
    # generate(SyntheticConfig(), 3000) in one chunk, float32 bytes.
    gt, x = rows(SyntheticConfig(), 3000)
    assert sha(x) == "e7b9134f49e435fbaf5097c6f4cc5187623e0ec9a296afec411d805238734b76"
    assert sha(gt.vectors()) == "30956280e62ced6bd66c9f70a929c191f60b9517b722787b768091b047a1fdf9"
    assert sha(gt.freq) == "cc649385bdf19e2e6b21ca5cc1f9a85ba2536896e4ae566fe3b1b31e5f3f584e"
    assert preset_config("default") == SyntheticConfig()


def test_mean_offset_has_the_requested_norm_and_differs_between_models():
    cfg = SyntheticConfig(noise=0.0)
    _, x0 = rows(cfg, 20_000)
    gt, x = rows(SyntheticConfig(noise=0.0, mean_offset=3.0, offset_drift=0.4), 20_000)
    offset = (x - x0).double().mean(0)  # [2, d]: the same rows plus a constant
    feat_rms = x0.double().norm(dim=-1).pow(2).mean(0).sqrt()  # measured on rows
    ratio = offset.norm(dim=-1) / feat_rms
    assert torch.allclose(ratio, torch.full((2,), 3.0, dtype=torch.float64), rtol=0.1), ratio
    assert torch.allclose(offset.float(), gt.offset, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity(offset[0], offset[1], dim=0)
    assert float(cos) == pytest.approx(math.cos(0.4), abs=1e-4)


def test_norm_gap_scales_the_whole_fine_tuned_activation():
    _, x1 = rows(SyntheticConfig(mean_offset=1.0), 5000)
    gt, x3 = rows(SyntheticConfig(mean_offset=1.0, norm_gap=3.0), 5000)
    assert torch.equal(x1[:, 0], x3[:, 0])
    ratio = x3[:, 1].norm(dim=-1).mean() / x1[:, 1].norm(dim=-1).mean()
    assert float(ratio) == pytest.approx(3.0, rel=1e-4)
    ref = plant(SyntheticConfig(mean_offset=1.0)).offset
    assert torch.allclose(gt.offset, ref * torch.tensor([[1.0], [3.0]]), rtol=1e-5)


def test_gain_spread_reweights_shared_features_and_is_recorded():
    gt = plant(SyntheticConfig(gain_spread=0.5, norm_gap=2.0))
    cls = gt.classes
    shared = torch.tensor([c == "shared" for c in cls])
    logs = gt.gain[shared].log()
    assert 0.35 < float(logs.std()) < 0.65 and not torch.allclose(
        gt.gain[shared], torch.ones(int(shared.sum()))
    )
    assert torch.all(gt.gain[~shared] == 1)
    assert torch.allclose(gt.strength[shared, 1], gt.strength[shared, 0] * gt.gain[shared] * 2.0)
    assert torch.allclose(gt.vectors()[shared, 1].norm(dim=-1), gt.gain[shared] * 2.0, rtol=1e-5)
    # measured on rows: with one shared feature at a time, ft/base norm ratio is gain * norm_gap
    cfg = SyntheticConfig(
        d_model=8,
        n_shared=3,
        n_base_only=0,
        n_ft_only=0,
        n_shared_weak=0,
        noise=0.0,
        freq_min=0.2,
        freq_max=0.2,
        gain_spread=0.5,
        norm_gap=2.0,
    )
    gt, x = rows(cfg, 4000)
    a = activity(gt, 4000, torch.Generator().manual_seed(cfg.seed + 1))
    solo = (a > 0).sum(1) == 1
    i = a[solo].argmax(1)
    ratio = x[solo, 1].norm(dim=-1) / x[solo, 0].norm(dim=-1)
    assert torch.allclose(ratio, gt.gain[i] * 2.0, rtol=1e-4)


def test_groups_co_occur():
    cfg = SyntheticConfig(n_groups=8, group_size=3, group_prob=0.8, freq_min=0.05, freq_max=0.1)
    gt = plant(cfg)
    assert gt.groups.shape == (8, 3) and len(set(gt.groups.flatten().tolist())) == 24
    a = activity(gt, 40_000, torch.Generator().manual_seed(0)) > 0
    lead, mem = gt.groups[:, 0], gt.groups[:, 1:]
    on = a[:, lead][:, :, None]  # [n, G, 1]
    m = a[:, mem]  # [n, G, 2]
    assert not (m & ~on).any()  # members fire only with their leader
    p = (m & on).sum((0, 2)).double() / (on.sum((0, 2)).double() * 2)
    assert torch.allclose(p, torch.full_like(p, 0.8), atol=0.05), p
    freq = a.double().mean(0)
    assert torch.allclose(freq, gt.freq.double(), atol=0.01)  # recorded marginal frequencies
    assert gt.expected_active() == pytest.approx(float(freq.sum()), rel=0.05)


@pytest.mark.parametrize(
    ("kind", "mean", "median"),
    [("uniform", 1.0, 1.0), ("exponential", 1.0, math.log(2)), ("lognormal", math.exp(0.125), 1.0)],
)
def test_magnitude_distributions(kind, mean, median):
    gt = plant(SyntheticConfig(magnitude=kind, freq_min=0.2, freq_max=0.2))
    a = activity(gt, 5000, torch.Generator().manual_seed(0))
    mags = a[a > 0].double()
    assert float(mags.mean()) == pytest.approx(mean, rel=0.03)
    assert float(mags.median()) == pytest.approx(median, rel=0.05)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_generate_with_sensible_statistics(name):
    cfg = preset_config(name)
    gt, x = rows(cfg, 20_000)
    assert x.shape == (20_000, 2, cfg.d_model) and torch.isfinite(x).all()
    assert 2.0 <= gt.expected_active() <= 8.0
    feat = x.double() - gt.offset.double()
    rms = (
        feat.norm(dim=-1).pow(2).mean(0) - cfg.d_model * (cfg.noise * torch.tensor([1.0, cfg.norm_gap])) ** 2
    ).sqrt()
    assert torch.allclose(rms, gt.feature_rms(), rtol=0.05), (rms, gt.feature_rms())
    assert torch.allclose(gt.offset.double().norm(dim=-1), cfg.mean_offset * gt.feature_rms(), rtol=1e-4)


def test_crowded_and_mixed_presets_plant_256_features():
    for name in ("crowded", "mixed"):
        cfg = preset_config(name)
        assert (cfg.d_model, cfg.n_features, cfg.n_base_only, cfg.n_ft_only) == (64, 256, 48, 48)
    mixed = preset_config("mixed")
    assert mixed.mean_offset > 0 and mixed.norm_gap > 1 and mixed.gain_spread > 0 and mixed.shared_drift > 0


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"n_shared": -1}, "n_shared"),
        ({"freq_min": 0.5}, "freq_min"),
        ({"magnitude": "cauchy"}, "magnitude"),
        ({"norm_gap": 0.0}, "norm_gap"),
        ({"group_prob": 1.5}, "group_prob"),
        ({"n_groups": 100, "group_size": 4}, "n_groups"),
        ({"mean_offset": -1.0}, "mean_offset"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_validation_names_the_field(over, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        preset_config("default", **over)
    with pytest.raises(ConfigError, match="^preset: unknown 'nope' .*default, offset"):
        preset_config("nope")


def test_old_ground_truth_folders_still_load(tmp_path):
    from safetensors.torch import save_file

    gt = plant(SyntheticConfig(d_model=8, n_shared=3, n_base_only=1, n_ft_only=1, n_shared_weak=1))
    save_file(
        {"dirs": gt.dirs, "strength": gt.strength, "freq": gt.freq},
        str(tmp_path / "ground_truth.safetensors"),
    )
    old_cfg = {
        k: v
        for k, v in asdict(gt.config).items()
        if k
        in (
            "d_model",
            "n_shared",
            "n_base_only",
            "n_ft_only",
            "n_shared_weak",
            "weak_scale",
            "shared_drift",
            "freq_min",
            "freq_max",
            "noise",
            "seed",
        )
    }
    (tmp_path / "ground_truth.json").write_text(json.dumps({"classes": gt.classes, "config": old_cfg}))
    old = GroundTruth.load(tmp_path)
    assert (
        torch.equal(old.vectors(), gt.vectors()) and torch.all(old.offset == 0) and torch.all(old.gain == 1)
    )
    assert old.groups.numel() == 0 and old.config == gt.config
    new = plant(preset_config("correlated", mean_offset=1.0, gain_spread=0.2))
    new.save(tmp_path / "new")
    back = GroundTruth.load(tmp_path / "new")
    for k in ("dirs", "strength", "freq", "offset", "gain", "groups"):
        assert torch.equal(getattr(back, k), getattr(new, k)), k


def test_cli_synth_preset_writes_pair_and_flags_override(tmp_path, capsys):
    out = tmp_path / "pair"
    assert (
        main(["synth", str(out), "--preset", "offset", "--rows", "2000", "--d-model", "16", "--seed", "5"])
        == 0
    )
    text = capsys.readouterr().out
    assert "expected active planted features per token: 2." in text
    gt = GroundTruth.load(out / "ground_truth")
    assert (
        gt.config.mean_offset == PRESETS["offset"]["mean_offset"]
        and gt.config.d_model == 16
        and gt.config.seed == 5
    )
    assert gt.offset.norm(dim=-1).min() > 0
    from datasets import load_from_disk

    base, ft = load_from_disk(str(out / "base")), load_from_disk(str(out / "ft"))
    assert len(base) == len(ft) == 2000 and len(ft[0]["activation"]) == 16


@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "nope"],
        ["--n-ft-only", "-3"],
        ["--magnitude", "cauchy"],
        ["--preset", "mixed", "--freq-min", "0.9", "--freq-max", "0.1"],
    ],
)
def test_cli_synth_bad_values_are_one_error_line(tmp_path, capsys, argv):
    out = tmp_path / "pair"
    assert main(["synth", str(out), "--rows", "100", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()


def _model_from(vectors: torch.Tensor, norm_scale: list[float]) -> CrossCoder:
    n, m, d = vectors.shape
    model = CrossCoder(CrossCoderConfig(d_latent=n, n_models=m, d_model=d, norm_scale=norm_scale))
    with torch.no_grad():
        model.W_dec.copy_(vectors)
    return model


def test_family_scores_on_a_perfect_decoder():
    gt = plant(preset_config("mixed"))
    model = _model_from(gt.vectors(), [1.0, 1 / 3])
    cls = ["shared" if c == "shared_weak" else c for c in gt.classes]
    s = family_scores(planted_cosines(model, gt), gt.classes, cls)
    assert s["mmcs"] == pytest.approx(1.0, abs=1e-5)
    for c in ("base_only", "ft_only"):
        assert s[f"recall_{c}"] == 1.0 and s[f"precision_{c}"] == 1.0 and s[f"called_{c}"] == 48
    # wrong calls: every latent called ft_only -> base_only recall 0, ft_only precision 48/256
    s = family_scores(planted_cosines(model, gt), gt.classes, ["ft_only"] * len(cls))
    assert (
        s["recall_base_only"] == 0.0 and math.isnan(s["precision_base_only"]) and s["called_base_only"] == 0
    )
    assert s["recall_ft_only"] == 1.0 and s["precision_ft_only"] == pytest.approx(48 / 256)


def test_benchmark_script_parses_and_aggregates():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "recovery.py"
    spec = importlib.util.spec_from_file_location("bench_recovery", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    a = bench.parse_args(["--families", "default,offset", "--seeds", "2", "--archs", "batchtopk"])
    assert a.families == ["default", "offset"] and a.seeds == [0, 1] and a.rows == 1_600_000
    assert bench.parse_args(["--seeds", "3,7"]).seeds == [3, 7]
    runs = [
        {"family": "offset", "arch": "batchtopk", "ok": True, "mmcs": v, "precision_ft_only": p}
        for v, p in ((0.8, float("nan")), (0.9, 0.5))
    ] + [{"family": "offset", "arch": "batchtopk", "ok": False}]
    agg = bench.aggregate(runs)["offset"]["batchtopk"]
    assert agg["n_ok"] == 2 and agg["n_failed"] == 1
    assert agg["mmcs"]["mean"] == pytest.approx(0.85) and agg["mmcs"]["min"] == 0.8 and agg["mmcs"]["std"] > 0
    assert agg["precision_ft_only"] == {"mean": 0.5, "std": 0.0, "min": 0.5, "n": 1}
