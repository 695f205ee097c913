"""Bad input, command by command: every row runs ``blt`` with bad arguments or a bad file and must end
with exit code 2 and exactly one line on stderr that names the option, field or file, and no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchblt.cli import main as blt_main
from torchblt.formats.common import build_model
from torchblt.formats.native import save_model
from torchblt.model.config import config_to_dict, tiny_blt, tiny_entropy
from torchblt.patching import PatchingConfig

CUDA = torch.cuda.is_available()


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _model_folder(root: Path, name: str, change) -> Path:
    """A torchblt folder whose config.json is changed by ``change(raw)`` (weights of the tiny BLT)."""
    src = root / "blt"
    raw = json.loads((src / "config.json").read_text())
    change(raw)
    out = root / name
    out.mkdir()
    (out / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (out / "config.json").write_text(json.dumps(raw))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    cfg = tiny_blt()
    cfg.patching = PatchingConfig("space")
    torch.manual_seed(0)
    blt = build_model(cfg, "cpu")
    blt.init_weights()
    save_model(blt, root / "blt")
    em = build_model(tiny_entropy(), "cpu")
    em.init_weights()
    save_model(em, root / "em")
    f = {"blt": root / "blt", "em": root / "em", "root": root}
    f["text"] = _write(root / "text.txt", "to be or not to be, that is the question")
    f["null_config"] = _model_folder(root, "null_config", lambda r: r.update(config=None))
    f["float_dim"] = _model_folder(root, "float_dim", lambda r: r["config"]["global"].update(dim=1e9))
    f["bad_eps"] = _model_folder(root, "bad_eps", lambda r: r["config"]["encoder"].update(norm_eps="tiny"))
    f["bad_bool"] = _model_folder(root, "bad_bool", lambda r: r["config"]["cross_attn"].update(encoder="yes"))
    f["bad_threshold"] = _model_folder(root, "bad_threshold", lambda r: r["config"]["patching"].update(threshold="x"))
    f["bad_type"] = _model_folder(root, "bad_type", lambda r: r.update(model_type="gpt"))
    f["not_utf8_prompts"] = _write(root / "prompts.jsonl", b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    f["bad_json_prompts"] = _write(root / "prompts2.jsonl", b'{"prompt": "fine"}\n{"prompt": \n')
    f["malformed_yaml"] = _write(root / "malformed.yaml", "optim:\n  lr: [1e-3\n")
    f["not_utf8_yaml"] = _write(root / "latin1.yaml", b"run_dir: caf\xe9\n")
    f["list_yaml"] = _write(root / "list.yaml", "- a\n- b\n")
    f["arch_yaml"] = _write(root / "arch.yaml", "model:\n  arch:\n    base: tiny-blt\n    encoder: {norm_eps: fast}\n"
                            f"data:\n  sources: [{f['text']}]\n  patching: {{mode: space}}\n")
    f["threshold_yaml"] = _write(root / "thr.yaml", f"data:\n  sources: [{f['text']}]\n  patching: {{threshold: x}}\n")
    f["kind_yaml"] = _write(root / "kind.yaml", "model:\n  kind: os:system\n")
    f["model_list_yaml"] = _write(root / "model_list.yaml", "model: [blt]\n")
    f["null_arch"] = _write(root / "null_arch.json", json.dumps({"config": config_to_dict(cfg)}))
    return f


def _train(files, *extra: str) -> list[str]:
    return ["train", f"data.sources=[{files['text']}]", "data.patching.mode=space", f"run_dir={files['root'] / 'run'}",
            "log.progress=false", *extra]


# (case id, argv from the files, words the one line must contain)
CASES = [
    # generate
    ("generate-device", lambda f: ["generate", str(f["blt"]), "hi", "--device", "tpu"], ["--device", "'tpu'"]),
    ("generate-device-index", lambda f: ["generate", str(f["blt"]), "hi", "--device", "cuda:99"],
     ["--device", "cuda:99"]),
    ("generate-dtype", lambda f: ["generate", str(f["blt"]), "hi", "--dtype", "fp8"], ["--dtype", "'fp8'"]),
    ("generate-max-new-bytes", lambda f: ["generate", str(f["blt"]), "hi", "--max-new-bytes", "-3"],
     ["--max-new-bytes", "'-3'"]),
    ("generate-batch-size", lambda f: ["generate", str(f["blt"]), "hi", "--batch-size", "zero"], ["--batch-size"]),
    ("generate-input-missing", lambda f: ["generate", str(f["blt"]), "--input", str(f["root"] / "nope.jsonl")],
     ["--input", "nope.jsonl"]),
    ("generate-input-not-utf8", lambda f: ["generate", str(f["blt"]), "--input", str(f["not_utf8_prompts"])],
     ["prompts.jsonl:2", "UTF-8"]),
    ("generate-input-bad-json", lambda f: ["generate", str(f["blt"]), "--input", str(f["bad_json_prompts"])],
     ["prompts2.jsonl:2", "not valid JSON"]),
    ("generate-null-config", lambda f: ["generate", str(f["null_config"]), "hi"], ["config.json", "config", "None"]),
    ("generate-float-dim", lambda f: ["generate", str(f["float_dim"]), "hi"], ["config.json", "global.dim", "1000000000"]),
    ("generate-bad-eps", lambda f: ["generate", str(f["bad_eps"]), "hi"], ["config.encoder.norm_eps", "'tiny'"]),
    ("generate-bad-bool", lambda f: ["generate", str(f["bad_bool"]), "hi"], ["config.cross_attn.encoder", "'yes'"]),
    ("generate-bad-threshold", lambda f: ["generate", str(f["bad_threshold"]), "hi"],
     ["config.patching.threshold", "'x'"]),
    ("generate-model-type", lambda f: ["generate", str(f["bad_type"]), "hi"], ["config.json", "model_type", "'gpt'"]),
    ("generate-missing-model", lambda f: ["generate", str(f["root"] / "no_model"), "hi"], ["no_model"]),
    # eval
    ("eval-device", lambda f: ["eval", str(f["blt"]), str(f["text"]), "--device", "cuda:99"], ["--device", "cuda:99"]),
    ("eval-batch-size", lambda f: ["eval", str(f["blt"]), str(f["text"]), "--batch-size", "0"], ["--batch-size", "'0'"]),
    ("eval-max-docs", lambda f: ["eval", str(f["blt"]), str(f["text"]), "--max-docs", "-1"], ["--max-docs"]),
    ("eval-context", lambda f: ["eval", str(f["blt"]), str(f["text"]), "--context-bytes", "1"], ["--context-bytes"]),
    ("eval-missing-data", lambda f: ["eval", str(f["blt"]), str(f["root"] / "gone.jsonl")], ["gone.jsonl"]),
    ("eval-patching", lambda f: ["eval", str(f["blt"]), str(f["text"]), "--patching", "words"], ["--patching", "words"]),
    ("eval-patch-size", lambda f: ["eval", str(f["blt"]), str(f["text"]), "--patch-size", "-4"], ["--patch-size"]),
    ("eval-entropy-model-flag", lambda f: ["eval", str(f["em"]), str(f["text"]), "--patching", "space"],
     ["--patching", "BLT"]),
    ("eval-bad-config", lambda f: ["eval", str(f["bad_eps"]), str(f["text"])], ["config.json", "norm_eps"]),
    # entropies
    ("entropies-device", lambda f: ["entropies", "--entropy-model", str(f["em"]), "--data", str(f["text"]), "--out",
                                    str(f["root"] / "e"), "--device", "tpu"], ["--device", "'tpu'"]),
    ("entropies-dtype", lambda f: ["entropies", "--entropy-model", str(f["em"]), "--data", str(f["text"]), "--out",
                                   str(f["root"] / "e"), "--dtype", "fp8"], ["--dtype", "fp8"]),
    ("entropies-batch-tokens", lambda f: ["entropies", "--entropy-model", str(f["em"]), "--data", str(f["text"]),
                                          "--out", str(f["root"] / "e"), "--batch-tokens", "0"], ["--batch-tokens"]),
    # calibrate
    ("calibrate-target", lambda f: ["calibrate", "--entropy-model", str(f["em"]), "--data", str(f["text"]),
                                    "--target-patch-size", "-2"], ["--target-patch-size", "'-2'"]),
    ("calibrate-sample", lambda f: ["calibrate", "--entropy-model", str(f["em"]), "--data", str(f["text"]),
                                    "--target-patch-size", "3", "--sample-bytes", "0"], ["--sample-bytes"]),
    ("calibrate-device", lambda f: ["calibrate", "--entropy-model", str(f["em"]), "--data", str(f["text"]),
                                    "--target-patch-size", "3", "--device", "cuda:99"], ["--device", "cuda:99"]),
    # patches
    ("patches-file", lambda f: ["patches", str(f["blt"]), "--file", str(f["root"] / "none.txt")], ["none.txt"]),
    ("patches-patch-size", lambda f: ["patches", str(f["blt"]), "abc", "--patch-size", "0"], ["--patch-size", "'0'"]),
    ("patches-threshold", lambda f: ["patches", str(f["em"]), "abc", "--threshold", "high"], ["--threshold", "high"]),
    # info / flops
    ("info-null-config", lambda f: ["info", str(f["null_config"])], ["config.json", "config"]),
    ("info-float-dim", lambda f: ["info", str(f["float_dim"])], ["global.dim", "1000000000"]),
    ("info-patch-size", lambda f: ["info", "tiny-blt", "--patch-size", "-1"], ["--patch-size", "'-1'"]),
    ("info-unknown", lambda f: ["info", "tiny-bert"], ["tiny-bert"]),
    ("flops-context", lambda f: ["flops", "tiny-blt", "--context-bytes", "0"], ["--context-bytes", "'0'"]),
    ("flops-bpe-vocab", lambda f: ["flops", "tiny-blt", "--bpe-vocab", "1.5"], ["--bpe-vocab", "'1.5'"]),
    ("flops-malformed-yaml", lambda f: ["flops", str(f["malformed_yaml"])], ["malformed.yaml", "YAML"]),
    ("flops-not-utf8-yaml", lambda f: ["flops", str(f["not_utf8_yaml"])], ["latin1.yaml", "not UTF-8"]),
    ("flops-model-list", lambda f: ["flops", str(f["model_list_yaml"])], ["model_list.yaml", "model", "mapping"]),
    ("flops-arch", lambda f: ["flops", str(f["arch_yaml"])], ["model.arch", "encoder.norm_eps", "'fast'"]),
    ("flops-kind", lambda f: ["flops", str(f["kind_yaml"])], ["model.kind", "'os:system'"]),
    # convert
    ("convert-dtype", lambda f: ["convert", str(f["blt"]), str(f["root"] / "c"), "--dtype", "fp8"], ["--dtype", "fp8"]),
    ("convert-missing", lambda f: ["convert", str(f["root"] / "void"), str(f["root"] / "c")], ["void"]),
    ("convert-to", lambda f: ["convert", str(f["blt"]), str(f["root"] / "c"), "--to", "onnx"], ["--to", "onnx"]),
    # train (config files and overrides)
    ("train-malformed-yaml", lambda f: ["train", str(f["malformed_yaml"])], ["malformed.yaml", "YAML", "line 3"]),
    ("train-not-utf8-yaml", lambda f: ["train", str(f["not_utf8_yaml"])], ["latin1.yaml", "not UTF-8"]),
    ("train-list-yaml", lambda f: ["train", str(f["list_yaml"])], ["list.yaml", "mapping"]),
    ("train-missing-yaml", lambda f: ["train", str(f["root"] / "absent.yaml")], ["absent.yaml"]),
    ("train-arch-value", lambda f: ["train", str(f["arch_yaml"]), f"run_dir={f['root'] / 'r1'}"],
     ["model.arch", "encoder.norm_eps", "'fast'"]),
    ("train-threshold", lambda f: ["train", str(f["threshold_yaml"])], ["data.patching.threshold", "'x'"]),
    ("train-kind-module", lambda f: ["train", str(f["kind_yaml"])], ["model.kind", "'os:system'", "entry point"]),
    ("train-override-yaml", lambda f: _train(f, "optim.betas=[0.9,"), ["optim.betas=[0.9,", "not valid YAML"]),
    ("train-override-form", lambda f: _train(f, "optim.lr"), ["optim.lr", "KEY=VALUE"]),
    ("train-device", lambda f: _train(f, "train.device=tpu"), ["train.device", "'tpu'"]),
    ("train-absurd-dim", lambda f: _train(f, "model.arch=tiny-blt", "model.arch.global.dim=1000000000"),
     ["model.arch", "global.dim", "1000000000"]),
    ("train-arch-type", lambda f: _train(f, "model.arch=tiny-blt", "model.arch.hash.vocab_size=many"),
     ["model.arch", "hash.vocab_size", "'many'"]),
    ("train-lr", lambda f: _train(f, "optim.lr=-1"), ["optim.lr", "-1"]),
    ("train-betas", lambda f: _train(f, "optim.betas=[0.9]"), ["optim.betas"]),
    ("train-patching-mode", lambda f: _train(f, "data.patching.mode=bpe"), ["data.patching.mode", "bpe"]),
    ("train-max-patch-length", lambda f: _train(f, "data.patching.max_patch_length=0"),
     ["data.patching.max_patch_length", "0"]),
    ("train-unknown-section", lambda f: _train(f, "optimizer.lr=1"), ["optimizer", "unknown key"]),
    ("train-missing-sources", lambda f: _train(f, "data.sources=[]"), ["data.sources"]),
    # slurm, bpe-tokenizer, data, export, quickstart
    ("slurm-nodes", lambda f: ["slurm", str(f["arch_yaml"]), "--nodes", "0"], ["--nodes", "'0'"]),
    ("slurm-malformed", lambda f: ["slurm", str(f["malformed_yaml"])], ["malformed.yaml", "YAML"]),
    ("bpe-vocab", lambda f: ["bpe-tokenizer", str(f["text"]), "--vocab-size", "-5", "--out", str(f["root"] / "t.json")],
     ["--vocab-size", "'-5'"]),
    ("data-hf-max-docs", lambda f: ["data", "hf", "x/y", "--out", str(f["root"] / "d"), "--max-docs", "0"],
     ["--max-docs", "'0'"]),
    ("export-missing", lambda f: ["export", str(f["root"] / "nothing"), str(f["root"] / "x")], ["nothing"]),
    ("quickstart-steps", lambda f: ["quickstart", "--blt-steps", "0"], ["--blt-steps", "'0'"]),
    ("quickstart-configs", lambda f: ["quickstart", "--configs", str(f["root"] / "noconf"), "--out", str(f["root"] / "q")],
     ["noconf"]),
    # study
    ("study-missing-yaml", lambda f: ["study", str(f["root"] / "absent.yaml")], ["absent.yaml", "no such study config"]),
    ("study-malformed-yaml", lambda f: ["study", str(f["malformed_yaml"])], ["malformed.yaml", "YAML", "line 3"]),
    ("study-not-utf8-yaml", lambda f: ["study", str(f["not_utf8_yaml"])], ["latin1.yaml", "not UTF-8"]),
    ("study-list-yaml", lambda f: ["study", str(f["list_yaml"])], ["list.yaml", "mapping"]),
    ("study-unknown-key", lambda f: ["study", str(f["model_list_yaml"])], ["model_list.yaml", "model: unknown key"]),
    # builtin (the recipe)
    ("builtin-stop-after", lambda f: ["builtin", "train", "--out", str(f["root"] / "r"), "--stop-after", "nope"],
     ["--stop-after", "'nope'"]),
    ("builtin-steps", lambda f: ["builtin", "train", "--out", str(f["root"] / "r"), "--blt-steps", "0"],
     ["--blt-steps", "'0'"]),
    # serve
    ("serve-device", lambda f: ["serve", str(f["blt"]), "--device", "tpu"], ["--device", "'tpu'"]),
    ("serve-max-batch", lambda f: ["serve", str(f["blt"]), "--max-batch", "0"], ["--max-batch"]),
    ("serve-port", lambda f: ["serve", str(f["blt"]), "--port", "70000"], ["--port", "70000"]),
    # the command line itself
    ("unknown-option", lambda f: ["eval", str(f["blt"]), str(f["text"]), "--colour"], ["--colour"]),
    ("unknown-command", lambda f: ["evaluate"], ["'evaluate'"]),
    ("missing-argument", lambda f: ["generate"], ["model"]),
]
if not CUDA:
    CASES.append(("generate-cuda-on-cpu", lambda f: ["generate", str(f["blt"]), "hi", "--device", "cuda"],
                  ["--device", "'cuda'", "CUDA is not available"]))


@pytest.mark.parametrize("argv, words", [pytest.param(a, w, id=i) for i, a, w in CASES])
def test_bad_input_is_one_line_naming_it(files, capsys, argv, words):
    code = blt_main(argv(files))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err + out
    assert lines[0].startswith("blt"), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"


def test_every_command_has_a_bad_input_row(files):
    from torchblt.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    tested = {argv(files)[0] for _, argv, _ in CASES}
    assert set(sub.choices) - {"harness"} <= tested  # harness is lm-eval's own command line


def test_the_validation_layer():
    """The typed builder behind run configs, model.arch and config.json: keys, types, aliases, sections."""
    from torchblt.model.config import BLTConfig, blt_config_from_dict
    from torchblt.validation import build_dataclass, check_device, coerce

    data = config_to_dict(tiny_blt())
    data["encoder"]["norm_eps"] = "1e-05"  # YAML's reading of 1e-05: a number after all
    data["global"]["max_seqlen"] = 2048.0  # an integral float is an integer
    cfg = blt_config_from_dict(data)
    assert cfg.encoder.norm_eps == 1e-5 and cfg.global_.max_seqlen == 2048 and isinstance(cfg.global_.max_seqlen, int)
    for change, message in [
        (lambda d: d["global"].update(n_layers=2.5), r"^config\.global\.n_layers: expected an integer, got 2\.5$"),
        (lambda d: d["hash"].update(group_sizes=[3, "four"]), r"^config\.hash\.group_sizes\[1\]: expected an integer"),
        (lambda d: d.update(hash="big"), r"^config\.hash: expected a mapping \(HashConfig\) or null, got 'big'$"),
        (lambda d: d["global"].pop("dim"), r"^config\.global\.dim: missing \(required\)$"),
        (lambda d: d.update(colour=1), r"^config\.colour: unknown key; known keys here: cross_attn, decoder"),
        (lambda d: d["cross_attn"].update(k=0), r"cross_attn\.k must be >= 1"),
        (lambda d: d.update(vocab_size=10**12), r"^vocab_size: expected an integer in \[1, 268435456\]"),
    ]:
        bad = config_to_dict(tiny_blt())
        change(bad)
        with pytest.raises(ValueError, match=message):
            blt_config_from_dict(bad)
    assert coerce(int | None, None, "k") is None and coerce(list[str], "one.txt", "k") == ["one.txt"]
    with pytest.raises(ValueError, match=r"^k: expected true or false, got 'yes'$"):
        coerce(bool, "yes", "k")
    with pytest.raises(ValueError, match=r"^where: expected a mapping \(BLTConfig\), got \[1\]$"):
        build_dataclass(BLTConfig, [1], "where")
    assert check_device("cpu", "--device") == "cpu" and check_device("auto", "x", allow_auto=True) == "auto"
    assert check_device("cuda:3", "train.device", check_available=False) == "cuda:3"  # a config written elsewhere
    with pytest.raises(ValueError, match=r"^train\.device: expected cpu, cuda, cuda:N or mps, got 'gpu0'$"):
        check_device("gpu0", "train.device")


def test_a_closed_standard_output_ends_a_command_quietly():
    """``blt ... | head``: the reader closes the pipe; the command stops with exit 141 and no traceback."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails (EPIPE)
    try:
        proc = subprocess.run([sys.executable, "-m", "torchblt.cli", "patches", "Zürich ist schön", "--patching",
                               "space", "--no-color"], stdout=write_end, stderr=subprocess.PIPE, timeout=300)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode() and "BrokenPipe" not in proc.stderr.decode()
