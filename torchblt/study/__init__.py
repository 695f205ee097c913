"""The FLOP-matched study of ``blt study``: BLT vs byte-level vs BPE transformers (paper §5, Fig. 6).

* :mod:`torchblt.study.config` — the study YAML (budgets, families, sizing, shared models, recipe);
* :mod:`torchblt.study.sizing` — the sizing rule (:func:`size_model`) and the FLOP accounting;
* :mod:`torchblt.study.runner` — shared artifacts, planning, training, resuming (:func:`run_study`);
* :mod:`torchblt.study.report` — ``results.json``, ``results.md`` and ``study.png``.
"""

from torchblt.study.config import Family, StudyConfig, load_study_config
from torchblt.study.runner import StudyStopped, run_study
from torchblt.study.sizing import ModelPlan, achieved_flops, size_model

__all__ = [
    "Family",
    "ModelPlan",
    "StudyConfig",
    "StudyStopped",
    "achieved_flops",
    "load_study_config",
    "run_study",
    "size_model",
]
