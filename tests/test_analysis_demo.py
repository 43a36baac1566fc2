"""Analysis on the tiny offline GPT-2 pair: spliced-in CE/KL through nnsight, ``crosscoder analyze`` end
to end (token contexts, report), and the report in headless Chromium (``apt-get install -y chromium``)."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from conftest import require_chromium

from crosscoder.analysis.browser import check_page, screenshot
from crosscoder.cli import main
from crosscoder.config import CrossCoderConfig, DataConfig, RunConfig, TrainConfig
from crosscoder.train import run_training

torch.set_num_threads(1)

SITE = "transformer.h.1"  # the SMALL pair's last block: zero-ablating it costs a lot of loss


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from crosscoder.data.collect import CollectConfig, collect
    from crosscoder.data.demo_pair import SMALL, build_demo_pair, code_documents, prose_documents

    root = tmp_path_factory.mktemp("tiny")
    pair = build_demo_pair(SMALL, root=root / "pair")
    cache = root / "cache"
    collect(
        CollectConfig(
            base_model=str(pair.base),
            ft_model=str(pair.ft),
            site=SITE,
            dataset=str(pair.corpus),
            out=str(cache),
            num_tokens=12_000,
            seq_len=32,
            batch_size=32,
            dtype="float32",
            progress=False,
            device="cpu",
        ),
        say=lambda s: None,
    )
    # Held-out text: standard-library documents past the ones the pair was trained on.
    docs = prose_documents(300_000)[-30:] + code_documents(300_000)[-30:]
    eval_data = root / "eval.jsonl"
    eval_data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    runs = {}
    for steps in (1, 120):
        cfg = RunConfig(
            model=CrossCoderConfig(arch="batchtopk", d_latent=64, k=4, threshold_beta=0.9),
            train=TrainConfig(
                num_tokens=steps * 256,
                batch_size=256,
                lr=3e-3,
                val_tokens=1024,
                val_every=0,
                log_every=1 if steps == 1 else 10,
                save_every=0,
                wandb="off",
                progress=False,
                device="cpu",
            ),
            data=DataConfig(cache=str(cache), verify_cache="size"),
        )
        run_training(cfg, root / f"cc-{steps}")
        runs[steps] = root / f"cc-{steps}"
    return {"root": root, "pair": pair, "cache": cache, "eval": eval_data, "runs": runs}


def test_spliced_in_loss_recovered_rises_with_training(tiny):
    from crosscoder.analysis.spliced import heldout_sequences, spliced_eval
    from crosscoder.data.collect import load_site_model, load_tokenizer
    from crosscoder.model import CrossCoder

    tok = load_tokenizer(str(tiny["pair"].base))
    seqs = heldout_sequences(str(tiny["eval"]), tok, 32, 48)
    assert len(seqs) == 48
    base = load_site_model(str(tiny["pair"].base), SITE, tokenizer=tok)
    ft = load_site_model(str(tiny["pair"].ft), SITE, tokenizer=tok)
    res = {
        steps: spliced_eval(
            CrossCoder.from_pretrained(run), base, ft, seqs, tok.pad_token_id or 0, tok.bos_token_id
        )
        for steps, run in tiny["runs"].items()
    }
    for name in ("base", "ft"):
        early, late = res[1][name], res[120][name]
        assert early["ce_clean"] == pytest.approx(late["ce_clean"])  # same models, same text
        assert early["ce_zero"] > early["ce_clean"] + 0.1  # the site matters
        # Centred training starts b_dec at the data mean, which alone recovers almost all of the CE here
        # (the site's mean dwarfs its variation), so CE recovered is ~1 from the first step; the KL of
        # the spliced-in model to the clean one is what training shrinks.
        assert 0.0 <= early["frac_recovered"] <= 1.0 and 0.99 < late["frac_recovered"] <= 1.0, (early, late)
        assert late["kl_spliced"] < early["kl_spliced"] and late["kl_spliced"] < late["kl_zero"]
    swap = res[120]["ft_swap"]
    assert swap["kl_base_recon"] > 0 and swap["kl_base_acts"] > 0
    # clean CE through nnsight equals a plain forward's loss on an unpadded sequence
    ids = torch.tensor([seqs[0].ids])
    with torch.no_grad():
        ref = base.hf(input_ids=ids, labels=ids).loss
    one = spliced_eval(
        CrossCoder.from_pretrained(tiny["runs"][120]), base, ft, seqs[:1], tok.pad_token_id or 0, None
    )
    assert one["base"]["ce_clean"] == pytest.approx(float(ref), rel=1e-5)


def _png_size_and_colours(path):
    """(width, height, distinct colours in a row sample) of an RGB(A) PNG, with the standard library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h, depth, ctype = struct.unpack(">IIBB", data[16:26])
    idat, pos = b"", 8
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    bpp = 4 if ctype == 6 else 3
    stride = w * bpp + 1
    rows = [raw[i * stride + 1 : (i + 1) * stride] for i in range(0, h, max(1, h // 50))]
    return w, h, len({bytes(r[j : j + bpp]) for r in rows for j in range(0, len(r), bpp * 7)})


def test_analyze_cli_on_the_tiny_pair_and_report_in_chromium(tiny, tmp_path):
    out = tiny["root"] / "report"
    rc = main(
        [
            "analyze",
            str(tiny["runs"][120]),
            "--cache",
            str(tiny["cache"]),
            "--out",
            str(out),
            "--eval-sequences",
            "16",
            "--top-k",
            "4",
        ]
    )
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["site"] == SITE and s["arch"] == "batchtopk" and "ground_truth" not in s
    sp = s["spliced"]
    assert (
        sp["held_out"] is True and sp["n_sequences"] == 16 and sp["skip"] > 0
    )  # after the collected sequences
    for name in ("base", "ft"):
        assert 0.0 <= sp[name]["frac_recovered"] <= 1.0
    assert set(s["classes"]) == {"base_only", "shared", "ft_only", "other"}
    html = (out / "report.html").read_text()
    assert "Spliced-in evaluation" in html and "http://" not in html and "https://" not in html
    # contexts decoded with the pair's tokenizer: real text, not token ids
    data = html.split("id='report-data'>", 1)[1].split("</script>", 1)[0].replace("<\\/", "</")
    contexts = json.loads(data)["contexts"]
    first = next(c for cs in contexts.values() for c in cs)
    assert first["tokens"][first["mark"]] and not first["tokens"][first["mark"]].startswith("#")
    # an existing report is not replaced without --overwrite
    assert main(["analyze", str(tiny["runs"][120]), "--cache", str(tiny["cache"]), "--out", str(out)]) == 2

    # Headless Chromium: no console errors, the table renders, a screenshot shows it. Without the browser
    # the checks above still ran; the test is then skipped (failed under CI), see require_chromium.
    require_chromium()
    page = check_page(out / "report.html")
    assert page.ok, (page.status, page.page_errors, page.console_errors, page.table_rows)
    assert page.table_rows == 64 - s["dead"] > 0  # live latents (the default filter)
    shot = screenshot(out / "report.html", tmp_path / "table.png", width=1200, height=900, anchor="table")
    w, h, colours = _png_size_and_colours(shot)
    assert (w, h) == (1200, 900) and colours > 5
    table_view = check_page(out / "report.html", anchor="table")  # the table view also opens the first card
    assert table_view.ok and '<div class="card" data-latent=' in table_view.dom
    assert 'class="tok mark"' in table_view.dom and '<svg class="hist"' in table_view.dom
    # The check is not vacuous: a script error and a failed load are reported.
    broken = tmp_path / "broken.html"
    broken.write_text(
        html.replace(
            "<div class='note'>status:", "<script>undefinedFunction();</script><div class='note'>status:", 1
        )
    )
    bad = check_page(broken)
    assert not bad.ok and any("undefinedFunction" in e for e in bad.page_errors + bad.console_errors)
