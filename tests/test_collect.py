"""Collection (issue 3): parity with plain forwards, alignment, resume, corruption, memory, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_collect import collect_config, corpus, mismatched_ft, mixed_lengths, quiet, rss_bytes, tiny_pair

from crosscoder.cli import main
from crosscoder.data.collect import collect, make_batch
from crosscoder.data.paired import PairedCache, PairedCacheWriter
from crosscoder.data.text import TokenSequence, iter_sequences, iter_texts, load_text_dataset
from crosscoder.errors import DataError

torch.set_num_threads(1)


def _models() -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pair = tiny_pair()
    tok = AutoTokenizer.from_pretrained(pair.base)
    return tok, [AutoModelForCausalLM.from_pretrained(p).eval() for p in (pair.base, pair.ft)]


def _sequences(tok, dataset: Path, seq_len: int, pack: bool) -> dict[int, list[int]]:
    texts = iter_texts(load_text_dataset(str(dataset)), "text")
    return {s.seq_id: s.ids for s in iter_sequences(texts, tok, seq_len, pack=pack)}


def test_make_batch_left_pads_with_positions_from_first_token() -> None:
    b = make_batch([TokenSequence(0, [5, 6, 7]), TokenSequence(1, [1, 2, 3, 4, 9])], pad_id=0)
    assert b["input_ids"].tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 9]]
    assert b["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_left_padding_trap_is_real_for_gpt2() -> None:
    """Without explicit position_ids, a left-padded GPT-2 row is shifted: what collect avoids."""
    tok, (base, _) = _models()
    short = [tok.bos_token_id, 40, 41, 42]
    b = make_batch([TokenSequence(0, short), TokenSequence(1, [tok.bos_token_id] + list(range(50, 59)))], 0)
    with torch.no_grad():
        alone = base(torch.tensor([short]), output_hidden_states=True).hidden_states[1][0]
        wrong = base(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True
        ).hidden_states[1][0, -4:]
        right = base(**b, output_hidden_states=True).hidden_states[1][0, -4:]
    assert not torch.allclose(wrong, alone, atol=1e-3)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("site", ["transformer.h.0", "transformer.h.1.mlp"])
def test_parity_with_plain_unpadded_forward(tmp_path: Path, site: str) -> None:
    """Cached rows == each sequence alone through plain transformers (hidden states / forward hook),
    for both models, on batches of mixed lengths; BOS and padding dropped for both."""
    cfg = collect_config(
        tmp_path / "c", site=site, dataset=str(mixed_lengths()), pack=False, num_tokens=10_000
    )
    summary = collect(cfg, say=quiet)
    assert summary["dropped"]["pad"] > 0 and summary["dropped"]["bos"] == 40  # one BOS per sequence
    cache = PairedCache(tmp_path / "c")
    tok, models = _models()
    seqs = _sequences(tok, mixed_lengths(), 32, pack=False)
    assert len({len(s) for s in seqs.values()}) > 5  # mixed lengths
    assert cache.n_rows == sum(len(s) - 1 for s in seqs.values())  # every position except BOS
    rows = np.arange(cache.n_rows)
    acts, index = cache.read(rows), cache.read_index(rows)
    assert not (index[:, 0] == tok.bos_token_id).any() and (index[:, 2] >= 1).all()
    for m, model in enumerate(models):
        ref: dict[int, torch.Tensor] = {}
        for sid, ids in seqs.items():
            with torch.no_grad():
                if site == "transformer.h.0":
                    ref[sid] = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
                else:
                    got: list[torch.Tensor] = []
                    h = model.get_submodule(site).register_forward_hook(
                        lambda mod, i, o, got=got: got.append(o)
                    )
                    model(torch.tensor([ids]))
                    h.remove()
                    ref[sid] = got[0][0]
        expected = torch.stack([ref[int(s)][int(p)] for s, p in index[:, 1:]])
        torch.testing.assert_close(acts[:, m], expected, atol=2e-5, rtol=1e-5)
        assert all(seqs[int(s)][int(p)] == int(t) for t, s, p in index)
    assert not torch.equal(acts[:, 0], acts[:, 1])  # the two models really differ


def test_stop_after_site_skips_later_layers(tmp_path: Path) -> None:
    pair = tiny_pair()
    from crosscoder.data.collect import build_collector, load_tokenizer

    tok = load_tokenizer(str(pair.base))
    col = build_collector(
        str(pair.base), str(pair.ft), "transformer.h.0", tokenizer=tok, device=torch.device("cpu")
    )
    calls = []
    for m in col.models:
        m.hf.transformer.h[1].register_forward_hook(lambda *a: calls.append(1))
        m.hf.lm_head.register_forward_hook(lambda *a: calls.append(2))
    acts, index = col.rows([TokenSequence(0, [tok.bos_token_id, 10, 11, 12])])
    assert acts.shape == (3, 2, 32) and not acts.requires_grad and calls == []


def test_tokenizer_mismatch_refused_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = mismatched_ft()
    with pytest.raises(DataError, match="tokenizers of the base and fine-tuned models differ"):
        collect(collect_config(tmp_path / "a", ft_model=str(other)), say=quiet)
    assert not (tmp_path / "a").exists()
    pair = tiny_pair()
    rc = main(
        [
            "collect",
            "--base-model",
            str(pair.base),
            "--ft-model",
            str(other),
            "--site",
            "transformer.h.0",
            "--dataset",
            str(corpus()),
            "--out",
            str(tmp_path / "b"),
            "--num-tokens",
            "100",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: tokenizers")
    collect(
        collect_config(tmp_path / "c", ft_model=str(other), allow_tokenizer_mismatch=True, num_tokens=300),
        say=quiet,
    )
    meta = PairedCache(tmp_path / "c").meta
    assert meta["tokenizer"]["mismatch"] and meta["tokenizer"]["base"] != meta["tokenizer"]["ft"]


def test_resume_after_interruption_matches_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = tmp_path / "full"
    collect(collect_config(full, num_tokens=1500), say=quiet)
    original = PairedCacheWriter._write_shard
    calls = {"n": 0}

    def dying(self, acts, index):  # a crash right after the second shard reached the disk
        original(self, acts, index)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(PairedCacheWriter, "_write_shard", dying)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        collect(collect_config(part, num_tokens=1500), say=quiet)
    monkeypatch.setattr(PairedCacheWriter, "_write_shard", original)
    meta = json.loads((part / "meta.json").read_text())
    assert not meta["complete"] and len(meta["shards"]) == 2 and 0 < meta["n_rows"] < 1500
    with pytest.raises(DataError, match="--resume"):
        collect(collect_config(part, num_tokens=1500), say=quiet)
    with pytest.raises(DataError, match="cannot resume: site"):
        collect(collect_config(part, num_tokens=1500, site="transformer.h.1", resume=True), say=quiet)
    said: list[str] = []
    out = collect(collect_config(part, num_tokens=1500, resume=True), say=said.append)
    assert out["resumed"] and any("resuming" in s for s in said)
    a, b = PairedCache(full), PairedCache(part)
    rows = np.arange(1500)
    assert a.n_rows == b.n_rows == 1500
    np.testing.assert_array_equal(a.read_index(rows), b.read_index(rows))
    torch.testing.assert_close(a.read(rows), b.read(rows), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(a.norm_scale(), b.norm_scale(), rtol=1e-6)
    assert collect(collect_config(part, num_tokens=1500, resume=True), say=quiet)["rows"] == 1500  # no-op


def test_corrupted_or_truncated_shard_named_at_load(tmp_path: Path) -> None:
    collect(collect_config(tmp_path / "c", num_tokens=1200), say=quiet)
    shard = tmp_path / "c" / "shard_00001.acts.npy"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard_00001.acts.npy: corrupted shard"):
        PairedCache(tmp_path / "c")
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(DataError, match="shard_00001.acts.npy: truncated"):
        PairedCache(tmp_path / "c", verify="size")


def test_dry_run_prints_estimate_and_writes_nothing(tmp_path: Path) -> None:
    said: list[str] = []
    est = collect(
        collect_config(tmp_path / "c", dtype="bfloat16", num_tokens=1_000_000, dry_run=True), say=said.append
    )
    assert est["total_bytes"] == 1_000_000 * (2 * 32 * 2 + 24)
    assert any(s.startswith("disk estimate: 1,000,000 tokens x 2 models x 32 (bfloat16)") for s in said)
    assert not (tmp_path / "c").exists()


def test_memory_stays_flat_over_a_long_collection(tmp_path: Path) -> None:
    samples: list[int] = []

    def probe(rows: int) -> None:
        samples.append(rss_bytes())

    cfg = collect_config(tmp_path / "c", num_tokens=60_000, batch_size=16, seq_len=32, shard_mb=0.5)
    collect(cfg, on_batch=probe, say=quiet)
    assert len(samples) > 100
    growth = samples[-1] - samples[20]
    # 15 MB of activations went through the process; keeping them (a leak) measured +12 MB here,
    # a correct run +1 MB alone and up to +5 MB while other processes load the machine (allocator noise).
    assert growth < 7 * 2**20, growth


def test_max_norm_ratio_drops_positions_for_both_models(tmp_path: Path) -> None:
    from crosscoder.data.collect import NormFilter

    f = NormFilter(3.0, n_models=2)
    keep = f(torch.tensor([[1.0, 1.0], [1.1, 0.9], [10.0, 1.0], [1.0, 10.0], [0.9, 1.2]]))
    assert keep.tolist() == [True, True, False, False, True]  # an outlier on either side drops the row
    assert f(torch.tensor([[2.5, 2.5], [3.5, 1.0]])).tolist() == [True, False]  # against the running median
    # On a whole (exhausted) dataset: the filtered cache is the plain one minus the dropped rows.
    plain = collect(collect_config(tmp_path / "a", dataset=str(mixed_lengths()), num_tokens=10**6), say=quiet)
    filt = collect(
        collect_config(tmp_path / "b", dataset=str(mixed_lengths()), num_tokens=10**6, max_norm_ratio=1.1),
        say=quiet,
    )
    assert plain["dropped"]["norm_outlier"] == 0 < filt["dropped"]["norm_outlier"]
    a, b = PairedCache(tmp_path / "a"), PairedCache(tmp_path / "b")
    assert b.n_rows == a.n_rows - filt["dropped"]["norm_outlier"]
    ia = {tuple(r): i for i, r in enumerate(a.read_index(np.arange(a.n_rows))[:, 1:].tolist())}
    ib = b.read_index(np.arange(b.n_rows))[:, 1:].tolist()
    rows = np.array([ia[tuple(r)] for r in ib])  # every kept row is a row of the plain cache ...
    torch.testing.assert_close(b.read(np.arange(b.n_rows)), a.read(rows))  # ... for both models


def test_user_errors_are_one_line_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"--site transformer\.h\.9: no such module .*transformer\.h\.N"):
        collect(collect_config(tmp_path / "a", site="transformer.h.9"), say=quiet)
    with pytest.raises(DataError, match="no column 'body'"):
        collect(collect_config(tmp_path / "b", text_column="body"), say=quiet)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        collect(collect_config(tmp_path / "c", dataset=str(empty)), say=quiet)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="not a paired cache"):
        collect(collect_config(tmp_path / "junk"), say=quiet)


def test_chat_messages_rendered_with_a_template(tmp_path: Path) -> None:
    chats = tmp_path / "chats.jsonl"
    convo = [{"role": "user", "content": "what is a list?"}, {"role": "assistant", "content": "a sequence"}]
    chats.write_text("".join(json.dumps({"messages": convo}) + "\n" for _ in range(5)))
    tok, _ = _models()
    texts = list(iter_texts(load_text_dataset(str(chats)), "text", "ft", {"ft": tok}))
    assert texts[0] == tok.apply_chat_template(convo, tokenize=False) and "<|user|>" in texts[0]
    with pytest.raises(DataError, match="chat-template"):
        collect(collect_config(tmp_path / "a", dataset=str(chats)), say=quiet)
    collect(
        collect_config(tmp_path / "b", dataset=str(chats), chat_template="base", num_tokens=50), say=quiet
    )
    assert PairedCache(tmp_path / "b").n_rows == 50


def test_datasets_by_file_folder_and_save_to_disk(tmp_path: Path) -> None:
    import datasets

    texts = ["alpha beta", "gamma delta epsilon", "zeta"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("\n".join(texts) + "\n")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "t.parquet"))
    for spec in ("t.jsonl", "txt", "saved", "t.parquet"):
        assert list(iter_texts(load_text_dataset(str(tmp_path / spec)), "text")) == texts, spec
    with pytest.raises(DataError, match="no json/jsonl/parquet"):
        load_text_dataset(str(tmp_path / "saved" / ".." / "txt" / "*.csv"))
