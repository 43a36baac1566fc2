"""The story figures of a corpus with a ``domain`` column: token domains replayed from the packing,
domain fractions of confirmed ft-only contexts, median decoder cosine of shared latents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crosscoder.analysis.story import (
    domain_fractions,
    format_story,
    load_token_domains,
    story_figures,
    token_domains,
)
from crosscoder.data.text import iter_sequences


class CharTokenizer:
    """One id per character (``a`` = 1, ``b`` = 2, ...); BOS = EOS = 0."""

    bos_token_id = 0
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) - ord("a") + 1 for c in t] for t in texts]}


def test_token_domains_packed_by_hand() -> None:
    # stream after each document's EOS: a b E | c d e E | f E -> windows of 3 after a BOS
    docs = [([1, 2], 0), ([3, 4, 5], 1), ([6], 0)]
    codes = token_domains(docs, bos_id=0, eos_id=0, seq_len=4, n_sequences=4)
    expected = [
        [0, 0, 0, 0],  # BOS a b E(doc 0)
        [1, 1, 1, 1],  # BOS c d e
        [1, 1, 0, 0],  # BOS(takes E's domain) E(doc 1) f E(doc 0)
        [-1, -1, -1, -1],  # nothing left: no fourth sequence
    ]
    assert codes.tolist() == expected
    # the tail: a last, shorter window; and n_sequences stops the replay early
    tail = token_domains([([1, 2, 3, 4], 2), ([5], 1)], 0, 0, seq_len=4, n_sequences=3)
    assert tail.tolist() == [[2, 2, 2, 2], [2, 2, 2, 1], [1, 1, -1, -1]]
    assert token_domains(docs, 0, 0, seq_len=4, n_sequences=1).tolist() == [[0, 0, 0, 0]]
    # unpacked: one truncated sequence per document
    assert token_domains(docs, 0, 0, seq_len=3, n_sequences=3, pack=False).tolist() == [
        [0, 0, 0],
        [1, 1, 1],
        [0, 0, -1],
    ]


@pytest.mark.parametrize("pack", [True, False])
def test_token_domains_match_the_collections_sequences(pack: bool) -> None:
    # documents of domain d are written with the letter of id d + 1 only: every real token names its domain
    tok = CharTokenizer()
    dom = [0, 1, 1, 2, 0, 1, 2, 2, 0]
    lengths = [5, 3, 0, 11, 1, 3, 7, 2, 4]
    texts = ["abc"[d] * n for d, n in zip(dom, lengths, strict=True)]
    seqs = list(iter_sequences(texts, tok, seq_len=5, pack=pack))
    ids = tok(texts)["input_ids"]
    codes = token_domains(zip(ids, dom, strict=True), 0, 0, 5, len(seqs), pack=pack)
    assert codes.shape == (len(seqs), 5)
    n_real = 0
    for s in seqs:
        n = len(s.ids)
        assert (codes[s.seq_id, :n] >= 0).all() and (codes[s.seq_id, n:] == -1).all()
        for pos, token in enumerate(s.ids):
            if token > 0:
                assert codes[s.seq_id, pos] == token - 1
                n_real += 1
    assert n_real == sum(min(n, 4) if not pack else n for n in lengths if pack or n + 1 >= 2)


def _table() -> dict[str, np.ndarray]:
    return {
        "class": np.array(
            ["ft_only", "shared", "shared", "ft_only", "other", "ft_only", "shared"], dtype=object
        ),
        "kind": np.array(["free"] * 5 + ["ft_only", "free"], dtype=object),
        "cos_sim": np.array([0.1, 0.9, 0.7, 0.2, 0.5, 0.0, 0.95]),
    }


def _contexts() -> dict[int, list[dict]]:
    return {
        0: [{"seq": 0, "pos": 1}, {"seq": 1, "pos": 2}, {"seq": 0, "pos": 0}],
        3: [{"seq": 1, "pos": 0}, {"seq": -1, "pos": -1}],  # the second: position unknown, not counted
        4: [{"seq": 0, "pos": 0}] * 5,  # not ft-only
        5: [{"seq": 0, "pos": 0}] * 5,  # ft-only by construction (dedicated), not confirmed by scaling
    }


CODES = np.array([[0, 1, 1], [1, 2, 1]])  # names: prose, code, data
NAMES = ["prose", "code", "data"]


def test_story_figures_by_hand() -> None:
    s = story_figures(_table(), _contexts(), CODES, NAMES)
    # ft-only confirmed: free latents 0 and 3; contexts (0,1) code, (1,2) code, (0,0) prose, (1,0) code
    assert s["ft_only_confirmed"] == 2 and s["ft_only_latents"] == [0, 3]
    assert s["ft_only_contexts"] == 4
    assert s["ft_only_code_fraction"] == pytest.approx(0.75)
    assert s["ft_only_domains"] == pytest.approx({"prose": 0.25, "code": 0.75, "data": 0.0})
    # shared: latents 1, 2, 6 with cosines 0.9, 0.7, 0.95 -> median 0.9
    assert s["shared"] == 3 and s["shared_median_cos"] == pytest.approx(0.9)
    assert "75% of their 4 top contexts from code" in format_story(s)
    # without Latent Scaling no norm-exclusive call is confirmed
    off = story_figures(_table(), _contexts(), CODES, NAMES, latent_scaling=False)
    assert off["ft_only_confirmed"] == 0 and off["ft_only_code_fraction"] is None
    assert off["shared_median_cos"] == pytest.approx(0.9)
    fr, n = domain_fractions(_contexts(), [4], CODES, NAMES)
    assert n == 5 and fr["prose"] == 1.0


def test_load_token_domains_reads_the_domain_column(tmp_path) -> None:
    data = tmp_path / "corpus.jsonl"
    rows = [("abcab", "prose"), ("ccc", "code"), ("abcabc", "data"), ("cab", "code")]
    data.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for t, d in rows))
    tok = CharTokenizer()
    n_seq = len(list(iter_sequences([t for t, _ in rows], tok, 5)))
    meta = {"collect": {"dataset": str(data), "seq_len": 5, "pack": True}, "n_sequences": n_seq}
    codes, names = load_token_domains(meta, tok)
    assert names == ["prose", "code", "data"]
    # stream: abcabE (prose) cccE (code) abcabcE (data) cabE (code), windows of 4 after BOS
    # 21 tokens, windows of 4 after a BOS that takes its first token's domain; a 1-token tail
    assert codes.tolist() == [
        [0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1],
        [1, 1, 1, 2, 2],
        [2, 2, 2, 2, 2],
        [2, 2, 1, 1, 1],
        [1, 1, -1, -1, -1],
    ]
    no_domain = tmp_path / "plain.jsonl"
    no_domain.write_text(json.dumps({"text": "abc"}) + "\n")
    assert (
        load_token_domains({**meta, "collect": {**meta["collect"], "dataset": str(no_domain)}}, tok) is None
    )
    assert load_token_domains({"collect": {}, "n_sequences": 3}, tok) is None
