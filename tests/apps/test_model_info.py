"""GFLOPs at 640 match the release's torch.utils.flop_counter numbers within 1%."""

import pytest

from dfine.apps.info import PUBLISHED_FLOP_COUNTER_GFLOPS, main, model_info
from tests.model_helpers import config_path


@pytest.mark.parametrize("size", ["n", "s"])
def test_gflops_match_published(size):
    info = model_info(config_path(size))
    expected = PUBLISHED_FLOP_COUNTER_GFLOPS[size]
    assert abs(info["gflops"] - expected) / expected < 0.01, info
    assert info["params"] > info["deploy_params"]


def test_table_printed(capsys):
    main(["--sizes", "n"])
    out = capsys.readouterr().out
    assert "| N | 3,782,693 | 3,753,799 |" in out
