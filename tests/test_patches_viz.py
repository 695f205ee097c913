"""Patch visualisation (torchblt.eval.patches, ``blt patches``): boundaries equal the patcher's; the
PNG and the HTML page are produced."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path

import pytest
import torch

from torchblt import Patcher, load_model
from torchblt.cli import main as blt_main
from torchblt.eval.patches import compute_patches, render_entropy_table, render_terminal, write_html, write_plot
from torchblt.patching import split_first_patch
from torchblt.tokenizer import ByteTokenizer

FIX = Path(__file__).parent / "fixtures" / "reference" / "05_blt_forward"
TEXT = "Hello world, the café is open. Numbers: 12345!"


@pytest.fixture(scope="module")
def em():
    return load_model(FIX / "entropy_model")


def _patcher_starts(patcher: Patcher, text: str) -> list[int]:
    tokens = torch.tensor([ByteTokenizer().encode(text, add_bos=True, add_eos=False)])
    lengths, _ = patcher.patch(tokens, include_next_token=False)
    lengths = split_first_patch(lengths)[0].tolist()
    starts = torch.cumsum(torch.tensor([0, *lengths[1:-1]]), 0).tolist()
    return [s for s, n in zip(starts, lengths[1:]) if n > 0]


@pytest.mark.parametrize(
    "patcher_kwargs",
    [dict(mode="entropy", threshold=2.6), dict(mode="entropy", threshold=2.0, max_patch_length=3),
     dict(mode="space"), dict(mode="static", patch_size=4.5)],
)
def test_boundaries_equal_the_patcher(em, patcher_kwargs):
    patcher = Patcher(entropy_model=em, **patcher_kwargs)
    view = compute_patches(TEXT, patcher, with_entropies=True)
    assert view.starts == _patcher_starts(patcher, TEXT)
    assert b"".join(view.patches) == TEXT.encode()
    assert view.patch_lengths[0] == 1 and sum(view.patch_lengths) == len(TEXT.encode()) + 1
    assert len(view.entropies) == len(TEXT.encode())


def test_entropy_shown_at_a_byte_decides_whether_it_starts(em):
    patcher = Patcher("entropy", threshold=2.6, entropy_model=em)
    view = compute_patches(TEXT, patcher)
    above = [j for j, e in enumerate(view.entropies) if j == 0 or e > 2.6]
    assert view.starts == above
    table = render_entropy_table(view).splitlines()
    assert len(table) == len(TEXT.encode()) + 1
    assert [i for i, line in enumerate(table[1:]) if line.endswith("*")] == view.starts


def test_terminal_rendering(em):
    view = compute_patches("ab cd", Patcher("space"))
    assert view.entropies is None
    assert render_terminal(view, colour=False) == "ab |cd"
    coloured = render_terminal(view, colour=True)
    assert coloured.count("\033[0m") == 2 and "ab " in coloured


def test_plot_and_html_are_written(em, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    view = compute_patches(TEXT, Patcher("entropy", threshold=2.6, entropy_model=em))
    png = write_plot(view, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 500
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_plot(view, png)
    write_plot(view, png, overwrite=True)

    page = write_html(view, tmp_path / "p.html").read_text(encoding="utf-8")
    spans = re.findall(r'<span class="p"[^>]*title="([^"]*)">([^<]*)</span>', page)
    assert len(spans) == len(view.starts)
    assert [unescape(text) for _, text in spans] == [
        p.decode("utf-8", errors="backslashreplace") for p in view.patches
    ]
    assert "entropies" in spans[0][0] and "patches (+ BOS)" in page
    with pytest.raises(FileExistsError):
        write_html(view, tmp_path / "p.html")

    no_entropy = compute_patches("ab cd", Patcher("space"))
    with pytest.raises(ValueError, match="entropies"):
        write_plot(no_entropy, tmp_path / "q.png")


def test_cli_patches(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    blt, emdir = str(FIX / "blt_model"), str(FIX / "entropy_model")
    png, page = tmp_path / "out.png", tmp_path / "out.html"
    args = ["patches", blt, TEXT, "--entropy-model", emdir, "--threshold", "2.6", "--no-color",
            "--entropies", "--plot", str(png), "--html", str(page)]
    assert blt_main(args) == 0
    out = capsys.readouterr().out.splitlines()
    patcher = Patcher("entropy", threshold=2.6, entropy_model=load_model(emdir))
    starts = _patcher_starts(patcher, TEXT)
    data = TEXT.encode()
    expected = "|".join(data[s:e].decode("utf-8", "backslashreplace") for s, e in zip(starts, [*starts[1:], len(data)]))
    assert out[0] == expected
    assert png.is_file() and page.is_file()
    assert blt_main(args) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err

    # a text file, an entropy model as MODEL, space patching
    f = tmp_path / "t.txt"
    f.write_bytes(b"one two")
    assert blt_main(["patches", emdir, "--file", str(f), "--patching", "space", "--no-color"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "one |two"
    assert blt_main(["patches", blt, "abc"]) == 2  # entropy patching, no entropy model
    assert "entropy model" in capsys.readouterr().err
    assert blt_main(["patches", blt]) == 2
    assert "either as an argument or with --file" in capsys.readouterr().err


def test_cli_patches_reads_standard_input(capsys, stdin_bytes):
    """``blt patches -``: standard input as the text (one trailing newline dropped); ``--file -``: its bytes
    as they are (the newline is a byte of the text)."""
    emdir = str(FIX / "entropy_model")
    stdin_bytes(b"one two\n")
    assert blt_main(["patches", emdir, "-", "--patching", "space", "--no-color"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "one |two"
    stdin_bytes(b"one two\n")
    assert blt_main(["patches", emdir, "--file", "-", "--patching", "space", "--no-color"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("one |two") and out[0] != "one |two" and "8 bytes" in out[1]
    stdin_bytes(b"\xffab")
    assert blt_main(["patches", emdir, "-", "--patching", "space"]) == 2
    assert "TEXT - (standard input) is not valid UTF-8 (byte 0xff at offset 0)" in capsys.readouterr().err
