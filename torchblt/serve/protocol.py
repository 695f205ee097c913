"""The OpenAI completions protocol for a byte model: request validation, errors, and the response shapes.

Everything here is plain Python (no torch calls, no web framework), so the event loop can run it.

Tokens are bytes
----------------
The model's tokens are UTF-8 bytes (id = byte + 4) and four special ids (BOE 0, BOS 1, EOS 2, BPE 3).
So ``max_tokens`` is a number of new bytes (every generated id counts, a final EOS included), ``usage``
counts bytes, and a ``prompt`` may be text (encoded as UTF-8 after a BOS, as :func:`torchblt.generate`
does) or token ids (a BOS is put in front unless the ids already start with one). In ``logprobs`` each
token is shown as a string: an ASCII byte as its character, any other byte as ``"bytes:\\xNN"`` (the
OpenAI API's form for a token that is not whole text), the special ids as ``<boe> <s> </s> <bpe>``;
``text_offset`` is the index of the character the byte belongs to. The vLLM tokenizer endpoints
(``/tokenize``, ``/detokenize``, ``/tokenizer_info``) speak the same ids, which is what lm-eval's
``local-completions`` reads to count context tokens.

Errors
------
:class:`APIError` carries an HTTP status and the OpenAI error body ``{"error": {"message", "type",
"param", "code"}}``; messages name the field and the value.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from torchblt.generation.api import GenerationConfig
from torchblt.tokenizer import BOS_ID, OFFSET, VOCAB_SIZE, ByteTokenizer

SPECIAL_TOKENS = {0: "<boe>", 1: "<s>", 2: "</s>", 3: "<bpe>"}
SPECIAL_IDS = {name: i for i, name in SPECIAL_TOKENS.items()}

MAX_LOGPROBS = 20
MAX_N = 128
MAX_PROMPTS = 1024
MAX_STOP = 16
SEED_RANGE = (-(2**63), 2**63 - 2**20)  # torch.Generator.manual_seed's range, room for seed + choice index

_TOK = ByteTokenizer()


class APIError(Exception):
    """An error the client gets as ``status`` + ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def token_string(token_id: int) -> str:
    """How a token is shown in ``logprobs`` (see the module docstring)."""
    if token_id >= OFFSET:
        b = token_id - OFFSET
        return chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"
    return SPECIAL_TOKENS[token_id]


def decode(ids: list[int]) -> str:
    return _TOK.decode(ids)


def encode_text(text: str, add_bos: bool) -> list[int]:
    return _TOK.encode(text, add_bos=add_bos, add_eos=False)


def tokenize(text: str, add_special_tokens: bool) -> list[int]:
    """``/tokenize``: UTF-8 bytes (a BOS first with ``add_special_tokens``). A text that is exactly a special
    token's name (``<s>``, ``</s>``, ...) is that token: clients such as lm-eval ask for the BOS/EOS ids so."""
    if text in SPECIAL_IDS:
        return ([BOS_ID] if add_special_tokens else []) + [SPECIAL_IDS[text]]
    return encode_text(text, add_bos=add_special_tokens)


# --------------------------------------------------------------------------- request


@dataclass
class Prompt:
    """One prompt: its model input (BOS first) and what ``echo`` / ``logprobs`` show of it."""

    ids: list[int]  # what the model reads, BOS first
    shown: int  # how many trailing ids of ``ids`` the client sent (all but an implicit BOS)
    text: str  # the prompt as text (echo)


@dataclass
class CompletionRequest:
    """A validated ``POST /v1/completions`` body. ``generation`` is what each choice is, as
    :func:`torchblt.generate` takes it (``max_tokens`` -> ``max_new_bytes``, ``ignore_eos`` -> not
    ``stop_at_eos``; choice ``i`` is seeded ``seed + i``)."""

    model: str
    prompts: list[Prompt]
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None

    @property
    def n_rows(self) -> int:
        return len(self.prompts) * self.n


# fields of the OpenAI completions API accepted only at their neutral value
_NEUTRAL = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "suffix": ("",),
}
_KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream",
          "stream_options", "echo", "logprobs", "ignore_eos", "user", "best_of", *_NEUTRAL}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _get_int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None,
             nullable: bool = True) -> int | None:
    v = body.get(name)
    if v is None:
        if name in body and not nullable:
            raise invalid(name, f"{name} must be an integer, got null", "invalid_type")
        return default
    if not _is_int(v):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise invalid(name, f"{name} must be an integer, got {v!r}", "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise invalid(name, f"{name} must be {bounds}, got {v}")
    return v


def _get_float(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise invalid(name, f"{name} must be a number, got {v!r}", "invalid_type")
    return float(v)


def _get_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(name, f"{name} must be true or false, got {v!r}", "invalid_type")
    return v


def _prompts(value: Any, max_prompt_bytes: int) -> list[Prompt]:
    if value is None:
        raise invalid("prompt", "prompt is required", "missing")
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(_is_int(t) for t in value):
        items = [value]  # one prompt of token ids
    elif isinstance(value, list) and value:
        items = value
    else:
        raise invalid("prompt", f"prompt must be a string, a list of strings, a list of token ids or a list of "
                      f"lists of token ids, got {_short(value)}", "invalid_type")
    if len(items) > MAX_PROMPTS:
        raise invalid("prompt", f"prompt holds {len(items)} prompts; at most {MAX_PROMPTS} per request")
    out = []
    for i, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids = encode_text(item, add_bos=True)
            prompt = Prompt(ids, len(ids) - 1, decode(ids))
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            bad = next((t for t in item if not 0 <= t < VOCAB_SIZE), None)
            if bad is not None:
                raise invalid(where, f"{where} holds token id {bad}; byte token ids are 0..{VOCAB_SIZE - 1}")
            ids = list(item) if item[0] == BOS_ID else [BOS_ID, *item]
            prompt = Prompt(ids, len(item), decode(ids))
        else:
            raise invalid(where, f"{where} must be a string or a non-empty list of token ids, got {_short(item)}",
                          "invalid_type")
        if prompt.shown > max_prompt_bytes:
            raise invalid(where, f"{where} is {prompt.shown} bytes; this server takes at most {max_prompt_bytes} "
                          "bytes per prompt (--max-prompt-bytes)", "prompt_too_long")
        out.append(prompt)
    return out


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def parse_completion_request(body: Any, *, model_name: str, max_prompt_bytes: int,
                             max_tokens_limit: int) -> CompletionRequest:
    """Validate a decoded JSON body; raises :class:`APIError` (400, or 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_type")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise invalid(unknown[0], f"unrecognized request argument supplied: {unknown[0]}", "unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise invalid("model", f"model must be a string naming the model, got {_short(model)}",
                      "invalid_type" if model is not None else "missing")
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    for name, allowed in _NEUTRAL.items():
        v = body.get(name)
        if v is not None and v not in allowed:
            raise invalid(name, f"{name} is not supported by this server (got {_short(v)}); leave it out",
                          "unsupported_parameter")
    req = CompletionRequest(model=model, prompts=_prompts(body.get("prompt"), max_prompt_bytes))
    gen = req.generation
    gen.max_new_bytes = _get_int(body, "max_tokens", 16, 0, max_tokens_limit)
    gen.temperature = _get_float(body, "temperature", 1.0)
    if gen.temperature < 0:
        raise invalid("temperature", f"temperature must be >= 0, got {gen.temperature:g}")
    gen.top_p = _get_float(body, "top_p", 1.0)
    if not 0.0 < gen.top_p <= 1.0:
        raise invalid("top_p", f"top_p must be in (0, 1], got {gen.top_p:g}")
    top_k = _get_int(body, "top_k", 0, -1)
    gen.top_k = 0 if top_k == -1 else top_k  # -1 = off, as vLLM
    req.n = _get_int(body, "n", 1, 1, MAX_N)
    best_of = _get_int(body, "best_of", None, 1)
    if best_of is not None and best_of != req.n:
        raise invalid("best_of", f"best_of other than n is not supported (got best_of={best_of}, n={req.n})",
                      "unsupported_parameter")
    if req.n_rows > MAX_PROMPTS:
        raise invalid("n", f"{len(req.prompts)} prompts x n={req.n} is {req.n_rows} completions; at most "
                      f"{MAX_PROMPTS} per request")
    gen.seed = _get_int(body, "seed", None, *SEED_RANGE)
    stop = body.get("stop")
    if stop is None:
        gen.stop = []
    elif isinstance(stop, str):
        gen.stop = [stop] if stop else []
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP:
            raise invalid("stop", f"stop holds {len(stop)} strings; at most {MAX_STOP}")
        gen.stop = [s for s in stop if s]
    else:
        raise invalid("stop", f"stop must be a string or a list of strings, got {_short(stop)}", "invalid_type")
    req.stream = _get_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise invalid("stream_options", f'stream_options must be {{"include_usage": bool}}, got {_short(options)}',
                          "invalid_type")
        if not req.stream:
            raise invalid("stream_options", "stream_options is only allowed with stream=true")
        req.include_usage = _get_bool(options, "include_usage")
    req.echo = _get_bool(body, "echo")
    req.logprobs = _get_int(body, "logprobs", None, 0, MAX_LOGPROBS)
    gen.stop_at_eos = not _get_bool(body, "ignore_eos")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", f"user must be a string, got {_short(user)}", "invalid_type")
    return req


# --------------------------------------------------------------------------- responses


@dataclass
class TokenLogprob:
    """One token's entry in ``logprobs``: its log-probability (None: nothing predicted it) and the top ones."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


class LogprobsBuilder:
    """Builds the OpenAI ``logprobs`` object of one choice, piece by piece: each :meth:`build` continues the
    ``text_offset`` (in characters) where the previous one ended."""

    def __init__(self, start_chars: int = 0) -> None:
        import codecs

        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._chars = start_chars

    def build(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            tokens.append(token_string(e.token))
            lps.append(e.logprob)
            tops.append(None if e.top is None else {token_string(t): lp for t, lp in e.top})
            offsets.append(self._chars)
            if e.token >= OFFSET:
                self._chars += len(self._decoder.decode(bytes([e.token - OFFSET])))
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_body(cid: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def chunk_body(cid: str, created: int, model: str, choices: list[dict[str, Any]],
               usage: dict[str, int] | None = None) -> dict:
    out: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": model,
                           "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())
