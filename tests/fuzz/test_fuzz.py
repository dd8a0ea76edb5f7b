"""The fuzz targets under Hypothesis, each for a bounded time (PUSHERD_FUZZ_SECONDS, default 7 s):
zero crashes. Longer runs: ``python tests/fuzz/fuzz_targets.py frames --seconds 600``."""

import os

import pytest

from fuzz_strategies import run_for
from fuzz_targets import TARGETS

SECONDS = float(os.environ.get("PUSHERD_FUZZ_SECONDS", "7"))


@pytest.mark.parametrize("name", ["frames", "decode", "publish"])
def test_fuzz_target(name):
    runs = run_for(TARGETS[name], SECONDS if name != "decode" else SECONDS / 2)
    print("%s: %d inputs" % (name, runs))
    assert runs > 100
