"""``blt generate MODEL PROMPT...``: generate text with a BLT (incremental, KV-cached decoding).

MODEL is anything :func:`torchblt.load_model` reads (a folder in any supported format or a hub repo id);
an ``entropy_model/`` sub-folder is used for entropy patching, or pass ``--entropy-model``.

Examples::

    blt generate ./blt-1b "The capital of France is" --max-new-bytes 64
    blt generate ./blt-1b "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 0 --stream --show-patches
    blt generate ./blt-1b --input prompts.jsonl --output out.jsonl --stop "\\n\\n"

``--input`` reads JSON lines, each ``{"prompt": "..."}`` (other fields are copied to the output) or a
JSON string; every line is checked before anything is generated (the error names the line). ``--input -``
reads them from standard input, and a PROMPT ``-`` is standard input as one prompt (UTF-8, one trailing
newline dropped): ``cat story.txt | blt generate - --max-new-bytes 200``.
``--output`` writes one object per prompt with ``generation`` and ``finish_reason`` added, all at once
(a temporary file renamed at the end: a failed run leaves no partial file), never over an existing file
without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from torchblt.commands.options import (
    STDIN,
    STDIN_NAME,
    OneLineParser,
    add_device_option,
    add_dtype_option,
    stdin_bytes,
    stdin_text,
)
from torchblt.validation import non_negative_int, positive_int

# two background colours that alternate from patch to patch (256-colour ANSI), then reset
PATCH_COLOURS = ("\x1b[48;5;24m", "\x1b[48;5;94m")
PROMPT_STYLE = "\x1b[2m"  # prompt patches dimmed
RESET = "\x1b[0m"


class _IntermixedParser(OneLineParser):
    """Lets options and PROMPT arguments mix (``blt generate MODEL --entropy-model EM "prompt"``): plain
    argparse stops filling a ``nargs="*"`` positional at the first option."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text with a BLT (KV-cached incremental decoding)",
        description="Generate continuations of prompts with a BLT (MODEL omitted: the built-in model, e.g. "
        "`blt generate \"Once upon a time\"`; a first word that names a folder or hub id is the model).",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="model folder or hub repo id (anything load_model reads); omitted: the built-in model")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text(s); several are generated as a batch; - reads one from standard input")
    p.add_argument("--entropy-model", default=None, help="entropy model folder/repo (entropy patching)")
    p.add_argument("--max-new-bytes", type=non_negative_int, default=256, help="bytes to generate per prompt (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely bytes (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (row i uses seed + i)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not included in the output")
    p.add_argument("--no-stop-at-eos", action="store_true", help="keep generating after an EOS")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt at a time)")
    p.add_argument("--show-patches", action="store_true", help="colour patch boundaries (alternating backgrounds)")
    p.add_argument("--input", default=None, help="prompts from a JSON-lines file (- : standard input)")
    p.add_argument("--output", default=None, help="write results as JSON lines here")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing --output file")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch with --input (default 8)")
    p.add_argument("--no-cache", action="store_true", help="full recompute per byte (slow; for checking)")
    p.add_argument("--speculative", type=non_negative_int, default=None, metavar="K",
                   help="speculative decoding: the entropy model drafts up to K bytes, the BLT verifies them in one "
                        "step (same output; docs/speculative.md)")
    p.add_argument("--draft-threshold", type=_draft_threshold, default=None, metavar="X|patch",
                   help="with --speculative: end a draft after a byte whose entropy exceeds X ('patch': the "
                        "patch threshold)")
    p.add_argument("--compile", choices=list(COMPILE), default="auto",
                   help="run the decoding step torch.compile'd (inductor on CPU, CUDA graphs on GPU; same output): "
                        "auto (default) compiles on CUDA and on CPU from ~10 K new bytes, where the minute of "
                        "compiling pays (docs/generation.md)")
    add_device_option(p, "cpu", "default cpu")
    add_dtype_option(p, "fp32", "default fp32")
    p.set_defaults(func=run)
    p.__class__ = _IntermixedParser


COMPILE = {"auto": None, "on": True, "off": False}  # --compile -> GenerationConfig.compile


def _draft_threshold(value: str) -> float | str:
    if value == "patch":
        return value
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not x >= 0.0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number or 'patch', got {value!r}")
    return x


def read_prompts(path: str) -> list[dict[str, Any]]:
    """JSON lines -> records with a ``prompt`` string; raises ``ValueError`` naming the file, line and problem.
    ``path`` ``-``: standard input (named ``<stdin>`` in errors).

    Everything is checked before any generation: UTF-8, JSON, the record's shape, and that every string
    can be written back as UTF-8 (JSON allows lone surrogates such as ``"\\ud800"``; UTF-8 does not).
    """
    if path == STDIN:
        data, path = stdin_bytes(), STDIN_NAME
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"--input {path}: no such file")
        data = file.read_bytes()
    records = []
    for n, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict) or not isinstance(value.get("prompt"), str):
            raise ValueError(f'{path}:{n}: expected {{"prompt": "..."}} or a JSON string')
        bad = _not_utf8(value)
        if bad is not None:
            field, text = bad
            raise ValueError(f"{path}:{n}: {field} holds a lone surrogate ({text}), which is not valid UTF-8 text")
        records.append(value)
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def _not_utf8(value: Any, where: str = "") -> tuple[str, str] | None:
    """(field, offending code point) of the first string in ``value`` that UTF-8 cannot encode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return where or "the value", ascii(value[e.start])[1:-1]
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(k, str) and _not_utf8(k) is not None:
            return f"a key in {where or 'the record'}", ascii(k)[1:-1]
        found = _not_utf8(v, f"{where}.{k}" if where else (f"field {k!r}" if isinstance(k, str) else f"[{k}]"))
        if found is not None:
            return found
    return None


def coloured(pieces: list[tuple[str, int]], style: str = "") -> str:
    """``[(text, patch_index)]`` -> text with alternating patch backgrounds."""
    merged: list[list[Any]] = []
    for t, i in pieces:
        if not t:
            continue
        if merged and merged[-1][1] == i:
            merged[-1][0] += t
        else:
            merged.append([t, i])
    return "".join(f"{style}{PATCH_COLOURS[i % 2]}{t}{RESET}" for t, i in merged)


def patch_pieces(ids: list[int], starts: list[bool], first_index: int, stop: Any) -> list[tuple[str, int]]:
    """Text pieces of ``ids`` (as streaming would release them) tagged with their patch index."""
    from torchblt.generation.stream import StopCondition, TextStream

    stream = TextStream(stop if stop is not None else StopCondition(len(ids)))
    out, index = [], first_index
    for t, s in zip(ids, starts):
        if s:
            index += 1
        if stop is not None and stop.stop_at_eos and t == 2:
            break
        out.append((stream.push(t), index))
    out.append((stream.finish(), index))
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from torchblt import load_model
    from torchblt.builtin import split_model_argument
    from torchblt.generation import GenerationConfig, generate_stream, generate_tokens
    from torchblt.generation.api import encode_prompts, resolve_patcher
    from torchblt.generation.stream import StopCondition
    from torchblt.model.blt import BLT

    if args.input and args.model is not None:
        pass  # with --input there are no prompt arguments: the first word is the model, whatever it looks like
    else:
        args.model, args.prompts = split_model_argument(args.model, args.prompts)
    if args.input and args.prompts:
        raise ValueError("give prompts either as arguments or with --input, not both")
    if not args.input and not args.prompts:
        raise ValueError("no prompt: give [MODEL] PROMPT... or [MODEL] --input prompts.jsonl (no MODEL: the built-in model)")
    if args.output:
        from torchblt.outputs import refuse_existing

        refuse_existing([args.output], args.overwrite)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prompts.count(STDIN) > 1:
        raise ValueError("PROMPT - (standard input) can be given once")
    args.prompts = [stdin_text("PROMPT -") if p == STDIN else p for p in args.prompts]
    records = read_prompts(args.input) if args.input else [{"prompt": p} for p in args.prompts]
    for i, p in enumerate(args.prompts, start=1):
        if _not_utf8(p) is not None:  # undecodable command-line bytes arrive as surrogates
            raise ValueError(f"PROMPT {i} is not valid UTF-8 text ({_not_utf8(p)[1]})")  # type: ignore[index]
    cfg = GenerationConfig(
        max_new_bytes=args.max_new_bytes, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop=list(args.stop), stop_at_eos=not args.no_stop_at_eos, use_cache=not args.no_cache,
        speculative=args.speculative, draft_threshold=args.draft_threshold, compile=COMPILE[args.compile],
    )
    cfg.validate()  # bad flags fail before the model loads
    model = load_model(args.model, device=args.device, dtype=args.dtype, entropy_model=args.entropy_model)
    if not isinstance(model, BLT):
        raise ValueError(f"{args.model} is an entropy model; blt generate needs a BLT")
    patcher = resolve_patcher(model, None, None)
    stop = StopCondition(cfg.max_new_bytes, cfg.stop, cfg.stop_at_eos)
    kwargs = dict(max_new_bytes=cfg.max_new_bytes, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                  seed=cfg.seed, stop=cfg.stop, stop_at_eos=cfg.stop_at_eos, use_cache=cfg.use_cache,
                  speculative=cfg.speculative, draft_threshold=cfg.draft_threshold, compile=cfg.compile)

    results: list[dict[str, Any]] = []
    if args.stream:
        for rec in records:
            prompt, text = rec["prompt"], []
            if args.output is None:
                sys.stdout.write(_prompt_coloured(model, patcher, prompt) if args.show_patches else prompt)
            for piece in generate_stream(model, prompt, patcher, with_patches=args.show_patches, **kwargs):
                piece_text = piece.text if args.show_patches else piece
                text.append(piece_text)
                if args.output is None:
                    sys.stdout.write(coloured([(piece_text, piece.patch_index)]) if args.show_patches else piece_text)
                    sys.stdout.flush()
            if args.output is None:
                sys.stdout.write("\n")
            results.append({**rec, "generation": "".join(text)})
    else:
        for i in range(0, len(records), args.batch_size):
            chunk = records[i : i + args.batch_size]
            ids = encode_prompts([r["prompt"] for r in chunk])
            with torch.inference_mode():
                gen = generate_tokens(model, ids, patcher, config=cfg)
            for j, rec in enumerate(chunk):
                results.append({**rec, "generation": gen.texts[j], "finish_reason": gen.finish_reasons[j],
                                "new_bytes": len(gen.tokens[j])})
                if args.output is None:
                    if args.show_patches:
                        prompt_pieces = patch_pieces(ids[j][1:], gen.prompt_starts[j][1:], 0, None)
                        first = sum(gen.prompt_starts[j]) - 1
                        sys.stdout.write(coloured(prompt_pieces, PROMPT_STYLE))
                        sys.stdout.write(coloured(patch_pieces(gen.tokens[j], gen.patch_starts[j], first, stop)))
                        sys.stdout.write("\n")
                    else:
                        print(rec["prompt"] + gen.texts[j])
    if args.output is not None:
        from torchblt.outputs import staged

        out_path = Path(args.output)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        with staged(args.overwrite) as files:  # all or nothing: a failure leaves no file behind
            files.write_text(out_path, text)
        print(f"wrote {len(results)} generations to {out_path}", file=sys.stderr)
    return 0


def _prompt_coloured(model: Any, patcher: Any, prompt: str) -> str:
    """The prompt with its patch boundaries (dimmed), as the generator patches it."""
    import torch

    from torchblt.generation.api import encode_prompts
    from torchblt.generation.boundaries import finish_starts, raw_prompt_starts

    ids = encode_prompts([prompt])[0]
    tokens = torch.tensor([ids], device=next(model.parameters()).device)
    ent = patcher.entropies(tokens) if patcher.mode == "entropy" else None
    starts = finish_starts(patcher, raw_prompt_starts(patcher, tokens, ent))[0, : len(ids)].tolist()
    return coloured(patch_pieces(ids[1:], starts[1:], 0, None), PROMPT_STYLE)
