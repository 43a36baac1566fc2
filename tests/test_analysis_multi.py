"""``crosscoder analyze`` for n models, several sites, mixed widths and checkpoint series.

Paired caches are written with :class:`PairedCacheWriter` from planted features, each present in a chosen
subset of the models (a shared feature points the same way in every model up to a small perturbation, as
in a fine-tune); small crosscoders are trained through the real trainer and analysed through the command
line. A two-model run checks that the classic report keeps every column and summary key.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from crosscoder import CrossCoder
from crosscoder.analysis.checkpoints import model_order, parse_step, timeline
from crosscoder.analysis.scan import normalised_model
from crosscoder.cli import main
from crosscoder.data.paired import PairedCacheWriter
from crosscoder.errors import CrossCoderError

torch.set_num_threads(1)

# Columns and summary keys of the two-model report before n models existed.
TWO_MODEL_COLUMNS = [
    "latent", "dec_norm_base", "dec_norm_ft", "relative_norm", "delta_norm", "cos_sim", "freq", "mean_act",
    "mean_act_all", "max_act", "n_active", "dead", "beta_ratio_error", "beta_ratio_reconstruction",
    "beta_error_base", "beta_error_ft", "beta_reconstruction_base", "beta_reconstruction_ft",
    "beta_ratio_error_mirror", "beta_ratio_reconstruction_mirror", "class", "norm_class", "flag", "kind",
    "layout_nu_error", "layout_nu_reconstruction", "layout_check", "class_reason",
]  # fmt: skip
TWO_MODEL_KEYS = {
    "arch", "architecture_metrics", "classes", "classes_scope", "d_latent", "d_model", "data", "dead",
    "latent_scaling_target", "layout", "models", "norm_scale", "reconstruction", "run_dir", "seconds", "site",
    "space", "spliced", "thresholds", "tokens_scanned",
}  # fmt: skip
THREE = [(0, 1, 2)] * 8 + [(0,), (1,), (2,)] * 3 + [(1, 2), (0, 1), (0, 2)] * 2


def planted_cache(path, patterns, n_models, widths, rows, names, sites=None, seed=0):
    """A cache of ``rows`` rows over ``n_models`` models (x ``len(sites)`` blocks each, model-major) with one
    planted feature per entry of ``patterns`` (the models it is present in). Returns the planted vectors
    ``[n_features, n_blocks, d_model]`` (zero in absent models and past each block's width)."""
    rng = np.random.default_rng(seed)
    n_sites = len(sites or [None])
    n_blocks, d = n_models * n_sites, max(widths)
    vecs = np.zeros((len(patterns), n_blocks, d))
    for j, pat in enumerate(patterns):
        common = rng.standard_normal((n_sites, d))
        for m in pat:
            for s in range(n_sites):
                b, w = m * n_sites + s, widths[m * n_sites + s]
                v = common[s, :w] + 0.15 * rng.standard_normal(w)
                vecs[j, b, :w] = v / np.linalg.norm(v)
    act = (rng.random((rows, len(patterns))) < 0.04) * rng.uniform(0.5, 1.5, (rows, len(patterns)))
    x = np.einsum("nf,fbd->nbd", act, vecs)
    x += 0.01 * rng.standard_normal(x.shape) * (np.arange(d)[None, None] < np.array(widths)[None, :, None])
    meta = {"models": [{"name": n, "revision": None} for n in names], "d_models": list(widths)}
    meta["site"], meta["sites"] = (sites or ["layer"])[0], sites or ["layer"]
    if sites:
        meta["blocks"] = [{"model": m, "site": s} for m in range(n_models) for s in range(n_sites)]
    w = PairedCacheWriter(path, n_blocks, d, "float32", meta=meta)
    w.add(torch.tensor(x, dtype=torch.float32))
    w.close()
    return vecs


def train_and_analyze(root, name, tokens, d_latent, *extra):
    cache, run, rep = root / f"cache-{name}", root / f"run-{name}", root / f"report-{name}"
    args = ["--d-latent", str(d_latent), "--num-tokens", str(tokens), "--batch-size", "512", "--lr", "3e-3"]
    assert (
        main(["train", "--cache", str(cache), "--out", str(run), "--no-progress", "--wandb", "off", *args])
        == 0
    )
    assert main(["analyze", str(run), "--out", str(rep), "--max-tokens", "60000", *extra]) == 0
    return run, rep


def read(rep):
    return pq.read_table(rep / "latents.parquet").to_pandas(), json.loads((rep / "summary.json").read_text())


def best_latents(run, vecs):
    """Index of the latent whose decoder (normalised space, all blocks concatenated) best matches each
    planted vector, and that cosine."""
    model = CrossCoder.from_pretrained(run)
    w = normalised_model(model).W_dec.detach().double().flatten(1)
    v = torch.tensor(vecs) * model.norm_scale.double()[None, :, None]
    cos = torch.nn.functional.normalize(v.flatten(1), dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    best_cos, best = cos.max(1)
    return best.numpy(), best_cos.numpy()


def pattern_recall(df, best, patterns):
    got = [df["pattern"].iloc[j] for j in best]
    return np.mean([g == "+".join(map(str, p)) for g, p in zip(got, patterns, strict=True)])


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    names = ["org/model@step300", "org/model@step100", "org/model@step200"]
    vecs = planted_cache(root / "cache-three", THREE, 3, [32] * 3, 200_000, names)
    run, rep = train_and_analyze(root, "three", 200_000, 64)
    return run, rep, vecs


def test_three_models_columns_patterns_and_summary(three):
    run, rep, vecs = three
    df, s = read(rep)
    for c in ("dec_norm_0", "dec_norm_1", "dec_norm_2", "relative_norm_1", "relative_norm_2", "cos_sim_1",
              "cos_sim_2", "pattern", "n_present", "freq", "mean_act", "n_active", "dead", "ls_model",
              "nu_error_0", "nu_error_1", "nu_error_2", "nu_reconstruction_0", "nu_reconstruction_2",
              "class", "norm_class", "flag"):  # fmt: skip
        assert c in df.columns, c
    assert set(df["class"]) <= {"shared", "exclusive", "partial", "other"}
    best, best_cos = best_latents(run, vecs)
    assert np.mean(best_cos > 0.9) >= 0.9
    assert pattern_recall(df, best, THREE) >= 0.9
    # classes follow the pattern; Latent Scaling confirms the planted exclusive / partial ones
    rows = df.iloc[best]
    n_planted = np.array([len(p) for p in THREE])
    assert (rows["class"].to_numpy()[n_planted == 1] == "exclusive").mean() >= 0.9
    assert (rows["class"].to_numpy()[n_planted == 3] == "shared").mean() >= 0.9
    excl = rows[n_planted == 1]
    for _, r in excl.iterrows():  # the reference is the own model (nu 1), the others carry nothing
        own = int(r["ls_model"])
        assert r[f"nu_error_{own}"] == pytest.approx(1.0)
        assert max(abs(r[f"nu_error_{i}"]) for i in range(3) if i != own) < 0.1
    # relative norm to model 0 and the pattern agree
    assert np.all((df["relative_norm_1"] > 0.9) <= ~df["pattern"].str.contains("0"))
    assert s["models"] == ["org/model@step300", "org/model@step100", "org/model@step200"]
    assert s["n_models"] == 3 and s["n_blocks"] == 3
    pc = s["pattern_counts"]
    assert sum(pc.values()) == int((~df["dead"]).sum()) and list(pc)[0] == "0+1+2"
    assert set(s["classes"]) == {"shared", "exclusive", "partial", "other"}
    for i in range(3):
        assert 0.9 < s["reconstruction"][f"explained_variance_{i}"] <= 1
    # checkpoint series: ordered by step
    assert s["model_order"] == [1, 2, 0]
    ck = s["checkpoints"]
    assert ck["series"] and ck["steps"] == [100, 200, 300]
    assert sum(ck["appear"]) == sum(ck["vanish"]) == ck["latents"] == ck["contiguous"] + ck["gapped"]


def test_notebook_latent_table(three):
    from crosscoder.analysis import latent_table

    run, rep, _ = three
    df = latent_table(
        run, json.loads((run / "config.json").read_text())["source"]["cache_path"], max_tokens=60_000
    )
    ref, _ = read(rep)
    assert list(df.columns) == list(ref.columns)
    assert (df["pattern"] == ref["pattern"]).all() and (df["class"] == ref["class"]).all()
    assert "pattern" in latent_table(run, as_dict=True)


def test_three_models_report_files(three):
    _, rep, _ = three
    for f in ("latents.parquet", "latents.csv", "summary.json", "report.html", "norm_heatmap.png",
              "pattern_counts.png", "checkpoints.png", "density.png", "training.png"):  # fmt: skip
        assert (rep / f).is_file(), f
    page = (rep / "report.html").read_text()
    for anchor in ("pattern-table", "checkpoint-table", "models-table", "class-table"):
        assert f"id='{anchor}'" in page


def test_three_models_page_in_browser(three):
    from conftest import require_chromium

    from crosscoder.analysis.browser import check_page

    require_chromium()
    res = check_page(three[1] / "report.html")
    assert res.ok, (res.status, res.page_errors, res.console_errors)
    assert res.table_rows > 0


def test_compare_to_needs_two_models(three, tmp_path):
    run, _, _ = three
    with pytest.raises(CrossCoderError, match="--compare-to"):
        from crosscoder.analysis.pipeline import AnalyzeConfig, analyze

        analyze(
            AnalyzeConfig(run_dir=str(run), out=str(tmp_path / "r"), compare_to=str(run)), say=lambda s: None
        )


def test_two_models_keep_their_report(tmp_path):
    pats = [(0, 1)] * 10 + [(0,)] * 5 + [(1,)] * 5
    planted_cache(tmp_path / "cache-two", pats, 2, [32, 32], 120_000, ["base", "ft"])
    _, rep = train_and_analyze(tmp_path, "two", 120_000, 48, "--no-spliced")
    df, s = read(rep)
    assert list(df.columns) == TWO_MODEL_COLUMNS + ["dec_norm_0", "dec_norm_1", "pattern"]
    assert TWO_MODEL_KEYS <= set(s)
    assert set(s["classes"]) == {"base_only", "shared", "ft_only", "other"}
    assert set(s["reconstruction"]) == {
        "explained_variance",
        "explained_variance_base",
        "explained_variance_ft",
    }
    assert np.array_equal(df["dec_norm_0"], df["dec_norm_base"]) and np.array_equal(
        df["dec_norm_1"], df["dec_norm_ft"]
    )
    # the pattern is the relative-norm call: "0" base_only, "1" ft_only, "0+1" the rest
    want = df["norm_class"].map({"base_only": "0", "ft_only": "1"}).fillna("0+1")
    assert (df["pattern"] == want).all()
    assert sum(s["pattern_counts"].values()) == int((~df["dead"]).sum())
    for f in ("relative_norms.png", "cosine_shared.png", "delta_vs_nu.png", "density.png", "training.png"):
        assert (rep / f).is_file(), f


def test_two_models_two_sites_per_block_columns(tmp_path):
    pats = [(0, 1)] * 8 + [(0,)] * 4 + [(1,)] * 4
    vecs = planted_cache(
        tmp_path / "cache-sites", pats, 2, [24] * 4, 150_000, ["a", "b"], sites=["h.0", "h.1"]
    )
    run, rep = train_and_analyze(tmp_path, "sites", 150_000, 48)
    df, s = read(rep)
    blocks = (
        "dec_norm_0_0",
        "dec_norm_0_1",
        "dec_norm_1_0",
        "dec_norm_1_1",
        "dec_norm_site_0",
        "dec_norm_site_1",
    )
    for c in ("dec_norm_0", "dec_norm_1", *blocks, "relative_norm_1", "cos_sim_1", "nu_error_1"):
        assert c in df.columns, c
    np.testing.assert_allclose(
        df["dec_norm_0"] ** 2, df["dec_norm_0_0"] ** 2 + df["dec_norm_0_1"] ** 2, rtol=1e-6
    )
    np.testing.assert_allclose(
        df["dec_norm_site_1"] ** 2, df["dec_norm_0_1"] ** 2 + df["dec_norm_1_1"] ** 2, rtol=1e-6
    )
    assert s["sites"] == ["h.0", "h.1"] and s["n_blocks"] == 4 and s["n_models"] == 2
    assert {"explained_variance_0_0", "explained_variance_1_1", "explained_variance_1"} <= set(
        s["reconstruction"]
    )
    share = s["site_norm_share"]
    assert sum(share["per_site"]) == pytest.approx(1.0) and len(share["per_block"]) == 2
    assert (rep / "site_norms.png").is_file() and not s["checkpoints"]["series"]
    best, _ = best_latents(run, vecs)
    assert pattern_recall(df, best, pats) >= 0.9


def test_mixed_widths(tmp_path):
    widths = [16, 24, 16]
    vecs = planted_cache(tmp_path / "cache-mixed", THREE, 3, widths, 150_000, ["a", "wide", "c"])
    run, rep = train_and_analyze(tmp_path, "mixed", 150_000, 64, "--no-spliced")
    df, s = read(rep)
    assert s["d_models"] == widths
    assert df["cos_sim_1"].isna().all() and df["cos_sim_2"].notna().all()  # model 1 lives in another space
    ref = df["ls_model"].to_numpy()
    assert df["nu_error_1"][ref != 1].isna().all() and df["nu_error_0"][ref == 1].isna().all()
    assert df["nu_error_2"][ref == 0].notna().any()
    for i in range(3):
        assert 0.8 < s["reconstruction"][f"explained_variance_{i}"] <= 1
    best, _ = best_latents(run, vecs)
    assert pattern_recall(df, best, THREE) >= 0.9


def test_checkpoint_steps_and_order(tmp_path):
    assert parse_step("EleutherAI/pythia-70m@step1000") == 1000
    assert parse_step("runs/x/checkpoint-500") == 500
    assert parse_step("runs/x/checkpoint_7/") == 7
    assert parse_step("my-model", revision="step42") == 42
    assert parse_step("models/ckpt12") == 12
    assert parse_step("org/model@main") is None
    local = tmp_path / "ckpt@v2"  # an existing local path is a path, even with an '@'
    local.mkdir()
    assert parse_step(str(local)) == 2
    assert model_order(["a@step30", "a@step10", "a@step20"]) == ([1, 2, 0], [30, 10, 20])
    assert model_order(["a@step30", "b", "a@step20"]) == ([0, 1, 2], None)
    present = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 0, 0]], bool)
    t = timeline(present, [0, 1, 2])
    assert t["present"] == [2, 2, 2] and t["appear"] == [2, 1, 0] and t["vanish"] == [0, 1, 2]
    assert (t["contiguous"], t["gapped"], t["latents"]) == (2, 1, 3)


@pytest.mark.parametrize("mode", ["intercept", "bias_free", "literal"])
def test_latent_scaling_matches_the_two_model_fit(mode):
    """Two models, one site: nu of the non-reference model is the two-model nu along the reference's
    decoder (the fine-tuned fit where the fine-tuned norm is larger, the mirror fit otherwise)."""
    from crosscoder.analysis.blocks import block_layout
    from crosscoder.analysis.multi_scaling import MultiScalingAccumulator
    from crosscoder.analysis.scaling import ScalingAccumulator
    from crosscoder.config import CrossCoderConfig

    g = torch.Generator().manual_seed(0)
    model = CrossCoder(
        CrossCoderConfig(arch="vanilla", d_latent=24, n_models=2, d_model=16), generator=g
    ).eval()
    with torch.no_grad():
        model.W_dec[:12, 0] *= 0.3  # half the latents lean fine-tuned, half base
        model.W_dec[12:, 1] *= 0.3
        model.b_dec.normal_(generator=g)
        model.b_enc.fill_(-0.5)
    two = ScalingAccumulator(model, mode=mode)
    multi = MultiScalingAccumulator(model, block_layout(model.cfg), mode=mode)
    for _ in range(3):
        x = torch.randn(512, 2, 16, generator=g) + 0.5
        f = model.encode(x)
        x_hat = model.decode(f)
        two.update(x, f, x_hat)
        multi.update(x, f, x_hat)
    res = multi.result()
    ft, base = two.result("ft"), two.result("base")
    ref = res["ref"]
    assert (ref[:12] == 1).all() and (ref[12:] == 0).all()
    for target in ("error", "reconstruction"):
        want = np.where(ref == 1, getattr(ft, f"nu_{target}").numpy(), getattr(base, f"nu_{target}").numpy())
        got = np.where(ref == 1, res[f"nu_{target}"][0], res[f"nu_{target}"][1])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        own = res[f"nu_{target}"][ref, np.arange(24)]
        assert np.all(np.isnan(own) | np.isclose(own, 1.0))


def test_classes_from_patterns_and_latent_scaling():
    from crosscoder.analysis.multi import multi_classify
    from crosscoder.analysis.table import Thresholds

    present = np.array(
        [[1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1], [0, 0, 0], [1, 0, 0]], bool
    )
    n_active = np.array([100, 100, 100, 5, 100, 100, 100, 0])
    ref = np.array([0, 0, 1, 0, 2, 2, 0, 0])
    nu_e = np.zeros((3, 8))
    nu_r = np.zeros((3, 8))
    nu_e[ref, np.arange(8)] = 1.0
    nu_e[0, 2] = 0.5  # model 0 carries latent 2's direction: complete shrinkage
    nu_r[0, 4] = -0.4  # other latents reconstruct latent 4 in model 0: latent decoupling
    nu_e[:, 5] = np.nan  # the reference's own beta is undefined
    nu_e[1, 1] = np.nan  # model 1 in another space: not checked
    cls, by_norm, flag = multi_classify(present, Thresholds(), n_active, ref, nu_e, nu_r)
    assert list(by_norm) == [
        "shared",
        "exclusive",
        "partial",
        "exclusive",
        "partial",
        "exclusive",
        "other",
        "exclusive",
    ]
    assert list(flag) == ["", "", "complete_shrinkage", "too_rare", "latent_decoupling"] + [
        "scaling_undefined",
        "no_decoder",
        "dead",
    ]
    assert list(cls) == ["shared", "exclusive"] + ["other"] * 6
    cls, _, flag = multi_classify(present, Thresholds(latent_scaling=False), n_active, ref, nu_e, nu_r)
    assert list(cls[:6]) == ["shared", "exclusive", "partial", "other", "partial", "exclusive"]


WORDS = "the cat dog sat ran on a mat log red blue big small fast slow and then it was".split()


def tiny_models(root, widths=(16, 16, 24)):
    """Random two-block GPT-2 models of the given widths sharing a byte-level BPE tokenizer, and a text
    corpus (jsonl); returns (model folders, corpus, held-out jsonl)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 30)))) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|e|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(docs, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|e|>", eos_token="<|e|>", unk_token="<|e|>"
    )
    folders = []
    for i, w in enumerate(widths):
        torch.manual_seed(i)
        cfg = GPT2Config(vocab_size=len(hf_tok), n_positions=64, n_embd=w, n_layer=2, n_head=2)
        m = GPT2LMHeadModel(cfg)
        folders.append(root / f"model{i}")
        m.save_pretrained(folders[-1])
        hf_tok.save_pretrained(folders[-1])
    corpus, heldout = root / "corpus.jsonl", root / "heldout.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:300]))
    heldout.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[300:]))
    return [str(f) for f in folders], corpus, heldout


def collect_blocks(folders, sites, corpus, out, seq_len=16, n_seq=200):
    """What ``crosscoder collect`` writes for several models and sites: every (model, site) block at the
    real non-BOS positions, zero-padded to the largest width."""
    from crosscoder.data.collect import load_site_model, load_tokenizer, make_batch
    from crosscoder.data.text import iter_sequences

    tok = load_tokenizer(folders[0])
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    seqs = list(iter_sequences(texts, tok, seq_len))[:n_seq]
    batch = make_batch(seqs, tok.eos_token_id, "cpu")
    mask = batch["attention_mask"].bool() & (batch["input_ids"] != tok.bos_token_id)
    acts = []
    for f in folders:
        sm = load_site_model(f, sites, tokenizer=tok)
        acts += [a[mask] for a in sm.read_sites(batch)]
    widths = [a.shape[-1] for a in acts]
    x = torch.zeros(int(mask.sum()), len(acts), max(widths))
    for b, a in enumerate(acts):
        x[:, b, : widths[b]] = a
    pos = torch.nonzero(mask)
    index = np.stack([batch["input_ids"][mask].numpy(), pos[:, 0].numpy(), pos[:, 1].numpy()], 1)
    meta = {
        "models": [{"name": f, "revision": None} for f in folders],
        "site": sites[0],
        "sites": sites,
        "blocks": [{"model": m, "site": s} for m in range(len(folders)) for s in range(len(sites))],
        "d_models": widths,
        "n_sequences": len(seqs),
        "collect": {"dataset": str(corpus), "seq_len": seq_len, "text_column": "text", "pack": True},
    }
    w = PairedCacheWriter(out, len(acts), max(widths), "float32", meta=meta)
    w.add(x, index)
    w.close()
    return tok, seqs


class _Identity:
    """A stand-in crosscoder that reconstructs its input exactly."""

    def __init__(self, d_model):
        self.W_dec = torch.zeros(1)
        self.cfg = type("C", (), {"d_model": d_model})()

    def eval(self):
        return self

    def __call__(self, x):
        return x, None


def test_spliced_in_per_model_with_sites_and_mixed_widths(tmp_path):
    from crosscoder.analysis.blocks import block_layout
    from crosscoder.analysis.spliced_multi import spliced_eval_multi
    from crosscoder.data.collect import load_site_model

    sites = ["transformer.h.0", "transformer.h.1"]
    folders, corpus, heldout = tiny_models(tmp_path)
    tok, seqs = collect_blocks(folders, sites, corpus, tmp_path / "cache-gpt")
    # splicing an exact reconstruction changes nothing, for every model, all sites at once
    cache_meta = json.loads((tmp_path / "cache-gpt" / "meta.json").read_text())
    cfg = type("C", (), {"n_models": 6, "d_model": 24, "model_names": None, "site": None})()
    layout = block_layout(cfg, cache_meta)
    assert layout.n_models == 3 and layout.widths == [16, 16, 16, 16, 24, 24]
    res = spliced_eval_multi(
        _Identity(24), layout, lambda i: load_site_model(folders[i], sites, tokenizer=tok), seqs[:6],
        tok.eos_token_id, tok.bos_token_id, batch_size=4,
    )  # fmt: skip
    assert [r["name"] for r in res["models"]] == folders
    for r in res["models"]:
        assert r["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-4) and abs(r["kl_spliced"]) < 1e-4
        assert r["kl_zero"] > 1e-3 and r["frac_recovered"] == pytest.approx(1.0, abs=1e-3)
    # the whole command: per-model CE/KL in summary.json and report.html, token text in the contexts
    _, rep = train_and_analyze(
        tmp_path, "gpt", 20_000, 32, "--eval-data", str(heldout), "--eval-sequences", "8"
    )
    df, s = read(rep)
    sp = s["spliced"]
    assert sp is not None and len(sp["models"]) == 3 and sp["sites"] == sites
    for r in sp["models"]:
        assert all(np.isfinite(r[k]) for k in ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero"))
    page = (rep / "report.html").read_text()
    assert "id='spliced-table'" in page and '"proj":[' in page
    assert "dec_norm_2_1" in df.columns and s["d_models"] == [16, 16, 16, 16, 24, 24]


def test_block_layout_reads_the_cache_meta():
    from crosscoder.analysis.blocks import block_layout

    cfg = type("C", (), {"n_models": 4, "d_model": 8, "model_names": None, "site": None})()
    meta = {
        "models": [
            {"name": "p@step20", "revision": "0123456789abcdef0123456789abcdef01234567"},
            {"name": "p"},
        ],
        "sites": ["h.1", "h.3"],
        "blocks": [{"model": m, "site": s} for m in range(2) for s in range(2)],
        "d_models": [8, 8, 6, 6],
        "collect": {"models": ["p@step20", "p"], "revisions": [None, "step10"]},
    }
    lay = block_layout(cfg, meta)
    assert (lay.n_models, lay.n_sites, lay.n_blocks) == (2, 2, 4)
    assert lay.blocks_of(1) == [2, 3] and lay.block(1, 0) == 2 and not lay.same_space(0, 1)
    assert model_order(lay.model_names, lay.revisions) == ([1, 0], [20, 10])
    assert parse_step("p", "0123456789abcdef0123456789abcdef01234567") is None  # a commit hash names no step
