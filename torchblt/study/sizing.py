"""The study's sizing rule and FLOP accounting: which model a training-FLOP budget buys, and how many
FLOPs a run spent.

Sizing rule (:func:`size_model`)
--------------------------------
Each family has a *main model* and a *token*: the transformer over bytes (byte baseline, token = one
byte), the transformer over BPE tokens (token = ``bytes_per_token`` bytes), or the BLT's global
transformer (token = one patch, ``patch_size`` bytes on average). The BLT's local models (encoder,
decoder, cross-attention, hash n-grams) are fixed small for every budget (``sizing.local``), as in the
paper, where they barely grow with the global model.

1. Candidate shapes of the main model: width ``d`` a multiple of ``head_dim`` (heads of ``head_dim``)
   in ``[min_width, max_width]``, depth ``L >= 1`` with ``d / L`` in ``[aspect / 2, 2 aspect]``.
2. A shape with ``N`` main-model parameters (its transformer layers; embeddings, output head and local
   models excluded) is *compute-optimal* for the budget ``C(shape) = F * r * N * unit``: it trains on
   ``r = tokens_per_param`` main-model tokens per parameter, i.e. ``r * N * unit`` bytes, at ``F``
   training FLOPs per byte (paper accounting, below; local models included for a BLT).
3. The chosen shape is the one whose ``C(shape)`` is nearest the budget (in log; ties: the depth nearest
   ``d / aspect``), and it trains on exactly ``budget / F`` bytes. Its realised tokens per parameter is
   within the ladder's granularity of ``r`` (the neighbouring shapes differ by ~1.1-1.6x in ``N``).

So every family spends the budget on the same rule — tokens per parameter constant, as Chinchilla and
Llama 3 do for BPE models — and a family with cheaper tokens (larger patches, the local models aside)
gets more bytes; the byte transformer, whose tokens are single bytes, gets the fewest.

FLOP accounting (:func:`flops_per_byte`, :func:`achieved_flops`)
----------------------------------------------------------------
FLOPs per byte are :mod:`torchblt.flops` (the paper's §4.5: Chinchilla-style per-layer counts, input
embeddings free, backward = 2x forward, the BLT's global model once per patch); the context is the
training row (``context_bytes`` bytes, or ``seq_len`` BPE tokens). The entropy model is not charged to
training: entropies are computed once per study, as the paper does when patching is precomputed.
A run's FLOPs are summed step by step from its ``metrics.jsonl``: each step's trained bytes times the
FLOPs per byte at *that step's* mean patch size (BLT) or bytes per token (BPE).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from torchblt import flops
from torchblt.model.config import BLTConfig
from torchblt.model.entropy_model import EntropyModelConfig
from torchblt.study.config import SizingSection
from torchblt.tokenizer import VOCAB_SIZE

__all__ = [
    "ModelPlan",
    "Shape",
    "achieved_flops",
    "build_arch",
    "candidate_shapes",
    "flops_per_byte",
    "main_params",
    "model_config",
    "size_model",
]


@dataclass(frozen=True)
class Shape:
    """Width, depth and heads of a main model."""

    width: int
    n_layers: int
    n_heads: int


@dataclass
class ModelPlan:
    """What :func:`size_model` chose for one family at one budget."""

    kind: str
    arch: dict[str, Any]  # model.arch of ``blt train``
    shape: Shape
    main_params: int  # the main model's transformer parameters (N)
    local_params: int  # BLT local models (0 for byte / BPE)
    train_flops_per_byte: float
    inference_flops_per_byte: float
    unit_bytes: float  # bytes per main-model token
    bytes: float  # training bytes that spend the budget
    tokens_per_param: float  # realised: bytes / unit_bytes / main_params
    optimal_budget: float  # C(shape): the budget this shape is compute-optimal for

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidate_shapes(sizing: SizingSection, exclude_width: int | None = None) -> list[Shape]:
    """The ladder of main-model shapes (rule step 1), smallest first."""
    out = []
    width = max(sizing.head_dim, -(-sizing.min_width // sizing.head_dim) * sizing.head_dim)
    while width <= sizing.max_width:
        if width != exclude_width:
            lo = max(1, math.ceil(width / (2 * sizing.aspect)))
            hi = max(lo, math.floor(2 * width / sizing.aspect))
            out += [Shape(width, n, width // sizing.head_dim) for n in range(lo, hi + 1)]
        width += sizing.head_dim
    return out


def build_arch(kind: str, shape: Shape, sizing: SizingSection, context: int,
               tokenizer: str | None = None) -> dict[str, Any]:
    """``model.arch`` (the ``config.json`` layout) of a main model of ``shape``; ``context`` is the training
    row in the model's own units (bytes; BPE tokens)."""
    main = {"dim": shape.width, "n_layers": shape.n_layers, "n_heads": shape.n_heads,
            "multiple_of": sizing.multiple_of, "max_seqlen": context, "attention": "block_causal"}
    if kind in ("byte", "bpe"):
        arch: dict[str, Any] = {"transformer": {**main, "rope_theta": 10000.0}}
        if kind == "bpe":
            if not tokenizer:
                raise ValueError("a BPE main model needs its tokenizer")
            arch["tokenizer"] = tokenizer
        return arch
    if kind != "blt":
        raise ValueError(f"unknown family kind {kind!r}")
    loc = sizing.local

    def local(n_layers: int) -> dict[str, Any]:
        return {"dim": loc.dim, "n_layers": n_layers, "n_heads": loc.n_heads, "multiple_of": sizing.multiple_of,
                "rope_theta": 500000.0, "max_seqlen": context, "attention": "local_block_causal",
                "window": loc.window}

    return {
        "encoder": local(loc.encoder_layers),
        "global": {**main, "rope_theta": 500000.0},
        "decoder": local(loc.decoder_layers),
        "cross_attn": {"encoder": True, "decoder": True, "k": loc.cross_attn_k, "n_heads": loc.cross_attn_heads,
                       "all_layers_encoder": False, "all_layers_decoder": True},
        "hash": {"group_sizes": list(loc.hash_group_sizes), "vocab_size": loc.hash_vocab_size, "n_functions": 1},
        "pooling": "max",
    }


def model_config(kind: str, arch: dict[str, Any], vocab_size: int = VOCAB_SIZE) -> BLTConfig | EntropyModelConfig:
    """The architecture config of ``arch`` (for BPE: an :class:`EntropyModelConfig` over ``vocab_size`` ids,
    enough to count parameters and FLOPs without reading the tokenizer)."""
    from torchblt.train.kinds import blt_config, entropy_config

    if kind == "blt":
        return blt_config(arch)
    arch = {k: v for k, v in arch.items() if k != "tokenizer"}
    cfg = entropy_config(arch)
    if kind == "bpe":
        cfg.vocab_size = vocab_size
    return cfg


def flops_per_byte(kind: str, config: BLTConfig | EntropyModelConfig, context: float,
                   unit_bytes: float) -> dict[str, float]:
    """Training and inference FLOPs per byte (:mod:`torchblt.flops`): a BLT at mean patch size
    ``unit_bytes`` over rows of ``context`` bytes, a byte LM over ``context`` bytes, a BPE LM over
    ``context`` tokens of ``unit_bytes`` bytes each. Keys ``train``, ``inference``."""
    if kind == "blt":
        assert isinstance(config, BLTConfig)
        f = flops.blt_flops_per_byte(config, unit_bytes, None, context)
    elif kind == "byte":
        f = flops.byte_flops_per_byte(config, context)
    elif kind == "bpe":
        assert isinstance(config, EntropyModelConfig)
        f = flops.bpe_flops_per_byte(config, config.vocab_size, unit_bytes, context)
    else:
        raise ValueError(f"unknown family kind {kind!r}")
    return {"train": f["train"], "inference": f["inference"]}


def _counts(config: BLTConfig | EntropyModelConfig) -> dict[str, int]:
    return _cached_counts(json.dumps(asdict(config), sort_keys=True), type(config).__name__)


@lru_cache(maxsize=4096)
def _cached_counts(key: str, cls: str) -> dict[str, int]:
    from torchblt.model.config import blt_config_from_dict, entropy_config_from_dict

    data = json.loads(key)
    config = blt_config_from_dict(data) if cls == "BLTConfig" else entropy_config_from_dict(data)
    return flops.param_counts(config)


def main_params(config: BLTConfig | EntropyModelConfig) -> tuple[int, int]:
    """``(main-model parameters, local-model parameters)``: the global transformer and the local models
    (byte/hash embeddings excluded) of a BLT; the transformer layers and 0 of a byte/BPE LM."""
    c = _counts(config)
    if isinstance(config, BLTConfig):
        local = c["local_encoder"] + c["local_decoder"] - VOCAB_SIZE * config.encoder.dim  # minus byte embeddings
        return c["global_transformer"], local
    return c["transformer"], 0


def size_model(kind: str, budget: float, sizing: SizingSection, *, context: int, unit_bytes: float,
               vocab_size: int = VOCAB_SIZE, tokenizer: str | None = None) -> ModelPlan:
    """The study's sizing rule (module docstring): the main-model shape whose compute-optimal budget at
    ``sizing.tokens_per_param`` tokens per parameter is nearest ``budget``, and the bytes that spend it.

    ``context``: the training row in the model's units (bytes; tokens for BPE); ``unit_bytes``: bytes per
    main-model token (1 for the byte LM, the mean patch size for a BLT, bytes per token for BPE).
    """
    if not budget > 0:
        raise ValueError(f"budget must be positive, got {budget}")
    if not unit_bytes > 0:
        raise ValueError(f"unit_bytes must be positive, got {unit_bytes}")
    # cross-attention with k > 1 slots needs a global width other than the decoder's (BLTConfig.validate)
    exclude = sizing.local.dim if kind == "blt" and sizing.local.cross_attn_k > 1 else None
    best: tuple[tuple[float, float], ModelPlan] | None = None
    per_layer: dict[int, tuple[int, int]] = {}  # width -> (main params at depth 1, params per extra layer)
    for shape in candidate_shapes(sizing, exclude):
        arch = build_arch(kind, shape, sizing, context, tokenizer or ("tokenizer.json" if kind == "bpe" else None))
        config = model_config(kind, arch, vocab_size)
        if shape.width not in per_layer:  # layers are identical: N is linear in depth (two counts per width)
            one, two = (main_params(_with_depth(config, n))[0] for n in (1, 2))
            per_layer[shape.width] = (one, two - one)
        one, extra = per_layer[shape.width]
        n_main = one + (shape.n_layers - 1) * extra
        f = flops_per_byte(kind, config, context, unit_bytes)
        optimal = f["train"] * sizing.tokens_per_param * n_main * unit_bytes
        key = (abs(math.log(optimal / budget)), abs(shape.n_layers - shape.width / sizing.aspect))
        if best is None or key < best[0]:
            n_bytes = budget / f["train"]
            plan = ModelPlan(kind=kind, arch=arch, shape=shape, main_params=n_main, local_params=0,
                             train_flops_per_byte=f["train"], inference_flops_per_byte=f["inference"],
                             unit_bytes=unit_bytes, bytes=n_bytes, tokens_per_param=n_bytes / unit_bytes / n_main,
                             optimal_budget=optimal)
            best = (key, plan)
    if best is None:
        raise ValueError(f"sizing: no main-model shape between min_width {sizing.min_width} and max_width "
                         f"{sizing.max_width}")
    plan = best[1]
    plan.local_params = main_params(model_config(kind, plan.arch, vocab_size))[1]
    return plan


def _with_depth(config: BLTConfig | EntropyModelConfig, n_layers: int) -> BLTConfig | EntropyModelConfig:
    import copy

    out = copy.deepcopy(config)
    (out.global_ if isinstance(out, BLTConfig) else out.transformer).n_layers = n_layers
    return out


def achieved_flops(kind: str, config: BLTConfig | EntropyModelConfig, context: float,
                   records: list[dict[str, Any]], unit_bytes: float | None = None) -> dict[str, float]:
    """Training FLOPs a run spent, from its per-step ``metrics.jsonl`` records (logged every step).

    Step ``i`` trained ``bytes_seen[i] - bytes_seen[i-1]`` bytes at the FLOPs per byte of its own mean
    patch size (BLT: the record's ``mean_patch_length``) or bytes per token (BPE: the trainer logs the
    loss per token and bits per byte of the same summed cross-entropy, so tokens = bytes * bpb * ln 2 /
    loss). Returns ``flops``, ``bytes``, ``steps`` and the mean ``unit_bytes`` (bytes per patch / token).
    """
    steps = sorted((r for r in records if "bytes_seen" in r), key=lambda r: r["step"])
    total = units = 0.0
    prev = 0
    for r in steps:
        n = r["bytes_seen"] - prev
        prev = r["bytes_seen"]
        if kind == "blt":
            unit = float(r.get("mean_patch_length") or unit_bytes or 1.0)
        elif kind == "bpe":
            unit = r["loss"] / (r["bpb"] * math.log(2)) if r.get("bpb") else float(unit_bytes or 1.0)
        else:
            unit = 1.0
        total += n * flops_per_byte(kind, config, context, unit)["train"]
        units += n / unit
    n_bytes = float(prev)
    return {"flops": total, "bytes": n_bytes, "steps": len(steps), "unit_bytes": n_bytes / units if units else 0.0}
