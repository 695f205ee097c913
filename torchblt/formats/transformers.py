"""Hugging Face ``transformers`` interop: the ``BltForCausalLM`` folder layout (``config.json`` with
``"model_type": "blt"`` + ``model.safetensors``), read and written without needing ``transformers``
installed (:func:`to_transformers_model` / :func:`from_transformers_model` convert live objects and do).

Key mapping (spec/peers.md §1.4), ours -> transformers:

* ``attention.wq|wk|wv|wo`` -> ``self_attn.q_proj|k_proj|v_proj|o_proj``; ``feed_forward.w1|w3|w2`` ->
  ``mlp.gate_proj|up_proj|down_proj``; ``attention_norm`` / ``ffn_norm`` -> ``input_layernorm`` /
  ``post_attention_layernorm``; cross-attention ``wq..wo`` likewise, ``cross_attn_norm_q|kv`` -> ``q_norm|k_norm``;
  ``tok_embeddings`` -> ``embed_tokens``; everything gets the prefix ``model.``.
* ``local_decoder.output`` -> the top-level ``lm_head``.
* The hash tables ``encoder_hash_tok_embedding.{i}`` (one per (function, n-gram size), function-major)
  are fused row-wise into one ``model.encoder_hash_tok_embedding`` (row ``hash + i * vocab``).
* The entropy model is bundled as ``model.patcher.*`` (``output`` -> ``lm_head``).

What the port cannot express, and how we handle it (``ValueError`` naming the field when a model cannot
be converted):

* It always has patch <-> byte cross-attention in encoder and decoder, with the stacks' own head counts:
  models without it, or with ``cross_attn.n_heads`` different from the encoder/decoder heads, or with
  cross-attention windows, are refused.
* With cross-attention after every encoder layer (not in the released models) it re-pools the patch
  queries at each layer instead of carrying them: such models are refused (several encoder layers).
* Its decoder always projects the global output (``G -> k D``); where we have no projection
  (``G == D``, ``k == 1``) an identity matrix is written (and recognised on the way back).
* It always has hash embeddings: a model without them gets one all-zero table (adds nothing).
* Masks: the port (transformers 5.x) uses causal sliding-window masks of the same width in the local
  models and the entropy model, and a causal mask in the global model, but no document boundaries: ours
  are block-causal at EOS, as the reference's. Logits are equal (we measure 0 difference in fp32 on the
  test models, short or longer than the windows) as long as no EOS sits inside the input; after an
  interior EOS the port lets bytes attend across it and the two differ. A transformers folder read by
  :func:`~torchblt.load_model` gets our (the reference's) masks.
* Its patcher implements the global-threshold entropy rule only (no ``threshold_add``, no
  ``monotonicity``: those models patch differently in the port unless ``patch_lengths`` are passed),
  and, without a bundled entropy model or in other modes, falls back to one byte per patch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from torchblt.formats.common import CheckpointError
from torchblt.model.blt import BLT
from torchblt.model.config import BLTConfig, CrossAttentionConfig, HashConfig
from torchblt.model.entropy_model import EntropyModel, EntropyModelConfig
from torchblt.model.masks import uses_window
from torchblt.model.transformer import StackConfig, ffn_hidden_dim
from torchblt.patching import DEFAULT_THRESHOLD, PatchingConfig, attach_entropy_model, attached_entropy_model

__all__ = [
    "blt_to_transformers_state",
    "config_from_transformers",
    "config_from_transformers_folder",
    "config_to_transformers",
    "from_transformers_model",
    "is_transformers_folder",
    "read_transformers",
    "save_transformers",
    "state_from_transformers",
    "to_transformers_model",
]

_LEAF_TO_HF = {
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "cross_attn_norm_q": "q_norm", "cross_attn_norm_kv": "k_norm",
    "tok_embeddings": "embed_tokens", "attention": "self_attn", "feed_forward": "mlp",
}
_LEAF_FROM_HF = {v: k for k, v in _LEAF_TO_HF.items()}
_CROSS_FROM_HF = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "q_norm": "cross_attn_norm_q",
                  "k_norm": "cross_attn_norm_kv"}


# --------------------------------------------------------------------------- detection


def is_transformers_folder(folder: Path) -> bool:
    from torchblt.formats.common import read_config_json

    raw = read_config_json(folder)
    return raw is not None and raw.get("model_type") == "blt" and "args" not in raw


# --------------------------------------------------------------------------- configs


def _stack_to_hf(stack: StackConfig, where: str) -> dict[str, Any]:
    if stack.head_dim is not None and stack.head_dim != stack.dim // stack.n_heads:
        raise ValueError(f"{where}.head_dim={stack.head_dim}: transformers' BLT needs head_dim = dim / n_heads")
    return {
        "hidden_size": stack.dim,
        "num_attention_heads": stack.n_heads,
        "num_key_value_heads": stack.resolved_n_kv_heads,
        "num_hidden_layers": stack.n_layers,
        "intermediate_size": stack.ffn_hidden_dim,
        "rms_norm_eps": stack.norm_eps,
        "max_position_embeddings": stack.max_seqlen,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(stack.rope_theta)},
        "hidden_act": "silu",
        "dropout": 0.0,
    }


def _ffn_fields(dim: int, hidden: int, hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """``multiple_of`` / ``ffn_dim_multiplier`` that give our SwiGLU width ``hidden`` for width ``dim``
    (``hint``: the values we wrote, used when they still give that width)."""
    if hint and "multiple_of" in hint:
        if ffn_hidden_dim(dim, int(hint["multiple_of"]), hint.get("ffn_dim_multiplier")) == hidden:
            return {"multiple_of": int(hint["multiple_of"]), "ffn_dim_multiplier": hint.get("ffn_dim_multiplier")}
    for multiple_of in (256, 128, 64, 32, 16, 8, 1):
        if ffn_hidden_dim(dim, multiple_of, 1.0) == hidden:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": 1.0}
    base = int(2 * (4 * dim) / 3)
    if base <= hidden:
        return {"multiple_of": hidden, "ffn_dim_multiplier": None}
    multiplier = (hidden + 0.5) / base
    assert ffn_hidden_dim(dim, 1, multiplier) == hidden
    return {"multiple_of": 1, "ffn_dim_multiplier": multiplier}


def _stack_from_hf(
    sub: dict[str, Any], attention: str, window: int | None, default_theta: float, hint: dict[str, Any] | None = None
) -> StackConfig:
    dim, heads = int(sub.get("hidden_size")), int(sub.get("num_attention_heads"))
    kv = sub.get("num_key_value_heads") or heads
    hidden = sub.get("intermediate_size") or int(8 * dim / 3)
    rope = sub.get("rope_parameters") or {}
    theta = rope.get("rope_theta", sub.get("rope_theta", default_theta))
    return StackConfig(
        dim=dim,
        n_layers=int(sub.get("num_hidden_layers")),
        n_heads=heads,
        n_kv_heads=None if kv == heads else int(kv),
        norm_eps=float(sub.get("rms_norm_eps", sub.get("norm_eps", 1e-5))),
        rope_theta=float(theta),
        max_seqlen=int(sub.get("max_position_embeddings", 8192)),
        attention=attention,
        window=window,
        **_ffn_fields(dim, int(hidden), hint),
    )


def config_to_transformers(cfg: BLTConfig, entropy_cfg: EntropyModelConfig | None = None) -> dict[str, Any]:
    """The ``config.json`` of a transformers ``BltForCausalLM`` for our architecture (raises ``ValueError``
    naming what the port cannot express)."""
    ca = cfg.cross_attn
    if not (ca.encoder and ca.decoder):
        raise ValueError("cross_attn.encoder/decoder: transformers' BLT always uses cross-attention in both")
    for name, stack in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        if ca.n_heads != stack.n_heads:
            raise ValueError(
                f"cross_attn.n_heads={ca.n_heads}: transformers' BLT uses the {name}'s heads ({stack.n_heads})"
            )
    if ca.all_layers_encoder and cfg.encoder.n_layers > 1:
        raise ValueError(
            "cross_attn.all_layers_encoder=True with encoder.n_layers > 1: transformers' BLT re-pools the patch "
            "queries at every encoder layer (the reference, and torchblt, carry them from layer to layer)"
        )
    if ca.window_encoder is not None or ca.window_decoder is not None:
        raise ValueError("cross_attn.window_encoder/window_decoder: transformers' BLT has no cross-attention windows")
    windows = {cfg.encoder.window if uses_window(cfg.encoder.attention) else None,
               cfg.decoder.window if uses_window(cfg.decoder.attention) else None}
    if len(windows) != 1:
        raise ValueError(f"encoder/decoder windows {sorted(windows, key=str)}: transformers' BLT has one local window")
    window = windows.pop()
    h = cfg.hash
    encoder = _stack_to_hf(cfg.encoder, "encoder")
    decoder = _stack_to_hf(cfg.decoder, "decoder")
    glob = _stack_to_hf(cfg.global_, "global_")
    for sub, all_layers in ((encoder, ca.all_layers_encoder), (decoder, ca.all_layers_decoder)):
        sub.update(cross_attn_all_layers=all_layers, cross_attn_k=ca.k, hidden_size_global=cfg.global_.dim,
                   vocab_size=cfg.vocab_size)
    encoder["sliding_window"] = window
    out: dict[str, Any] = {
        "architectures": ["BltForCausalLM"],
        "model_type": "blt",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.global_.max_seqlen,
        "patch_in_forward": entropy_cfg is not None,
        "patch_size": max(1, round(cfg.patching.patch_size)),  # an int there (only "not None" matters to it)
        "patching_mode": cfg.patching.mode,  # the port patches by entropy only (else byte by byte)
        "patching_threshold": cfg.patching.threshold,
        "patching_batch_size": 1,
        "max_patch_length": cfg.patching.max_patch_length,
        "local_attention_window_len": window,
        "cross_attn_k": ca.k,
        "encoder_hash_byte_group_size": list(h.group_sizes) if h else [3],
        "encoder_hash_byte_group_vocab": h.vocab_size if h else 1,
        "encoder_hash_byte_group_nb_functions": h.n_functions if h else 1,
        "encoder_config": encoder,
        "decoder_config": decoder,
        "global_config": glob,
        "tie_word_embeddings": False,
        "use_cache": False,  # the port's cache path fails on BltConfig (spec/peers.md §1.5)
        "bos_token_id": 1,
        "eos_token_id": cfg.eos_id,
        "pad_token_id": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.global_.rope_theta)},
        # our patching options the port does not read (kept so a round trip loses nothing)
        "patching_threshold_add": cfg.patching.threshold_add,
        "monotonicity": cfg.patching.monotonicity,
        "torchblt": {
            "mode": cfg.patching.mode,
            "pooling": cfg.pooling,
            "patch_size": cfg.patching.patch_size,
            "stacks": {name: {"attention": st.attention, "multiple_of": st.multiple_of,
                              "ffn_dim_multiplier": st.ffn_dim_multiplier}
                       for name, st in (("encoder", cfg.encoder), ("decoder", cfg.decoder), ("global", cfg.global_))},
        },
    }
    if entropy_cfg is not None:
        t = entropy_cfg.transformer
        patcher = _stack_to_hf(t, "entropy_model.transformer")
        patcher.update(vocab_size=entropy_cfg.vocab_size,
                       sliding_window=t.window if uses_window(t.attention) else None)
        patcher.pop("hidden_act")
        out["patcher_config"] = patcher
        out["torchblt"]["stacks"]["entropy_model"] = {"attention": t.attention, "multiple_of": t.multiple_of,
                                                      "ffn_dim_multiplier": t.ffn_dim_multiplier}
    return out


def config_from_transformers(raw: dict[str, Any]) -> tuple[BLTConfig, EntropyModelConfig | None]:
    """Our configs from a transformers ``BltConfig`` dict (``config.json``); the entropy model's is None
    when the folder bundles no patcher. Masks become ours (block-causal at EOS, see the module docstring)."""
    try:
        enc, dec, glob = raw["encoder_config"], raw["decoder_config"], raw["global_config"]
    except KeyError as e:
        raise CheckpointError(f"transformers BLT config: missing {e.args[0]!r}") from None
    ours = raw.get("torchblt") or {}  # what we wrote (absent in folders converted by others)
    stacks = ours.get("stacks") or {}
    window = raw.get("local_attention_window_len", 512)
    local_kind = "local_block_causal" if window else "block_causal"
    theta = 500000.0

    def kind(name: str, default: str) -> str:
        wanted = (stacks.get(name) or {}).get("attention", default)
        return wanted if (wanted.startswith("local_") == bool(window)) or name == "global" else default

    encoder = _stack_from_hf(enc, kind("encoder", local_kind), window, theta, stacks.get("encoder"))
    decoder = _stack_from_hf(dec, kind("decoder", local_kind), window, theta, stacks.get("decoder"))
    global_ = _stack_from_hf(glob, kind("global", "block_causal"), None, theta, stacks.get("global"))
    k = int(raw.get("cross_attn_k", 2))
    if int(enc["num_attention_heads"]) != int(dec["num_attention_heads"]):
        raise CheckpointError(
            "transformers BLT config: encoder and decoder head counts differ "
            f"({enc['num_attention_heads']} vs {dec['num_attention_heads']}); torchblt has one cross_attn.n_heads"
        )
    sizes = list(raw.get("encoder_hash_byte_group_size") or [3, 4, 5, 6, 7, 8])
    hash_cfg = HashConfig(group_sizes=sizes, vocab_size=int(raw.get("encoder_hash_byte_group_vocab", 500002)),
                          n_functions=int(raw.get("encoder_hash_byte_group_nb_functions", 1)))
    cfg = BLTConfig(
        encoder=encoder,
        global_=global_,
        decoder=decoder,
        cross_attn=CrossAttentionConfig(
            encoder=True, decoder=True, k=k, n_heads=int(enc["num_attention_heads"]),
            all_layers_encoder=bool(enc.get("cross_attn_all_layers", False)),
            all_layers_decoder=bool(dec.get("cross_attn_all_layers", True)),
        ),
        hash=hash_cfg,
        pooling=ours.get("pooling", "max"),
        patching=PatchingConfig(
            mode=ours.get("mode", raw.get("patching_mode") or "entropy"),
            threshold=float(raw.get("patching_threshold", DEFAULT_THRESHOLD)),
            threshold_add=raw.get("patching_threshold_add"),
            monotonicity=bool(raw.get("monotonicity", False)),
            max_patch_length=raw.get("max_patch_length"),
            patch_size=float(ours.get("patch_size", raw.get("patch_size") or 4.5)),
        ),
        vocab_size=int(raw.get("vocab_size", 260)),
        eos_id=int(raw.get("eos_token_id") or 2),
    )
    cfg.validate()
    entropy_cfg = None
    patcher = raw.get("patcher_config")
    if raw.get("patch_in_forward", True) and patcher:
        w = patcher.get("sliding_window")
        stack = _stack_from_hf(patcher, "local_block_causal" if w else "causal", w, 10000.0,
                               stacks.get("entropy_model"))
        entropy_cfg = EntropyModelConfig(transformer=stack, vocab_size=int(patcher.get("vocab_size", 260)))
        entropy_cfg.validate()
    return cfg, entropy_cfg


# --------------------------------------------------------------------------- weights


def _rename(key: str, table: dict[str, str]) -> str:
    return ".".join(table.get(part, part) for part in key.split("."))


def blt_to_transformers_state(model: BLT, entropy_model: EntropyModel | None = None) -> dict[str, torch.Tensor]:
    """Our BLT (+ entropy model) state dict in transformers' names and layout."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    tables = []
    for key, value in model.state_dict().items():
        if key.startswith("encoder_hash_tok_embedding."):
            tables.append((int(key.split(".")[1]), value))
            continue
        if key == "local_decoder.output.weight":
            out["lm_head.weight"] = value
            continue
        out["model." + _rename(key, _LEAF_TO_HF)] = value
    if tables:
        out["model.encoder_hash_tok_embedding.weight"] = torch.cat([t for _, t in sorted(tables, key=lambda x: x[0])])
    else:
        out["model.encoder_hash_tok_embedding.weight"] = torch.zeros(1, cfg.encoder.dim, dtype=model.local_decoder.output.weight.dtype)
    if "model.local_decoder.patch_embedding_projection.weight" not in out:
        # the port always projects the global output; ours only when widths differ (here G == D, k == 1)
        out["model.local_decoder.patch_embedding_projection.weight"] = torch.eye(
            cfg.decoder.dim, dtype=model.local_decoder.output.weight.dtype
        )
    if entropy_model is not None:
        for key, value in entropy_model.state_dict().items():
            name = "lm_head." + key.split(".", 1)[1] if key.startswith("output.") else _rename(key, _LEAF_TO_HF)
            out["model.patcher." + name] = value
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def state_from_transformers(
    state: dict[str, torch.Tensor], cfg: BLTConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """transformers' state dict -> (our BLT state, our entropy-model state (empty if not bundled))."""
    blt: dict[str, torch.Tensor] = {}
    em: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            blt["local_decoder.output.weight"] = value
            continue
        if not key.startswith("model."):
            raise CheckpointError(f"transformers BLT weights: unexpected key {key!r}")
        key = key[len("model."):]
        if key.startswith("patcher."):
            name = key[len("patcher."):]
            em["output." + name[len("lm_head."):] if name.startswith("lm_head.") else _rename(name, _LEAF_FROM_HF)] = value
        elif key == "encoder_hash_tok_embedding.weight":
            if cfg.hash is None:
                continue
            rows = cfg.hash.vocab_size
            if value.shape[0] != rows * cfg.hash.n_tables:
                raise CheckpointError(
                    f"encoder_hash_tok_embedding: {value.shape[0]} rows, expected {cfg.hash.n_tables} x {rows}"
                )
            for i in range(cfg.hash.n_tables):
                blt[f"encoder_hash_tok_embedding.{i}.weight"] = value[i * rows : (i + 1) * rows]
        elif ".cross_attn_layers." in key:
            blt[_rename(key, _CROSS_FROM_HF)] = value
        else:
            blt[_rename(key, _LEAF_FROM_HF)] = value
    proj = "local_decoder.patch_embedding_projection.weight"
    if cfg.global_.dim == cfg.decoder.dim and proj in blt:
        w = blt.pop(proj)
        if not torch.equal(w.float(), torch.eye(cfg.decoder.dim)):
            raise CheckpointError(
                f"{proj}: global and decoder widths are equal ({cfg.decoder.dim}) but the projection is not the "
                "identity; torchblt has no decoder projection for this shape"
            )
    return blt, em


# --------------------------------------------------------------------------- folders


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from torchblt.formats.native import read_safetensors

    single = folder / "model.safetensors"
    if single.is_file():
        return read_safetensors(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard))
        return state
    raise CheckpointError(f"{folder}: transformers BLT folder without model.safetensors (or its index)")


def config_from_transformers_folder(folder: Path) -> BLTConfig:
    """The BLT config of a transformers folder (no weights read)."""
    raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    try:
        return config_from_transformers(raw)[0]
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{Path(folder) / 'config.json'}: {e}") from None


def read_transformers(
    folder: Path,
) -> tuple[BLTConfig, dict[str, torch.Tensor], EntropyModelConfig | None, dict[str, torch.Tensor]]:
    """``(config, state, entropy_config or None, entropy_state)`` of a transformers BLT folder."""
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    try:
        cfg, entropy_cfg = config_from_transformers(raw)
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    state, em_state = state_from_transformers(_read_weights(folder), cfg)
    if entropy_cfg is None or not em_state:
        entropy_cfg, em_state = None, {}
    return cfg, state, entropy_cfg, em_state


def save_transformers(
    model: BLT, folder: str | os.PathLike[str], entropy_model: EntropyModel | None = None, overwrite: bool = False
) -> Path:
    """Write ``model`` (and its entropy model, default the one attached for patching) as a transformers
    ``BltForCausalLM`` folder: ``config.json``, ``model.safetensors``, ``generation_config.json``."""
    from safetensors.torch import save_file

    from torchblt.outputs import refuse_existing, staged

    if entropy_model is None:
        entropy_model = attached_entropy_model(model)
    config = config_to_transformers(model.config, entropy_model.config if entropy_model is not None else None)
    out = Path(folder)
    refuse_existing(transformers_files(out), overwrite)
    state = blt_to_transformers_state(model, entropy_model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    generation = {"bos_token_id": 1, "eos_token_id": model.config.eos_id, "pad_token_id": 0, "use_cache": False}
    with staged(overwrite) as files:
        save_file(state, str(files.path(out / "model.safetensors")), metadata={"format": "pt"})
        files.write_text(out / "config.json", json.dumps({**config, "dtype": dtype}, indent=2) + "\n")
        files.write_text(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    return out


def transformers_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The files :func:`save_transformers` writes."""
    out = Path(folder)
    return [out / "config.json", out / "model.safetensors", out / "generation_config.json"]


# --------------------------------------------------------------------------- live objects (needs transformers)


def to_transformers_model(model: BLT, entropy_model: EntropyModel | None = None) -> Any:
    """A ``transformers.BltForCausalLM`` with our weights (fp32, eval mode). Needs ``pip install 'torchblt[hf]'``."""
    try:
        from transformers import BltConfig as HFBltConfig
        from transformers import BltForCausalLM
    except ImportError:
        raise ValueError("converting to transformers needs transformers: pip install 'torchblt[hf]'") from None
    if entropy_model is None:
        entropy_model = attached_entropy_model(model)
    config = config_to_transformers(model.config, entropy_model.config if entropy_model is not None else None)
    keep = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    hf = BltForCausalLM(HFBltConfig(**keep))
    state = blt_to_transformers_state(model, entropy_model)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"transformers BltForCausalLM: missing {missing[:10]}, unexpected {unexpected[:10]}")
    return hf.float().eval()


def from_transformers_model(hf: Any) -> BLT:
    """Our BLT (entropy model attached when bundled) from a live ``transformers.BltForCausalLM``."""
    from torchblt.formats.common import build_model, load_state_dict_strict

    cfg, entropy_cfg = config_from_transformers(hf.config.to_dict())
    state, em_state = state_from_transformers(dict(hf.state_dict()), cfg)
    model = build_model(cfg)
    load_state_dict_strict(model, state, source="transformers BltForCausalLM")
    if entropy_cfg is not None and em_state:
        em = build_model(entropy_cfg)
        load_state_dict_strict(em, em_state, source="transformers BltForCausalLM.model.patcher")
        attach_entropy_model(model, em.eval())
    return model.eval()
