"""benchmarks/bench_reduce_heads.py: a named head count is what the reduce takes on every call
(the few-row rule set aside), ``own`` is the module's rule, and both end with the block."""

import pytest

from pa_hybrid.kernels import reduce

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_reduce_heads.py")


@pytest.mark.parametrize("heads, tile", [("own", (1, 64)), ("1", (1, 64)), ("4", (4, 8)), ("16", (16, 2))])
def test_named_heads_are_the_reduce_tile(bench, heads, tile):
    own = reduce.reduce_tile(64, 1, 64, 256)  # one row of 64 heads: a head per program by the rule
    with bench.heads_per_program(heads):
        assert reduce.reduce_tile(64, 1, 64, 256) == tile
    assert reduce.reduce_tile(64, 1, 64, 256) == own == (1, 64)
