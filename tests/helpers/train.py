"""Helpers for the trainer tests: tiny text corpora and tiny run configs (not a test module)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings and arrows of outrageous "
         "fortune take arms against a sea troubles by opposing end them die sleep no more").split()


def write_corpus(root: Path, n_train: int = 24, n_valid: int = 3, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    train, valid = root / "train", root / "valid"
    for folder, n in ((train, n_train), (valid, n_valid)):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 80)))
            (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return train, valid


def overrides(run_dir: Path, train: Path, kind: str = "blt", steps: int = 6, **extra) -> list[str]:
    """Dotted overrides for a tiny CPU run (a few seconds)."""
    out = [
        f"run_dir={run_dir}", f"model.kind={kind}", f"model.arch={'tiny-blt' if kind == 'blt' else 'tiny-entropy'}",
        f"data.sources=[{train}]", "data.patching.mode=space", "data.seq_len=12" if kind == "blt" else "data.seq_len=48",
        "data.max_bytes=48", "data.batch_size=3", "data.shuffle_buffer=8", f"train.steps={steps}",
        "optim.lr=3e-3", "optim.warmup_steps=2", "log.every=1", "log.progress=false", "log.tensorboard=false",
        "checkpoint.every=1000", "checkpoint.export=false",
    ]
    return out + [f"{k}={v}" for k, v in extra.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]




def train_run(args: list[str], stop_after: int | None = None):
    """Train in this process from dotted overrides; ``stop_after=N``: as if SIGTERM arrived during step N."""
    import signal

    from torchblt.train.config import load_config
    from torchblt.train.trainer import Trainer

    trainer = Trainer(load_config(None, args))
    if stop_after is not None:
        step = trainer.train_step

        def train_step():
            if trainer.state.step + 1 == stop_after:
                trainer.signal_received = signal.SIGTERM
            return step()

        trainer.train_step = train_step
    trainer.fit()
    return trainer
