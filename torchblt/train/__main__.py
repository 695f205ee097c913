"""``python -m torchblt.train CONFIG.yaml key=value ...`` — the entry point ``torchrun`` launches
(``torchrun --nproc-per-node N -m torchblt.train CONFIG ...``): the ``blt train`` command on its own."""

from __future__ import annotations

import sys

from torchblt.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
