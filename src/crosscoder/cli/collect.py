"""``crosscoder collect``: aligned activations of n models (``--model`` repeated, or the two-model
``--base-model``/``--ft-model``) at one or several sites -> a paired cache."""

from __future__ import annotations

import argparse

NAME = "collect"
HELP = "collect aligned activations of two or more models at one or more sites into a paired cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a(
        "--model",
        dest="models",
        action="append",
        default=None,
        metavar="SPEC",
        help="a model: hub id, local folder or REPO@REVISION; repeat for each model, the reference "
        "(whose tokenizer feeds all) first",
    )
    a("--base-model", metavar="SPEC", help="two-model spelling: base model (= the first --model)")
    a("--ft-model", metavar="SPEC", help="two-model spelling: fine-tuned model (= the second --model)")
    a(
        "--site",
        dest="sites",
        action="append",
        required=True,
        metavar="MODULE_PATH",
        help="module whose output is read, e.g. model.layers.13 (`crosscoder sites MODEL` lists them); "
        "repeat to read several (blocks are model-major: model 0 at every site, then model 1, ...)",
    )
    a(
        "--dataset",
        required=True,
        metavar="ID_OR_PATH",
        help="text dataset: hub id, save_to_disk folder, or json/jsonl/parquet/txt/csv file(s), "
        "folder or glob",
    )
    a("--out", required=True, metavar="CACHE", help="cache folder to write")
    a(
        "--num-tokens",
        type=int,
        default=1_000_000,
        help="rows (token positions) to collect (default: 1000000)",
    )
    a("--seq-len", type=int, default=128, help="tokens per sequence, BOS included (default: 128)")
    a("--batch-size", type=int, default=32, help="sequences per model forward (default: 32)")
    a("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="cache storage dtype")
    a(
        "--model-dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype the models run in",
    )
    a("--text-column", default="text", help="text column (chat: the messages column, default `messages`)")
    a("--split", default="train", help="dataset split (hub ids and save_to_disk DatasetDicts)")
    a("--dataset-config", default=None, help="dataset configuration name (hub ids)")
    a(
        "--chat-template",
        default="none",
        choices=("base", "ft", "none"),
        help="render a `messages` column with the chat template of the first (base) or second (ft) model",
    )
    a(
        "--pack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pack documents into full sequences (--no-pack: truncate each document)",
    )
    a(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="continue when the tokenizers disagree (the reference tokenization feeds every model)",
    )
    a(
        "--max-norm-ratio",
        type=float,
        default=None,
        help="drop a position for every model when any block's norm exceeds this ratio to its running median",
    )
    a("--trust-remote-code", action="store_true", help="pass trust_remote_code to transformers")
    a("--base-revision", default=None, help="hub revision of the base (first) model")
    a("--ft-revision", default=None, help="hub revision of the fine-tuned (second) model")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--shard-mb", type=float, default=256.0, help="size of one shard in MB (default: 256)")
    a("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    a("--resume", action="store_true", help="continue an interrupted collection into OUT")
    a("--overwrite", action="store_true", help="replace an existing cache at OUT")
    a("--dry-run", action="store_true", help="print the disk estimate only")
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..data.collect import CollectConfig, collect

    names = {f.name for f in dataclasses.fields(CollectConfig)}
    cfg = CollectConfig(**{k: v for k, v in vars(args).items() if k in names})
    from ..distributed import from_env

    d = from_env()
    if not d.enabled:
        collect(cfg)
        return 0
    # torchrun: each rank collects its share of the sequences; rank 0 merges one cache.
    import torch.distributed as dist

    from ..data.collect_dist import collect_distributed

    dist.init_process_group(backend="gloo")  # only barriers cross ranks; activations go to disk
    try:
        collect_distributed(cfg, d)
    finally:
        dist.destroy_process_group()
    return 0
