"""blt slurm: the sbatch script's text, and its behaviour with stand-in srun/torchrun/scontrol/sbatch."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.helpers.train import write_corpus
from torchblt.cli import main as blt_main

ROOT = Path(__file__).resolve().parents[1]

FAKES = {
    # srun: drop its options, run the command (one task, as on one node)
    "srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"',
    # torchrun: record the arguments and whether USR2 is ignored (SigIgn bit 12 = signal 12)
    "torchrun": 'printf "%s\\n" "$@" > "$LOG/torchrun.args"; grep SigIgn /proc/$$/status > "$LOG/sigign"; '
                '[ -n "${FINISH:-}" ] && echo "{}" > "$RUN_DIR_FOR_TEST/finished.json"; exit 0',
    "scontrol": 'if [ "$1" = show ]; then echo node001; echo node002; else echo "$@" >> "$LOG/scontrol"; fi',
    "sbatch": 'echo "Submitted batch job 4242"; cp "$1" "$LOG/submitted"',
}


def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_slurm_script_text_and_behaviour(tmp_path, capsys, monkeypatch):
    train, _ = write_corpus(tmp_path / "data", n_train=2, n_valid=1)
    run_dir = tmp_path / "runs" / "big run"
    script = tmp_path / "job.sbatch"
    monkeypatch.chdir(tmp_path)
    args = ["slurm", str(ROOT / "configs" / "blt-1b.yaml"), f"data.sources=[{train}]", "model.entropy_model=/m/em",
            f"run_dir={run_dir}", "optim.lr=3e-4", "--nodes", "2", "--gpus-per-node", "4", "--time", "02:00:00",
            "--partition", "gpu", "-o", str(script)]
    assert blt_main(args) == 0
    text = script.read_text()
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=02:00:00", "#SBATCH --signal=USR2@120", "#SBATCH --requeue",
                 "#SBATCH --partition=gpu", f"#SBATCH --chdir={tmp_path}", "--nnodes=2 --nproc-per-node=4",
                 "--rdzv-backend=c10d", 'scontrol requeue "$SLURM_JOB_ID"']:
        assert line in text, line
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert blt_main(args) == 2 and "exists; pass --overwrite" in capsys.readouterr().err

    # run it with stand-ins: torchrun gets exactly our command; no finished.json -> requeue
    log = tmp_path / "log"
    log.mkdir()
    env = dict(os.environ, PATH=f"{fake_bin(tmp_path)}:{os.environ['PATH']}", LOG=str(log), SLURM_JOB_ID="77",
               SLURM_JOB_NODELIST="node[001-002]", SLURM_JOB_NUM_NODES="2", RUN_DIR_FOR_TEST=str(run_dir))
    subprocess.run(["bash", str(script)], env=env, check=False, capture_output=True)
    got = (log / "torchrun.args").read_text().splitlines()
    i = got.index("-m")
    assert got[i:] == ["-m", "torchblt.train", str(ROOT / "configs" / "blt-1b.yaml"), f"data.sources=[{train}]",
                       "model.entropy_model=/m/em", f"run_dir={run_dir}", "optim.lr=3e-4"]
    assert "--rdzv-endpoint=node001:29577" in got and "--rdzv-id=77" in got
    assert int((log / "sigign").read_text().split()[1], 16) & (1 << 11)  # USR2 (12) ignored by torchrun
    assert (log / "scontrol").read_text().split() == ["requeue", "77"]
    # finished -> no requeue
    (log / "scontrol").unlink()
    subprocess.run(["bash", str(script)], env=dict(env, FINISH="1"), check=True, capture_output=True)
    assert not (log / "scontrol").exists()

    # --submit calls sbatch on the script
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no sbatch: a clear one-line error
    assert blt_main(args + ["--overwrite", "--submit"]) == 2
    assert "sbatch: not found" in capsys.readouterr().err
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("LOG", str(log))
    assert blt_main(args + ["--overwrite", "--submit"]) == 0
    assert "Submitted batch job 4242" in capsys.readouterr().out
    assert (log / "submitted").read_text() == script.read_text()
