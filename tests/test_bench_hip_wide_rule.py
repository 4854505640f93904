"""benchmarks/bench_hip_wide_rule.py: each variant moves hip's wide/narrow choice to its own
grid size and gives the rule back afterwards."""

import pytest

from conftest import load_script
from pa_hybrid.backends import hip

H100_SMEM_PER_CTA = hip.SM90_SMEM_PER_CTA


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_hip_wide_rule.py")


@pytest.mark.parametrize("factor, widest", [(16, 8), (1, 132), (0.5, 264), (0.25, 528)])
def test_a_variant_is_wide_up_to_its_grid_size(bench, factor, widest):
    rule = hip.use_wide_variant
    with bench.wide_while(factor)():
        assert hip.use_wide_variant(widest, 132, 128, 16, 1, H100_SMEM_PER_CTA)
        assert not hip.use_wide_variant(widest + 1, 132, 128, 16, 1, H100_SMEM_PER_CTA)
        assert not hip.use_wide_variant(1, 132, 256, 16, 2, H100_SMEM_PER_CTA)  # wide tiles that do not fit
    assert hip.use_wide_variant is rule
    assert not hip.use_wide_variant(widest + 1, 132, 128, 16, 1, H100_SMEM_PER_CTA)


def test_variant_names(bench, monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "compare_variants", lambda args, variants, meta: seen.update(variants))
    bench.main(["--factors", "16", "0.5"])
    assert list(seen) == ["w16", "w0.5"] and all(backend == "hip" for backend, _ in seen.values())
