"""benchmarks/bench_hip_row_blocks.py: its two variants fix hip's choice for 17-32 query rows
either way and give the rule back afterwards."""

import pytest

from conftest import load_script
from pa_hybrid.backends import hip


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_hip_row_blocks.py")


def test_the_variants_fix_the_choice_and_give_the_rule_back(bench):
    rule = hip.prefers_one_tile
    for always in (False, True):
        with bench.one_tile_blocks(always)():
            assert hip.prefers_one_tile(1, 132) is always
            assert hip.prefers_one_tile(10_000, 132) is always
    assert hip.prefers_one_tile is rule


def test_variant_names(bench, monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "compare_variants", lambda args, variants, meta: seen.update(variants))
    bench.main(["--backends", "asm", "triton"])
    assert list(seen) == ["hip/two-tile", "hip/one-tile", "asm", "triton"]
    assert [backend for backend, _ in seen.values()] == ["hip", "hip", "asm", "triton"]

