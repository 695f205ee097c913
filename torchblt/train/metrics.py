"""Where metrics go (rank 0 only): a console progress bar (tqdm), ``metrics.jsonl`` (one JSON object per
logged step), TensorBoard (when the ``tensorboard`` package is installed) and Weights & Biases (when
``log.wandb`` is set). Plus model FLOPs per byte and MFU.

On resume, lines of ``metrics.jsonl`` for steps after the checkpoint are dropped: those steps are
trained again and logged again, so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

# dense bf16 peak FLOP/s (no sparsity), by substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "B200": 2250e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def training_flops_per_byte(model: nn.Module, mean_patch_length: float | None = None,
                            context: int | None = None) -> tuple[float, str]:
    """Training FLOPs per byte (forward + backward = 3x forward) and where the number comes from.

    BLT and byte LMs: :mod:`torchblt.flops` (the paper's per-module formulas; attention over ``context``
    bytes, the global model once per patch of ``mean_patch_length``). Other kinds: the ``6 N`` rule on
    non-embedding parameters."""
    from torchblt import flops
    from torchblt.model.config import BLTConfig
    from torchblt.model.entropy_model import EntropyModelConfig

    config = getattr(model, "config", None)
    if isinstance(config, BLTConfig):
        ps = mean_patch_length or config.patching.patch_size
        return flops.blt_flops_per_byte(config, ps, context_bytes=context)["train"], "torchblt.flops (BLT)"
    if isinstance(config, EntropyModelConfig):
        return flops.byte_flops_per_byte(config, context)["train"], "torchblt.flops (byte LM)"
    n = sum(p.numel() for name, p in model.named_parameters() if not isinstance(_owner(model, name), nn.Embedding))
    return 6.0 * n, "6N (non-embedding parameters)"


def _owner(module: nn.Module, param_name: str) -> nn.Module:
    return module.get_submodule(param_name.rpartition(".")[0]) if "." in param_name else module


class MetricsLogger:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool, progress: bool = True,
                 tensorboard: bool = True, wandb: bool = False, wandb_project: str = "torchblt",
                 config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.bar = self.tb = self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                print("note: TensorBoard logging is off (pip install tensorboard, or torchblt[train])", file=sys.stderr)
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise ValueError("log.wandb: true but the wandb package is not installed (pip install wandb)") from None
            self.wandb = wandb_module.init(project=wandb_project, name=run_dir.name, config=config, resume="allow",
                                           id=run_dir.name)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "bpb", "val_bpb", "mean_patch_length", "lr") if k in record}
            post = {k: (f"{v:.3g}" if k == "lr" else f"{v:.3f}") for k, v in shown.items() if v is not None}
            if "bytes_per_s" in record:
                post["B/s"] = f"{record['bytes_per_s']:.3g}"
            if record.get("data_skipped"):
                post["skipped"] = str(record["data_skipped"])
            self.bar.set_postfix(post, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
