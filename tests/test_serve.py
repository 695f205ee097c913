"""``blt serve``: the OpenAI-compatible server, end to end over HTTP on 127.0.0.1 and a free port.

A tiny entropy-patched BLT is built, saved and loaded back (as ``blt serve`` loads it). Every output is
checked against the same request run alone through :func:`torchblt.generate` (greedy and seeded
sampling), log-probabilities against a direct forward, lm-eval's ``local-completions`` against its ``blt``
model; then the faults: bad input, full queue, missing key, disconnects, failing rows, SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tests.helpers.generation import eager_compiled_parts  # noqa: E402
from torchblt import generate, load_model, save_model  # noqa: E402
from torchblt.formats.common import build_model  # noqa: E402
from torchblt.model.config import tiny_blt, tiny_entropy  # noqa: E402
from torchblt.patching import Patcher, split_first_patch  # noqa: E402
from torchblt.serve import BatchEngine, BLTServer, ServeConfig, ThreadedServer  # noqa: E402
from torchblt.tokenizer import ByteTokenizer  # noqa: E402

TOK = ByteTokenizer()
TEXT = "The quick brown fox jumps over the lazy dog. Zürich 日本 🙂 def f(x): return x * 2"
NAME = "tiny-blt"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny BLT with entropy patching (threshold at the median entropy of TEXT) and its entropy model."""
    torch.manual_seed(0)
    em_cfg = tiny_entropy()
    em_cfg.transformer.window = 16
    em = build_model(em_cfg, device="cpu")
    em.init_weights()
    em.output.weight.data *= 6
    cfg = tiny_blt()
    cfg.encoder.window = cfg.decoder.window = 12
    cfg.patching.threshold = float(em.entropies(torch.tensor([TOK.encode(TEXT, add_eos=False)])).median())
    model = build_model(cfg, device="cpu")
    model.init_weights()
    model.local_decoder.output.weight.data *= 4  # sharp distributions: greedy bytes are not near-ties
    folder = tmp_path_factory.mktemp("serve") / "tiny-blt"
    save_model(model, folder)
    save_model(em, folder / "entropy_model")
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    m = load_model(model_dir)
    assert Patcher.for_model(m).mode == "entropy" and Patcher.for_model(m).entropy_model is not None
    return m


@pytest.fixture(scope="module")
def server(model):
    # prompts prefilled on the prefill thread, as blt serve runs on a 2-core CPU (the scheduler-thread
    # prefill has its own tests below)
    srv = BLTServer(model, ServeConfig(model_name=NAME, max_batch=16, max_queue=64, max_prompt_bytes=200,
                                       prefill_thread=True))
    with ThreadedServer(srv) as url:
        yield srv, url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def alone(model, prompt, max_tokens, **kw) -> str:
    """The same request run alone through torchblt.generate."""
    return generate(model, prompt, max_new_bytes=max_tokens, **kw)[0]


def post(url: str, body, path: str = "/v1/completions", headers: dict | None = None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def get(url: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + path, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def error_of(status_body: tuple) -> dict:
    body = json.loads(status_body[2])
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def metric(url: str, name: str) -> float:
    text = get(url, "/metrics")[1]
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def metric_value(metrics, name: str) -> float:
    """A sample of a server's Metrics, read from its own registry."""
    text = metrics.render()[0].decode()
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --------------------------------------------------------------------------- the OpenAI client


def test_openai_client_completions_n_stop_seed(server, client, model):
    _, url = server
    prompt = "The quick brown fox"
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert out.choices[0].text == alone(model, prompt, 24)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == len(prompt.encode()) and out.usage.completion_tokens <= 24

    # a list of prompts: each choice is its prompt's single run
    prompts = ["Hello", "Zürich 日本", ""]
    out = client.completions.create(model=NAME, prompt=prompts, max_tokens=16, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [alone(model, p, 16) for p in prompts]

    # n samples with a seed: choice i is seeded seed + i, as torchblt.generate seeds row i
    kw = dict(temperature=0.9, top_p=0.95, seed=1234)
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, n=3, **kw)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == generate(model, [prompt] * 3, max_new_bytes=20, **kw)
    assert len(set(texts)) > 1  # the choices really are different samples
    again = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, n=3, **kw)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts  # reproducible
    other = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, n=3, **{**kw, "seed": 99})
    assert [c.text for c in sorted(other.choices, key=lambda c: c.index)] != texts
    # top_k (an extension field) and temperature together
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=1.3, seed=5,
                                    extra_body={"top_k": 7})
    assert out.choices[0].text == alone(model, prompt, 20, temperature=1.3, top_k=7, seed=5)

    # stop strings: cut before the stop, finish_reason "stop"
    full = alone(model, prompt, 40, stop_at_eos=False)
    stop = full[5:7]
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "zzz"],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == alone(model, prompt, 40, stop=[stop, "zzz"], stop_at_eos=False)
    assert stop not in out.choices[0].text and out.choices[0].finish_reason == "stop"


def test_streaming_chunks_utf8_and_done(server, client, model):
    _, url = server
    # sampled at a high temperature the random model writes multi-byte characters too
    kw = dict(max_tokens=120, temperature=1.5, seed=3)
    prompt = "Zürich 日本"
    expected = alone(model, prompt, 120, temperature=1.5, seed=3)
    assert any(ord(ch) > 127 for ch in expected)
    stream = client.completions.create(model=NAME, prompt=prompt, stream=True, stream_options={"include_usage": True},
                                       **kw)
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(pieces) == expected and finish in ("stop", "length")
    assert usage is not None and usage.prompt_tokens == len(prompt.encode())
    assert len([p for p in pieces if p]) > 10  # streamed piece by piece, not in one go

    # the raw stream: OpenAI chunks as server-sent events, "data: [DONE]" last, every chunk whole UTF-8 JSON
    status, headers, text = post(url, {"model": NAME, "prompt": prompt, "stream": True, **kw})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == NAME for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert "\ufffd" not in text


def test_echo_logprobs_are_the_models(server, client, model):
    """echo + logprobs: per-byte log-probabilities of the prompt (given the BOS and the bytes before) and of
    the generated bytes, from the model's own distribution."""
    prompt = "Hello wörld"
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    choice = out.choices[0]
    generated = alone(model, prompt, 3)
    assert choice.text == prompt + generated
    lp = choice.logprobs
    n_prompt = len(prompt.encode())
    assert len(lp.tokens) == n_prompt + 3
    assert lp.tokens[:7] == list("Hello w") and lp.tokens[7:9] == ["bytes:\\xc3", "bytes:\\xb6"]  # ö: 2 bytes
    assert lp.text_offset[:10] == [0, 1, 2, 3, 4, 5, 6, 7, 7, 8]
    # the prompt's log-probabilities equal one direct forward over [BOS] + prompt
    ids = TOK.encode(prompt, add_bos=True, add_eos=False)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        lengths = split_first_patch(Patcher.for_model(model).patch(tokens, include_next_token=True)[0])
        logp = F.log_softmax(model(tokens, lengths)[0].float(), -1)
    for i in range(n_prompt):
        assert lp.token_logprobs[i] == pytest.approx(float(logp[i, ids[i + 1]]), abs=1e-4)
        top = torch.topk(logp[i], 2)
        assert list(lp.top_logprobs[i].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    # generated bytes: their log-probabilities are the greedy maxima
    for i in range(n_prompt, n_prompt + 3):
        assert lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()), abs=1e-6)
    # max_tokens=0 with echo scores the prompt only; token-id prompts are read as given (BOS in front)
    out = client.completions.create(model=NAME, prompt=[ids[1:]], max_tokens=0, echo=True, logprobs=0)
    assert out.choices[0].text == prompt and out.usage.completion_tokens == 0
    assert out.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:n_prompt], abs=1e-5)
    out = client.completions.create(model=NAME, prompt=[ids], max_tokens=0, echo=True, logprobs=0)
    assert out.choices[0].logprobs.tokens[0] == "<s>" and out.choices[0].logprobs.token_logprobs[0] is None


def test_lm_eval_local_completions_equals_blt_model(server, model, tmp_path, monkeypatch):
    """lm-eval's local-completions against the server (log-likelihoods through echo + logprobs, the remote
    tokenizer endpoints, generation) scores exactly as lm-eval's blt model on the same model."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from tests.helpers.harness import GEN_PROMPTS, write_tasks
    from torchblt.eval.harness import BLTLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tasks(tmp_path, [generate(model, GEN_PROMPTS[0], max_new_bytes=12, stop=["\n", "."])[0], "x"])
    tasks = ["tiny_mc", "tiny_gen", "tiny_roll"]

    def run(lm):
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, bootstrap_iters=0, log_samples=True,
                                       task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))

    ours = run(BLTLM(model=model, batch_size=4))
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    remote = LocalCompletionsAPI(base_url=server[1] + "/v1/completions", model=NAME, max_retries=1)
    assert remote.tokenizer_backend == "remote"  # found /tokenizer_info and /tokenize
    theirs = run(remote)
    for task in tasks:
        for metric_name, value in ours["results"][task].items():
            if metric_name != "alias" and isinstance(value, float):
                assert theirs["results"][task][metric_name] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, metric_name)
    for a, b in zip(ours["samples"]["tiny_mc"], theirs["samples"]["tiny_mc"]):
        for (lp, greedy), (lp2, greedy2) in zip([r[0] for r in a["resps"]], [r[0] for r in b["resps"]]):
            assert lp2 == pytest.approx(lp, abs=1e-4) and greedy2 == greedy
    assert [s["resps"] for s in theirs["samples"]["tiny_gen"]] == [s["resps"] for s in ours["samples"]["tiny_gen"]]
    assert theirs["results"]["tiny_gen"]["exact_match,none"] == 0.5


def test_sixteen_staggered_clients_each_equal_their_single_run(server, model):
    _sixteen_staggered_clients(*server, model)


def test_sixteen_staggered_clients_prefilled_between_steps(model):
    """The same with the prompts prefilled by the scheduler's thread between two steps (--prefill-thread off)."""
    srv = BLTServer(model, ServeConfig(model_name=NAME, max_batch=16, max_queue=64, max_prompt_bytes=200,
                                       prefill_thread=False))
    assert not srv.scheduler.prefill_thread
    with ThreadedServer(srv) as url:
        _sixteen_staggered_clients(srv, url, model)


def _sixteen_staggered_clients(srv, url, model):
    rng = torch.Generator().manual_seed(0)
    jobs = []
    for i in range(16):
        start = int(torch.randint(0, len(TEXT) - 12, (1,), generator=rng))
        prompt = TEXT[start : start + 4 + i % 9]
        kw: dict = {"max_tokens": 10 + 3 * (i % 7)}
        if i % 3 == 1:
            kw.update(temperature=0.8 + 0.1 * (i % 4), seed=100 + i, top_p=0.9)
        elif i % 3 == 2:
            kw.update(temperature=1.1, seed=7, top_k=5)
        else:
            kw.update(temperature=0.0)
        if i % 4 == 3:
            kw["stop"] = [" ", "e"]
        jobs.append((prompt, kw, i % 5 == 0))
    expected = []
    for prompt, kw, _ in jobs:
        gen_kw = {k: v for k, v in kw.items() if k != "max_tokens"}
        expected.append(alone(model, prompt, kw["max_tokens"], **gen_kw))

    results: dict[int, str] = {}
    errors: list[BaseException] = []
    before_peak = srv.scheduler.max_rows

    def client_thread(i: int) -> None:
        try:
            time.sleep(0.015 * i)  # staggered arrivals: rows join a running batch
            prompt, kw, streaming = jobs[i]
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            extra = {"top_k": kw.pop("top_k")} if "top_k" in kw else None
            if streaming:
                stream = c.completions.create(model=NAME, prompt=prompt, stream=True, extra_body=extra, **kw)
                results[i] = "".join(ch.choices[0].text for ch in stream if ch.choices)
            else:
                results[i] = c.completions.create(model=NAME, prompt=prompt, extra_body=extra, **kw).choices[0].text
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(results) == list(range(16))  # none lost
    for i in range(16):
        assert results[i] == expected[i], f"client {i}: {jobs[i]}"
    assert srv.scheduler.max_rows > 1 or before_peak > 1  # rows really ran side by side
    wait_until(lambda: srv.engine.n_rows == 0)


def _solo_greedy(model, prompt: list[int], n_new: int) -> list[tuple[int, torch.Tensor]]:
    return _drive(BatchEngine(model), [prompt], [n_new], {0: [0]})[0]


def _drive(engine, prompts, n_new: list[int], joins: dict[int, list[int]], on_step=None) -> list[list]:
    """Greedy decoding through ``engine``: rows ``joins[step]`` join before ``step``, each leaves after its
    ``n_new`` bytes; ``on_step(step, live)`` before every engine step. Per row: ``[(byte, logits), ...]``."""
    got: list[list] = [[] for _ in prompts]
    live: list[int] = []
    logits = None
    for step in range(max(n_new) + max(joins) + 1):
        if step in joins:
            new = engine.join([prompts[r] for r in joins[step]], [n_new[r] for r in joins[step]])
            logits = new if logits is None else torch.cat([logits, new])
            live += joins[step]
        nxt = logits.argmax(-1)
        for i, r in enumerate(live):
            got[r].append((int(nxt[i]), logits[i]))
        done = [i for i, r in enumerate(live) if len(got[r]) == n_new[r]]
        if done:
            engine.leave(done)
            keep = [i for i in range(len(live)) if i not in done]
            live, nxt = [live[i] for i in keep], nxt[keep]
        if not live:
            break
        if on_step is not None:
            on_step(step, live)
        logits = engine.step(nxt).logits
    assert engine.n_rows == 0 and engine.cache_bytes() == 0
    return got


def _assert_solo(got: list[list], solo: list[list]) -> None:
    for r in range(len(solo)):
        assert [t for t, _ in got[r]] == [t for t, _ in solo[r]], f"row {r}"
        torch.testing.assert_close(torch.stack([lg for _, lg in got[r]]), torch.stack([lg for _, lg in solo[r]]),
                                   atol=1e-4, rtol=0)


def test_a_row_joining_a_running_batch_gets_its_solo_output(model):
    """Continuous batching in the engine: rows join a batch that is already decoding (one batch, not one
    per arrival) and leave it, and every row's greedy bytes and logits are those it gets alone."""
    engine = BatchEngine(model)
    prompts = [TOK.encode(t, add_eos=False) for t in (TEXT[:30], "Hi", TEXT[40:60])]
    solo = [_solo_greedy(model, p, 24) for p in prompts]

    def check(step, live):
        assert engine.n_batches == 1 and engine.n_rows == len(live)

    _assert_solo(_drive(engine, prompts, [24] * 3, {0: [0], 5: [1, 2]}, check), solo)


def test_rows_reuse_free_slots_without_copying_and_keep_their_solo_output(model):
    """A row that leaves frees its slot (no copy of the batch); a joining row is written into it; free
    slots are dropped (one select) after ``hold_steps``. Every row's greedy bytes and logits stay its solo run's."""
    engine = BatchEngine(model, hold_steps=4)
    # row 3 asks for more bytes than the others: its slot's caches are larger, so the batch's grow to them
    texts, n_new = [TEXT[:30], "Hi", TEXT[40:60], TEXT[5:25]], [3, 12, 5, 70]
    prompts = [TOK.encode(t, add_eos=False) for t in texts]
    solo = [_solo_greedy(model, p, n) for p, n in zip(prompts, n_new)]
    seen, capacity = [], {}
    got = _drive(engine, prompts, n_new, {0: [0, 1, 2], 4: [3]},
                 lambda step, live: (seen.append((step, engine.n_rows, engine.n_slots, engine.compactions)),
                                     capacity.setdefault(step, engine.state.global_.capacity)))
    # step 2: row 0 left (3 bytes), its slot held; step 4: row 2 left and row 3 took a free slot: still 3 slots
    assert (2, 2, 3, 0) in seen and (4, 2, 3, 0) in seen, seen
    assert capacity[4] > capacity[3], capacity
    assert any(c > 0 and n == s for _, n, s, c in seen), seen  # compacted once a slot was held 4 steps
    _assert_solo(got, solo)


def test_a_row_in_a_reused_slot_before_the_running_rows_gets_its_own_bytes(model):
    """A joining row takes the slot of a row that left, ahead of a running row: the batch's order (running
    row, newcomer) is no longer the slots' order (newcomer in slot 0) although no slot is free. Each row's
    bytes go to its own slot and its logits come back in the batch's order (a step once fed them by slot)."""
    engine = BatchEngine(model)
    prompts = [TOK.encode(t, add_eos=False) for t in (TEXT[:30], "Hi", TEXT[40:60])]
    n_new = [3, 20, 16]
    solo = [_solo_greedy(model, p, n) for p, n in zip(prompts, n_new)]
    seen = []
    got = _drive(engine, prompts, n_new, {0: [0, 1], 4: [2]},
                 lambda step, live: seen.append((step, list(engine.live), len(engine.free))))
    assert (4, [1, 0], 0) in seen, seen  # the newcomer sits in slot 0, behind the running row, no slot free
    _assert_solo(got, solo)


def _drive_compiled(engine, prompts, n_new, joins):
    """:func:`_drive`, recording per step the slots, live rows and the rings' capacities."""
    seen = []
    got = _drive(engine, prompts, n_new, joins, lambda step, live: seen.append(
        (engine.n_slots, engine.n_rows, tuple(r.capacity for r in engine.state.rings()))))
    return got, seen


def test_compiled_batch_engine_keeps_its_shapes_as_rows_join_and_leave(model, monkeypatch):
    """``BatchEngine(compile=True)``: slots stay a power of two (free slots pad the batch, compaction keeps
    the smallest power that holds the rows), every row's caches have one capacity whatever its prompt and
    length, so the compiled step sees one shape per batch size; every row's bytes and logits are its solo run's."""
    eager_compiled_parts(monkeypatch)
    engine = BatchEngine(model, hold_steps=3, compile=True, context=160)
    texts, n_new = [TEXT[:30], "Hi", TEXT[40:60], TEXT[5:25], "Zürich"], [3, 30, 9, 40, 12]
    prompts = [TOK.encode(t, add_eos=False) for t in texts]
    solo = [_solo_greedy(model, p, n) for p, n in zip(prompts, n_new)]
    got, seen = _drive_compiled(engine, prompts, n_new, {0: [0, 1, 2], 4: [3], 6: [4]})
    _assert_solo(got, solo)
    assert all(slots & (slots - 1) == 0 and slots >= rows for slots, rows, _ in seen), seen
    assert {slots for slots, _, _ in seen} == {1, 2, 4}, seen  # 3 rows run as 4; the last one alone as 1
    assert len({caps for _, _, caps in seen}) == 1, seen  # one capacity per ring for every batch
    shapes = engine.engine._compiled_shapes
    assert {s[0] for s in shapes} == {(1, 1), (2, 1), (4, 1)} and len(shapes) == 3, shapes
    # a row that outgrows the context still decodes exactly (its caches grow: a new shape)
    engine = BatchEngine(model, compile=True, context=16)
    long = [TOK.encode(TEXT[:40], add_eos=False)]
    _assert_solo(_drive(engine, long, [30], {0: [0]}), [_solo_greedy(model, long[0], 30)])


def test_compiled_batch_engine_warm_up_compiles_each_batch_size_once(model, monkeypatch):
    eager_compiled_parts(monkeypatch)
    engine = BatchEngine(model, compile=True, context=160)
    assert engine.warm_up(5) == [1, 2, 4, 8]
    before = set(engine.engine._compiled_shapes)
    assert {s[0] for s in before} == {(1, 1), (2, 1), (4, 1), (8, 1)}, before
    prompts = [TOK.encode(t, add_eos=False) for t in (TEXT[:30], "Hi", TEXT[40:60])]
    _drive(engine, prompts, [10, 14, 6], {0: [0, 1], 3: [2]})
    assert engine.engine._compiled_shapes == before  # serving met no shape the warm-up did not compile
    assert BatchEngine(model).warm_up(4) == []  # eager: nothing to compile


def test_compiled_caches_that_cannot_fit_are_refused_with_the_fix():
    from torchblt.serve.engine import check_cache_memory

    check_cache_memory(100 << 20, 16, 4 << 30, 8192)  # 3.1 GiB of 4: fits
    with pytest.raises(ValueError, match=r"8192 bytes \(100 MiB per row\): 16 slots need ~3.1 GiB, 2.0 GiB are "
                                         r"free; lower --max-prompt-bytes / --max-tokens / --max-batch"):
        check_cache_memory(100 << 20, 16, 2 << 30, 8192)


def test_server_compiles_on_cuda_only_by_default(model):
    srv = BLTServer(model, ServeConfig(model_name=NAME, max_prompt_bytes=100, max_tokens=50))
    assert srv.config.compile is False and srv.engine.compile is False and srv.warm_up() == []
    srv = BLTServer(model, ServeConfig(model_name=NAME, max_prompt_bytes=100, max_tokens=50, compile=True))
    assert srv.engine.compile and srv.engine.compile_context == 150
    with pytest.raises(ValueError, match="compile applies to the batched steps"):
        BLTServer(model, ServeConfig(model_name=NAME, max_batch=1, speculative=2, compile=True))


@pytest.mark.slow
def test_compiled_serving_equals_solo_runs_after_warm_up(model):
    """The real compile (inductor): warm-up compiles batch sizes 1, 2 and 4; rows joining and leaving then
    decode their solo bytes (logits within float rounding) with no further compilation."""
    from torch._dynamo.utils import counters

    engine = BatchEngine(model, hold_steps=3, compile=True, context=160)
    assert engine.warm_up(4) == [1, 2, 4]
    before, graphs = set(engine.engine._compiled_shapes), counters["stats"]["unique_graphs"]
    texts, n_new = [TEXT[:30], "Hi", TEXT[40:60]], [3, 20, 9]
    prompts = [TOK.encode(t, add_eos=False) for t in texts]
    solo = [_solo_greedy(model, p, n) for p, n in zip(prompts, n_new)]
    # the bytes come from outside inference mode, as the scheduler's sampling makes them
    got, _ = _drive_compiled(engine, prompts, n_new, {0: [0, 1], 4: [2]})
    _assert_solo(got, solo)
    assert engine.engine._compiled_shapes == before
    assert counters["stats"]["unique_graphs"] == graphs  # nor did dynamo recompile (a guard on strides, tensor kinds)


class _LoggingEngine(BatchEngine):
    """Logs the engine's calls: ("prefill", prompt bytes done, rows decoding) and ("step", rows)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[tuple] = []

    def prefill(self, pending, n_bytes):
        before = pending.done_bytes
        super().prefill(pending, n_bytes)
        self.log.append(("prefill", len(pending.ids), pending.done_bytes - before, self.n_rows))

    def step(self, next_ids):
        self.log.append(("step", self.n_rows))
        return super().step(next_ids)


def test_a_long_prompt_joins_a_running_batch_chunk_by_chunk(model):
    """A prompt longer than the prefill chunk is prefilled one chunk per tick while the running row keeps
    decoding (never more than one chunk between two of its bytes), then joins; both outputs equal their solo runs."""
    from torchblt.serve.metrics import Metrics
    from torchblt.serve.protocol import parse_completion_request
    from torchblt.serve.scheduler import Finished, Job, Scheduler

    engine = _LoggingEngine(model)
    sched = Scheduler(engine, Metrics(), max_batch=4, prefill_chunk=16)
    long_text = (TEXT * 3)[:170]
    requests = {"running": {"prompt": "Hello", "max_tokens": 120, "temperature": 0},
                "long": {"prompt": long_text, "max_tokens": 20, "temperature": 0.9, "seed": 3},
                "short": {"prompt": "Hi", "max_tokens": 10, "temperature": 0}}
    got: dict[str, list] = {k: [] for k in requests}
    jobs = {k: Job(parse_completion_request({"model": NAME, **body}, model_name=NAME, max_prompt_bytes=1000,
                                            max_tokens_limit=200), got[k].extend) for k, body in requests.items()}
    sched.start()
    try:
        sched.submit(jobs["running"])
        wait_until(lambda: engine.n_rows == 1)
        sched.submit(jobs["long"])
        sched.submit(jobs["short"])
        wait_until(lambda: all(any(isinstance(e, Finished) for e in evs) for evs in got.values()), 60)
    finally:
        sched.stop()
    n_long = len(TOK.encode(long_text, add_eos=False))
    long_calls = [e for e in engine.log if e[0] == "prefill" and e[1] == n_long]
    assert len(long_calls) == -(-n_long // 16) and all(e[2] <= 16 and e[3] >= 1 for e in long_calls)
    between = 0  # prompt bytes prefilled between two steps
    for e in engine.log:
        between = 0 if e[0] == "step" else between + e[2]
        assert between <= 16, engine.log
    assert all(b <= 16 for b in sched.prefill_calls)
    for k, body in requests.items():
        kw = {key: body[key] for key in ("temperature", "seed") if key in body}
        text = [e.text for e in got[k] if isinstance(e, Finished)]
        assert text == [alone(model, body["prompt"], body["max_tokens"], **kw)], k


@pytest.mark.parametrize("prefill_thread", [False, True])
def test_the_choices_of_one_prompt_share_one_prefill(model, prefill_thread):
    from torchblt.serve.metrics import Metrics
    from torchblt.serve.protocol import parse_completion_request
    from torchblt.serve.scheduler import Finished, Job, Scheduler

    engine = _LoggingEngine(model)
    sched = Scheduler(engine, Metrics(), max_batch=8, prefill_chunk=0, prefill_thread=prefill_thread)
    body = {"model": NAME, "prompt": ["Hello there", "Zürich"], "n": 3, "max_tokens": 12, "temperature": 0.9,
            "seed": 11}
    got: list = []
    job = Job(parse_completion_request(body, model_name=NAME, max_prompt_bytes=100, max_tokens_limit=100), got.extend)
    sched.start()
    try:
        sched.submit(job)
        wait_until(lambda: sum(isinstance(e, Finished) for e in got) == 6)
    finally:
        sched.stop()
    assert [e[0] for e in engine.log].count("prefill") == 2  # one per prompt, not per choice
    texts = [e.text for e in sorted((e for e in got if isinstance(e, Finished)), key=lambda e: e.index)]
    assert texts == generate(model, ["Hello there"] * 3 + ["Zürich"] * 3, max_new_bytes=12, temperature=0.9,
                             seed=11)


class _SlowPrefillEngine(_LoggingEngine):
    """Each prefill call takes ``delay`` seconds more and is logged with its thread and its time span."""

    def __init__(self, *args, delay: float = 0.05, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay, self.spans, self.step_times = delay, [], []

    def prefill(self, pending, n_bytes):
        t = time.perf_counter()
        time.sleep(self.delay)
        super().prefill(pending, n_bytes)
        self.spans.append((threading.current_thread().name, t, time.perf_counter()))

    def step(self, next_ids):
        self.step_times.append(time.perf_counter())
        return super().step(next_ids)


def _job(body: dict, sink):
    from torchblt.serve.protocol import parse_completion_request
    from torchblt.serve.scheduler import Job

    return Job(parse_completion_request({"model": NAME, **body}, model_name=NAME, max_prompt_bytes=1000,
                                        max_tokens_limit=400), sink)


def test_the_prefill_thread_prefills_while_the_running_rows_step(model):
    """With the prefill thread a long prompt's chunks run beside the running row's steps (steps happen while
    a chunk is being prefilled, on the other thread); both outputs equal their solo runs."""
    from torchblt.serve.metrics import Metrics
    from torchblt.serve.scheduler import Finished, Scheduler

    engine = _SlowPrefillEngine(model, delay=0.04)
    metrics = Metrics()
    sched = Scheduler(engine, metrics, max_batch=4, prefill_chunk=16, prefill_thread=True)
    long_text = (TEXT * 3)[:170]
    requests = {"running": {"prompt": "Hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True},
                "long": {"prompt": long_text, "max_tokens": 20, "temperature": 0.9, "seed": 3}}
    got: dict[str, list] = {k: [] for k in requests}
    sched.start()
    try:
        sched.submit(_job(requests["running"], got["running"].extend))
        wait_until(lambda: engine.n_rows == 1)
        sched.submit(_job(requests["long"], got["long"].extend))
        wait_until(lambda: all(any(isinstance(e, Finished) for e in evs) for evs in got.values()), 60)
    finally:
        sched.stop()
    long_spans = [(a, b) for name, a, b in engine.spans[1:]]  # the first prefill is the running row's
    n_chunks = -(-len(TOK.encode(long_text, add_eos=False)) // 16)
    assert len(long_spans) == n_chunks and {name for name, _, _ in engine.spans} == {"blt-prefill"}
    inside = sum(any(a < t < b for a, b in long_spans) for t in engine.step_times)
    assert inside >= 5, (inside, len(engine.step_times))  # the row kept decoding during the prefill
    assert metric_value(metrics, "blt_prefill_thread_seconds_total") >= n_chunks * 0.04
    for k, body in requests.items():
        kw = {key: body[key] for key in ("temperature", "seed") if key in body}
        if body.get("ignore_eos"):
            kw["stop_at_eos"] = False
        text = [e.text for e in got[k] if isinstance(e, Finished)]
        assert text == [alone(model, body["prompt"], body["max_tokens"], **kw)], k


def test_a_cancelled_request_stops_its_prefill_on_the_thread_and_nothing_spins(model):
    """A request cancelled while the prefill thread works on it: its prefill stops at the end of a chunk, it
    never joins, and while only prefills run the scheduler's thread waits instead of ticking."""
    from torchblt.serve.metrics import Metrics
    from torchblt.serve.scheduler import Finished, Scheduler

    engine = _SlowPrefillEngine(model, delay=0.1)
    sched = Scheduler(engine, Metrics(), max_batch=4, prefill_chunk=8, prefill_thread=True)
    got: list = []
    sched.start()
    try:
        job = _job({"prompt": TEXT[:80], "max_tokens": 10, "temperature": 0}, got.extend)
        sched.submit(job)
        time.sleep(0.35)  # about three of its ten chunks
        ticks = sched.ticks
        job.cancel()
        time.sleep(0.3)
        assert ticks <= 3 and len(engine.spans) <= 6, (ticks, len(engine.spans))
        assert engine.n_rows == 0 and not any(e[0] == "step" for e in engine.log)
        wait_until(lambda: not sched._handed and not sched._prefilling)
        after: list = []
        sched.submit(_job({"prompt": "Hi", "max_tokens": 6, "temperature": 0}, after.extend))
        wait_until(lambda: any(isinstance(e, Finished) for e in after))
    finally:
        sched.stop()
    assert [e.text for e in after if isinstance(e, Finished)] == [alone(model, "Hi", 6)]


class _SlowScoringEngine(_SlowPrefillEngine):
    """Scoring takes ``score_delay`` seconds more (logged with its thread and span); prompts holding "BAD"
    fail to score."""

    def __init__(self, *args, score_delay: float = 0.3, **kwargs):
        super().__init__(*args, delay=0.0, **kwargs)
        self.score_delay, self.score_spans = score_delay, []

    def score(self, sequences, top):
        t = time.perf_counter()
        time.sleep(self.score_delay)
        if any("BAD" in TOK.decode(ids) for ids in sequences):
            raise RuntimeError("scoring exploded")
        out = super().score(sequences, top)
        self.score_spans.append((threading.current_thread().name, t, time.perf_counter()))
        return out


def test_echo_logprobs_prompts_are_scored_on_the_prefill_thread(model):
    """With the prefill thread an ``echo`` + ``logprobs`` prompt is scored there while the running row steps;
    its rows are held meanwhile; its entries equal those scored in the scheduler's thread; a prompt that fails
    to score fails its request alone, and a request cancelled while scored never starts."""
    from torchblt.serve.metrics import Metrics
    from torchblt.serve.scheduler import Failed, Finished, Scheduler, Started, prompt_logprobs

    engine = _SlowScoringEngine(model, score_delay=0.3)
    sched = Scheduler(engine, Metrics(), max_batch=4, prefill_thread=True)
    scored_body = {"prompt": TEXT[:40], "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 2}
    got: dict[str, list] = {"running": [], "scored": [], "bad": [], "gone": []}
    sched.start()
    try:
        sched.submit(_job({"prompt": "Hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True},
                          got["running"].extend))
        wait_until(lambda: engine.n_rows == 1)
        scored = _job(scored_body, got["scored"].extend)
        sched.submit(scored)
        wait_until(lambda: sched._scoring)
        assert sched._free_rows() == 2  # the running row and the scored one's row
        bad = _job({**scored_body, "prompt": "BAD prompt"}, got["bad"].extend)
        gone = _job({**scored_body, "prompt": "gone soon"}, got["gone"].extend)
        sched.submit(bad)
        sched.submit(gone)
        wait_until(lambda: len(sched._scoring) == 3)
        gone.cancel()
        wait_until(lambda: any(isinstance(e, Finished) for e in got["scored"]) and got["bad"], 30)
        wait_until(lambda: not sched._scoring and any(isinstance(e, Finished) for e in got["running"]), 30)
    finally:
        sched.stop()
    assert {name for name, _, _ in engine.score_spans} == {"blt-prefill"}
    name, a, b = engine.score_spans[0]
    assert sum(a < t < b for t in engine.step_times) >= 3  # the running row kept decoding while it was scored
    started = [e for e in got["scored"] if isinstance(e, Started)]
    assert started[0].prompt_logprobs == prompt_logprobs(BatchEngine(model), scored.request, [0])[0]
    assert [e.text for e in got["scored"] if isinstance(e, Finished)] == [alone(model, TEXT[:40], 5)]
    assert isinstance(got["bad"][-1], Failed) and "scoring exploded" in got["bad"][-1].error.message
    assert got["gone"] == []  # cancelled while scored: never started


def test_a_job_admitted_in_parts_scores_its_prompt_once_on_the_prefill_thread(model):
    """``n=2`` choices of one ``echo`` + ``logprobs`` prompt while a running request holds one of 2 rows: the
    first choice is admitted and scored; the second, admitted when the running request ends (while the
    scoring is still running), waits for that scoring instead of scoring the prompt again. Both choices get
    the same prompt entries and their solo texts."""
    from torchblt.serve.metrics import Metrics
    from torchblt.serve.scheduler import Finished, Scheduler, Started

    engine = _SlowScoringEngine(model, score_delay=0.8)
    sched = Scheduler(engine, Metrics(), max_batch=2, prefill_thread=True)
    body = {"prompt": TEXT[:20], "max_tokens": 6, "n": 2, "temperature": 0.9, "seed": 5, "echo": True, "logprobs": 1}
    running: list = []
    got: list = []
    sched.start()
    try:
        sched.submit(_job({"prompt": "Hello", "max_tokens": 8, "temperature": 0}, running.extend))
        wait_until(lambda: engine.n_rows == 1)
        sched.submit(_job(body, got.extend))
        wait_until(lambda: any(isinstance(e, Finished) for e in running))
        wait_until(lambda: len(sched._scoring) == 2)  # the second part waits for the first's scoring
        wait_until(lambda: sum(isinstance(e, Finished) for e in got) == 2, 30)
    finally:
        sched.stop()
    assert len(engine.score_spans) == 1
    started = [e for e in got if isinstance(e, Started)]
    assert len(started) == 2 and started[0].prompt_logprobs == started[1].prompt_logprobs is not None
    texts = [e.text for e in sorted((e for e in got if isinstance(e, Finished)), key=lambda e: e.index)]
    assert texts == generate(model, [TEXT[:20]] * 2, max_new_bytes=6, temperature=0.9, seed=5)


def test_prefill_thread_where_it_pays(model, monkeypatch):
    """Default (None): on for a CPU engine on one torch thread with another core; off with more torch
    threads, on one core, and for --speculative; True/False as given."""
    from torchblt.serve import app as serve_app

    monkeypatch.setattr(serve_app.os, "cpu_count", lambda: 2)
    assert BLTServer(model, ServeConfig(model_name=NAME)).scheduler.prefill_thread  # one_thread: 1 torch thread
    assert not BLTServer(model, ServeConfig(model_name=NAME, prefill_thread=False)).scheduler.prefill_thread
    assert not BLTServer(model, ServeConfig(model_name=NAME, max_batch=1, speculative=2)).scheduler.prefill_thread
    monkeypatch.setattr(serve_app.os, "cpu_count", lambda: 1)
    assert not BLTServer(model, ServeConfig(model_name=NAME)).scheduler.prefill_thread
    assert BLTServer(model, ServeConfig(model_name=NAME, prefill_thread=True)).scheduler.prefill_thread
    monkeypatch.setattr(serve_app.os, "cpu_count", lambda: 4)
    torch.set_num_threads(2)
    assert not BLTServer(model, ServeConfig(model_name=NAME)).scheduler.prefill_thread


def test_speculative_serving_equals_speculative_generate(model, monkeypatch):
    """--speculative K (one request at a time): greedy bytes are plain greedy's; seeded sampling is
    ``torchblt.generate(..., speculative=K)``'s; streaming, stop strings and logprobs work; the rounds
    really go through the speculative driver."""
    import torchblt.serve.scheduler as scheduler_module

    calls = []
    real = scheduler_module.speculative_steps
    monkeypatch.setattr(scheduler_module, "speculative_steps", lambda *a, **k: calls.append(a[3].speculative)
                        or real(*a, **k))
    srv = BLTServer(model, ServeConfig(model_name=NAME, max_batch=1, speculative=2))
    with ThreadedServer(srv) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        prompt = "The quick brown fox"
        out = c.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, logprobs=1)
        assert out.choices[0].text == alone(model, prompt, 30)
        lp = out.choices[0].logprobs
        assert all(abs(v - max(top.values())) < 1e-5 for v, top in zip(lp.token_logprobs, lp.top_logprobs))
        out = c.completions.create(model=NAME, prompt=prompt, max_tokens=25, n=2, temperature=0.9, seed=5)
        texts = [ch.text for ch in sorted(out.choices, key=lambda ch: ch.index)]
        assert texts == generate(model, [prompt] * 2, max_new_bytes=25, temperature=0.9, seed=5, speculative=2)
        full = alone(model, "Hello", 40, stop_at_eos=False)
        stream = c.completions.create(model=NAME, prompt="Hello", max_tokens=40, temperature=0, stream=True,
                                      stop=[full[8:10]], extra_body={"ignore_eos": True})
        assert "".join(ch.choices[0].text for ch in stream if ch.choices) == alone(
            model, "Hello", 40, stop=[full[8:10]], stop_at_eos=False)
    assert calls == [2] * 4
    with pytest.raises(ValueError, match="max_batch 1, got 4"):
        BLTServer(model, ServeConfig(model_name=NAME, max_batch=4, speculative=2))


# --------------------------------------------------------------------------- faults


def test_bad_requests_get_openai_errors_naming_the_field(server, client, model):
    srv, url = server
    r = post(url, None, raw=b'{"model": "tiny-blt", "prompt": "x",')
    assert r[0] == 400 and error_of(r)["code"] == "invalid_json" and "not valid JSON" in error_of(r)["message"]
    r = post(url, ["not", "an", "object"])
    assert r[0] == 400 and "JSON object" in error_of(r)["message"]
    cases = [
        ({"max_tokens": "ten"}, "max_tokens", "'ten'"),
        ({"max_tokens": -1}, "max_tokens", "-1"),
        ({"max_tokens": True}, "max_tokens", "True"),
        ({"temperature": "hot"}, "temperature", "'hot'"),
        ({"temperature": -0.5}, "temperature", "-0.5"),
        ({"top_p": 0}, "top_p", "0"),
        ({"n": 0}, "n", "0"),
        ({"stop": 5}, "stop", "5"),
        ({"logprobs": 99}, "logprobs", "99"),
        ({"stream": "yes"}, "stream", "'yes'"),
        ({"prompt": 5}, "prompt", "5"),
        ({"prompt": [[1, 2, 999]]}, "prompt", "999"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "0.5"),
        ({"temprature": 0.5}, "temprature", "temprature"),
    ]
    for change, param, value in cases:
        r = post(url, {"model": NAME, "prompt": "Hi", **change})
        err = error_of(r)
        assert r[0] == 400 and err["param"] == param and value in err["message"], (change, err)
    r = post(url, {"model": "gpt-4", "prompt": "Hi"})
    assert r[0] == 404 and error_of(r)["code"] == "model_not_found" and "'gpt-4'" in error_of(r)["message"]
    r = post(url, {"model": NAME, "prompt": "x" * 201})
    err = error_of(r)
    assert r[0] == 400 and err["param"] == "prompt" and "201 bytes" in err["message"] and "200" in err["message"]
    r = post(url, {"model": NAME, "prompt": ["ok", "é" * 101]})  # 202 bytes in the second prompt
    assert r[0] == 400 and error_of(r)["param"] == "prompt[1]"
    r = post(url, None, raw=b'{"model": "tiny-blt", "prompt": "' + b"x" * (srv.body_limit + 1) + b'"}')
    assert r[0] == 413 and error_of(r)["code"] == "body_too_large"
    assert get(url, "/v1/nothing")[0] == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    # and the server keeps serving
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=5, temperature=0).choices[0].text == alone(
        model, "Hi", 5)
    assert metric(url, 'blt_requests_total{endpoint="completions",status="400"}') >= len(cases) + 4


def test_full_queue_gets_429_with_retry_after(model):
    srv = BLTServer(model, ServeConfig(model_name=NAME, max_batch=1, max_queue=1))
    with ThreadedServer(srv) as url:
        long = {"model": NAME, "prompt": "Hello", "max_tokens": 250, "temperature": 0, "stream": True,
                "ignore_eos": True}
        host, port = url.rsplit("/", 1)[1].split(":")
        first = _open_stream(host, int(port), long)  # takes the only row
        wait_until(lambda: srv.engine.n_rows == 1)
        second = _open_stream(host, int(port), {**long, "max_tokens": 5})  # waits in the queue
        wait_until(lambda: metric(url, "blt_queue_depth") == 1)
        r = post(url, {"model": NAME, "prompt": "Hi", "max_tokens": 2})
        err = error_of(r)
        assert r[0] == 429 and r[1]["retry-after"] == "1" and err["code"] == "queue_full" and "--max-queue 1" in err[
            "message"]
        for conn in (first, second):
            body = conn.getresponse().read().decode()
            assert body.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in body
        assert post(url, {"model": NAME, "prompt": "Hi", "max_tokens": 2})[0] == 200  # served again


def _open_stream(host: str, port: int, body: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn


def test_api_key_required_on_v1(model):
    srv = BLTServer(model, ServeConfig(model_name=NAME, api_key="s3cret"))
    with ThreadedServer(srv) as url:
        r = post(url, {"model": NAME, "prompt": "Hi", "max_tokens": 2})
        assert r[0] == 401 and error_of(r)["code"] == "invalid_api_key" and "Bearer" in error_of(r)["message"]
        r = post(url, {"model": NAME, "prompt": "Hi", "max_tokens": 2}, headers={"Authorization": "Bearer wrong"})
        assert r[0] == 401 and "wrong" in error_of(r)["message"]
        assert get(url, "/v1/models")[0] == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).completions.create(
                model=NAME, prompt="x", max_tokens=1)
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=NAME, prompt="Hi", max_tokens=4, temperature=0).choices[0].text == alone(
            model, "Hi", 4)
        assert [m.id for m in good.models.list().data] == [NAME]
        assert get(url, "/health")[0] == 200  # health and metrics stay open


def test_disconnects_cancel_rows_and_free_memory(server, client, model):
    srv, url = server
    host, port = url.rsplit("/", 1)[1].split(":")
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    for stream in (True, False):
        wait_until(lambda: srv.engine.n_rows == 0)
        conn = _open_stream(host, int(port), {**body, "stream": stream})
        wait_until(lambda: srv.engine.n_rows == 1 and srv.engine.cache_bytes() > 0)
        if stream:
            resp = conn.getresponse()
            assert resp.status == 200 and resp.readline().startswith(b"data: ")
        conn.sock.shutdown(2)  # the client goes away mid-generation
        conn.close()
        wait_until(lambda: srv.engine.n_rows == 0)
        assert srv.engine.cache_bytes() == 0 and metric(url, "blt_running_rows") == 0
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=5, temperature=0).choices[0].text == alone(
        model, "Hi", 5)


class _FaultyEngine(BatchEngine):
    """Fails the prefill of prompts holding "BOOM" and every step of a row holding a "STEP" prompt."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.faulty: list[bool] = []  # per row of the batch

    def prefill(self, pending, n_bytes):
        if "BOOM" in TOK.decode(pending.ids):
            raise RuntimeError("prefill exploded")
        super().prefill(pending, n_bytes)

    def admit(self, pendings):
        logits = super().admit(pendings)
        self.faulty += ["STEP" in TOK.decode(p.ids) for p in pendings]
        return logits

    def _step(self, state, next_ids, rows):
        if any(self.faulty[r] for r in rows):
            raise RuntimeError("step exploded")
        return super()._step(state, next_ids, rows)

    def step(self, next_ids):
        out = super().step(next_ids)
        self.faulty = [f for i, f in enumerate(self.faulty) if i not in out.failed]
        return out

    def leave(self, rows):
        super().leave(rows)
        self.faulty = [f for i, f in enumerate(self.faulty) if i not in set(rows)]

    def reset(self):
        super().reset()
        self.faulty = []


def test_failing_rows_do_not_take_down_the_others(model):
    srv = BLTServer(model, ServeConfig(model_name=NAME), engine=_FaultyEngine(model))
    with ThreadedServer(srv) as url:
        good = {"model": NAME, "prompt": "Hello", "max_tokens": 60, "temperature": 0}
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("good", post(url, good)))
        t.start()
        wait_until(lambda: srv.engine.n_rows >= 1)
        r = post(url, {"model": NAME, "prompt": "BOOM", "max_tokens": 5})
        assert r[0] == 500 and "prefill exploded" in error_of(r)["message"]
        r = post(url, {"model": NAME, "prompt": "STEP", "max_tokens": 5, "stream": True})
        assert r[0] == 200 and 'step exploded' in r[2] and r[2].endswith("data: [DONE]\n\n")
        t.join(60)
        assert out["good"][0] == 200 and json.loads(out["good"][2])["choices"][0]["text"] == alone(model, "Hello", 60)
        assert post(url, good)[0] == 200 and get(url, "/health")[0] == 200


@pytest.mark.parametrize("prefill_thread", [False, True])
def test_a_bad_request_in_a_shared_prefill_fails_alone(model, prefill_thread):
    """Requests admitted in the same tick are prefilled together; when that raises, each is retried alone
    (on the prefill thread: the failing prefill is reported, its job fails, the other joins)."""
    from torchblt.serve.metrics import Metrics
    from torchblt.serve.protocol import parse_completion_request
    from torchblt.serve.scheduler import Failed, Finished, Job, Scheduler

    sched = Scheduler(_FaultyEngine(model), Metrics(), max_batch=4, prefill_thread=prefill_thread)
    got: dict[str, list] = {"good": [], "bad": []}
    jobs = {}
    for name, prompt in (("good", "Hello"), ("bad", "BOOM")):
        req = parse_completion_request({"model": NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0},
                                       model_name=NAME, max_prompt_bytes=100, max_tokens_limit=100)
        jobs[name] = Job(req, got[name].extend)
    sched.start()
    with sched._cv:  # both wait before the thread's first tick, so they are admitted together
        for job in jobs.values():
            sched._waiting.append(job)
        sched._cv.notify()
    wait_until(lambda: any(isinstance(e, Finished) for e in got["good"]) and got["bad"])
    sched.stop()
    assert [e for e in got["bad"] if isinstance(e, Failed)][0].error.status == 500
    assert [e.text for e in got["good"] if isinstance(e, Finished)] == [alone(model, "Hello", 6)]


def test_models_health_metrics_tokenizer(server, client):
    _, url = server
    models = client.models.list().data
    assert [m.id for m in models] == [NAME] and client.models.retrieve(NAME).id == NAME
    assert json.loads(get(url, "/health")[1]) == {"status": "ok"}
    text = get(url, "/metrics")[1]
    for name in ("blt_requests_total", "blt_generated_bytes_total", "blt_queue_depth", "blt_running_rows",
                 "blt_time_to_first_byte_seconds_bucket", "blt_inter_byte_latency_seconds_bucket"):
        assert name in text
    assert metric(url, "blt_generated_bytes_total") > 0
    assert metric(url, "blt_prefilling_rows") == 0
    for phase in ("admit", "prefill", "sample", "step", "deliver"):
        assert metric(url, f'blt_scheduler_seconds_total{{phase="{phase}"}}') > 0, phase
    r = post(url, {"prompt": "é!", "add_special_tokens": False}, path="/tokenize")
    assert json.loads(r[2])["tokens"] == [0xC3 + 4, 0xA9 + 4, ord("!") + 4]
    assert json.loads(post(url, {"prompt": "<s>", "add_special_tokens": False}, path="/tokenize")[2])["tokens"] == [1]
    assert json.loads(post(url, {"tokens": [1, 0xC3 + 4, 0xA9 + 4]}, path="/detokenize")[2]) == {"prompt": "é"}
    assert json.loads(get(url, "/tokenizer_info")[1])["eos_token"] == "</s>"


# --------------------------------------------------------------------------- the command


def test_cli_serve_binds_localhost_and_drains_on_sigterm(model_dir, model):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torchblt.cli", "serve", str(model_dir), "--port", "0",
                             "--drain-timeout", "60", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        m = re.search(r"on http://([\d.]+):(\d+)/v1", line)
        assert m and m.group(1) == "127.0.0.1", line
        # the default: one torch thread on 2 cores (the cores less one) -> the prefill thread is on
        assert re.search(r"prefill thread (on|off),", line) and (os.cpu_count() != 2 or "prefill thread on" in line)
        assert "compiled step off)" in line  # --compile auto on a CPU
        port = int(m.group(2))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _health(url), 60)
        body = {"model": "tiny-blt", "prompt": "Hello", "max_tokens": 80, "temperature": 0, "stream": True,
                "ignore_eos": True}
        conn = _open_stream("127.0.0.1", port, body)
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")  # generating
        proc.send_signal(signal.SIGTERM)
        rest = resp.read().decode()  # the running request still finishes
        assert rest.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in rest
        assert proc.wait(60) == 0
        with pytest.raises(OSError):
            urllib.request.urlopen(url + "/health", timeout=5)  # no longer accepting
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _health(url: str) -> bool:
    try:
        return get(url, "/health")[0] == 200
    except OSError:
        return False


def test_cli_bad_options_exit_2(model_dir, capsys):
    from torchblt.cli import main as blt_main

    assert blt_main(["serve", str(model_dir), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1, got 0" in capsys.readouterr().err
    assert blt_main(["serve", str(model_dir), "--prefill-chunk", "-1"]) == 2
    assert "--prefill-chunk must be >= 0, got -1" in capsys.readouterr().err
    assert blt_main(["serve", str(model_dir), "--prefill-thread", "maybe"]) == 2
    assert "--prefill-thread: invalid choice: 'maybe'" in capsys.readouterr().err
    assert blt_main(["serve", str(model_dir), "--speculative", "2"]) == 2  # --max-batch 16
    assert "--speculative needs --max-batch 1" in capsys.readouterr().err
    assert blt_main(["serve", str(model_dir), "--speculative", "2", "--max-batch", "1", "--compile", "on"]) == 2
    assert "--compile on applies to the batched steps" in capsys.readouterr().err
    assert blt_main(["serve", str(model_dir / "missing")]) == 2
    assert blt_main(["serve", str(model_dir / "entropy_model")]) == 2
    assert "entropy model" in capsys.readouterr().err


def test_drain_finishes_running_requests_then_cancels_what_is_left(model):
    short = {"model": NAME, "prompt": "Hello", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    for drain_timeout in (60.0, 0.3):
        srv = BLTServer(model, ServeConfig(model_name=NAME, max_batch=1))
        with ThreadedServer(srv) as url:
            host, port = url.rsplit("/", 1)[1].split(":")
            body = short if drain_timeout > 1 else {**short, "max_tokens": 4000, "stream": True}
            conn = _open_stream(host, int(port), body)
            wait_until(lambda s=srv: s.engine.n_rows == 1)
            srv.scheduler.begin_drain(timeout=drain_timeout)
            r = post(url, short)
            assert r[0] == 503 and error_of(r)["code"] == "server_shutting_down"
            assert get(url, "/health")[0] == 503
            if drain_timeout > 1:  # the running request finishes
                text = json.loads(conn.getresponse().read())["choices"][0]["text"]
                assert text == alone(model, "Hello", 30, stop_at_eos=False)
            else:  # past the drain timeout what still runs gets a 503 error; the stream ends with [DONE]
                text = conn.getresponse().read().decode()
                assert "server_shutting_down" in text and text.endswith("data: [DONE]\n\n")
            wait_until(lambda s=srv: s.engine.n_rows == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_serving_on_cuda_equals_single_runs(model_dir, compiled):
    """The server on a CUDA model (CUDA generators for seeded sampling), eager and compiled (CUDA graphs, every
    batch size compiled first): 8 concurrent clients, each output equal to its own torchblt.generate run on the GPU."""
    gpu = load_model(model_dir, device="cuda")
    srv = BLTServer(gpu, ServeConfig(model_name=NAME, compile=compiled, max_prompt_bytes=200, max_tokens=64))
    assert srv.warm_up() == ([1, 2, 4, 8, 16] if compiled else [])
    jobs = [(TEXT[i * 7 : i * 7 + 10], {"temperature": 0.0} if i % 2 else {"temperature": 0.9, "seed": i})
            for i in range(8)]
    expected = [alone(gpu, p, 40, **kw) for p, kw in jobs]
    results: dict[int, str] = {}
    with ThreadedServer(srv) as url:
        def run(i: int) -> None:
            time.sleep(0.01 * i)
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            results[i] = c.completions.create(model=NAME, prompt=jobs[i][0], max_tokens=40, **jobs[i][1]).choices[0].text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [results.get(i) for i in range(8)] == expected


def test_default_threads_leave_a_core_to_http(monkeypatch):
    from torchblt.commands import serve as serve_command

    monkeypatch.setattr(serve_command, "torch_default_threads", lambda: 8)
    for cores, expected in ((2, 1), (1, 1), (4, 3), (16, 8)):
        monkeypatch.setattr(serve_command.os, "cpu_count", lambda cores=cores: cores)
        assert serve_command.default_threads() == expected
