"""``blt flops CONFIG``: training and inference FLOPs per byte (paper §4.5 accounting, see
:mod:`torchblt.flops`), for a BLT part by part, next to a byte-level and a BPE transformer with the
global model's architecture, so a FLOP-matched comparison is one command.

CONFIG is a named configuration (``blt-1b``, ``blt-7b``, ``entropy-100m``, ``tiny-blt``...), a model folder,
or a ``blt train`` YAML file (its ``model.kind`` / ``model.arch``; its ``data.seq_len`` sets the context).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torchblt.validation import positive_float, positive_int

LLAMA3_VOCAB = 128256
LLAMA3_BYTES_PER_TOKEN = 4.4  # paper §5.1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("flops", help="training and inference FLOPs per byte (BLT parts, byte and BPE baselines)")
    p.add_argument("config", help="named config (blt-1b, blt-7b, entropy-100m, tiny-blt...), model folder or training YAML")
    p.add_argument("--patch-size", type=positive_float, help="mean patch size in bytes (default: the config's patching.patch_size)")
    p.add_argument("--context-bytes", type=positive_float, help="sequence length in bytes (default: global max_seqlen x patch size)")
    p.add_argument("--entropy-model", help="entropy model (named config or folder) to count; 'none' to leave it out")
    p.add_argument("--bpe-vocab", type=positive_int, default=LLAMA3_VOCAB, help=f"BPE baseline vocabulary (default {LLAMA3_VOCAB}, Llama 3)")
    p.add_argument("--bytes-per-token", type=positive_float, default=None,
                   help=f"BPE mean bytes per token (default: a BPE folder's measured value, else {LLAMA3_BYTES_PER_TOKEN}, Llama 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _config_from_folder(folder: Path):
    from torchblt.formats import read_config
    from torchblt.model.config import BPEConfig

    cfg = read_config(folder)
    if isinstance(cfg, BPEConfig):
        cfg.bytes_per_token = _measured_bytes_per_token(folder)  # type: ignore[attr-defined]
    return cfg


def _measured_bytes_per_token(folder: Path) -> float | None:
    """The BPE tokenizer's mean bytes per token recorded in the folder (``blt bpe-tokenizer`` measures it)."""
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    bpt = (raw.get("bpe") or {}).get("bytes_per_token")
    return None if bpt is None else float(bpt)


def _config_from_yaml(path: Path) -> tuple[Any, float | None]:
    """The architecture of a training YAML and its sequence length (patches for BLT, bytes otherwise)."""

    from torchblt.train.kinds import get_kind
    from torchblt.validation import load_yaml

    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    model, data = raw.get("model") or {}, raw.get("data") or {}
    for key, section in (("model", model), ("data", data)):
        if not isinstance(section, dict):
            raise ValueError(f"{path}: {key}: expected a mapping, got {section!r}")
    kind = get_kind(model.get("kind", "blt"))
    config = kind.make_config(model.get("arch", "tiny-blt"))
    seq_len = data.get("seq_len")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"{path}: data.seq_len: expected a positive integer, got {seq_len!r}")
    return config, seq_len


def resolve_config(spec: str) -> tuple[Any, float | None, Path | None]:
    """``(architecture config, sequence length or None, folder or None)`` of a CONFIG argument."""
    from torchblt.model.config import NAMED_CONFIGS, named_config

    if spec in NAMED_CONFIGS:
        return named_config(spec), None, None
    p = Path(spec)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such config file")
        config, seq_len = _config_from_yaml(p)
        return config, seq_len, None
    if p.exists():
        folder = p.parent if p.is_file() else p
        return _config_from_folder(folder), None, folder
    raise ValueError(f"{spec}: not a named config ({', '.join(sorted(NAMED_CONFIGS))}), a model folder or a YAML file")


def compute(args: argparse.Namespace) -> dict[str, Any]:
    from torchblt import flops
    from torchblt.model.config import BLTConfig, BPEConfig, config_to_dict, named_config
    from torchblt.model.entropy_model import EntropyModelConfig

    config, seq_len, folder = resolve_config(args.config)
    out: dict[str, Any] = {"config": args.config}
    if isinstance(config, BLTConfig):
        ps = float(args.patch_size if args.patch_size is not None else config.patching.patch_size)
        ctx = args.context_bytes if args.context_bytes is not None else (seq_len * ps if seq_len else None)
        em = args.entropy_model
        entropy_cfg = None
        if em is None:
            if config.patching.mode == "entropy":
                if folder is not None and (folder / "entropy_model").is_dir():
                    entropy_cfg = _config_from_folder(folder / "entropy_model")
                elif folder is None:  # a named config: the entropy model it ships with
                    entropy_cfg = named_config("tiny-entropy" if args.config.startswith("tiny") else "entropy-100m")
        elif em.lower() != "none":
            entropy_cfg, _, _ = resolve_config(em)
            if not isinstance(entropy_cfg, EntropyModelConfig):
                raise ValueError(f"--entropy-model {em}: not an entropy model configuration")
        blt = flops.blt_flops_per_byte(config, ps, entropy_cfg, ctx)
        n_ctx = ctx if ctx is not None else config.global_.max_seqlen * ps
        glob = config.global_
        bpt = args.bytes_per_token or LLAMA3_BYTES_PER_TOKEN
        out.update(
            kind="blt",
            patch_size=ps,
            context_bytes=n_ctx,
            bytes_per_token=bpt,
            entropy_model=None if entropy_cfg is None else config_to_dict(entropy_cfg),
            blt=blt,
            # the paper's baselines: the global model's architecture over bytes and over BPE tokens
            byte_transformer=flops.byte_flops_per_byte(glob, n_ctx),
            bpe_transformer=flops.bpe_flops_per_byte(glob, args.bpe_vocab, bpt, n_ctx / bpt),
        )
    elif isinstance(config, EntropyModelConfig):
        if isinstance(config, BPEConfig):  # a BPE baseline folder: measured bytes/token unless overridden
            bpe = args.bytes_per_token or getattr(config, "bytes_per_token", None) or LLAMA3_BYTES_PER_TOKEN
            ctx = args.context_bytes / bpe if args.context_bytes is not None else seq_len
            out.update(kind="bpe", bytes_per_token=bpe, bpe_transformer=flops.bpe_flops_per_byte(config, config.vocab_size, bpe, ctx))
        else:
            ctx = args.context_bytes if args.context_bytes is not None else seq_len
            out.update(kind="byte", byte_transformer=flops.byte_flops_per_byte(config, ctx))
    else:  # pragma: no cover - resolve_config returns one of the above
        raise ValueError(f"{args.config}: unsupported configuration type {type(config).__name__}")
    return out


def _fmt(x: float) -> str:
    from torchblt.flops import human

    return human(x)


def run(args: argparse.Namespace) -> int:
    out = compute(args)
    args.bytes_per_token = args.bytes_per_token or LLAMA3_BYTES_PER_TOKEN
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    head = f"{out['config']} ({out['kind']})"
    if out["kind"] == "blt":
        head += f": mean patch size {out['patch_size']:g}, context {out['context_bytes']:g} bytes"
    print(head)
    print(f"  {'FLOPs per byte':<34} {'forward':>12} {'train':>12} {'inference':>12}")
    if "blt" in out:
        blt = out["blt"]
        for part in ("entropy_model", "local_encoder", "global", "local_decoder", "cross_attention"):
            if part in blt:
                train = blt[part] * (1 if part == "entropy_model" else 3)
                print(f"  {'  ' + part:<34} {_fmt(blt[part]):>12} {_fmt(train):>12} {_fmt(blt[part]):>12}")
        print(f"  {'BLT total':<34} {_fmt(blt['forward']):>12} {_fmt(blt['train']):>12} {_fmt(blt['inference']):>12}")
    rows = [("byte transformer", "byte_transformer"), ("BPE transformer", "bpe_transformer")]
    for label, key in rows:
        if key in out:
            r = out[key]
            if out["kind"] == "blt":
                label += " (global arch)" if key == "byte_transformer" else f" ({args.bytes_per_token:g} B/token)"
            print(f"  {label:<34} {_fmt(r['forward']):>12} {_fmt(r['train']):>12} {_fmt(r['inference']):>12}")
    if "blt" in out:
        b = out["blt"]["inference"]
        print(f"  BLT inference / BPE inference: {b / out['bpe_transformer']['inference']:.3f}; "
              f"BLT train / BPE train: {out['blt']['train'] / out['bpe_transformer']['train']:.3f}")
    return 0
