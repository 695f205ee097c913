"""One JSONL record read as a stream: the text field of a line too long to parse in memory.

A JSONL line of hundreds of MB would need several copies of itself in memory to go through
``json.loads`` (bytes, str, the decoded value, its encoding). :func:`stream_record` instead reads the
line in blocks of 1 MiB (never past its newline) and walks the JSON object: other fields are skipped
(strings scanned, nested objects and arrays balanced, scalars checked with ``json.loads``), and the value
of ``text_field`` is decoded straight into a temporary file, which then serves the document's pieces by
byte range (like a text file). Strings are decoded a block at a time: a regular expression takes the
longest run of complete tokens (plain bytes, escapes, a surrogate pair as one token) and ``json.loads``
decodes the run, so both run at C speed. Memory stays a few MB whatever the line.

The result equals ``json.loads`` + UTF-8 encoding as :mod:`torchblt.data.sources` does it: invalid UTF-8
bytes in the string are kept, lone surrogates from ``\\u`` escapes are dropped (and reported), raw control
characters inside strings and malformed structure are a bad record, a repeated key keeps its last value.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import weakref
from dataclasses import dataclass
from typing import IO

__all__ = ["RecordText", "TempText", "stream_record"]

_BLOCK = 1 << 20
_HEX = rb"[0-9a-fA-F]"
_SCALAR_END = re.compile(rb"[,}\]\s]")
# one or more complete tokens of a JSON string's content: plain bytes, a simple escape, a surrogate pair, a
# \\u escape that is not a high surrogate, or a lone high surrogate (seen to be followed by no low one)
_STRING_RUN = re.compile(
    rb'(?:[^"\\\x00-\x1f]++|\\["\\/bfnrt]|\\u[dD][89abAB]' + _HEX + rb"{2}\\u[dD][c-fC-F]" + _HEX + rb"{2}"
    rb"|\\u(?![dD][89abAB])" + _HEX + rb"{4}|\\u[dD][89abAB]" + _HEX + rb'{2}(?=[^\\]|\\[^u]|\\u[^dD]|\\u[dD][^c-fC-F]))*+'
)
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_NOT_RAW = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # (U+DC80-DCFF: a raw invalid byte, escaped)


def json_text_bytes(value: str, raw_invalid: bool) -> tuple[bytes, bool]:
    """The bytes of a decoded JSON string and whether lone surrogates (from ``\\u`` escapes) were dropped.
    ``raw_invalid``: its source held invalid UTF-8, decoded with ``surrogateescape``: those bytes come back
    as they were (so an escaped lone U+DC80-DCFF next to them is taken for one: a byte)."""
    try:
        return value.encode("utf-8", "surrogateescape" if raw_invalid else "strict"), False
    except UnicodeEncodeError:
        pattern = _SURROGATE_NOT_RAW if raw_invalid else _SURROGATE
        return pattern.sub("", value).encode("utf-8", "surrogateescape"), True


def _decode_run(run: bytes) -> tuple[bytes, bool, bool]:
    """A run of complete string tokens (``_STRING_RUN``), decoded: (bytes, lone surrogates dropped,
    invalid UTF-8 kept)."""
    try:
        text, raw_invalid = run.decode("utf-8"), False
    except UnicodeDecodeError:
        text, raw_invalid = run.decode("utf-8", "surrogateescape"), True
    return *json_text_bytes(json.loads('"' + text + '"') if "\\" in text else text, raw_invalid), raw_invalid


def _char_start(buf: bytes, lo: int, end: int) -> int:
    """``end``, or the start of a UTF-8 character that the bytes before ``end`` hold only in part."""
    i = end - 1
    while i >= lo and i > end - 4 and buf[i] & 0xC0 == 0x80:
        i -= 1
    if i >= lo and buf[i] >= 0xC0 and end - i < (2 if buf[i] < 0xE0 else 3 if buf[i] < 0xF0 else 4):
        return i
    return end


class TempText:
    """A temporary file holding a document's text (a streamed record's, or one the loader spilled); deleted when
    nothing refers to it any more."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="torchblt-record-", suffix=".txt")
        os.close(fd)
        self.size = 0
        self.record: tuple[int, bool, bool] = (0, False, False)  # (line length, lone surrogates, invalid UTF-8)
        self._finalizer = weakref.finalize(self, _unlink, self.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@dataclass
class RecordText:
    """What :func:`stream_record` found: ``status`` ``"ok"`` (``text`` holds the bytes), or the bad-record
    reason (``"bad_json"``, ``"missing_field"``, ``"not_text"``, ``"empty"``) with ``detail``;
    ``length``: bytes of the line including its newline."""

    status: str
    length: int
    text: TempText | None = None
    detail: str = ""
    lone_surrogates: bool = False
    invalid_utf8: bool = False  # the text holds bytes that are not valid UTF-8 (kept)


class _BadJson(ValueError):
    pass


class _Scanner:
    """A window on one line of ``f``: ``buf[pos:]`` is what is not consumed yet. The line is read with
    ``readline(_BLOCK)``, so the scanner never reads past its newline: ``f`` ends just after the line
    (no seek back, which a gzip file could only do by decompressing again from its start)."""

    def __init__(self, f: IO[bytes], head: bytes) -> None:
        self.f, self.buf, self.pos, self.before = f, head, 0, 0  # before: bytes of the line dropped from buf
        self.invalid = False  # the last string held invalid UTF-8
        self.ended = head.endswith(b"\n")  # the newline is in buf: nothing more to read

    def fill(self, n: int) -> bool:
        """At least ``n`` bytes from pos in the buffer (False at the end of the line or of the file)."""
        while len(self.buf) - self.pos < n:
            more = b"" if self.ended else self.f.readline(_BLOCK)
            if not more:
                return False
            self.ended = more.endswith(b"\n")
            self.before += self.pos
            self.buf, self.pos = self.buf[self.pos :] + more, 0
        return True

    def peek(self) -> int | None:
        return self.buf[self.pos] if self.fill(1) else None

    def ws(self) -> None:
        while (c := self.peek()) is not None and c in b" \t\r":
            self.pos += 1

    def take(self, ch: bytes) -> None:
        if self.peek() != ch[0]:
            raise _BadJson(f"expected {ch.decode()!r} at byte {self.offset}")
        self.pos += 1

    @property
    def offset(self) -> int:
        return self.before + self.pos

    def string(self, out: IO[bytes] | None, collect: bool) -> tuple[bytes, bool]:
        """A JSON string at pos (after its quote is checked): decoded into ``out`` and/or returned
        (``collect``); returns (bytes if collected, whether lone surrogates were dropped).

        Runs of complete tokens (plain bytes, escapes, surrogate pairs as one token) are matched by
        :data:`_STRING_RUN` and decoded by ``json.loads``, a block at a time; a run stops before an escape
        the buffer does not hold whole (or a high surrogate whose next token is not there yet)."""
        self.take(b'"')
        parts: list[bytes] = []
        lone = False
        self.invalid = False
        while True:
            if not self.fill(1):
                raise _BadJson("unterminated string")
            end = _STRING_RUN.match(self.buf, self.pos).end()
            if end == len(self.buf):
                end = _char_start(self.buf, self.pos, end)  # (a character cut by the buffer's end waits)
            if end > self.pos:
                data, dropped, invalid = _decode_run(self.buf[self.pos : end])
                lone |= dropped
                self.invalid |= invalid  # (runs end on character boundaries: invalid bytes are in one run)
                if out is not None:
                    out.write(data)
                if collect:
                    parts.append(data)
                self.pos = end
                continue
            # no token at pos: the closing quote, a token the buffer does not hold whole yet, or an error
            c = self.buf[self.pos]
            if c == ord('"'):
                self.pos += 1
                return b"".join(parts), lone
            held = len(self.buf) - self.pos
            if held < 13 and (self.fill(13) or len(self.buf) - self.pos > held):
                continue
            if c == ord("\\"):
                raise _BadJson(f"invalid escape at byte {self.offset}")
            if c < 0x20:
                raise _BadJson(f"control character in a string at byte {self.offset}")
            raise _BadJson("unterminated string")  # (a character cut by the end of the line)

    def skip_value(self) -> str:
        """Skip one JSON value; returns its type name (as ``type(json.loads(v)).__name__`` would be)."""
        c = self.peek()
        if c == ord('"'):
            self.string(None, False)
            return "str"
        if c in (ord("{"), ord("[")):
            close = b"}" if c == ord("{") else b"]"
            self.pos += 1
            self.ws()
            if self.peek() == close[0]:
                self.pos += 1
                return "dict" if close == b"}" else "list"
            while True:
                self.ws()
                if close == b"}":
                    self.string(None, False)
                    self.ws()
                    self.take(b":")
                    self.ws()
                self.skip_value()
                self.ws()
                if self.peek() == ord(","):
                    self.pos += 1
                    continue
                self.take(close)
                return "dict" if close == b"}" else "list"
        return self.scalar()

    def scalar(self) -> str:
        while True:  # (fill may move the buffer; the token starts at pos throughout)
            m = _SCALAR_END.search(self.buf, self.pos)
            if m is not None or not self.fill(len(self.buf) - self.pos + 1):
                break
        end = m.start() if m is not None else len(self.buf)
        token = self.buf[self.pos : end]
        try:
            value = json.loads(token)
        except ValueError:
            raise _BadJson(f"invalid value {token[:20]!r}") from None
        self.pos = end
        return "NoneType" if value is None else type(value).__name__


def _to_line_end(s: _Scanner) -> int:
    """Consume through the newline; returns the line's length."""
    while True:
        i = s.buf.find(b"\n", s.pos)
        if i >= 0:
            s.pos = i + 1
            return s.offset
        s.pos = len(s.buf)
        if not s.fill(1):
            return s.offset


def skip_record(f: IO[bytes], head: bytes) -> int:
    """The length of a line whose first bytes ``head`` were read, consuming the rest of it."""
    return _to_line_end(_Scanner(f, head))


def stream_record(f: IO[bytes], head: bytes, text_field: str) -> RecordText:
    """The ``text_field`` of the JSONL line whose first bytes ``head`` were read from ``f`` (the rest of
    the line is read from ``f``, which ends just after the line)."""
    s = _Scanner(f, head)
    key = text_field.encode("utf-8")
    text: TempText | None = None
    found: str | None = None  # type of the last value of text_field
    lone = invalid = False
    try:
        s.ws()
        if s.peek() in (None, ord("\n")):
            return RecordText("empty", _to_line_end(s), detail="blank line")
        if s.peek() != ord("{"):
            kind = s.skip_value()
            return RecordText("bad_json", _to_line_end(s), detail=f"a JSON {kind}, not an object")
        s.pos += 1
        s.ws()
        if s.peek() == ord("}"):
            s.pos += 1
        else:
            while True:
                s.ws()
                name, _ = s.string(None, True)
                s.ws()
                s.take(b":")
                s.ws()
                if name == key:  # the field: decoded into a fresh file (a repeated key keeps the last value)
                    if s.peek() == ord('"'):
                        text = TempText()
                        with open(text.path, "wb") as out:
                            _, lone = s.string(out, False)
                            invalid = s.invalid
                            text.size = out.tell()
                        found = "str"
                    else:
                        text, found = None, s.skip_value()
                else:
                    s.skip_value()
                s.ws()
                if s.peek() == ord(","):
                    s.pos += 1
                    continue
                s.take(b"}")
                break
        s.ws()
        if s.peek() not in (None, ord("\n")):
            raise _BadJson(f"extra data at byte {s.offset}")
    except _BadJson as e:
        return RecordText("bad_json", _to_line_end(s), detail=str(e))
    length = _to_line_end(s)
    if found is None or found == "NoneType":
        return RecordText("missing_field", length, detail=f"no field {text_field!r}")
    if found != "str":
        return RecordText("not_text", length, detail=f"field {text_field!r} is a {found}")
    assert text is not None
    if text.size == 0:
        return RecordText("empty", length, lone_surrogates=lone)
    return RecordText("ok", length, text=text, lone_surrogates=lone, invalid_utf8=invalid)
