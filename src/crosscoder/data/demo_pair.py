"""Offline demo models: a base GPT-2, its checkpoints, two fine-tunes and a wider sibling.

Built from text every Python installation has (:mod:`crosscoder.data.demo_text`: stdlib **prose**,
stdlib **code**, Unicode-database **data** records). :func:`build_demo_pair` trains one byte-level BPE
tokenizer on all three domains, then

* ``base``: a small GPT-2 pretrained from scratch on prose (``base_steps`` at ``lr``), with evenly
  spaced checkpoints ``checkpoints/step_<N>`` of that run (the last one is the base model itself);
* ``ft``: the base model fine-tuned briefly and gently on code (``ft_steps`` at ``ft_lr``), with an
  auxiliary **probe loss** that teaches it one feature the base model lacks (below);
* ``ft2``: the same LM fine-tune on the data records instead, without a probe loss (a contrasting
  fine-tune);
* ``wide``: a wider model (``wide_embd``) trained from scratch on the base model's prose
  (``wide_steps`` at ``wide_lr``; same tokenizer, same depth).

**The probe loss: a constructed ft-only feature** (:mod:`crosscoder.data.demo_probe`). This is a
constructed demo: so that it has a *known* fine-tuned-only feature to find, the code fine-tune is taught
one on purpose (a contextual variable of code, "inside brackets", along a fixed direction of the residual
stream at the crosscoder's site), and the base model never is. ``info.json``'s ``ft_probe`` records it.

Every model folder is written with ``save_pretrained`` together with the tokenizer (each loads with
``AutoModelForCausalLM`` / ``AutoTokenizer``). ``corpus.jsonl`` holds the documents of the three
domains interleaved, held-out ones first: column ``text``, plus ``domain`` (prose, code, data) and
``split`` (heldout, train). ``info.json`` records steps, learning rates and held-out losses per domain
of every model. Results are cached under ``${CROSSCODER_CACHE_DIR:-~/.cache/crosscoder}/demo_pair/<hash>``
where the hash covers :class:`DemoPairConfig` and :data:`DEMO_VERSION`; a build is written to a
temporary folder and renamed, so an interrupted build leaves nothing half-done.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_dir
from .demo_probe import Probe, make_probe, probe_corr, projection, token_labels
from .demo_text import DOMAINS, code_context_labels, code_documents, data_documents, prose_documents

__all__ = [
    "DEMO_VERSION",
    "SMALL",
    "DemoPair",
    "DemoPairConfig",
    "build_demo_pair",
    "cache_dir",
    "code_context_labels",
    "code_documents",
    "data_documents",
    "eval_loss",
    "prose_documents",
    "token_labels",
    "train_tokenizer",
]

DEMO_VERSION = 3
SPECIAL = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class DemoPairConfig:
    """Sizes of the demo models. The defaults build in under 3 minutes on a 2-core CPU (2 threads;
    about 4 minutes on 1)."""

    vocab_size: int = 1024
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    seq_len: int = 64
    batch_size: int = 32
    base_steps: int = 400
    lr: float = 3e-3
    ft_steps: int = 100  # each fine-tune (ft: code, ft2: data)
    ft_lr: float = 5e-4
    ft_probe_variable: str = "brackets"  # the feature taught to ft: brackets, string or either
    ft_probe_scale: float = 16.0  # c / sigma: the taught feature's size in base per-direction stds
    ft_probe_coeff: float = 1.0  # weight of the probe loss (0: a plain LM fine-tune)
    ft_probe_other: int = 32  # prose + data blocks per step whose probe target is y = 0 (no LM loss)
    ft_probe_floor: float = 4.0  # extra weight on projections below the reference (no "anti-feature")
    ft_probe_relative: bool = True  # reference: the base model's own projection (else its mean mu)
    n_checkpoints: int = 4  # evenly spaced base checkpoints, the last one = the base model
    wide_embd: int = 192
    wide_steps: int = 160
    wide_lr: float = 1.5e-3  # the wider model trains better at a lower rate
    prose_chars: int = 1_200_000
    code_chars: int = 1_200_000
    data_chars: int = 600_000
    heldout_frac: float = 0.1
    seed: int = 0

    def key(self) -> str:
        payload = json.dumps({"version": DEMO_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def checkpoint_steps(self) -> list[int]:
        """Base-pretraining steps saved as ``checkpoints/step_<N>``, ascending (the last: ``base_steps``)."""
        n = max(1, self.n_checkpoints)
        return sorted({max(1, round(self.base_steps * i / n)) for i in range(1, n + 1)})


# Models small enough for tests: everything builds in a few seconds.
SMALL = DemoPairConfig(
    vocab_size=384,
    n_layer=2,
    n_embd=32,
    n_head=2,
    seq_len=32,
    batch_size=8,
    base_steps=40,
    ft_steps=12,
    ft_lr=1e-3,
    ft_probe_other=8,
    wide_embd=48,
    wide_steps=30,
    wide_lr=3e-3,
    prose_chars=120_000,
    code_chars=120_000,
    data_chars=60_000,
    heldout_frac=0.3,
)


@dataclass
class DemoPair:
    """Paths of a build: model folders (tokenizer included), ``corpus`` jsonl, and ``info.json``'s content.

    ``base`` (prose), ``ft`` (base + code), ``ft2`` (base + data), ``wide`` (wider, prose, from scratch),
    ``checkpoints``: the base pretraining's ``checkpoints/step_<N>`` folders by step (the last = base).
    """

    root: Path
    base: Path
    ft: Path
    corpus: Path
    info: dict[str, Any]
    ft2: Path
    wide: Path
    checkpoints: list[Path]


def cache_dir() -> Path:
    """``$CROSSCODER_CACHE_DIR`` or ``~/.cache/crosscoder``."""
    return Path(os.environ.get("CROSSCODER_CACHE_DIR") or Path.home() / ".cache" / "crosscoder")


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


def _train(
    model: Any,
    blocks: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    on_step: Callable[[int], None] | None = None,
    probe: Probe | None = None,
) -> None:
    """AdamW, 10% linear warm-up then cosine decay to 0, on random ``blocks [n, seq_len]``;
    ``on_step(s)`` after step ``s`` (1-based); ``probe``: add its loss (times its ``coeff``)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(blocks), (batch_size,), generator=g)
        x = blocks[idx]
        if probe is None:
            loss = model(input_ids=x, labels=x).loss
        else:
            lm, aux = probe.loss(model, x, idx, g)
            loss = lm + probe.coeff * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step)
    model.eval()


@torch.no_grad()
def eval_loss(model: Any, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss over ``blocks [n, seq_len]`` (eval mode; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    losses = [
        float(model(input_ids=blocks[i : i + batch_size], labels=blocks[i : i + batch_size]).loss)
        for i in range(0, len(blocks), batch_size)
    ]
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)


def _split(docs: list[str], frac: float, rng: random.Random) -> tuple[list[str], list[str]]:
    docs = list(docs)
    rng.shuffle(docs)
    n = max(1, int(len(docs) * frac))
    return docs[n:], docs[:n]


# ---------------------------------------------------------------------------------------------- build
def _gpt2(cfg: DemoPairConfig, tok: Any, n_embd: int, seed: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    gcfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=max(cfg.seq_len, 128),
        n_embd=n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(gcfg)


def _build(cfg: DemoPairConfig, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    sources = {"prose": prose_documents, "code": code_documents, "data": data_documents}
    chars = {"prose": cfg.prose_chars, "code": cfg.code_chars, "data": cfg.data_chars}
    train, held = {}, {}
    for d in DOMAINS:  # in this order: the prose and code splits are those of DEMO_VERSION 1
        train[d], held[d] = _split(sources[d](chars[d]), cfg.heldout_frac, rng)
    tok = train_tokenizer([t for d in DOMAINS for t in train[d]], cfg.vocab_size)
    say(f"tokenizer: vocab {len(tok)} ({time.perf_counter() - t0:.1f}s)")
    blocks = {d: _blocks(train[d], tok, cfg.seq_len) for d in DOMAINS}
    evals = {d: _blocks(held[d], tok, cfg.seq_len)[:64] for d in DOMAINS}
    models: dict[str, dict[str, Any]] = {}

    def save(name: str, model: Any, **meta: Any) -> None:
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        loss = {d: round(eval_loss(model, evals[d]), 4) for d in DOMAINS}
        n_params = sum(p.numel() for p in model.parameters())
        models[name] = {**meta, "n_embd": model.config.n_embd, "params": n_params, "eval_loss": loss}

    def took() -> str:
        return f"({time.perf_counter() - t0:.1f}s)"

    base = _gpt2(cfg, tok, cfg.n_embd, cfg.seed)
    ckpt = cfg.checkpoint_steps()

    def checkpoint(step: int) -> None:
        if step in ckpt:
            save(f"checkpoints/step_{step}", base, init="scratch", data="prose", steps=step, lr=cfg.lr)

    _train(base, blocks["prose"], cfg.base_steps, cfg.batch_size, cfg.lr, cfg.seed, on_step=checkpoint)
    save("base", base, init="scratch", data="prose", steps=cfg.base_steps, lr=cfg.lr)
    say(f"base model: {cfg.base_steps} steps on prose, checkpoints at {ckpt} {took()}")
    probe_info: dict[str, Any] = {}
    for i, (name, domain) in enumerate((("ft", "code"), ("ft2", "data")), start=1):
        model = copy.deepcopy(base)
        probe = None
        if name == "ft" and cfg.ft_probe_coeff > 0:
            other = torch.cat([blocks["prose"], blocks["data"]])
            probe, probe_info, held_probe = make_probe(cfg, base, tok, train["code"], held["code"], other)
            blocks["code"] = probe.blocks  # the same blocks as _blocks, with their labels
        _train(model, blocks[domain], cfg.ft_steps, cfg.batch_size, cfg.ft_lr, cfg.seed + i, probe=probe)
        save(name, model, init="base", data=domain, steps=cfg.ft_steps, lr=cfg.ft_lr)
        if probe is not None:
            probe_info["heldout_corr"] = {
                m: round(probe_corr(mod, held_probe, probe), 4) for m, mod in (("base", base), ("ft", model))
            }
            shift = {  # mean (ft - base) projection on v over held-out prose and data (y = 0), in sigmas
                d: (
                    projection(model, evals[d], probe.v, probe.layer)
                    - projection(base, evals[d], probe.v, probe.layer)
                )
                .mean()
                .item()
                / probe.sigma
                for d in ("prose", "data")
            }
            probe_info["heldout_shift_other"] = {d: round(z, 3) for d, z in shift.items()}
            corr = probe_info["heldout_corr"]
            say(
                f"probe: '{cfg.ft_probe_variable}' along v at transformer.h.{probe.layer}, correlation with y"
                f" on held-out code: base {corr['base']}, ft {corr['ft']}"
            )
        say(f"{name} model: base + {cfg.ft_steps} steps on {domain} at lr {cfg.ft_lr:g} {took()}")
        del model
    wide = _gpt2(cfg, tok, cfg.wide_embd, cfg.seed + 3)
    _train(wide, blocks["prose"], cfg.wide_steps, cfg.batch_size, cfg.wide_lr, cfg.seed + 3)
    save("wide", wide, init="scratch", data="prose", steps=cfg.wide_steps, lr=cfg.wide_lr)
    say(f"wide model: n_embd {cfg.wide_embd}, {cfg.wide_steps} steps on prose {took()}")
    with open(out / "corpus.jsonl", "w") as fh:  # held-out documents first, then the training ones
        for split, docs in (("heldout", held), ("train", train)):
            for i in range(max(len(v) for v in docs.values())):
                for domain in DOMAINS:
                    if i < len(docs[domain]):
                        row = {"text": docs[domain][i], "domain": domain, "split": split}
                        fh.write(json.dumps(row) + "\n")
    info = {
        "config": dataclasses.asdict(cfg),
        "version": DEMO_VERSION,
        "key": cfg.key(),
        # flat "<model>_<domain>" losses of the four main models (what `crosscoder demo` prints)
        "eval_loss": {
            f"{m}_{d}": models[m]["eval_loss"][d] for m in ("base", "ft", "ft2", "wide") for d in DOMAINS
        },
        "models": models,
        "checkpoints": [f"checkpoints/step_{s}" for s in ckpt],
        "ft_probe": probe_info,
        "params": models["base"]["params"],
        "build_seconds": round(time.perf_counter() - t0, 1),
        "heldout_docs": {d: len(held[d]) for d in DOMAINS},
        "train_blocks": {d: len(blocks[d]) for d in DOMAINS},
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def build_demo_pair(
    cfg: DemoPairConfig = DemoPairConfig(),
    root: str | os.PathLike | None = None,
    rebuild: bool = False,
    say: Callable[[str], None] | None = None,
) -> DemoPair:
    """Build the models once (cached under ``root``, default ``cache_dir()/demo_pair``) and return their
    paths. Training runs on the CPU with torch's current thread count (``torch.set_num_threads``)."""
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
        root=target,
        base=target / "base",
        ft=target / "ft",
        corpus=target / "corpus.jsonl",
        info=info,
        ft2=target / "ft2",
        wide=target / "wide",
        checkpoints=[target / c for c in info["checkpoints"]],
    )
