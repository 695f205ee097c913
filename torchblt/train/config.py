"""The run configuration of ``blt train``: small nested dataclasses loaded from YAML, with dotted
``key=value`` overrides from the command line.

Loading is strict: an unknown key or a value of the wrong type is a ``ValueError`` whose one line names
the dotted key, the value and what was expected (``optim.lr: expected a float, got 'fast'``). The model
architecture is not a dataclass here: ``model.arch`` is a preset name (``tiny-blt``, ``blt-1b``...) or a
mapping in the ``config.json`` layout, optionally with ``base: PRESET`` to override a preset field by
field; it is checked by the model's own strict config loader.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from torchblt.data.config import LEGACY_PATCHING_KEYS, DataConfig, upgrade_legacy_keys


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
        checks = [
            ("train.steps", self.train.steps, self.train.steps >= 1),
            ("train.grad_accum", self.train.grad_accum, self.train.grad_accum >= 1),
            ("optim.lr", self.optim.lr, self.optim.lr > 0),
            ("optim.warmup_steps", self.optim.warmup_steps, self.optim.warmup_steps >= 0),
            ("optim.grad_clip", self.optim.grad_clip, self.optim.grad_clip >= 0),
            ("optim.betas", self.optim.betas, len(self.optim.betas) == 2),
            ("optim.schedule", self.optim.schedule, self.optim.schedule in ("cosine", "wsd", "constant")),
            ("optim.decay_fraction", self.optim.decay_fraction, 0 <= self.optim.decay_fraction <= 1),
            ("checkpoint.keep", self.checkpoint.keep, self.checkpoint.keep >= 1),
            ("checkpoint.every", self.checkpoint.every, self.checkpoint.every >= 1),
            ("log.every", self.log.every, self.log.every >= 1),
            ("eval.every", self.eval.every, self.eval.every >= 0),
            ("train.device", self.train.device, self.train.device in ("auto", "cpu", "cuda") or
             self.train.device.startswith("cuda:")),
            ("train.dtype", self.train.dtype, self.train.dtype in ("auto", "bf16", "fp32")),
            ("train.data_parallel", self.train.data_parallel, self.train.data_parallel in ("fsdp", "replicate")),
            ("log.profile_steps", self.log.profile_steps, len(self.log.profile_steps) in (0, 2)),
        ]
        for key, value, ok in checks:
            if not ok:
                raise ValueError(f"{key}: invalid value {value!r}")
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
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
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
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{p}: the top level must be a mapping, got {type(loaded).__name__}")
        data.update(loaded or {})
    if isinstance(data.get("data"), dict):
        data["data"] = upgrade_legacy_keys(data["data"])
    for item in parse_overrides(overrides or []):
        for key, value in _upgrade_override(*item):
            _set_dotted(data, key, value)
    cfg = from_dict(TrainConfig, data, "")
    cfg.validate()
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def from_dict(cls: type, data: Any, where: str, base: Any = None) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise one clear line.

    Fields ``data`` does not give keep their value in ``base`` (default: the field defaults); a nested
    section applies over the parent's default of that section (so ``data.patching: {mode: entropy}``
    keeps ``data``'s own patching defaults)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"{key}: unknown key; known keys here: {', '.join(sorted(names))}")
    defaults = base if base is not None else _Defaults(cls)
    kwargs = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls)} if base is not None else {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key, getattr(defaults, name, None))
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where or 'config'}: {e}") from None


class _Defaults:
    """The default value of every field of a dataclass (without building one: required fields may exist)."""

    def __init__(self, cls: type) -> None:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                setattr(self, f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, f.default_factory())


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, key: str, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, default)
            except ValueError as e:
                errors.append(e)
        raise ValueError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key, default if isinstance(default, tp) else None)
    if origin is list:
        if isinstance(value, (str, int, float)) and typing.get_args(tp) and typing.get_args(tp)[0] is str:
            value = [value]  # a single source is a list of one
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 4e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value
