"""``blt slurm CONFIG.yaml key=value ... [--nodes N --gpus-per-node G ...] [--submit]``: write an sbatch script
that trains on a SLURM cluster, and optionally submit it.

The script runs one ``torchrun`` per node under ``srun`` (c10d rendezvous on the first node), each
launching ``-m torchblt.train`` with the same config and overrides. Preemption / time limit: SLURM
sends ``SIGUSR2`` 120 s before the end (``--signal=USR2@120``) to every task; torchrun is started with
USR2 ignored so only the training processes act on it: they finish the step, save a checkpoint and
exit 0. If the run has not written ``RUN_DIR/finished.json``, the script requeues the job
(``#SBATCH --requeue``), and the requeued job resumes from that checkpoint (same run folder, same
command).
"""

from __future__ import annotations

import argparse
import shlex

from torchblt.validation import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("slurm", help="write (and --submit) an sbatch script for multi-node training",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted overrides passed to every training process")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--gpus-per-node", type=positive_int, default=8)
    p.add_argument("--cpus-per-task", type=positive_int, default=None, help="default: 12 per GPU")
    p.add_argument("--time", default="24:00:00", help="wall-clock limit per job (HH:MM:SS)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--job-name", default=None, help="default: blt-<run folder name>")
    p.add_argument("--setup", default="", help="shell lines run before training (e.g. 'source .venv/bin/activate')")
    p.add_argument("--output", "-o", default=None, help="script path (default: RUN_DIR/train.sbatch)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing script")
    p.add_argument("--submit", action="store_true", help="run sbatch on the written script")
    p.set_defaults(func=run)


def sbatch_script(config: str, overrides: list[str], run_dir: str, *, nodes: int = 1, gpus_per_node: int = 8,
                  cpus_per_task: int | None = None, time: str = "24:00:00", partition: str | None = None,
                  account: str | None = None, qos: str | None = None, job_name: str = "blt-train",
                  setup: str = "", workdir: str | None = None) -> str:
    """The text of the sbatch script (see the module docstring)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    cpus = cpus_per_task or 12 * gpus_per_node
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --time={time}",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
    ]
    if workdir:
        head.append(f"#SBATCH --chdir={workdir}")
    head += [f"#SBATCH --{k}={v}" for k, v in (("partition", partition), ("account", account), ("qos", qos)) if v]
    if not any(o.startswith("run_dir=") for o in overrides):
        overrides = [*overrides, f"run_dir={run_dir}"]
    train_args = " ".join(shlex.quote(a) for a in [config, *overrides])
    train_args = train_args.replace("'", "'\"'\"'")  # it sits inside bash -c '...'
    body = f"""
set -uo pipefail
{setup}
RUN_DIR={shlex.quote(run_dir)}
mkdir -p "$RUN_DIR"
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((29500 + SLURM_JOB_ID % 1000))
export OMP_NUM_THREADS=1
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR"

# torchrun ignores USR2 (an ignored signal stays ignored across exec); the training processes install
# their own handler: on USR2/SIGTERM they finish the step, save a checkpoint and exit 0.
srun --kill-on-bad-exit=1 bash -c 'trap "" USR2; exec torchrun \\
    --nnodes={nodes} --nproc-per-node={gpus_per_node} \\
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \\
    -m torchblt.train {train_args}'
status=$?

if [ -f "$RUN_DIR/finished.json" ]; then
    echo "training finished"
    exit 0
fi
echo "training stopped before the end (exit $status): requeueing job $SLURM_JOB_ID to resume from the last checkpoint"
scontrol requeue "$SLURM_JOB_ID"
exit $status
"""
    return "\n".join(head) + "\n" + body


def run(args: argparse.Namespace) -> int:
    import os
    import subprocess
    from pathlib import Path

    from torchblt.outputs import refuse_existing, staged
    from torchblt.train.config import load_config

    cfg = load_config(args.config, args.overrides)  # fail here, not on the cluster, on a bad config
    run_dir = cfg.run_dir
    out = Path(args.output) if args.output else Path(run_dir) / "train.sbatch"
    refuse_existing([out], args.overwrite)
    text = sbatch_script(
        str(Path(args.config).resolve()), args.overrides, run_dir, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition, account=args.account,
        qos=args.qos, job_name=args.job_name or f"train-{Path(run_dir).name}", setup=args.setup,
        workdir=os.getcwd())
    with staged(args.overwrite) as files:
        files.write_text(out, text)
    Path(run_dir).mkdir(parents=True, exist_ok=True)  # SLURM opens the --output file there before the job runs
    print(f"wrote {out}")
    if args.submit:
        try:
            res = subprocess.run(["sbatch", str(out)], capture_output=True, text=True)
        except FileNotFoundError:
            raise FileNotFoundError("sbatch: not found (is this a SLURM login node?)") from None
        if res.returncode != 0:
            raise ValueError(f"sbatch failed: {res.stderr.strip() or res.stdout.strip()}")
        print(res.stdout.strip())
    return 0
