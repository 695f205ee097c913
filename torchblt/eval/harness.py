"""lm-evaluation-harness adapter: importing this module registers the model type ``blt``.

    import torchblt.eval.harness  # registers "blt"
    lm_eval.simple_evaluate(model="blt", model_args="pretrained=DIR,entropy_model=DIR", tasks=[...])

or from the shell ``blt harness --model_args pretrained=DIR --tasks hellaswag`` (``lm_eval``'s own CLI
with ``blt`` registered). ``pretrained`` is anything :func:`torchblt.load_model` reads: a BLT (patched
as its config says; entropy patching needs ``entropy_model`` unless the folder has one), a byte LM or
a BPE baseline model.

* ``loglikelihood(context, continuation)``: the sequence is ``[BOS] + context bytes + continuation bytes``;
  the log-probabilities of the continuation's bytes are summed (``is_greedy``: every continuation byte
  is the argmax). Bytes concatenate exactly, so there is no token-boundary problem.
* ``loglikelihood_rolling(text)``: ``[BOS] + text bytes`` (no EOS), every byte scored once with the
  sliding windows of :mod:`torchblt.eval.bpb` (the same code as ``blt eval``); the harness's
  ``bits_per_byte`` therefore equals :func:`~torchblt.eval.bpb.evaluate_bpb` with ``count_eos=False``.
* ``generate_until(context, gen_kwargs)``: :func:`torchblt.generate` (the KV-cached generator) with
  ``until`` as stop strings, ``max_gen_toks`` as new bytes, greedy unless ``do_sample``/``temperature``
  say otherwise. Byte and BPE LMs use a plain full-recompute loop.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

try:
    import lm_eval.models  # noqa: F401  (the harness fills its own registry lazily; load it before adding ours)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - optional extra
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install 'torchblt[eval]'") from e

from torchblt.eval.bpb import score_sequences
from torchblt.model.blt import BLT
from torchblt.model.config import BPEConfig
from torchblt.patching import Patcher
from torchblt.tokenizer import BOS_ID, EOS_ID, OFFSET

__all__ = ["BLTLM"]


def _to_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y")
    return bool(value)


@register_model("blt", "torchblt")
class BLTLM(LM):
    """lm-eval model over a torchblt model (BLT, byte LM or BPE LM)."""

    def __init__(
        self,
        pretrained: str | None = None,
        entropy_model: str | None = None,
        model: nn.Module | None = None,
        device: str | None = None,
        dtype: str = "fp32",
        batch_size: int | str | None = 8,
        context_bytes: int | str | None = None,
        max_gen_bytes: int | str = 256,
        use_cache: bool | str = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)  # the harness passes these for every model type
        kwargs.pop("trust_remote_code", None)
        if kwargs:
            raise ValueError(f"blt model_args: unknown argument(s) {sorted(kwargs)}; known: pretrained, entropy_model, "
                             "device, dtype, batch_size, context_bytes, max_gen_bytes, use_cache")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval passes its default device ("cuda") to every model type; like its HF model, fall back
            warnings.warn(f"blt: device {device!r} is not available, using cpu", stacklevel=2)
            device = "cpu"
        self._device = torch.device(device or "cpu")
        em = None  # an entropy model for a live BLT (a loaded one comes with its own)
        if model is None:
            if not pretrained:
                raise ValueError("blt model_args: pretrained=DIR is required")
            from torchblt import load_model

            model = load_model(str(pretrained), device=str(self._device), dtype=dtype, entropy_model=entropy_model)
        elif entropy_model is not None and isinstance(model, BLT):
            from torchblt import load_model

            em = load_model(entropy_model, device=str(self._device), dtype=dtype)
        self.model = model.eval()
        self.patcher = Patcher.for_model(model, entropy_model=em) if isinstance(model, BLT) else None
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 8
        self.batch_size = int(batch_size)
        self.context_bytes = None if context_bytes in (None, "", "None") else int(context_bytes)
        self.max_gen_bytes = int(max_gen_bytes)
        self.use_cache = _to_bool(use_cache)
        if self.batch_size < 1 or self.max_gen_bytes < 0:
            raise ValueError("blt model_args: batch_size must be >= 1 and max_gen_bytes >= 0")

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "torchblt-bytes"

    # ------------------------------------------------------------------ scoring
    def _encode(self, text: str) -> list[int]:
        if isinstance(self.model.config, BPEConfig):  # a BPE model brings its tokenizer
            return self.model.config.encode_text(text)
        return [b + OFFSET for b in text.encode("utf-8", errors="ignore")]

    def _score(self, sequences: list[list[int]], first_targets: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return score_sequences(
            self.model, sequences, first_targets=first_targets, patcher=self.patcher, context_bytes=self.context_bytes,
            batch_size=self.batch_size, device=self._device,
        )

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        sequences, firsts, empty = [], [], []
        for i, req in enumerate(requests):
            context, continuation = req.args
            ctx = [BOS_ID, *self._encode(context)]
            cont = self._encode(continuation)
            if not cont:
                empty.append(i)
            sequences.append(ctx + cont)
            firsts.append(len(ctx))
        scored = self._score(sequences, firsts)
        out = []
        for i, (lp, greedy) in enumerate(scored):
            out.append((0.0, True) if i in empty else (float(lp.double().sum()), bool(greedy.all())))
            if self.cache_hook is not None and hasattr(requests[i], "args"):
                self.cache_hook.add_partial("loglikelihood", requests[i].args, out[-1])
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        sequences = [[BOS_ID, *self._encode(req.args[0])] for req in requests]
        scored = self._score(sequences, [1] * len(sequences))
        out = [float(lp.double().sum()) for lp, _ in scored]
        for req, value in zip(requests, out):
            if self.cache_hook is not None:
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, value)
        return out

    # ------------------------------------------------------------------ generation
    def _gen_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, float]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_bytes))
        do_sample = _to_bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not do_sample:
            temperature = 0.0
        return list(until), max_new, temperature

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            until, max_new, temperature = self._gen_settings(req.args[1])
            groups.setdefault((tuple(until), max_new, temperature), []).append(i)
        for (until, max_new, temperature), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [requests[i].args[0] for i in chunk]
                texts = self._generate(prompts, list(until), max_new, temperature)
                for i, text in zip(chunk, texts):
                    results[i] = text
                    if self.cache_hook is not None:
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [r if r is not None else "" for r in results]

    def _generate(self, prompts: list[str], until: list[str], max_new: int, temperature: float) -> list[str]:
        if isinstance(self.model, BLT):
            from torchblt import generate

            return generate(self.model, prompts, self.patcher, max_new_bytes=max_new, stop=until, temperature=temperature,
                            seed=0 if temperature > 0 else None, use_cache=self.use_cache)
        return [self._generate_lm(p, until, max_new, temperature) for p in prompts]

    @torch.no_grad()
    def _generate_lm(self, prompt: str, until: list[str], max_new: int, temperature: float) -> str:
        """Full-recompute decoding for byte / BPE LMs (no cache): one forward per new token."""
        decode = self.model.config.decode_ids if isinstance(self.model.config, BPEConfig) else None
        tokens = [BOS_ID, *self._encode(prompt)]
        new: list[int] = []
        generator = torch.Generator(device="cpu").manual_seed(0)
        text = ""
        for _ in range(max_new):
            window = tokens[-self.context_bytes:] if self.context_bytes else tokens
            logits = self.model(torch.tensor([window], device=self._device))[0, -1].float()
            if temperature > 0:
                nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1).cpu(), 1, generator=generator))
            else:
                nxt = int(logits.argmax())
            if nxt == EOS_ID:
                break
            tokens.append(nxt)
            new.append(nxt)
            text = decode(new) if decode is not None else bytes(t - OFFSET for t in new if t >= OFFSET).decode(
                "utf-8", errors="ignore")
            cut = [text.find(s) for s in until if s and s in text]
            if cut:
                return text[: min(cut)]
        return text
