"""Generation API, sampling, stopping, streaming and the ``blt generate`` command."""

from __future__ import annotations

import json

import pytest
import torch

from torchblt import ByteTokenizer, Patcher, generate, generate_stream, load_model
from torchblt.cli import main
from torchblt.generation import GenerationConfig, generate_tokens
from torchblt.generation.sampling import filter_logits, row_generators, sample
from torchblt.generation.stream import StopCondition, TextStream
from torchblt.patching import attach_entropy_model
from torchblt.tokenizer import EOS_ID

FIX = "tests/fixtures/reference/06_generation/"
TOK = ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return load_model(FIX + "blt_model"), load_model(FIX + "entropy_model")


@pytest.fixture(scope="module")
def cases():
    return json.load(open(FIX + "generation_cases.json"))["per_prompt_batch1"]


# ------------------------------------------------------------------ generate()


def test_generate_texts_match_reference(models, cases):
    model, em = models
    texts = generate(model, [c["prompt"] for c in cases], entropy_model=em, max_new_bytes=40, stop_at_eos=False)
    assert texts == [c["generated_text"] for c in cases]
    # a single string works too, and the caller's model/patcher are not changed
    assert generate(model, cases[0]["prompt"], entropy_model=em, max_new_bytes=40, stop_at_eos=False) == [
        cases[0]["generated_text"]
    ]
    assert Patcher.for_model(model).entropy_model is None


def test_model_patcher_with_attached_entropy_model(models, cases):
    model, em = models
    attach_entropy_model(model, em)
    try:
        assert generate(model, cases[1]["prompt"], max_new_bytes=40, stop_at_eos=False) == [cases[1]["generated_text"]]
    finally:
        attach_entropy_model(model, None)
    # the first release's methods on the model still work, with a deprecation warning
    with pytest.warns(DeprecationWarning, match="attach_entropy_model"):
        model.attach_entropy_model(em)
    try:
        with pytest.warns(DeprecationWarning, match="Patcher.for_model"):
            assert model.patcher.entropy_model is em
        assert generate(model, cases[1]["prompt"], max_new_bytes=40, stop_at_eos=False) == [cases[1]["generated_text"]]
    finally:
        attach_entropy_model(model, None)


def test_clear_errors(models):
    model, em = models
    with pytest.raises(ValueError, match="entropy model"):
        generate(model, "hi", max_new_bytes=3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, "hi", entropy_model=em, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, "hi", entropy_model=em, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_bytes"):
        generate(model, "hi", entropy_model=em, max_new_bytes=-1)
    with pytest.raises(ValueError, match="top-k entropy patching"):
        generate(model, "hi", Patcher("entropy", threshold=None, patch_size=4, entropy_model=em), max_new_bytes=3)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, [], entropy_model=em)
    assert generate(model, "hi", entropy_model=em, max_new_bytes=0) == [""]


def test_stop_strings_and_eos(models, cases):
    model, em = models
    full = cases[0]["generated_text"]
    stop = full[5:7]
    out = generate_tokens(model, [cases[0]["prompt_ids"]], entropy_model=em,
                          config=GenerationConfig(max_new_bytes=40, stop=[stop, "never"]))
    assert out.texts == [full[: full.find(stop)]]
    assert out.finish_reasons == ["stop"]
    assert len(out.tokens[0]) < 40

    hook = model.local_decoder.output.register_forward_hook(lambda m, i, o: o + torch.nn.functional.one_hot(
        torch.tensor(EOS_ID), o.shape[-1]).to(o.dtype) * 100)
    try:
        out = generate_tokens(model, [cases[0]["prompt_ids"]], entropy_model=em, config=GenerationConfig(max_new_bytes=9))
        assert out.tokens == [[EOS_ID]] and out.texts == [""] and out.finish_reasons == ["eos"]
        out = generate_tokens(model, [cases[0]["prompt_ids"]], entropy_model=em,
                              config=GenerationConfig(max_new_bytes=9, stop_at_eos=False))
        assert out.tokens == [[EOS_ID] * 9] and out.finish_reasons == ["length"]
    finally:
        hook.remove()


# ------------------------------------------------------------------ sampling helpers


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.equal(sample(logits), torch.tensor([0]))
    kept = filter_logits(logits, 1.0, top_k=2)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False, False]]
    probs = torch.softmax(logits, -1)[0]  # 0.64, 0.24, 0.09, ...
    kept = filter_logits(logits, 1.0, top_p=0.7)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False, False]]
    assert probs[0] < 0.7 < probs[0] + probs[1]
    kept = filter_logits(logits, 1.0, top_p=0.5)  # the most likely byte always stays
    assert torch.isfinite(kept).tolist() == [[True, False, False, False, False]]
    gens = row_generators(1, torch.device("cpu"), seed=0)
    draws = {int(sample(logits, 1.0, top_k=2, generators=gens)) for _ in range(50)}
    assert draws == {0, 1}
    a = [int(sample(logits, 1.0, generators=row_generators(1, torch.device("cpu"), seed=5))) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same draw


# ------------------------------------------------------------------ streaming


def test_text_stream_never_splits_characters():
    text = "Zürich 日本 🙂!"
    stream = TextStream(StopCondition(100))
    pieces = [stream.push(b + 4) for b in text.encode()]
    pieces.append(stream.finish())
    assert "".join(pieces) == text
    assert "" in pieces  # the bytes of a multi-byte character wait for the last one
    assert "🙂" in pieces and "日" in pieces


def test_text_stream_holds_back_stop_prefix():
    stream = TextStream(StopCondition(100, stop=["\n\n"]))
    got = [stream.push(b + 4) for b in b"ab\ncd\n\nignored"]
    assert got[:3] == ["a", "b", ""]  # "\n" might start the stop string
    assert "".join(got) + stream.finish() == "ab\ncd"


def test_generate_stream_equals_generate(models, cases):
    model, em = models
    for prompt in [cases[2]["prompt"], "héllo wörld"]:
        for kw in ({}, {"stop": ["_;"]}, {"temperature": 1.0, "seed": 3}):
            pieces = list(generate_stream(model, prompt, entropy_model=em, max_new_bytes=30, stop_at_eos=False, **kw))
            assert "".join(pieces) == generate(model, prompt, entropy_model=em, max_new_bytes=30,
                                               stop_at_eos=False, **kw)[0]
    with_patches = list(generate_stream(model, cases[0]["prompt"], entropy_model=em, max_new_bytes=40,
                                        stop_at_eos=False, with_patches=True))
    assert "".join(p.text for p in with_patches) == cases[0]["generated_text"]
    indices = [p.patch_index for p in with_patches]
    assert indices == sorted(indices) and indices[-1] > indices[0]


# ------------------------------------------------------------------ CLI


MODEL_ARGS = [FIX + "blt_model", "--entropy-model", FIX + "entropy_model"]


def test_cli_prompts(capsys, cases):
    assert main(["generate", *MODEL_ARGS, cases[0]["prompt"], cases[1]["prompt"], "--max-new-bytes", "40",
                 "--no-stop-at-eos"]) == 0
    out = capsys.readouterr().out
    assert cases[0]["prompt"] + cases[0]["generated_text"] in out
    assert cases[1]["prompt"] + cases[1]["generated_text"] in out


def test_cli_stream_and_show_patches(capsys, cases):
    assert main(["generate", *MODEL_ARGS, cases[0]["prompt"], "--max-new-bytes", "40", "--no-stop-at-eos",
                 "--stream"]) == 0
    assert cases[0]["generated_text"] in capsys.readouterr().out
    assert main(["generate", *MODEL_ARGS, cases[0]["prompt"], "--max-new-bytes", "40", "--no-stop-at-eos",
                 "--show-patches"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[48;5;24m" in out and "\x1b[48;5;94m" in out
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert plain.strip("\n") == cases[0]["prompt"] + cases[0]["generated_text"]


def test_cli_compile_option_reaches_the_engine(capsys, cases, monkeypatch):
    """``blt generate --compile on|off|auto`` (and ``generate_stream``'s ``compile``) choose the engine's step; the
    engine built here runs eager whatever was asked (the compiled step's exactness has its own tests)."""
    from torchblt.generation import api

    asked, real = [], api.IncrementalEngine

    def spy(*args, **kwargs):
        asked.append(kwargs.pop("compile"))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "IncrementalEngine", spy)
    prompt, want = cases[0]["prompt"], cases[0]["generated_text"]
    for flag, stream in (("on", False), ("off", False), ("auto", False), ("on", True)):
        assert main(["generate", *MODEL_ARGS, prompt, "--max-new-bytes", "40", "--no-stop-at-eos", "--compile", flag,
                     *(["--stream"] if stream else [])]) == 0
        assert prompt + want in capsys.readouterr().out
    assert asked == [True, False, False, True]  # auto: 40 new bytes on CPU do not pay for a compile
    assert main(["generate", *MODEL_ARGS, prompt, "--compile", "maybe"]) == 2
    assert "--compile: invalid choice: 'maybe'" in capsys.readouterr().err


def test_cli_prompt_and_jsonl_from_standard_input(tmp_path, cases, capsys, stdin_bytes):
    """``blt generate -``: standard input is one prompt (UTF-8, one trailing newline dropped); ``--input -``:
    JSON lines from standard input, errors naming ``<stdin>`` and the line."""
    prompt, want = cases[0]["prompt"], cases[0]["generated_text"]
    run = ["generate", *MODEL_ARGS, "--max-new-bytes", "40", "--no-stop-at-eos"]
    for ending in ("\n", "\r\n", ""):
        stdin_bytes((prompt + ending).encode())
        assert main([*run, "-"]) == 0
        assert capsys.readouterr().out == prompt + want + "\n"
    stdin_bytes(("\n".join(json.dumps({"prompt": c["prompt"], "id": i}) for i, c in enumerate(cases)) + "\n").encode())
    dst = tmp_path / "out.jsonl"
    assert main([*run, "--input", "-", "--output", str(dst)]) == 0
    assert [json.loads(line)["generation"] for line in dst.read_text().splitlines()] == [c["generated_text"] for c in cases]
    stdin_bytes(b'{"prompt": "ok"}\n{"text": 1}\n')
    assert main([*run, "--input", "-"]) == 2
    assert "<stdin>:2: expected" in capsys.readouterr().err
    stdin_bytes(b"\xff")
    assert main([*run, "-"]) == 2
    assert "PROMPT - (standard input) is not valid UTF-8 (byte 0xff at offset 0)" in capsys.readouterr().err
    assert main([*run, "-", "-"]) == 2
    assert "PROMPT - (standard input) can be given once" in capsys.readouterr().err


def test_cli_jsonl_batch(tmp_path, cases, capsys):
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": c["prompt"], "id": i}) for i, c in enumerate(cases)) + "\n")
    dst = tmp_path / "out.jsonl"
    args = ["generate", *MODEL_ARGS, "--input", str(src), "--output", str(dst), "--max-new-bytes", "40",
            "--no-stop-at-eos", "--batch-size", "2"]
    assert main(args) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["generation"] for r in rows] == [c["generated_text"] for c in cases]
    assert [r["id"] for r in rows] == [0, 1, 2] and rows[0]["finish_reason"] == "length"
    # never overwrite without --overwrite; bad input names the file and line
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": 1}\n')
    assert main(["generate", *MODEL_ARGS, "--input", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["generate", *MODEL_ARGS, "x", "--temperature", "-2"]) == 2
    assert "temperature" in capsys.readouterr().err
