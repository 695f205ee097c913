"""``blt serve``: an OpenAI-compatible HTTP server for a BLT, with streaming and continuous batching.

* :mod:`.protocol` — the completions API for a byte model: validation, errors, response shapes;
* :mod:`.engine` — the one interface the server needs from a generation engine, and its implementation;
* :mod:`.scheduler` — the thread that owns the engine: requests join and leave the batch between steps;
* :mod:`.app` — the Starlette app, uvicorn, signals and draining; :mod:`.metrics` — Prometheus metrics.

    from torchblt.serve import BLTServer, ServeConfig, run
    run(BLTServer(load_model("./blt-1b"), ServeConfig(model_name="blt-1b")), port=8000)

Needs the ``serve`` extra (``pip install 'torchblt[serve]'``). See ``docs/serving.md``.
"""

try:
    import prometheus_client  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # pragma: no cover - optional extra
    raise ImportError(f"blt serve needs the serve extra ({e.name} is missing): pip install 'torchblt[serve]'") from e

from torchblt.serve.app import BLTServer, ServeConfig, ThreadedServer, run
from torchblt.serve.engine import BatchEngine, CohortEngine, DecodeEngine, PromptScores, StepOutput

__all__ = ["BLTServer", "BatchEngine", "CohortEngine", "DecodeEngine", "PromptScores", "ServeConfig", "StepOutput",
           "ThreadedServer", "run"]
