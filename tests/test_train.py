"""Trainer: config errors, schedules, exact resume, atomic checkpoints, NaN guard, export, fine-tuning,
logging, gradient accumulation."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.train import overrides, read_metrics, train_run, write_corpus
from torchblt.cli import main as blt_main
from torchblt.train import checkpoint as ckpt
from torchblt.train.config import load_config
from torchblt.train.schedule import lr_factor
from torchblt.train.trainer import Trainer, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "data")


def run(tmp_path, train, name="run", kind="blt", steps=6, stop_after=None, **extra) -> Trainer:
    return train_run(overrides(tmp_path / name, train, kind, steps, **extra), stop_after)


# ---------------------------------------------------------------------------------------------- config


def test_config_unknown_key_and_wrong_type_are_one_clear_line(tmp_path, corpus, capsys):
    train, _ = corpus
    base = overrides(tmp_path / "r", train)
    with pytest.raises(ValueError, match=r"^optim\.learning_rate: unknown key"):
        load_config(None, base + ["optim.learning_rate=1e-3"])
    with pytest.raises(ValueError, match=r"^train\.steps: expected an integer, got 'many'"):
        load_config(None, base + ["train.steps=many"])
    with pytest.raises(ValueError, match=r"^data\.batch_size: expected an integer"):
        load_config(None, base + ["data.batch_size=2.5"])
    with pytest.raises(ValueError, match=r"^log\.tensorboard: expected true or false"):
        load_config(None, base + ["log.tensorboard=3"])
    with pytest.raises(ValueError, match=r"model\.arch: .*dimm"):
        cfg = load_config(None, base + ["model.arch.encoder.dimm=3"])
        Trainer(cfg)
    with pytest.raises(ValueError, match=r"^model\.entropy_model: validating an entropy-patched BLT needs"):
        load_config(None, base + ["data.patching.mode=entropy", "data.patching.threshold=1.3", "data.entropies=x",
                                  f"data.validation=[{train}]"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim:\n  lr: 1e-3\n  betas: [0.9, 0.95]\n  sgd: true\n")
    assert blt_main(["train", str(bad_yaml), *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["blt train: error: optim.sgd: unknown key; known keys here: betas, decay_fraction, eps, grad_clip, "
                   "lr, min_lr_ratio, schedule, warmup_steps, weight_decay"]
    assert blt_main(["train", *base, "model.kind=transformerxl"]) == 2
    assert "model.kind: unknown kind 'transformerxl'" in capsys.readouterr().err


def test_config_yaml_numbers_and_overrides(tmp_path, corpus):
    train, _ = corpus
    cfg = load_config(None, overrides(tmp_path / "r", train) + ["optim.lr=4e-4", "model.arch.global.n_layers=3"])
    assert cfg.optim.lr == pytest.approx(4e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.arch == {"base": "tiny-blt", "global": {"n_layers": 3}}
    for name in ("entropy-100m", "blt-1b", "blt-7b", "quickstart-entropy", "quickstart-blt"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"data.sources=[{train}]", "data.entropy_model=x"])
        assert cfg.optim.betas == [0.9, 0.95]


def test_schedules():
    cos = [lr_factor(s, schedule="cosine", warmup_steps=10, total_steps=110) for s in range(110)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)
    assert cos[60] == pytest.approx(0.5, abs=0.02) and cos[-1] < 0.01
    assert all(a >= b for a, b in zip(cos[9:], cos[10:]))
    wsd = [lr_factor(s, schedule="wsd", warmup_steps=10, total_steps=100, decay_fraction=0.2, min_lr_ratio=0.1)
           for s in range(100)]
    assert wsd[10:80] == [1.0] * 70 and wsd[-1] == pytest.approx(0.1) and 0.1 < wsd[90] < 1.0


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("kind", ["blt", "entropy"])
def test_exact_resume_gives_identical_losses(tmp_path, corpus, kind):
    """2N uninterrupted steps vs N steps + a stop (signal path) + resume: bitwise-equal losses on CPU."""
    train, _ = corpus
    run(tmp_path, train, "full", kind, steps=8)
    run(tmp_path, train, "split", kind, steps=8, stop_after=4)
    assert ckpt.latest_checkpoint(tmp_path / "split").name == "step_00000004"
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3, 4]
    run(tmp_path, train, "split", kind, steps=8)  # same command again: resumes
    full, split = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 9))
    assert [r["loss"] for r in split] == [r["loss"] for r in full]  # bitwise
    assert [r["grad_norm"] for r in split] == [r["grad_norm"] for r in full]


def test_atomic_checkpoint_save_killed_midway(tmp_path, corpus, monkeypatch):
    train, _ = corpus
    run(tmp_path, train, "r", steps=2)
    good = ckpt.latest_checkpoint(tmp_path / "r")
    assert good.name == "step_00000002"

    real_save = ckpt.dcp.save

    def dying_save(state, checkpoint_id):  # the data lands on disk, then the process "dies"
        real_save(state, checkpoint_id=checkpoint_id)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpt.dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, train, "r", steps=4)
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    root = tmp_path / "r" / "checkpoints"
    assert (root / ".tmp-step_00000004").is_dir()  # the half-written save ...
    assert ckpt.latest_checkpoint(tmp_path / "r") == good  # ... is not taken for a checkpoint
    t = run(tmp_path, train, "r", steps=4)  # resumes from step 2 and finishes
    assert t.resumed_from == good and t.state.step == 4
    assert not list(root.glob(".tmp-*"))
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [1, 2, 3, 4]


def test_keep_last_k(tmp_path, corpus):
    train, _ = corpus
    run(tmp_path, train, "r", steps=5, **{"checkpoint.every": 1, "checkpoint.keep": 2})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "r")] == ["step_00000004", "step_00000005"]


def test_nan_guard_stops_and_keeps_last_checkpoint(tmp_path, corpus, capsys):
    train, _ = corpus
    run(tmp_path, train, "r", steps=2)
    cfg = load_config(None, overrides(tmp_path / "r", train, steps=4))
    t = Trainer(cfg)
    with torch.no_grad():
        next(t.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"step 3: loss nan / gradient norm nan is not finite.*step_00000002"):
        t.fit()
    assert ckpt.latest_checkpoint(tmp_path / "r").name == "step_00000002"
    t2 = Trainer(load_config(None, overrides(tmp_path / "r", train, steps=4)))
    assert all(torch.isfinite(p).all() for p in t2.model.parameters())
    # and through the CLI: one line
    monkey = overrides(tmp_path / "r2", train, steps=3) + ["optim.lr=1e30", "optim.warmup_steps=0",
                                                          "optim.grad_clip=0"]
    capsys.readouterr()
    code = blt_main(["train", *monkey])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not finite" in err[0]


def test_signal_saves_and_exits_cleanly(tmp_path, corpus):
    train, _ = corpus
    args = overrides(tmp_path / "r", train, steps=100000)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "torchblt.train", *args], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True, env=env)
    metrics = tmp_path / "r" / "metrics.jsonl"
    import time

    deadline = time.time() + 60
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "checkpoint saved" in err
    last = ckpt.latest_checkpoint(tmp_path / "r")
    assert last is not None and int(last.name.split("_")[1]) == read_metrics(tmp_path / "r")[-1]["step"]
    assert not (tmp_path / "r" / "finished.json").exists()


# ---------------------------------------------------------------------------------------------- outputs


def test_metrics_config_and_export(tmp_path, corpus):
    train, valid = corpus
    run(tmp_path, train, "r", steps=4, **{"data.validation": f"[{valid}]", "eval.every": 2,
                                          "checkpoint.export": "true", "log.tensorboard": "true",
                                          "log.profile_steps": "[1,2]"})
    rows = read_metrics(tmp_path / "r")
    for r in rows:
        assert {"step", "loss", "bpb", "lr", "bytes_per_s", "grad_norm", "mean_patch_length"} <= set(r)
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2))  # byte-level: one target per byte
    assert [r["step"] for r in rows if "val_bpb" in r] == [2, 4]
    saved = load_config(tmp_path / "r" / "config.yaml")
    assert saved.train.steps == 4 and saved.data.patching.mode == "space"
    assert list((tmp_path / "r" / "tensorboard").iterdir())
    assert list((tmp_path / "r" / "profile").glob("*.json"))  # torch.profiler trace of step 2

    from torchblt import load_model
    from torchblt.eval.bpb import evaluate_bpb

    exported = load_model(tmp_path / "r" / "model")
    assert exported.config.patching.mode == "space"
    docs = [p.read_bytes() for p in sorted(valid.iterdir())]
    assert evaluate_bpb(exported, docs).bpb == pytest.approx(rows[-1]["val_bpb"], rel=1e-5)
    # blt export: from the last checkpoint, refuses to overwrite without --overwrite
    out = tmp_path / "exported"
    assert blt_main(["export", str(tmp_path / "r"), str(out)]) == 0
    again = load_model(out)
    for (k, a), (_, b) in zip(exported.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert blt_main(["export", str(tmp_path / "r"), str(out)]) == 2


def test_init_from_reference_checkpoint(tmp_path, corpus, fixtures_dir):
    """Fine-tuning starts from the given weights (here a reference-format tiny BLT)."""
    train, _ = corpus
    src = fixtures_dir / "05_blt_forward" / "blt_model"
    from torchblt import load_model

    ref = load_model(src)
    cfg = load_config(None, overrides(tmp_path / "r", train, steps=1) + [f"model.init_from={src}"])
    t = Trainer(cfg)
    for (k, a), (_, b) in zip(t.model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    t.fit()
    assert not torch.equal(next(t.model.parameters()), next(ref.parameters()))
    bad = load_config(None, overrides(tmp_path / "r2", train, "entropy", steps=1) + [f"model.init_from={src}"])
    with pytest.raises(ValueError, match="model.init_from: .* holds a BLT"):
        Trainer(bad)


def test_grad_accum_equals_bigger_batch(tmp_path, corpus):
    """Loss normalisation is per token of the whole optimizer step: 2 x 3 rows == 1 x 6 rows."""
    train, _ = corpus
    run(tmp_path, train, "a", "byte", steps=3, **{"data.batch_size": 3, "train.grad_accum": 2})
    run(tmp_path, train, "b", "byte", steps=3, **{"data.batch_size": 6})
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)


def test_bf16_autocast_path_runs_on_cpu(tmp_path, corpus):
    """train.dtype=bf16 (the GPU default) also works on CPU: the forward runs under bf16 autocast (a linear
    layer's outputs are bf16), finite losses, fp32 master weights."""
    train, _ = corpus
    t = Trainer(load_config(None, overrides(tmp_path / "r", train, steps=2, **{"train.dtype": "bf16"})))
    linear = next(m for m in t.model.modules() if isinstance(m, torch.nn.Linear))
    seen = []
    hook = linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    t.fit()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "r"))
    assert all(p.dtype == torch.float32 for p in t.model.parameters())


def test_activation_checkpointing_gives_same_losses(tmp_path, corpus):
    train, _ = corpus
    run(tmp_path, train, "plain", steps=3)
    t = run(tmp_path, train, "ac", steps=3, **{"train.activation_checkpointing": "true"})
    assert [r["loss"] for r in read_metrics(tmp_path / "ac")] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "plain")], rel=1e-6)
    assert "encoder_hash_tok_embedding.0.weight" in dict(t.model.named_parameters())  # names unchanged


@pytest.mark.slow
def test_compile_gives_same_losses(tmp_path, corpus):
    train, _ = corpus
    run(tmp_path, train, "plain", "entropy", steps=3)
    run(tmp_path, train, "compiled", "entropy", steps=3, **{"train.compile": "true"})
    assert [r["loss"] for r in read_metrics(tmp_path / "compiled")] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "plain")], rel=1e-4)


def test_wandb_logging_with_a_stand_in_module(tmp_path, corpus, monkeypatch):
    import types

    logged, calls = [], {}

    class Run:
        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            calls["finish"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    train, _ = corpus
    run(tmp_path, train, "r", steps=2, **{"log.wandb": "true", "log.wandb_project": "proj"})
    assert calls["init"]["project"] == "proj" and calls["init"]["config"]["train"]["steps"] == 2
    assert [s for s, _ in logged] == [1, 2] and "bpb" in logged[0][1] and calls["finish"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: a clear error
    with pytest.raises(ValueError, match="log.wandb: true but the wandb package is not installed"):
        run(tmp_path, train, "r2", steps=1, **{"log.wandb": "true"})


def test_old_run_configs_with_flat_data_keys_still_load(tmp_path, corpus, capsys):
    """The first release's ``data.patching: MODE`` + flat ``data.threshold`` ... load as ``data.patching``."""
    train, _ = corpus
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(f"data:\n  sources: [{train}]\n  patching: entropy\n  threshold: 1.2\n  max_patch_length: 6\n"
                   "  entropy_model: em\n")
    new.write_text(f"data:\n  sources: [{train}]\n  patching: {{mode: entropy, threshold: 1.2, max_patch_length: 6}}\n"
                   "  entropy_model: em\n")
    with pytest.warns(FutureWarning, match=r"data\.patching: entropy, data\.threshold: 1\.2, data\.max_patch_length: "
                                           r"6: .* write data\.patching: \{mode: entropy, threshold: 1\.2"):
        from_old = load_config(old)
    assert from_old == load_config(new)
    assert from_old.data.patching.threshold == 1.2 and from_old.data.target_patch_size is None
    # the command line shows the notice as one line
    import warnings

    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert blt_main(["train", str(old), "--print-config"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "blt train: warning: data.patching: entropy, data.threshold: 1.2, data.max_patch_length: 6: the flat patching "
        "keys are deprecated; write data.patching: {mode: entropy, threshold: 1.2, max_patch_length: 6}"]
    # the old dotted overrides too, over a new-style file
    with pytest.warns(FutureWarning) as warned:
        cfg = load_config(new, ["data.patching=static", "data.patch_size=3"])
    assert [str(w.message).split(":")[:2] for w in warned] == [["data.patching", " static"], ["data.patch_size", " 3"]]
    assert (cfg.data.patching.mode, cfg.data.patching.patch_size, cfg.data.patching.max_patch_length) == ("static", 3, 6)
    # a nested section keeps the data section's defaults: no threshold, so target_patch_size may calibrate
    cfg = load_config(None, [f"data.sources=[{train}]", "data.patching.mode=entropy", "data.target_patch_size=4",
                             "data.entropy_model=em"])
    assert cfg.data.patching.threshold is None and cfg.data.target_patch_size == 4
    with pytest.raises(ValueError, match=r"^data\.target_patch_size: give a patching\.threshold or"):
        load_config(None, [f"data.sources=[{train}]", "data.patching.threshold=1.0", "data.target_patch_size=4",
                           "data.entropy_model=em"])


def test_shipped_configs_use_the_nested_patching_section(tmp_path, corpus):
    import warnings

    train, _ = corpus
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for name in ("blt-1b", "blt-7b", "quickstart-blt"):
            cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"data.sources=[{train}]", "data.entropy_model=x"])
            assert cfg.data.patching.mode == "entropy"


def _bad_corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    lines = [b'{"text": "to be or not to be that is the question"}', b"{not json", b'{"other": "x"}',
             b'{"text": ""}', b'{"text": "caf\xe9 whether tis nobler in the mind"}', b'{"text": "to suffer the slings"}']
    (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def test_bad_training_records_are_counted_logged_and_follow_the_policy(tmp_path, capsys):
    """Bad records are counted (summed over ranks), logged with the step and in a line; on_bad_record=error stops."""
    src = _bad_corpus(tmp_path / "bad")
    run(tmp_path, src, "r", steps=3, **{"data.validation": f"[{src}]"})
    rows = read_metrics(tmp_path / "r")
    for r in rows:  # cumulative counts of the records read (the small corpus is read once per epoch)
        n = r["data_bad_json"]
        assert n >= 1 and r["data_missing_field"] == r["data_empty"] == r["data_non_utf8"] == n
        assert r["data_skipped"] == 3 * n
    assert [r["data_skipped"] for r in rows] == sorted(r["data_skipped"] for r in rows)
    assert rows[-1]["val_skipped"] == 3 and rows[-1]["val_bad_json"] == 1  # validation reads its files once
    err = capsys.readouterr().err
    assert re.search(r"data: \d+ records skipped \(\d+ empty, \d+ missing_field, \d+ bad_json\); \d+ documents not "
                     r"valid UTF-8 \(kept as bytes\) so far \(data.on_bad_record: skip", err), err
    n = rows[-1]["data_bad_json"]
    assert f"data: {3 * n} records skipped ({n} empty, {n} missing_field, {n} bad_json); {n} documents" in err
    assert ("validation data: 3 records skipped (1 empty, 1 missing_field, 1 bad_json); 1 document not valid UTF-8 "
            "(kept as bytes)") in err
    clean = read_metrics(run(tmp_path, write_corpus(tmp_path / "good")[0], "clean", steps=1).run_dir)
    assert clean[0]["data_skipped"] == 0 and not any(k.startswith("data_") and k != "data_skipped" for k in clean[0])
    # the policy: stop at the first bad record, naming it, in one line
    code = blt_main(["train", *overrides(tmp_path / "r2", src, steps=2), "data.on_bad_record=error"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "a.jsonl: record 1: bad record (bad_json" in err[0], err
