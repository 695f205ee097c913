"""The exactness matrix of ``test_generation_exact.py`` through the compiled step's path, its parts run eager.

A compiled call differs from an eager one in more than the compiler: the batch is padded to a power of two, the
close part runs padded to ``n`` patches per row (and on the first call of a shape even when no patch closes),
attention views come in as dynamic-size markers, the cursor is made row-major. Compiling every configuration would
take minutes each (one real compile runs in ``test_generation_state.py``); here every engine takes that path with
``_compiled_part`` returning the eager functions, so each architecture, patching mode and batch shape is checked
against the full recompute on it.
"""

from __future__ import annotations

import pytest

from tests.helpers.generation import eager_compiled_parts
from tests.test_generation_exact import (  # noqa: F401  (collected again here, on the compiled path)
    test_architectures,
    test_batch_rows_equal_single_runs_and_finish_early,
    test_entropy_variants,
    test_multi_document_text_and_generated_eos,
    test_other_modes,
)
from torchblt.generation import incremental


@pytest.fixture(autouse=True)
def compiled_path(monkeypatch):
    eager_compiled_parts(monkeypatch)
    real_init = incremental.IncrementalEngine.__init__
    seen = []

    def init(self, *args, **kwargs):
        kwargs["compile"] = True
        real_init(self, *args, **kwargs)
        seen.append(self)

    monkeypatch.setattr(incremental.IncrementalEngine, "__init__", init)
    yield
    assert seen and all(e._compiled_shapes for e in seen if e.state is not None)  # the compiled path ran


def test_many_rows_close_patches_on_the_closing_rows_only(monkeypatch):
    """A compiled batch of at least ``CLOSE_ROWS_MIN_BATCH`` rows of which at most half close a patch runs the
    close part on those rows (``_close_rows``, eager) instead of the compiled close over every row: each row
    still equals the full recompute, and the path was taken (and not taken with the threshold out of reach)."""
    from tests.helpers.generation import TEXT, assert_same, median_entropy, prompts_ids, tiny_em, tiny_model
    from torchblt import Patcher

    model, em = tiny_model(seed=3), tiny_em()
    patcher = Patcher("entropy", threshold=median_entropy(em), entropy_model=em)
    prompts = prompts_ids(*(TEXT[i : i + 9 + i % 5] for i in range(0, 45, 5)))  # 9 rows: a batch of 16 slots
    real = incremental.IncrementalEngine._close_rows
    outs = {}
    for threshold in (incremental.CLOSE_ROWS_MIN_BATCH, 1 << 30):
        monkeypatch.setattr(incremental, "CLOSE_ROWS_MIN_BATCH", threshold)
        calls = []

        def spy(self, *args, calls=calls, **kwargs):
            calls.append(self.state.batch if self.state is not None else None)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(incremental.IncrementalEngine, "_close_rows", spy)
        outs[threshold] = assert_same(model, patcher, prompts, n_new=24).tokens
        assert bool(calls) == (threshold < 1 << 30), calls
    assert outs[incremental.CLOSE_ROWS_MIN_BATCH] == outs[1 << 30]
