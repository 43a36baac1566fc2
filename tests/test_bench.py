"""`crosscoder bench` and the benchmark scripts at tiny sizes: valid JSON with the documented fields."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from crosscoder.cli import main
from crosscoder.model import architecture_names

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
FIELDS = (
    "tokens_per_s",
    "ms_per_step",
    "achieved_gflop_s",
    "peak_gflop_s",
    "frac_of_peak",
    "peak_mem_mb",
    "gflop_per_step",
)


@pytest.mark.parametrize("arch", architecture_names())  # every registered architecture
@pytest.mark.parametrize("extra", [[], ["--dead-frac", "0.25", "--aux-k", "8"]])
def test_bench_cli_prints_json(capsys, arch, extra) -> None:
    rc = main(
        [
            "bench",
            "--arch",
            arch,
            "--d-model",
            "16",
            "--dict-size",
            "128",
            "--batch-size",
            "32",
            "--k",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            *extra,
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in FIELDS:
        assert isinstance(out[key], float) and out[key] > 0, key
    assert out["arch"] == arch and out["device"] == "cpu" and out["threads"] == 1
    assert out["peak_shape"] == [32, 32, 128]
    assert out["frac_of_peak"] == pytest.approx(out["achieved_gflop_s"] / out["peak_gflop_s"])
    assert out["tokens_per_s"] == pytest.approx(32 / (out["ms_per_step"] / 1e3))


def test_bench_cli_rejects_bad_values(capsys) -> None:
    assert main(["bench", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_bench_step_script(capsys, arch) -> None:
    out = _load("bench_step").main(
        [
            "--arch",
            arch,
            "--d-model",
            "16",
            "--dict-size",
            "256",
            "--batch-size",
            "64",
            "--k",
            "4",
            "--threads",
            "1",
            "--steps",
            "1",
            "--rounds",
            "2",
            "--dead-frac",
            "0.1",
        ]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert out["speedup"] > 0 and out["ours"]["tokens_per_s"] > 0 and out["reference"]["tokens_per_s"] > 0
    assert out["first_l2_rel_diff"] < 1e-5  # same weights, same batch, same maths


def test_bench_data_script(capsys) -> None:
    out = _load("bench_data").main(
        [
            "--d-model",
            "16",
            "--dict-size",
            "128",
            "--batch-size",
            "64",
            "--k",
            "4",
            "--threads",
            "1",
            "--rows",
            "2048",
            "--batches",
            "4",
            "--steps",
            "1",
            "--rounds",
            "1",
        ]
    )
    assert out["loader_rows_per_s"] > 0 and out["ratio"] == pytest.approx(
        out["loader_rows_per_s"] / out["step_tokens_per_s"]
    )


def test_reference_step_matches_library_loss() -> None:
    """The dense reference computes the library's losses: same first-step l2 and l0 on the same weights."""
    import torch

    from crosscoder.bench import build_step, synthetic_batches
    from crosscoder.model import compute_loss

    ref_mod = _load("reference_step")
    for arch in ("vanilla", "batchtopk"):
        ours = build_step(arch, 16, 256, 64, 4, 10, torch.device("cpu"))
        init = {n: getattr(ours.model, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        ref = ref_mod.ReferenceStep(arch, 2, 16, 256, 4, init=init)
        x = synthetic_batches(1, 64, 2, 16, torch.device("cpu"))[0]
        lib = compute_loss(ours.model, x, sparsity_coeff=1.0).metrics
        m = ref.step(x)
        keys = ("l2_loss", "l0_loss", "explained_variance") + (("l1_loss",) if arch == "vanilla" else ())
        for key in keys:
            assert m[key] == pytest.approx(float(lib[key]), rel=1e-5, abs=1e-6), (arch, key)
