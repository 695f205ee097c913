"""Shared fixtures: the golden fixtures folder, one-thread runs, determinism (helpers: ``tests/helpers/``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.fixtures import FIXTURES

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread (no OpenMP hand-offs, no spinning on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(train corpus folder, run folder): a tiny BLT trained 2 steps, checkpoints step_1 and step_2.
    Trained once per session; tests that change it work on a copy (see ``run_copy``)."""
    from tests.helpers.train import overrides, write_corpus
    from torchblt.train.config import load_config
    from torchblt.train.trainer import Trainer

    root = tmp_path_factory.mktemp("tiny_run")
    train, _ = write_corpus(root / "data")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, overrides(root / "run", train, steps=2, **{"checkpoint.every": 1, "checkpoint.keep": 5}))
        Trainer(cfg).fit()
    finally:
        torch.set_num_threads(before)
    return train, root / "run"


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy of ``tiny_run``: (train corpus folder, run folder)."""
    import shutil

    train, run = tiny_run
    shutil.copytree(run, tmp_path / "run")
    return train, tmp_path / "run"


@pytest.fixture
def one_line_error(capsys):
    """Reads stderr and checks it is one error line without a traceback; returns that line."""

    def read() -> str:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert "Traceback" not in err[0]
        return err[0]

    return read


@pytest.fixture
def stdin_bytes(monkeypatch):
    """``stdin_bytes(data)``: standard input becomes ``data`` (a command reading ``-``)."""
    import io
    import sys

    def set_to(data: bytes) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))

    return set_to
