"""Our format on the Hugging Face Hub: save_pretrained / from_pretrained locally, the model card's
metadata (config, data, metrics), and push_to_hub's calls (with the Hub client replaced: no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchblt.eval.bpb import evaluate_bpb
from torchblt.formats.common import build_model
from torchblt.formats.pretrained import from_pretrained, push_to_hub, save_pretrained
from torchblt.model.config import tiny_blt, tiny_entropy
from torchblt.patching import Patcher, attach_entropy_model


def _blt():
    torch.manual_seed(0)
    blt = build_model(tiny_blt(), "cpu")
    blt.init_weights()
    em = build_model(tiny_entropy(), "cpu")
    em.init_weights()
    attach_entropy_model(blt, em.eval())
    return blt.eval()


def test_save_and_load_with_card(tmp_path):
    from huggingface_hub import ModelCard

    blt = _blt()
    result = evaluate_bpb(blt, ["a tiny validation text", "and another"])
    out = save_pretrained(blt, tmp_path / "m", data=["shakespeare-train.txt"], metrics=result.to_dict(),
                          eval_data="shakespeare-val.txt", license="mit")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md", "entropy_model"}
    loaded = from_pretrained(out)
    assert Patcher.for_model(loaded).entropy_model is not None
    toks = torch.tensor([[1, 72, 105, 33, 40]])
    with torch.no_grad():
        assert torch.equal(loaded(toks), blt(toks))
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "torchblt" and card.data.datasets == ["shakespeare-train.txt"]
    bpb = [r for r in card.data.eval_results if r.metric_type == "bpb"]
    assert len(bpb) == 1 and bpb[0].metric_value == pytest.approx(result.bpb)
    assert bpb[0].dataset_name == "shakespeare-val.txt"
    assert '"global"' in card.text and "hash_embeddings" in card.text  # config and parameter counts
    meta = json.loads((out / "config.json").read_text())["card"]
    assert meta["metrics"]["bpb"] == pytest.approx(result.bpb) and meta["data"] == ["shakespeare-train.txt"]
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pretrained(blt, out)
    with pytest.raises(ValueError, match="metrics"):
        save_pretrained(blt, tmp_path / "bad", metrics={"bpb": "low"})


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    calls: dict = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, folder_path, repo_id, repo_type, revision, commit_message):
            folder = Path(folder_path)
            calls["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            calls["readme"] = (folder / "README.md").read_text()
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_to_hub(_blt(), "me/tiny-blt", metrics={"bpb": 2.5}, data="local.txt", private=True, token="t")
    assert url == "https://huggingface.co/me/tiny-blt/commit/abc"
    assert calls["create"] == ("me/tiny-blt", True, True) and calls["token"] == "t"
    assert calls["files"] == ["README.md", "config.json", "entropy_model/config.json",
                              "entropy_model/model.safetensors", "model.safetensors"]
    assert "tiny-blt" in calls["readme"] and "2.5000" in calls["readme"]
