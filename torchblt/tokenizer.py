"""Tokenizers. The byte tokenizer: UTF-8 bytes shifted by 4, plus the four BLT special ids.

Token ids: BOE 0 (pad / "beginning of entity"), BOS 1, EOS 2, BPE 3 (delimiter), byte ``b`` -> ``b + 4``;
vocabulary size 260. ``encode`` accepts ``str`` (encoded as UTF-8; lone surrogates, which have no UTF-8
form, are dropped exactly as the reference does) or ``bytes`` (taken as they are, so invalid UTF-8
survives a round trip through :meth:`ByteTokenizer.decode_bytes`). ``decode`` never raises: special ids
are skipped and invalid UTF-8 is dropped (Python's ``errors="ignore"``, the reference's behaviour) or
replaced, as asked.

:class:`BPEDelimitedTokenizer` is the reference's ``bpe_delim`` mode: a SentencePiece model (supplied by
the user) splits the text into pieces and each piece is emitted as ``[BPE] + its bytes``.

:class:`BPETokenizer` is the BPE baseline's (:mod:`torchblt.baselines.bpe`): a byte-level BPE tokenizer
(Hugging Face ``tokenizers``, imported when one is loaded) whose ids 0, 1, 2 are the specials ``<boe>``
(padding), ``<bos>``, ``<eos>``, as in the byte vocabulary. Text that is not valid UTF-8 is tokenized
after replacing the bad bytes (U+FFFD).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

BOE_ID = 0
BOS_ID = 1
EOS_ID = 2
BPE_ID = 3
OFFSET = 4
VOCAB_SIZE = 256 + OFFSET

__all__ = [
    "BOE_ID",
    "BOS_ID",
    "EOS_ID",
    "BPE_ID",
    "OFFSET",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "BPEDelimitedTokenizer",
    "BPETokenizer",
    "BPE_SPECIALS",
    "load_bpe_tokenizer",
]

BPE_SPECIALS = ("<boe>", "<bos>", "<eos>")  # ids BOE_ID, BOS_ID, EOS_ID of a BPETokenizer


def _to_bytes(text: str | bytes | bytearray | memoryview) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8", errors="ignore")
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise TypeError(f"text must be str or bytes, got {type(text).__name__}")


class ByteTokenizer:
    """UTF-8 byte tokenizer with BLT's special ids.

    ``add_bos``/``add_eos`` given to the constructor are the defaults of :meth:`encode` (both ``True``, as
    in the reference); each call may override them.
    """

    boe_id = BOE_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    bpe_id = BPE_ID
    offset = OFFSET
    vocab_size = VOCAB_SIZE

    def __init__(self, add_bos: bool = True, add_eos: bool = True) -> None:
        self.add_bos = add_bos
        self.add_eos = add_eos

    def encode(
        self,
        text: str | bytes,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
    ) -> list[int]:
        """Token ids of ``text``: ``[BOS] + [b + 4 for b in utf8(text)] + [EOS]`` by default."""
        ids = [b + OFFSET for b in _to_bytes(text)]
        return self._wrap(ids, add_bos, add_eos)

    def _wrap(self, ids: list[int], add_bos: bool | None, add_eos: bool | None) -> list[int]:
        if self.add_bos if add_bos is None else add_bos:
            ids.insert(0, BOS_ID)
        if self.add_eos if add_eos is None else add_eos:
            ids.append(EOS_ID)
        return ids

    def decode_bytes(self, ids: Iterable[int], cut_at_eos: bool = False) -> bytes:
        """The raw bytes of ``ids``: special ids (< 4) dropped, everything else ``id - 4``.

        Ids outside ``[0, 260)`` are dropped too, so this never raises on model output.
        """
        out = bytearray()
        for t in ids:
            t = int(t)
            if cut_at_eos and t == EOS_ID:
                break
            if OFFSET <= t < VOCAB_SIZE:
                out.append(t - OFFSET)
        return bytes(out)

    def decode(self, ids: Iterable[int], cut_at_eos: bool = False, errors: str = "ignore") -> str:
        """Text of ``ids``. Invalid UTF-8 is dropped (``errors="ignore"``, the reference) or replaced.

        ``cut_at_eos`` stops at the first EOS (the EOS itself carries no text).
        """
        return self.decode_bytes(ids, cut_at_eos=cut_at_eos).decode("utf-8", errors=errors)

    def get_vocab_size(self) -> int:
        return VOCAB_SIZE

    def __repr__(self) -> str:
        return f"ByteTokenizer(add_bos={self.add_bos}, add_eos={self.add_eos})"


class BPEDelimitedTokenizer(ByteTokenizer):
    """Bytes with a BPE delimiter (id 3) before every SentencePiece piece (the reference's ``bpe_delim``).

    Pieces are those of ``sentencepiece`` ``encode(text, out_type=str)``; a run of leading ``"▁"`` pieces is
    merged into the following piece and ``"▁"`` becomes a space, so the bytes of the pieces concatenate to
    the text. Used with the ``bpe`` patching mode, where each delimiter ends a patch.
    """

    def __init__(self, model_path: str, add_bos: bool = True, add_eos: bool = True) -> None:
        super().__init__(add_bos=add_bos, add_eos=add_eos)
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "BPEDelimitedTokenizer needs sentencepiece: pip install 'torchblt[bpe]'"
            ) from e
        import os

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)

    def pieces(self, text: str) -> list[str]:
        raw: Sequence[str] = self.sp.encode(text, out_type=str)
        merged: list[str] = []
        pending = ""
        for piece in raw:
            if piece == "▁":  # a lone word-start marker: glue it to the next piece
                pending += piece
                continue
            merged.append(pending + piece)
            pending = ""
        if pending:
            merged.append(pending)
        return [p.replace("▁", " ") for p in merged]

    def encode(
        self,
        text: str | bytes,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
    ) -> list[int]:
        if not isinstance(text, str):
            text = _to_bytes(text).decode("utf-8", errors="ignore")
        ids: list[int] = []
        for piece in self.pieces(text):
            ids.append(BPE_ID)
            ids.extend(b + OFFSET for b in piece.encode("utf-8", errors="ignore"))
        return self._wrap(ids, add_bos, add_eos)


class BPETokenizer:
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer`` JSON file) with our special ids."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("the BPE baseline needs tokenizers: pip install 'torchblt[eval]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such tokenizer file")
        try:
            self.tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises its own exception types
            raise ValueError(f"{self.path}: not a tokenizers JSON file ({e})") from None
        ids = [self.tok.token_to_id(s) for s in BPE_SPECIALS]
        if ids != [BOE_ID, BOS_ID, EOS_ID]:
            raise ValueError(f"{self.path}: special tokens {BPE_SPECIALS} must have ids 0, 1, 2, got {ids}")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        return self.tok.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int) -> int:
        """Bytes a token stands for (byte-level BPE: one character of its string per byte)."""
        return len(self.tok.id_to_token(token_id))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i > EOS_ID], skip_special_tokens=True)

    def bytes_per_token(self, documents: Iterable[bytes | str]) -> float:
        n_bytes = n_tokens = 0
        for doc in documents:
            data = doc.encode("utf-8") if isinstance(doc, str) else bytes(doc)
            n_bytes += len(data)
            n_tokens += len(self.encode(data))
        return n_bytes / max(n_tokens, 1)


@lru_cache(maxsize=8)
def load_bpe_tokenizer(path: str) -> BPETokenizer:
    """The :class:`BPETokenizer` of ``path`` (cached: models and loaders of one run share it)."""
    return BPETokenizer(path)
