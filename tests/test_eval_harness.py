"""lm-evaluation-harness adapter (model type ``blt``), offline, with tiny tasks defined in local YAML files:
multiple choice, generation and rolling log-likelihood, scores checked against the model directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from tests.helpers.harness import GEN_PROMPTS, MC, ROLLING, write_tasks  # noqa: E402
from torchblt import generate, load_model  # noqa: E402
from torchblt.eval.bpb import evaluate_bpb, make_windows  # noqa: E402
from torchblt.eval.harness import BLTLM  # noqa: E402
from torchblt.patching import Patcher, split_first_patch  # noqa: E402
from torchblt.tokenizer import ByteTokenizer  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "reference" / "05_blt_forward"


@pytest.fixture(scope="module")
def blt():
    return load_model(FIX / "blt_model", entropy_model=FIX / "entropy_model")


@torch.no_grad()
def _direct_loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    """One full forward, no windows: the sum of log p(continuation bytes)."""
    tok = ByteTokenizer()
    ctx = tok.encode(context, add_bos=True, add_eos=False)
    full = ctx + tok.encode(continuation, add_bos=False, add_eos=False)
    tokens = torch.tensor([full])
    lengths = split_first_patch(Patcher.for_model(model).patch(tokens, include_next_token=True)[0])
    logp = F.log_softmax(model(tokens, lengths)[0].float(), -1)
    targets = torch.tensor(full[len(ctx):])
    pred = logp[len(ctx) - 1 : len(full) - 1]
    return float(pred.gather(1, targets[:, None]).sum()), bool((pred.argmax(-1) == targets).all())


def test_offline_tasks_match_the_model(blt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    # generation: the first target is what the model generates (exact match 1), the second is not (0)
    direct_gen = generate(blt, GEN_PROMPTS, max_new_bytes=12, stop=["\n", "."], temperature=0.0)
    write_tasks(tmp_path, [direct_gen[0], direct_gen[1] + "#"])
    lm = BLTLM(model=blt, batch_size=4)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["tiny_mc", "tiny_gen", "tiny_roll"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=0, log_samples=True,
    )
    results, samples = out["results"], out["samples"]

    # multiple choice: every choice's log-likelihood equals one direct forward; acc follows from them
    correct = 0
    for s in samples["tiny_mc"]:
        doc = s["doc"]
        direct = [_direct_loglikelihood(blt, doc["question"], " " + c) for c in doc["choices"]]
        got = [tuple(r[0]) for r in s["resps"]]
        for (lp, greedy), (dlp, dgreedy) in zip(got, direct):
            assert lp == pytest.approx(dlp, abs=1e-4) and greedy == dgreedy
        correct += int(max(range(len(direct)), key=lambda i: direct[i][0]) == doc["answer"])
    assert results["tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC))

    # generation: responses are torchblt.generate's
    assert [s["resps"][0][0] for s in samples["tiny_gen"]] == direct_gen
    assert results["tiny_gen"]["exact_match,none"] == pytest.approx(0.5)

    # rolling log-likelihood: the harness's bits per byte is evaluate_bpb without EOS
    ours = evaluate_bpb(blt, ROLLING, count_eos=False)
    assert results["tiny_roll"]["bits_per_byte,none"] == pytest.approx(ours.bpb, rel=1e-5)
    assert results["tiny_roll"]["byte_perplexity,none"] == pytest.approx(2 ** ours.bpb, rel=1e-5)


def test_loglikelihood_windows_and_registration(blt):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    assert get_model("blt") is BLTLM
    lm = BLTLM(model=blt, context_bytes=16, batch_size=2)
    context, continuation = "A long context that does not fit the window", " at all"
    req = Instance("loglikelihood", {}, (context, continuation), 0)
    (lp, _), (lp_empty, greedy_empty) = lm.loglikelihood([req, Instance("loglikelihood", {}, ("abc", ""), 1)])
    assert (lp_empty, greedy_empty) == (0.0, True)
    # with 16-token windows (make_windows: >= 8 tokens of left context), each window's own forward
    full = ByteTokenizer().encode(context + continuation, add_bos=True, add_eos=False)
    first = len(full) - len(continuation)
    direct = 0.0
    windows = make_windows(0, len(full), 16, first)
    assert len(windows) >= 1 and windows[0].start > 0  # the context really was cut
    for w in windows:
        for t in range(w.score_from, w.end):
            direct += _direct_ll_tokens(blt, full[w.start : w.end], t - w.start)[0]
    assert lp == pytest.approx(direct, abs=1e-4)
    no_window = _direct_loglikelihood(blt, context, continuation)[0]
    assert abs(lp - no_window) > 1e-3  # the window changed the answer, so the check above means something
    with pytest.raises(ValueError, match="unknown argument"):
        BLTLM(model=blt, colour="blue")
    with pytest.raises(ValueError, match="pretrained"):
        BLTLM()


@torch.no_grad()
def _direct_ll_tokens(model, window: list[int], target: int) -> tuple[float, bool]:
    tokens = torch.tensor([window])
    lengths = split_first_patch(Patcher.for_model(model).patch(tokens, include_next_token=True)[0])
    logp = F.log_softmax(model(tokens, lengths)[0].float(), -1)
    return float(logp[target - 1, window[target]]), bool(logp[target - 1].argmax() == window[target])


def test_cli_string_arguments(tmp_path):
    lm = BLTLM.create_from_arg_string(
        f"pretrained={FIX / 'blt_model'},entropy_model={FIX / 'entropy_model'},context_bytes=64,max_gen_bytes=4",
        {"batch_size": "auto", "max_batch_size": None, "device": "cpu"},
    )
    assert lm.context_bytes == 64 and lm.batch_size == 8 and Patcher.for_model(lm.model).entropy_model is not None


@pytest.mark.slow
def test_blt_harness_command(tmp_path, capsys, monkeypatch):
    """``blt harness`` is lm-eval's CLI with --model blt (slow: lm-eval indexes its built-in tasks)."""
    from torchblt.cli import main as blt_main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(tmp_path, ["x", "y"])
    args = f"pretrained={FIX / 'blt_model'},entropy_model={FIX / 'entropy_model'}"
    assert blt_main(["harness", "--model_args", args, "--tasks", "tiny_mc", "--include_path", str(tmp_path),
                     "--device", "cpu", "--batch_size", "4"]) == 0
    assert "tiny_mc" in capsys.readouterr().out


@torch.no_grad()
def test_byte_lm_through_the_adapter():
    from lm_eval.api.instance import Instance

    em = load_model(FIX / "entropy_model")
    lm = BLTLM(model=em)
    (lp, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("Hello", " world"), 0)])
    full = torch.tensor([ByteTokenizer().encode("Hello world", add_bos=True, add_eos=False)])
    logp = F.log_softmax(em(full)[0], -1)
    expected = sum(float(logp[t - 1, full[0, t]]) for t in range(6, full.shape[1]))
    assert lp == pytest.approx(expected, abs=1e-4)
    # greedy generation by full recompute: each new byte is the argmax given everything before it
    (text,) = lm.generate_until([Instance("generate_until", {}, ("Hi", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    ids = ByteTokenizer().encode("Hi", add_bos=True, add_eos=False)
    for _ in range(5):
        nxt = int(em(torch.tensor([ids]))[0, -1].argmax())
        if nxt == 2:
            break
        ids.append(nxt)
    expected_text = ByteTokenizer().decode(ids[3:])
    assert text == expected_text.split("\n")[0]
