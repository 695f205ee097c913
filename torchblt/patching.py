"""Patchers: where each patch of bytes starts.

Every mode builds a boolean *start mask* over the ``S' = S + include_next_token`` positions of each row
(position ``S`` is the not-yet-seen next byte), optionally splits long patches, and turns the mask into
right-padded patch lengths ``(B, P)`` whose rows sum to ``S'`` (or to ``seq_lens + include_next_token``).

Modes (``E`` = entropies, ``t`` = threshold; positions 0 and 1 always start a patch in entropy mode):

* ``entropy`` (global threshold): byte ``j >= 2`` starts a patch iff ``E[j-1] > t``.
  With ``threshold_add``: byte 2 starts, byte 3 does not, byte ``j >= 4`` iff ``E[j-1] > t`` and
  ``E[j-1] - E[j-2] > threshold_add`` (the reference's rule, kept for exactness).
  With ``monotonicity``: byte 2 starts, byte ``j >= 3`` iff ``E[j-1] - E[j-2] > t``.
  With ``threshold=None`` (top-k): the ``S // patch_size - 2`` bytes after the highest entropies ``E[1:]`` start
  patches (a fixed patch count per row; the reference's unreachable path, kept because it is well defined).
* ``space``: a patch *ends* with a "space-like" byte (anything but ASCII letters and digits and UTF-8
  continuation bytes) unless the byte before it is space-like too; special tokens end patches.
* ``static``: patches of ``patch_size`` bytes; a fractional size (e.g. 4.5) gives boundaries at
  ``floor(i * patch_size)``, so the mean patch size is exactly ``patch_size`` (the reference crashes).
* ``byte``: one byte per patch.
* ``bpe``: a BPE delimiter token (id 3) ends a patch (for :class:`~torchblt.tokenizer.BPEDelimitedTokenizer`).

``max_patch_length`` then splits any longer patch into pieces of that length (remainder last).
Entropies are computed per row (no leakage between the rows of a batch), see
:meth:`torchblt.model.entropy_model.EntropyModel.entropies`.

The settings are a :class:`PatchingConfig` (a model's ``config.patching``, a run config's ``data.patching``)
and ``Patcher(config, entropy_model)`` is the one way a patcher is made (``Patcher(mode=..., ...)`` builds
the config field by field). A BLT holds no patcher: :meth:`Patcher.for_model` gives the one it was trained
with, with the entropy model ``load_model`` attached to it (:func:`attach_entropy_model`, a weak table
beside the model).
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from torchblt.tokenizer import BPE_ID, OFFSET

if TYPE_CHECKING:
    from torch import nn

    from torchblt.model.entropy_model import EntropyModel

PATCHING_MODES = ("entropy", "space", "static", "byte", "bpe")
DEFAULT_THRESHOLD = 1.335442066192627

__all__ = [
    "DEFAULT_THRESHOLD",
    "PATCHING_MODES",
    "Patcher",
    "PatchingConfig",
    "attach_entropy_model",
    "attached_entropy_model",
    "lengths_from_start_mask",
    "space_like",
    "split_first_patch",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class PatchingConfig:
    """How a BLT is patched: the patching section of a model's config (how it was trained, used when its
    forward is called without patch lengths, by generation and by evaluation) and ``data.patching`` of a
    run config (how the training data is patched; the trainer copies it into the model it trains).

    ``threshold=None`` in entropy mode: top-k patching for a model (needs ``patch_size``); in a run
    config, "calibrate it from ``data.target_patch_size``". ``patch_size``: static mode, top-k and the
    concat downsampling of encoders without cross-attention.
    """

    mode: str = "entropy"
    threshold: float | None = DEFAULT_THRESHOLD
    threshold_add: float | None = None
    monotonicity: bool = False
    max_patch_length: int | None = None
    patch_size: float | None = 4.5

    def validate(self, where: str = "patching") -> None:
        """Raise ``ValueError`` naming ``where.field``, the value and what is allowed."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"{where}.{name}: expected {expected}, got {getattr(self, name)!r}")

        if self.mode not in PATCHING_MODES:
            raise bad("mode", f"one of {', '.join(PATCHING_MODES)}")
        for name in ("threshold", "threshold_add", "patch_size"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise bad(name, "a number or null")
        if not isinstance(self.monotonicity, bool):
            raise bad("monotonicity", "true or false")
        m = self.max_patch_length
        if m is not None and (not _is_number(m) or int(m) != m or m < 1):
            raise bad("max_patch_length", "a positive integer or null")
        if self.patch_size is not None and not self.patch_size > 0:
            raise bad("patch_size", "a positive number")
        if self.mode == "static" and self.patch_size is None:
            raise bad("patch_size", "a positive number (static patching)")
        if self.mode == "entropy" and self.threshold is None and self.patch_size is None:
            raise bad("patch_size", "a positive number (threshold null: top-k entropy patching)")


# Which entropy model patches a BLT's inputs when nobody passes a Patcher: filled by ``load_model`` for
# folders that bundle one. A weak table beside the model, so the model itself stays a plain nn.Module
# (nothing extra in its attributes, state_dict, parameters, deepcopy or pickle).
_ATTACHED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def attach_entropy_model(model: nn.Module, entropy_model: EntropyModel | None) -> None:
    """Pair ``model`` (a BLT) with the entropy model that patches its inputs (``None``: unpair).

    :meth:`Patcher.for_model` (and so ``generate``, ``evaluate_bpb`` and ``blt(tokens)`` without patch
    lengths) uses it; the entropy model stays out of ``model``'s parameters and state dict."""
    if entropy_model is None:
        _ATTACHED.pop(getattr(model, "_orig_mod", model), None)
    else:
        _ATTACHED[getattr(model, "_orig_mod", model)] = entropy_model


def attached_entropy_model(model: nn.Module) -> EntropyModel | None:
    """The entropy model paired with ``model`` by :func:`attach_entropy_model` (or ``load_model``), or None."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    return _ATTACHED.get(model)


def space_like(tokens: torch.Tensor) -> torch.Tensor:
    """Bytes that are not ASCII letters/digits nor UTF-8 continuation bytes (negative for specials)."""
    b = tokens - OFFSET
    return (
        (b < ord("0"))
        | ((b > ord("9")) & (b < ord("A")))
        | ((b > ord("Z")) & (b < ord("a")))
        | ((b > ord("z")) & (b < 0x80))
        | (b >= 0xC0)
    )


def lengths_from_start_mask(starts: torch.Tensor, row_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean start mask ``(B, S')`` (position 0 must start) -> right-padded lengths ``(B, P)``.

    ``row_lengths (B,)`` limits each row to its first ``row_lengths[b]`` positions.
    """
    B, S = starts.shape
    if S == 0:
        return torch.zeros(B, 0, dtype=torch.int64, device=starts.device)
    valid = torch.ones_like(starts)
    if row_lengths is not None:
        valid = torch.arange(S, device=starts.device)[None, :] < row_lengths[:, None]
    starts = starts & valid
    patch_index = torch.cumsum(starts.to(torch.int64), dim=1) - 1  # (B, S')
    n_patches = int(starts.sum(1).max().item()) if B else 0
    lengths = torch.zeros(B, max(n_patches, 1), dtype=torch.int64, device=starts.device)
    lengths.scatter_add_(1, patch_index.clamp(min=0), valid.to(torch.int64) * (patch_index >= 0))
    return lengths[:, :n_patches]


def split_long_patches(starts: torch.Tensor, max_patch_length: int) -> torch.Tensor:
    """Add starts so that no patch is longer than ``max_patch_length`` (pieces of that length, remainder last)."""
    S = starts.shape[1]
    pos = torch.arange(S, device=starts.device).expand_as(starts)
    patch_start = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values
    return starts | ((pos - patch_start) % max_patch_length == 0)


def split_first_patch(patch_lengths: torch.Tensor) -> torch.Tensor:
    """Make the BOS a patch of its own where the first patch is longer (what the BLT forward needs)."""
    if bool((patch_lengths[:, 0] == 1).all()):
        return patch_lengths
    B = patch_lengths.shape[0]
    first = patch_lengths[:, :1]
    ones = torch.ones(B, 1, dtype=patch_lengths.dtype, device=patch_lengths.device)
    rest = torch.cat([first - 1, patch_lengths[:, 1:]], dim=1)
    # rows whose first patch was already 1 shift left over the resulting 0
    out = torch.cat([ones, rest], dim=1)
    already = (first[:, 0] == 1)
    if already.any():
        shifted = torch.cat([patch_lengths, torch.zeros_like(ones)], dim=1)
        out = torch.where(already[:, None], shifted, out)
    keep = (out != 0).any(0)
    keep[0] = True
    last = int(keep.nonzero().max().item()) + 1
    return out[:, :last]


def _fields_signature(
    mode: str = "entropy",
    threshold: float | None = DEFAULT_THRESHOLD,
    threshold_add: float | None = None,
    monotonicity: bool = False,
    max_patch_length: int | None = None,
    patch_size: float | None = None,
    entropy_model: EntropyModel | None = None,
    entropy_chunk_size: int | None = None,
) -> None:
    """The field-by-field form of :class:`Patcher` (its defaults: no patch size unless given)."""


def _config_signature(config: PatchingConfig, entropy_model: EntropyModel | None = None, *,
                      entropy_chunk_size: int | None = None) -> None:
    """The config form of :class:`Patcher`."""


_FIELDS_SIGNATURE = inspect.signature(_fields_signature)
_CONFIG_SIGNATURE = inspect.signature(_config_signature)
FIELDS = tuple(f.name for f in dataclasses.fields(PatchingConfig))


class Patcher:
    """Computes patch lengths for a batch of token rows.

    ``Patcher(config, entropy_model=None)`` with a :class:`PatchingConfig`; or field by field,
    ``Patcher(mode="entropy", threshold=..., threshold_add=None, monotonicity=False, max_patch_length=None,
    patch_size=None, entropy_model=None)``, which builds that config. :meth:`for_model` is the patcher a
    BLT was trained with. :meth:`patch` returns ``(patch_lengths (B, P) int64, scores (B, S) float32 or None)``.
    Entropies of long inputs are computed in chunks of ``entropy_chunk_size`` positions (keyword, either form;
    default: the measured fastest, :data:`torchblt.model.entropy_model.ENTROPY_CHUNK`), each with the model's
    full receptive field of context.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if (args and isinstance(args[0], PatchingConfig)) or "config" in kwargs:
            bound = _CONFIG_SIGNATURE.bind(*args, **kwargs).arguments
            config, entropy_model = bound["config"], bound.get("entropy_model")
            entropy_chunk_size = bound.get("entropy_chunk_size")
            if not isinstance(config, PatchingConfig):
                raise TypeError(f"Patcher(config): expected a PatchingConfig, got {type(config).__name__}")
            config = dataclasses.replace(config)  # the patcher owns its settings
        else:
            bound = _FIELDS_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            fields = dict(bound.arguments)
            entropy_model = fields.pop("entropy_model")
            entropy_chunk_size = fields.pop("entropy_chunk_size")
            config = PatchingConfig(**fields)
        if entropy_model is not None and not callable(getattr(entropy_model, "entropies", None)):
            raise TypeError(f"Patcher: entropy_model must be an EntropyModel, got {type(entropy_model).__name__}")
        config.validate("patching")
        self.mode = config.mode
        self.threshold = None if config.threshold is None else float(config.threshold)
        self.threshold_add = config.threshold_add
        self.monotonicity = config.monotonicity
        self.max_patch_length = None if config.max_patch_length is None else int(config.max_patch_length)
        self.patch_size = config.patch_size
        self.entropy_model = entropy_model
        if entropy_chunk_size is not None and (int(entropy_chunk_size) != entropy_chunk_size or entropy_chunk_size < 1):
            raise ValueError(f"entropy_chunk_size must be a positive integer, got {entropy_chunk_size!r}")
        # positions per entropy-model forward on long inputs (None: the measured default, ENTROPY_CHUNK)
        self.entropy_chunk_size = entropy_chunk_size

    @property
    def config(self) -> PatchingConfig:
        """The settings as a :class:`PatchingConfig` (a copy: changing it does not change the patcher)."""
        return PatchingConfig(**{name: getattr(self, name) for name in FIELDS})

    @classmethod
    def from_config(cls, cfg: PatchingConfig, entropy_model: EntropyModel | None = None) -> Patcher:
        """The same as ``Patcher(cfg, entropy_model)``."""
        return cls(cfg, entropy_model)

    @classmethod
    def for_model(cls, model: nn.Module, entropy_model: EntropyModel | None = None, **changes: Any) -> Patcher:
        """The patcher a BLT was trained with: ``model.config.patching`` (with ``changes`` to its fields), and
        ``entropy_model`` or the one attached to the model (:func:`attached_entropy_model`)."""
        config = getattr(model, "config", None)
        if not isinstance(getattr(config, "patching", None), PatchingConfig):
            raise ValueError(f"Patcher.for_model: a {type(model).__name__} has no patching config (not a BLT)")
        em = entropy_model if entropy_model is not None else attached_entropy_model(model)
        chunk = changes.pop("entropy_chunk_size", None)  # how entropies are computed, not a patching setting
        return cls(dataclasses.replace(config.patching, **changes), em,  # type: ignore[union-attr]
                   entropy_chunk_size=chunk)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in FIELDS)
        return f"Patcher({fields})"

    # ------------------------------------------------------------------ scores
    def entropies(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.entropy_model is None:
            raise ValueError(
                "entropy patching needs entropies: pass entropies=... or give the Patcher an entropy_model"
            )
        model = self.entropy_model
        device = next(model.parameters()).device
        return model.entropies(tokens.to(device), chunk_size=self.entropy_chunk_size).to(tokens.device)

    # ------------------------------------------------------------------ start masks
    def entropy_starts(self, entropies: torch.Tensor, include_next_token: bool) -> torch.Tensor:
        """Start mask ``(B, S')`` from entropies ``(B, S)``."""
        B, S = entropies.shape
        e = entropies.float()
        n = S + int(include_next_token)
        starts = torch.zeros(B, n, dtype=torch.bool, device=e.device)
        starts[:, : min(2, n)] = True
        if n <= 2:
            return starts
        prev = e[:, 1 : n - 1]  # E[j-1] for j = 2 .. n-1
        if self.threshold is None:
            return self.topk_starts(e, n)
        if self.monotonicity:
            rule = torch.zeros_like(prev, dtype=torch.bool)
            rule[:, 0] = True
            rule[:, 1:] = (e[:, 2 : n - 1] - e[:, 1 : n - 2]) > self.threshold
        elif self.threshold_add is not None:
            rule = torch.zeros_like(prev, dtype=torch.bool)
            rule[:, 0] = True
            if prev.shape[1] > 2:
                diff = e[:, 3 : n - 1] - e[:, 2 : n - 2]
                rule[:, 2:] = (diff > self.threshold_add) & (e[:, 3 : n - 1] > self.threshold)
        else:
            rule = prev > self.threshold
        starts[:, 2:] = rule
        return starts

    def topk_starts(self, e: torch.Tensor, n: int) -> torch.Tensor:
        """Top-k: the ``S // patch_size - 2`` highest ``E[1:]`` mark the next byte as a start (ties: lowest index)."""
        B, S = e.shape
        k = max(int(S // float(self.patch_size)) - 2, 0)  # type: ignore[arg-type]
        starts = torch.zeros(B, max(n, S + 1), dtype=torch.bool, device=e.device)
        starts[:, :2] = True
        if k:
            idx = torch.topk(e[:, 1:], k, dim=1).indices + 2
            starts.scatter_(1, idx, True)
        return starts[:, :n]

    def space_starts(self, tokens: torch.Tensor, include_next_token: bool) -> torch.Tensor:
        sl = space_like(tokens)
        ends = sl.clone()
        ends[:, 1:] &= ~sl[:, :-1]
        ends |= tokens < OFFSET
        return self._starts_after_ends(ends, include_next_token)

    def bpe_starts(self, tokens: torch.Tensor, include_next_token: bool) -> torch.Tensor:
        return self._starts_after_ends(tokens == BPE_ID, include_next_token)

    @staticmethod
    def _starts_after_ends(ends: torch.Tensor, include_next_token: bool) -> torch.Tensor:
        B, S = ends.shape
        starts = torch.ones(B, S + 1, dtype=torch.bool, device=ends.device)
        starts[:, 2:] = ends[:, 1:]
        return starts[:, : S + int(include_next_token)]

    def static_starts(self, B: int, n: int, device: torch.device) -> torch.Tensor:
        ps = float(self.patch_size)  # type: ignore[arg-type]
        starts = torch.zeros(B, n, dtype=torch.bool, device=device)
        boundaries = torch.floor(torch.arange(0, n / ps + 1, dtype=torch.float64) * ps).long()
        boundaries = boundaries[boundaries < n].unique()
        starts[:, boundaries.to(device)] = True
        return starts

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def patch(
        self,
        tokens: torch.Tensor,
        include_next_token: bool = False,
        entropies: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch lengths ``(B, P)`` int64 (right-padded with 0) and the entropies used (or None).

        ``seq_lens (B,)``: the true length of each right-padded row; row b then sums to
        ``seq_lens[b] + include_next_token`` and ignores its padding.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, S), got shape {tuple(tokens.shape)}")
        B, S = tokens.shape
        n = S + int(include_next_token)
        scores = None
        if self.mode == "entropy":
            scores = self.entropies(tokens) if entropies is None else entropies.to(torch.float32)
            if scores.shape != tokens.shape:
                raise ValueError(f"entropies shape {tuple(scores.shape)} != tokens shape {tuple(tokens.shape)}")
            starts = self.entropy_starts(scores, include_next_token)
        elif self.mode == "space":
            starts = self.space_starts(tokens, include_next_token)
        elif self.mode == "bpe":
            starts = self.bpe_starts(tokens, include_next_token)
        elif self.mode == "static":
            starts = self.static_starts(B, n, tokens.device)
        else:  # byte
            starts = torch.ones(B, n, dtype=torch.bool, device=tokens.device)
        if self.max_patch_length is not None:
            starts = split_long_patches(starts, self.max_patch_length)
        row_lengths = None if seq_lens is None else seq_lens.to(tokens.device) + int(include_next_token)
        return lengths_from_start_mask(starts, row_lengths), scores

    def __call__(self, tokens: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.patch(tokens, **kwargs)
