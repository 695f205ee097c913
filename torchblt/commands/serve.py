"""``blt serve MODEL``: an OpenAI-compatible HTTP server (completions, streaming, continuous batching).

MODEL is anything :func:`torchblt.load_model` reads; an ``entropy_model/`` sub-folder is used for entropy
patching, or pass ``--entropy-model``. Examples::

    blt serve ./blt-1b                                  # http://127.0.0.1:8000/v1
    blt serve ./blt-1b --port 8080 --max-batch 32 --api-key "$KEY"
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "blt-1b", "prompt": "The capital of France is", "max_tokens": 32, "temperature": 0}'

The model name clients send is the last part of MODEL unless ``--model-name`` says otherwise.
SIGTERM or Ctrl-C stops accepting connections, lets running requests finish for up to ``--drain-timeout``
seconds, cancels the rest and exits 0. See ``docs/serving.md``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from torchblt.commands.options import add_device_option, add_dtype_option

# --prefill-thread and --compile: their choices as ServeConfig takes them (None: decided where it pays)
AUTO_ON_OFF = {"auto": None, "on": True, "off": False}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a BLT over an OpenAI-compatible HTTP API (streaming, continuous batching)",
        description="Serve a BLT over an OpenAI-compatible HTTP API: /v1/completions, /v1/models, /health, /metrics.",
    )
    p.add_argument("model", nargs="?", default="builtin",
                   help="model folder or hub repo id (anything load_model reads); omitted: the built-in model")
    p.add_argument("--entropy-model", default=None, help="entropy model folder/repo (entropy patching)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", default=None, help="the model name clients send (default: MODEL's last part)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded at once (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row; more get 429 + Retry-After (default 64)")
    p.add_argument("--max-prompt-bytes", type=int, default=None,
                   help="longest prompt in bytes; longer ones get 400 (default: the model's context less the BOS)")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="largest max_tokens (new bytes) a request may ask for (default 4096)")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt bytes prefilled between two decoding steps, so that a long prompt delays the "
                        "running requests by one chunk at a time (default 128; 0: whole prompts at once)")
    p.add_argument("--prefill-thread", choices=list(AUTO_ON_OFF), default="auto",
                   help="prefill joining requests on a thread of their own, beside the decoding steps (auto: on "
                        "a CPU with one torch thread and another core; measured on 2 cores in docs/serving.md)")
    p.add_argument("--speculative", type=int, default=None, metavar="K",
                   help="speculative decoding: the entropy model drafts up to K bytes that the BLT verifies in one "
                        "step (same bytes greedy, same distribution sampling); needs --max-batch 1")
    p.add_argument("--compile", choices=list(AUTO_ON_OFF), default="auto",
                   help="run the batched decoding step compiled (inductor on CPU, CUDA graphs on GPU), each batch "
                        "size compiled at start-up (minutes on a CPU); caches are then sized for --max-prompt-bytes + "
                        "--max-tokens bytes per row (default auto: on for CUDA, off on CPU)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM (default 30)")
    add_device_option(p, "cpu", "default cpu")
    add_dtype_option(p, "fp32", "default fp32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the CPU cores less one, for HTTP and streaming, at most "
                        "torch's default; measured on 2 cores: 1 thread serves 1 and 4 clients faster than 2, and "
                        "16 clients as fast)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=run)


def default_threads() -> int:
    """The CPU cores less one (the event loop streams while the scheduler steps), at most torch's default."""
    return max(1, min(torch_default_threads(), (os.cpu_count() or 1) - 1))


def torch_default_threads() -> int:
    import torch

    return torch.get_num_threads()


def _model_name(model: str) -> str:
    name = Path(model.rstrip("/")).name
    return name or model


def run(args: argparse.Namespace) -> int:
    try:
        from torchblt.serve import BLTServer, ServeConfig
        from torchblt.serve import run as serve
    except ImportError as e:
        raise ValueError(str(e)) from None
    from torchblt import load_model
    from torchblt.model.blt import BLT

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    config = ServeConfig(
        model_name=args.model_name or _model_name(args.model), max_batch=args.max_batch, max_queue=args.max_queue,
        max_prompt_bytes=args.max_prompt_bytes, max_tokens=args.max_tokens, api_key=args.api_key,
        drain_timeout=args.drain_timeout, prefill_chunk=args.prefill_chunk, speculative=args.speculative,
        prefill_thread=AUTO_ON_OFF[args.prefill_thread],
        compile=AUTO_ON_OFF[args.compile],
    )
    try:
        config.validate()
    except ValueError as e:  # "max_batch must be ..." -> "--max-batch must be ..."
        field, _, rest = str(e).partition(" ")
        if field == "compile":
            raise ValueError("--compile on applies to the batched steps: --speculative runs eager (use one of them)") from None
        if field == "speculative" and rest.startswith("decoding"):
            raise ValueError(f"--speculative needs --max-batch 1 (one request at a time), got --max-batch "
                             f"{args.max_batch}") from None
        raise ValueError(f"--{field.replace('_', '-')} {rest}") from None
    import torch

    torch.set_num_threads(args.threads if args.threads is not None else default_threads())
    model = load_model(args.model, device=args.device, dtype=args.dtype, entropy_model=args.entropy_model)
    if not isinstance(model, BLT):
        raise ValueError(f"{args.model} is an entropy model; blt serve needs a BLT")
    server = BLTServer(model, config)
    return serve(server, host=args.host, port=args.port, log_level=args.log_level)
