"""``crosscoder analyze --export neuronpedia,saedashboard``: files parsed back and checked against the latent
table and the top contexts, for a two-model run with token text (tiny demo pair) and a three-model run."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest
import torch
from conftest_collect import collect_config, quiet
from test_analysis_multi import THREE, planted_cache

from crosscoder.analysis.export_formats import parse_exports
from crosscoder.cli import main
from crosscoder.errors import CrossCoderError

torch.set_num_threads(1)


def jsonl_gz(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def train(cache, run, tokens, d_latent):
    args = ["--d-latent", str(d_latent), "--num-tokens", str(tokens), "--batch-size", "256", "--lr", "3e-3"]
    rc = main(["train", "--cache", str(cache), "--out", str(run), "--no-progress", "--wandb", "off", *args])
    assert rc == 0


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    from crosscoder.data.collect import collect

    root = tmp_path_factory.mktemp("export")
    collect(collect_config(root / "cache", num_tokens=3000), say=quiet)
    train(root / "cache", root / "run", 6000, 32)
    rep = root / "report"
    argv = ["analyze", str(root / "run"), "--out", str(rep), "--no-spliced", "--top-k", "4"]
    assert main([*argv, "--export", "neuronpedia", "--export", "saedashboard,neuronpedia"]) == 0
    df = pq.read_table(rep / "latents.parquet").to_pandas().set_index("latent")
    return rep, df, json.loads((rep / "summary.json").read_text())


def neuronpedia_dir(rep):
    (model_dir,) = (rep / "neuronpedia").iterdir()
    (source_dir,) = model_dir.iterdir()
    return source_dir


def test_neuronpedia_files_match_the_table(two):
    rep, df, summary = two
    assert summary["exports"] == {"neuronpedia": "neuronpedia", "saedashboard": "saedashboard"}
    src = neuronpedia_dir(rep)
    assert src.name.startswith("0-crosscoder-")  # layer of transformer.h.0
    source = json.loads((src / "source.jsonl").read_text())
    assert source["id"] == src.name and source["modelId"] == src.parent.name
    feats = jsonl_gz(src / "features" / "batch-0.jsonl.gz")
    acts = jsonl_gz(src / "activations" / "batch-0.jsonl.gz")
    extras = {r["index"]: r["crosscoder"] for r in jsonl_gz(src / "crosscoder" / "batch-0.jsonl.gz")}
    live = set(df.index[~df["dead"]])
    assert {f["index"] for f in feats} == live  # 32 latents < --max-cards: every live one
    for f in feats:
        j = f["index"]
        assert f["layer"] == src.name and f["modelId"] == src.parent.name
        assert f["maxActApprox"] == pytest.approx(df.loc[j, "max_act"])
        assert f["frac_nonzero"] == pytest.approx(df.loc[j, "freq"])
        assert f["pos_str"] == [] and f["neg_values"] == []  # no unembedding
        mine = [a for a in acts if a["index"] == j]
        assert 1 <= len(mine) <= 4
        for a in mine:
            assert len(a["tokens"]) == len(a["values"]) and all(isinstance(t, str) for t in a["tokens"])
            assert not any(t.startswith("#") for t in a["tokens"])  # decoded text, not ids
            assert a["maxValue"] == max(a["values"]) == a["values"][a["maxValueTokenIndex"]]
            assert a["minValue"] == min(a["values"])
        # the strongest context holds the scan's maximum (contexts recompute it: float tolerance)
        assert max(a["maxValue"] for a in mine) == pytest.approx(df.loc[j, "max_act"], rel=1e-3, abs=1e-3)
        e = extras[j]
        assert e["relative_norm"] == pytest.approx(df.loc[j, "relative_norm"])
        assert e["dec_norm_base"] == pytest.approx(df.loc[j, "dec_norm_base"])
        assert e["class"] == df.loc[j, "class"]


def test_saedashboard_matches_contexts(two):
    rep, df, _ = two
    data = json.loads((rep / "saedashboard" / "sae_vis_data.json").read_text())
    fdd = data["feature_data_dict"]
    live = sorted(df.index[~df["dead"]])
    assert sorted(int(k) for k in fdd) == live
    assert data["feature_stats"]["feature_indices"] == live
    assert data["feature_stats"]["max"] == pytest.approx(list(df.loc[live, "max_act"]))
    for k, fd in fdd.items():
        j = int(k)
        (group,) = fd["sequence_data"]["seq_group_data"]
        assert group["title"].startswith("TOP ACTIVATIONS<br>MAX = ")
        seqs = group["seq_data"]
        assert seqs
        for s in seqs:
            n = len(s["feat_acts"])
            assert len(s["crosscoder_tokens"]) == n
            assert len(s["token_ids"]) == n and all(t >= 0 for t in s["token_ids"])
            assert 0 <= s["qualifying_token_index"] < n
        best = max(max(s["feat_acts"]) for s in seqs)
        assert best == pytest.approx(df.loc[j, "max_act"], rel=1e-3, abs=1e-3)
        title = fd["acts_histogram_data"]["title"]
        assert float(title.split(" = ")[1].rstrip("%")) / 100 == pytest.approx(df.loc[j, "freq"], abs=1e-5)
        assert fd["acts_histogram_data"]["bar_heights"] == []  # not computed: see docs
        assert fd["crosscoder_extras"]["cos_sim"] == pytest.approx(df.loc[j, "cos_sim"])


def test_three_models_export(tmp_path):
    planted_cache(tmp_path / "cache", THREE, 3, [16] * 3, 20_000, ["a", "b", "c"])
    train(tmp_path / "cache", tmp_path / "run", 20_000, 32)
    rep = tmp_path / "rep"
    argv = ["analyze", str(tmp_path / "run"), "--out", str(rep), "--max-tokens", "20000", "--max-cards", "5"]
    assert main([*argv, "--export", "neuronpedia,saedashboard"]) == 0
    df = pq.read_table(rep / "latents.parquet").to_pandas().set_index("latent")
    src = neuronpedia_dir(rep)
    feats = jsonl_gz(src / "features" / "batch-0.jsonl.gz")
    assert 1 <= len(feats) <= 5  # --max-cards bounds the export
    extras = {r["index"]: r["crosscoder"] for r in jsonl_gz(src / "crosscoder" / "batch-0.jsonl.gz")}
    for f in feats:
        e = extras[f["index"]]
        assert e["pattern"] == df.loc[f["index"], "pattern"]
        assert [e[f"dec_norm_{i}"] for i in range(3)] == pytest.approx(
            [df.loc[f["index"], f"dec_norm_{i}"] for i in range(3)]
        )
    data = json.loads((rep / "saedashboard" / "sae_vis_data.json").read_text())
    assert sorted(int(k) for k in data["feature_data_dict"]) == sorted(f["index"] for f in feats)
    for fd in data["feature_data_dict"].values():
        for s in fd["sequence_data"]["seq_group_data"][0]["seq_data"]:
            assert len(s["crosscoder_tokens"]) == len(s["feat_acts"])


def test_unknown_format_is_one_line(tmp_path, capsys):
    assert parse_exports(["neuronpedia, SAEDashboard", "neuronpedia"]) == ["neuronpedia", "saedashboard"]
    with pytest.raises(CrossCoderError, match="unknown format 'csv'"):
        parse_exports(["neuronpedia,csv"])
    rc = main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--export", "csv"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "unknown format 'csv'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
