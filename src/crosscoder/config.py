"""Configuration dataclasses. The CLI flags are generated from these (see :mod:`crosscoder.cli.args`).

A run's ``OUT/config.json`` holds every field (model fields at the top level, as in Hugging Face
``config.json`` files, training and data fields under ``"train"`` and ``"data"``) and can be passed
back with ``--config`` to reproduce the run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data_config import DataConfig
from .errors import ConfigError
from .fields import option as _f
from .model.registry import ARCHITECTURES, architecture_names

DEFAULT_VAL_TOKENS = 65_536  # held-out rows when the data has at least 10x as many


def _option_classes() -> tuple[type, ...]:
    """The ``Options`` dataclasses of the registered architectures (each once, registration order)."""
    out: list[type] = []
    for cls in ARCHITECTURES.values():
        if cls.Options is not None and cls.Options not in out:
            out.append(cls.Options)
    return tuple(out)


@dataclass
class _ModelFields:
    """The fields every architecture shares (first in ``config.json``)."""

    arch: str = _f("vanilla", "architecture from the registry", choices=architecture_names())
    d_latent: int = _f(2048, "number of latents (dictionary size)", aliases=("--dict-size",))
    l1_weighting: str = _f(
        "sum",
        "decoder-norm weighting of the sparsity term (and of BatchTopK scores)",
        choices=("sum", "concat"),
    )
    dec_init_norm: float = _f(
        1.0,
        "initial L2 norm of every per-model decoder vector, in the normalised "
        "space (0.08: Kissane's replication)",
    )
    shared_latents: int = _f(
        0, "designated shared latents: decoder vector tied across models (any architecture)"
    )
    shared_sparsity_coeff: float | None = _f(
        None,
        "sparsity factor of the designated shared latents relative to "
        "the others: penalties multiplied, selection scores divided by it "
        "(default: 0.5 vanilla, 0.1 jumprelu, 1.0 batchtopk/matryoshka)",
    )
    dedicated_base: int = _f(0, "dedicated partition: the first N latents read and write the base model only")
    dedicated_ft: int = _f(
        0, "dedicated partition: the next N latents read and write the fine-tuned model only"
    )
    n_models: int = _f(2, "number of models (inferred from data)", cli=False)
    d_model: int = _f(0, "activation width (inferred from data)", cli=False)
    norm_scale: list[float] | None = _f(
        None, "per-model factor multiplying raw activations (inferred from data)", cli=False
    )
    norm_mean: list[list[float]] | None = _f(
        None,
        "per-model mean [n_models][d_model] subtracted before norm_scale (inferred from data)",
        cli=False,
    )
    model_names: list[str] | None = _f(None, "names of the models, base first", cli=False)
    site: str | None = _f(None, "module the activations were read at", cli=False)
    d_models: list[int] | None = _f(
        None,
        "width of each block of the model axis when they differ (inferred from data; d_model is the "
        "largest, narrower blocks are zero-padded)",
        cli=False,
    )
    sites: list[str] | None = _f(None, "module paths read, when several (inferred from data)", cli=False)
    block_models: list[int] | None = _f(
        None,
        "model index (into model_names) of each block of the model axis, when blocks are "
        "(model, site) pairs (inferred from data; None: one block per model)",
        cli=False,
    )
    block_sites: list[int] | None = _f(
        None, "site index (into sites) of each block of the model axis (inferred from data)", cli=False
    )


@dataclass
class CrossCoderConfig(*_option_classes(), _ModelFields):
    """Architecture of one crosscoder: the shared fields, then each registered architecture's ``Options``
    (flat, as flags and in ``config.json``). Saved at the top level of ``config.json``."""

    def validate(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(
                f"arch: unknown architecture {self.arch!r} (choices: {', '.join(ARCHITECTURES)})"
            )
        for name in ("d_latent", "n_models"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if hasattr(self, "k") and self.k <= 0:
            raise ConfigError(f"k: must be positive, got {self.k}")
        if self.l1_weighting not in ("sum", "concat"):
            raise ConfigError(f"l1_weighting: must be 'sum' or 'concat', got {self.l1_weighting!r}")
        for name in ("shared_latents", "dedicated_base", "dedicated_ft"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        reserved = self.shared_latents + self.dedicated_base + self.dedicated_ft
        if reserved > self.d_latent:
            raise ConfigError(
                f"shared_latents + dedicated_base + dedicated_ft: {reserved} exceeds d_latent "
                f"({self.d_latent})"
            )
        if self.dedicated_base + self.dedicated_ft and self.n_models < 2:
            raise ConfigError("dedicated_base/dedicated_ft: need at least two models")
        if self.shared_sparsity_coeff is not None and not self.shared_sparsity_coeff > 0:
            raise ConfigError(f"shared_sparsity_coeff: must be positive, got {self.shared_sparsity_coeff}")
        if self.norm_scale is not None and len(self.norm_scale) != self.n_models:
            raise ConfigError(f"norm_scale: expected {self.n_models} factors, got {len(self.norm_scale)}")
        self._validate_blocks()
        if (
            self.norm_mean is not None
            and self.d_model > 0
            and (
                len(self.norm_mean) != self.n_models
                or any(
                    len(r) not in (self.d_model, w)
                    for r, w in zip(self.norm_mean, self.widths(), strict=False)
                )
            )
        ):
            raise ConfigError(f"norm_mean: expected {self.n_models} rows of {self.d_model} values")
        ARCHITECTURES[self.arch].validate_config(self)

    def _validate_blocks(self) -> None:
        """Checks of the block description (``d_models``, ``block_models``, ``block_sites``)."""
        if self.d_models is not None:
            if len(self.d_models) != self.n_models or any(int(w) <= 0 for w in self.d_models):
                raise ConfigError(f"d_models: expected {self.n_models} positive widths, got {self.d_models}")
            if self.d_model > 0 and max(self.d_models) != self.d_model:
                raise ConfigError(
                    f"d_models: the largest width {max(self.d_models)} must equal d_model {self.d_model}"
                )
        for name, names in (("block_models", self.model_names), ("block_sites", self.sites)):
            idx = getattr(self, name)
            if idx is None:
                continue
            if len(idx) != self.n_models or any(int(i) < 0 for i in idx):
                raise ConfigError(f"{name}: expected {self.n_models} indices >= 0, got {idx}")
            if names is not None and max(idx) >= len(names):
                raise ConfigError(f"{name}: index {max(idx)} but only {len(names)} names")

    def widths(self) -> list[int]:
        """Width of each block of the model axis (``d_models``, or ``d_model`` for every block)."""
        return (
            [int(w) for w in self.d_models] if self.d_models is not None else [self.d_model] * self.n_models
        )

    def block_model_index(self) -> list[int]:
        """Model index of each block (``block_models``; with one site, block ``i`` is model ``i``)."""
        return (
            [int(i) for i in self.block_models]
            if self.block_models is not None
            else list(range(self.n_models))
        )


@dataclass
class TrainConfig:
    """Optimisation, schedules, logging and checkpointing."""

    num_tokens: int = _f(20_000_000, "training budget in tokens")
    batch_size: int = _f(2048, "tokens per optimiser step")
    lr: float = _f(1e-3, "Adam learning rate")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    lr_warmup_frac: float = _f(0.0, "fraction of steps of linear LR warm-up")
    lr_decay_frac: float = _f(0.2, "fraction of steps (at the end) of linear LR decay to 0")
    l1_coeff: float = _f(1.0, "sparsity coefficient after warm-up (vanilla: L1; jumprelu: L0/tanh penalty)")
    l1_warmup_frac: float = _f(0.05, "fraction of steps over which the L1 coefficient ramps from 0")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (<= 0 disables)")
    aux_k: int | None = _f(
        None,
        "AuxK: dead latents used by the auxiliary loss (0 = off; default "
        "min(512, dict_size / 2) for batchtopk, 0 for vanilla)",
    )
    aux_coeff: float = _f(1 / 32, "AuxK loss coefficient")
    dead_tokens: int | None = _f(
        None,
        "a latent is dead after this many tokens without firing (default: "
        "min(10M, num_tokens / 20), at least one batch)",
    )
    l2_loss: str = _f(
        "squared",
        "reconstruction loss: squared error summed, or per-model L2 norm",
        choices=("squared", "norm"),
    )
    b_dec_init: str = _f(
        "mean",
        "decoder bias init: the data mean in the training space (0 when centred), "
        "zeros, or the geometric median of the first batch",
        choices=("mean", "zeros", "geometric_median"),
    )
    seed: int = _f(0, "seed for init, shuffling and validation split")
    log_every: int = _f(50, "steps between metric logs")
    save_every: int = _f(1000, "steps between checkpoints (0 = only at the end / on signal)")
    keep_checkpoints: int = _f(2, "checkpoints kept on disk")
    val_every: int = _f(500, "steps between validation passes (0 = off)")
    val_tokens: int | None = _f(
        None, "held-out tokens never trained on (0 = no validation; default: min(65536, rows / 10))"
    )
    wandb: str = _f(
        "auto",
        "wandb logging (auto = online when logged in, else offline)",
        choices=("auto", "online", "offline", "off"),
    )
    wandb_project: str = _f("crosscoder", "wandb project")
    threads: int = _f(1, "torch CPU threads (1 is fastest on a shared 2-core machine)")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = _f(
        "float32",
        "compute dtype (bfloat16 = autocast, float32 master weights)",
        choices=("float32", "bfloat16"),
    )
    compile: bool = _f(False, "torch.compile the training step")
    latent_shards: int = _f(
        1, "split the latents over this many torchrun ranks (tensor parallel; must divide the ranks)"
    )
    progress: bool = _f(True, "show a tqdm progress bar")

    def validate(self) -> None:
        for name in ("num_tokens", "batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.num_tokens < self.batch_size:
            raise ConfigError(f"num_tokens: {self.num_tokens} is smaller than one batch ({self.batch_size})")
        for name in ("lr_warmup_frac", "lr_decay_frac", "l1_warmup_frac"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name}: must be in [0, 1], got {v}")
        if self.lr_warmup_frac + self.lr_decay_frac > 1.0:
            raise ConfigError("lr_warmup_frac + lr_decay_frac must not exceed 1")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints: must be at least 1")
        if self.threads < 1:
            raise ConfigError("threads: must be at least 1")
        if self.latent_shards < 1:
            raise ConfigError(f"latent_shards: must be at least 1, got {self.latent_shards}")

    @property
    def total_steps(self) -> int:
        return self.num_tokens // self.batch_size

    def resolved_aux_k(self, arch: str, d_latent: int) -> int:
        """``aux_k``, or its default: ``min(512, d_latent // 2)`` for architectures with AuxK on by default
        (the BatchTopK family; Gao et al. use 512 with dictionaries of 2^15 and more; half of a small
        dictionary keeps the auxiliary loss a sparse reconstruction), 0 (off) for the others."""
        if self.aux_k is not None:
            return self.aux_k
        return min(512, max(1, d_latent // 2)) if ARCHITECTURES[arch].aux_by_default else 0

    @property
    def resolved_dead_tokens(self) -> int:
        """``dead_tokens``, or its default ``min(10M, num_tokens // 20)`` (at least one batch): long enough
        that a live latent firing once in a few thousand tokens is never counted dead, short enough that
        AuxK acts during the run (a fixed 10M never fires in runs under 10M tokens)."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(self.batch_size, min(10_000_000, self.num_tokens // 20))


@dataclass
class RunConfig:
    """Everything one ``crosscoder train`` run needs."""

    model: CrossCoderConfig = field(default_factory=CrossCoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        from .model.sharding import check_shardable

        check_shardable(self.model.arch, self.model, self.train.latent_shards)
        if self.train.latent_shards > 1 and self.train.compile:
            raise ConfigError("latent_shards: --compile is not supported with latent sharding")

    def to_dict(self) -> dict[str, Any]:
        """Hugging Face style: model fields at the top level, then ``train`` and ``data`` sections."""
        out = dataclasses.asdict(self.model)
        out["train"] = dataclasses.asdict(self.train)
        out["data"] = dataclasses.asdict(self.data)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> RunConfig:
        """Accept a saved ``config.json`` (sections) or a flat mapping of field names."""
        sections: dict[str, dict[str, Any]] = {"model": {}, "train": {}, "data": {}}
        owners = {
            name: sec
            for sec, c in (("model", CrossCoderConfig), ("train", TrainConfig), ("data", DataConfig))
            for name in _names(c)
        }
        for key, value in d.items():
            if key in sections and isinstance(value, dict):
                sections[key].update(value)
            elif key in owners:
                sections[owners[key]][key] = value
            elif key not in INFO_KEYS:
                raise ConfigError(f"{source}: unknown key {key!r}")
        return cls(
            model=dataclass_from_dict(CrossCoderConfig, sections["model"], f"{source}: model"),
            train=dataclass_from_dict(TrainConfig, sections["train"], f"{source}: train"),
            data=dataclass_from_dict(DataConfig, sections["data"], f"{source}: data"),
        )


# Keys written to config.json for information only; accepted and ignored on load.
INFO_KEYS = {
    "library",
    "version",
    "threshold",
    "metrics",
    "created",
    "recovery",
    "format",
    "source",
    "converted_from",
}


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def dataclass_from_dict(cls: type, d: dict[str, Any], source: str) -> Any:
    """Build ``cls`` from a dict, refusing unknown keys with an error naming them and the source."""
    unknown = sorted(set(d) - set(_names(cls)))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
    return cls(**d)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict (one-line errors on failure)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise ConfigError(
            f"{path}: cannot parse config ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: config must be a mapping")
    return d
