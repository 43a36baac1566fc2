import json

from crosscoder.cli import main
from crosscoder.train.plan import plan


def test_plan_by_hand():
    p = plan(
        d_model=4,
        dict_size=10,
        batch_size=8,
        n_models=2,
        arch="vanilla",
        dtype="float32",
        world_size=2,
        cache_tokens=100,
        cache_dtype="bfloat16",
    )
    n = 2 * 2 * 4 * 10 + 10 + 8
    assert p.params == n and p.param_bytes == 4 * n and p.optimizer_bytes == 8 * n and p.ddp_bytes == 4 * n
    assert p.local_batch == 4
    assert p.activation_bytes == 4 * (4 * 4 * 10 + 3 * 4 * 8)
    assert p.total_bytes_per_rank == 4 * n * 5 + p.activation_bytes
    assert p.cache_bytes == 100 * (8 * 2 + 24)


def test_plan_cli_json(capsys):
    assert main(["plan", "--d-model", "2304", "--dict-size", "73728", "--batch-size", "4096", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == 2 * 2 * 2304 * 73728 + 73728 + 2 * 2304
    assert main(["plan", "--d-model", "0", "--dict-size", "8"]) == 2


def test_plan_blocks_and_mixed_widths_by_hand():
    # 2 models of widths 4 and 6, 2 sites each: 4 blocks padded to width 6
    p = plan(
        d_model=0, dict_size=10, batch_size=8, arch="vanilla", d_models=[4, 6], n_sites=2, cache_tokens=5
    )
    n = 2 * 4 * 6 * 10 + 10 + 4 * 6
    assert (p.n_blocks, p.d_model, p.params) == (4, 6, n)
    assert p.padding_fraction == 1 - (4 + 6) * 2 / 24
    assert p.activation_bytes == 4 * (4 * 8 * 10 + 3 * 8 * 24)
    assert p.cache_bytes == 5 * (24 * 2 + 24)
    q = plan(d_model=6, dict_size=10, batch_size=8, n_models=3, arch="vanilla")
    assert (q.n_blocks, q.params, q.padding_fraction) == (3, 2 * 3 * 6 * 10 + 10 + 18, 0.0)


def test_plan_cli_widths(capsys):
    assert main(["plan", "--d-models", "128,192", "--n-sites", "2", "--dict-size", "64", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["n_blocks"], d["d_model"]) == (4, 192)
    assert main(["plan", "--d-models", "128", "--dict-size", "64"]) == 2
    assert "at least two" in capsys.readouterr().err


def test_plan_latent_shards_by_hand():
    # 4 ranks = 2 replicas x 2 shards; vanilla, 10 latents -> 5 per rank
    p = plan(d_model=4, dict_size=10, batch_size=8, n_models=2, arch="vanilla", world_size=4, latent_shards=2)
    md, h = 8, 5
    n = 2 * md * h + h + md  # the shard's W_enc, W_dec, b_enc and the replicated b_dec
    assert (p.params, p.local_batch, p.latent_shards) == (n, 4, 2)
    assert p.ddp_bytes == 4 * n  # two replicas average their gradients
    assert p.activation_bytes == 4 * (4 * 4 * h + 3 * 4 * md) + 2 * 4 * 4 * md  # + the partial sum, reduced
    # batchtopk: the candidates (k * 4 rows * 2 replicas) and their gather from the 4 ranks
    q = plan(
        d_model=4,
        dict_size=10,
        batch_size=8,
        n_models=2,
        arch="batchtopk",
        k=3,
        world_size=4,
        latent_shards=2,
    )
    assert (
        q.activation_bytes
        == 4 * (2 * 4 * h + 3 * 4 * md) + 16 * 3 * 4 * 2 + 4 * 4 * 3 * 4 * 2 + 2 * 4 * 4 * md
    )
    # one shard is the unsharded plan
    assert plan(d_model=4, dict_size=10, batch_size=8, world_size=2, latent_shards=1) == plan(
        d_model=4, dict_size=10, batch_size=8, world_size=2
    )


def test_plan_says_when_sharding_is_needed(capsys):
    base = ["plan", "--d-model", "2304", "--batch-size", "4096", "--dtype", "bfloat16", "--world-size", "8"]
    assert main([*base, "--dict-size", "73728", "--device-memory", "80", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["shards_needed"] == 1 and d["verdict"] == "fits without latent sharding"
    assert d["launch"].startswith("torchrun --nproc_per_node=8 -m crosscoder train --cache CACHE")
    # 2^20 latents need 182 GiB per rank unsharded: 4 shards of 8 ranks fit 80 GiB (54 GiB with overhead)
    assert main([*base, "--dict-size", "1048576", "--device-memory", "80", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["shards_needed"] == 4 and d["verdict"].startswith("needs latent sharding")
    assert d["launch"].endswith("--latent-shards 4")
    from crosscoder.train.plan import OVERHEAD

    two = plan(
        d_model=2304, dict_size=1048576, batch_size=4096, dtype="bfloat16", world_size=8, latent_shards=2
    )
    four = plan(
        d_model=2304, dict_size=1048576, batch_size=4096, dtype="bfloat16", world_size=8, latent_shards=4
    )
    assert two.total_bytes_per_rank * OVERHEAD > 80 * 2**30 >= four.total_bytes_per_rank * OVERHEAD
    # one 80 GiB GPU cannot hold it: the ranks that would
    assert main([*base[:-2], "--dict-size", "1048576", "--device-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "does not fit on 1 rank(s)" in out and "--nproc_per_node=4" in out
    assert main([*base, "--dict-size", "1048576", "--latent-shards", "3"]) == 2  # 3 does not divide 8
