"""Training at scale, on CPU gloo processes: meta-device init and sharded loading of released
checkpoints and DCP checkpoints (2 and 4 processes), row-sharded hash tables (exactness, communicated
bytes), resume on another world size (2 -> 1 -> 2 processes), and each rank's memory for parameters.

Tolerance for losses across process counts: 1e-5 relative, as in tests/test_train_distributed.py (only
the order of fp32 additions in the reductions differs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.train import overrides, read_metrics, train_run, write_corpus
from tests.test_train_distributed import launch
from torchblt.formats.common import build_model
from torchblt.formats.lazy import open_weights
from torchblt.model.config import named_config
from torchblt.train.config import load_config
from torchblt.train.trainer import Trainer

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
REFERENCE_HF = FIXTURES / "05_blt_forward" / "blt_model"  # the reference's config.json {"args"} + model.safetensors
CONSOLIDATED = FIXTURES / "07_consolidated" / "hf-weights" / "blt_tiny"  # params.json + consolidated.pth
pytestmark = pytest.mark.usefixtures("one_thread")


def reports(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(run_dir).glob("report_rank*.json"))]


def train_in_process(args: list[str], stop_after: int | None = None) -> Trainer:
    return train_run(args, stop_after)


def assert_same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)


# ---------------------------------------------------------------------------------------- one process


def test_lazy_weights_read_slices_of_every_format(tmp_path):
    from torchblt import load_model, save_model

    native = save_model(load_model(REFERENCE_HF), tmp_path / "native")
    for folder in (REFERENCE_HF, CONSOLIDATED, native):
        config, weights = open_weights(folder)
        full = load_model(folder).state_dict()
        assert sorted(weights) == sorted(full)
        for name, t in full.items():
            assert weights[name].shape == tuple(t.shape)
            assert torch.equal(weights[name].read(), t)
            if t.dim() == 2 and t.shape[0] > 2:
                assert torch.equal(weights[name].read((slice(1, 3), slice(0, t.shape[1]))), t[1:3])
    # strict like load_model: a tensor missing, a truncated file
    from safetensors.torch import load_file, save_file

    state = load_file(str(native / "model.safetensors"))
    state.pop(next(iter(state)))
    save_file(state, str(native / "model.safetensors"))
    with pytest.raises(ValueError, match="missing keys"):
        open_weights(native)
    data = (REFERENCE_HF / "model.safetensors").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_bytes((REFERENCE_HF / "config.json").read_bytes())
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="does not fit"):
        open_weights(tmp_path / "cut")


@pytest.mark.parametrize("chunk", [None, 100])
def test_row_gradients_train_like_dense_adamw(tmp_path, monkeypatch, chunk):
    """One process: hash tables with row gradients and the row AdamW step (one chunk per table, or chunks
    of 3 rows) give the losses and gradient norms of plain tables under torch's AdamW (1e-5), with no
    table .grad ever allocated."""
    if chunk is not None:
        from torchblt.train import hash_sharding

        monkeypatch.setattr(hash_sharding, "_UPDATE_CHUNK", chunk)
    train, _ = write_corpus(tmp_path / "data")
    rows = train_in_process(overrides(tmp_path / "rows", train, steps=5, **{"optim.weight_decay": 0.1}))
    plain = train_in_process(overrides(tmp_path / "plain", train, steps=5, **{"optim.weight_decay": 0.1,
                                                                               "train.hash_sharding": "fsdp"}))
    assert_same_losses(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "rows"))
    tables = list(rows.model.encoder_hash_tok_embedding)
    assert all(t.weight.grad is None for t in tables)
    for a, b in zip(tables, plain.model.encoder_hash_tok_embedding):  # every row moved (decay), alike
        assert torch.allclose(a.weight, b.weight, rtol=1e-4, atol=1e-6)
        sa, sb = rows.optimizer.state[a.weight], plain.optimizer.state[b.weight]
        assert float(sa["step"]) == float(sb["step"]) == 5
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-4, atol=1e-12)


def test_adamw_state_made_up_front_is_adamws():
    """What init_adamw_state creates is what torch's AdamW creates at its first step (so DCP loads into it
    instead of stepping with dense zero gradients for the hash tables)."""
    from torchblt.train.hash_sharding import init_adamw_state

    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    ours, theirs = torch.optim.AdamW(params, lr=1e-3), torch.optim.AdamW(params, lr=1e-3)
    init_adamw_state(ours)
    for p in params:
        p.grad = torch.zeros_like(p)
    theirs.param_groups[0]["lr"] = 0.0
    theirs.step()
    for p in params:
        a, b = ours.state[p], theirs.state[p]
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].device == b[k].device and a[k].shape == b[k].shape
            assert torch.equal(a[k], torch.zeros_like(b[k])) and (k == "step" or torch.equal(b[k], a[k]))


def test_training_memory_per_rank(capsys):
    """The states are exact: fp32 weights, gradients (not for row-sharded tables), 2 AdamW moments, of this
    rank's padded shards; `blt info --train` prints them for the real configs without allocating them."""
    from torchblt.cli import main as blt_main
    from torchblt.train.memory import training_memory

    config = named_config("tiny-blt")
    model = build_model(config, device="meta")
    n = sum(p.numel() for p in model.parameters())
    n_tables = sum(t.weight.numel() for t in model.encoder_hash_tok_embedding)
    one = training_memory(config, world_size=1, hash_sharding="fsdp")
    assert one["parameters"] == 4 * n and one["gradients"] == 4 * n and one["adamw"] == 8 * n
    rows = training_memory(config, world_size=1)
    assert rows["gradients"] == 4 * (n - n_tables)
    four = training_memory(config, world_size=4)
    assert 4 * n / 4 <= four["parameters"] <= 4 * n / 4 * 1.1
    big = training_memory(named_config("blt-7b"), world_size=8)
    assert big["parameters"] == pytest.approx(4 * 10.55e9 / 8, rel=0.01)
    assert blt_main(["info", "blt-7b", "--train", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "training memory per rank: 8 ranks, FSDP2" in out and "adamw" in out and "total" in out


def test_init_from_a_training_checkpoint(tmp_path):
    """init_from a DCP checkpoint (no export needed): the run starts from its weights exactly."""
    train, _ = write_corpus(tmp_path / "data")
    first = train_in_process(overrides(tmp_path / "first", train, steps=2))
    second = Trainer(load_config(None, overrides(tmp_path / "second", train, steps=2,
                                                  **{"model.init_from": str(tmp_path / "first")})))
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------- 2 and 4 processes


def _big_model(tmp_path: Path, hash_vocab: int) -> tuple[Path, float]:
    """A tiny-blt whose hash tables make it big, saved as safetensors; returns the folder and its size (MB)."""
    from torchblt import save_model
    from torchblt.train import materialize

    config = named_config("tiny-blt")
    config.hash.vocab_size = hash_vocab
    model = build_model(config, device="meta")
    materialize.init_weights(model, torch.device("cpu"))
    return save_model(model, tmp_path / f"model_{hash_vocab}"), sum(t.numel() * 4 for t in model.parameters()) / 2**20


def _peaks(run_dir: Path) -> list[float]:
    return [r["peak_after_init_mb"] for r in reports(run_dir)]


@pytest.mark.parametrize("world,source", [(2, REFERENCE_HF), (4, CONSOLIDATED)])
def test_sharded_loading_of_released_checkpoints(tmp_path, world, source):
    """init_from a released checkpoint on N processes: each rank holds ~1/N of the parameters, its shards
    equal the checkpoint's slices, and the first losses equal a one-process run's. The 2-process case
    also starts a run from the first run's DCP checkpoint (shards read directly by DCP), and measures
    the memory: fresh processes loading a 74 MB model peak 1/2 of it higher than those loading the tiny
    fixture (measured: 0.495; a full copy per rank would be >= 1)."""
    train, _ = write_corpus(tmp_path / "data")
    args = lambda name, **kw: overrides(tmp_path / name, train, steps=2, **{"model.init_from": str(source),  # noqa: E731
                                                                            "data.batch_size": 4, **kw})
    train_in_process(args("one"))
    runs = args("many", **{"checkpoint.every": 2, "checkpoint.export": "true"}) + [f"check={source}"]
    extra = []
    if world == 2:  # + a run from that DCP checkpoint, + one from the transformers layout (rank 0 reads, broadcast)
        from torchblt import load_model
        from torchblt.formats.transformers import save_transformers

        hf = save_transformers(load_model(source, entropy_model=FIXTURES / "05_blt_forward" / "entropy_model"),
                               tmp_path / "hf")
        extra = ["from_dcp", "from_hf"]
        for name, init in (("from_dcp", tmp_path / "many"), ("from_hf", hf)):
            runs += ["--", *overrides(tmp_path / name, train, steps=1, **{"model.init_from": str(init),
                                                                          "data.batch_size": 4}), f"check={init}"]
    launch(world, runs)
    assert_same_losses(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "many"))
    # the export at the end gathers the FSDP shards and the row-sharded tables into the full model
    from torchblt import load_model
    from torchblt.train import checkpoint as ckpt

    last = ckpt.latest_checkpoint(tmp_path / "many")
    saved = ckpt.read_weights(last, ckpt.checkpoint_model_config(last)[0])
    exported = load_model(tmp_path / "many" / "model").state_dict()
    assert sorted(exported) == sorted(saved) and all(torch.equal(exported[k], saved[k]) for k in saved)
    for run in ["many", *extra]:
        rep = reports(tmp_path / run)
        assert len(rep) == world and all(r["shards_equal"] for r in rep), rep
        assert all(r["tables_row_sharded"] for r in rep)
        total = rep[0]["global_bytes"]
        assert sum(r["local_bytes"] for r in rep) == total  # the shards partition the model ...
        assert all(r["local_bytes"] <= total / world * 1.15 for r in rep)  # ... about evenly (FSDP pads rows)
    if world == 2:
        big, size_mb = _big_model(tmp_path, 100_003)
        launch(2, overrides(tmp_path / "big", train, steps=1, **{"model.init_from": str(big), "data.batch_size": 4})
               + ["init_only=1"])
        growth = [b - t for b, t in zip(_peaks(tmp_path / "big"), _peaks(tmp_path / "many"))]
        assert size_mb > 70 and all(g < 0.6 * size_mb for g in growth), (size_mb, growth)


def _scaled_blt_1b(tmp_path: Path, train: Path, name: str, hash_sharding: str, hash_vocab: int | None) -> list[str]:
    """blt-1b's shape scaled down (hash tables ~70% of the parameters, as in blt-1b's 68%)."""
    arch = {"model.arch.encoder.dim": 64, "model.arch.encoder.n_heads": 4, "model.arch.decoder.dim": 64,
            "model.arch.decoder.n_heads": 4, "model.arch.cross_attn.n_heads": 4, "model.arch.global.dim": 128}
    if hash_vocab is None:
        arch["model.arch.hash"] = "null"
    else:
        arch["model.arch.hash.vocab_size"] = hash_vocab
    return overrides(tmp_path / name, train, steps=3, **arch, **{"train.hash_sharding": hash_sharding}) + [
        "count_comm=1"]


def test_row_sharded_hash_tables_communicate_only_touched_rows(tmp_path):
    """2 processes, a scaled-down blt-1b: the random init on sharded parameters equals a one-process init,
    row-sharded tables train like tables inside FSDP (losses within 1e-5) and the collective volume of the tables per step falls by >= 10x (measured: see the docs).
    The tables' volume is the step's total minus that of the same model without hash tables."""
    train, _ = write_corpus(tmp_path / "data")
    # the weights one process starts from: every rank's shards of the random init must equal their slices
    Trainer(load_config(None, _scaled_blt_1b(tmp_path, train, "init", "rows", 4099)[:-1])).export(tmp_path / "init")
    runs = [_scaled_blt_1b(tmp_path, train, "rows", "rows", 4099) + [f"check={tmp_path / 'init'}"],
            _scaled_blt_1b(tmp_path, train, "fsdp", "fsdp", 4099),
            _scaled_blt_1b(tmp_path, train, "none", "rows", None)]
    launch(2, [a for run in runs for a in (*run, "--")][:-1])
    assert_same_losses(read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "rows"))
    total = {name: reports(tmp_path / name)[0]["comm_bytes"] for name in ("rows", "fsdp", "none")}
    assert reports(tmp_path / "rows")[0]["tables_row_sharded"] and not reports(tmp_path / "fsdp")[0]["tables_row_sharded"]
    assert all(r["shards_equal"] for r in reports(tmp_path / "rows"))  # sharded init == one-process init
    volume = {name: sum(total[name].values()) for name in total}
    tables_fsdp, tables_rows = volume["fsdp"] - volume["none"], volume["rows"] - volume["none"]
    assert total["rows"].get("all_to_all_single", 0) > 0 and "all_to_all_single" not in total["fsdp"]
    assert tables_rows > 0 and tables_fsdp >= 10 * tables_rows, (tables_fsdp, tables_rows, total)
    (tmp_path / "volume.json").write_text(json.dumps({"tables_fsdp": tables_fsdp, "tables_rows": tables_rows}))


def test_resume_on_another_world_size(tmp_path):
    """2 processes (stopped at step 2) -> 1 process (grad_accum 2, stopped at step 4) -> 2 processes:
    losses and gradient norms equal an uninterrupted run on the same data (each step reads one batch of
    each of the 2 data shards), and the data shards end exactly where the uninterrupted run's end."""
    train, _ = write_corpus(tmp_path / "data")
    common = {"data.shards": 2, "data.batch_size": 2, "checkpoint.every": 100}
    reference = train_in_process(overrides(tmp_path / "reference", train, steps=6, **common,
                                           **{"train.grad_accum": 2}))
    run = overrides(tmp_path / "run", train, steps=6, **common)
    launch(2, run, TEST_PLAIN_LOADER="1", TEST_SIGNAL_RANK1_AT_STEP="2")
    train_in_process(run + ["train.grad_accum=2"], stop_after=4)
    launch(2, run, TEST_PLAIN_LOADER="1")
    assert_same_losses(read_metrics(tmp_path / "reference"), read_metrics(tmp_path / "run"))
    from torchblt.data import DataLoader
    from torchblt.train import checkpoint as ckpt

    last = ckpt.latest_checkpoint(tmp_path / "run")
    shards = DataLoader.merge_states([s["data"] for s in ckpt.read_train_states(last)])["shards"]
    assert shards == reference.loader.state_dict()["shards"]


@pytest.mark.slow
def test_each_of_four_ranks_holds_a_quarter_of_a_300mb_model(tmp_path):
    """Fresh processes loading a 294 MB model vs a tiny one: each rank's peak RSS during the trainer's
    set-up is higher by a quarter of the model (measured: 0.252-0.254)."""
    train, _ = write_corpus(tmp_path / "data")
    peaks = {}
    for vocab in (1021, 400_009):
        folder, size_mb = _big_model(tmp_path, vocab)
        launch(4, overrides(tmp_path / str(vocab), train, steps=1, **{"model.init_from": str(folder),
                                                                       "data.batch_size": 4}) + ["init_only=1"])
        peaks[vocab] = _peaks(tmp_path / str(vocab))
    growth = [b - t for b, t in zip(peaks[400_009], peaks[1021])]
    assert size_mb > 290 and all(g < 0.3 * size_mb for g in growth), (size_mb, growth)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_row_gradients_on_cuda(tmp_path):
    """On a GPU (fused AdamW for the dense parameters, the row step for the tables; fp32, no TF32): the
    losses of plain tables under fused AdamW, and a bf16 run that stays finite."""
    train, _ = write_corpus(tmp_path / "data")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cuda = {"train.device": "cuda", "train.dtype": "fp32"}
        train_in_process(overrides(tmp_path / "rows", train, steps=4, **cuda))
        train_in_process(overrides(tmp_path / "plain", train, steps=4, **cuda, **{"train.hash_sharding": "fsdp"}))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "rows")
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
    bf16 = train_in_process(overrides(tmp_path / "bf16", train, steps=3, **{
        "train.device": "cuda", "train.dtype": "bf16", "train.activation_checkpointing": True}))
    assert all(r["loss"] == r["loss"] for r in read_metrics(tmp_path / "bf16")) and bf16.state.step == 3
