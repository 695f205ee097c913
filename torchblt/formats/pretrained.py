"""Hugging Face Hub round trip for our own format: ``save_pretrained`` / ``from_pretrained`` /
``push_to_hub``, with a model card (``README.md``) that records the architecture, the training data
and the evaluation metrics.

A saved folder is what :func:`torchblt.save_model` writes (``config.json`` + ``model.safetensors``), plus the
attached entropy model in ``entropy_model/`` (the released repositories' layout, so ``load_model``
finds it) and ``README.md``. The card's YAML header uses ``huggingface_hub``'s ``ModelCardData``
(``library_name: torchblt``, ``datasets``, ``model-index`` with one result per metric), so the Hub
shows the metrics; the same data sit in ``config.json`` under ``"card"``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torchblt.formats.native import model_files, write_model
from torchblt.model.blt import BLT
from torchblt.model.config import config_to_dict
from torchblt.model.entropy_model import EntropyModel
from torchblt.patching import attached_entropy_model

__all__ = ["from_pretrained", "make_model_card", "push_to_hub", "save_pretrained"]

_METRIC_NAMES = {"bpb": "bits per byte", "nats_per_byte": "nats per byte", "mean_patch_length": "mean patch length"}


def _numeric_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        elif v is not None and not isinstance(v, (dict, list)):
            raise ValueError(f"metrics[{k!r}]: expected a number, got {v!r}")
    return out


def make_model_card(
    model: BLT | EntropyModel,
    *,
    data: str | list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    eval_data: str | None = None,
    description: str | None = None,
    license: str | None = None,
    model_name: str | None = None,
) -> str:
    """The ``README.md`` text: YAML metadata + a description of the architecture, data and metrics."""
    from huggingface_hub import EvalResult, ModelCardData

    from torchblt.flops import param_counts

    datasets = [data] if isinstance(data, str) else list(data or [])
    values = _numeric_metrics(metrics)
    kind = "Byte Latent Transformer (BLT)" if isinstance(model, BLT) else "byte-level language model (entropy model)"
    results = [
        EvalResult(task_type="text-generation", dataset_type=eval_data or (datasets[0] if datasets else "unknown"),
                   dataset_name=eval_data or (datasets[0] if datasets else "unknown"), metric_type=name,
                   metric_name=_METRIC_NAMES.get(name, name), metric_value=value)
        for name, value in values.items()
    ]
    card = ModelCardData(
        library_name="torchblt",
        tags=["byte-latent-transformer", "blt", "byte-level", "tokenizer-free"],
        datasets=datasets or None,
        license=license,
        model_name=model_name or "torchblt-model",
        eval_results=results or None,
        pipeline_tag="text-generation",
    )
    counts = param_counts(model)
    lines = [f"---\n{card.to_yaml()}\n---", f"# {model_name or 'torchblt model'}", ""]
    lines.append(description or f"A {kind} saved with torchblt (`pip install torchblt`).")
    lines += ["", "## Use", "", "```python", "from torchblt import load_model", "",
              'model = load_model("REPO_OR_FOLDER")  # entropy model (if any) is attached from entropy_model/', "```", ""]
    lines += ["## Parameters", "", "| part | parameters |", "|---|---|"]
    lines += [f"| {part} | {n:,} |" for part, n in counts.items()]
    lines += ["", "## Training data", ""]
    lines += [f"- {d}" for d in datasets] if datasets else ["Not recorded."]
    lines += ["", "## Metrics", ""]
    if values:
        lines += [f"Evaluated on {eval_data or (datasets[0] if datasets else 'unrecorded data')} with `blt eval` "
                  "(bits per byte: every byte and the EOS of each document scored, see torchblt's evaluation docs).",
                  "", "| metric | value |", "|---|---|"]
        lines += [f"| {_METRIC_NAMES.get(k, k)} | {v:.4f} |" for k, v in values.items()]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Architecture", "", "```json", json.dumps(config_to_dict(model.config), indent=2), "```", ""]
    return "\n".join(lines)


def save_pretrained(
    model: BLT | EntropyModel,
    folder: str | os.PathLike[str],
    *,
    data: str | list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    eval_data: str | None = None,
    description: str | None = None,
    license: str | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (+ its attached entropy model) and a model card to ``folder``."""
    from torchblt.outputs import refuse_existing, staged

    out = Path(folder)
    readme = out / "README.md"
    em = attached_entropy_model(model) if isinstance(model, BLT) else None
    refuse_existing([readme, *model_files(out, em is not None)], overwrite)
    card = {"data": data, "metrics": _numeric_metrics(metrics), "eval_data": eval_data}
    text = make_model_card(model, data=data, metrics=metrics, eval_data=eval_data, description=description,
                           license=license, model_name=model_name)
    with staged(overwrite) as files:
        write_model(model, out, files, extra={"card": card})
        if em is not None:
            write_model(em, out / "entropy_model", files)
        files.write_text(readme, text)
    return out


def from_pretrained(
    repo_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    entropy_model: str | os.PathLike[str] | EntropyModel | None = None,
) -> BLT | EntropyModel:
    """:func:`torchblt.load_model` on a local folder or a hub repo id (at ``revision``)."""
    from torchblt.formats import load_model

    path = Path(repo_or_path)
    if not path.exists() and revision is not None:
        from torchblt.formats.hub import download

        path = download(str(repo_or_path), revision=revision)
    return load_model(path if path.exists() else repo_or_path, device=device, dtype=dtype, entropy_model=entropy_model)


def push_to_hub(
    model: BLT | EntropyModel,
    repo_id: str,
    *,
    data: str | list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    eval_data: str | None = None,
    description: str | None = None,
    license: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload torchblt model",
) -> str:
    """Create ``repo_id`` if needed and upload the :func:`save_pretrained` folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, data=data, metrics=metrics, eval_data=eval_data, description=description,
                        license=license, model_name=repo_id.split("/")[-1])
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=tmp, repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
