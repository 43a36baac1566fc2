"""``crosscoder push``: upload a trained crosscoder (run folder) to the Hugging Face Hub with a model card."""

from __future__ import annotations

import argparse

NAME = "push"
HELP = "upload a run folder (config.json + model.safetensors) to the Hugging Face Hub with a model card"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="run or model folder (config.json + model.safetensors)"
    )
    parser.add_argument(
        "repo_id", metavar="REPO_ID", help="Hub repo, e.g. user/my-crosscoder (created if needed)"
    )
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", metavar="R", default=None, help="branch to push to (created if needed)")
    parser.add_argument("--commit-message", metavar="MSG", default=None, help="commit message")
    parser.add_argument(
        "--local-dir",
        metavar="DIR",
        default=None,
        help="write the folder that would be uploaded to DIR instead of uploading",
    )


def run(args: argparse.Namespace) -> int:
    from ..interop.hub import DEFAULT_COMMIT_MESSAGE, push_to_hub

    where = push_to_hub(
        args.run_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE,
        local_dir=args.local_dir,
    )
    if args.local_dir is not None:
        print(f"wrote {where} (the folder that would be uploaded to {args.repo_id}; nothing was uploaded)")
    else:
        print(f"pushed {args.run_dir} to https://huggingface.co/{args.repo_id} ({where})")
    return 0
