"""The built-in pretrained BLT and its entropy model, shipped inside the package (``torchblt/builtin/model``).

``load_model("builtin")`` loads the BLT with its entropy model attached, ``load_model("builtin-entropy")``
the entropy model alone; every ``blt`` command whose MODEL is omitted uses the BLT. The weights are bf16
safetensors (read back in the dtype asked for, fp32 by default); the model card is
``torchblt/builtin/model/README.md`` (data, recipe, held-out bits per byte per source and language) and
its numbers are in ``card.json`` beside it. The recipe that trains them is :mod:`torchblt.builtin.recipe`
(``blt builtin train --out DIR``).

A local folder named ``builtin`` wins over the built-in model (``load_model`` reads paths first); pass
:data:`BUILTIN_DIR` to be explicit.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BUILTIN_DIR", "NAMES", "builtin_card", "builtin_path", "is_model_reference", "split_model_argument"]

BUILTIN_DIR = Path(__file__).resolve().parent / "model"
NAMES = {"builtin": BUILTIN_DIR, "builtin-entropy": BUILTIN_DIR / "entropy_model"}


def builtin_path(name: str = "builtin") -> Path:
    """The folder of a built-in model (``"builtin"`` or ``"builtin-entropy"``); a clear error if it is not installed."""
    try:
        folder = NAMES[name]
    except KeyError:
        raise ValueError(f"{name!r} is not a built-in model; known: {', '.join(NAMES)}") from None
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{folder}: the built-in model's weights are not in this installation "
            "(a source checkout without them, or a build that dropped package data); reinstall torchblt"
        )
    return folder


def builtin_card() -> dict[str, Any]:
    """The built-in model's recorded numbers (``card.json``: held-out bpb per language and source, recipe, data)."""
    return json.loads((builtin_path() / "card.json").read_text(encoding="utf-8"))


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def is_model_reference(text: str) -> bool:
    """Whether a command-line word names a model: a built-in name, an existing path, an ``org/name`` hub id, or
    a word that looks like a path (no white space, and a ``/`` or a leading ``.`` or ``~``: a mistyped model
    folder is an error naming it, not a prompt)."""
    if text in NAMES or Path(text).exists() or _HUB_ID.match(text):
        return True
    return bool(text) and not any(c.isspace() for c in text) and ("/" in text or os.sep in text or text[0] in ".~")


def split_model_argument(
    first: str | None, rest: list[str], is_model: Callable[[str], bool] = is_model_reference
) -> tuple[str, list[str]]:
    """``(model, other positionals)`` for commands whose MODEL may be omitted: the first word is the model
    when it names one (``is_model``), otherwise it belongs to the others and the model is ``"builtin"``."""
    if first is None:
        return "builtin", list(rest)
    if is_model(first):
        return first, list(rest)
    return "builtin", [first, *rest]
