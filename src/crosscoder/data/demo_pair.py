"""An offline base / fine-tuned model pair, built from text every Python installation has.

* prose: the interactive help topics (``pydoc_data.topics``) and the docstrings of the standard library
  (read with ``ast``, nothing is imported);
* code: the standard library's own top-level ``.py`` sources.

:func:`build_demo_pair` trains a byte-level BPE tokenizer on both, pretrains a small GPT-2 on prose
(the *base* model), then trains a copy further on code (the *fine-tuned* model), and saves both with
``save_pretrained`` (each folder loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``). It also writes
``corpus.jsonl``: the prose and code documents interleaved, held-out ones first, column ``text`` (plus
``domain`` and ``split``) for collection. Results are cached under
``${CROSSCODER_CACHE_DIR:-~/.cache/crosscoder}/demo_pair/<hash>`` where the hash covers
:class:`DemoPairConfig`; a build is written to a temporary folder and renamed, so an interrupted build
leaves nothing half-done.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_dir

DEMO_VERSION = 1
SPECIAL = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class DemoPairConfig:
    """Sizes of the demo pair. The defaults build in 2-3 minutes on a 2-core CPU (1 thread)."""

    vocab_size: int = 1024
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    seq_len: int = 64
    batch_size: int = 32
    base_steps: int = 160
    ft_steps: int = 160
    lr: float = 3e-3
    ft_lr: float = 3e-3
    prose_chars: int = 1_200_000
    code_chars: int = 1_200_000
    heldout_frac: float = 0.1
    seed: int = 0

    def key(self) -> str:
        payload = json.dumps({"version": DEMO_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# A pair small enough for tests: builds in a few seconds.
SMALL = DemoPairConfig(
    vocab_size=384,
    n_layer=2,
    n_embd=32,
    n_head=2,
    seq_len=32,
    batch_size=8,
    base_steps=30,
    ft_steps=30,
    prose_chars=120_000,
    code_chars=120_000,
    heldout_frac=0.3,
)


@dataclass
class DemoPair:
    """Paths of a built pair: ``base`` and ``ft`` model folders (tokenizer included), ``corpus`` jsonl."""

    root: Path
    base: Path
    ft: Path
    corpus: Path
    info: dict[str, Any]


def cache_dir() -> Path:
    """``$CROSSCODER_CACHE_DIR`` or ``~/.cache/crosscoder``."""
    return Path(os.environ.get("CROSSCODER_CACHE_DIR") or Path.home() / ".cache" / "crosscoder")


# ---------------------------------------------------------------------------------------------- text
def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def prose_documents(max_chars: int) -> list[str]:
    """Help topics, then module/class/function docstrings longer than 80 characters."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    total = sum(len(d) for d in docs)
    for f in _stdlib_files():
        if total >= max_chars:
            break
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) > 80:
                    docs.append(d)
                    total += len(d)
    return _cap([c for d in docs for c in _paragraph_chunks(d)], max_chars)


def _paragraph_chunks(text: str, chunk_chars: int = 1500) -> list[str]:
    """Split at blank lines into pieces of about ``chunk_chars`` (a long paragraph stays whole)."""
    out, cur, size = [], [], 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para) + 2
        if size >= chunk_chars:
            out.append("\n\n".join(cur))
            cur, size = [], 0
    if cur and size > 80:
        out.append("\n\n".join(cur))
    return out


def code_documents(max_chars: int, chunk_chars: int = 1500) -> list[str]:
    """Standard-library sources cut at line boundaries into documents of about ``chunk_chars``."""
    docs: list[str] = []
    total = 0
    for f in _stdlib_files():
        if total >= max_chars:
            break
        try:
            lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
            continue
        cur: list[str] = []
        size = 0
        for line in lines:
            cur.append(line)
            size += len(line)
            if size >= chunk_chars:
                docs.append("".join(cur))
                total += size
                cur, size = [], 0
        if size > 80:
            docs.append("".join(cur))
            total += size
    return _cap(docs, max_chars)


def _cap(docs: list[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d)
        total += len(d)
    return out


# ---------------------------------------------------------------------------------------------- model
def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE trained on ``texts``, wrapped as a transformers fast tokenizer (BOS = EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        unk_token=SPECIAL,
        model_max_length=1 << 30,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _blocks(docs: list[str], tok: Any, seq_len: int) -> torch.Tensor:
    """Docs -> ``[n_blocks, seq_len]`` packed training blocks, each starting with BOS."""
    from .text import iter_sequences

    seqs = [s.ids for s in iter_sequences(docs, tok, seq_len, pack=True) if len(s.ids) == seq_len]
    return torch.tensor(seqs, dtype=torch.long)


def _train(model: Any, blocks: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    for _ in range(steps):
        x = blocks[torch.randint(0, len(blocks), (batch_size,), generator=g)]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def eval_loss(model: Any, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss over ``blocks [n, seq_len]``."""
    losses = [
        float(model(input_ids=blocks[i : i + batch_size], labels=blocks[i : i + batch_size]).loss)
        for i in range(0, len(blocks), batch_size)
    ]
    return sum(losses) / max(len(losses), 1)


def _split(docs: list[str], frac: float, rng: random.Random) -> tuple[list[str], list[str]]:
    docs = list(docs)
    rng.shuffle(docs)
    n = max(1, int(len(docs) * frac))
    return docs[n:], docs[:n]


def _build(cfg: DemoPairConfig, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    prose_train, prose_eval = _split(prose_documents(cfg.prose_chars), cfg.heldout_frac, rng)
    code_train, code_eval = _split(code_documents(cfg.code_chars), cfg.heldout_frac, rng)
    tok = train_tokenizer(prose_train + code_train, cfg.vocab_size)
    say(f"tokenizer: vocab {len(tok)} ({time.perf_counter() - t0:.1f}s)")
    blocks = {
        name: _blocks(d, tok, cfg.seq_len)
        for name, d in (
            ("prose", prose_train),
            ("code", code_train),
            ("prose_eval", prose_eval),
            ("code_eval", code_eval),
        )
    }
    torch.manual_seed(cfg.seed)
    gcfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=max(cfg.seq_len, 128),
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    base = GPT2LMHeadModel(gcfg)
    _train(base, blocks["prose"], cfg.base_steps, cfg.batch_size, cfg.lr, cfg.seed)
    say(f"base model: {cfg.base_steps} steps on prose ({time.perf_counter() - t0:.1f}s)")
    ft = copy.deepcopy(base)
    _train(ft, blocks["code"], cfg.ft_steps, cfg.batch_size, cfg.ft_lr, cfg.seed + 1)
    say(f"fine-tuned model: {cfg.ft_steps} more steps on code ({time.perf_counter() - t0:.1f}s)")
    losses = {
        f"{m}_{d}": round(eval_loss(model, blocks[f"{d}_eval"][:64]), 4)
        for m, model in (("base", base), ("ft", ft))
        for d in ("prose", "code")
    }
    for name, model in (("base", base), ("ft", ft)):
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    with open(out / "corpus.jsonl", "w") as fh:  # held-out documents first, then the training ones
        for split, prose, code in (("heldout", prose_eval, code_eval), ("train", prose_train, code_train)):
            for i in range(max(len(prose), len(code))):
                for domain, docs in (("prose", prose), ("code", code)):
                    if i < len(docs):
                        fh.write(json.dumps({"text": docs[i], "domain": domain, "split": split}) + "\n")
    info = {
        "config": dataclasses.asdict(cfg),
        "key": cfg.key(),
        "eval_loss": losses,
        "params": sum(p.numel() for p in base.parameters()),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "heldout_docs": {"prose": len(prose_eval), "code": len(code_eval)},
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def build_demo_pair(
    cfg: DemoPairConfig = DemoPairConfig(),
    root: str | os.PathLike | None = None,
    rebuild: bool = False,
    say: Callable[[str], None] | None = None,
) -> DemoPair:
    """Build the pair once (cached under ``root``, default ``cache_dir()/demo_pair``) and return its paths."""
    say = say or (lambda s: None)
    folder = Path(root) if root is not None else cache_dir() / "demo_pair"
    target = folder / cfg.key()
    if rebuild and target.exists():
        import shutil

        shutil.rmtree(target)
    if not (target / "info.json").is_file():
        say(f"building the demo pair in {target} (once)")
        try:
            with atomic_dir(target) as tmp:
                _build(cfg, tmp, say)
        except OSError:
            if not (target / "info.json").is_file():  # not a concurrent build that finished first
                raise
    info = json.loads((target / "info.json").read_text())
    return DemoPair(
        root=target, base=target / "base", ft=target / "ft", corpus=target / "corpus.jsonl", info=info
    )
