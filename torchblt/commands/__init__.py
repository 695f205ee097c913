"""Sub-commands of ``blt``: one module per command, each with ``register(subparsers)`` (see torchblt.cli)."""
