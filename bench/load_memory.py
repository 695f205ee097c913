"""Peak resident memory of loading a model: ``load_model`` (the state dict handed over, ``take=True``) against
``load_state_dict_strict`` copying (the default for a state dict the caller keeps).

A tiny BLT with a large hash table (default 200k rows x 256: 1.2 GB of fp32 weights) is saved once; each
mode then loads it in a fresh process and reports its peak RSS above the imports. Memory, not time: no
need for an idle machine.

    python bench/load_memory.py [--rows 200000] [--dim 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM: per address space, so not inherited from the parent through fork as
    ``ru_maxrss`` is)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux


def _child(folder: str, mode: str) -> None:
    from torchblt import load_model
    from torchblt.formats.common import build_model, load_state_dict_strict
    from torchblt.formats.native import read_native

    base = _peak_rss_kib()
    if mode == "load_model":
        load_model(folder)
    else:
        config, state = read_native(Path(folder))
        load_state_dict_strict(build_model(config), state, "bench", take=False)
    print(json.dumps({"mode": mode, "peak_rss_over_imports_mib": round((_peak_rss_kib() - base) / 1024)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000, help="hash table rows")
    p.add_argument("--dim", type=int, default=256, help="encoder width")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(*args.child)
    import torch

    from torchblt import save_model
    from torchblt.formats.common import build_model
    from torchblt.model.config import named_config

    cfg = named_config("tiny-blt")
    cfg.hash.vocab_size, cfg.encoder.dim = args.rows, args.dim
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(cfg, device="cpu")
        with torch.no_grad():
            model.init_weights()
        mib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
        save_model(model, tmp, overwrite=True)
        del model
        print(json.dumps({"weights_mib": round(mib)}))
        for mode in ("load_model", "copy"):
            subprocess.run([sys.executable, __file__, "--child", tmp, mode], check=True)


if __name__ == "__main__":
    main()
