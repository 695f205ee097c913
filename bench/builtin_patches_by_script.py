"""Why the built-in model's patches are ~16 bytes on Russian and Bulgarian: entropies per UTF-8 byte class.

For each language's held-out fortunes (or its first held-out source), the first ``--bytes`` bytes (not the English ASCII-art file) are run
through the built-in entropy model in 512-byte windows (BOS first, as the patcher does) and each byte's
*preceding* entropy (the one that decides whether it starts a patch) is grouped by what the byte is: ASCII,
a UTF-8 lead byte, a continuation byte. Printed per language: bytes per patch at the calibrated threshold,
the share of patch starts that fall on a continuation byte (inside a character), the share that fall on a
word's first letter, patches per word, the mean entropy before each byte class and before a word's first
letter, nats per character, and the threshold that would give 4.5 bytes per patch on that language.

    python bench/builtin_patches_by_script.py --corpus /work/data/corpus [--bytes 24576]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from torchblt import load_model
from torchblt.tokenizer import BOS_ID, OFFSET

WINDOW = 512
WORD_BREAK = set(b" \n\t\"'(-")


def held_out(corpus: Path, lang: str, n_bytes: int) -> bytes:
    root = corpus / "valid" / lang
    sources = sorted(p for p in root.iterdir() if p.is_dir())
    src = next((s for s in sources if s.name.startswith("fortunes")), sources[0])
    files = [p for p in sorted(src.glob("*.txt")) if "ascii-art" not in p.name]  # pictures, not English text
    return b"".join(p.read_bytes() for p in files)[:n_bytes]


def analyse(data: bytes, em: torch.nn.Module, threshold: float) -> dict:
    parts = []
    for i in range(0, len(data), WINDOW):
        chunk = data[i : i + WINDOW]
        tokens = torch.tensor([[BOS_ID] + [b + OFFSET for b in chunk]])
        with torch.no_grad():
            parts.append(em.entropies(tokens)[0, :-1])  # entry j: the entropy before byte j of the chunk
    e = torch.cat(parts)
    b = torch.tensor(list(data))
    cont = (b >= 0x80) & (b < 0xC0)
    lead = b >= 0xC0
    ascii_ = b < 0x80
    starts = e > threshold

    def deciding(j: int) -> bool:  # the byte that picks a word's first letter: the letter (ASCII) or the
        # continuation byte of a 2-byte letter (Cyrillic, accented Latin)
        if data[j] < 0x80 and chr(data[j]).isalpha():
            return j == 0 or data[j - 1] in WORD_BREAK
        if cont[j] and j >= 1 and lead[j - 1]:
            return j == 1 or data[j - 2] in WORD_BREAK
        return False

    initial = torch.tensor([deciding(j) for j in range(len(data))], dtype=torch.bool)
    words = len(data.split())

    def mean(mask: torch.Tensor) -> float | None:
        return round(float(e[mask].mean()), 2) if bool(mask.any()) else None

    n = int(starts.sum())
    return {
        "bytes": len(data),
        "bytes_per_patch": round(len(data) / max(n, 1), 2),
        "bytes_per_char": round(len(data) / int((~cont).sum()), 2),
        "starts_inside_a_char": round(float((starts & cont).sum()) / max(n, 1), 3),
        "starts_on_a_first_letter": round(float((starts & initial).sum()) / max(n, 1), 3),
        "patches_per_word": round(n / max(words, 1), 2),
        "H_before_ascii": mean(ascii_),
        "H_before_lead": mean(lead),
        "H_before_continuation": mean(cont),
        "H_before_first_letter": mean(initial),
        "nats_per_char": round(float(e.sum()) / int((~cont).sum()), 2),
        "threshold_for_4.5_bytes": round(float(torch.quantile(e, 1 - 1 / 4.5)), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True, help="a `blt data corpus` folder")
    ap.add_argument("--bytes", type=int, default=24576, help="bytes per language")
    ap.add_argument("--langs", default="en,de,fr,pl,cs,ru,bg,zh,ja")
    args = ap.parse_args()
    torch.set_num_threads(2)
    em = load_model("builtin-entropy")
    threshold = load_model("builtin").config.patching.threshold
    print(f"threshold {threshold:.4f} nats (calibrated on English)")
    for lang in args.langs.split(","):
        print(lang, json.dumps(analyse(held_out(args.corpus, lang, args.bytes), em, threshold)), flush=True)


if __name__ == "__main__":
    main()
