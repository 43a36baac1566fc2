"""The offline model pair and the command-line pipeline: demo, sites, collect -> train --cache, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_collect import cache_root, corpus, tiny_pair

from crosscoder.cli import main
from crosscoder.data.demo_pair import SMALL, _blocks, build_demo_pair, token_labels, train_tokenizer
from crosscoder.data.demo_text import code_context_labels
from crosscoder.data.paired import PairedCache

torch.set_num_threads(1)


def test_pair_is_cached_loadable_and_really_fine_tuned() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pair = tiny_pair()
    stamp = (pair.base / "model.safetensors").stat().st_mtime_ns
    again = build_demo_pair(SMALL, root=cache_root() / "demo_pair")
    assert again.root == pair.root and (pair.base / "model.safetensors").stat().st_mtime_ns == stamp
    assert pair.root.name == SMALL.key()
    tok = AutoTokenizer.from_pretrained(pair.ft)
    base, ft = (AutoModelForCausalLM.from_pretrained(p) for p in (pair.base, pair.ft))
    assert tok.bos_token_id is not None and len(tok) == SMALL.vocab_size and tok.chat_template
    assert base.config.n_layer == SMALL.n_layer and base.config.n_embd == SMALL.n_embd
    assert not torch.equal(base.transformer.h[0].mlp.c_fc.weight, ft.transformer.h[0].mlp.c_fc.weight)
    loss = pair.info["eval_loss"]
    assert loss["ft_code"] < loss["base_code"]  # the fine-tune learned code
    rows = [json.loads(line) for line in pair.corpus.read_text().splitlines()]
    assert {r["domain"] for r in rows} == {"prose", "code", "data"}
    assert {r["split"] for r in rows} == {"heldout", "train"} and rows[0]["split"] == "heldout"
    record = next(r["text"] for r in rows if r["domain"] == "data").splitlines()[0]
    assert set(json.loads(record)) >= {"code", "char", "name", "category"}  # the data domain: JSON lines


def _bits(flags: list[bool]) -> str:
    return "".join("1" if f else "0" for f in flags)


def test_code_context_labels_by_hand() -> None:
    # state after each character: inside a string literal / inside brackets
    text = 'f(a, "b)") # (\nx = [1,\n 2]\n'
    in_string, in_brackets = code_context_labels(text)
    #                         f(a, "b)") # (\nx = [1,\n 2]\n
    assert _bits(in_string) == "000001110000000000000000000"
    assert _bits(in_brackets) == "011111111000000000011111100"
    # an escaped quote, a triple-quoted string over a newline, a bracket left open
    text = "s = \"x\\\"(\" + '''\n(''' + y["
    in_string, in_brackets = code_context_labels(text)
    #                         s = "x\"(" + \'\'\'\n(\'\'\' + y[
    assert _bits(in_string) == "00001111100001111100000000"
    assert _bits(in_brackets) == "0" * 25 + "1"
    # a closing bracket at depth 0 is ignored; a single-quoted string ends at a newline
    assert _bits(code_context_labels(")(x'(\n)")[1]) == "0111110"
    assert _bits(code_context_labels(")(x'(\n)")[0]) == "0001100"


def test_token_labels_restart_at_each_block() -> None:
    tok = train_tokenizer(["ab(cd)ef (xy)"], 257)  # the byte alphabet and EOS only: one token a character
    docs = ["ab(cd)ef", "(xy)"]
    x, y = token_labels(docs, tok, 5, "brackets")
    torch.testing.assert_close(x, _blocks(docs, tok, 5), atol=0, rtol=0)  # the training blocks, unchanged
    assert [tok.decode(r[1:]) for r in x] == ["ab(c", "d)ef", "<|endoftext|>(xy"]
    # BOS and EOS are 0; the scanner restarts with each block, so "d" (opened in the block before) is 0
    assert y.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]]
    _, s = token_labels(['a"b"', "c"], tok, 5, "string")
    _, e = token_labels(['a"(b"', "c"], tok, 6, "either")
    assert s.tolist() == [[0, 0, 1, 1, 0]] and e.tolist() == [[0, 0, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="ft_probe_variable"):
        token_labels(docs, tok, 5, "comments")


def test_fine_tune_is_taught_the_probe_feature() -> None:
    probe = tiny_pair().info["ft_probe"]
    assert probe["variable"] == "brackets" and probe["site"] == f"transformer.h.{SMALL.n_layer // 2}"
    assert 0.05 < probe["y_fraction"] < 0.5 and probe["sigma"] > 0
    assert probe["c"] == pytest.approx(SMALL.ft_probe_scale * probe["sigma"], rel=1e-3)
    corr = probe["heldout_corr"]
    # correlation of the projection on v with y on held-out code: the base lacks the feature, ft learns it
    # (SMALL fine-tunes for 12 steps only: about -0.04 -> 0.11 here; the demo's pair: -0.11 -> 0.79)
    assert abs(corr["base"]) < 0.2 and corr["ft"] > corr["base"] + 0.1
    assert set(probe["heldout_shift_other"]) == {"prose", "data"}


def test_checkpoints_second_fine_tune_and_wide_model() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pair = tiny_pair()
    info, models = pair.info, pair.info["models"]
    steps = SMALL.checkpoint_steps()
    assert len(steps) == SMALL.n_checkpoints and steps[-1] == SMALL.base_steps and steps == sorted(steps)
    assert [p.name for p in pair.checkpoints] == [f"step_{s}" for s in steps]
    assert all(p.parent == pair.root / "checkpoints" for p in pair.checkpoints)
    # every folder loads with the shared tokenizer; the last checkpoint is the base model
    tok = AutoTokenizer.from_pretrained(pair.ft2)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(pair.base).get_vocab()
    first, last, base = (
        AutoModelForCausalLM.from_pretrained(p)
        for p in (pair.checkpoints[0], pair.checkpoints[-1], pair.base)
    )
    w = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(last.state_dict()[w], base.state_dict()[w])
    assert not torch.equal(first.state_dict()[w], base.state_dict()[w])
    wide = AutoModelForCausalLM.from_pretrained(pair.wide)
    assert wide.config.n_embd == SMALL.wide_embd > SMALL.n_embd and wide.config.n_layer == SMALL.n_layer
    assert len(AutoTokenizer.from_pretrained(pair.wide)) == len(tok)
    # steps, learning rates and per-domain held-out losses of every model
    for name in ("base", "ft", "ft2", "wide", *info["checkpoints"]):
        m = models[name]
        assert set(m["eval_loss"]) == {"prose", "code", "data"} and m["steps"] > 0 and m["lr"] > 0
    assert (models["ft"]["init"], models["ft"]["data"], models["ft2"]["data"]) == ("base", "code", "data")
    assert models["ft"]["steps"] < models["base"]["steps"] and models["ft"]["lr"] < models["base"]["lr"]
    assert models["wide"]["init"] == "scratch" and models["wide"]["data"] == "prose"
    loss = info["eval_loss"]
    assert loss["ft2_data"] < loss["base_data"] and loss["ft2_data"] < loss["ft_data"]  # learned the data
    assert loss["ft_code"] < loss["ft2_code"]
    ckpt_prose = [models[c]["eval_loss"]["prose"] for c in info["checkpoints"]]
    assert ckpt_prose[0] > ckpt_prose[-1] == loss["base_prose"]  # pretraining progressed


def test_sites_lists_module_paths_with_shapes(capsys: pytest.CaptureFixture) -> None:
    assert main(["sites", str(tiny_pair().base)]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0 " in out and "transformer.h.1.mlp " in out
    line = next(s for s in out.splitlines() if s.startswith("transformer.h.1 "))
    assert line.split()[1:] == ["GPT2Block", "[B,", "T,", "32]"]
    assert main(["sites", str(tiny_pair().base), "--filter", "attn"]) == 0
    assert "tuple([B, T, 32], ...)" in capsys.readouterr().out


def test_collect_train_cache_from_pretrained_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from crosscoder.model import CrossCoder

    pair = tiny_pair()
    cache, run = tmp_path / "cache", tmp_path / "run"
    args = [
        "collect",
        "--base-model",
        str(pair.base),
        "--ft-model",
        str(pair.ft),
        "--site",
        "transformer.h.1",
        "--dataset",
        str(corpus()),
        "--num-tokens",
        "6000",
        "--seq-len",
        "32",
        "--batch-size",
        "16",
        "--dtype",
        "bfloat16",
        "--out",
        str(cache),
        "--shard-mb",
        "0.1",
        "--no-progress",
    ]
    assert main(args + ["--dry-run"]) == 0 and not cache.exists()
    assert "disk estimate" in capsys.readouterr().out
    assert main(args) == 0
    assert main(args) == 2 and "--resume" in capsys.readouterr().err  # existing OUT is refused
    c = PairedCache(cache)
    assert c.n_rows == 6000 and c.dtype == "bfloat16" and len(c.meta["shards"]) > 1
    assert [m["name"] for m in c.meta["models"]] == [str(pair.base), str(pair.ft)]
    assert (
        main(
            [
                "train",
                "--cache",
                str(cache),
                "--out",
                str(run),
                "--arch",
                "batchtopk",
                "--d-latent",
                "128",
                "--k",
                "8",
                "--num-tokens",
                "40000",
                "--batch-size",
                "256",
                "--lr",
                "3e-3",
                "--val-tokens",
                "512",
                "--wandb",
                "off",
                "--no-progress",
                "--val-every",
                "50",
                "--log-every",
                "50",
            ]
        )
        == 0
    )
    model = CrossCoder.from_pretrained(run)
    assert model.cfg.model_names == [str(pair.base), str(pair.ft)] and model.cfg.site == "transformer.h.1"
    # centred on the cache's exact mean, then E||x - mu|| = sqrt(d_model) on a sample of rows
    np.testing.assert_allclose(
        np.asarray(model.cfg.norm_mean), np.asarray(c.stats["mean"]), rtol=1e-4, atol=1e-5
    )
    xs = c.read(np.arange(c.n_rows)).double() - torch.tensor(c.stats["mean"], dtype=torch.float64)
    expect = [c.d_model**0.5 / float(v) for v in xs.norm(dim=-1).mean(0)]
    np.testing.assert_allclose(model.cfg.norm_scale, expect, rtol=1e-3)
    x = c.read(np.arange(2000))  # raw activations: normalisation is folded into the saved model
    x_hat, _ = model(x)
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev > 0.1


def test_export_writes_two_aligned_datasets_train_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from crosscoder.data.hf import pair_to_cache

    pair = tiny_pair()
    cache = tmp_path / "cache"
    assert (
        main(
            [
                "collect",
                "--base-model",
                str(pair.base),
                "--ft-model",
                str(pair.ft),
                "--site",
                "transformer.h.0",
                "--dataset",
                str(corpus()),
                "--num-tokens",
                "900",
                "--dtype",
                "float16",
                "--out",
                str(cache),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["export", str(cache), str(tmp_path / "hf")]) == 0
    assert "--base-data" in capsys.readouterr().out
    assert main(["export", str(cache), str(tmp_path / "hf")]) == 2  # exists
    back = pair_to_cache(str(tmp_path / "hf" / "base"), str(tmp_path / "hf" / "ft"), out=tmp_path / "back")
    c = PairedCache(cache)
    rows = np.arange(c.n_rows)
    assert back.n_rows == c.n_rows
    torch.testing.assert_close(back.read(rows), c.read(rows), atol=0, rtol=0)
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "hf" / "ft"))
    np.testing.assert_array_equal(np.array(ds["token_id"]), c.read_index(rows)[:, 0])


def test_demo_command_small(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tiny_pair()
    monkeypatch.setenv("CROSSCODER_CACHE_DIR", str(cache_root()))  # where tiny_pair() built the SMALL pair
    assert (
        main(
            [
                "demo",
                "--small",
                "--out",
                str(tmp_path / "demo"),
                "--num-tokens",
                "5000",
                "--train-tokens",
                "20000",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "== crosscoder demo ==" in out and "explained variance" in out and "L0" in out
    for label in ("base-only", "shared", "ft-only", "dead", "r histogram"):
        assert label in out
    assert "data: base" in out and "also built ft2" in out and "checkpoints/step_{10,20,30,40}" in out
    assert "building the demo pair" not in out  # cached
    assert (tmp_path / "demo" / "crosscoder" / "model.safetensors").is_file()
    # the demo analyzes its run; the story figures come from the corpus's `domain` column
    summary = json.loads((tmp_path / "demo" / "report" / "summary.json").read_text())
    story = summary["story"]
    assert "story" in out and f"{story['shared']} shared latents, median decoder cosine" in out
    import pandas as pd

    table = pd.read_parquet(tmp_path / "demo" / "report" / "latents.parquet")
    shared = table[table["class"] == "shared"]
    assert story["shared"] == len(shared) > 0
    median = float(np.median(shared["cos_sim"]))
    assert story["shared_median_cos"] == pytest.approx(median, abs=1e-5)  # summary.json rounds to 5 digits
    confirmed = table[(table["class"] == "ft_only") & (table["kind"] == "free")]
    assert story["ft_only_confirmed"] == len(confirmed)
    assert sorted(story["ft_only_latents"]) == sorted(confirmed["latent"].tolist())
    if story["ft_only_contexts"]:
        assert sum(story["ft_only_domains"].values()) == pytest.approx(1.0)
        assert story["ft_only_code_fraction"] == story["ft_only_domains"].get("code", 0.0)
