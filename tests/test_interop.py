"""Interop (issue 7): save/load round trips, model card, push_to_hub (offline), converters, CLI errors.

The converters are checked against small re-derivations of each source format's forward pass,
written here from the formats' documented equations (see docs/interop.md), on files laid out exactly
as the sources write them (``torch.save`` of a tensor dict; safetensors + config.json folder).
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from crosscoder.cli import main
from crosscoder.config import CrossCoderConfig
from crosscoder.errors import CrossCoderError
from crosscoder.interop.convert import convert, load_foreign
from crosscoder.interop.hub import push_to_hub, render_model_card, write_model_card
from crosscoder.model import architecture_names
from crosscoder.model.crosscoder import CrossCoder

torch.set_num_threads(1)

M, D, H, K = 2, 8, 32, 4
ATOL, RTOL = 1e-5, 1e-4


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def rand_x(seed: int = 0, n: int = 16, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, M, D, generator=torch.Generator().manual_seed(seed)) * scale


def run_cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------------------- our models
def make_model(arch: str = "vanilla", seed: int = 0) -> CrossCoder:
    g = torch.Generator().manual_seed(seed)
    cfg = CrossCoderConfig(
        arch=arch,
        d_latent=H,
        k=K,
        d_model=D,
        n_models=M,
        model_names=["org/base", "org/chat"],
        site="model.layers.3",
    )
    model = CrossCoder(cfg, generator=g)
    with torch.no_grad():
        model.W_enc.mul_(4.0)
        model.b_enc.copy_(torch.randn(H, generator=g) * 0.1)
        model.b_dec.copy_(torch.randn(M, D, generator=g))
        if arch == "batchtopk":
            model.arch.threshold.fill_(0.05)
    return model.eval()


def make_run_dir(tmp_path: Path, arch: str = "batchtopk") -> tuple[Path, CrossCoder]:
    model = make_model(arch)
    run = tmp_path / "runs" / "x"
    extra = {
        "train": {"lr": 0.001, "batch_size": 2048, "l1_coeff": 1.0},
        "data": {"cache": "/data/cache"},
        "metrics": {"val": {"fvu": 0.1234, "l0": 31.5}, "dead_frac": 0.02},
    }
    model.save_pretrained(run, extra_config=extra)
    (run / "relative_norms.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    return run, model


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_save_load_round_trip(tmp_path: Path, arch: str) -> None:
    model = make_model(arch)
    model.save_pretrained(tmp_path / "m")
    loaded = CrossCoder.from_pretrained(tmp_path / "m")
    assert loaded.cfg.arch == arch and loaded.cfg.model_names == ["org/base", "org/chat"]
    x = rand_x()
    f = model.encode(x)
    assert 0 < int((f > 0).sum()) < f.numel()
    close(loaded.encode(x), f)
    close(loaded.decode(f), model.decode(f))
    for a, b in zip(loaded(x), model(x), strict=True):
        close(a, b)
    if arch == "batchtopk":
        assert float(loaded.arch.threshold) == pytest.approx(0.05)


@pytest.mark.parametrize("layout", [{}, {"dedicated_base": 3, "dedicated_ft": 3, "shared_latents": 4}])
@pytest.mark.parametrize("arch", architecture_names())  # every registered architecture
def test_every_architecture_round_trips(tmp_path: Path, arch: str, layout: dict) -> None:
    """save_pretrained -> push_to_hub (staged locally) -> from_pretrained keeps the architecture's own state
    (thresholds), its options and the latent layout: identical latents and reconstructions."""
    g = torch.Generator().manual_seed(1)
    cfg = CrossCoderConfig(arch=arch, d_latent=H, k=K, d_model=D, n_models=M, **layout)
    model = CrossCoder(cfg, generator=g)
    with torch.no_grad():
        model.b_enc.copy_(torch.randn(H, generator=g) * 0.1)
        for t in model.arch.parameters():  # e.g. JumpReLU's per-latent thresholds
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        for t in model.arch.buffers():  # e.g. BatchTopK's threshold
            if t.is_floating_point():
                t.fill_(0.05)
    model.fold([2.0, 0.5]).eval()
    run = tmp_path / "run"
    model.save_pretrained(run)
    out = tmp_path / "staged"
    push_to_hub(run, "user/cc", local_dir=out)
    loaded = CrossCoder.from_pretrained(out)
    # the saved config records the resolved shared-latent factor (the architecture's default when unset)
    assert dataclasses.replace(loaded.cfg, shared_sparsity_coeff=None) == model.cfg
    assert loaded.layout == model.layout
    for (n, a), (_, b) in zip(model.arch.state_dict().items(), loaded.arch.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    x = rand_x()
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded(x)[0], model(x)[0])
    assert f"- {arch}\n" in (out / "README.md").read_text()


# --------------------------------------------------------------------------------------- model card
def test_model_card_content(tmp_path: Path) -> None:
    run, _ = make_run_dir(tmp_path)
    card = write_model_card(run, repo_id="user/my-crosscoder").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: crosscoder" in front
    for tag in ("crosscoder", "model-diffing", "sparse-autoencoder", "batchtopk"):
        assert f"- {tag}\n" in front
    assert "`org/base` vs `org/chat`" in body and "| A (base) | org/base |" in body
    assert "`model.layers.3`" in body
    assert f"| d_latent | {H} |" in body and f"| d_model | {D} |" in body and "| k (mean active" in body
    assert (
        "## Training configuration" in body and "| lr | 0.001 |" in body and "| batch_size | 2048 |" in body
    )
    assert "## Final metrics" in body and "| val.fvu | 0.1234 |" in body and "| dead_frac | 0.02 |" in body
    assert "![Relative decoder norms](relative_norms.png)" in body
    assert 'CrossCoder.from_pretrained("user/my-crosscoder")' in body
    assert "/data/cache" not in body  # the data section (local paths) is not published in the card

    bare = render_model_card({"arch": "vanilla", "n_models": 2, "d_model": 4, "d_latent": 8})
    assert "## Training configuration" not in bare and "## Final metrics" not in bare
    assert "relative_norms.png" not in bare and "(not recorded)" in bare


# --------------------------------------------------------------------------------------- push
def test_push_to_local_dir_loads_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, model = make_run_dir(tmp_path)
    out = tmp_path / "staged"
    assert push_to_hub(run, "user/my-crosscoder", local_dir=out) == str(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "relative_norms.png",
    ]
    assert (out / "config.json").read_bytes() == (run / "config.json").read_bytes()
    loaded = CrossCoder.from_pretrained(out)
    x = rand_x(1)
    for a, b in zip(loaded(x), model(x), strict=True):
        close(a, b)

    # the convenience method on the model (no run folder: no train section, no plot)
    out2 = tmp_path / "staged2"
    out2.mkdir()  # an empty folder is accepted
    model.push_to_hub("user/other", local_dir=out2)
    assert sorted(p.name for p in out2.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    close(CrossCoder.from_pretrained(out2).encode(x), model.encode(x))

    # the CLI, with the real command line
    rc, stdout, _ = run_cli(capsys, "push", run, "user/my-crosscoder", "--local-dir", tmp_path / "staged3")
    assert rc == 0 and "nothing was uploaded" in stdout
    assert (tmp_path / "staged3" / "README.md").read_text() == (out / "README.md").read_text()
    # an existing non-empty target is refused
    rc, _, err = run_cli(capsys, "push", run, "user/my-crosscoder", "--local-dir", out)
    assert_one_line_error(rc, err, "already exists")


def test_push_uploads_through_hfapi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", {"token": token}))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(self, repo_id, **kw):
            calls.append(("create_branch", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw):
            files = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
            calls.append(("upload_folder", {**kw, "files": files}))

            class Info:
                commit_url = f"https://huggingface.co/{kw['repo_id']}/commit/abc"

            return Info()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run, _ = make_run_dir(tmp_path)
    url = push_to_hub(run, "user/cc", token="tok", private=True, revision="v1", commit_message="hi")
    assert url.endswith("/commit/abc")
    kinds = [c[0] for c in calls]
    assert kinds == ["init", "create_repo", "create_branch", "upload_folder"]
    assert calls[0][1]["token"] == "tok"
    assert calls[1][1]["private"] is True and calls[1][1]["exist_ok"] is True
    up = calls[3][1]
    assert up["repo_id"] == "user/cc" and up["revision"] == "v1" and up["commit_message"] == "hi"
    assert up["files"] == ["README.md", "config.json", "model.safetensors", "relative_norms.png"]

    class Failing(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise RuntimeError("401 Unauthorized\nmore details")

    monkeypatch.setattr(huggingface_hub, "HfApi", Failing)
    rc, _, err = run_cli(capsys, "push", run, "user/cc")
    assert_one_line_error(rc, err, "user/cc", "401 Unauthorized")


def test_push_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, _ = make_run_dir(tmp_path)
    with pytest.raises(CrossCoderError, match="repo id"):
        push_to_hub(run, "not a repo id", local_dir=tmp_path / "o")
    (run / "model.safetensors").unlink()
    rc, _, err = run_cli(capsys, "push", run, "user/cc", "--local-dir", tmp_path / "o")
    assert_one_line_error(rc, err, "model.safetensors")
    assert not (tmp_path / "o").exists()


def test_model_layer_does_not_import_interop() -> None:
    code = (
        "import sys, crosscoder.model.crosscoder; "
        "assert not any(m.startswith('crosscoder.interop') for m in sys.modules), 'interop imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------- Kissane
def kissane_weights(seed: int = 0) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        W_enc=torch.randn(M, D, H, generator=g) * 0.3,
        W_dec=torch.randn(H, M, D, generator=g) * 0.1,
        b_enc=torch.randn(H, generator=g) * 0.2,
        b_dec=torch.randn(M, D, generator=g),
    )


def kissane_forward(sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kissane's forward on (already normalised) x [b, 2, d]: acts = relu(x.W_enc + b_enc),
    x_hat = acts.W_dec + b_dec."""
    acts = torch.relu(torch.einsum("bmd,mdh->bh", x, sd["W_enc"]) + sd["b_enc"])
    return torch.einsum("bh,hmd->bmd", acts, sd["W_dec"]) + sd["b_dec"], acts


def write_kissane(folder: Path, sd: dict, version: int = 0, **cfg_over: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "seed": 49,
        "batch_size": 4096,
        "l1_coeff": 2,
        "d_in": D,
        "dict_size": H,
        "enc_dtype": "fp32",
        "model_name": "gemma-2-2b",
        "site": "resid_pre",
        "dec_init_norm": 0.08,
        "hook_point": "blocks.14.hook_resid_pre",
        **cfg_over,
    }
    torch.save(sd, folder / f"{version}.pt")
    (folder / f"{version}_cfg.json").write_text(json.dumps(cfg))
    return folder / f"{version}.pt"


def test_kissane_without_norm_scale(tmp_path: Path) -> None:
    sd = kissane_weights()
    pt = write_kissane(tmp_path / "version_0", sd)
    conv = load_foreign("kissane", pt)
    assert any("--norm-scale" in n for n in conv.notes)
    model = conv.model
    assert model.cfg.arch == "vanilla" and model.cfg.site == "blocks.14.hook_resid_pre"
    assert model.norm_scale.tolist() == [1.0, 1.0]
    x = rand_x(2, scale=1.0)
    ref_hat, ref_f = kissane_forward(sd, x)
    assert 0 < int((ref_f > 0).sum()) < ref_f.numel()
    close(model.encode(x), ref_f)
    close(model.decode(ref_f), ref_hat)
    x_hat, f = model(x)
    close(x_hat, ref_hat)
    close(f, ref_f)


def test_kissane_with_norm_scale_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sd = kissane_weights(1)
    pt = write_kissane(tmp_path / "ck", sd, version=3)
    out = tmp_path / "converted"
    rc, stdout, err = run_cli(
        capsys,
        "convert",
        "--from",
        "kissane",
        pt,
        out,
        "--norm-scale",
        "2.0",
        "0.25",
        "--model-names",
        "gemma-2-2b",
        "gemma-2-2b-it",
    )
    assert rc == 0, err
    assert "converted kissane" in stdout and "note:" not in err
    model = CrossCoder.from_pretrained(out)
    assert model.cfg.model_names == ["gemma-2-2b", "gemma-2-2b-it"]
    assert model.norm_scale.tolist() == [2.0, 0.25]
    s = torch.tensor([2.0, 0.25])[None, :, None]
    raw = rand_x(3, scale=4.0)
    ref_hat, ref_f = kissane_forward(sd, raw * s)  # Kissane on scaled inputs
    x_hat, f = model(raw)  # ours on raw inputs
    close(f, ref_f)
    close(x_hat, ref_hat / s)  # reconstructions come back in raw units
    meta = json.loads((out / "config.json").read_text())["converted_from"]
    assert (
        meta["format"] == "kissane" and meta["norm_scale_folded"] is True and meta["config"]["l1_coeff"] == 2
    )


def test_kissane_folder_layouts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old, new = kissane_weights(0), kissane_weights(5)
    write_kissane(tmp_path / "v", old, version=0)
    write_kissane(tmp_path / "v", new, version=1)
    conv = load_foreign("kissane", tmp_path / "v")
    assert any("1.pt" in n for n in conv.notes)
    close(conv.model.W_enc, new["W_enc"])
    # the Hub release layout: cc_weights.pt + cfg.json
    hub = tmp_path / "hub" / "blocks.14.hook_resid_pre"
    hub.mkdir(parents=True)
    torch.save(old, hub / "cc_weights.pt")
    (hub / "cfg.json").write_text(json.dumps({"d_in": D, "dict_size": H}))
    rc, _, err = run_cli(capsys, "convert", "--from", "kissane", hub, tmp_path / "o")
    assert rc == 0 and "note:" in err and "--norm-scale" in err
    close(CrossCoder.from_pretrained(tmp_path / "o").W_dec, old["W_dec"])


# --------------------------------------------------------------------------------------- dictionary_learning
CODE_IDS = {"CROSSCODER": 1, "SAE": 2, "MIXED": 3, "NONE": 4, "DECOUPLED": 5}


def dl_state_dict(
    seed: int = 0, batchtopk: bool = False, code: str = "CROSSCODER", normalizer: bool = False
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "encoder.weight": torch.randn(M, D, H, generator=g) * 0.3,
        "encoder.bias": torch.randn(H, generator=g) * 0.1,
        "decoder.weight": torch.randn(M, H, D, generator=g) * 0.2,
        "decoder.bias": torch.randn(M, D, generator=g),
        "code_normalization_id": torch.tensor(CODE_IDS[code]),
    }
    std = torch.rand(M, D, generator=g) + 0.5
    if normalizer:
        sd["activation_mean"] = torch.randn(M, D, generator=g)
        sd["activation_std"] = std
        sd["target_rms"] = torch.tensor(1.0)
        sd["activation_global_scale"] = sd["target_rms"] / torch.sqrt((std**2).sum(-1) + 1e-8)
    else:  # dictionary_learning's "no normaliser" placeholders
        sd["activation_mean"] = torch.full((M, D), float("nan"))
        sd["activation_std"] = torch.full((M, D), float("nan"))
        sd["target_rms"] = torch.tensor(1.0)
        sd["activation_global_scale"] = torch.ones(M)
    if batchtopk:
        sd["k"] = torch.tensor(K, dtype=torch.int32)
        sd["threshold"] = torch.tensor(-1.0)
        _, f, scores = dl_encode(sd, rand_x(seed + 100), code)  # pick a threshold some latents pass
        sd["threshold"] = scores[f > 0].median()
    return sd


def dl_code_norm(sd: dict, code: str) -> torch.Tensor:
    wd = sd["decoder.weight"]  # [L, h, d]
    return wd.norm(dim=(0, 2)) if code == "SAE" else wd.norm(dim=2).sum(0)


def dl_normalized(sd: dict) -> bool:
    return not (torch.isnan(sd["activation_mean"]).any() or torch.isnan(sd["activation_std"]).any())


def dl_encode(
    sd: dict, x: torch.Tensor, code: str = "CROSSCODER", batch_rule: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Their encode: normalise, f = relu(sum_l x_l W_l + b); BatchTopK keeps f * code > threshold
    (or batch top-k)."""
    if dl_normalized(sd):
        x = (x - sd["activation_mean"]) * sd["activation_global_scale"][None, :, None]
    f = torch.relu(torch.einsum("bld,ldh->bh", x, sd["encoder.weight"]) + sd["encoder.bias"])
    scores = f * dl_code_norm(sd, code)
    if "threshold" not in sd:
        return f, f, scores
    if batch_rule:
        idx = scores.flatten().topk(int(sd["k"]) * x.shape[0]).indices
        kept = torch.zeros_like(f).flatten().scatter_(0, idx, f.flatten()[idx]).view_as(f)
        return f, kept, scores
    return f, f * (scores > sd["threshold"]), scores


def dl_decode(sd: dict, f: torch.Tensor) -> torch.Tensor:
    x_hat = torch.einsum("bh,lhd->bld", f, sd["decoder.weight"]) + sd["decoder.bias"]
    if dl_normalized(sd):
        x_hat = x_hat / (sd["activation_global_scale"][None, :, None] + 1e-8) + sd["activation_mean"]
    return x_hat


def check_against_dl(model: CrossCoder, sd: dict, code: str = "CROSSCODER", seed: int = 7) -> None:
    x = rand_x(seed)
    _, ref_f, _ = dl_encode(sd, x, code)
    assert 0 < int((ref_f > 0).sum()) < ref_f.numel()
    model.eval()
    close(model.encode(x), ref_f)
    close(model.decode(ref_f), dl_decode(sd, ref_f))
    x_hat, f = model(x)
    close(f, ref_f)
    close(x_hat, dl_decode(sd, ref_f))


@pytest.mark.parametrize("batchtopk,code", [(False, "CROSSCODER"), (True, "CROSSCODER"), (True, "SAE")])
def test_dictionary_learning_pt(tmp_path: Path, batchtopk: bool, code: str) -> None:
    sd = dl_state_dict(1, batchtopk=batchtopk, code=code)
    torch.save(sd, tmp_path / "model_final.pt")
    conv = load_foreign("dictionary_learning", tmp_path / "model_final.pt")
    model = conv.model
    assert model.cfg.arch == ("batchtopk" if batchtopk else "vanilla")
    assert model.cfg.l1_weighting == ("concat" if code == "SAE" else "sum")
    check_against_dl(model, sd, code)
    if batchtopk:
        assert model.cfg.k == K and float(model.arch.threshold) == pytest.approx(float(sd["threshold"]))
        x = rand_x(8)
        _, ref_batch, _ = dl_encode(sd, x, code, batch_rule=True)
        model.train()
        close(model.encode(x), ref_batch)  # the training-time batch rule agrees too
        model.eval()


def test_dictionary_learning_folder_with_normalizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sd = dl_state_dict(2, batchtopk=True, normalizer=True)
    folder = tmp_path / "hub_model"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "activation_dim": D,
                "dict_size": H,
                "num_layers": M,
                "k": K,
                "code_normalization": "CROSSCODER",
                "norm_init_scale": 1.0,
                "target_rms": 1.0,
                "dict_class": "BatchTopKCrossCoder",
            }
        )
    )
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "convert", "--from", "dictionary_learning", folder, out, "--site", "layer13")
    assert rc == 0, err
    assert "normaliser" in err
    model = CrossCoder.from_pretrained(out)
    assert model.cfg.arch == "batchtopk" and model.cfg.site == "layer13"
    assert model.norm_scale.tolist() == pytest.approx(sd["activation_global_scale"].tolist())
    check_against_dl(model, sd)
    # the same state dict as .pt converts to the same model
    torch.save(sd, tmp_path / "ae.pt")
    close(load_foreign("dictionary_learning", tmp_path / "ae.pt").model.b_enc, model.b_enc)


def test_dictionary_learning_unsupported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def check(sd: dict, *needles: str, extra: tuple = ()) -> None:
        torch.save(sd, tmp_path / "m.pt")
        rc, _, err = run_cli(
            capsys, "convert", "--from", "dictionary_learning", tmp_path / "m.pt", tmp_path / "never", *extra
        )
        assert_one_line_error(rc, err, *needles)
        assert not (tmp_path / "never").exists()

    check(dl_state_dict(3, batchtopk=True, code="MIXED"), "code_normalization", "MIXED")
    sd = dl_state_dict(3, batchtopk=True, code="DECOUPLED")
    sd["threshold"] = torch.tensor([0.1, 0.2])
    check(sd, "'threshold'", "DECOUPLED")
    sd = dl_state_dict(3)
    sd["decoder.layers.0.weight"] = torch.zeros(H, D)
    check(sd, "'decoder.layers.0.weight'")
    check(dl_state_dict(3, normalizer=True), "--norm-scale", extra=("--norm-scale", "1", "1"))
    sd = dl_state_dict(3)
    del sd["decoder.bias"]
    check(sd, "'decoder.bias'")


# --------------------------------------------------------------------------------------- CLI errors, safety
def test_convert_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sd = kissane_weights()
    pt = write_kissane(tmp_path / "ck", sd)
    out = tmp_path / "out"

    rc, _, err = run_cli(capsys, "convert", "--from", "kissane", tmp_path / "missing.pt", out)
    assert_one_line_error(rc, err, "missing.pt", "not found")
    rc, _, err = run_cli(capsys, "convert", "--from", "kissane", pt, out, "--cfg", tmp_path / "nope.json")
    assert_one_line_error(rc, err, "nope.json")
    rc, _, err = run_cli(capsys, "convert", "--from", "kissane", pt, out, "--norm-scale", "1.0")
    assert_one_line_error(rc, err, "--norm-scale", "2 factors")

    bad = dict(sd)
    del bad["W_dec"]
    rc, _, err = run_cli(capsys, "convert", "--from", "kissane", write_kissane(tmp_path / "b1", bad), out)
    assert_one_line_error(rc, err, "'W_dec'", "missing")
    bad = dict(sd, b_dec=torch.zeros(M, D + 1))
    rc, _, err = run_cli(capsys, "convert", "--from", "kissane", write_kissane(tmp_path / "b2", bad), out)
    assert_one_line_error(rc, err, "'b_dec'", "shape")
    rc, _, err = run_cli(
        capsys, "convert", "--from", "kissane", write_kissane(tmp_path / "b3", sd, d_in=D + 2), out
    )
    assert_one_line_error(rc, err, "d_in")
    assert not out.exists()

    assert run_cli(capsys, "convert", "--from", "kissane", pt, out)[0] == 0
    (out / "marker").write_text("old")
    rc, _, err = run_cli(capsys, "convert", "--from", "kissane", pt, out, "--norm-scale", "2", "2")
    assert_one_line_error(rc, err, "already exists", "--overwrite")
    assert (out / "marker").exists()
    rc, _, err = run_cli(
        capsys, "convert", "--from", "kissane", pt, out, "--norm-scale", "2", "2", "--overwrite"
    )
    assert rc == 0, err
    assert not (out / "marker").exists() and CrossCoder.from_pretrained(out).norm_scale.tolist() == [2.0, 2.0]
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no temp leftovers


class Payload:
    """Unpickling this would create a file: torch.load(weights_only=True) must refuse it instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("source", ["kissane", "dictionary_learning"])
def test_pickled_objects_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture, source: str) -> None:
    marker = tmp_path / "pwned"
    sd = dict(kissane_weights()) if source == "kissane" else dl_state_dict(4)
    sd["extra"] = Payload(marker)
    path = write_kissane(tmp_path / "ck", sd) if source == "kissane" else tmp_path / "m.pt"
    if source != "kissane":
        torch.save(sd, path)
    rc, _, err = run_cli(capsys, "convert", "--from", source, path, tmp_path / "out")
    assert_one_line_error(rc, err, "refused to load")
    assert not marker.exists()
    with pytest.raises(CrossCoderError, match="refused"):
        convert(source, path, tmp_path / "out2")


# --------------------------------------------------------------------------------------- converter gaps
def convert_dl(capsys: pytest.CaptureFixture, path: Path, out: Path, *extra: object) -> tuple[int, str, str]:
    return run_cli(capsys, "convert", "--from", "dictionary_learning", path, out, *extra)


def test_batchtopk_without_code_normalization_id(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An older-layout BatchTopK file trained with SAE weighting and no id: refused alone (it would be read
    as CROSSCODER), exact once the weighting is given by flag or by the training folder's config."""
    sd = dl_state_dict(11, batchtopk=True, code="SAE")
    del sd["code_normalization_id"]
    pt = tmp_path / "ae.pt"
    torch.save(sd, pt)
    rc, _, err = convert_dl(capsys, pt, tmp_path / "never")
    assert_one_line_error(rc, err, "code_normalization_id", "--code-normalization")
    assert not (tmp_path / "never").exists()
    # CROSSCODER weighting really gives other latents on this file: guessing would be silently wrong
    x = rand_x(7)
    assert not torch.allclose(dl_encode(sd, x, "SAE")[1], dl_encode(sd, x, "CROSSCODER")[1])

    rc, _, err = convert_dl(capsys, pt, tmp_path / "o1", "--code-normalization", "sae")
    assert rc == 0, err
    model = CrossCoder.from_pretrained(tmp_path / "o1")
    assert model.cfg.arch == "batchtopk" and model.cfg.l1_weighting == "concat"
    check_against_dl(model, sd, "SAE")

    # a training folder: ae.pt + the trainer's config.json (its trainer section names the weighting)
    run = tmp_path / "trainer_0"
    run.mkdir()
    torch.save(sd, run / "ae.pt")
    (run / "config.json").write_text(json.dumps({"trainer": {"code_normalization": "SAE", "k": K}}))
    check_against_dl(load_foreign("dictionary_learning", run).model, sd, "SAE")
    # the same config through --cfg for the lone file
    check_against_dl(load_foreign("dictionary_learning", pt, cfg_path=run / "config.json").model, sd, "SAE")
    # a flag contradicting the file's own id is refused
    sd2 = dl_state_dict(11, batchtopk=True, code="SAE")
    torch.save(sd2, tmp_path / "with_id.pt")
    rc, _, err = convert_dl(
        capsys, tmp_path / "with_id.pt", tmp_path / "o2", "--code-normalization", "crosscoder"
    )
    assert_one_line_error(rc, err, "--code-normalization", "SAE")
    rc, _, err = run_cli(
        capsys, "convert", "--from", "kissane", pt, tmp_path / "o3", "--code-normalization", "sae"
    )
    assert rc == 2 and "error:" in err


@pytest.mark.parametrize("code", ["NONE", "MIXED", "DECOUPLED"])
def test_relu_crosscoder_any_code_normalization(
    tmp_path: Path, capsys: pytest.CaptureFixture, code: str
) -> None:
    """Code normalisation does not enter a ReLU crosscoder's encode/decode: converted exactly as vanilla."""
    sd = dl_state_dict(12, code=code, normalizer=code == "MIXED")
    torch.save(sd, tmp_path / "model_final.pt")
    rc, _, err = convert_dl(capsys, tmp_path / "model_final.pt", tmp_path / "o")
    assert rc == 0, err
    assert code in err  # a note says the normalisation only affected their training loss
    model = CrossCoder.from_pretrained(tmp_path / "o")
    assert model.cfg.arch == "vanilla"
    check_against_dl(model, sd, code)


@pytest.mark.parametrize("with_id", [True, False])
def test_batchtopk_threshold_never_set(tmp_path: Path, capsys: pytest.CaptureFixture, with_id: bool) -> None:
    """threshold = -1: their inference keeps f where f * code > -1, i.e. every positive latent (relu);
    converted as vanilla, which is exact even for latents with a zero decoder norm."""
    sd = dl_state_dict(13, batchtopk=True, code="SAE")
    sd["threshold"] = torch.tensor(-1.0)
    sd["decoder.weight"][:, 0] = 0.0  # a dead decoder row: batchtopk with threshold 0 would drop latent 0
    if not with_id:
        del sd["code_normalization_id"]  # weighting unknown, but irrelevant here
    torch.save(sd, tmp_path / "m.pt")
    rc, _, err = convert_dl(capsys, tmp_path / "m.pt", tmp_path / "o")
    assert rc == 0, err
    assert "never set" in err
    model = CrossCoder.from_pretrained(tmp_path / "o")
    assert model.cfg.arch == "vanilla"
    x = rand_x(7)
    ref_pre, ref_f, _ = dl_encode(sd, x, "SAE")
    close(ref_f, ref_pre)  # their rule keeps every positive latent
    assert bool((ref_f[:, 0] > 0).any())
    check_against_dl(model, sd, "SAE")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["converted_from"]["class"] == (
        "BatchTopKCrossCoder"
    )


def test_load_error_messages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # a damaged file (truncated zip) and a file that is not a pickle at all
    torch.save(dl_state_dict(14), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_bytes(b"this is not a checkpoint\n" * 20)
    for name in ("cut.pt", "text.pt"):
        rc, _, err = convert_dl(capsys, tmp_path / name, tmp_path / "o")
        assert_one_line_error(rc, err, "damaged or not a PyTorch state dict")
        assert "unpickl" not in err.lower() and "refused" not in err
    # a tensor, not a dict
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    rc, _, err = convert_dl(capsys, tmp_path / "t.pt", tmp_path / "o")
    assert_one_line_error(rc, err, "not a state dict", "torch.save(model.state_dict(), path)")
    # pickled objects: plain text, the re-save advice, no colour codes, no "you can still load it"
    sd = dl_state_dict(14)
    sd["extra"] = Payload(tmp_path / "pwned")
    torch.save(sd, tmp_path / "obj.pt")
    rc, _, err = convert_dl(capsys, tmp_path / "obj.pt", tmp_path / "o")
    assert_one_line_error(rc, err, "refused to load", "torch.save(model.state_dict(), path)")
    assert "\x1b" not in err and "weights_only" not in err and "can still be loaded" not in err
    assert not (tmp_path / "pwned").exists()


def test_wrong_source_is_recognised(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pt = write_kissane(tmp_path / "version_0", kissane_weights())
    rc, _, err = convert_dl(capsys, pt, tmp_path / "o")
    assert_one_line_error(rc, err, "Kissane", "--from kissane")
    torch.save(dl_state_dict(15), tmp_path / "dl.pt")
    (tmp_path / "dl_cfg.json").write_text(json.dumps({"d_in": D, "dict_size": H}))
    rc, _, err = run_cli(capsys, "convert", "--from", "kissane", tmp_path / "dl.pt", tmp_path / "o")
    assert_one_line_error(rc, err, "--from dictionary_learning")


def test_training_folder_uses_final_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    early, final = dl_state_dict(16), dl_state_dict(17)
    torch.save(early, run / "checkpoint_1000.pt")
    torch.save(early, run / "checkpoint_2000.pt")
    torch.save(final, run / "model_final.pt")
    rc, _, err = convert_dl(capsys, run, tmp_path / "o")
    assert rc == 0, err
    assert "model_final.pt" in err and "3 .pt files" in err
    check_against_dl(CrossCoder.from_pretrained(tmp_path / "o"), final)
    # only step checkpoints: the highest step
    (run / "model_final.pt").unlink()
    torch.save(final, run / "checkpoint_3000.pt")
    conv = load_foreign("dictionary_learning", run)
    assert any("checkpoint_3000.pt" in n for n in conv.notes)
    check_against_dl(conv.model, final)


@pytest.mark.parametrize("out_last", [False, True])
def test_norm_scale_and_out_in_either_order(
    tmp_path: Path, capsys: pytest.CaptureFixture, out_last: bool
) -> None:
    sd = kissane_weights(2)
    pt = write_kissane(tmp_path / "ck", sd)
    out = tmp_path / "converted"
    scale = ["--norm-scale", "2.0", "0.25"]
    argv = (
        ["convert", "--from", "kissane", pt, *scale, out]
        if out_last
        else ["convert", "--from", "kissane", pt, out, *scale]
    )
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert "usage" not in err and "converted kissane" in stdout
    model = CrossCoder.from_pretrained(out)
    assert model.norm_scale.tolist() == [2.0, 0.25]
    s = torch.tensor([2.0, 0.25])[None, :, None]
    raw = rand_x(3, scale=4.0)
    ref_hat, ref_f = kissane_forward(sd, raw * s)
    x_hat, f = model(raw)
    close(f, ref_f)
    close(x_hat, ref_hat / s)
    # a bad factor is still a one-line error, and a missing OUT is named
    rc, _, err = run_cli(
        capsys, "convert", "--from", "kissane", pt, tmp_path / "o2", "--norm-scale", "2", "x"
    )
    assert_one_line_error(rc, err, "--norm-scale", "'x'")
    rc, _, err = run_cli(capsys, "convert", "--from", "kissane", pt, "--norm-scale", "2", "2")
    assert_one_line_error(rc, err, "OUT")
