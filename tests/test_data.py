"""Paired cache format, HF activation datasets, and every bad input -> one line, exit 2, nothing written."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset
from datasets.table import InMemoryTable

from crosscoder.cli import main
from crosscoder.data.loader import CacheBatches
from crosscoder.data.paired import PairedCache, PairedCacheWriter
from crosscoder.errors import DataError


def write_ds(path, arr, column="activation"):
    arr = np.asarray(arr, np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
    Dataset(InMemoryTable(pa.table({column: col}))).save_to_disk(str(path))
    return str(path)


def test_cache_roundtrip_stats_and_dtypes(tmp_path):
    x = torch.randn(1000, 2, 16, dtype=torch.float64) * 3 + 1
    for dtype, tol in (("float32", 1e-6), ("float16", 1e-2), ("bfloat16", 5e-2)):
        w = PairedCacheWriter(tmp_path / dtype, 2, 16, dtype, shard_rows=300)
        w.add(x[:400].float())
        w.add(x[400:].float(), np.arange(1800).reshape(600, 3))
        w.close()
        c = PairedCache(tmp_path / dtype)
        assert c.n_rows == 1000 and len(c.meta["shards"]) == 4
        rows = np.array([999, 0, 450, 301])
        assert torch.allclose(c.read(rows), x[rows].float(), rtol=tol, atol=tol)
        assert c.read_index(np.array([999]))[0].tolist() == [1797, 1798, 1799]
        assert c.read_index(np.array([0]))[0].tolist() == [-1, -1, -1]
        st = c.stats  # float64 statistics of the collected (pre-storage) activations
        xf = x.float().double()
        assert np.allclose(st["mean"], xf.mean(0).numpy(), atol=1e-9)
        assert np.allclose(st["var"], xf.var(0, unbiased=False).numpy(), atol=1e-9)
        assert np.allclose(st["mean_norm"], xf.norm(dim=-1).mean(0).numpy(), atol=1e-9)


def test_truncated_and_corrupted_shards_are_named(tmp_path):
    w = PairedCacheWriter(tmp_path / "c", 2, 8, shard_rows=50)
    w.add(torch.randn(120, 2, 8))
    w.close()
    shard = tmp_path / "c" / "shard_00001.acts.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(DataError, match="shard_00001.acts.npy: truncated"):
        PairedCache(tmp_path / "c")
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="shard_00001.acts.npy: corrupted"):
        PairedCache(tmp_path / "c")


def test_loader_is_a_seeded_shuffle_with_disjoint_validation(tmp_path):
    w = PairedCacheWriter(tmp_path / "c", 2, 4, shard_rows=64)
    x = torch.arange(300, dtype=torch.float32)[:, None, None].expand(300, 2, 4).contiguous()
    w.add(x)
    w.close()
    c = PairedCache(tmp_path / "c")
    b = CacheBatches(c, 32, seed=5, norm=[1.0, 2.0], val_tokens=44, prefetch=2)
    seen = [b.next_batch() for _ in range(16)]  # 2 epochs of 8 batches (256 train rows)
    ids = torch.cat([s[:, 0, 0] for s in seen]).long()
    val = torch.cat(list(b.val_batches()))[:, 0, 0].long()
    assert len(set(val.tolist())) == 44 and not set(val.tolist()) & set(ids.tolist())
    assert sorted(ids[:256].tolist()) == sorted(ids[256:].tolist())  # each epoch covers the train rows once
    assert ids[:256].tolist() != ids[256:].tolist()  # reshuffled per epoch
    assert torch.equal(seen[0][:, 1], seen[0][:, 0] * 2)  # per-model norm scale applied
    b2 = CacheBatches(c, 32, seed=5, norm=[1.0, 2.0], val_tokens=44, prefetch=0)
    b2.load_state_dict({"batches_served": 11})
    assert torch.equal(b2.next_batch(), seen[11])  # position restore
    b.close()


def run_cli(capsys, *args):
    capsys.readouterr()
    code = main(
        [
            "train",
            "--wandb",
            "off",
            "--no-progress",
            "--num-tokens",
            "1024",
            "--batch-size",
            "128",
            "--val-tokens",
            "128",
            "--dict-size",
            "32",
            *args,
        ]
    )
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8)).astype(np.float32)
    return tmp_path, write_ds(tmp_path / "base", a), write_ds(tmp_path / "ft", a * 2 + 1), a


def test_trains_from_hf_pair_and_records_norm_scale(pair, capsys):
    tmp, base, ft, a = pair
    code, err = run_cli(capsys, "--base-data", base, "--ft-data", ft, "--out", str(tmp / "run"))
    assert code == 0, err
    cfg = json.loads((tmp / "run" / "config.json").read_text())
    # Default: centred, then scaled so that E||x - mu|| = sqrt(d_model); the means are recorded.
    xs = [a.astype(np.float64), a.astype(np.float64) * 2 + 1]
    mus = [x.mean(0) for x in xs]
    norms = [np.linalg.norm(x - mu, axis=1).mean() for x, mu in zip(xs, mus, strict=True)]
    assert cfg["norm_scale"] == pytest.approx([np.sqrt(8) / n for n in norms], rel=1e-5)
    assert np.asarray(cfg["norm_mean"]) == pytest.approx(np.stack(mus), abs=1e-6)
    # --no-norm-center: the plan's mean-inclusive scaling (E||x|| = sqrt(d_model)), no mean recorded.
    code, err = run_cli(
        capsys, "--base-data", base, "--ft-data", ft, "--out", str(tmp / "run2"), "--no-norm-center"
    )
    assert code == 0, err
    cfg = json.loads((tmp / "run2" / "config.json").read_text())
    norms = [np.linalg.norm(x, axis=1).mean() for x in xs]
    assert cfg["norm_scale"] == pytest.approx([np.sqrt(8) / n for n in norms], rel=1e-5)
    assert cfg["norm_mean"] is None


def test_site_flag_names_the_site_of_an_hf_pair(pair, capsys):
    tmp, base, ft, a = pair
    code, err = run_cli(
        capsys, "--base-data", base, "--ft-data", ft, "--out", str(tmp / "run"), "--site", "model.layers.13"
    )
    assert code == 0, err
    assert json.loads((tmp / "run" / "config.json").read_text())["site"] == "model.layers.13"
    from crosscoder import CrossCoder

    assert CrossCoder.from_pretrained(tmp / "run").cfg.site == "model.layers.13"


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("lengths", r"--base-data .* has 2000 rows but --ft-data .* has 1999"),
        ("width", r"has d_model 8 but --ft-data .* has 6"),
        ("nan", r"--ft-data .*: row 17 has non-finite values"),
        ("column", r"--base-data .*: no column 'activation' \(columns: vec\)"),
        ("empty", r"--base-data .*: dataset is empty"),
        ("missing", r"--base-data .*: cannot load dataset"),
    ],
)
def test_bad_inputs_one_line_exit_2_nothing_written(pair, capsys, case, pattern):
    tmp, base, ft, a = pair
    if case == "lengths":
        ft = write_ds(tmp / "ft2", a[:1999])
    elif case == "width":
        ft = write_ds(tmp / "ft2", a[:, :6])
    elif case == "nan":
        bad = a.copy()
        bad[17, 3] = np.nan
        ft = write_ds(tmp / "ft2", bad)
    elif case == "column":
        base = write_ds(tmp / "b2", a, column="vec")
    elif case == "empty":
        import pyarrow.parquet as pq

        empty = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(0, np.float32)), 8)
        pq.write_table(pa.table({"activation": empty}), tmp / "empty.parquet")
        base = str(tmp / "empty.parquet")
    elif case == "missing":
        base = str(tmp / "does-not-exist")
    out = tmp / "run"
    code, err = run_cli(capsys, "--base-data", base, "--ft-data", ft, "--out", str(out))
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    import re

    assert re.search(pattern, err), err
    assert not out.exists()


def test_skip_nonfinite_counts_rows(pair, capsys):
    tmp, base, ft, a = pair
    bad = a.copy()
    bad[[3, 500, 1999], 0] = np.inf
    ft = write_ds(tmp / "ft2", bad)
    code, err = run_cli(
        capsys, "--base-data", base, "--ft-data", ft, "--out", str(tmp / "run"), "--skip-nonfinite"
    )
    assert code == 0, err
    cfg = json.loads((tmp / "run" / "config.json").read_text())
    assert cfg["source"]["skipped_nonfinite"] == 3


def test_existing_out_refused_then_overwrite(pair, capsys):
    tmp, base, ft, _ = pair
    out = tmp / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run_cli(capsys, "--base-data", base, "--ft-data", ft, "--out", str(out))
    assert code == 2 and "output folder exists" in err and len(err.splitlines()) == 1
    assert (out / "precious.txt").read_text() == "keep me"
    code, err = run_cli(capsys, "--base-data", base, "--ft-data", ft, "--out", str(out), "--overwrite")
    assert code == 0 and (out / "model.safetensors").exists() and not (out / "precious.txt").exists()


def test_bad_config_file_and_unknown_key(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.01\nnot_a_field: 3\n")
    code, err = run_cli(capsys, "--config", str(p), "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown key 'not_a_field'" in err and len(err.splitlines()) == 1
    code, err = run_cli(capsys, "--config", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o"))
    assert code == 2 and "config file not found" in err
    assert not (tmp_path / "o").exists()


def test_val_tokens_too_large_is_one_line_exit_2(pair, capsys):
    tmp, base, ft, a = pair
    capsys.readouterr()
    code = main(
        [
            "train",
            "--wandb",
            "off",
            "--no-progress",
            "--num-tokens",
            "1024",
            "--batch-size",
            "128",
            "--val-tokens",
            "1900",
            "--dict-size",
            "32",
            "--base-data",
            base,
            "--ft-data",
            ft,
            "--out",
            str(tmp / "run"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "val_tokens=1900" in err, err
    assert not (tmp / "run").exists()
