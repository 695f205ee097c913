"""The HTTP server: a Starlette app over one :class:`~torchblt.serve.scheduler.Scheduler`, run by uvicorn.

Endpoints: ``POST /v1/completions`` (JSON or server-sent events), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text), and vLLM's tokenizer endpoints ``POST /tokenize``, ``POST /detokenize``,
``GET /tokenizer_info`` (lm-eval's ``local-completions`` finds them and tokenizes through them).

The event loop only parses, validates and formats: every torch call happens on the scheduler's thread,
which hands events back with ``loop.call_soon_threadsafe``. A client that disconnects (streaming or not)
cancels its job; its rows leave the batch at the next step. With ``api_key`` every ``/v1/`` request needs
``Authorization: Bearer KEY``. :func:`run` serves until SIGTERM/SIGINT, then stops accepting connections,
lets running requests finish for up to ``drain_timeout`` seconds, cancels the rest and returns 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from torchblt.eval.bpb import default_context
from torchblt.model.blt import BLT
from torchblt.serve.engine import BatchEngine, DecodeEngine
from torchblt.serve.metrics import Metrics
from torchblt.serve.protocol import (
    MAX_PROMPTS,
    SPECIAL_TOKENS,
    APIError,
    CompletionRequest,
    LogprobsBuilder,
    TokenLogprob,
    chunk_body,
    completion_body,
    completion_id,
    decode,
    invalid,
    now,
    parse_completion_request,
    tokenize,
    usage,
)
from torchblt.serve.scheduler import Delta, Event, Failed, Finished, Job, Scheduler, Started
from torchblt.tokenizer import VOCAB_SIZE

log = logging.getLogger("torchblt.serve")


@dataclass
class ServeConfig:
    """Server limits. ``max_prompt_bytes=None``: the model's context less the BOS."""

    model_name: str = "blt"
    max_batch: int = 16
    max_queue: int = 64
    max_prompt_bytes: int | None = None
    max_tokens: int = 4096
    api_key: str | None = None
    drain_timeout: float = 30.0
    prefill_chunk: int = 128  # prompt bytes prefilled between two steps (0: whole prompts at once)
    speculative: int | None = None  # the entropy model drafts up to K bytes per BLT step (max_batch 1 only)
    # prefill joining requests on a thread of their own, beside the steps; None: where it pays
    # (:func:`prefill_thread_pays`: a CPU engine on one torch thread, with another core)
    prefill_thread: bool | None = None
    # run the batched steps compiled (BatchEngine(compile=True): slots at powers of two, caches sized for
    # max_prompt_bytes + max_tokens bytes per row, each batch size compiled before serving); None: on CUDA
    compile: bool | None = None

    def validate(self) -> None:
        for name in ("max_batch", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes must be >= 1, got {self.max_prompt_bytes}")
        if self.speculative is not None and (isinstance(self.speculative, bool) or self.speculative < 0):
            raise ValueError(f"speculative must be >= 0 (drafted bytes per step), got {self.speculative}")
        if self.speculative and self.max_batch != 1:
            raise ValueError(f"speculative decoding runs one request at a time: it needs max_batch 1, got "
                             f"{self.max_batch}")
        if self.compile and self.speculative:
            raise ValueError("compile applies to the batched steps: speculative decoding runs eager (use one of them)")
        if self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0, got {self.prefill_chunk}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")


def prefill_thread_pays(engine: DecodeEngine) -> bool:
    """Does a prefill thread beside the steps pay? On a CPU engine whose steps run on one torch thread, with
    a second core for it (measured on 2 cores: bench/serve.py, docs/serving.md). With more torch threads the
    steps already use the cores, and on a GPU both threads would queue on one device."""
    device = torch.device(getattr(engine, "device", "cpu"))
    return device.type == "cpu" and torch.get_num_threads() == 1 and (os.cpu_count() or 1) >= 2


class _ClientGone(Exception):
    pass


class _EventStream(StreamingResponse):
    """Server-sent events whose job is cancelled however the response ends (client gone included)."""

    def __init__(self, content: AsyncIterator[str], job: Job, on_end: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job, self.on_end = job, on_end

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end(self.job)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class BLTServer:
    """The app (:attr:`app`) and the scheduler behind it. ``engine``: a :class:`DecodeEngine` (default: the
    batching engine on ``model``)."""

    def __init__(self, model: BLT, config: ServeConfig | None = None, engine: DecodeEngine | None = None) -> None:
        self.config = dataclasses.replace(config or ServeConfig())
        self.config.validate()
        c = self.config
        self.context = (int(getattr(engine, "context", 0)) if engine is not None else default_context(model)) or None
        if c.max_prompt_bytes is None:
            c.max_prompt_bytes = max(1, (self.context or 4096) - 1)
        if engine is None:
            if c.compile is None:
                c.compile = not c.speculative and next(model.parameters()).device.type == "cuda"
            engine = BatchEngine(model, compile=c.compile, context=c.max_prompt_bytes + c.max_tokens)
        else:
            c.compile = bool(getattr(engine, "compile", False))
        self.engine = engine
        self.metrics = Metrics()
        if self.config.speculative:
            patcher = getattr(self.engine, "patcher", None)
            if patcher is None or patcher.entropy_model is None:
                raise ValueError("speculative decoding drafts with the entropy model: this model has none (entropy "
                                 "patching with an entropy model is needed)")
        wanted = self.config.prefill_thread
        self.scheduler = Scheduler(self.engine, self.metrics, self.config.max_batch, self.config.max_queue,
                                   self.config.prefill_chunk, self.config.speculative,
                                   prefill_thread_pays(self.engine) if wanted is None else wanted)
        self.config.prefill_thread = self.scheduler.prefill_thread  # as resolved (never with speculative)
        self.created = now()
        # a body bigger than this cannot be a valid request (prompts as JSON token ids, ~6 characters each)
        self.body_limit = 64 * 1024 + MAX_PROMPTS * 8 * self.config.max_prompt_bytes
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", self.model_info, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/detokenize", self.detokenize, methods=["POST"]),
                Route("/tokenizer_info", self.tokenizer_info, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error},
            lifespan=self._lifespan,
        )

    # ------------------------------------------------------------------ lifecycle
    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.scheduler.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.scheduler.stop)

    def warm_up(self) -> list[int]:
        """Compile the engine's step for every batch size the server runs (``compile``; minutes on a CPU) before
        it takes requests, so that no request waits for a compilation. Returns the batch sizes compiled."""
        warm = getattr(self.engine, "warm_up", None)
        return warm(self.config.max_batch) if warm is not None and self.config.compile else []

    def begin_drain(self) -> None:
        """Stop taking requests; the running ones have ``drain_timeout`` seconds, then get a 503 error."""
        self.scheduler.begin_drain(self.config.drain_timeout)

    # ------------------------------------------------------------------ helpers
    def _error(self, endpoint: str, e: APIError) -> JSONResponse:
        self.metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def _ok(self, endpoint: str, body: Any, status: int = 200) -> JSONResponse:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse(body, status_code=status)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return self._error("other", APIError(exc.status_code, message, code="not_found" if exc.status_code == 404
                                             else "method_not_allowed"))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return self._error("other", APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                                             code="internal_error"))

    def _check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            what = "no API key given" if not given else "the API key is wrong"
            raise APIError(401, f"{what}: send 'Authorization: Bearer KEY' (the server was started with --api-key)",
                           type="invalid_request_error", code="invalid_api_key")

    async def _json_body(self, request: Request) -> Any:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.body_limit:
                raise APIError(413, f"the request body is over {self.body_limit} bytes", code="body_too_large")
        if not body:
            raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
        try:
            return json.loads(body)
        except json.JSONDecodeError as e:
            raise APIError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                           code="invalid_json") from None
        except UnicodeDecodeError:
            raise APIError(400, "the request body is not UTF-8 JSON", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None

    # ------------------------------------------------------------------ completions
    async def completions(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            body = await self._json_body(request)
            c = self.config
            req = parse_completion_request(body, model_name=c.model_name, max_prompt_bytes=c.max_prompt_bytes or 0,
                                           max_tokens_limit=c.max_tokens)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[list[Event]] = asyncio.Queue()
            job = Job(req, lambda events: loop.call_soon_threadsafe(queue.put_nowait, events))
            self.scheduler.submit(job)
        except APIError as e:
            return self._error("completions", e)
        if req.stream:
            self.metrics.requests.labels("completions", "200").inc()
            return _EventStream(self._stream(job, queue), job, self._end_job)
        try:
            results = await self._collect(job, queue, request)
        except _ClientGone:
            self.metrics.requests.labels("completions", "499").inc()
            return Response(status_code=499)
        except APIError as e:
            return self._error("completions", e)
        finally:
            self._end_job(job)
        return self._ok("completions", self._completion(job, results))

    def _end_job(self, job: Job) -> None:
        if job.n_finished < job.request.n_rows and not job.failed:
            job.cancel()
            self.scheduler.wake()

    async def _collect(self, job: Job, queue: asyncio.Queue, request: Request) -> dict[int, tuple[Started, Finished]]:
        """Wait for every choice of a non-streaming job; raises :class:`_ClientGone` if the client disconnects."""
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        started: dict[int, Started] = {}
        out: dict[int, tuple[Started, Finished]] = {}
        try:
            while len(out) < job.request.n_rows:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    raise _ClientGone()
                for ev in get.result():
                    if isinstance(ev, Failed):
                        raise ev.error
                    if isinstance(ev, Started):
                        started[ev.index] = ev
                    elif isinstance(ev, Finished):
                        out[ev.index] = (started[ev.index], ev)
                        job.n_finished += 1
        finally:
            disconnect.cancel()
        return out

    def _completion(self, job: Job, results: dict[int, tuple[Started, Finished]]) -> dict[str, Any]:
        req = job.request
        choices = []
        for index in range(req.n_rows):
            started, fin = results[index]
            prompt = req.prompts[index // req.n]
            text = (prompt.text if req.echo else "") + fin.text
            logprobs = None
            if req.logprobs is not None:
                builder = LogprobsBuilder()
                entries: list[TokenLogprob] = (started.prompt_logprobs or []) if req.echo else []
                logprobs = builder.build(entries + (fin.logprobs or []))
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": fin.finish_reason})
        n_gen = sum(fin.n_generated for _, fin in results.values())
        return completion_body(completion_id(), now(), req.model, choices, _usage(req, n_gen))

    async def _stream(self, job: Job, queue: asyncio.Queue) -> AsyncIterator[str]:
        req = job.request
        cid, created = completion_id(), now()
        builders: dict[int, LogprobsBuilder] = {}
        n_generated = 0

        def chunk(index: int, text: str, entries: list[TokenLogprob] | None, finish: str | None = None) -> str:
            lp = None
            if req.logprobs is not None:
                lp = builders.setdefault(index, LogprobsBuilder()).build(entries or [])
            return _sse(chunk_body(cid, created, req.model,
                                   [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]))

        while job.n_finished < req.n_rows:
            for ev in await queue.get():
                if isinstance(ev, Failed):
                    yield _sse(ev.error.body())
                    yield "data: [DONE]\n\n"
                    return
                if isinstance(ev, Started):
                    if req.echo:
                        yield chunk(ev.index, req.prompts[ev.index // req.n].text, ev.prompt_logprobs)
                elif isinstance(ev, Delta):
                    yield chunk(ev.index, ev.text, ev.logprobs)
                elif isinstance(ev, Finished):
                    job.n_finished += 1
                    n_generated += ev.n_generated
                    yield chunk(ev.index, ev.text, ev.logprobs, ev.finish_reason)
        if req.include_usage:
            yield _sse(chunk_body(cid, created, req.model, [], _usage(req, n_generated)))
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ the other endpoints
    def _model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "torchblt",
                "max_model_len": self.context}

    async def models(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except APIError as e:
            return self._error("models", e)
        return self._ok("models", {"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            name = request.path_params["model_id"]
            if name != self.config.model_name:
                raise APIError(404, f"the model {name!r} does not exist; this server serves "
                               f"{self.config.model_name!r}", param="model", code="model_not_found")
        except APIError as e:
            return self._error("models", e)
        return self._ok("models", self._model_card())

    async def health(self, request: Request) -> Response:
        s = self.scheduler
        if not s.alive:
            return self._ok("health", {"status": "stopped"}, 503)
        if s.draining:
            return self._ok("health", {"status": "draining"}, 503)
        return self._ok("health", {"status": "ok"})

    async def metrics_endpoint(self, request: Request) -> Response:
        data, content_type = self.metrics.render()
        return Response(data, media_type=content_type)

    async def tokenize(self, request: Request) -> Response:
        try:
            body = await self._json_body(request)
            if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
                raise invalid("prompt", 'the body must be {"prompt": "text", "add_special_tokens": bool}', "invalid_type")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise invalid("add_special_tokens", f"add_special_tokens must be true or false, got {special!r}",
                              "invalid_type")
            tokens = tokenize(body["prompt"], special)
        except APIError as e:
            return self._error("tokenize", e)
        return self._ok("tokenize", {"count": len(tokens), "max_model_len": self.context, "tokens": tokens})

    async def detokenize(self, request: Request) -> Response:
        try:
            body = await self._json_body(request)
            tokens = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                        and 0 <= t < VOCAB_SIZE for t in tokens):
                raise invalid("tokens", f"tokens must be a list of token ids 0..{VOCAB_SIZE - 1}", "invalid_type")
        except APIError as e:
            return self._error("detokenize", e)
        return self._ok("detokenize", {"prompt": decode(tokens)})

    async def tokenizer_info(self, request: Request) -> Response:
        return self._ok("tokenizer_info", {
            "tokenizer_class": "ByteTokenizer", "vocab_size": VOCAB_SIZE, "byte_offset": 4,
            "bos_token": SPECIAL_TOKENS[1], "eos_token": SPECIAL_TOKENS[2], "pad_token": SPECIAL_TOKENS[0],
            "model_max_length": self.context,
        })


def _usage(req: CompletionRequest, n_generated: int) -> dict[str, int]:
    return usage(sum(p.shown for p in req.prompts), n_generated)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --------------------------------------------------------------------------- running it


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (``port=0``: a free one); ``ValueError`` if that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(server: BLTServer, log_level: str):
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn, but a signal starts our drain and is not raised again after the graceful shutdown
        (uvicorn re-raises it, which would end the process with the signal instead of exit code 0)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            server.begin_drain()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(server.app, log_level=log_level, lifespan="on",
                            # a backstop: the scheduler ends every request by drain_timeout (begin_drain)
                            timeout_graceful_shutdown=round(server.config.drain_timeout) + 5)
    return _Server(config)


def run(server: BLTServer, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after the drain. Bind errors raise ``ValueError``."""
    sock = bind(host, port)
    bound = sock.getsockname()
    shown = bound[0] if ":" not in bound[0] else f"[{bound[0]}]"
    c = server.config
    if c.compile:
        print(f"blt serve: compiling the decoding step for batch sizes up to {c.max_batch} (minutes on a CPU) ...",
              file=sys.stderr, flush=True)
        t = time.perf_counter()
        sizes = server.warm_up()
        row = getattr(server.engine, "row_cache_bytes", 0)
        print(f"blt serve: compiled batch sizes {', '.join(map(str, sizes))} in {time.perf_counter() - t:.0f} s; "
              f"caches of {row / 2**20:.0f} MiB per row (sized for {c.max_prompt_bytes} + {c.max_tokens} bytes: "
              f"--max-prompt-bytes and --max-tokens bound them)", file=sys.stderr, flush=True)
    print(f"blt serve: model {c.model_name!r} on http://{shown}:{bound[1]}/v1 (max batch {c.max_batch}, "
          f"max queue {c.max_queue}, prompts up to {c.max_prompt_bytes} bytes, prefill thread "
          f"{'on' if server.scheduler.prefill_thread else 'off'}, compiled step {'on' if c.compile else 'off'})",
          file=sys.stderr, flush=True)
    _uvicorn_server(server, log_level).run(sockets=[sock])
    return 0


class ThreadedServer:
    """``with ThreadedServer(server) as url:`` serves on 127.0.0.1 and a free port from a background thread
    (for tests, benchmarks and notebooks); leaving the block shuts it down."""

    def __init__(self, server: BLTServer, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.server = server
        self._sock = bind(host, port)
        self._uv = _uvicorn_server(server, log_level)
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [self._sock]}, name="blt-http",
                                        daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.scheduler.begin_drain()
        self.server.scheduler.abort()  # leaving the block ends what still runs (503), then the server
        self._uv.should_exit = True
        self._thread.join(60)
        self._sock.close()
