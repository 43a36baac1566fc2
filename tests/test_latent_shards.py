"""Latent-sharded training (``torchrun ... --latent-shards S``) on CPU with gloo: the same weights as one
process, per-shard checkpoints assembled into the ordinary files, resume on a different mesh, refusals.

Tolerances are those of tests/test_distributed.py (see the comment there): the runs differ only by float
reduction order (the decoder's partial sums added over shards, the gradient norm summed over shards), so
over the first 5 steps logged metrics agree to rel 1e-4 / abs 1e-5 and weights entry-wise to atol 1e-5 /
rtol 1e-4, except at most MAX_FLIPPED latents whose score sat within float noise of a cut-off (BatchTopK's
selection, JumpReLU's threshold window). What sharding bugs do (BatchTopK, 2 shards, measured by patching
the package in the workers through a sitecustomize; values at step 1, one process vs the broken run):
the selection per shard instead of over every shard: l0_loss 4 -> 8, explained variance -0.180 -> -0.336;
the decoder partial sums not summed over shards: explained variance -0.180 -> -0.045, grad_norm 39.5 ->
33.2; the sum's backward summing the gradients instead of passing them: grad_norm 39.5 -> 78.7; no sum
over shards of the squared gradient norm and of the metrics: grad_norm 39.5 -> 28.0, l0_loss 4 -> 2.
Each is far past the tolerances.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import MAX_FLIPPED, STEP_METRICS, env, flipped_latents, single, step_metrics, torchrun

STEPS = 5


def common(arch):
    return [
        "--arch",
        arch,
        "--aux-k",
        "16",
        "--num-tokens",
        str(256 * STEPS),
        "--log-every",
        "1",
        "--val-every",
        str(STEPS),
        "--dead-tokens",
        "256",
    ]


def compare_runs(one, other, arch):
    m1, m2 = step_metrics(one), step_metrics(other)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(1, STEPS + 1))
    for r1, r2 in zip(m1, m2, strict=True):
        for k in STEP_METRICS:
            if k not in r1:
                assert k not in r2
                continue
            assert r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-5), (r1["step"], k, r1[k], r2[k])
    f1 = json.loads((one / "config.json").read_text())["metrics"]
    f2 = json.loads((other / "config.json").read_text())["metrics"]
    for k in ("val/loss", "val/explained_variance", "val/l0_loss"):
        assert f1[k] == pytest.approx(f2[k], rel=1e-4, abs=1e-5), k
    flipped = flipped_latents(one, other)
    assert len(flipped) <= MAX_FLIPPED, flipped
    return m1


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk", "jumprelu"])
def test_two_latent_shards_match_one_process(tmp_path, arch):
    single(tmp_path / "one", *common(arch))
    torchrun(tmp_path / "two", *common(arch), "--latent-shards", "2")
    m1 = compare_runs(tmp_path / "one", tmp_path / "two", arch)
    if arch == "batchtopk":
        assert any(r["aux_loss"] > 0 for r in m1), "no dead latent: sharded AuxK not exercised"
    # the result folder is the ordinary one: the whole dictionary in one file
    w = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert w["W_dec"].shape[0] == 128 and w["W_enc"].shape[-1] == 128
    ck = sorted((tmp_path / "two" / "checkpoints").iterdir())[-1]
    assert {p.name for p in ck.iterdir()} >= {"shard_0_of_2.safetensors", "shard_1_of_2.safetensors"}
    shard0 = load_file(str(ck / "shard_0_of_2.safetensors"))
    assert shard0["W_dec"].shape[0] == 64 and shard0["optimizer.W_dec.exp_avg"].shape[0] == 64
    assert "W_dec" not in load_file(str(ck / "model.safetensors"))  # rank 0 holds the replicated tensors


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_data_by_latent_mesh_matches_one_process(tmp_path, arch):
    """2 x 2: two data-parallel replicas of two latent shards each."""
    single(tmp_path / "one", *common(arch))
    torchrun(tmp_path / "four", *common(arch), "--latent-shards", "2", nproc=4)
    m1 = compare_runs(tmp_path / "one", tmp_path / "four", arch)
    if arch == "batchtopk":
        assert any(r["aux_loss"] > 0 for r in m1)


def checkpointed(steps):
    """BatchTopK on the built-in pair: ``steps`` steps of 256 tokens, a checkpoint every 4, a log a step."""
    from test_distributed import ARGS

    return [
        *ARGS,
        "--arch",
        "batchtopk",
        "--save-every",
        "4",
        "--log-every",
        "1",
        "--num-tokens",
        str(256 * steps),
    ]


def launch(out, *flags, nproc=1, kill=None):
    """``crosscoder train --out OUT FLAGS`` on one process or under torchrun; ``kill="RANK:STEP"`` makes that
    rank SIGKILL itself after that step (the test hook of crosscoder.train.elastic)."""
    head = [sys.executable, "-m", "crosscoder"]
    if nproc > 1:
        head = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "crosscoder",
        ]
    e = {**env(), **({"CROSSCODER_TEST_KILL_AT_STEP": kill} if kill else {})}
    return subprocess.run([*head, "train", "--out", str(out), *flags], env=e, capture_output=True, text=True)


def test_sharded_checkpoint_resumes_on_other_meshes(tmp_path):
    """A run on 2 shards killed after its checkpoint at step 4 resumes on one process, and a 1-process run
    resumes on 2 shards: both end with the uninterrupted run's weights."""
    from test_distributed import assert_same_weights

    flags = checkpointed(8)
    assert launch(tmp_path / "ref", *flags).returncode == 0
    cut = tmp_path / "cut"
    r = launch(cut, *flags, "--latent-shards", "2", nproc=2, kill="1:5")
    assert r.returncode != 0 and not (cut / "model.safetensors").exists(), r.stderr[-2000:]
    assert (cut / "checkpoints" / "step_4" / "shard_1_of_2.safetensors").is_file()
    r = launch(cut, "--resume", "--latent-shards", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(tmp_path / "ref", cut)

    cut1 = tmp_path / "cut1"
    r = launch(cut1, *flags, kill="0:5")
    assert r.returncode != 0 and (cut1 / "checkpoints" / "step_4").is_dir(), r.stderr[-2000:]
    r = launch(cut1, "--resume", "--latent-shards", "2", nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(tmp_path / "ref", cut1)


def _args(extra):
    from test_distributed import ARGS

    return [*ARGS, *extra]


def test_refusals(tmp_path):
    """One line, non-zero exit: shards on one process, an architecture or layout that cannot be sharded,
    a count that does not divide the dictionary."""
    cases = [
        (["--latent-shards", "2"], "does not divide the number of processes (1)"),
        (["--latent-shards", "2", "--arch", "matryoshka"], "cannot be latent-sharded"),
        (["--latent-shards", "3"], "does not divide d_latent"),
        (["--latent-shards", "2", "--shared-latents", "8"], "designated shared latents"),
    ]
    for i, (flags, msg) in enumerate(cases):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "crosscoder",
                "train",
                "--out",
                str(tmp_path / str(i)),
                *_args([]),
                *flags,
            ],
            env=env(),
            capture_output=True,
            text=True,
        )
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], r.stderr[-1000:]
        assert "Traceback" not in r.stderr


def test_shard_state_round_trip():
    """shard_state / assemble_state and the Adam-state pair are inverse; slices follow the latent axis."""
    from crosscoder.config import CrossCoderConfig
    from crosscoder.model import CrossCoder
    from crosscoder.model.sharding import (
        assemble_optimizer_state,
        assemble_state,
        latent_dims,
        parameter_names,
        shard_optimizer_state,
        shard_state,
    )

    model = CrossCoder(CrossCoderConfig(arch="jumprelu", n_models=2, d_model=6, d_latent=12))
    opt = torch.optim.Adam(model.parameters())
    sum(p.pow(2).sum() for p in model.parameters()).backward()  # every parameter gets Adam state
    opt.step()
    dims, names = latent_dims(model), parameter_names(model)
    sd, st = model.state_dict(), opt.state_dict()
    parts = [shard_state(sd, dims, i, 3) for i in range(3)]
    assert parts[1]["W_enc"].shape == (2, 6, 4) and torch.equal(parts[1]["W_enc"], sd["W_enc"][..., 4:8])
    assert torch.equal(parts[2]["arch.log_threshold"], sd["arch.log_threshold"][8:])
    assert torch.equal(parts[0]["b_dec"], sd["b_dec"])  # replicated
    back = assemble_state(parts, dims)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    oparts = [shard_optimizer_state(st, names, dims, i, 3) for i in range(3)]
    i_wdec = names.index("W_dec")
    assert oparts[2]["state"][i_wdec]["exp_avg"].shape[0] == 4
    oback = assemble_optimizer_state(oparts, names, dims)
    for i, s in st["state"].items():
        for k, v in s.items():
            assert torch.equal(oback["state"][i][k], v)


@pytest.mark.parametrize("d_models", [[8, 8], [16, 8], [12, 4], [6, 6]])  # rows of 16 values or not
@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_each_shard_starts_from_the_slice_of_the_whole_initial_dictionary(d_models, arch):
    """make_shard draws a shard's initial weights without the whole dictionary; they are bit-identical to
    the slice of one process's initial dictionary from the same seed."""
    from crosscoder.config import CrossCoderConfig
    from crosscoder.model import CrossCoder
    from crosscoder.model.sharding import LatentShard, latent_dims, make_shard, shard_state

    cfg = CrossCoderConfig(arch=arch, n_models=2, d_model=max(d_models), d_models=d_models, d_latent=96)
    whole = CrossCoder(cfg, generator=torch.Generator().manual_seed(3))
    for s in range(4):
        shard = make_shard(cfg, torch.Generator().manual_seed(3), LatentShard(s, 4, 0))
        want = shard_state(whole.state_dict(), latent_dims(whole), s, 4)
        got = shard.state_dict()
        assert set(got) == set(want) and shard.shard.d_latent == 96 and shard.cfg.d_latent == 24
        for k in want:
            assert torch.equal(got[k], want[k]), (s, k)


@pytest.mark.slow
def test_disk_full_during_a_sharded_checkpoint(tmp_path):
    """OUT on a tmpfs that holds two checkpoints but not a third: the 2-shard run stops with a disk-full line
    (every rank exits, no rank waits in a collective), the earlier checkpoints are intact and hold no
    temp folder, and after freeing space ``--resume`` on 2 shards ends bit-identical to an uninterrupted
    2-shard run."""
    import shlex

    from test_faults import TRAIN, in_tmpfs, pages

    q = shlex.quote
    flags = [*TRAIN, "--save-every", "10", "--latent-shards", "2"]
    launcher = f"{q(sys.executable)} -m torch.distributed.run --standalone --nproc_per_node=2 -m crosscoder"
    ref = tmp_path / "ref"
    r = launch(ref, *flags, nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    ck = max(pages(p) for p in (ref / "checkpoints").iterdir())
    size_k = (2 * ck + 32 * 1024 + ck // 2) // 1024
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run, w = q(str(mnt / "run")), q(str(tmp_path / "sh"))
    args = " ".join(map(q, flags))
    script = (
        f"mount -t tmpfs -o size={size_k}k tmpfs {q(str(mnt))} || exit 97\n"
        f"{launcher} train --out {run} {args} >{w}.out 2>{w}.err; echo $? >{w}.rc\n"
        f"cp -a {run} {w}.snap\n"
        f"mount -o remount,size=64m {q(str(mnt))} || exit 98\n"
        f"{launcher} train --out {run} --resume --no-progress >{w}.resume.out 2>{w}.resume.err;"
        f" echo $? >{w}.resume.rc\n"
        f"cp -a {run} {w}.done\n"
    )
    in_tmpfs(script, timeout=400)
    rc, err = int((tmp_path / "sh.rc").read_text()), (tmp_path / "sh.err").read_text()
    assert rc != 0
    full = [
        ln
        for ln in err.splitlines()
        if ln.startswith("error: ") and "disk full while writing a checkpoint" in ln
    ]
    assert full and all(f"{mnt}/run/checkpoints/step_30" in ln for ln in full), err[-3000:]
    assert "step_20 is intact" in full[0]
    snap = tmp_path / "sh.snap"
    assert sorted(p.name for p in (snap / "checkpoints").iterdir()) == ["step_10", "step_20"]  # no temp
    assert (int((tmp_path / "sh.resume.rc").read_text())) == 0, (tmp_path / "sh.resume.err").read_text()[
        -2000:
    ]
    a, b = (
        load_file(str(ref / "model.safetensors")),
        load_file(str(tmp_path / "sh.done" / "model.safetensors")),
    )
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_elastic_restart_of_a_sharded_run(tmp_path):
    """Rank 1 of a 2-shard run SIGKILLs itself after step 10 under --max-restarts 1: torchrun restarts both
    workers, which resume from the sharded checkpoint of step 8 by themselves; the weights equal an
    uninterrupted 2-shard run bit for bit."""
    flags = [*checkpointed(20), "--latent-shards", "2"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert launch(ref, *flags, nproc=2).returncode == 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
    ]
    r = subprocess.run(
        [*cmd, "-m", "crosscoder", "train", "--out", str(out), *flags],
        env={**env(), "CROSSCODER_TEST_KILL_AT_STEP": "1:10"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "exitcode: -9" in r.stderr, r.stderr[-3000:]
    steps = [json.loads(ln)["step"] for ln in open(out / "metrics.jsonl") if '"loss"' in ln]
    assert steps == list(range(1, 21))
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_on_the_fly_training_with_latent_shards(tmp_path):
    """On-the-fly training (models run while training) on 2 latent shards: both shards of the one replica
    read the same rows, so the run equals one process (same tolerances as above)."""
    from test_onthefly_dist import ARGS as OTF_ARGS
    from test_onthefly_dist import data_args

    flags = [*data_args(), *OTF_ARGS]
    r1 = launch(tmp_path / "one", *flags)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = launch(tmp_path / "two", *flags, "--latent-shards", "2", nproc=2)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert len(flipped_latents(tmp_path / "one", tmp_path / "two")) <= MAX_FLIPPED
    m1 = json.loads((tmp_path / "one" / "config.json").read_text())["metrics"]
    m2 = json.loads((tmp_path / "two" / "config.json").read_text())["metrics"]
    assert m1["val/explained_variance"] == pytest.approx(m2["val/explained_variance"], rel=1e-4, abs=1e-5)
