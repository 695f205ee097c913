"""Architecture configurations: small nested dataclasses, JSON round-trip, named presets.

``BLTConfig`` = ``encoder`` / ``global_`` / ``decoder`` stacks + ``cross_attn`` + ``hash`` + ``patching``
(a :class:`~torchblt.patching.PatchingConfig`, which lives with the patcher it configures).
The reference's flat 101-field argument bag is mapped onto these by :mod:`torchblt.formats.reference`;
its dead options are dropped there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchblt.model.entropy_model import EntropyModelConfig
from torchblt.model.transformer import StackConfig
from torchblt.patching import PatchingConfig
from torchblt.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, BPETokenizer, load_bpe_tokenizer
from torchblt.validation import build_dataclass

__all__ = [
    "BLTConfig",
    "BPEConfig",
    "CrossAttentionConfig",
    "HashConfig",
    "NAMED_CONFIGS",
    "PatchingConfig",
    "blt_config_from_dict",
    "bpe_config_from_dict",
    "config_to_dict",
    "entropy_config_from_dict",
    "named_config",
]

POOLING_MODES = ("avg", "mean", "min", "max")
MAX_VOCAB = 1 << 28  # embedding tables beyond this are typos, not models


@dataclass
class CrossAttentionConfig:
    """Patch <-> byte cross-attention. With ``encoder`` each patch is pooled into ``k`` slots that attend
    to the patch's bytes; with ``decoder`` every byte attends to the ``k`` slots of the previous patch.
    (``k`` is slots per patch, the reference's ``cross_attn_k``; the modules call it ``slots_per_patch``.)"""

    encoder: bool = True
    decoder: bool = True
    k: int = 2
    n_heads: int = 16
    all_layers_encoder: bool = False
    all_layers_decoder: bool = True
    window_encoder: int | None = None  # in patches; None: exactly the patch's own bytes
    window_decoder: int | None = None


@dataclass
class HashConfig:
    """Hash n-gram embeddings: ``n_functions * len(group_sizes)`` tables of ``vocab_size`` rows."""

    group_sizes: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    vocab_size: int = 500002
    n_functions: int = 1

    @property
    def n_tables(self) -> int:
        return self.n_functions * len(self.group_sizes)


def _local(dim: int, n_layers: int, n_heads: int, window: int | None = 512) -> StackConfig:
    return StackConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        rope_theta=500000.0,
        max_seqlen=24576,
        attention="local_block_causal" if window else "block_causal",
        window=window,
    )


@dataclass
class BLTConfig:
    """A Byte Latent Transformer."""

    encoder: StackConfig = field(default_factory=lambda: _local(1024, 1, 16))
    global_: StackConfig = field(
        default_factory=lambda: StackConfig(
            dim=2048, n_layers=25, n_heads=16, rope_theta=500000.0, max_seqlen=4096, attention="block_causal"
        )
    )
    decoder: StackConfig = field(default_factory=lambda: _local(1024, 9, 16))
    cross_attn: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    hash: HashConfig | None = field(default_factory=HashConfig)
    pooling: str = "max"  # encoders without cross-attention: "max", "avg", "min" or combos; "" = concat
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    vocab_size: int = VOCAB_SIZE
    eos_id: int = EOS_ID

    @property
    def pooling_modes(self) -> list[str]:
        """Pooling reductions in the reference's order (avg|mean, then min, then max)."""
        p = self.pooling
        modes = []
        if "avg" in p or "mean" in p:
            modes.append("mean")
        if "min" in p:
            modes.append("amin")
        if "max" in p:
            modes.append("amax")
        return modes

    @property
    def global_input_dim(self) -> int:
        """Width of the patch vectors fed to the global transformer (before its input projection)."""
        e = self.encoder.dim
        if self.cross_attn.encoder:
            return e * self.cross_attn.k
        if not self.pooling:
            return e * self.concat_patch_size
        return e * len(self.pooling_modes)

    @property
    def concat_patch_size(self) -> int:
        """Bytes concatenated per patch by an encoder without cross-attention and without pooling."""
        ps = self.patching.patch_size
        if ps is None or float(ps) != int(ps):
            raise ValueError(f"concat downsampling needs an integer patching.patch_size, got {ps}")
        return int(ps)

    def validate(self) -> None:
        for name in ("encoder", "global_", "decoder"):
            getattr(self, name).validate(name.rstrip("_"))  # "global" as config files write it
        if self.global_.attention not in ("causal", "block_causal"):
            raise ValueError(
                f"global_.attention must be 'causal' or 'block_causal', got {self.global_.attention!r}"
            )
        ca = self.cross_attn
        if (ca.encoder or ca.decoder) and ca.k < 1:
            raise ValueError(f"cross_attn.k must be >= 1, got {ca.k}")
        if ca.encoder and self.encoder.dim % ca.n_heads:
            raise ValueError(f"encoder.dim {self.encoder.dim} not divisible by cross_attn.n_heads {ca.n_heads}")
        if ca.decoder and self.decoder.dim % ca.n_heads:
            raise ValueError(f"decoder.dim {self.decoder.dim} not divisible by cross_attn.n_heads {ca.n_heads}")
        if ca.decoder and ca.k > 1 and self.global_.dim == self.decoder.dim:
            raise ValueError(
                "cross_attn.decoder with k > 1 needs global_.dim != decoder.dim (the k slots come from the "
                "decoder's patch projection, which only exists when the widths differ)"
            )
        if not ca.encoder:
            if self.pooling and not self.pooling_modes:
                raise ValueError(f"pooling must name some of {POOLING_MODES} (or be '' for concat), got {self.pooling!r}")
            if not self.pooling:
                _ = self.concat_patch_size
        self.patching.validate("patching")
        if not 1 <= self.vocab_size <= MAX_VOCAB:
            raise ValueError(f"vocab_size: expected an integer in [1, {MAX_VOCAB}], got {self.vocab_size!r}")
        if ca.n_heads < 1:
            raise ValueError(f"cross_attn.n_heads: expected a positive integer, got {ca.n_heads!r}")
        h = self.hash
        if h is not None:
            if not 1 <= h.vocab_size <= MAX_VOCAB:
                raise ValueError(f"hash.vocab_size: expected an integer in [1, {MAX_VOCAB}], got {h.vocab_size!r}")
            if not h.group_sizes or any(g < 1 for g in h.group_sizes):
                raise ValueError(f"hash.group_sizes: expected a non-empty list of positive integers, got {h.group_sizes!r}")
            if h.n_functions < 1:
                raise ValueError(f"hash.n_functions: expected a positive integer, got {h.n_functions!r}")
            from torchblt.model.hash_embedding import HASH_PRIMES

            if h.n_functions > len(HASH_PRIMES):
                raise ValueError(f"hash.n_functions: at most {len(HASH_PRIMES)} (the reference's hash primes), "
                                 f"got {h.n_functions!r}")


@dataclass
class BPEConfig(EntropyModelConfig):
    """The BPE baseline: an :class:`EntropyModelConfig` (a Llama-style LM) over the ids of a BPE tokenizer,
    with the path of that tokenizer (``model_type: "bpe"`` in our format; see :mod:`torchblt.baselines.bpe`).

    ``build_model`` turns it into an :class:`EntropyModel`; evaluation reads documents through
    :meth:`document_tokens`, so bits per byte divide by the document's bytes, as for byte models.
    """

    tokenizer: str = ""

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(f"tokenizer: expected the path of a tokenizer.json, got {self.tokenizer!r}")

    @property
    def bpe(self) -> BPETokenizer:
        if not self.tokenizer:
            raise ValueError("BPE model config: no tokenizer path")
        return load_bpe_tokenizer(str(Path(self.tokenizer).resolve()))

    def document_tokens(self, doc: bytes | str, count_eos: bool = True) -> tuple[list[int], int]:
        """``[BOS] + BPE ids (+ [EOS])`` and the document's byte count."""
        data = doc.encode("utf-8", errors="ignore") if isinstance(doc, str) else bytes(doc)
        return [BOS_ID, *self.bpe.encode(data), *([EOS_ID] if count_eos else [])], len(data)

    def encode_text(self, text: str) -> list[int]:
        return self.bpe.encode(text)

    def decode_ids(self, ids: list[int]) -> str:
        return self.bpe.decode(ids)


# --------------------------------------------------------------------------- serialisation


def config_to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    if "global_" in d:
        d["global"] = d.pop("global_")
    return d


def _build(cls: type, data: Any, where: str) -> Any:
    """``cls`` from a mapping, keys and types checked (:func:`torchblt.validation.build_dataclass`), then validated."""
    cfg = build_dataclass(cls, data, where, inherit_defaults=False)
    cfg.validate()
    return cfg


def blt_config_from_dict(data: dict[str, Any], where: str = "config") -> BLTConfig:
    """A :class:`BLTConfig` from the ``config.json`` layout (``where``: the key named in errors)."""
    return _build(BLTConfig, data, where)


def entropy_config_from_dict(data: dict[str, Any], where: str = "config") -> EntropyModelConfig:
    return _build(EntropyModelConfig, data, where)


def bpe_config_from_dict(data: dict[str, Any], where: str = "config") -> BPEConfig:
    return _build(BPEConfig, data, where)


# --------------------------------------------------------------------------- named presets


def blt_1b() -> BLTConfig:
    """blt-1b as released (spec/peers.md §1.3): local 1024 wide (encoder 1 layer, decoder 9), global 2048 x 25."""
    return BLTConfig()


def blt_7b() -> BLTConfig:
    """blt-7b (spec/peers.md §1.3): local 1280 wide (encoder 1 layer, decoder 6), global 4096 x 32, k = 4."""
    return BLTConfig(
        encoder=_local(1280, 1, 20),
        global_=StackConfig(
            dim=4096, n_layers=32, n_heads=32, rope_theta=500000.0, max_seqlen=4096, attention="block_causal"
        ),
        decoder=_local(1280, 6, 20),
        cross_attn=CrossAttentionConfig(k=4, n_heads=20),
    )


def entropy_100m() -> EntropyModelConfig:
    """The released entropy model: 14 layers x 768, 12 heads, sliding window 512, RoPE theta 10000."""
    return EntropyModelConfig()


def tiny_blt() -> BLTConfig:
    """A tiny BLT for demos and tests (same structure as blt-1b)."""
    return BLTConfig(
        encoder=StackConfig(dim=32, n_layers=1, n_heads=2, multiple_of=32, rope_theta=500000.0,
                            max_seqlen=4096, attention="local_block_causal", window=64),
        global_=StackConfig(dim=64, n_layers=2, n_heads=4, multiple_of=32, rope_theta=500000.0,
                            max_seqlen=1024, attention="block_causal"),
        decoder=StackConfig(dim=32, n_layers=2, n_heads=2, multiple_of=32, rope_theta=500000.0,
                            max_seqlen=4096, attention="local_block_causal", window=64),
        cross_attn=CrossAttentionConfig(k=2, n_heads=2),
        hash=HashConfig(vocab_size=1021),
    )


def tiny_entropy() -> EntropyModelConfig:
    return EntropyModelConfig(
        transformer=StackConfig(dim=32, n_layers=2, n_heads=2, multiple_of=32,
                                attention="local_block_causal", window=64)
    )


NAMED_CONFIGS = {
    "blt-1b": blt_1b,
    "blt-7b": blt_7b,
    "entropy-100m": entropy_100m,
    "tiny-blt": tiny_blt,
    "tiny-entropy": tiny_entropy,
}


def named_config(name: str) -> BLTConfig | EntropyModelConfig:
    try:
        return NAMED_CONFIGS[name]()
    except KeyError:
        raise ValueError(f"unknown configuration {name!r}; known: {sorted(NAMED_CONFIGS)}") from None
