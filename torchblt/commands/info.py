"""``blt info MODEL``: architecture summary, parameter counts per part and FLOPs per byte.

``blt info builtin`` also shows the built-in model's card: its data, training time and held-out bits per
byte per language against ``xz -9e``.

MODEL is a named configuration (``blt-1b``, ``blt-7b``, ``entropy-100m``, ``tiny-blt``, ``tiny-entropy``) —
built on the meta device, so even blt-7b costs no memory — or anything :func:`torchblt.load_model` reads
(only its config is read for the counts).

``--train --world-size N`` adds the memory one training rank needs (:mod:`torchblt.train.memory`):
parameters, gradients and AdamW state of its shards, gathered weights, and an activation estimate for
``--batch-size`` rows of ``--bytes-per-row`` bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torchblt.validation import positive_float


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("info", help="parameter counts and FLOPs per byte of a model or named config")
    p.add_argument("model", help="named config (blt-1b, blt-7b, entropy-100m, tiny-blt, tiny-entropy), builtin, "
                   "builtin-entropy, or a model folder")
    p.add_argument("--patch-size", type=positive_float, default=None, help="mean patch size for FLOPs (default: config's, 4.5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    t = p.add_argument_group("training memory per rank (--train)")
    t.add_argument("--train", action="store_true", help="also print the memory one training rank needs")
    t.add_argument("--world-size", type=_positive, default=1, help="data-parallel processes (FSDP2; default 1)")
    t.add_argument("--batch-size", type=_positive, default=2, help="rows per rank and micro-batch (default 2)")
    t.add_argument("--bytes-per-row", type=_positive, default=8192, help="bytes per row (default 8192)")
    t.add_argument("--no-activation-checkpointing", action="store_true", help="estimate without recomputation")
    t.add_argument("--hash-sharding", choices=("rows", "fsdp"), default="rows", help="train.hash_sharding")
    p.set_defaults(func=run)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def describe(name_or_path: str, patch_size: float | None = None, train: dict[str, Any] | None = None) -> dict[str, Any]:
    from torchblt.formats.common import build_model
    from torchblt.formats.native import model_type
    from torchblt.model.blt import BLT
    from torchblt.model.config import NAMED_CONFIGS, config_to_dict, named_config

    if name_or_path in NAMED_CONFIGS:
        config = named_config(name_or_path)
    else:
        from torchblt.builtin import NAMES
        from torchblt.formats import read_config, resolve_model_path

        if not Path(name_or_path).exists() and name_or_path.count("/") != 1 and name_or_path not in NAMES:
            raise ValueError(f"{name_or_path!r} is neither a named config ({', '.join(sorted(NAMED_CONFIGS))}) nor a folder")
        folder = resolve_model_path(name_or_path)
        config = read_config(folder)
    from torchblt import flops

    model = build_model(config, device="meta")
    info: dict[str, Any] = {
        "model": name_or_path,
        **({} if name_or_path in NAMED_CONFIGS else {"path": str(folder)}),
        "kind": model_type(config),
        "parameters": flops.param_counts(model),
        "config": config_to_dict(config),
    }
    if isinstance(model, BLT):
        ps = patch_size if patch_size is not None else float(config.patching.patch_size)
        info["patch_size"] = ps
        info["flops_per_byte"] = flops.blt_flops_per_byte(config, ps)
    else:
        info["flops_per_byte"] = flops.entropy_flops_per_byte(config)
    if train is not None:
        from torchblt.train.memory import training_memory

        info["training_memory"] = training_memory(config, patch_size=patch_size, **train)
    if name_or_path == "builtin" and not Path(name_or_path).exists():
        from torchblt.builtin import builtin_card

        card = builtin_card()
        info["builtin"] = {
            "held_out_bpb": {k: {"bpb": v["bpb"], "xz_9e_bpb": v["xz_9e_bpb"], "mean_patch": v["mean_patch_tokens"]}
                             for k, v in card["eval"]["per_language"].items()},
            "threshold": card["calibration"].get("threshold"),
            "training_seconds": card["recipe_seconds"],
            "weights_bytes": card["eval"]["package_bytes"],
            "card": str(Path(info["path"]) / "README.md"),
        }
    return info


def _fmt(n: float) -> str:
    from torchblt.flops import human

    return human(n, digits=2)


def run(args: argparse.Namespace) -> int:
    train = None
    if args.train:
        train = {"world_size": args.world_size, "batch_size": args.batch_size, "bytes_per_row": args.bytes_per_row,
                 "activation_checkpointing": not args.no_activation_checkpointing,
                 "hash_sharding": args.hash_sharding}
    info = describe(args.model, args.patch_size, train)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['model']} ({info['kind']})")
    print("parameters:")
    for part, count in info["parameters"].items():
        print(f"  {part:<20} {count:>15,d}  ({_fmt(count)})")
    if "flops_per_byte" in info:
        extra = f" at mean patch size {info['patch_size']}" if "patch_size" in info else ""
        print(f"FLOPs per byte{extra}:")
        for part, value in info["flops_per_byte"].items():
            print(f"  {part:<20} {value:>15,.0f}  ({_fmt(value)})")
    if "training_memory" in info:
        mem = info["training_memory"]
        st = mem["setting"]
        ac = "with" if st["activation_checkpointing"] else "without"
        how = f"{st['world_size']} ranks, FSDP2" if st["world_size"] > 1 else "1 process"
        print(f"training memory per rank: {how}, hash tables by {st['hash_sharding']}, AdamW fp32, bf16 compute; "
              f"{st['batch_size']} x {st['bytes_per_row']} bytes per rank, {ac} activation checkpointing:")
        for part in ("parameters", "gradients", "adamw", "gathered_weights", "activations", "embeddings_and_logits",
                     "total"):
            note = "  (estimate)" if part in ("activations", "embeddings_and_logits", "total") else ""
            print(f"  {part:<22} {mem[part] / 2**30:>9.2f} GiB{note}")
    if "builtin" in info:
        b = info["builtin"]
        minutes = sum(b["training_seconds"].values()) / 60
        print(f"built-in model: {b['weights_bytes']:,} bytes of bf16 weights, entropy threshold {b['threshold']:.4f}, "
              f"recipe {minutes:.0f} min on 2 CPU cores; card: {b['card']}")
        print("held-out bits per byte (vs xz -9e on the same files):")
        for lang, v in b["held_out_bpb"].items():
            print(f"  {lang:<4} {v['bpb']:.3f}  (xz {v['xz_9e_bpb']:.3f}; mean patch {v['mean_patch']})")
    return 0
