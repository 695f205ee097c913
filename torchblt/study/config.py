"""The configuration of ``blt study``: small nested dataclasses read from YAML, strictly (an unknown key or
a wrong type is one ``ValueError`` line naming the dotted key), with the same loader as ``blt train``.

A study is ``budgets`` (training FLOPs) x ``families`` (BLT with entropy or space patching, a byte-level
transformer, a BPE transformer) x ``seeds``, plus ``noise_seeds`` repeated at the smallest budget (or at
``noise_budgets``). Every
model is sized from its budget by :func:`torchblt.study.sizing.size_model` (``sizing``), trained on the
same data with the same optimiser recipe (``optim``) and evaluated the same way (``eval``). See
``docs/study.md`` for the meaning of each field and ``configs/study.yaml`` for the real study.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchblt.validation import build_dataclass, load_yaml

__all__ = [
    "BPESection",
    "DataSection",
    "EntropySection",
    "EvalSection",
    "Family",
    "LocalSection",
    "OptimSection",
    "SizingSection",
    "StudyConfig",
    "load_study_config",
]

FAMILY_KINDS = ("blt", "byte", "bpe")
BLT_PATCHING = ("entropy", "space", "static")


@dataclass
class Family:
    """One line of the figure: a model kind and, for BLT, how it is patched.

    ``patch_size``: the target mean patch size of entropy patching (the threshold is calibrated to it on
    the training data), or the stride of static patching; space patching has none (it is measured).
    """

    name: str
    kind: str  # blt | byte | bpe
    patching: str | None = None  # blt: entropy | space | static
    patch_size: float | None = None


@dataclass
class DataSection:
    """The corpus, and the rows every family trains on.

    Every family sees rows of ``context_bytes`` bytes (a BPE row holds ``context_bytes / bytes_per_token``
    tokens) and ``batch_bytes / context_bytes`` rows per optimizer step, so all of them train on the same
    bytes per step.
    """

    train: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)
    text_field: str = "text"
    # the training runs read only the first N files of data.train (sorted), and entropies are computed for
    # those alone; the BPE tokenizer and the entropy model still train on all of it (None: every file)
    run_files: int | None = None
    context_bytes: int = 512
    batch_bytes: int = 8192
    shuffle_buffer: int = 64
    interleave: int = 8


@dataclass
class LocalSection:
    """The BLT's local models (encoder, decoder, cross-attention, hash n-grams): fixed for every budget."""

    dim: int = 64
    encoder_layers: int = 1
    decoder_layers: int = 1
    n_heads: int = 2
    window: int = 128
    cross_attn_k: int = 2
    cross_attn_heads: int = 2
    hash_vocab_size: int = 4093
    hash_group_sizes: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])


@dataclass
class SizingSection:
    """The sizing rule's constants (:func:`torchblt.study.sizing.size_model`)."""

    tokens_per_param: float = 20.0  # main-model tokens (bytes, patches, BPE tokens) per main-model parameter
    aspect: int = 64  # target width / depth of the main model; shapes with width/depth in [aspect/2, 2 aspect]
    head_dim: int = 32  # widths are multiples of it
    min_width: int = 32
    max_width: int = 1024
    multiple_of: int = 32  # SwiGLU hidden width rounding
    local: LocalSection = field(default_factory=LocalSection)


@dataclass
class EntropySection:
    """The one entropy model of the study (a small byte LM), trained on the training split."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    window: int = 64
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1000
    lr: float = 3e-3
    calibration_bytes: int = 4 << 20  # text the thresholds are calibrated on (and space patch sizes measured on)


@dataclass
class BPESection:
    """The one BPE tokenizer of the study, trained on the training split."""

    vocab_size: int = 2048
    max_bytes: int | None = None  # train the tokenizer on at most this many bytes of the training split


@dataclass
class OptimSection:
    """One recipe for every run (AdamW, warmup then cosine)."""

    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1


@dataclass
class EvalSection:
    """Held-out bits per byte (:func:`torchblt.eval.bpb.evaluate_bpb`, as ``blt eval``)."""

    batch_size: int = 16
    sample_bytes: int | None = None  # evaluate on whole held-out documents drawn at random up to this size (None: all)


@dataclass
class StudyConfig:
    out: str = "runs/study"
    data: DataSection = field(default_factory=DataSection)
    budgets: list[float] = field(default_factory=list)  # training FLOPs per run
    seeds: list[int] = field(default_factory=lambda: [0])
    noise_seeds: list[int] = field(default_factory=list)  # more seeds, at the smallest budget only
    noise_budgets: list[float] | None = None  # the budgets noise_seeds repeat (None: the smallest)
    families: list[Family] = field(default_factory=list)
    sizing: SizingSection = field(default_factory=SizingSection)
    entropy_model: EntropySection = field(default_factory=EntropySection)
    bpe: BPESection = field(default_factory=BPESection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    min_steps: int = 20  # fewer optimizer steps than this cannot meet a budget within 5% (one step = 1/steps)
    checkpoints_per_run: int = 8
    progress: bool = True  # the trainer's progress bar

    def validate(self) -> None:
        def bad(key: str, value: Any, why: str) -> ValueError:
            return ValueError(f"{key}: {why}, got {value!r}")

        d = self.data
        if not d.train:
            raise bad("data.train", d.train, "needs at least one file or folder of training text")
        if not d.validation:
            raise bad("data.validation", d.validation, "needs held-out text (every family is evaluated on it)")
        for key, value, low in (("data.context_bytes", d.context_bytes, 16), ("data.batch_bytes", d.batch_bytes, 16),
                                ("min_steps", self.min_steps, 1), ("checkpoints_per_run", self.checkpoints_per_run, 1),
                                ("bpe.vocab_size", self.bpe.vocab_size, 259),
                                ("entropy_model.steps", self.entropy_model.steps, 1),
                                ("entropy_model.calibration_bytes", self.entropy_model.calibration_bytes, 1),
                                ("eval.batch_size", self.eval.batch_size, 1),
                                ("eval.sample_bytes", 1 if self.eval.sample_bytes is None else self.eval.sample_bytes, 1),
                                ("data.run_files", 1 if d.run_files is None else d.run_files, 1)):
            if value < low:
                raise bad(key, value, f"must be at least {low}")
        if d.batch_bytes < d.context_bytes:
            raise bad("data.batch_bytes", d.batch_bytes, f"must hold at least one row of data.context_bytes={d.context_bytes}")
        if not self.budgets:
            raise bad("budgets", self.budgets, "needs at least one training-FLOP budget")
        for i, b in enumerate(self.budgets):
            if not b > 0:
                raise bad(f"budgets[{i}]", b, "must be a positive number of FLOPs")
        if len(set(self.budgets)) != len(self.budgets):
            raise bad("budgets", self.budgets, "must be distinct")
        for i, b in enumerate(self.noise_budgets or []):
            if b not in self.budgets:
                raise bad(f"noise_budgets[{i}]", b, f"must be one of budgets {self.budgets}")
        if not self.seeds:
            raise bad("seeds", self.seeds, "needs at least one seed")
        if not self.families:
            raise bad("families", self.families, "needs at least one family")
        names = [f.name for f in self.families]
        for i, f in enumerate(self.families):
            key = f"families[{i}]"
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", f.name):
                raise bad(f"{key}.name", f.name, "must be letters, digits, '.', '_' or '-' (it names a folder)")
            if names.count(f.name) > 1:
                raise bad(f"{key}.name", f.name, "is used twice")
            if f.kind not in FAMILY_KINDS:
                raise bad(f"{key}.kind", f.kind, f"must be one of {FAMILY_KINDS}")
            if f.kind == "blt":
                if f.patching not in BLT_PATCHING:
                    raise bad(f"{key}.patching", f.patching, f"a BLT family needs one of {BLT_PATCHING}")
                if f.patching in ("entropy", "static") and not (f.patch_size is not None and f.patch_size > 1):
                    raise bad(f"{key}.patch_size", f.patch_size, f"{f.patching} patching needs a patch size > 1")
                if f.patching == "space" and f.patch_size is not None:
                    raise bad(f"{key}.patch_size", f.patch_size, "space patching has no patch size (it is measured)")
            elif f.patching is not None or f.patch_size is not None:
                raise bad(f"{key}.patching", f.patching, f"only BLT families are patched, not kind {f.kind!r}")
        s = self.sizing
        if not s.tokens_per_param > 0:
            raise bad("sizing.tokens_per_param", s.tokens_per_param, "must be positive")
        for key, value in (("sizing.aspect", s.aspect), ("sizing.head_dim", s.head_dim),
                           ("sizing.multiple_of", s.multiple_of), ("sizing.min_width", s.min_width)):
            if value < 1:
                raise bad(key, value, "must be a positive integer")
        if s.head_dim % 2:
            raise bad("sizing.head_dim", s.head_dim, "must be even (RoPE)")
        if s.max_width < max(s.min_width, s.head_dim):
            raise bad("sizing.max_width", s.max_width, "must be at least sizing.min_width and sizing.head_dim")
        loc = s.local
        if loc.dim % loc.n_heads or loc.dim % loc.cross_attn_heads:
            raise bad("sizing.local.dim", loc.dim, "must be divisible by n_heads and cross_attn_heads")
        for key, value in (("sizing.local.encoder_layers", loc.encoder_layers),
                           ("sizing.local.decoder_layers", loc.decoder_layers), ("sizing.local.window", loc.window),
                           ("sizing.local.cross_attn_k", loc.cross_attn_k),
                           ("sizing.local.hash_vocab_size", loc.hash_vocab_size)):
            if value < 1:
                raise bad(key, value, "must be a positive integer")
        o = self.optim
        if not o.lr > 0:
            raise bad("optim.lr", o.lr, "must be positive")
        if not 0 <= o.warmup_fraction < 1:
            raise bad("optim.warmup_fraction", o.warmup_fraction, "must be in [0, 1)")
        if d.run_files is not None:
            self.run_sources()  # no more than data.train holds

    def run_sources(self) -> list[str]:
        """The training files the runs read (and entropies are computed for): ``data.run_files`` of them."""
        from torchblt.data.sources import resolve_sources

        n = self.data.run_files
        if n is None:
            return list(self.data.train)
        files = resolve_sources(self.data.train)
        if n > len(files):
            raise ValueError(f"data.run_files: {n} is more than the {len(files)} files of data.train")
        return files[:n]

    @property
    def rows_per_step(self) -> int:
        return max(1, self.data.batch_bytes // self.data.context_bytes)

    @property
    def smallest_budget(self) -> float:
        return min(self.budgets)

    def runs(self) -> list[tuple[float, Family, int]]:
        """Every ``(budget, family, seed)``: all seeds at every budget, noise seeds at the smallest (or at
        ``noise_budgets``)."""
        out = []
        for budget in sorted(self.budgets):
            seeds = list(self.seeds)
            if budget in (self.noise_budgets if self.noise_budgets is not None else [self.smallest_budget]):
                seeds += [s for s in self.noise_seeds if s not in seeds]
            out += [(budget, f, s) for f in self.families for s in seeds]
        return out


def load_study_config(path: str | Path, out: str | None = None) -> StudyConfig:
    """Read a study YAML (relative data paths are taken from the current directory, as ``blt train`` does)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such study config")
    raw = load_yaml(p)  # one line naming the file for bad YAML or text that is not UTF-8
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: the top level must be a mapping")
    try:
        cfg = build_dataclass(StudyConfig, raw, "")
        if out is not None:
            cfg.out = out
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    return cfg


def config_to_dict(cfg: StudyConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
