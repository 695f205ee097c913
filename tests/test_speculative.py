"""Speculative decoding (generation/speculative.py): greedy output byte-identical to plain greedy decoding
(every patching mode usable incrementally, batches whose rows keep different draft lengths, EOS and stop
strings inside a draft), and sampling whose byte distribution is the BLT's (a seeded chi-square test).

Random tiny drafters rarely agree with random tiny BLTs, which would leave the kept-draft paths
untested: :class:`OracleDrafter` proposes the plain greedy continuation at some positions and a wrong
byte at others (a fixed pattern per row), so rows keep 0..K drafts in the same round."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.generation import TEXT, median_entropy, prompts_ids, tiny_em, tiny_model
from torchblt import Patcher, generate, generate_stream
from torchblt.cli import main
from torchblt.generation import FullRecomputeEngine, GenerationConfig, filter_logits, generate_tokens
from torchblt.generation import speculative as spec
from torchblt.generation.sampling import row_generators
from torchblt.generation.stream import StopCondition
from torchblt.tokenizer import EOS_ID

pytestmark = pytest.mark.usefixtures("one_thread")


def entropy_setup(seed: int = 0, window: int = 10, changes: dict | None = None):
    model, em = tiny_model(seed=seed, window=window, changes=changes), tiny_em(seed=seed + 1, window=window + 2)
    return model, Patcher("entropy", threshold=median_entropy(em) + 1e-3, entropy_model=em)


def with_em(model, patcher):
    patcher.entropy_model = tiny_em(seed=11, window=9)  # the drafter of the modes without an entropy model
    return model, patcher


SETUPS = {
    "entropy": lambda: entropy_setup(0),
    "cross-windows": lambda: entropy_setup(2, changes={"cross_attn.window_encoder": 2, "cross_attn.window_decoder": 3,
                                                      "cross_attn.all_layers_encoder": True, "encoder.n_layers": 2}),
    "space-pooling": lambda: with_em(tiny_model(seed=4, changes={"cross_attn.encoder": False, "cross_attn.decoder": False,
                                                                 "pooling": "avg,min,max"}),
                                     Patcher("space", max_patch_length=3)),
    "concat-static": lambda: with_em(tiny_model(seed=5, changes={"cross_attn.encoder": False,
                                                                 "cross_attn.decoder": False, "pooling": "",
                                                                 "patching.patch_size": 3}),
                                     Patcher("static", patch_size=3)),
    "causal-byte": lambda: with_em(tiny_model(seed=6, changes={"global_.attention": "causal",
                                                               "encoder.attention": "block_causal",
                                                               "decoder.attention": "causal"}), Patcher("byte")),
}

PROMPTS = (TEXT[:23], TEXT[40:44], "Zü")


class TextDrafter(spec.Drafter):
    """The real drafter's cache and calls, with each row's text so far (prompt + stepped bytes) and the
    row's original index, for drafters that propose from a table (:meth:`propose`)."""

    def prefill(self, prompts, state):
        super().prefill(prompts, state)
        type(self).last_shared = self.shared
        self.text = [list(p) for p in prompts]
        self.row = list(range(len(prompts)))

    def step(self, tokens):
        logits = super().step(tokens)
        for b, t in enumerate(tokens.tolist()):
            self.text[b].append(t)
            self.propose(logits[b], self.text[b], self.row[b])
        return logits

    def propose(self, logits, text, row):  # in place
        pass

    def rollback(self, pos, doc):
        super().rollback(pos, doc)
        self.text = [t[:p] for t, p in zip(self.text, pos.tolist())]

    def keep(self, x, kept, start_pos, start_doc, state):
        super().keep(x, kept, start_pos, start_doc, state)
        self.text = [t[:p] + r[: k + 1] for t, p, r, k in zip(self.text, start_pos.tolist(), x.tolist(), kept.tolist())]

    def select(self, rows):
        super().select(rows)
        self.text = [list(self.text[i]) for i in rows.tolist()]
        self.row = [self.row[i] for i in rows.tolist()]


class OracleDrafter(TextDrafter):
    """Proposes the plain greedy byte at about 4 of 5 positions (a fixed hash of position and row) and
    the drafter's own choice elsewhere."""

    truth: list[list[int]] = []  # per prompt: prompt + plain greedy continuation

    def propose(self, logits, text, row):
        seq, n = self.truth[row], len(text)
        right = ((n * 2654435761 + row * 40503) >> 7) % 5 != 0
        if n < len(seq) and seq[:n] == text and right:
            logits[seq[n]] = logits.max() + 10


@pytest.fixture
def oracle(monkeypatch):
    """Run speculative decoding with the oracle drafter, counting kept drafts."""
    stats = spec.SpeculativeStats(8)
    real = spec.speculative_steps

    def counted(*args, **kwargs):
        return real(*args, **{**kwargs, "stats": stats})

    monkeypatch.setattr(spec, "Drafter", OracleDrafter)
    monkeypatch.setattr("torchblt.generation.api.speculative_steps", counted)
    return stats


def plain_and_speculative(model, patcher, prompts, k, n_new=36, **cfg):
    plain = generate_tokens(model, prompts, patcher, return_logits=True,
                            config=GenerationConfig(max_new_bytes=n_new, **cfg))
    OracleDrafter.truth = [p + t for p, t in zip(prompts, plain.tokens)]
    fast = generate_tokens(model, prompts, patcher, return_logits=True,
                           config=GenerationConfig(max_new_bytes=n_new, speculative=k, **cfg))
    return plain, fast


def assert_identical(plain, fast):
    assert fast.tokens == plain.tokens
    assert fast.texts == plain.texts
    assert fast.finish_reasons == plain.finish_reasons
    assert fast.patch_starts == plain.patch_starts
    assert fast.prompt_starts == plain.prompt_starts
    for a, b in zip(fast.logits, plain.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(SETUPS))
def test_greedy_is_plain_greedy_in_every_incremental_mode(name, oracle):
    model, patcher = SETUPS[name]()
    prompts = prompts_ids(*PROMPTS)
    plain, fast = plain_and_speculative(model, patcher, prompts, k=5, stop_at_eos=False)
    assert_identical(plain, fast)
    # entropy patching drafts on the state's own entropy-model cache, the other modes on the drafter's
    assert OracleDrafter.last_shared == (patcher.mode == "entropy")
    # rows kept different numbers of drafts (none, some, all five) in the same rounds
    assert {0, 5} <= set(oracle.kept_histogram) and len(oracle.kept_histogram) >= 4
    assert oracle.accepted[4] > 0 and sum(oracle.drafted) > sum(oracle.accepted) > 0


@pytest.mark.parametrize("k", [1, 2, 7])
def test_greedy_draft_lengths_and_the_real_drafter(k):
    model, patcher = entropy_setup(3)
    prompts = prompts_ids(*PROMPTS)
    plain = generate_tokens(model, prompts, patcher, config=GenerationConfig(max_new_bytes=30, stop_at_eos=False))
    for threshold in (None, "patch"):
        fast = generate_tokens(model, prompts, patcher, config=GenerationConfig(
            max_new_bytes=30, stop_at_eos=False, speculative=k, draft_threshold=threshold))
        assert fast.tokens == plain.tokens and fast.patch_starts == plain.patch_starts


@pytest.mark.slow
def test_compiled_verification_is_plain_greedy():
    """compile=True: the verification step compiled once per (batch, n) shape (~6 min on 2 cores)."""
    model, patcher = entropy_setup(0)
    prompts = prompts_ids(*PROMPTS[:2])
    plain = generate_tokens(model, prompts, patcher, config=GenerationConfig(max_new_bytes=24, stop_at_eos=False))
    fast = generate_tokens(model, prompts, patcher, config=GenerationConfig(max_new_bytes=24, stop_at_eos=False,
                                                                             speculative=2, compile=True))
    assert fast.tokens == plain.tokens and fast.patch_starts == plain.patch_starts


def eos_model():
    """A BLT that greedily writes EOS where it would write its favourite byte (EOS inside drafts)."""
    model, patcher = entropy_setup(8)
    out = generate_tokens(model, prompts_ids(*PROMPTS), patcher,
                          config=GenerationConfig(max_new_bytes=40, stop_at_eos=False))
    favourite = torch.tensor(sum(out.tokens, [])).bincount().argmax()
    w = model.local_decoder.output.weight.data
    w[EOS_ID] = w[favourite] * 1.5
    return model, patcher


def test_eos_and_stop_strings_inside_drafts(oracle):
    model, patcher = eos_model()
    prompts = prompts_ids(*PROMPTS)
    plain, fast = plain_and_speculative(model, patcher, prompts, k=6, n_new=40, stop_at_eos=False)
    assert_identical(plain, fast)
    assert any(EOS_ID in t[1:] for t in plain.tokens)  # documents end and begin inside the generation
    plain, fast = plain_and_speculative(model, patcher, prompts, k=6, n_new=40, stop_at_eos=True)
    assert_identical(plain, fast)
    assert "eos" in plain.finish_reasons
    # stop strings: pieces of each row's own continuation, so rows stop at different places inside drafts
    model, patcher = entropy_setup(9)
    free = generate_tokens(model, prompts, patcher, config=GenerationConfig(max_new_bytes=40, stop_at_eos=False))
    stops = [t[8:10] for t in free.texts if len(t) >= 10][:2]
    plain, fast = plain_and_speculative(model, patcher, prompts, k=6, n_new=40, stop=stops, stop_at_eos=False)
    assert_identical(plain, fast)
    assert "stop" in plain.finish_reasons


def test_stream_text_and_cli_equal_plain(capsys):
    model, patcher = entropy_setup(1)
    want = generate(model, list(PROMPTS), patcher, max_new_bytes=30, stop_at_eos=False)
    assert generate(model, list(PROMPTS), patcher, max_new_bytes=30, stop_at_eos=False, speculative=4) == want
    pieces = generate_stream(model, PROMPTS[0], patcher, max_new_bytes=30, stop_at_eos=False, speculative=4,
                             draft_threshold="patch")
    assert "".join(pieces) == want[0]
    fix = "tests/fixtures/reference/06_generation/"
    args = ["generate", fix + "blt_model", "--entropy-model", fix + "entropy_model", "Hello", "--max-new-bytes", "24",
            "--no-stop-at-eos"]
    assert main(args) == 0
    plain_out = capsys.readouterr().out
    assert main(args + ["--speculative", "3", "--draft-threshold", "patch"]) == 0
    assert capsys.readouterr().out == plain_out
    assert main(args + ["--speculative", "3", "--stream"]) == 0
    assert capsys.readouterr().out == plain_out
    assert main(args + ["--draft-threshold", "high"]) == 2


def test_drafter_cache_equals_the_entropy_model_forward():
    em = tiny_em(seed=4, window=6)
    _, patcher = entropy_setup(0)
    from torchblt.generation import IncrementalEngine

    engine = IncrementalEngine(tiny_model(0), patcher, 16, lookahead=4)
    prompts = prompts_ids(TEXT[:15], "ab")
    drafter = spec.Drafter(em, engine)
    drafter.prefill(prompts, None)
    assert not drafter.shared  # another entropy model than the patcher's: its own cache
    texts = [list(p) for p in prompts]
    steps = [[70, 80], [EOS_ID, 90], [71, 72], [73, 74]]
    for step in steps:
        logits = drafter.step(torch.tensor(step))
        for b, t in enumerate(step):
            texts[b].append(t)
            ref = em(torch.tensor([texts[b]]))[0, -1]
            torch.testing.assert_close(logits[b], ref, atol=1e-4, rtol=0)
    # roll row 0 back 3 bytes and row 1 back 1; step again
    pos = drafter.pos - torch.tensor([3, 1])
    docs = torch.tensor([sum(t == EOS_ID for t in texts[b][: int(pos[b])]) for b in range(2)])
    drafter.rollback(pos, docs)
    texts = [t[: int(p)] for t, p in zip(texts, pos)]
    logits = drafter.step(torch.tensor([75, 76]))
    for b, t in enumerate([75, 76]):
        texts[b].append(t)
        torch.testing.assert_close(logits[b], em(torch.tensor([texts[b]]))[0, -1], atol=1e-4, rtol=0)
    drafter.select(torch.tensor([1]))
    torch.testing.assert_close(drafter.step(torch.tensor([77]))[0], em(torch.tensor([texts[1] + [77]]))[0, -1],
                               atol=1e-4, rtol=0)


# ------------------------------------------------------------------ sampling


class TableDrafter(TextDrafter):
    """Proposes from a distortion ``q`` of the BLT's own filtered distribution ``p`` (a table by text):
    ``q`` flattens ``p`` on its three likeliest bytes, leaves out the fourth (reachable only through the
    rejection rule's residual) and puts mass on a byte ``p`` never gives (always rejected)."""

    table: dict[tuple[int, ...], torch.Tensor] = {}
    temperature = 1.0

    def propose(self, logits, text, row):
        p = self.table.get(tuple(text))
        if p is None:
            return
        top = torch.argsort(p, descending=True)
        q = torch.zeros_like(p)
        q[top[:3]] = p[top[:3]] ** 0.3
        q[top[-1]] = q[top[:3]].sum() * 0.3  # top[-1]: a byte outside p's support
        logits.copy_(self.temperature * torch.log(q.float() + 1e-30).clamp(min=-1e4))


def target_tables(model, patcher, prompt: list[int], cfg: GenerationConfig):
    """The BLT's filtered next-byte distribution after every prefix of 0..2 new bytes it can produce, and
    the probability of every 3-byte continuation (the full recompute)."""
    table: dict[tuple[int, ...], torch.Tensor] = {}
    joint = {(): 1.0}
    for _ in range(3):
        prefixes = list(joint)
        logits = FullRecomputeEngine(model, patcher).start([prompt + list(p) for p in prefixes])
        probs = torch.softmax(filter_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p), -1).double()
        table.update({tuple(prompt) + p: probs[i] for i, p in enumerate(prefixes)})
        joint = {p + (int(t),): joint[p] * float(probs[i, t]) for i, p in enumerate(prefixes)
                 for t in torch.nonzero(probs[i]).flatten()}
    return table, joint


def chi_square_p(counts: dict, probs: dict, n: int) -> float:
    """The p-value of Pearson's chi-square test of ``counts`` against ``probs`` (the least likely cells
    pooled so that every expected count is >= 5)."""
    assert set(counts) <= set(probs), "a continuation the BLT gives probability 0"
    stat, dof, pool_e, pool_o = 0.0, -1, 0.0, 0
    for c in sorted(probs, key=lambda c: probs[c]):
        pool_e, pool_o = pool_e + probs[c] * n, pool_o + counts.get(c, 0)
        if pool_e >= 5:
            stat, dof, pool_e, pool_o = stat + (pool_o - pool_e) ** 2 / pool_e, dof + 1, 0.0, 0
    assert dof >= 10
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("draft", ["sample", "greedy"])
def test_sampled_bytes_follow_the_blt_distribution(draft, monkeypatch):
    model, patcher = entropy_setup(5)
    prompt = prompts_ids("The q")[0]
    # 4 new bytes: the first is the BLT's own (from the prompt), the next two are drafts or their
    # replacements; the test is on the first three
    cfg = GenerationConfig(max_new_bytes=4, temperature=1.3, top_k=4, seed=1234, stop_at_eos=False,
                           speculative=2, draft=draft)
    table, joint = target_tables(model, patcher, prompt, cfg)
    monkeypatch.setattr(TableDrafter, "table", table)
    monkeypatch.setattr(TableDrafter, "temperature", cfg.temperature)
    monkeypatch.setattr(spec, "Drafter", TableDrafter)
    n = 3000
    stats = spec.SpeculativeStats(2)
    steps = spec.speculative_steps(model, [prompt] * n, patcher, cfg, row_generators(n, torch.device("cpu"), cfg.seed),
                                   StopCondition(4, [], False), False, stats=stats)
    rows: list[list[int]] = [[] for _ in range(n)]
    for event in steps:
        if event[0] != "prompt_starts":
            rows[event[0]].append(event[1])
    counts: dict[tuple, int] = {}
    for r in rows:
        counts[tuple(r[:3])] = counts.get(tuple(r[:3]), 0) + 1
    assert chi_square_p(counts, joint, n) > 1e-3
    # both branches of the rule ran: drafts kept and drafts rejected
    assert 0 < stats.accepted[0] < stats.drafted[0] and 0 < stats.accepted[1] < stats.drafted[1]


def test_sampling_rows_are_reproducible_and_batch_independent():
    model, patcher = entropy_setup(6)
    prompts = prompts_ids(*PROMPTS)
    cfg = dict(max_new_bytes=30, temperature=0.9, top_p=0.9, stop_at_eos=False, speculative=3,
               draft_threshold="patch")
    batch = generate_tokens(model, prompts, patcher, config=GenerationConfig(seed=7, **cfg))
    again = generate_tokens(model, prompts, patcher, config=GenerationConfig(seed=7, **cfg))
    assert batch.tokens == again.tokens
    alone = generate_tokens(model, prompts[1:2], patcher, config=GenerationConfig(seed=8, **cfg))
    assert alone.tokens[0] == batch.tokens[1]


def test_bad_options():
    model, patcher = entropy_setup(0)
    prompts = prompts_ids("ab")
    for bad, match in ((dict(speculative=-1), "speculative"), (dict(speculative=2.5), "speculative"),
                       (dict(speculative=2, draft="beam"), "draft"),
                       (dict(speculative=2, draft_threshold="high"), "draft_threshold"),
                       (dict(speculative=2, use_cache=False), "use_cache")):
        with pytest.raises(ValueError, match=match):
            generate_tokens(model, prompts, patcher, config=GenerationConfig(**bad))
    space = Patcher("space")
    with pytest.raises(ValueError, match="entropy model"):
        generate_tokens(model, prompts, space, config=GenerationConfig(speculative=2))
    space.entropy_model = tiny_em()
    with pytest.raises(ValueError, match="draft_threshold='patch'"):
        generate_tokens(model, prompts, space, config=GenerationConfig(speculative=2, draft_threshold="patch"))
