"""Baselines the BLT paper compares against: the BPE transformer (:mod:`.bpe`). The byte-level
transformer baseline is :class:`torchblt.model.entropy_model.EntropyModel` itself (kind ``byte``)."""
