"""The table of trainable model kinds: name -> how to build the model and how to compute its loss.

=========  ==================================================  ============  ================================
kind       model                                               data kind     loss
=========  ==================================================  ============  ================================
blt        :class:`~torchblt.model.blt.BLT`                    ``blt``       next-byte CE, patched batch
entropy    :class:`~torchblt.model.entropy_model.EntropyModel`  ``bytes``     next-byte CE
byte       the same architecture: the paper's byte baseline    ``bytes``     next-byte CE
bpe        the same architecture over BPE tokens               (own loader)  next-token CE, bytes per target
=========  ==================================================  ============  ================================

Every kind the package trains is a row of :data:`KINDS`, here. :func:`register_kind` adds one at run
time; an installed package adds one with an entry point in the ``torchblt.kinds`` group (its value a
:class:`ModelKind`). A configuration only names a kind: it never makes us import a module (the first
release's ``module:name`` spelling is read for the kinds now in the table).

A kind's ``loss`` returns a :class:`LossOutput` whose ``loss_sum`` is the **sum** (fp32) of the per-token
cross-entropies on the batch's unmasked targets; the trainer divides by the global token count of the
whole optimizer step (all micro-batches, all ranks), so every token weighs the same however the batch
is split. ``n_bytes`` is what bits-per-byte divides by (equal to ``n_tokens`` for byte models).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchblt.data.bpe import make_bpe_loader
from torchblt.model.config import (
    NAMED_CONFIGS,
    BLTConfig,
    BPEConfig,
    blt_config_from_dict,
    config_to_dict,
    entropy_config_from_dict,
)
from torchblt.model.entropy_model import EntropyModelConfig
from torchblt.tokenizer import EOS_ID, load_bpe_tokenizer


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # () fp32: summed token cross-entropy (nats)
    n_tokens: int  # targets counted in loss_sum
    n_bytes: int  # bytes those targets stand for
    n_patches: int | None = None  # BLT: patches in the batch (for the mean patch length) ...
    patched_bytes: int | None = None  # ... and the byte positions they cover


@dataclass
class ModelKind:
    """How to train one kind of model.

    ``make_config(arch) -> config`` turns ``model.arch`` (preset name or dict) into an architecture config;
    ``loss(model, batch) -> LossOutput``; ``data_kind`` is the ``DataConfig.kind`` its batches need;
    ``make_loader`` (optional) replaces :func:`torchblt.data.build_loader` for kinds that read data
    differently (e.g. BPE tokens): ``make_loader(data_cfg, *, rank, world_size, entropy_model, model_config)``
    with the config of the model being trained (built first, so e.g. its tokenizer reaches the loader).
    """

    make_config: Callable[[Any], Any]
    loss: Callable[[nn.Module, Any], LossOutput]
    data_kind: str
    make_loader: Callable[..., Any] | None = None
    description: str = ""


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy over the positions where ``mask`` is True. ``(B, L, V), (B, L), (B, L) -> ()``"""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # (B*L,)
    return (ce * mask.flatten().to(ce.dtype)).sum()


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _arch_dict(arch: Any, want: type) -> dict[str, Any]:
    """``model.arch`` (preset name | dict with optional ``base``) -> a full config dict of type ``want``."""
    if isinstance(arch, str):
        arch = {"base": arch}
    if not isinstance(arch, dict):
        raise ValueError(f"model.arch: expected a preset name or a mapping, got {arch!r}")
    arch = dict(arch)
    base = arch.pop("base", None)
    if base is None:
        return arch
    if base not in NAMED_CONFIGS:
        raise ValueError(f"model.arch.base: unknown preset {base!r}; known: {sorted(NAMED_CONFIGS)}")
    preset = NAMED_CONFIGS[base]()
    if not isinstance(preset, want):
        raise ValueError(f"model.arch: preset {base!r} is a {type(preset).__name__}, this kind needs a {want.__name__}")
    return _merge(config_to_dict(preset), arch)


def _prefixed(fn: Callable[..., Any], data: dict[str, Any]) -> Any:
    try:
        return fn(data, where="")
    except ValueError as e:
        raise ValueError(f"model.arch: {e}") from None


def blt_config(arch: Any) -> BLTConfig:
    return _prefixed(blt_config_from_dict, _arch_dict(arch, BLTConfig))


def entropy_config(arch: Any) -> EntropyModelConfig:
    return _prefixed(entropy_config_from_dict, _arch_dict(arch, EntropyModelConfig))


def bpe_config(arch: Any) -> BPEConfig:
    """``model.arch`` of the ``bpe`` kind -> :class:`BPEConfig`: a preset name or mapping as for byte models,
    plus ``tokenizer: PATH`` (required); ``vocab_size`` is the tokenizer's."""
    if not isinstance(arch, dict) or not arch.get("tokenizer"):
        raise ValueError("model.arch.tokenizer: the bpe kind needs the path of a tokenizer (blt bpe-tokenizer)")
    arch = dict(arch)
    path = str(Path(arch.pop("tokenizer")).resolve())
    tok = load_bpe_tokenizer(path)
    arch.pop("vocab_size", None)
    base = entropy_config(arch)
    cfg = BPEConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, tokenizer=path)
    cfg.vocab_size = tok.vocab_size
    cfg.eos_id = EOS_ID
    cfg.validate()
    return cfg


def blt_loss(model: nn.Module, batch: Any) -> LossOutput:
    logits = model(batch.x, batch.patch_lengths)  # (B, L, V)
    # patches after each row's leading length-1 patch cover the row's L positions (+1 next byte)
    n_patches = int((batch.patch_lengths > 0).sum()) - batch.patch_lengths.shape[0]
    n = int(batch.mask.sum())
    return LossOutput(token_cross_entropy(logits, batch.y, batch.mask), n, n, n_patches, batch.x.numel())


def byte_lm_loss(model: nn.Module, batch: Any) -> LossOutput:
    logits = model(batch.x)  # (B, L, V)
    n = int(batch.mask.sum())
    return LossOutput(token_cross_entropy(logits, batch.y, batch.mask), n, n)


def bpe_loss(model: nn.Module, batch: Any) -> LossOutput:
    """Next-token CE of a BPE LM; ``n_bytes`` is the bytes its targets stand for (:class:`~torchblt.data.bpe.BPEBatch`)."""
    logits = model(batch.x)  # (B, L, V)
    n = int(batch.mask.sum())
    return LossOutput(token_cross_entropy(logits, batch.y, batch.mask), n, batch.n_bytes)


KINDS: dict[str, ModelKind] = {
    "blt": ModelKind(blt_config, blt_loss, "blt", description="Byte Latent Transformer"),
    "entropy": ModelKind(entropy_config, byte_lm_loss, "bytes", description="entropy model (small byte LM)"),
    "byte": ModelKind(entropy_config, byte_lm_loss, "bytes", description="byte-level transformer baseline"),
    "bpe": ModelKind(bpe_config, bpe_loss, "bytes", make_loader=make_bpe_loader,
                     description="BPE transformer baseline (tokenizer in model.arch.tokenizer)"),
}


ENTRY_POINT_GROUP = "torchblt.kinds"
# the names the first release's configs used for kinds that are now in the table
ALIASES = {"torchblt.baselines.bpe:bpe": "bpe"}


def register_kind(name: str, kind: ModelKind) -> None:
    """Add (or replace) a trainable kind."""
    KINDS[name] = kind


def _entry_point_kind(name: str) -> ModelKind | None:
    """A kind an installed package declares (``[project.entry-points."torchblt.kinds"] NAME = "pkg.mod:KIND"``)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                kind = ep.load()
            except Exception as e:  # a broken plug-in: say which
                raise ValueError(f"model.kind: the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) "
                                 f"failed to load: {e}") from None
            if not isinstance(kind, ModelKind):
                raise ValueError(f"model.kind: the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) is a "
                                 f"{type(kind).__name__}, not a ModelKind")
            return kind
    return None


def get_kind(name: str) -> ModelKind:
    """The kind called ``name``: a row of :data:`KINDS` (or one added by :func:`register_kind`), or a plug-in
    an installed package declares under the ``torchblt.kinds`` entry point. Nothing is imported by name from
    the configuration (a ``module:name`` kind of the first release is refused unless it is a known alias)."""
    if not isinstance(name, str):
        raise ValueError(f"model.kind: expected a string, got {name!r}")
    name = ALIASES.get(name, name)
    if name not in KINDS:
        kind = _entry_point_kind(name)
        if kind is not None:
            KINDS[name] = kind
    if name not in KINDS:
        hint = ("; a config no longer imports a kind's module by name: install a package that declares it under "
                f"the {ENTRY_POINT_GROUP!r} entry point") if ":" in name else ""
        raise ValueError(f"model.kind: unknown kind {name!r}; known: {', '.join(sorted(KINDS))}{hint}")
    return KINDS[name]
