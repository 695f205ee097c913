"""The built-in model shipped in the package: it loads by name, generates, patches, and keeps its recorded bpb."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchblt import generate, load_model
from torchblt.builtin import BUILTIN_DIR, builtin_card, builtin_path
from torchblt.builtin.package import MAX_PACKAGE_BYTES, SAMPLE, package_bytes
from torchblt.cli import main
from torchblt.eval.bpb import evaluate_bpb
from torchblt.eval.patches import compute_patches
from torchblt.model.blt import BLT
from torchblt.model.entropy_model import EntropyModel
from torchblt.patching import Patcher, attached_entropy_model

# A fixed English paragraph (not in the corpus). The recipe calibrates the threshold to a mean patch of
# 4.5 bytes on English training text; on this paragraph the shipped model must stay within this range.
PARAGRAPH = (
    "The committee met on a rainy Tuesday to discuss the new library. Everyone agreed that the old "
    "building was too small, but nobody could agree on where the money for a larger one would come "
    "from. After two hours of debate, they decided to ask the town for a loan and to hold a book sale."
)
PATCH_RANGE = (3.5, 6.0)


@pytest.fixture(scope="module")
def blt() -> BLT:
    return load_model("builtin")


def test_weights_are_package_data_in_bf16_within_budget():
    from safetensors import safe_open

    assert builtin_path("builtin") == BUILTIN_DIR and builtin_path("builtin-entropy") == BUILTIN_DIR / "entropy_model"
    assert 1_000_000 < package_bytes(BUILTIN_DIR) <= MAX_PACKAGE_BYTES
    for folder in (BUILTIN_DIR, BUILTIN_DIR / "entropy_model"):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert (BUILTIN_DIR / "README.md").is_file()
    with pytest.raises(ValueError, match="not a built-in model"):
        builtin_path("builtin-huge")


def test_load_by_name_attaches_the_entropy_model(blt):
    assert isinstance(blt, BLT) and not blt.training
    assert isinstance(attached_entropy_model(blt), EntropyModel)
    assert next(blt.parameters()).dtype == torch.float32  # bf16 weights, read back in the dtype asked for
    em = load_model("builtin-entropy")
    assert isinstance(em, EntropyModel)
    assert blt.config.hash is not None and blt.config.patching.mode == "entropy"
    card = builtin_card()
    assert blt.config.patching.threshold == pytest.approx(card["calibration"]["threshold"], rel=1e-6)


def test_first_load_in_a_fresh_process_imports_no_compiler():
    # Building on the meta device used to run nn.Embedding's normal_ and RoPE's arithmetic through PyTorch's
    # Python reference kernels, whose first use imports torch._dynamo and sympy: 3 s of a 3 s first load.
    code = ("import sys; from torchblt import load_model; load_model('builtin'); load_model('builtin-entropy'); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy', 'torch._inductor') if m in sys.modules))")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "[]"


def test_generates_text(blt):
    out = generate(blt, ["Once upon a time", "Zürich ist"], max_new_bytes=40, temperature=0.0)
    assert len(out) == 2 and all(len(t.encode()) >= 10 for t in out)
    again = generate(blt, ["Once upon a time"], max_new_bytes=40, temperature=0.0)
    assert again[0] == out[0]  # greedy is deterministic
    assert sum(c.isalpha() or c.isspace() for c in out[0]) > 0.6 * len(out[0])  # mostly words, not noise


def test_patches_an_english_paragraph_at_the_calibrated_size(blt):
    view = compute_patches(PARAGRAPH, Patcher.for_model(blt))
    mean = view.mean_patch_length  # bytes per patch, the BOS patch not counted
    assert PATCH_RANGE[0] <= mean <= PATCH_RANGE[1], mean


def test_bpb_on_the_committed_sample_matches_the_record(blt):
    recorded = builtin_card()["eval"]["sample"]["bpb"]
    res = evaluate_bpb(blt, [SAMPLE.read_bytes()], context_bytes=512, batch_size=16)
    bpb = res.nats / res.n_bytes / 0.6931471805599453
    assert bpb == pytest.approx(recorded, abs=0.01)
    assert bpb < 3.0  # a trained model, far from uniform (8.02)


def test_card_records_every_language_and_source():
    # The recorded numbers, per language and source. (The goal "below xz -9e on every language" is NOT met by
    # this 1200-step model: see docs/builtin.md; English, Japanese and Russian are below xz, the others not.)
    card = builtin_card()
    langs = card["eval"]["per_language"]
    assert set(langs) == {"en", "ru", "zh", "de", "cs", "pl", "it", "es", "bg", "fr", "ja"}
    assert len(card["eval"]["per_source"]) == 19
    for v in [*langs.values(), *card["eval"]["per_source"].values()]:
        assert 0 < v["bpb"] < 8.1 and 0 < v["xz_9e_bpb"] < 8.1 and v["bytes"] > 0
    english = langs["en"]
    assert english["bpb"] < english["xz_9e_bpb"]
    shakespeare = card["eval"]["per_source"]["shakespeare"]
    assert shakespeare["xz_9e_bpb"] - shakespeare["bpb"] >= 0.3  # English prose: the 0.3 bpb goal is met


def test_blt_info_builtin_shows_the_card(capsys):
    assert main(["info", "builtin"]) == 0
    out = capsys.readouterr().out
    assert "built-in model" in out and "held-out bits per byte" in out and "xz" in out
    assert main(["info", "builtin", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "blt" and set(info["builtin"]["held_out_bpb"]) >= {"en", "ja"}


def test_split_model_argument(tmp_path):
    from torchblt.builtin import split_model_argument

    assert split_model_argument("Once upon a time", []) == ("builtin", ["Once upon a time"])
    assert split_model_argument(None, ["a"]) == ("builtin", ["a"])
    assert split_model_argument(str(tmp_path), ["hi"]) == (str(tmp_path), ["hi"])
    assert split_model_argument("builtin-entropy", ["x"]) == ("builtin-entropy", ["x"])
    assert split_model_argument("facebook/blt-1b", ["x"]) == ("facebook/blt-1b", ["x"])
    assert split_model_argument("and/or not", []) == ("builtin", ["and/or not"])  # spaces: not a hub id
    assert split_model_argument("./my-model", ["hi"]) == ("./my-model", ["hi"])  # looks like a path: an error later
    assert split_model_argument(str(tmp_path / "gone"), ["hi"]) == (str(tmp_path / "gone"), ["hi"])
    assert split_model_argument("...", ["hi"]) == ("...", ["hi"])
    assert split_model_argument("Hello", ["world"]) == ("builtin", ["Hello", "world"])


def test_commands_default_to_the_builtin_model(capsys, tmp_path):
    assert main(["generate", "Once upon a time", "--max-new-bytes", "24"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out.strip()) > len("Once upon a time")
    assert main(["patches", "Zürich ist schön", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "Z" in out and "|" in out and "patches" in out
    sample = tmp_path / "s.txt"
    sample.write_bytes(SAMPLE.read_bytes())
    assert main(["eval", str(sample), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "builtin" and 0 < res["bpb"] < 3.0


def test_serve_defaults_to_the_builtin_model():
    from torchblt.cli import build_parser

    assert build_parser().parse_args(["serve"]).model == "builtin"
    assert build_parser().parse_args(["serve", "some/model"]).model == "some/model"


def _package_data_globs() -> list[str]:
    # pyproject.toml's [tool.setuptools.package-data] line for torchblt.builtin (read as text: tomllib is 3.11+)
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith('"torchblt.builtin" = ['))
    return json.loads(line.split("=", 1)[1])


def test_package_data_covers_every_file_of_the_builtin_model():
    # what a wheel or an editable install carries: every file under torchblt/builtin/model matches a glob
    globs = _package_data_globs()
    files = [p.relative_to(BUILTIN_DIR.parent).as_posix() for p in BUILTIN_DIR.rglob("*") if p.is_file()]
    assert {"model/model.safetensors", "model/entropy_model/model.safetensors", "model/README.md"} <= set(files)
    missed = [f for f in files if not any(Path(f).match(g) and f.count("/") == g.count("/") for g in globs)]
    assert not missed, f"not package data (add to pyproject.toml): {missed}"


@pytest.mark.slow
def test_built_wheel_carries_the_weights(tmp_path):
    # `pip wheel` of a copy of the committed tree (no install): the wheel holds the weights, byte for byte
    import shutil
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", ".venv", ".ci-venv", "build", "*.egg-info",
                                                            "__pycache__", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("torchblt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for p in BUILTIN_DIR.rglob("*"):
            if p.is_file():
                name = "torchblt/builtin/" + p.relative_to(BUILTIN_DIR.parent).as_posix()
                assert z.read(name) == p.read_bytes(), name
