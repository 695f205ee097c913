"""``blt info`` on the named configurations and on checkpoint folders."""

from __future__ import annotations

import json

import pytest

from tests.helpers.fixtures import FIXTURES
from torchblt.cli import main


@pytest.mark.parametrize("name", ["blt-1b", "blt-7b", "entropy-100m", "tiny-blt"])
def test_info_named_configs(name, capsys):
    assert main(["info", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    params = info["parameters"]
    assert params["total"] == sum(v for k, v in params.items() if k not in ("total", "non_embedding"))
    assert info["flops_per_byte"]["forward"] > 0
    if name == "blt-1b":
        assert params["hash_embeddings"] == 6 * 500002 * 1024
        assert params["global_transformer"] == 1_284_608_000
    if name == "entropy-100m":
        assert params["total"] == 99_512_064


def test_info_text_output_and_folders(capsys):
    assert main(["info", str(FIXTURES / "07_consolidated" / "hf-weights" / "blt_tiny")]) == 0
    out = capsys.readouterr().out
    assert "hash_embeddings" in out and "global_transformer" in out
    assert main(["info", str(FIXTURES / "03_entropy_model" / "entropy_model")]) == 0


def test_info_unknown_is_one_line_error(capsys):
    assert main(["info", "blt-13b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blt-13b" in err[0] and "blt-1b" in err[0]
