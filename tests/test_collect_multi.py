"""Collection of n models (issue 12): --model xN, several sites, mixed widths, revisions, resume.

Every check of stored rows compares against each model's own plain transformers forward (a forward hook
at the site) of the sequence alone, at the (sequence, position) of the index.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_collect import cache_root, corpus, mismatched_ft, tiny_pair

from crosscoder.cli import main
from crosscoder.data.collect import CollectConfig, parse_model_spec
from crosscoder.data.paired import PairedCache, PairedCacheWriter
from crosscoder.data.text import iter_sequences, iter_texts, load_text_dataset
from crosscoder.errors import DataError

torch.set_num_threads(1)
SEQ_LEN = 32


@functools.cache
def random_model(width: int, seed: int) -> Path:
    """A random 2-layer GPT-2 of ``width`` sharing the tiny pair's tokenizer, saved in a folder."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = cache_root() / f"random-{width}-{seed}"
    if not path.exists():
        tok = AutoTokenizer.from_pretrained(tiny_pair().base)
        torch.manual_seed(seed)
        cfg = GPT2Config(
            vocab_size=len(tok),
            n_positions=128,
            n_embd=width,
            n_layer=2,
            n_head=4,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        GPT2LMHeadModel(cfg).save_pretrained(path)
        tok.save_pretrained(path)
    return path


def run(out: Path, models: list[str], sites: list[str], *extra: str, num_tokens: int = 400) -> int:
    argv = ["collect"]
    for m in models:
        argv += ["--model", m]
    for s in sites:
        argv += ["--site", s]
    argv += ["--dataset", str(corpus()), "--out", str(out), "--num-tokens", str(num_tokens)]
    argv += ["--seq-len", str(SEQ_LEN), "--batch-size", "8", "--dtype", "float32", "--shard-mb", "0.02"]
    return main(argv + ["--no-progress", "--device", "cpu", *extra])


@functools.cache
def sequences() -> dict[int, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair().base)
    texts = iter_texts(load_text_dataset(str(corpus())), "text")
    out = {}
    for s in iter_sequences(texts, tok, SEQ_LEN, pack=True):
        out[s.seq_id] = s.ids
        if s.seq_id > 200:
            break
    return out


def site_output(spec: str, site: str, ids: list[int]) -> torch.Tensor:
    """``[len(ids), d]``: the model's output at ``site`` for the sequence alone (a forward hook)."""
    model = _hf(spec)
    got: list[torch.Tensor] = []
    h = model.get_submodule(site).register_forward_hook(lambda mod, i, o: got.append(o))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        h.remove()
    out = got[0]
    return (out[0] if isinstance(out, tuple) else out)[0]


@functools.cache
def _hf(spec: str):  # noqa: ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec).eval()


def check_rows(cache: PairedCache, models: list[str], sites: list[str], n_sample: int = 24) -> None:
    """Sampled rows: block (model m, site s) == that model's own forward at (sequence, position)."""
    rows = np.random.default_rng(0).choice(cache.n_rows, size=min(n_sample, cache.n_rows), replace=False)
    acts, index = cache.read(rows), cache.read_index(rows)
    seqs = sequences()
    blocks = [(m, s) for m in range(len(models)) for s in range(len(sites))]
    assert cache.n_models == len(blocks)
    for b, (m, s) in enumerate(blocks):
        ref = {int(q): site_output(models[m], sites[s], seqs[int(q)]) for q in set(index[:, 1].tolist())}
        expected = torch.stack([ref[int(q)][int(p)] for q, p in index[:, 1:]])
        d = expected.shape[-1]
        torch.testing.assert_close(acts[:, b, :d], expected, atol=2e-5, rtol=1e-5)
        assert (acts[:, b, d:] == 0).all()  # zero padding, exactly
    assert all(seqs[int(q)][int(p)] == int(t) for t, q, p in index)


def test_three_models_match_each_models_own_forward(tmp_path: Path) -> None:
    pair = tiny_pair()
    models = [str(pair.base), str(pair.ft), str(random_model(32, 1))]
    assert run(tmp_path / "c", models, ["transformer.h.0"]) == 0
    cache = PairedCache(tmp_path / "c")
    meta = cache.meta
    assert meta["n_models"] == 3 and meta["d_model"] == 32 and meta["d_models"] == [32, 32, 32]
    assert [m["name"] for m in meta["models"]] == models
    assert meta["sites"] == ["transformer.h.0"] and meta["site"] == "transformer.h.0"
    assert meta["blocks"] == [{"model": i, "site": 0} for i in range(3)]
    assert meta["collect"]["models"] == models and "base_model" not in meta["collect"]
    assert len(meta["tokenizer"]["fingerprints"]) == 3 and meta["tokenizer"]["identical"]
    assert cache.n_rows == 400
    check_rows(cache, models, ["transformer.h.0"])


def test_mixed_widths_zero_padded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    models = [str(tiny_pair().base), str(random_model(48, 2))]
    assert run(tmp_path / "c", models, ["transformer.h.1"], "--dry-run", num_tokens=1000) == 0
    said = capsys.readouterr().out
    assert "1,000 tokens x 2 models x 48 (float32)" in said and "widths 32/48 zero-padded to 48" in said
    assert not (tmp_path / "c").exists()
    assert run(tmp_path / "c", models, ["transformer.h.1"]) == 0
    cache = PairedCache(tmp_path / "c")
    assert cache.meta["d_models"] == [32, 48] and cache.d_model == 48
    acts = cache.read(np.arange(cache.n_rows))
    assert (acts[:, 0, 32:] == 0).all() and (acts[:, 1, 32:] != 0).any()
    stats = cache.meta["stats"]
    assert np.all(np.asarray(stats["mean"])[0, 32:] == 0) and np.all(np.asarray(stats["var"])[0, 32:] == 0)
    check_rows(cache, models, ["transformer.h.1"])


def test_two_sites_model_major_blocks(tmp_path: Path) -> None:
    pair = tiny_pair()
    models, sites = [str(pair.base), str(pair.ft)], ["transformer.h.0", "transformer.h.1"]
    assert run(tmp_path / "c", models, sites) == 0
    cache = PairedCache(tmp_path / "c")
    assert cache.n_models == 4 and cache.meta["sites"] == sites and cache.meta["d_models"] == [32] * 4
    assert cache.meta["blocks"] == [{"model": m, "site": s} for m in range(2) for s in range(2)]
    check_rows(cache, models, sites)
    # Sites given against execution order (and a nested one): read in one forward in the right order.
    rev = ["transformer.h.1", "transformer.h.0.mlp", "transformer.h.0"]
    assert run(tmp_path / "r", models, rev, num_tokens=60) == 0
    other = PairedCache(tmp_path / "r")
    check_rows(other, models, rev, n_sample=8)
    rows = np.arange(60)
    a, b = cache.read(rows), other.read(rows)
    torch.testing.assert_close(b[:, [0, 2, 3, 5]], a[:, [1, 0, 3, 2]], atol=1e-6, rtol=1e-6)


def test_one_forward_stops_after_the_last_site() -> None:
    from crosscoder.data.collect import build_collector, load_tokenizer
    from crosscoder.data.text import TokenSequence

    pair = tiny_pair()
    tok = load_tokenizer(str(pair.base))
    col = build_collector(
        [str(pair.base), str(pair.ft), str(random_model(48, 2))],
        ["transformer.h.0", "transformer.h.0.mlp"],
        tokenizer=tok,
        device=torch.device("cpu"),
    )
    assert col.d_models == [32, 32, 32, 32, 48, 48] and col.n_blocks == 6
    calls = []
    for m in col.models:
        m.hf.transformer.h[1].register_forward_hook(lambda *a: calls.append(1))
        m.hf.lm_head.register_forward_hook(lambda *a: calls.append(2))
    acts, index = col.rows([TokenSequence(0, [tok.bos_token_id, 10, 11, 12])])
    assert acts.shape == (3, 6, 48) and calls == [] and (acts[:, :4, 32:] == 0).all()


def test_model_spec_parsing(tmp_path: Path) -> None:
    assert parse_model_spec("org/model") == ("org/model", None)
    assert parse_model_spec("org/model@step1000") == ("org/model", "step1000")
    assert parse_model_spec("org/a@b@main") == ("org/a@b", "main")  # the LAST '@'
    assert parse_model_spec("org/model", "v2") == ("org/model", "v2")
    assert parse_model_spec("org/model@v2", "v2") == ("org/model", "v2")
    with pytest.raises(DataError, match="names revision 'v1' but 'v2'"):
        parse_model_spec("org/model@v1", "v2")
    with pytest.raises(DataError, match="REPO@REVISION"):
        parse_model_spec("org/model@")
    folder = tmp_path / "ckpt@step5"
    folder.mkdir()
    assert parse_model_spec(str(folder)) == (str(folder), None)  # an existing path is used as is
    with pytest.raises(DataError, match="not both"):
        CollectConfig(models=["a", "b"], base_model="a", site="s").model_specs()
    with pytest.raises(DataError, match="at least two models"):
        CollectConfig(models=["a"], site="s").model_specs()
    with pytest.raises(DataError, match="--ft-model: required"):
        CollectConfig(base_model="a", site="s").model_specs()
    cfg = CollectConfig(models=["a@r1", "b", "c@r3"], base_revision="r1", ft_revision="r2", site="s")
    assert cfg.model_specs() == [("a@r1", "r1"), ("b", "r2"), ("c@r3", "r3")]
    with pytest.raises(DataError, match="--site x: given twice"):
        CollectConfig(models=["a", "b"], sites=["x", "x"]).site_list()


def test_folder_with_at_sign_and_revision_suffix_through_the_cli(tmp_path: Path) -> None:
    pair = tiny_pair()
    at = tmp_path / "base@copy"
    shutil.copytree(pair.base, at)
    models = [str(at), f"{pair.ft}@v7"]  # a folder with '@' as a path; a folder + @revision split
    assert run(tmp_path / "c", models, ["transformer.h.0"], num_tokens=40) == 0
    meta = PairedCache(tmp_path / "c").meta
    assert [m["name"] for m in meta["models"]] == models and meta["models"][1]["revision"] == "v7"
    assert meta["collect"]["revisions"] == [None, "v7"]
    check_rows(PairedCache(tmp_path / "c"), [str(pair.base), str(pair.ft)], ["transformer.h.0"], 8)


def _interrupted(monkeypatch: pytest.MonkeyPatch, fn) -> None:  # noqa: ANN001
    """Run ``fn`` with a crash right after the second shard reached the disk."""
    original = PairedCacheWriter._write_shard
    calls = {"n": 0}

    def dying(self, acts, index):  # noqa: ANN001, ANN202
        original(self, acts, index)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(PairedCacheWriter, "_write_shard", dying)
    assert fn() == 130  # the CLI's exit code for an interruption
    monkeypatch.setattr(PairedCacheWriter, "_write_shard", original)


def _same_cache(a: Path, b: Path) -> None:
    ca, cb = PairedCache(a), PairedCache(b)
    rows = np.arange(ca.n_rows)
    assert ca.n_rows == cb.n_rows
    np.testing.assert_array_equal(ca.read_index(rows), cb.read_index(rows))
    torch.testing.assert_close(ca.read(rows), cb.read(rows), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ca.norm_scale(), cb.norm_scale(), rtol=1e-6)


def test_resume_three_models_and_refuse_another_model_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pair = tiny_pair()
    models = [str(pair.base), str(pair.ft), str(random_model(48, 2))]
    site = ["transformer.h.0"]
    assert run(tmp_path / "full", models, site) == 0
    _interrupted(monkeypatch, lambda: run(tmp_path / "part", models, site))
    meta = json.loads((tmp_path / "part" / "meta.json").read_text())
    assert not meta["complete"] and 0 < meta["n_rows"] < 400
    capsys.readouterr()
    assert run(tmp_path / "part", models[:2], site, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume: models" in err[0]
    assert run(tmp_path / "part", models, site, "--resume") == 0
    _same_cache(tmp_path / "full", tmp_path / "part")
    capsys.readouterr()
    assert run(tmp_path / "part", models[::-1], site, "--resume") == 2  # complete: still checked
    assert "cannot resume: models" in capsys.readouterr().err


def test_two_model_spelling_same_cache_and_old_caches_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pair = tiny_pair()
    models, site = [str(pair.base), str(pair.ft)], ["transformer.h.0"]
    old = ["--base-model", models[0], "--ft-model", models[1]]
    assert run(tmp_path / "new", models, site) == 0
    assert run(tmp_path / "old", [], site, *old) == 0
    for f in sorted((tmp_path / "new").glob("*.npy")):
        assert f.read_bytes() == (tmp_path / "old" / f.name).read_bytes(), f.name
    capsys.readouterr()
    assert run(tmp_path / "both", models, site, *old) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not both" in err[0]
    # A cache written before --model existed (no models/sites/revisions/d_models/blocks) still resumes.
    _interrupted(monkeypatch, lambda: run(tmp_path / "part", [], site, *old))
    meta_path = tmp_path / "part" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for k in ("sites", "blocks", "d_models"):
        meta.pop(k)
    for k in ("models", "revisions", "sites"):
        meta["collect"].pop(k)
    meta_path.write_text(json.dumps(meta))
    assert run(tmp_path / "part", [], site, *old, "--resume") == 0
    _same_cache(tmp_path / "old", tmp_path / "part")


def test_tokenizer_mismatch_among_three_models_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pair = tiny_pair()
    other = str(mismatched_ft())
    assert run(tmp_path / "c", [str(pair.base), str(pair.ft), other], ["transformer.h.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tokenizers of the reference model")
    assert f"model 2 {other}" in err[0] and str(pair.base) in err[0]
    assert not (tmp_path / "c").exists()
    args = ["--allow-tokenizer-mismatch"]
    assert run(tmp_path / "c", [str(pair.base), str(pair.ft), other], ["transformer.h.0"], *args) == 0
    meta = PairedCache(tmp_path / "c").meta
    assert meta["tokenizer"]["mismatch"].startswith(other) and not meta["tokenizer"]["identical"]


def test_rank_shares_of_three_models_merge_into_the_single_process_cache(tmp_path: Path) -> None:
    """What torchrun does (each rank collects seq_id % N == rank, rank 0 merges), in one process."""
    from conftest_collect import mixed_lengths

    from crosscoder.data.collect import collect
    from crosscoder.data.collect_dist import merge_caches

    pair = tiny_pair()
    kw = dict(
        models=[str(pair.base), str(pair.ft), str(random_model(48, 2))],
        sites=["transformer.h.0", "transformer.h.1"],
        dataset=str(mixed_lengths()),
        num_tokens=10**6,
        seq_len=16,
        batch_size=4,
        dtype="float32",
        shard_mb=0.05,
        progress=False,
        device="cpu",
    )
    collect(CollectConfig(out=str(tmp_path / "single"), **kw), say=lambda s: None)  # type: ignore[arg-type]
    parts = [tmp_path / "multi" / f"rank_{r:03d}" for r in range(2)]
    for r, part in enumerate(parts):
        collect(CollectConfig(out=str(part), **kw), say=lambda s: None, rank=r, world_size=2)  # type: ignore[arg-type]
    meta = merge_caches(parts, tmp_path / "multi")
    assert meta["d_models"] == [32, 32, 32, 32, 48, 48] and len(meta["blocks"]) == 6
    a, b = PairedCache(tmp_path / "single"), PairedCache(tmp_path / "multi")
    assert a.n_rows == b.n_rows > 0
    ia, ib = a.read_index(np.arange(a.n_rows)), b.read_index(np.arange(b.n_rows))
    oa, ob = np.lexsort((ia[:, 2], ia[:, 1])), np.lexsort((ib[:, 2], ib[:, 1]))
    np.testing.assert_array_equal(ia[oa], ib[ob])
    torch.testing.assert_close(a.read(oa), b.read(ob), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(a.stats["mean"]), np.asarray(b.stats["mean"]), rtol=1e-9, atol=1e-12
    )
