"""``blt study``: the sizing rule, the FLOP budget of every run (met within 5%, checked against the
trainer's own FLOP counts and a replay of the BPE loader), the results table and figure, skipping
finished runs, resuming an interrupted one, and one-line config errors."""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from tests.helpers.train import read_metrics, write_corpus
from torchblt import flops
from torchblt.cli import main as blt_main
from torchblt.model.config import BLTConfig
from torchblt.study.config import LocalSection, SizingSection, load_study_config
from torchblt.study.sizing import candidate_shapes, flops_per_byte, main_params, model_config, size_model

pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")
pytest.importorskip("pyarrow")

TINY = Path(__file__).resolve().parents[1] / "configs" / "study-tiny.yaml"
RUN_FILES = 6


def _tiny_config(tmp: Path, corpus: tuple[Path, Path], **changes) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["train"], raw["data"]["validation"] = [str(corpus[0])], [str(corpus[1])]
    raw["data"]["run_files"] = RUN_FILES  # the runs (and the entropies) read 6 of the 8 training files
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp / f"study-{len(list(tmp.glob('study-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("study-data"), n_train=8, n_valid=3)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, corpus):
    """The tiny study (2 families, 1 budget), run once for the tests below."""
    import torch

    tmp = tmp_path_factory.mktemp("study")
    cfg = _tiny_config(tmp, corpus)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: no OpenMP hand-offs on a shared machine
    try:
        code = blt_main(["study", str(cfg), "--out", str(tmp / "out")])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    return cfg, tmp / "out"


# --------------------------------------------------------------------------- the sizing rule


SIZING = SizingSection(max_width=320, local=LocalSection(dim=32, n_heads=2, cross_attn_heads=2))
KINDS = [("byte", 512, 1.0, 260), ("bpe", 160, 3.2, 2048), ("blt", 512, 4.0, 260), ("blt", 512, 8.0, 260)]


@pytest.mark.parametrize("kind,context,unit,vocab", KINDS)
def test_sizing_rule_picks_the_nearest_compute_optimal_shape(kind, context, unit, vocab):
    budgets = [5e12, 1.5e13, 4.5e13]
    plans = [size_model(kind, b, SIZING, context=context, unit_bytes=unit, vocab_size=vocab, tokenizer="t.json")
             for b in budgets]
    for budget, plan in zip(budgets, plans):
        # the run spends exactly the budget: bytes x training FLOPs per byte (torchblt.flops)
        config = model_config(kind, plan.arch, vocab)
        f = flops_per_byte(kind, config, context, unit)["train"]
        assert plan.bytes * f == pytest.approx(budget, rel=1e-12)
        assert plan.main_params == main_params(config)[0]  # the rule's parameter shortcut is exact
        # tokens per parameter stays near the constant (the ladder is ~1.1-1.6x apart in N)
        assert SIZING.tokens_per_param / 2.5 < plan.tokens_per_param < SIZING.tokens_per_param * 2.5
        if budget != budgets[1]:
            continue
        # brute force over the ladder (exact parameter counts): no shape is compute-optimal nearer the budget
        exclude = SIZING.local.dim if kind == "blt" else None
        gaps = []
        for shape in candidate_shapes(SIZING, exclude):
            arch = dict(plan.arch)
            key = "global" if kind == "blt" else "transformer"
            arch[key] = {**arch[key], "dim": shape.width, "n_layers": shape.n_layers, "n_heads": shape.n_heads}
            c = model_config(kind, arch, vocab)
            optimal = flops_per_byte(kind, c, context, unit)["train"] * SIZING.tokens_per_param * main_params(c)[0] * unit
            gaps.append(abs(math.log(optimal / budget)))
        assert abs(math.log(plan.optimal_budget / budget)) == pytest.approx(min(gaps), abs=1e-12)
    # bigger budgets buy bigger main models; a BLT's local models never change
    assert [p.main_params for p in plans] == sorted(p.main_params for p in plans)
    assert plans[-1].main_params > plans[0].main_params
    if kind == "blt":
        for part in ("encoder", "decoder", "cross_attn", "hash"):
            assert all(p.arch[part] == plans[0].arch[part] for p in plans)
        assert isinstance(model_config(kind, plans[0].arch), BLTConfig)


def test_sizing_rule_bigger_patches_buy_more_bytes_and_bad_budgets_fail():
    p4 = size_model("blt", 1.5e13, SIZING, context=512, unit_bytes=4.0)
    p8 = size_model("blt", 1.5e13, SIZING, context=512, unit_bytes=8.0)
    byte = size_model("byte", 1.5e13, SIZING, context=512, unit_bytes=1.0)
    assert p8.inference_flops_per_byte < p4.inference_flops_per_byte
    assert byte.bytes < p4.bytes < p8.bytes  # the byte transformer's tokens are dearest
    with pytest.raises(ValueError, match="budget"):
        size_model("byte", 0, SIZING, context=512, unit_bytes=1.0)


# --------------------------------------------------------------------------- the tiny study


def test_tiny_study_meets_budget_and_writes_table_and_figure(tiny_study):
    cfg_path, out = tiny_study
    cfg = load_study_config(cfg_path)
    doc = json.loads((out / "results.json").read_text())
    assert doc["pending_runs"] == 0
    runs = {r["family"]: r for r in doc["runs"]}
    assert set(runs) == {"blt-entropy-4", "bpe"}
    budget = cfg.budgets[0]
    for r in runs.values():
        assert 0.95 <= r["achieved_flops"] / budget <= 1.05, r
        assert r["trained_steps"] == r["steps"] >= cfg.min_steps
        assert 0 < r["val_bpb"] < 9
        steps = [m["step"] for m in read_metrics(Path(r["run_dir"])) if "bytes_seen" in m]
        assert steps == list(range(1, r["steps"] + 1))
    # BLT: the trainer's own FLOPs per byte (torchblt.flops at each step's mean patch size) agree
    blt = runs["blt-entropy-4"]
    records = [m for m in read_metrics(Path(blt["run_dir"])) if "bytes_seen" in m]
    prev, trainer_flops = 0, 0.0
    for m in records:
        trainer_flops += (m["bytes_seen"] - prev) * m["flops_per_byte"]
        prev = m["bytes_seen"]
    assert trainer_flops == pytest.approx(blt["achieved_flops"], rel=0.01)
    assert 3 < blt["train_unit_bytes"] < 5.5  # patches near the calibrated target of 4 bytes
    assert 0 < blt["entropy_model_flops_per_byte"] < blt["inference_flops_per_byte"]
    # BPE: replay the run's loader and count the tokens it trained on
    bpe = runs["bpe"]
    from torchblt.data.bpe import BPELoader
    from torchblt.data.config import DataConfig
    from torchblt.model.entropy_model import EntropyModelConfig
    from torchblt.train.config import load_config

    train_cfg = load_config(Path(bpe["run_dir"]) / "train.yaml")
    tokenizer = train_cfg.model.arch["tokenizer"]
    data = DataConfig(**{**train_cfg.data.__dict__, "kind": "bytes"})
    loader = iter(BPELoader(data, tokenizer=tokenizer))
    tokens = sum(int(next(loader).mask.sum()) for _ in range(bpe["steps"]))
    from torchblt.tokenizer import load_bpe_tokenizer

    stack = model_config("byte", {"transformer": train_cfg.model.arch["transformer"]}).transformer
    per_token = flops.bpe_flops_per_byte(EntropyModelConfig(transformer=stack), load_bpe_tokenizer(tokenizer).vocab_size,
                                         1.0, data.seq_len)["per_token"]
    assert 3 * per_token * tokens == pytest.approx(bpe["achieved_flops"], rel=1e-6)
    # the table, the figure and the shared artifacts
    md = (out / "results.md").read_text()
    assert "| blt-entropy-4 |" in md and "| bpe |" in md and "val bpb" in md
    png = (out / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for path in ("shared/bpe/tokenizer.json", "shared/entropy/model/config.json", "shared/entropies/entropies.json",
                 "shared/patching.json", "shared/validation/sample.json"):
        assert (out / path).is_file(), path
    assert json.loads((out / "shared/patching.json").read_text())["blt-entropy-4"]["threshold"] is not None
    # data.run_files: the runs read, and entropies are computed for, the first 6 training files; the
    # tokenizer and the entropy model train on all 8
    files = sorted(str(p) for p in Path(cfg.data.train[0]).iterdir())
    assert len(files) == 8 and cfg.run_sources() == files[:RUN_FILES]
    assert json.loads((out / "shared/entropies/entropies.json").read_text())["sources"] == files[:RUN_FILES]
    for r in runs.values():
        assert yaml.safe_load((Path(r["run_dir"]) / "train.yaml").read_text())["data"]["sources"] == files[:RUN_FILES]
    assert yaml.safe_load((out / "shared/entropy.yaml").read_text())["data"]["sources"] == cfg.data.train


def test_rerun_skips_finished_runs(tiny_study, monkeypatch, capsys):
    cfg_path, out = tiny_study
    from torchblt.train import trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(trainer.Trainer, "__init__", refuse)
    before = json.loads((out / "results.json").read_text())["runs"]
    assert blt_main(["study", str(cfg_path), "--out", str(out)]) == 0
    assert "finished (skipped)" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["runs"] == before
    assert blt_main(["study", str(cfg_path), "--out", str(out), "--report"]) == 0


def test_changed_config_is_refused_not_mixed(tiny_study, tmp_path, corpus, capsys):
    _, out = tiny_study
    cfg = _tiny_config(tmp_path, corpus, **{"optim.lr": 1e-3})
    assert blt_main(["study", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "optim.lr" in err and "Traceback" not in err


def test_interrupted_run_resumes(tiny_study, tmp_path, monkeypatch, capsys, one_thread):
    cfg_path, first = tiny_study
    out = tmp_path / "out"
    shutil.copytree(first / "shared", out / "shared")  # the shared artifacts are reused, the runs are not
    from torchblt.train import trainer

    original = trainer.Trainer.train_step

    def stop_at_step_5(self):
        record = original(self)
        if self.state.step == 3:  # a SIGTERM during step 4: the trainer sees it in step 5, saves and returns
            self.signal_received = signal.SIGTERM
        return record

    monkeypatch.setattr(trainer.Trainer, "train_step", stop_at_step_5)
    assert blt_main(["study", str(cfg_path), "--out", str(out)]) == 1
    assert "re-run the same blt study command to resume" in capsys.readouterr().err
    run_dir = next((out / "runs").glob("*/*"))
    assert not (run_dir / "finished.json").exists()
    assert max(m["step"] for m in read_metrics(run_dir)) == 5
    monkeypatch.setattr(trainer.Trainer, "train_step", original)
    assert blt_main(["study", str(cfg_path), "--out", str(out)]) == 0
    assert "resuming from" in capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    budget = doc["config"]["budgets"][0]
    for r in doc["runs"]:
        assert 0.95 <= r["achieved_flops"] / budget <= 1.05
        steps = [m["step"] for m in read_metrics(Path(r["run_dir"])) if "bytes_seen" in m]
        assert steps == list(range(1, r["steps"] + 1))
    # same data, same seeds: the resumed study reproduces the uninterrupted one
    ref = {r["family"]: r["val_bpb"] for r in json.loads((first / "results.json").read_text())["runs"]}
    assert {r["family"]: r["val_bpb"] for r in doc["runs"]} == pytest.approx(ref, rel=1e-5)


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("change,message", [
    ({"optim.lrr": 1.0}, "optim.lrr: unknown key"),
    ({"families": [{"name": "x", "kind": "gpt"}]}, "families[0].kind"),
    ({"families": [{"name": "s", "kind": "blt", "patching": "space", "patch_size": 4}]}, "families[0].patch_size"),
    ({"families": [{"name": "b", "kind": "byte", "patching": "space"}]}, "families[0].patching"),
    ({"budgets": [-1.0]}, "budgets[0]"),
    ({"budgets": "lots"}, "budgets"),
    ({"data.run_files": 9}, "data.run_files: 9 is more than the 8 files"),
    ({"noise_budgets": [5.0e+9]}, "noise_budgets[0]"),
    ({"data.run_files": 0}, "data.run_files"),
])
def test_bad_config_is_one_line(tmp_path, corpus, capsys, change, message):
    cfg = _tiny_config(tmp_path, corpus, **change)
    assert blt_main(["study", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and str(cfg) in err


def test_budget_too_small_for_min_steps(tmp_path, corpus, capsys):
    cfg = _tiny_config(tmp_path, corpus, budgets=[1.0e6], families=[{"name": "byte", "kind": "byte"}])
    assert blt_main(["study", str(cfg), "--out", str(tmp_path / "out"), "--plan"]) == 2
    err = capsys.readouterr().err
    assert "1e+06 FLOPs buys byte" in err and "min_steps" in err


def test_noise_seeds_repeat_the_smallest_budget_or_noise_budgets(tmp_path, corpus):
    from torchblt.study.report import noise

    cfg = load_study_config(_tiny_config(tmp_path, corpus, budgets=[1e9, 3e9, 1e10], noise_seeds=[1, 2]))
    runs = [(b, f.name, s) for b, f, s in cfg.runs()]
    assert [(b, s) for b, name, s in runs if name == "bpe"] == [(1e9, 0), (1e9, 1), (1e9, 2), (3e9, 0), (1e10, 0)]
    cfg = load_study_config(_tiny_config(tmp_path, corpus, budgets=[1e9, 3e9, 1e10], noise_seeds=[1],
                                         noise_budgets=[1e9, 1e10]))
    assert [(b, s) for b, f, s in cfg.runs() if f.name == "bpe"] == [(1e9, 0), (1e9, 1), (3e9, 0), (1e10, 0), (1e10, 1)]
    # the noise table: every (family, budget) with several seeds, with the seeds' range
    rows = [{"family": "bpe", "budget": b, "seed": s, "val_bpb": v}
            for b, s, v in [(1e9, 0, 3.0), (1e9, 1, 3.25), (3e9, 0, 2.5), (1e10, 0, 2.0), (1e10, 1, 1.875)]]
    spread = noise(rows)["bpe"]
    assert [(s["budget"], s["seeds"], s["range"]) for s in spread] == [(1e9, [0, 1], 0.25), (1e10, [0, 1], 0.125)]
