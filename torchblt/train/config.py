"""The run configuration of ``blt train``: small nested dataclasses loaded from YAML, with dotted
``key=value`` overrides from the command line.

Loading is strict: an unknown key or a value of the wrong type is a ``ValueError`` whose one line names
the dotted key, the value and what was expected (``optim.lr: expected a number, got 'fast'``; the one
layer of :mod:`torchblt.validation`). The model architecture is not a dataclass here: ``model.arch`` is a
preset name (``tiny-blt``, ``blt-1b``...) or a mapping in the ``config.json`` layout, optionally with
``base: PRESET`` to override a preset field by field; it is checked, types included, by the model's own
config loader when the kind builds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from torchblt.data.config import LEGACY_PATCHING_KEYS, DataConfig, upgrade_legacy_keys
from torchblt.validation import build_dataclass, check_device, load_yaml, yaml_problem


@dataclass
class ModelSection:
    """What to train: a ``kind`` from :data:`torchblt.train.kinds.KINDS` and its architecture."""

    kind: str = "blt"  # blt | entropy | byte (+ kinds registered by plugins, e.g. bpe)
    arch: Any = "tiny-blt"  # preset name, or a dict in the config.json layout (may hold ``base: PRESET``)
    init_from: str | None = None  # any folder/repo load_model reads: its weights start the run (fine-tuning)
    entropy_model: str | None = None  # BLT with entropy patching: frozen entropy model (patching + validation)


@dataclass
class OptimSection:
    lr: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # on the full gradient norm, once per optimizer step; 0 disables
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.0  # cosine/wsd end at lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays (linearly) to the minimum


@dataclass
class TrainSection:
    steps: int = 1000
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    activation_checkpointing: bool = False
    data_parallel: str = "fsdp"  # fsdp (fully_shard per block) | replicate (DDP-equivalent, FSDP2 without sharding)
    hash_sharding: str = "rows"  # under fsdp: rows (hash tables sharded by rows, lookups exchange touched rows) | fsdp


@dataclass
class CheckpointSection:
    every: int = 1000  # steps; a checkpoint is also written at the end and on SIGTERM/SIGINT/SIGUSR2
    keep: int = 3  # the last K checkpoints are kept
    export: bool = True  # at the end, also write the inference format (load_model) to RUN_DIR/model


@dataclass
class EvalSection:
    every: int = 0  # steps; 0: only at the end (if data.validation is set)
    max_documents: int | None = None
    batch_size: int = 8
    context_bytes: int | None = None


@dataclass
class LogSection:
    every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "torchblt"
    progress: bool = True  # console progress bar (rank 0)
    profile_steps: list[int] = field(default_factory=list)  # [start, end): torch.profiler trace of these steps


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(sources=[]))
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)

    def validate(self) -> None:
        from torchblt.train.kinds import get_kind

        kind = get_kind(self.model.kind)
        o, t, c, e, lg = self.optim, self.train, self.checkpoint, self.eval, self.log
        checks = [  # key, value, allowed (in words), ok
            ("train.steps", t.steps, "an integer >= 1", t.steps >= 1),
            ("train.grad_accum", t.grad_accum, "an integer >= 1", t.grad_accum >= 1),
            ("optim.lr", o.lr, "a positive number", o.lr > 0),
            ("optim.eps", o.eps, "a positive number", o.eps > 0),
            ("optim.weight_decay", o.weight_decay, "a number >= 0", o.weight_decay >= 0),
            ("optim.warmup_steps", o.warmup_steps, "an integer >= 0", o.warmup_steps >= 0),
            ("optim.grad_clip", o.grad_clip, "a number >= 0 (0: no clipping)", o.grad_clip >= 0),
            ("optim.betas", o.betas, "two numbers in [0, 1)", len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas)),
            ("optim.schedule", o.schedule, "cosine, wsd or constant", o.schedule in ("cosine", "wsd", "constant")),
            ("optim.min_lr_ratio", o.min_lr_ratio, "a number in [0, 1]", 0 <= o.min_lr_ratio <= 1),
            ("optim.decay_fraction", o.decay_fraction, "a number in [0, 1]", 0 <= o.decay_fraction <= 1),
            ("checkpoint.keep", c.keep, "an integer >= 1", c.keep >= 1),
            ("checkpoint.every", c.every, "an integer >= 1", c.every >= 1),
            ("log.every", lg.every, "an integer >= 1", lg.every >= 1),
            ("eval.every", e.every, "an integer >= 0", e.every >= 0),
            ("eval.batch_size", e.batch_size, "an integer >= 1", e.batch_size >= 1),
            ("eval.max_documents", e.max_documents, "an integer >= 0 or null",
             e.max_documents is None or e.max_documents >= 0),
            ("eval.context_bytes", e.context_bytes, "an integer >= 2 or null", e.context_bytes is None or e.context_bytes >= 2),
            ("train.dtype", t.dtype, "auto, bf16 or fp32", t.dtype in ("auto", "bf16", "fp32")),
            ("train.data_parallel", t.data_parallel, "fsdp or replicate", t.data_parallel in ("fsdp", "replicate")),
            ("train.hash_sharding", t.hash_sharding, "rows or fsdp", t.hash_sharding in ("rows", "fsdp")),
            ("log.profile_steps", lg.profile_steps, "[] or [start, end]", len(lg.profile_steps) in (0, 2)),
        ]
        for key, value, allowed, ok in checks:
            if not ok:
                raise ValueError(f"{key}: expected {allowed}, got {value!r}")
        # the device is checked by name here (a config may be written on a machine without the GPU it names)
        check_device(t.device, "train.device", allow_auto=True, check_available=False)
        if (kind.data_kind == "blt" and self.data.patching.mode == "entropy" and self.data.validation
                and not (self.model.entropy_model or self.data.entropy_model)):
            raise ValueError("model.entropy_model: validating an entropy-patched BLT needs the (frozen) entropy model "
                             "that patches the held-out text; set model.entropy_model=PATH (or drop data.validation)")
        if kind.make_loader is None:  # our loader: check the data section as it will be used
            dataclasses.replace(self.data, kind=kind.data_kind).validate()


# --------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=1e-3", "data.sources=[a.txt, b.txt]"]`` -> ``[("optim.lr", 0.001), ...]`` (values as YAML)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected KEY=VALUE (e.g. optim.lr=1e-3)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({yaml_problem(e)}); quote it, "
                             "e.g. key='[a, b'") from None
        out.append((key.strip(), value))
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None or isinstance(nxt, str) and part == "arch":  # "arch: tiny-blt" + arch.x=... -> base
            nxt = {"base": nxt} if isinstance(nxt, str) else {}
            node[part] = nxt
        if not isinstance(nxt, dict):
            raise ValueError(f"{'.'.join(parts[: i + 1])}: is {nxt!r}, cannot set {key}")
        node = nxt
    node[parts[-1]] = value


def _upgrade_override(key: str, value: Any) -> list[tuple[str, Any]]:
    """``data.threshold=X`` / ``data.patching=MODE`` (the first release's keys) -> ``data.patching.*``."""
    section, _, name = key.partition(".")
    if section != "data" or not (name in LEGACY_PATCHING_KEYS or (name == "patching" and isinstance(value, str))):
        return [(key, value)]
    upgraded = upgrade_legacy_keys({name: value})
    return [(f"data.patching.{k}", v) for k, v in upgraded["patching"].items()]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> TrainConfig:
    """Read ``path`` (YAML), apply dotted overrides, and build a checked :class:`TrainConfig`."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such config file")
        loaded = load_yaml(p)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{p}: the top level must be a mapping, got {type(loaded).__name__}")
        data.update(loaded or {})
    if isinstance(data.get("data"), dict):
        data["data"] = upgrade_legacy_keys(data["data"])
    for item in parse_overrides(overrides or []):
        for key, value in _upgrade_override(*item):
            _set_dotted(data, key, value)
    cfg = build_dataclass(TrainConfig, data)
    cfg.validate()
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
