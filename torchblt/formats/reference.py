"""Adapter for the reference implementation's configuration and its Hugging Face mixin format.

Folder layout: ``config.json`` = ``{"args": {...}}`` (the pydantic dump of ``ByteLatentTransformerArgs``
or ``LMTransformerArgs``) + ``model.safetensors`` (+ ``train_args.json``: the training run's arguments,
whose ``data.patcher_args`` say how the model is patched).

The reference's flat arguments are mapped onto our nested config here. Options that change the math and
that we implement are carried over; options that are dead in the reference are dropped; options whose
reference code path is broken or that no released model uses are refused with a clear message.

Attention semantics: the released models use ``attn_impl="xformers"``, whose masks are the document-masked
sliding windows we implement. Under ``attn_impl="sdpa"`` or ``"flex_attention"`` the reference silently
runs *plain causal* attention in every self-attention (no window, no documents); a model trained that
way is imported with plain causal masks, so it computes what it was trained to compute.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from torchblt.model.config import (
    BLTConfig,
    CrossAttentionConfig,
    HashConfig,
)
from torchblt.model.entropy_model import EntropyModelConfig
from torchblt.model.transformer import StackConfig
from torchblt.patching import DEFAULT_THRESHOLD, PatchingConfig


class UnsupportedConfigError(ValueError):
    pass


def is_blt_args(args: dict[str, Any]) -> bool:
    return "dim_global" in args or "n_layers_global" in args


def _self_attention_kind(args: dict[str, Any], bias_type: str | None, window: int | None, where: str) -> tuple[str, int | None]:
    impl = args.get("attn_impl", "sdpa")
    if impl != "xformers":
        return "causal", None  # the reference's sdpa/flex paths ignore windows and documents
    if bias_type in (None, "causal"):
        return "causal", None
    if bias_type == "block_causal":
        return "block_causal", None
    if bias_type == "local_block_causal":
        if window is None:
            raise UnsupportedConfigError(f"{where}: local_block_causal attention needs a window (the reference asserts)")
        return "local_block_causal", int(window)
    if window is None:
        raise UnsupportedConfigError(f"{where}: attn_bias_type={bias_type!r} needs a window")
    return "local_causal", int(window)


def _ffn(args: dict[str, Any]) -> dict[str, Any]:
    return {
        "ffn_dim_multiplier": args.get("ffn_dim_multiplier"),
        "multiple_of": int(args.get("multiple_of", 256)),
        "norm_eps": float(args.get("norm_eps", 1e-5)),
        "rope_theta": float(args.get("rope_theta", 10000.0)),
        "head_dim": args.get("head_dim"),
    }


def blt_config_from_reference_args(args: dict[str, Any], patcher_args: dict[str, Any] | None = None) -> BLTConfig:
    """Map ``ByteLatentTransformerArgs`` (+ optional ``PatcherArgs`` of the training data) to :class:`BLTConfig`."""
    a = args

    def refuse(cond: bool, msg: str) -> None:
        if cond:
            raise UnsupportedConfigError(f"reference config: {msg}")

    refuse(not a.get("use_rope", True), "use_rope=false is broken in the reference and unsupported")
    refuse(a.get("patching_mode") == "", "the legacy patching_mode '' (BOE-prefixed encoder input) is unsupported")
    refuse(bool(a.get("encoder_enable_byte_ngrams")), "frequency n-gram tables (encoder_enable_byte_ngrams) are unsupported")
    refuse(int(a.get("pm_size") or 0) != 0, f"pm_size={a.get('pm_size')} is unsupported")
    refuse(
        bool(a.get("cross_attn_encoder")) and not a.get("cross_attn_init_by_pooling"),
        "cross_attn_encoder without cross_attn_init_by_pooling crashes in the reference",
    )
    if float(a.get("dropout") or 0.0) != 0.0:
        warnings.warn(f"reference config: dropout={a['dropout']} ignored (torchblt models have no dropout)", stacklevel=2)

    e_dim, d_dim, g_dim = int(a["dim_local_encoder"]), int(a["dim_local_decoder"]), int(a["dim_global"])
    # token widths (reference get_encoder_dim_token_emb / get_decoder_dim_token_emb); shapes only work when
    # they equal the local widths, which holds for every released and paper model
    if a.get("dim_token") is not None:
        tok = int(a["dim_token"])
    elif a.get("use_local_encoder_transformer"):
        tok = e_dim
    else:
        tok = g_dim // int(a.get("patch_size") or 1)
    refuse(tok != e_dim, f"encoder token width {tok} != dim_local_encoder {e_dim} is unsupported")
    dec_tok = tok if a.get("share_encoder_decoder_emb", True) else int(a.get("dim_token") or d_dim)
    refuse(dec_tok != d_dim, f"decoder token width {dec_tok} != dim_local_decoder {d_dim} is unsupported")

    window = a.get("local_attention_window_len")
    local_kind, local_window = _self_attention_kind(
        a, "local_block_causal" if window is not None else "block_causal", window, "local models"
    )
    global_kind, _ = _self_attention_kind(a, a.get("attn_bias_type"), None, "global transformer")
    refuse(global_kind not in ("causal", "block_causal"), f"global attn_bias_type={a.get('attn_bias_type')!r}")
    common = _ffn(a)
    local_max = int(a.get("max_encoder_seq_length") or a.get("max_seqlen") or 8192)

    def local(prefix: str) -> StackConfig:
        return StackConfig(
            dim=int(a[f"dim_local_{prefix}"]),
            n_layers=int(a[f"n_layers_local_{prefix}"]),
            n_heads=int(a[f"n_heads_local_{prefix}"]),
            n_kv_heads=a.get("n_kv_heads"),
            max_seqlen=local_max,
            attention=local_kind,
            window=local_window,
            **common,
        )

    hash_cfg = None
    if a.get("encoder_hash_byte_group_size"):
        sizes = a["encoder_hash_byte_group_size"]
        if isinstance(sizes, str):
            sizes = [int(s) for s in sizes.split(",") if s.strip()]
        hash_cfg = HashConfig(
            group_sizes=[int(s) for s in sizes],
            vocab_size=int(a.get("encoder_hash_byte_group_vocab", 30000)),
            n_functions=int(a.get("encoder_hash_byte_group_nb_functions", 3)),
        )

    p = patcher_args or {}
    patching = PatchingConfig(
        mode=p.get("patching_mode", a.get("patching_mode") or "entropy"),
        threshold=float(p.get("threshold", a.get("patching_threshold") or DEFAULT_THRESHOLD)),
        threshold_add=p.get("threshold_add", a.get("patching_threshold_add")),
        monotonicity=bool(p.get("monotonicity", a.get("monotonicity", False))),
        max_patch_length=p.get("max_patch_length", a.get("max_patch_length")),
        patch_size=float(p.get("patch_size", a.get("patch_size") or 4.5)),
    )
    if patching.mode == "bpe_patcher":
        raise UnsupportedConfigError("reference config: the unfinished bpe_patcher mode is unsupported")

    cfg = BLTConfig(
        encoder=local("encoder"),
        global_=StackConfig(
            dim=g_dim,
            n_layers=int(a["n_layers_global"]),
            n_heads=int(a["n_heads_global"]),
            n_kv_heads=a.get("n_kv_heads_global"),
            max_seqlen=int(a.get("max_seqlen") or 1024),
            attention=global_kind,
            **common,
        ),
        decoder=local("decoder"),
        cross_attn=CrossAttentionConfig(
            encoder=bool(a.get("cross_attn_encoder", False)),
            decoder=bool(a.get("cross_attn_decoder", False)),
            k=int(a.get("cross_attn_k") or 1),
            n_heads=int(a.get("cross_attn_nheads") or 1),
            all_layers_encoder=bool(a.get("cross_attn_all_layers_encoder", False)),
            all_layers_decoder=bool(a.get("cross_attn_all_layers_decoder", False)),
            window_encoder=a.get("cross_attn_window_encoder"),
            window_decoder=a.get("cross_attn_window_decoder"),
        ),
        hash=hash_cfg,
        pooling=a.get("downsampling_by_pooling") or "",
        patching=patching,
        vocab_size=int(a.get("vocab_size", 260)),
        eos_id=int(a.get("eos_id", 2)),
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise UnsupportedConfigError(f"reference config: {e}") from None
    return cfg


def entropy_config_from_reference_args(args: dict[str, Any]) -> EntropyModelConfig:
    """Map ``LMTransformerArgs`` to :class:`EntropyModelConfig`."""
    a = args
    if a.get("weight_tying"):
        raise UnsupportedConfigError("reference config: weight_tying=true crashes in the reference and is unsupported")
    kind, window = _self_attention_kind(a, a.get("attn_bias_type"), a.get("sliding_window"), "entropy model")
    cfg = EntropyModelConfig(
        transformer=StackConfig(
            dim=int(a["dim"]),
            n_layers=int(a["n_layers"]),
            n_heads=int(a["n_heads"]),
            n_kv_heads=a.get("n_kv_heads"),
            max_seqlen=int(a.get("max_seqlen", 8192)),
            attention=kind,
            window=window,
            **_ffn(a),
        ),
        vocab_size=int(a.get("vocab_size", 260)),
        eos_id=int(a.get("eos_id", 2)),
    )
    cfg.validate()
    return cfg


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def patcher_args_from_train_args(train_args: dict[str, Any]) -> dict[str, Any] | None:
    data = train_args.get("data") if isinstance(train_args, dict) else None
    if isinstance(data, dict) and isinstance(data.get("patcher_args"), dict):
        return data["patcher_args"]
    return None


def config_from_reference_folder(folder: Path) -> BLTConfig | EntropyModelConfig:
    """The model config of a reference Hugging Face mixin folder (``config.json`` with ``args``)."""
    raw = read_json(folder / "config.json")
    args = raw.get("args") if isinstance(raw, dict) else None
    if not isinstance(args, dict):
        raise ValueError(f"{folder / 'config.json'}: expected {{'args': {{...}}}}")
    if "args" in args and isinstance(args["args"], dict):
        args = args["args"]  # what a plain save_pretrained of the reference writes (its coder bug)
    if is_blt_args(args):
        patcher = None
        if (folder / "train_args.json").is_file():
            patcher = patcher_args_from_train_args(read_json(folder / "train_args.json"))
        return blt_config_from_reference_args(args, patcher)
    return entropy_config_from_reference_args(args)


# ---------------------------------------------------------------------- export (our config -> reference args)


def reference_args_from_blt_config(cfg: BLTConfig) -> dict[str, Any]:
    """The reference arguments that rebuild ``cfg`` (for writing the reference's formats)."""
    e, g, d, ca = cfg.encoder, cfg.global_, cfg.decoder, cfg.cross_attn
    shared = {e.ffn_dim_multiplier, g.ffn_dim_multiplier, d.ffn_dim_multiplier}
    if len(shared) != 1 or len({e.multiple_of, g.multiple_of, d.multiple_of}) != 1 or len({e.rope_theta, g.rope_theta, d.rope_theta}) != 1:
        raise ValueError("the reference format shares ffn/rope settings across stacks; this model's differ")
    if e.window != d.window or e.attention != d.attention:
        raise ValueError("the reference format needs the same attention in the local encoder and decoder")
    impl = "xformers" if (e.attention != "causal" or g.attention != "causal") else "sdpa"
    return {
        "vocab_size": cfg.vocab_size,
        "dim": g.dim,
        "dim_global": g.dim, "n_layers_global": g.n_layers, "n_heads_global": g.n_heads, "n_kv_heads_global": g.n_kv_heads,
        "dim_local_encoder": e.dim, "n_layers_local_encoder": e.n_layers, "n_heads_local_encoder": e.n_heads,
        "dim_local_decoder": d.dim, "n_layers_local_decoder": d.n_layers, "n_heads_local_decoder": d.n_heads,
        "n_kv_heads": e.n_kv_heads, "head_dim": e.head_dim,
        "ffn_dim_multiplier": e.ffn_dim_multiplier, "multiple_of": e.multiple_of, "norm_eps": e.norm_eps,
        "rope_theta": e.rope_theta, "max_seqlen": g.max_seqlen, "max_encoder_seq_length": e.max_seqlen,
        "attn_impl": impl, "attn_bias_type": g.attention,
        "local_attention_window_len": e.window,
        "use_local_encoder_transformer": True, "share_encoder_decoder_emb": True, "use_rope": True,
        "cross_attn_encoder": ca.encoder, "cross_attn_decoder": ca.decoder, "cross_attn_k": ca.k,
        "cross_attn_nheads": ca.n_heads, "cross_attn_all_layers_encoder": ca.all_layers_encoder,
        "cross_attn_all_layers_decoder": ca.all_layers_decoder, "cross_attn_window_encoder": ca.window_encoder,
        "cross_attn_window_decoder": ca.window_decoder, "cross_attn_init_by_pooling": ca.encoder,
        "cross_attn_use_flex_attention": True,
        "downsampling_by_pooling": cfg.pooling or None,
        "encoder_hash_byte_group_size": cfg.hash.group_sizes if cfg.hash else None,
        "encoder_hash_byte_group_vocab": cfg.hash.vocab_size if cfg.hash else 30000,
        "encoder_hash_byte_group_nb_functions": cfg.hash.n_functions if cfg.hash else 3,
        "patching_mode": cfg.patching.mode, "patching_threshold": cfg.patching.threshold,
        "patching_threshold_add": cfg.patching.threshold_add, "monotonicity": cfg.patching.monotonicity,
        "max_patch_length": cfg.patching.max_patch_length, "patch_size": cfg.patching.patch_size,
        "eos_id": cfg.eos_id, "dropout": 0.0, "pm_size": 0,
    }
