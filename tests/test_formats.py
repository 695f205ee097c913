"""Checkpoint formats: detection, strict loading, clear errors, no code execution, saving."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.fixtures import FIXTURES
from torchblt import BLT, EntropyModel, Patcher, load_model, save_model
from torchblt.formats import CheckpointError, detect_format

BLT_HF = FIXTURES / "05_blt_forward" / "blt_model"
ENT_HF = FIXTURES / "03_entropy_model" / "entropy_model"
CONS = FIXTURES / "07_consolidated" / "hf-weights"


def test_detect_formats():
    assert detect_format(BLT_HF) == "reference-hf"
    assert detect_format(CONS / "blt_tiny") == "consolidated"
    with pytest.raises(CheckpointError, match="not a model folder"):
        detect_format(FIXTURES)


def test_native_round_trip(tmp_path):
    model = load_model(BLT_HF)
    out = save_model(model, tmp_path / "m")
    assert detect_format(out) == "torchblt"
    again = load_model(out)
    tokens = torch.tensor([[1, 50, 60, 70, 80, 2, 1, 90]])
    lengths = torch.tensor([[1, 3, 3, 2]])
    with torch.no_grad():
        torch.testing.assert_close(again(tokens, lengths), model(tokens, lengths), atol=0, rtol=0)
    assert json.loads((out / "config.json").read_text())["model_type"] == "blt"
    em = load_model(save_model(load_model(ENT_HF), tmp_path / "e"))
    assert isinstance(em, EntropyModel)


def test_save_refuses_to_overwrite(tmp_path):
    model = load_model(ENT_HF)
    save_model(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_model(model, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    save_model(model, tmp_path, overwrite=True)


def test_load_dtype_and_entropy_subfolder(tmp_path):
    folder = tmp_path / "blt"
    shutil.copytree(BLT_HF, folder)
    shutil.copytree(ENT_HF, folder / "entropy_model")
    model = load_model(folder, dtype="bf16")
    assert isinstance(model, BLT) and model.local_decoder.output.weight.dtype == torch.bfloat16
    assert Patcher.for_model(model).entropy_model is not None and not model.training
    with pytest.raises(ValueError, match="dtype"):
        load_model(folder, dtype="fp8")


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return dst


def test_corrupted_safetensors(tmp_path):
    folder = _copy(ENT_HF, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        load_model(folder)


def test_missing_and_unexpected_keys(tmp_path):
    folder = _copy(BLT_HF, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["local_decoder.norm.weight"]
    state["local_decoder.extra.weight"] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    msg = str(err.value)
    assert "missing keys (1): local_decoder.norm.weight" in msg
    assert "unexpected keys (1): local_decoder.extra.weight" in msg


def test_shape_mismatch(tmp_path):
    folder = _copy(ENT_HF, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["args"]["n_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model(folder)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/tmp/evil')}",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    folder = _copy(CONS / "entropy_model", tmp_path)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    torch.save({"model": {"tok_embeddings.weight": _Evil()}}, folder / "consolidated.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(folder)
    assert not marker.exists()


def test_corrupted_json_and_bad_args(tmp_path):
    folder = _copy(CONS / "blt_tiny", tmp_path)
    (folder / "params.json").write_text("{not json")
    with pytest.raises(ValueError, match="params.json: not valid JSON"):
        load_model(folder)
    folder2 = _copy(BLT_HF, tmp_path / "x")
    cfg = json.loads((folder2 / "config.json").read_text())
    cfg["args"]["use_rope"] = False
    (folder2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_rope"):
        load_model(folder2)


def test_nested_args_written_by_plain_save_pretrained(tmp_path):
    folder = _copy(ENT_HF, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"args": cfg}))
    assert isinstance(load_model(folder), EntropyModel)


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="facebook/blt-1b: .*(offline|reach)"):
        load_model("facebook/blt-1b")


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_model("./definitely/not/here")


def test_corrupted_consolidated_pth(tmp_path):
    folder = _copy(CONS / "blt_tiny", tmp_path)
    data = (folder / "consolidated.pth").read_bytes()
    (folder / "consolidated.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="consolidated.pth: not a readable torch checkpoint"):
        load_model(folder)


# ---------------------------------------------------------------------------------------------- storage contract


def _storages(model: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in model.state_dict().values() if t.numel()}


def test_models_loaded_from_one_state_dict_never_share_storage():
    from torchblt.formats.common import build_model, load_state_dict_strict

    state = load_file(str(ENT_HF / "model.safetensors"))
    before = {k: v.clone() for k, v in state.items()}
    config = load_model(ENT_HF).config
    a, b = build_model(config), build_model(config)
    load_state_dict_strict(a, state, "a")
    load_state_dict_strict(b, state, "b")
    assert not _storages(a) & _storages(b) and not _storages(a) & {v.untyped_storage().data_ptr() for v in
                                                                   state.values()}
    with torch.no_grad():
        for p in a.parameters():  # "training" a changes neither b nor the caller's dict
            p.add_(1.0)
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]) and torch.equal(state[k], before[k]), k


def test_take_installs_the_tensors_without_a_copy_and_consumes_the_dict():
    from torchblt.formats.common import build_model, load_state_dict_strict

    config = load_model(ENT_HF).config
    state = load_file(str(ENT_HF / "model.safetensors"))
    key = "tok_embeddings.weight"
    state["output.weight"] = state[key]  # tied in the file (same shape): must not stay tied in the model
    ptrs = {k: v.data_ptr() for k, v in state.items()}
    model = build_model(config)
    load_state_dict_strict(model, state, "file", take=True)
    assert state == {}  # handed over: a second load from it fails instead of sharing
    loaded = model.state_dict()
    untied = [k for k in ptrs if k not in (key, "output.weight")]
    assert all(loaded[k].data_ptr() == ptrs[k] for k in untied)  # no copy: one copy of the weights in memory
    assert loaded["output.weight"].data_ptr() != loaded[key].data_ptr()  # one of the tied pair was copied
    assert ptrs[key] in (loaded[key].data_ptr(), loaded["output.weight"].data_ptr())
    assert torch.equal(loaded["output.weight"], loaded[key])
    with pytest.raises(CheckpointError, match="missing keys"):
        load_state_dict_strict(build_model(config), state, "again", take=True)


def test_load_model_keeps_one_copy_and_never_shares(tmp_path, monkeypatch):
    import torchblt.formats.native as native

    folder = save_model(load_model(ENT_HF), tmp_path / "m")
    read, seen = native.read_safetensors, {}

    def spy(path):
        state = read(path)
        seen.update({k: v.data_ptr() for k, v in state.items()})
        return state

    monkeypatch.setattr(native, "read_safetensors", spy)
    a = load_model(folder)
    assert {k: v.data_ptr() for k, v in a.state_dict().items() if k in seen} == seen  # the tensors read, as is
    b = load_model(folder)
    assert not _storages(a) & _storages(b)


def test_from_a_live_transformers_model_copies():
    pytest.importorskip("transformers")
    from torchblt.formats.transformers import from_transformers_model, to_transformers_model

    hf = to_transformers_model(load_model(BLT_HF))
    ours = from_transformers_model(hf)
    hf_before = {k: v.clone() for k, v in hf.state_dict().items()}
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(2.0)
    for k, v in hf.state_dict().items():
        assert torch.equal(v, hf_before[k]), k
